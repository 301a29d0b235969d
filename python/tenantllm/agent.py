"""`Agent`: declare a model and prompt templates on a class, then `call()` / `acall()` it."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, overload

from tenantllm import _core, otel
from tenantllm._core import AgentResult, ConfigurationError, MissingParameterError
from tenantllm.config import Settings, deliver_alerts, settings
from tenantllm.streaming import AsyncStream, Finish, Open, Round, Stream
from tenantllm.structured import Schema, make_schema
from tenantllm.tenancy import _UNSET, ResolvedTenant, ready, resolve
from tenantllm.tools import (
    MAX_TOOL_ROUNDS,
    Tool,
    ToolLoop,
    anext_round,
    arun_loop,
    make_tools,
    next_round,
    run_loop,
    tools_json,
)


@dataclass(frozen=True)
class Retries:
    """Retry a model on retryable errors: `max` retries, waiting base * 2**n (exponential),
    base * (n + 1) (linear) or base (constant) seconds, capped at `max_delay`, with jitter."""

    max: int = 2
    backoff: str = "exponential"
    base: float = 0.4
    max_delay: float = 3.0


@dataclass(frozen=True)
class BreakerPolicy:
    """Open the breaker after `errors` failures within `within` seconds, for `cooldown` seconds."""

    errors: int = 10
    within: float = 60
    cooldown: float = 300


@dataclass(frozen=True)
class Downgrade:
    """`budget_fallback`: once the tenant has spent `at` (a share, more than 0 and at most 1)
    of any of its own cost limits (daily or monthly, hard or soft), its calls go to the
    cheaper `model`; the execution's metadata has `downgraded_from`."""

    at: float
    model: str


# Prior turns: [{"role": "user" | "assistant", "content": str}, ...], oldest first (checked
# by the core, which names the bad turn).
History = Sequence[Mapping[str, Any]] | None

# Keyword arguments of call()/acall(), so no prompt parameter may be named like them.
RESERVED_PARAMS = frozenset({"tenant", "dry_run", "history"})


def placeholders(template: str | None, where: str) -> list[str]:
    """The parameter names a template uses, in order of first use. Checked when the class is
    defined, so a broken template fails at import rather than on a customer's request."""
    if template is None:
        return []
    if not isinstance(template, str):
        raise ConfigurationError(f"{where} must be a string template, got {type(template).__name__}")
    names: list[str] = []
    try:
        for _, field, _, conversion in string.Formatter().parse(template):
            if field is None:
                continue
            root = field.split(".", 1)[0].split("[", 1)[0]
            if not root.isidentifier():
                raise ConfigurationError(f"{where}: placeholder {{{field}}} must be a name like {{query}}")
            if root in RESERVED_PARAMS:
                raise ConfigurationError(f"{where}: {{{root}}} is reserved (it is a keyword of call()); rename it")
            if conversion not in (None, "r", "s", "a"):
                raise ConfigurationError(f"{where}: unknown conversion !{conversion} in {{{field}}}")
            if root not in names:
                names.append(root)
    except ValueError as e:
        raise ConfigurationError(f"{where}: invalid template: {e}") from None
    return names


