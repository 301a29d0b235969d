"""Decorators for code that is not an `Agent` class: `@agent` turns a function into an agent;
`@guard` and `with guarded(...)` put tenancy, budgets, breakers and tracking around a user's
own SDK call."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from tenantllm import _core
from tenantllm._core import AgentResult, ConfigurationError, InvalidResponseError
from tenantllm.agent import (
    BreakerPolicy,
    Lineage,
    Prepared,
    Retries,
    _render,
    build_spec,
    current_execution,
    lineage,
    metadata_json,
)
from tenantllm.agent import placeholders as template_params
from tenantllm.config import deliver_alerts, settings
from tenantllm.tenancy import _UNSET, ready, resolve

P = ParamSpec("P")
R = TypeVar("R")


class UsageNotReported(UserWarning):
    """A guarded block finished without reporting token usage; it was recorded as zero."""


class AgentFunction(Protocol[P]):
    """A function made into an agent: calling it runs the agent. `tenant=` is accepted at run
    time; type-checked code can use `with_tenant(...)` (a ParamSpec signature cannot carry an
    extra keyword)."""

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> AgentResult: ...
    def with_tenant(self, tenant: Any) -> Callable[P, AgentResult]: ...


class AsyncAgentFunction(Protocol[P]):
    """The `async def` form of `AgentFunction`."""

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[AgentResult]: ...
    def with_tenant(self, tenant: Any) -> Callable[P, Awaitable[AgentResult]]: ...


class _AgentDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Awaitable[str | None]]) -> AsyncAgentFunction[P]: ...
    @overload
    def __call__(self, fn: Callable[P, str | None]) -> AgentFunction[P]: ...


def agent(
    *,
    model: str,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int = 1024,
    timeout: float = 30.0,
    retries: int | Retries = 0,
    fallback_models: Sequence[str] = (),
    circuit_breaker: BreakerPolicy | None = None,
    cache_ttl: float | None = None,
) -> _AgentDecorator:
    """Make an agent from a function. Its docstring is the user prompt template (its
    parameters fill the `{placeholders}`), unless the function returns the prompt itself.
    Calling it runs the agent (`async def` -> awaitable) and returns an `AgentResult`;
    `tenant=` is accepted as for `Agent.call`. The agent's name is the function's qualified name.
    `cache_ttl` is the response cache's, as on `Agent`.
    """

    def decorate(fn: Callable[..., Any]) -> Any:
        name = fn.__qualname__
        spec = build_spec(
            name,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            timeout=timeout,
            retries=retries,
            fallback_models=fallback_models,
            circuit_breaker=circuit_breaker,
            cache_ttl=cache_ttl,
        )
        sig = inspect.signature(fn)
        if "tenant" in sig.parameters:
            raise ConfigurationError(f"{name}: a parameter named 'tenant' would hide the tenant= keyword")
        doc = inspect.getdoc(fn)
        for where, template in ((f"{name}.__doc__", doc), (f"{name} system", system)):
            unknown = [p for p in template_params(template, where) if p not in sig.parameters]
            if unknown:
                raise ConfigurationError(f"{where} uses {{{unknown[0]}}}, which is not a parameter of {name}")

        def prepare(tenant: Any, returned: Any, args: Mapping[str, Any]) -> Prepared:
            if isinstance(returned, str):
                user = returned
            elif returned is None and doc:
                user = _render(doc, args, f"{name}.__doc__")
            else:
                raise ConfigurationError(f"{name} must return its prompt as a str, or return None and have a docstring")
            return Prepared(
                spec=spec,
                system=None if system is None else _render(system, args, f"{name} system"),
                user=user,
                tenant=resolve(settings(), tenant),
                metadata="{}",
            )

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, tenant: Any = _UNSET, **kwargs: Any) -> AgentResult:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                returned = await fn(*bound.args, **bound.kwargs)
                await ready(tenant)
                return await prepare(tenant, returned, bound.arguments).arun(settings())

            wrapper: Any = run_async
        else:

            @functools.wraps(fn)
            def run(*args: Any, tenant: Any = _UNSET, **kwargs: Any) -> AgentResult:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                returned = fn(*bound.args, **bound.kwargs)
                return prepare(tenant, returned, bound.arguments).run(settings())

            wrapper = run
        wrapper.with_tenant = lambda tenant: functools.partial(wrapper, tenant=tenant)
        return wrapper

    return cast(_AgentDecorator, decorate)


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


@dataclasses.dataclass(frozen=True)
class ReportedUsage:
    """Token counts a guarded block reports. `input_tokens` includes the cached tokens and
    both kinds of cache writes; writes are billed at the model's cache-write prices."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    model: str | None = None
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0


