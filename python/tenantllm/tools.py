"""Tools: typed Python functions (sync or async) an agent's model may call.

Each function becomes a JSON-schema tool: its name, its docstring as the description, and
the schema of its arguments derived by pydantic from the type hints (`pip install
'tenantllm[tools]'`). The agent runs a loop of model rounds (`max_tool_rounds`): each round is
one budgeted call of the core, with its own reservation and row; between rounds the calls the
model asked for run here, and their results (or errors) go back to it in the next round.
A stream (`Agent.stream`/`astream`) runs the same loop, each round streamed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tenantllm import _core
from tenantllm._core import AgentResult, ConfigurationError
from tenantllm.structured import describe

if TYPE_CHECKING:
    from tenantllm.otel import AgentRun

# The most model rounds an agent may run (each one is a billed call).
MAX_TOOL_ROUNDS = 50


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with the schema and validator of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    arguments: Any  # a pydantic model class

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def make_tool(fn: Any, where: str) -> Tool:
    """A tool from a typed function; every parameter needs a type hint."""
    try:
        import pydantic
    except ImportError:
        raise ConfigurationError(f"{where}: tools need pydantic: pip install 'tenantllm[tools]'") from None
    if not inspect.isfunction(fn) and not inspect.ismethod(fn):
        raise ConfigurationError(f"{where} must hold functions, got {type(fn).__name__}")
    name = fn.__name__
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:
        raise ConfigurationError(f"{where}: tool {name}: cannot read its type hints: {e}") from None
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ConfigurationError(f"{where}: tool {name}: parameter {p.name!r} must be a plain or keyword parameter")
        if p.name not in hints:
            raise ConfigurationError(f"{where}: tool {name}: parameter {p.name!r} has no type hint")
        if p.name.startswith("_"):
            raise ConfigurationError(f"{where}: tool {name}: parameter {p.name!r} must not start with '_'")
        fields[p.name] = (hints[p.name], ... if p.default is p.empty else p.default)
    try:
        model = pydantic.create_model(
            f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields
        )
        parameters = model.model_json_schema()
    except Exception as e:  # a type pydantic cannot describe
        raise ConfigurationError(f"{where}: tool {name}: its arguments have no JSON Schema: {e}") from None
    parameters.pop("title", None)
    return Tool(name, inspect.getdoc(fn) or "", parameters, fn, model)


def make_tools(fns: Any, where: str) -> dict[str, Tool]:
    if isinstance(fns, str | bytes) or not isinstance(fns, Sequence):
        raise ConfigurationError(f"{where} must be a list of functions")
    tools: dict[str, Tool] = {}
    for fn in fns:
        t = make_tool(fn, where)
        if t.name in tools:
            raise ConfigurationError(f"{where}: two tools are named {t.name!r}")
        tools[t.name] = t
    return tools


def tools_json(tools: Mapping[str, Tool]) -> str | None:
    """The tools as the core takes them (it checks names and schemas)."""
    return json.dumps([t.spec() for t in tools.values()]) if tools else None


class ToolCallError(Exception):
    """A call the model asked for that cannot run: unknown tool or bad arguments."""


@dataclass
class Pending:
    """One call the model asked for, checked and ready to run (or already failed)."""

    id: str
    name: str
    arguments: str
    signature: str | None
    recorded_arguments: Any = None
    kwargs: dict[str, Any] | None = None
    error: str | None = None


def check_call(tools: Mapping[str, Tool], request: tuple[str, str, str, str | None]) -> Pending:
    """Looks up the tool and validates the arguments; failures become the call's error."""
    call_id, name, arguments, signature = request
    p = Pending(call_id, name, arguments, signature, recorded_arguments=arguments)
    try:
        args = json.loads(arguments or "{}")
    except ValueError as e:
        p.error = f"the arguments are not valid JSON: {e}"
        return p
    p.recorded_arguments = args
    tool = tools.get(name)
    if tool is None:
        p.error = f"unknown tool {name!r}; the tools are: {', '.join(tools)}"
        return p
    if not isinstance(args, dict):
        p.error = "the arguments must be a JSON object"
        return p
    try:
        validated = tool.arguments.model_validate(args)
    except Exception as e:  # pydantic's ValidationError
        p.error = f"invalid arguments: {describe(e)}"
        return p
    p.kwargs = {k: getattr(validated, k) for k in type(validated).model_fields}
    return p


def result_text(name: str, value: Any) -> tuple[str, Any]:
    """A tool's return value as the text sent to the model and the JSON value recorded."""
    if isinstance(value, str):
        return value, value
    try:
        import pydantic_core

        text = pydantic_core.to_json(value).decode()
    except Exception as e:
        raise ConfigurationError(f"tool {name} returned a value that is not JSON-serialisable: {e}") from None
    return text, json.loads(text)


