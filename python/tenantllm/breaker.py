"""`CircuitBreaker`: inspect and reset the breakers agents keep per (agent, model, tenant)."""

from __future__ import annotations

from typing import Any

from tenantllm.config import engine


def _key(agent: str | type, model: str | None, tenant_id: str | None) -> tuple[str, str, str | None]:
    name = agent if isinstance(agent, str) else agent.__name__
    if model is None:
        model = getattr(agent, "model", None)
        if not isinstance(model, str) or not model:
            raise TypeError("model= is required when agent is given by name")
    if not engine().multi_tenancy_enabled:
        tenant_id = None
    return name, model, tenant_id


class CircuitBreaker:
    @staticmethod
    def status(agent: str | type, tenant_id: str | None = None, model: str | None = None) -> dict[str, Any]:
        """{"state": "closed" | "open" | "half_open", "failures": n, "retry_at": datetime | None, ...}"""
        return engine().breaker_status(*_key(agent, model, tenant_id))

    @staticmethod
    def open_for(agent: str | type, tenant_id: str | None = None, model: str | None = None) -> bool:
        """True while calls for this key are being refused (open, or half-open with a probe out)."""
        return bool(CircuitBreaker.status(agent, tenant_id, model)["state"] != "closed")

    @staticmethod
    def reset(agent: str | type, tenant_id: str | None = None, model: str | None = None) -> None:
        engine().breaker_reset(*_key(agent, model, tenant_id))

    @staticmethod
    def not_closed() -> list[dict[str, Any]]:
        """Every breaker that is open or half-open."""
        return engine().breakers_not_closed()
