"""`Stream` / `AsyncStream`: what `Agent.stream()` / `Agent.astream()` return.

Iterate for the reply's text as it arrives (str pieces); `.result` is the `AgentResult` once
the stream has ended. Leaving early (`break`, an exception, `asyncio` cancellation, a web
client hanging up) closes the stream: the request is abandoned, the execution row says
`cancelled`, the text received so far is billed and the rest of the reservation released.
Closing happens on `close()`/`aclose()`, at the end of a `with`/`async with` block, or when
the stream is garbage-collected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import TracebackType

from tenantllm import _core, otel
from tenantllm._core import AgentResult
from tenantllm.config import Settings, deliver_alerts


def _result(core: _core.Stream, ended: bool) -> AgentResult:
    r = core.result
    if r is None:
        why = "was closed before its end or failed" if ended else "has not ended yet: read it to the end first"
        raise RuntimeError(f"no result: the stream {why}")
    return r


def _observe(seen: otel.Call | None, core: _core.Stream, error: BaseException | None) -> None:
    """Ends the stream's span: failed, complete, or closed early (cancelled)."""
    if seen is None:
        return
    if error is not None:
        seen.failed(error)
        return
    r = core.result
    if r is None:
        seen.cancelled()
    else:
        seen.succeeded(r)


class Stream(Iterator[str]):
    """A streamed call, read with `for piece in stream` (blocks the thread, not the GIL)."""

    def __init__(self, core: _core.Stream, s: Settings, seen: otel.Call | None = None) -> None:
        self._core = core
        self._settings = s
        self._ended = False
        self._seen = seen

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        try:
            piece = self._core.next()
        except _core.TenantLLMError as e:
            self._end(e)  # the call's own error: it has ended and its row is settled
            raise
        except BaseException:
            self.close()  # KeyboardInterrupt and the like
            raise
        if piece is None:
            self._end()
            raise StopIteration
        return piece

    def _end(self, error: BaseException | None = None) -> None:
        self._ended = True
        deliver_alerts(self._settings)
        _observe(self._seen, self._core, error)

    def close(self) -> None:
        """Stops reading; returns once the execution row is settled."""
        if not self._ended:
            self._core.close()
            self._end()

    @property
    def result(self) -> AgentResult:
        """The `AgentResult`, once the stream has ended complete (else `RuntimeError`)."""
        return _result(self._core, self._ended)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncStream(AsyncIterator[str]):
    """A streamed call, read with `async for piece in stream`."""

    def __init__(self, core: _core.Stream, s: Settings, seen: otel.Call | None = None) -> None:
        self._core = core
        self._settings = s
        self._ended = False
        self._seen = seen

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        try:
            piece = await self._core.anext()
        except _core.TenantLLMError as e:
            self._end(e)  # the call's own error: it has ended and its row is settled
            raise
        except BaseException:
            # Cancelled: awaiting here could be cancelled again, so the stream is closed
            # in the background and the row settles just after.
            self._core.cancel()
            self._end()
            raise
        if piece is None:
            self._end()
            raise StopAsyncIteration
        return piece

    def _end(self, error: BaseException | None = None) -> None:
        self._ended = True
        deliver_alerts(self._settings)
        _observe(self._seen, self._core, error)

    async def aclose(self) -> None:
        """Stops reading; returns once the execution row is settled."""
        if not self._ended:
            await self._core.aclose()
            self._end()

    @property
    def result(self) -> AgentResult:
        """The `AgentResult`, once the stream has ended complete (else `RuntimeError`)."""
        return _result(self._core, self._ended)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