def _int(obj: Any, name: str) -> int:
    """A token count from a response; the core checks its range."""
    v = _get(obj, name)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidResponseError(f"usage {name} must be a whole number of tokens, got {type(v).__name__}")
    return v


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _gemini_usage(response: Any) -> ReportedUsage | None:
    """google-genai's `usage_metadata` (or the REST JSON's `usageMetadata`): thoughts are
    output, tool-use prompt tokens are input."""
    key: Callable[[str], str] = str
    meta = _get(response, "usage_metadata")
    if meta is None:
        meta, key = _get(response, "usageMetadata"), _camel
    if meta is None:
        return None
    model = _get(response, key("model_version"))
    return ReportedUsage(
        _int(meta, key("prompt_token_count")) + _int(meta, key("tool_use_prompt_token_count")),
        _int(meta, key("candidates_token_count")) + _int(meta, key("thoughts_token_count")),
        _int(meta, key("cached_content_token_count")),
        model if isinstance(model, str) else None,
    )


def usage_of(response: Any) -> ReportedUsage | None:
    """Usage from an OpenAI (chat or responses), Anthropic or google-genai SDK response, or
    the equivalent dict; None when it carries no usage."""
    usage = _get(response, "usage")
    if usage is None:
        return _gemini_usage(response)
    model = _get(response, "model")
    model = model if isinstance(model, str) else None
    if _get(usage, "prompt_tokens") is not None:  # OpenAI chat completions (and DeepSeek)
        details = _get(usage, "prompt_tokens_details") or {}
        cached = _int(details, "cached_tokens")
        if _get(details, "cached_tokens") is None:
            cached = _int(usage, "prompt_cache_hit_tokens")  # DeepSeek's documented field
        return ReportedUsage(
            _int(usage, "prompt_tokens"), _int(usage, "completion_tokens"), cached, model,
            cache_write_tokens=_int(details, "cache_write_tokens"),
        )
    if _get(usage, "input_tokens") is None:
        return None
    inp, out = _int(usage, "input_tokens"), _int(usage, "output_tokens")
    if hasattr(usage, "cache_read_input_tokens") or (isinstance(usage, Mapping) and "cache_read_input_tokens" in usage):
        # Anthropic reports cache reads and writes apart from input_tokens; writes are split
        # by cache lifetime (5 minutes, 1 hour), which are priced apart.
        read, writes = _int(usage, "cache_read_input_tokens"), _int(usage, "cache_creation_input_tokens")
        w5, w1h = writes, 0
        split = _get(usage, "cache_creation")
        if split is not None:
            w5, w1h = _int(split, "ephemeral_5m_input_tokens"), _int(split, "ephemeral_1h_input_tokens")
        return ReportedUsage(inp + read + max(writes, w5 + w1h), out, read, model, w5, w1h)
    details = _get(usage, "input_tokens_details") or {}  # OpenAI responses API
    return ReportedUsage(inp, out, _int(details, "cached_tokens"), model, _int(details, "cache_write_tokens"))


# Seconds a guarded block keeps its reservation alive unless it says otherwise.
DEFAULT_GUARD_TIMEOUT = 600.0