def _number(cls_name: str, attr: str, value: Any) -> float:
    """A float for the core, which checks the range; an int too large for a float is out of it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{cls_name}.{attr} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ConfigurationError(f"{cls_name}.{attr} is out of range (got {value})") from None


def build_spec(
    name: str,
    *,
    model: Any,
    temperature: Any,
    max_tokens: Any,
    timeout: Any,
    retries: Any,
    fallback_models: Any,
    circuit_breaker: Any,
    rate_limit_wait: Any = 0,
    budget_fallback: Any = None,
    tools: str | None = None,
    schema: Schema | None = None,
    cache_ttl: Any = None,
) -> _core.AgentSpec:
    """Validates an agent's settings (shared by `Agent` classes and `@agent` functions)."""
    if not isinstance(model, str) or not model:
        raise ConfigurationError(f"{name}.model must be a model name such as 'gpt-4o' or 'mock/fast'")
    if isinstance(retries, bool) or not isinstance(retries, int | Retries):
        raise ConfigurationError(f"{name}.retries must be an int or tenantllm.Retries")
    r = Retries(max=retries) if isinstance(retries, int) else retries
    if isinstance(r.max, bool) or not isinstance(r.max, int):
        raise ConfigurationError(f"{name}.retries.max must be an int, got {type(r.max).__name__}")
    if r.max < 0:
        raise ConfigurationError(f"{name}.retries must not be negative")
    if not isinstance(r.backoff, str):
        raise ConfigurationError(f"{name}.retries.backoff must be a string, got {type(r.backoff).__name__}")
    if isinstance(fallback_models, str) or not isinstance(fallback_models, Sequence) or not all(
        isinstance(m, str) for m in fallback_models
    ):
        raise ConfigurationError(f"{name}.fallback_models must be a list of model names")
    if circuit_breaker is not None and not isinstance(circuit_breaker, BreakerPolicy):
        raise ConfigurationError(f"{name}.circuit_breaker must be a tenantllm.BreakerPolicy")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigurationError(f"{name}.max_tokens must be a positive int, got {max_tokens!r}")
    breaker = None
    if circuit_breaker is not None:
        if isinstance(circuit_breaker.errors, bool) or not isinstance(circuit_breaker.errors, int):
            raise ConfigurationError(f"{name}.circuit_breaker.errors must be an int")
        if circuit_breaker.errors < 1:
            raise ConfigurationError("circuit_breaker.errors must be at least 1")
        breaker = (
            circuit_breaker.errors,
            _number(name, "circuit_breaker.within", circuit_breaker.within),
            _number(name, "circuit_breaker.cooldown", circuit_breaker.cooldown),
        )
    if budget_fallback is not None and not isinstance(budget_fallback, Downgrade):
        raise ConfigurationError(f"{name}.budget_fallback must be a tenantllm.Downgrade")
    if budget_fallback is not None and (not isinstance(budget_fallback.model, str) or not budget_fallback.model):
        raise ConfigurationError(f"{name}.budget_fallback.model must be a model name")
    downgrade = None
    if budget_fallback is not None:
        downgrade = (_number(name, "budget_fallback.at", budget_fallback.at), budget_fallback.model)
    return _core.AgentSpec(
        name,
        model,
        fallback_models=list(fallback_models),
        temperature=None if temperature is None else _number(name, "temperature", temperature),
        max_tokens=max_tokens,
        timeout=_number(name, "timeout", timeout),
        retries=r.max,
        backoff=r.backoff,
        base=_number(name, "retries.base", r.base),
        max_delay=_number(name, "retries.max_delay", r.max_delay),
        breaker=breaker,
        rate_limit_wait=_number(name, "rate_limit_wait", rate_limit_wait),
        downgrade=downgrade,
        tools=tools,
        schema=None if schema is None else schema.for_spec(),
        cache_ttl=0.0 if cache_ttl is None else _number(name, "cache_ttl", cache_ttl),
    )


def _check_dry_run(dry_run: Any) -> None:
    if not isinstance(dry_run, bool):
        raise ConfigurationError(f"dry_run must be True or False, got {type(dry_run).__name__}")


def _render(template: str, params: Mapping[str, Any], where: str | Agent, part: str = "") -> str:
    """`where` names the template in errors: a name, or an agent and its template's `part`
    (the name is then built only if rendering fails)."""
    try:
        return template.format_map(params)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        # A format spec or attribute the given value does not support ({x:.2f} with a str...).
        name = where if isinstance(where, str) else f"{type(where).__name__}.{part}"
        raise ConfigurationError(f"{name}: cannot render the template with these parameters: {e}") from None


