"""Which tenant a call runs for: explicit `tenant=`, `with tenant(...)`, or the configured resolver."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from tenantllm import _core
from tenantllm._core import ConfigurationError, InvalidTenantError
from tenantllm.config import Settings

T = TypeVar("T")

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("tenantllm_tenant", default=None)

# Keys of a runtime tenant dict that are limits (the rest: id, api_keys).
LIMIT_KEYS = frozenset(_core.TENANT_LIMIT_KEYS)


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, and
# one is built for each call. Never changed once built.
@dataclass(slots=True)
class ResolvedTenant:
    id: str | None
    limits: dict[str, Any] | None = None
    # What the app calls the tenant, for the register of tenants seen.
    name: str | None = None
    api_keys: dict[str, str] | None = None
    # `@llm_tenant(limits=...)`: the budget to create if the tenant has none yet.
    budget_defaults: dict[str, Any] | None = None

    def __repr__(self) -> str:  # never show keys
        return f"ResolvedTenant(id={self.id!r}, name={self.name!r}, limits={self.limits!r})"


NO_TENANT = ResolvedTenant(id=None)


@contextmanager
def tenant(value: Any) -> Iterator[None]:
    """Run the block for `value` (an id, a tenant dict or an llm_tenant object)."""
    token = _current.set(value)
    try:
        yield
    finally:
        _current.reset(token)


def current_tenant_value() -> Any:
    return _current.get()


class Deferred:
    """A tenant worked out at its first use, then remembered: a web request's tenant, read
    when the first agent is called rather than when the request starts, so authentication
    that runs after the tenant middleware has had its turn.

    `acompute` is the same work made safe to await on an event loop (Django's `request.user`
    queries the database, which Django forbids on the loop): async entry points (`acall`,
    async agent functions, `async with guarded`) await it through `ready()` first, and a
    synchronous read on the loop thread before that is refused with a clear error."""

    def __init__(self, compute: Callable[[], Any], acompute: Callable[[], Awaitable[Any]] | None = None) -> None:
        self._compute = compute
        self._acompute = acompute
        self._lock = threading.Lock()  # calls from a sync view's threads
        self._done = False
        self._value: Any = None
        self._pending: asyncio.Future[Any] | None = None  # the one `acompute` in flight

    def get(self) -> Any:
        with self._lock:
            if not self._done:
                if self._acompute is not None and _on_event_loop():
                    raise ConfigurationError(
                        "this request's tenant must be read off the event loop (it may query the database): "
                        "in an async view, `await tenantllm.tenancy.ready()` before a synchronous agent "
                        "call or astream(); acall(), async agent functions and `async with guarded` do it"
                    )
                self._value = self._compute()
                self._done = True
            return self._value

    async def aget(self) -> Any:
        if self._acompute is None or self._done:
            return self.get()
        if self._pending is None:  # concurrent first calls of one request share one read
            self._pending = asyncio.ensure_future(self._acompute())
        value = await asyncio.shield(self._pending)
        with self._lock:
            if not self._done:
                self._value, self._done = value, True
            return self._value


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def ready(explicit: Any = None) -> None:
    """Reads the tenant a call will run for now if it is a request's deferred one (see
    `Deferred`): `explicit` (a call's `tenant=`), else the current one. A no-op otherwise."""
    value = _current.get() if explicit is None or explicit is _UNSET else explicit
    if isinstance(value, Deferred):
        await value.aget()


def _check_id(value: Any, source: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # integer primary keys
    if not isinstance(value, str) or not value.strip():
        raise InvalidTenantError(f"{source}: tenant id must be a non-empty string or an int, got {value!r}")
    return value


def _from_value(value: Any, source: str) -> ResolvedTenant:
    if isinstance(value, Deferred):
        value = value.get()
    if value is None:
        return NO_TENANT
    if isinstance(value, (str, int)):
        return ResolvedTenant(id=_check_id(value, source))
    if isinstance(value, Mapping):
        if "id" not in value:
            raise InvalidTenantError(f"{source}: a tenant dict needs an 'id' key")
        unknown = sorted(set(value) - LIMIT_KEYS - {"id", "api_keys"})
        if unknown:
            raise InvalidTenantError(
                f"{source}: unknown tenant key {unknown[0]!r}; expected id, api_keys or one of "
                + ", ".join(sorted(LIMIT_KEYS))
            )
        # "name" describes the tenant; only real limits replace the stored budget.
        limits = {k: v for k, v in value.items() if k in LIMIT_KEYS and k != "name"}
        if not isinstance(value.get("name", ""), str | None):
            raise InvalidTenantError(f"{source}: the tenant's name must be a string")
        keys = value.get("api_keys")
        if keys is not None and not isinstance(keys, Mapping):
            raise InvalidTenantError(f"{source}: api_keys must be a dict of provider name to key")
        return ResolvedTenant(
            id=_check_id(value["id"], source),
            limits=limits or None,
            name=value.get("name"),
            api_keys=dict(keys) if keys else None,
        )
    describe = getattr(type(value), "__tenantllm_describe__", None)
    if describe is not None:
        described = dict(describe(value))
        defaults = described.pop("budget_defaults", None)
        t = _from_value(described, f"{source} ({type(value).__name__})")
        return ResolvedTenant(id=t.id, limits=t.limits, name=t.name, api_keys=t.api_keys, budget_defaults=defaults)
    raise InvalidTenantError(
        f"{source}: expected a tenant id (str or int), a tenant dict or an @llm_tenant object, got "
        f"{type(value).__name__}; to pass {type(value).__name__} objects, decorate the class with "
        f"@tenantllm.llm_tenant(id=..., name=...) (or pass its id)"
    )


_UNSET: Any = object()


def resolve(s: Settings, explicit: Any = _UNSET) -> ResolvedTenant:
    """Resolve the tenant for one call. An explicit value wins, then `with tenant(...)`, then
    the resolver (only when multi-tenancy is enabled). Limits come from the runtime dict,
    else `tenant_config_resolver`, else the stored budget (looked up by the core)."""
    if explicit is not _UNSET:
        t = _from_value(explicit, "tenant=")
    elif _current.get() is not None:
        t = _from_value(_current.get(), "tenantllm.tenant()")
    elif s.tenant_resolver is not None and s.engine.multi_tenancy_enabled:
        t = _from_value(s.tenant_resolver(), "tenant_resolver")
    else:
        t = NO_TENANT
    if t.id is None and s.require_tenant:
        raise InvalidTenantError(
            "no tenant for this call, and configure(require_tenant=True) requires one: pass tenant=..., "
            "run it inside tenantllm.tenant(...), or set a tenant_resolver"
        )
    if t.id is not None and t.budget_defaults is not None:
        _ensure_budget(s, t.id, t.budget_defaults)
    if t.id is not None and t.limits is None and s.tenant_config_resolver is not None:
        limits = s.tenant_config_resolver(t.id)
        if limits is not None:
            if not isinstance(limits, Mapping):
                raise InvalidTenantError(
                    f"tenant_config_resolver must return a dict or None, got {type(limits).__name__}"
                )
            t = ResolvedTenant(id=t.id, limits=dict(limits), name=t.name, api_keys=t.api_keys)
    return t


def _ensure_budget(s: Settings, tenant_id: str, defaults: dict[str, Any]) -> None:
    """Creates the tenant's budget on its first call (once per configuration; another
    process creating it meanwhile is fine); an existing budget is left as it is."""
    if tenant_id in s.budgets_ensured:
        return
    from tenantllm.budget import TenantBudget  # budget imports config; tenancy is imported first

    with s.budgets_lock:
        if tenant_id not in s.budgets_ensured:
            TenantBudget.find_or_create(tenant_id, **defaults)
            s.budgets_ensured.add(tenant_id)


def _read(obj: Any, attr: str) -> Any:
    """An attribute, or the result of a zero-argument method, read at call time."""
    try:
        value = getattr(obj, attr)
    except AttributeError:
        raise ConfigurationError(f"llm_tenant: {type(obj).__name__} has no attribute {attr!r}") from None
    return value() if callable(value) else value


def llm_tenant(
    *,
    id: str = "id",
    name: str | None = None,
    api_keys: Mapping[str, str] | None = None,
    limits: Mapping[str, Any] | None = None,
    enforcement: str | None = None,
) -> Callable[[type[T]], type[T]]:
    """Make instances of any class (Django model, dataclass, plain class) usable as `tenant=`.

    `id` and `name` name attributes (an int id is used as its decimal string); `api_keys` maps
    a provider to an attribute or a zero-argument method that returns that tenant's key (blank
    values fall through). `limits` (TenantBudget fields such as `daily_limit`) and
    `enforcement` create the tenant's budget at its first call if it has none; a budget that
    exists (say, changed by an operator since) is left as it is."""
    if api_keys is not None and not isinstance(api_keys, Mapping):
        got = type(api_keys).__name__
        raise ConfigurationError(f"llm_tenant: api_keys must be a dict of provider to attribute, got {got}")
    if not isinstance(id, str):
        raise ConfigurationError(f"llm_tenant: id must name an attribute, got {type(id).__name__}")
    keys = dict(api_keys or {})
    for attr in (id, name, *keys.values()):
        if attr is not None and (not isinstance(attr, str) or not attr.isidentifier()):
            raise ConfigurationError(f"llm_tenant: {attr!r} is not an attribute name")
    if limits is not None and not isinstance(limits, Mapping):
        raise ConfigurationError(f"llm_tenant: limits must be a dict of TenantBudget fields, got {limits!r}")
    budget = dict(limits or {})
    unknown = sorted(set(budget) - LIMIT_KEYS)
    if unknown:
        raise ConfigurationError(
            f"llm_tenant: unknown limit {unknown[0]!r}; expected one of " + ", ".join(sorted(LIMIT_KEYS))
        )
    if enforcement is not None:
        budget["enforcement"] = enforcement

    def describe(obj: Any) -> dict[str, Any]:
        tenant_id = _read(obj, id)
        found = {p: _read(obj, a) for p, a in keys.items()}
        described = {
            "id": tenant_id,
            "api_keys": {p: k for p, k in found.items() if isinstance(k, str) and k.strip()},
            **({"name": _read(obj, name)} if name else {}),
        }
        if budget:
            described["budget_defaults"] = {**({"name": described["name"]} if name else {}), **budget}
        return described

    def decorate(cls: type[T]) -> type[T]:
        cls.__tenantllm_describe__ = staticmethod(describe)  # type: ignore[attr-defined]
        return cls

    return decorate
