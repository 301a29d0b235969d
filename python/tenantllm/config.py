"""`configure()`: one engine per configuration, plus the Python-side hooks (resolvers, alerts)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenantllm import _core
from tenantllm._core import ConfigurationError

log = logging.getLogger("tenantllm")

TenantResolver = Callable[[], Any]
TenantConfigResolver = Callable[[str], Mapping[str, Any] | None]
AlertHandler = Callable[[dict[str, Any]], None]

# Options the Rust core owns; the rest are Python callables kept here.
_CORE_OPTIONS = frozenset(
    {"database", "timezone", "multi_tenancy_enabled", "budgets", "api_keys", "base_urls", "pricing", "mock",
     "store_prompts"}
)
_HOOK_OPTIONS = frozenset({"tenant_resolver", "tenant_config_resolver", "on_alert"})


@dataclass(frozen=True)
class Settings:
    engine: _core.Engine
    tenant_resolver: TenantResolver | None = None
    tenant_config_resolver: TenantConfigResolver | None = None
    on_alert: AlertHandler | None = None


_lock = threading.Lock()
_settings: Settings | None = None


def _callable_or_none(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{name} must be callable, got {type(value).__name__}")
    return value


def configure(**options: Any) -> None:
    """Configure tenantllm. Each call replaces the previous configuration.

    Options: database (path, ":memory:" or "sqlite:///path"; default env TENANTLLM_DATABASE or
    "tenantllm.db"), timezone, multi_tenancy_enabled, tenant_resolver, tenant_config_resolver,
    budgets, api_keys, base_urls, pricing, mock, store_prompts, on_alert. Unknown names are an error.
    """
    unknown = sorted(set(options) - _CORE_OPTIONS - _HOOK_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown configure() option {unknown[0]!r}; expected one of "
            + ", ".join(sorted(_CORE_OPTIONS | _HOOK_OPTIONS))
        )
    hooks = {k: _callable_or_none(k, options.get(k)) for k in _HOOK_OPTIONS}
    core = {k: v for k, v in options.items() if k in _CORE_OPTIONS}
    core.setdefault("database", os.environ.get("TENANTLLM_DATABASE", "tenantllm.db"))
    engine = _core.Engine(core)  # validates everything before anything is replaced
    global _settings
    with _lock:
        _settings = Settings(engine=engine, **hooks)


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
