"""`Stream` / `AsyncStream`: what `Agent.stream()` / `Agent.astream()` return.

Iterate for the reply's text as it arrives (str pieces); `.result` is the `AgentResult` once
the stream has ended. Leaving early (`break`, an exception, `asyncio` cancellation, a web
client hanging up) closes the stream: the request is abandoned, the execution row says
`cancelled`, the text received so far is billed and the rest of the reservation released.
Closing happens on `close()`/`aclose()`, at the end of a `with`/`async with` block, or when
the stream is garbage-collected.

A stream reads one model round after another: an agent with tools streams each round of its
tool loop, the tools running between them (in the reading thread, or awaited by
`__anext__`), and a structured answer off its schema is asked for once more, that answer
streaming too. The pieces are everything the model said, in order; `.result` is the last
round's answer, with the loop's tool calls and the tokens and costs of every round.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType

from tenantllm import _core, otel
from tenantllm._core import AgentResult
from tenantllm.config import Settings, deliver_alerts


class Round:
    """One model round being read: the core's stream of its call, and its span (if traced)."""

    def __init__(self, core: _core.Stream, seen: otel.Call | None) -> None:
        self.core = core
        self._seen = seen

    def observe(self, error: BaseException | None = None) -> None:
        """Ends the round's span, once: failed, complete, or closed early (cancelled)."""
        seen, self._seen = self._seen, None
        if seen is None:
            return
        if error is not None:
            seen.failed(error)
            return
        r = self.core.result
        if r is None:
            seen.cancelled()
        else:
            seen.succeeded(r)


# Starts a round from its call.
Open = Callable[[_core.Call], Round]
# After a round that ended complete: the next round's call, or None when the stream is over.
After = Callable[[AgentResult], _core.Call | None]
AsyncAfter = Callable[[AgentResult], Awaitable[_core.Call | None]]
# The stream's result, from its last round's.
Finish = Callable[[AgentResult], AgentResult]


def _no_more(r: AgentResult) -> None:
    return None


async def _ano_more(r: AgentResult) -> None:
    return None


def _same(r: AgentResult) -> AgentResult:
    return r


def _ends_loops(e: BaseException) -> RuntimeError:
    """What the stream raises for a tool's StopIteration (from `__next__`) or
    StopAsyncIteration (from `__anext__`): raised as they are, they would end the reader's loop
    as if the stream had ended complete; so a RuntimeError, as PEP 479 makes it for generators."""
    return RuntimeError(f"a tool raised {type(e).__name__}, which would end the stream as if complete")


class _Reading:
    """The round a stream is reading and its tool loop's agent span (if traced): what the
    stream's end ends, and its finalizer if it is collected unclosed (it holds no reference
    to the stream)."""

    def __init__(self, round: Round, trace: otel.AgentRun | None) -> None:
        self.round = round
        self.trace = trace
        self.pid = os.getpid()

    def end(self, error: BaseException | None = None) -> None:
        """Ends the round's span, then the agent span (each once: no-ops if ended already):
        failed with `error`, else cancelled unless the loop's result ended it already."""
        self.round.observe(error)
        if self.trace is not None and error is not None:
            self.trace.failed(error)
        elif self.trace is not None:
            self.trace.cancelled()

    def collected(self) -> None:
        """The finalizer's end: only in the process that opened the stream. A forked child
        collecting the copy it inherited would end and export the parent's spans as its own,
        which the parent still ends (each span twice, the child's cancelled)."""
        if os.getpid() == self.pid:
            self.end()