def metadata_json(where: str, metadata: Any) -> str:
    if isinstance(metadata, dict) and not metadata:
        return "{}"  # the common case, without a trip through json
    if not isinstance(metadata, Mapping):
        raise ConfigurationError(f"{where} must return a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(dict(metadata), default=str, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigurationError(f"{where}: metadata is not JSON-serialisable: {e}") from None


class Agent:
    """Subclass and set class attributes; every `{placeholder}` in `system`/`user` is a
    required keyword parameter of `call()`.

    >>> class Support(Agent):
    ...     model = "mock/fast"
    ...     user = "Question: {query}"
    >>> Support.call(query="Where is my order?", tenant="acme").content
    '[mock/fast] You asked: Question: Where is my order?'
    """

    model: ClassVar[str] = ""
    temperature: ClassVar[float | None] = None
    max_tokens: ClassVar[int] = 1024
    timeout: ClassVar[float] = 30.0
    system: ClassVar[str | None] = None
    user: ClassVar[str] = ""
    retries: ClassVar[int | Retries] = 0
    fallback_models: ClassVar[Sequence[str]] = ()
    circuit_breaker: ClassVar[BreakerPolicy | None] = None
    rate_limit_wait: ClassVar[float] = 0
    budget_fallback: ClassVar[Downgrade | None] = None
    # Typed functions (sync or async) the model may call, run between model rounds.
    tools: ClassVar[Sequence[Any]] = ()
    # The most model rounds of a call with tools (1 to 50); the last must answer in text.
    max_tool_rounds: ClassVar[int] = 5
    # A tool that raises: False sends the error to the model; True raises it from call().
    raise_tool_errors: ClassVar[bool] = False
    # Structured output: a pydantic model class or a JSON Schema dict; `r.parsed` is the answer.
    schema: ClassVar[Any] = None
    # Seconds (0 to 2,592,000, i.e. 30 days) an answer is kept and given again to the same
    # tenant's identical call, free; 0 or None: no cache.
    cache_ttl: ClassVar[float | None] = None

    _tl_params: ClassVar[tuple[str, ...]] = ()
    _tl_param_set: ClassVar[frozenset[str]] = frozenset()
    _tl_spec: ClassVar[_core.AgentSpec | None] = None
    _tl_tools: ClassVar[dict[str, Tool]] = {}
    _tl_schema: ClassVar[Schema | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.user, str):
            got = type(cls.user).__name__
            raise ConfigurationError(f"{cls.__name__}.user must be a prompt template string, got {got}")
        params = placeholders(cls.system, f"{cls.__name__}.system")
        params += [p for p in placeholders(cls.user, f"{cls.__name__}.user") if p not in params]
        cls._tl_params = tuple(params)
        cls._tl_param_set = frozenset(params)
        cls._tl_spec = None  # built on first call, once per class
        cls._tl_tools = make_tools(cls.tools, f"{cls.__name__}.tools")
        cls._tl_schema = make_schema(cls.schema, f"{cls.__name__}.schema")
        rounds = cls.max_tool_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_TOOL_ROUNDS:
            raise ConfigurationError(f"{cls.__name__}.max_tool_rounds must be an int from 1 to {MAX_TOOL_ROUNDS}")
        if not isinstance(cls.raise_tool_errors, bool):
            raise ConfigurationError(f"{cls.__name__}.raise_tool_errors must be True or False")

    def __init__(self, **params: Any) -> None:
        cls = type(self)
        if params.keys() == cls._tl_param_set:  # the common case, checked without building sets
            self.params: dict[str, Any] = params
            return
        unexpected = sorted(set(params) - set(cls._tl_params))
        if unexpected:
            raise TypeError(
                f"{cls.__name__}.call() got unexpected parameter(s) {', '.join(unexpected)}; "
                f"its prompts use {', '.join(cls._tl_params) or 'no parameters'}"
            )
        missing = [p for p in cls._tl_params if p not in params]
        if missing:
            raise MissingParameterError(f"{cls.__name__}.call() is missing required parameter(s): {', '.join(missing)}")
        self.params = params

    def execution_metadata(self) -> Mapping[str, Any]:
        """Override to attach data (plan, request id...) to this call's execution row."""
        return {}

    @classmethod
    def _spec(cls) -> _core.AgentSpec:
        spec = cls.__dict__.get("_tl_spec")
        if spec is None:
            if not cls.user:
                raise ConfigurationError(f"{cls.__name__}.user must be a prompt template")
            spec = build_spec(
                cls.__name__,
                model=cls.model,
                temperature=cls.temperature,
                max_tokens=cls.max_tokens,
                timeout=cls.timeout,
                retries=cls.retries,
                fallback_models=cls.fallback_models,
                circuit_breaker=cls.circuit_breaker,
                rate_limit_wait=cls.rate_limit_wait,
                budget_fallback=cls.budget_fallback,
                tools=tools_json(cls._tl_tools),
                schema=cls._tl_schema,
                cache_ttl=cls.cache_ttl,
            )
            cls._tl_spec = spec
        return spec

    def render(self) -> tuple[str | None, str]:
        # The templates' names for errors are built only when one is raised.
        system = None if self.system is None else _render(self.system, self.params, self, "system")
        return system, _render(self.user, self.params, self, "user")

    def _prepare(self, s: Settings, tenant: Any, history: Any) -> Prepared:
        system, user = self.render()
        metadata = self.execution_metadata()
        return Prepared(
            spec=self._spec(),
            system=system,
            user=user,
            tenant=resolve(s, tenant),
            # The common case, without a trip through metadata_json and the name it is given.
            metadata="{}"
            if type(metadata) is dict and not metadata
            else metadata_json(f"{type(self).__name__}.execution_metadata()", metadata),
            history=history,
            schema=type(self)._tl_schema,
        )

    @overload
    @classmethod
    def call(
        cls, *, tenant: Any = ..., dry_run: Literal[False] = False, history: History = ..., **params: Any
    ) -> AgentResult: ...
    @overload
    @classmethod
    def call(
        cls, *, tenant: Any = ..., dry_run: Literal[True], history: History = ..., **params: Any
    ) -> dict[str, Any]: ...
    @classmethod
    def call(
        cls, *, tenant: Any = _UNSET, dry_run: bool = False, history: History = None, **params: Any
    ) -> AgentResult | dict[str, Any]:
        """Run the agent and wait for the result (the GIL is released while waiting).

        `history`: prior turns (`{"role": "user" | "assistant", "content": str}`, oldest
        first), sent before the rendered prompt. Returns an `AgentResult`, or with
        `dry_run=True` a dict of what would be sent."""
        _check_dry_run(dry_run)
        self = cls(**params)
        s = settings()
        p = self._prepare(s, tenant, history)
        if dry_run:
            return p.dry_run(s, self._settings())
        return p.run_tools(s, self._tool_loop(s, p)) if cls._tl_tools else p.run(s)

    @overload
    @classmethod
    async def acall(
        cls, *, tenant: Any = ..., dry_run: Literal[False] = False, history: History = ..., **params: Any
    ) -> AgentResult: ...
    @overload
    @classmethod
    async def acall(
        cls, *, tenant: Any = ..., dry_run: Literal[True], history: History = ..., **params: Any
    ) -> dict[str, Any]: ...
    @classmethod
    async def acall(
        cls, *, tenant: Any = _UNSET, dry_run: bool = False, history: History = None, **params: Any
    ) -> AgentResult | dict[str, Any]:
        """Like `call`, as a coroutine; cancelling it aborts the request and records the
        execution as cancelled."""
        _check_dry_run(dry_run)
        self = cls(**params)
        s = settings()
        await ready(tenant)
        p = self._prepare(s, tenant, history)
        if dry_run:
            return p.dry_run(s, self._settings())
        return await p.arun_tools(s, self._tool_loop(s, p)) if cls._tl_tools else await p.arun(s)

    @classmethod
    def stream(cls, *, tenant: Any = _UNSET, history: History = None, **params: Any) -> Stream:
        """Run the agent, streaming its reply: iterate for str pieces as they arrive, then
        `.result`. Errors before the first piece (budget, breaker, every attempt failed)
        raise from the first `next()`; retries and fallbacks apply until the first piece.
        With tools, each round of the loop streams and the tools run between rounds; a
        round's errors (a budget run out between rounds) raise from the `next()` reading it."""
        self = cls(**params)
        s = settings()
        p = self._prepare(s, tenant, history)
        if not cls._tl_tools:
            return Stream(s, p.open(s), p.call(), finish=p.parsed)
        loop = self._tool_loop(s, p)
        after = functools.partial(next_round, loop, call=p.call)
        return Stream(s, p.open(s), loop.first_round(p.call), after, p.finish(loop), loop.trace)

    @classmethod
    def astream(cls, *, tenant: Any = _UNSET, history: History = None, **params: Any) -> AsyncStream:
        """Like `stream`, read with `async for`; tools are awaited (sync ones in a thread)."""
        self = cls(**params)
        s = settings()
        p = self._prepare(s, tenant, history)
        if not cls._tl_tools:
            return AsyncStream(s, p.open(s), p.call(), finish=p.parsed)
        loop = self._tool_loop(s, p)
        after = functools.partial(anext_round, loop, call=p.call)
        return AsyncStream(s, p.open(s), loop.first_round(p.call), after, p.finish(loop), loop.trace)

    def _tool_loop(self, s: Settings, p: Prepared) -> ToolLoop:
        cls = type(self)
        parent, root = lineage()
        loop = ToolLoop(cls._tl_tools, cls.max_tool_rounds, cls.raise_tool_errors, p.parsed, parent, root)
        t = s.telemetry
        loop.trace = None if t is None else otel.AgentRun(t, p.spec, p.tenant.id, s.engine.provider_of(p.spec.model))
        return loop

    def _settings(self) -> dict[str, Any]:
        cls = type(self)
        return {
            "model": cls.model,
            "fallback_models": list(cls.fallback_models),
            "temperature": cls.temperature,
            "max_tokens": cls.max_tokens,
            "timeout": cls.timeout,
            "cache_ttl": cls.cache_ttl,
        }


@dataclass(frozen=True)
class Lineage:
    """The guarded block running now: calls made inside it record it as parent, and its
    root as their root."""

    parent: str
    root: str


current_execution: contextvars.ContextVar[Lineage | None] = contextvars.ContextVar("tenantllm_execution", default=None)


def lineage() -> tuple[str | None, str | None]:
    """(parent_execution_id, root_execution_id) for a call starting now."""
    at = current_execution.get()
    return (None, None) if at is None else (at.parent, at.root)


async def _settled(settlement: _core.Settlement) -> None:
    """Waits (a few ms, at most about a second) until the core has recorded a cancelled call,
    which it does on its own thread as the cancellation reaches it: the caller then never
    sees its row `running` or its reservation held."""
    for _ in range(1000):
        if settlement.done:
            return
        await asyncio.sleep(0.001)


async def _arun(s: Settings, call: _core.Call) -> AgentResult:
    """One call awaited; cancelled, it returns only once the core has recorded it."""
    awaitable, settlement = s.engine.arun(call)
    try:
        return await awaitable
    except asyncio.CancelledError:
        await _settled(settlement)
        raise


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, a
# measurable share of the Python layer's work per call. Never changed once built.
@dataclass(slots=True)
class Prepared:
    """One call, rendered and resolved, ready for the core."""

    spec: _core.AgentSpec
    system: str | None
    user: str
    tenant: ResolvedTenant
    metadata: str
    history: History = None
    schema: Schema | None = None

    def call(self, tool_round: dict[str, Any] | None = None) -> _core.Call:
        """The call for the core (validated there: tenant limits, keys, metadata, history);
        `tool_round`: a tool loop's round (`ToolLoop.round_args`), with its own lineage."""
        t = self.tenant
        parent, root = lineage()
        extra: dict[str, Any] = {}
        if tool_round is not None:
            extra = dict(tool_round)
            parent = extra.pop("parent_execution_id", parent)
            root = extra.pop("root_execution_id", root)
        if self.schema is not None:
            extra["validator"] = self.schema.check
        return _core.Call(
            self.spec, self.system, self.user, t.id, t.limits, t.api_keys, self.metadata, parent, root, self.history,
            tenant_name=t.name,
            **extra,
        )

    def parsed(self, r: AgentResult) -> AgentResult:
        """With a schema, the result with its answer parsed (the core had it checked)."""
        if self.schema is None:
            return r
        return r._completed(r.tool_calls, self.schema.parse(r.content), [], r.duration_ms)

    def observed(self, s: Settings) -> otel.Call | None:
        """This call's telemetry, when `opentelemetry` is configured."""
        t = s.telemetry
        return None if t is None else otel.start(t, self.spec, self.tenant.id, self.system, self.user, self.history)

    def open(self, s: Settings) -> Open:
        """How a stream starts each round: the core streams its call, observed when
        telemetry is on."""
        return lambda call: Round(s.engine.stream(call), self.observed(s))

    def finish(self, loop: ToolLoop) -> Finish:
        """A streamed tool loop's result, once its last round has ended."""
        return lambda _last: loop.result()

    def run(self, s: Settings) -> AgentResult:
        try:
            return self.parsed(self._run(s, self.call()))
        finally:
            deliver_alerts(s)

    async def arun(self, s: Settings) -> AgentResult:
        try:
            return self.parsed(await self._arun(s, self.call()))
        finally:
            deliver_alerts(s)

    def run_tools(self, s: Settings, loop: ToolLoop) -> AgentResult:
        try:
            return run_loop(loop, self.call, lambda c: self._run(s, c))
        finally:
            deliver_alerts(s)

    async def arun_tools(self, s: Settings, loop: ToolLoop) -> AgentResult:
        try:
            return await arun_loop(loop, self.call, lambda c: self._arun(s, c))
        finally:
            deliver_alerts(s)

    def _run(self, s: Settings, call: _core.Call) -> AgentResult:
        """One call to the core (a tool loop's round), observed when telemetry is on."""
        seen = self.observed(s)
        try:
            r = s.engine.run(call)
        except BaseException as e:
            if seen is not None:
                seen.failed(e)
            raise
        return r if seen is None else seen.succeeded(r)

    async def _arun(self, s: Settings, call: _core.Call) -> AgentResult:
        seen = self.observed(s)
        try:
            r = await _arun(s, call)
        except BaseException as e:
            if seen is not None:
                seen.failed(e)
            raise
        return r if seen is None else seen.succeeded(r)

    def dry_run(self, s: Settings, settings: dict[str, Any]) -> dict[str, Any]:
        plan = s.engine.plan(self.call())
        return {
            "agent": self.spec.name,
            "system": self.system,
            "user": self.user,
            "tenant_id": self.tenant.id,
            "tenant_limits": self.tenant.limits,
            "history": self.history or [],
            **settings,
            "metadata": json.loads(self.metadata),
            **plan,
        }
