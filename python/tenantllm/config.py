"""`configure()`: one engine per configuration, plus the Python-side hooks (resolvers, alerts)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tenantllm import _core
from tenantllm._core import ConfigurationError
from tenantllm.otel import Telemetry

log = logging.getLogger("tenantllm")

TenantResolver = Callable[[], Any]
TenantConfigResolver = Callable[[str], Mapping[str, Any] | None]
AlertHandler = Callable[[dict[str, Any]], None]

# Options the Rust core owns; the rest are Python callables kept here.
_CORE_OPTIONS = frozenset(
    {"database", "timezone", "multi_tenancy_enabled", "budgets", "api_keys", "base_urls", "pricing", "mock",
     "store_prompts", "retention"}
)
_HOOK_OPTIONS = frozenset({"tenant_resolver", "tenant_config_resolver", "on_alert"})
# Plain options read by the Python layer.
_PY_OPTIONS = frozenset({"require_tenant", "opentelemetry"})


@dataclass(frozen=True)
class Settings:
    engine: _core.Engine
    tenant_resolver: TenantResolver | None = None
    tenant_config_resolver: TenantConfigResolver | None = None
    on_alert: AlertHandler | None = None
    require_tenant: bool = False
    # OpenTelemetry spans and metrics (`opentelemetry=`), None when off.
    telemetry: Telemetry | None = None
    # Tenants whose `@llm_tenant(limits=...)` budget this configuration has made sure of.
    budgets_ensured: set[str] = field(default_factory=set)
    budgets_lock: threading.Lock = field(default_factory=threading.Lock)


_lock = threading.Lock()
_settings: Settings | None = None
# The options named so far (since the last reset=True): a later configure() changes only
# the ones it names.
_options: dict[str, Any] = {}


def _callable_or_none(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{name} must be callable, got {type(value).__name__}")
    return value


def configure(*, reset: bool = False, **options: Any) -> None:
    """Configure tenantllm. A call changes only the options it names; the others (database,
    budgets, timezone, hooks, ...) keep the values earlier calls gave them. An option named
    with the value None goes back to its default; `reset=True` starts from the defaults.
    Each option is replaced as a whole (a new `budgets` dict replaces the old one). Everything
    is validated before anything is replaced: a call that fails changes nothing.

    Options: database (path, ":memory:", "sqlite:///path" or "postgresql://..."; default env
    TENANTLLM_DATABASE or "tenantllm.db"), timezone, multi_tenancy_enabled, tenant_resolver,
    tenant_config_resolver, budgets, api_keys, base_urls, pricing, mock, store_prompts,
    on_alert, require_tenant, opentelemetry, retention. Unknown names are an error.

    `opentelemetry=True` (or a dict of options, see `tenantllm.otel`): a span per call and
    GenAI metrics through the OpenTelemetry API (`pip install 'tenantllm[otel]'`).

    `retention={"details_days": 30, "executions_days": 400}` (whole days, 1 to 36500, each
    optional): executions lose their prompts, response, metadata and error messages after
    `details_days` and are deleted after `executions_days`, by a background thread in small
    batches (see `purge`). Counters, budgets and daily totals are unaffected.

    `require_tenant=True`: a call that resolves no tenant raises InvalidTenantError before
    anything is recorded (default False: such calls run with `tenant_id=None` and only the
    global and per-agent budgets apply).

    `timezone`: the database keeps its own, set when it is created (this option's value, or
    UTC). Naming another one raises ConfigurationError; leave it unset to use the database's,
    and change it with `set_timezone` (or `tenantllm timezone set`).
    """
    known = _CORE_OPTIONS | _HOOK_OPTIONS | _PY_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown configure() option {unknown[0]!r}; expected one of " + ", ".join(sorted(known))
        )
    require_tenant = options.get("require_tenant")
    if require_tenant is not None and not isinstance(require_tenant, bool):
        raise ConfigurationError(f"require_tenant must be True or False, got {type(require_tenant).__name__}")
    if not isinstance(reset, bool):
        raise ConfigurationError(f"reset must be True or False, got {type(reset).__name__}")
    global _settings, _options
    with _lock:
        merged = dict(options) if reset else {**_options, **options}
        hooks = {k: _callable_or_none(k, merged.get(k)) for k in _HOOK_OPTIONS}
        core = {k: v for k, v in merged.items() if k in _CORE_OPTIONS}
        if core.get("database") is None:
            core["database"] = os.environ.get("TENANTLLM_DATABASE", "tenantllm.db")
        otel = merged.get("opentelemetry")
        telemetry = None if otel is None or otel is False else Telemetry(otel)
        engine = _core.Engine(core)  # validates everything before anything is replaced
        _settings = Settings(
            engine=engine, require_tenant=bool(merged.get("require_tenant")), telemetry=telemetry, **hooks
        )
        _options = merged


def set_timezone(zone: str) -> int:
    """Change the timezone the configured database keeps its budget days and months in (an
    IANA name, e.g. "Europe/Berlin"), for every process using it, and rebuild its counters in
    that zone, in one transaction; returns how many counters were written. Processes already
    running follow at their next call; one started later that names another zone in
    `configure` gets ConfigurationError."""
    if not isinstance(zone, str):
        raise ConfigurationError(f"timezone must be a string (an IANA name), got {type(zone).__name__}")
    global _options
    written = engine().set_timezone(zone)
    with _lock:
        # This process now follows the database's zone, whatever it named before.
        _options = {k: v for k, v in _options.items() if k != "timezone"}
    return written


_init_lock = threading.Lock()


def settings() -> Settings:
    """The current settings, configuring defaults on first use."""
    if _settings is None:
        with _init_lock:
            if _settings is None:
                configure()
    assert _settings is not None
    return _settings


def engine() -> _core.Engine:
    return settings().engine


def deliver_alerts(s: Settings) -> None:
    """Hands alerts raised by the last calls to `on_alert`; a failing handler never breaks a call."""
    alerts = s.engine.drain_alerts()
    for alert in alerts:
        log.info("tenantllm alert: %s", {k: v for k, v in alert.items() if k != "current"})
        if s.on_alert is not None:
            try:
                s.on_alert(alert)
            except Exception:
                log.exception("on_alert handler raised")