class _Rounds:
    """What the sync and async forms share: the round being read, and the stream's end."""

    def __init__(self, s: Settings, open: Open, first: _core.Call, finish: Finish, trace: otel.AgentRun | None) -> None:
        self._settings = s
        self._open = open
        self._finish = finish
        self._trace = trace
        # The first request goes out now, not on the first read.
        self._reading = _Reading(self._opened(first), trace)
        self._ended = False
        self._result: AgentResult | None = None
        if s.telemetry is not None:
            # A stream left unclosed (never read, or `break` out of a `for` with no `with`) is
            # closed when it is collected, its row cancelled: its round's and agent span end
            # then, cancelled. Else the round never had a span, and the agent span was never
            # exported while its rounds' and tools' spans named it as their parent.
            weakref.finalize(self, self._reading.collected)

    def _opened(self, call: _core.Call) -> Round:
        """Starts a round; with tools and tracing, inside the call's agent span, so the
        round's span is its child whichever context reads the stream."""
        if self._trace is None:
            return self._open(call)
        with self._trace.inside():
            return self._open(call)

    def _round_done(self) -> AgentResult:
        """The round being read ended complete: its result, its span ended."""
        self._reading.round.observe()
        r = self._reading.round.core.result
        if r is None:
            raise RuntimeError("a round of the stream ended without its result")
        return r

    def _then(self, call: _core.Call | None, last: AgentResult) -> None:
        """Starts the next round, or, at the end, ends the stream with its result."""
        if call is None:
            self._result = self._finish(last)
            self._end()
        else:
            self._reading.round = self._opened(call)

    def _end(self, error: BaseException | None = None) -> None:
        self._ended = True
        deliver_alerts(self._settings)
        self._reading.end(error)

    @property
    def result(self) -> AgentResult:
        """The `AgentResult`, once the stream has ended complete (else `RuntimeError`)."""
        if self._result is None:
            ended = self._ended
            why = "was closed before its end or failed" if ended else "has not ended yet: read it to the end first"
            raise RuntimeError(f"no result: the stream {why}")
        return self._result


class Stream(_Rounds, Iterator[str]):
    """A streamed call, read with `for piece in stream` (blocks the thread, not the GIL)."""

    def __init__(
        self, s: Settings, open: Open, first: _core.Call, after: After = _no_more, finish: Finish = _same,
        trace: otel.AgentRun | None = None,
    ) -> None:
        super().__init__(s, open, first, finish, trace)
        self._after = after

    def __next__(self) -> str:
        while not self._ended:
            try:
                piece = self._reading.round.core.next()
            except _core.TenantLLMError as e:
                self._end(e)  # the call's own error: it has ended and its row is settled
                raise
            except BaseException:
                self.close()  # KeyboardInterrupt and the like
                raise
            if piece is not None:
                return piece
            last = self._round_done()
            try:
                self._then(self._after(last), last)  # a tool loop's tools run here
            except BaseException as e:
                self._end(e)  # a tool raised (raise_tool_errors): every round so far is settled
                if isinstance(e, StopIteration):
                    raise _ends_loops(e) from e
                raise
        raise StopIteration

    def close(self) -> None:
        """Stops reading; returns once the execution row is settled."""
        if not self._ended:
            self._reading.round.core.close()
            self._end()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncStream(_Rounds, AsyncIterator[str]):
    """A streamed call, read with `async for piece in stream`."""

    def __init__(
        self, s: Settings, open: Open, first: _core.Call, after: AsyncAfter = _ano_more, finish: Finish = _same,
        trace: otel.AgentRun | None = None,
    ) -> None:
        super().__init__(s, open, first, finish, trace)
        self._after = after

    async def __anext__(self) -> str:
        while not self._ended:
            try:
                piece = await self._reading.round.core.anext()
            except _core.TenantLLMError as e:
                self._end(e)  # the call's own error: it has ended and its row is settled
                raise
            except BaseException:
                # Cancelled: awaiting here could be cancelled again, so the stream is closed
                # in the background and the row settles just after.
                self._reading.round.core.cancel()
                self._end()
                raise
            if piece is not None:
                return piece
            last = self._round_done()
            try:
                self._then(await self._after(last), last)  # a tool loop's tools are awaited here
            except BaseException as e:
                self._end(e)  # cancelled while a tool ran, or it raised: every round is settled
                if isinstance(e, StopAsyncIteration):
                    raise _ends_loops(e) from e
                raise
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stops reading; returns once the execution row is settled."""
        if not self._ended:
            await self._reading.round.core.aclose()
            self._end()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