class guarded:  # lower case: used as `with tl.guarded(...)`, like a function
    """Tenancy, breaker, budget and tracking around a block that calls an LLM itself.

        with tl.guarded(agent="Batch", model="gpt-4o", max_tokens=500) as g:
            resp = client.chat.completions.create(...)
            g.record_response(resp)        # or g.record(input_tokens=..., output_tokens=...)

    On entry the tenant is resolved, the breaker checked and `input_tokens` + `max_tokens` at
    the model's prices reserved (BudgetExceededError / CircuitOpenError before the body runs).
    The process keeps the reservation alive while the block runs, up to `timeout` seconds
    (1 to 86400, default 600); a block still running then loses it when its lease ends.
    An exception in the body is an error row and a breaker failure; a body that reports
    nothing is recorded with zero usage and a `UsageNotReported` warning. Calls made inside
    the block record it as their parent. Works with `async with` too.
    """

    def __init__(
        self,
        *,
        agent: str,
        model: str,
        max_tokens: int = 1024,
        input_tokens: int = 0,
        circuit_breaker: BreakerPolicy | None = None,
        tenant: Any = _UNSET,
        metadata: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_GUARD_TIMEOUT,
    ) -> None:
        if not isinstance(agent, str) or not agent:
            raise ConfigurationError("guarded(agent=...) must be a non-empty name")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 86400:
            raise ConfigurationError(f"{agent}: timeout must be a number of seconds from 1 to 86400, got {timeout!r}")
        if isinstance(input_tokens, bool) or not isinstance(input_tokens, int) or input_tokens < 0:
            raise ConfigurationError(f"{agent}: input_tokens must be a non-negative int")
        self._spec = build_spec(
            agent,
            model=model,
            temperature=None,
            max_tokens=max_tokens,
            timeout=float(timeout),
            retries=0,
            fallback_models=(),
            circuit_breaker=circuit_breaker,
        )
        self._input_tokens = input_tokens
        self._tenant = tenant
        self._metadata = metadata_json(f"{agent} metadata", metadata or {})
        self._usage: ReportedUsage | None = None
        self._handle: _core.Guard | None = None
        self.result: AgentResult | None = None

    @property
    def execution_id(self) -> str | None:
        return None if self._handle is None else self._handle.execution_id

    @property
    def budget_warnings(self) -> list[str]:
        return [] if self._handle is None else self._handle.budget_warnings

    @property
    def recorded(self) -> bool:
        return self._usage is not None

    def record(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        model: str | None = None,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
    ) -> None:
        """Report the block's usage (input includes cached tokens and cache writes); `model`
        if another answered. Cache writes: 5-minute (or OpenAI) and 1-hour (Anthropic)."""
        usage = ReportedUsage(
            input_tokens, output_tokens, cached_tokens, model, cache_write_tokens, cache_write_1h_tokens
        )
        for field in ("input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens"):
            v = getattr(usage, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigurationError(f"record(): {field} must be a non-negative int, got {v!r}")
        self._usage = usage

    def record_response(self, response: Any) -> bool:
        """Report usage read from an OpenAI, Anthropic or google-genai SDK response; False if
        it has none."""
        found = usage_of(response)
        if found is not None:
            self._usage = found
        return found is not None

    def _enter(self) -> guarded:
        s = settings()
        t = resolve(s, self._tenant)
        try:
            parent, root = lineage()
            call = _core.Call(
                self._spec, None, "", t.id, t.limits, None, self._metadata, parent, root, tenant_name=t.name
            )
            self._handle = s.engine.begin_guard(call, self._input_tokens)
        finally:
            deliver_alerts(s)
        own = self._handle.execution_id
        self._token = current_execution.set(Lineage(parent=own, root=root or parent or own))
        return self

    def _exit(self, exc: BaseException | None) -> None:
        current_execution.reset(self._token)
        assert self._handle is not None
        s = settings()
        try:
            if exc is None:
                usage = self._usage
                if usage is None:
                    warnings.warn(
                        f"{self._spec.name}: the guarded block reported no usage; recorded with zero tokens "
                        "(call g.record(...) or g.record_response(response))",
                        UsageNotReported,
                        stacklevel=3,
                    )
                    usage = ReportedUsage(0, 0)
                self.result = self._handle.succeed(**dataclasses.asdict(usage))
            elif isinstance(exc, Exception):
                self._handle.fail(type(exc).__name__, str(exc))
            else:  # KeyboardInterrupt, task cancellation: not the provider's failure
                self._handle.cancel()
        finally:
            deliver_alerts(s)

    def __enter__(self) -> guarded:
        return self._enter()

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._exit(exc)

    async def __aenter__(self) -> guarded:
        await ready(self._tenant)
        return self._enter()

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)


def guard(
    *,
    agent: str,
    model: str,
    max_tokens: int = 1024,
    input_tokens: int = 0,
    circuit_breaker: BreakerPolicy | None = None,
    metadata: Mapping[str, Any] | None = None,
    timeout: float = DEFAULT_GUARD_TIMEOUT,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """`guarded(...)` around every call of a function; usage is read from the SDK response it
    returns. The tenant comes from `tl.tenant(...)` or the resolver. Sync or async."""
    block = functools.partial(
        guarded,
        agent=agent,
        model=model,
        max_tokens=max_tokens,
        input_tokens=input_tokens,
        circuit_breaker=circuit_breaker,
        metadata=metadata,
        timeout=timeout,
    )
    block()  # validate the options now, not on the first call

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with block() as g:
                    result = await fn(*args, **kwargs)
                    g.record_response(result)
                    return result

            return cast(Callable[P, R], run_async)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with block() as g:
                result = fn(*args, **kwargs)
                g.record_response(result)
                return result

        return run

    return decorate