@dataclass
class ToolLoop:
    """The state of one agent call's tool loop: the rounds so far and each call's record."""

    tools: Mapping[str, Tool]
    max_rounds: int
    raise_errors: bool
    # Reads the answer (a schema's): before the agent span ends, so an answer that fails it
    # ends the run with its error.
    parse: Callable[[AgentResult], AgentResult]
    # The caller's lineage (a guarded block around the call), for round 1.
    parent: str | None = None
    root: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    results: list[AgentResult] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    # The call's `invoke_agent` span when tracing is on: each tool call runs in a span of its
    # own under it (`executing`), and the loop's result ends it.
    trace: AgentRun | None = None

    def round_args(self) -> dict[str, Any]:
        """What the next round adds to the core's call: the earlier rounds, the calls so far
        (stored with the row), its lineage (round 1 descends from the caller's block, each
        later round from the one before); the last round may not call tools."""
        parent, root = self.parent, self.root
        if self.results:
            parent, root = self.results[-1].execution_id, self.root or self.parent or self.results[0].execution_id
        return {
            "rounds": json.dumps(self.rounds) if self.rounds else None,
            "tools_closed": len(self.results) == self.max_rounds - 1,
            "tool_calls": json.dumps(self.records) if self.records else None,
            "parent_execution_id": parent,
            "root_execution_id": root,
        }

    def pending(self, r: AgentResult) -> list[Pending]:
        """The calls a round's answer asks for, checked; none when the loop is over."""
        self.results.append(r)
        if len(self.results) == self.max_rounds:
            return []
        return [check_call(self.tools, req) for req in r._tool_requests]

    def finish_call(self, p: Pending, value: Any, error: BaseException | None, t0: float) -> dict[str, Any]:
        """Records one call's outcome; returns its answer for the next round."""
        record: dict[str, Any] = {"name": p.name, "arguments": p.recorded_arguments}
        if error is not None:
            if self.raise_errors:
                raise error
            p.error = f"{type(error).__name__}: {error}"
        if p.error is None:
            content, record["result"] = result_text(p.name, value)
        else:
            content = record["error"] = p.error
        record["duration_ms"] = int((time.monotonic() - t0) * 1000)
        self.records.append(record)
        call = {"id": p.id, "name": p.name, "arguments": p.arguments, "signature": p.signature}
        return {"call": call, "content": content, "is_error": p.error is not None}

    def add_round(self, answers: list[dict[str, Any]]) -> None:
        self.rounds.append({"text": self.results[-1].content, "answers": answers})

    def result(self) -> AgentResult:
        last = self.results[-1]
        duration = int((time.monotonic() - self.started) * 1000)
        r = self.parse(last._completed(list(self.records), None, self.results[:-1], duration))
        if self.trace is not None:
            self.trace.succeeded(r)
        return r

    def first_round(self, call: RoundCall) -> _core.Call:
        """A stream's round 1, built inside the agent span: a call the core refuses
        (ConfigurationError) ends the run with it, as in `run_loop`."""
        with self.traced():
            return call(self.round_args())

    def traced(self) -> AbstractContextManager[None]:
        """Where a call or acall runs its rounds: inside the agent span, when tracing is on."""
        return nullcontext() if self.trace is None else self.trace.inside()

    def executing(self, p: Pending) -> AbstractContextManager[None]:
        """Where a tool call runs: inside its `execute_tool` span, when tracing is on."""
        return nullcontext() if self.trace is None else self.trace.tool(p)

    def run_sync(self, p: Pending) -> dict[str, Any]:
        t0 = time.monotonic()
        value: Any = None
        returned = False
        try:
            with self.executing(p):
                if p.kwargs is not None:
                    fn = self.tools[p.name].fn
                    value = asyncio.run(fn(**p.kwargs)) if inspect.iscoroutinefunction(fn) else fn(**p.kwargs)
                returned = True
                # Recorded in the tool's span: a value JSON cannot hold fails it too.
                return self.finish_call(p, value, None, t0)
        except Exception as e:  # not KeyboardInterrupt and the like: those stop the loop
            if returned:
                raise  # that value's ConfigurationError: not the tool's error, for the model
            return self.finish_call(p, None, e, t0)

    async def run_async(self, p: Pending) -> dict[str, Any]:
        """Async tools are awaited; sync ones run in a thread, so the event loop keeps going."""
        t0 = time.monotonic()
        value: Any = None
        returned = False
        try:
            with self.executing(p):
                if p.kwargs is not None:
                    fn = self.tools[p.name].fn
                    if inspect.iscoroutinefunction(fn):
                        value = await fn(**p.kwargs)
                    else:
                        # The thread runs in a copy of this context: the tool's span is current there too.
                        value = await asyncio.to_thread(fn, **p.kwargs)
                returned = True
                return self.finish_call(p, value, None, t0)  # in the span, as `run_sync`'s
        except Exception as e:  # not a cancellation: that stops the loop
            if returned:
                raise
            return self.finish_call(p, None, e, t0)


RoundCall = Callable[[dict[str, Any]], _core.Call]


def next_round(loop: ToolLoop, r: AgentResult, call: RoundCall) -> _core.Call | None:
    """After a round's answer `r`: the calls it asks for run, and the next round's call comes
    back; None when the loop is over (no calls, or the last round)."""
    pending = loop.pending(r)
    if not pending:
        return None
    loop.add_round([loop.run_sync(p) for p in pending])
    return call(loop.round_args())


async def anext_round(loop: ToolLoop, r: AgentResult, call: RoundCall) -> _core.Call | None:
    """`next_round` with the tools awaited (sync ones in a thread)."""
    pending = loop.pending(r)
    if not pending:
        return None
    loop.add_round([await loop.run_async(p) for p in pending])
    return call(loop.round_args())


def run_loop(loop: ToolLoop, call: RoundCall, run: Callable[[_core.Call], AgentResult]) -> AgentResult:
    """The loop: a round (admitted, reserved and recorded by the core, so a budget that runs
    out stops it with BudgetExceededError), its tool calls, the next round..."""
    with loop.traced():
        c: _core.Call | None = call(loop.round_args())
        while c is not None:
            c = next_round(loop, run(c), call)
        return loop.result()


async def arun_loop(
    loop: ToolLoop, call: RoundCall, arun: Callable[[_core.Call], Awaitable[AgentResult]]
) -> AgentResult:
    """`run_loop` for `acall`: the same rounds, tools awaited (sync ones in a thread)."""
    with loop.traced():
        c: _core.Call | None = call(loop.round_args())
        while c is not None:
            c = await anext_round(loop, await arun(c), call)
        return loop.result()
