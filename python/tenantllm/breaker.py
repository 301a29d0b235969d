"""`CircuitBreaker`: inspect and reset the breakers agents keep per (agent, model, tenant)."""

from __future__ import annotations

from typing import Any

from tenantllm._core import ConfigurationError, InvalidTenantError
from tenantllm.config import engine

# The order a set of breakers reports: an agent refuses calls only when no model is closed.
_STATES = ("closed", "half_open", "open")


def _keys(agent: str | type, model: str | None, tenant_id: str | None) -> list[tuple[str, str, str | None]]:
    """The breakers meant: the named model's, else every model of the agent (an agent class's
    model and fallbacks; for an agent named by a string, the models whose breaker is not closed)."""
    if not isinstance(agent, str | type):
        raise ConfigurationError(f"agent must be an Agent class or an agent name, got {type(agent).__name__}")
    if model is not None and not isinstance(model, str):
        raise ConfigurationError(f"model must be a model name, got {type(model).__name__}")
    if tenant_id is not None and not isinstance(tenant_id, str):
        raise InvalidTenantError(f"tenant_id must be a non-empty string, got {type(tenant_id).__name__}")
    name = agent if isinstance(agent, str) else agent.__name__
    if not engine().multi_tenancy_enabled:
        tenant_id = None
    if model is not None:
        models = [model]
    elif isinstance(agent, str):
        refusing = engine().breakers_not_closed()
        models = [b["model"] for b in refusing if (b["agent"], b["tenant_id"]) == (name, tenant_id)]
    else:
        chain = (getattr(agent, "model", None), *getattr(agent, "fallback_models", ()))
        models = [m for m in chain if isinstance(m, str)]
    return [(name, m, tenant_id) for m in dict.fromkeys(models)]


class CircuitBreaker:
    @staticmethod
    def status(agent: str | type, tenant_id: str | None = None, model: str | None = None) -> dict[str, Any]:
        """{"state": "closed" | "open" | "half_open", "failures": n, "retry_at": datetime | None,
        "models": [one such dict per model], ...}. Without `model`, the state is the agent's:
        closed while any of its models is (calls still go through), and `retry_at` the earliest
        time a refused model lets a probe through."""
        keys = _keys(agent, model, tenant_id)
        models = [engine().breaker_status(*k) for k in keys]
        name = agent if isinstance(agent, str) else agent.__name__
        state = max((m["state"] for m in models), key=_STATES.index, default="closed")
        if any(m["state"] == "closed" for m in models):
            state = "closed"
        retry = [m["retry_at"] for m in models if m["retry_at"] is not None]
        return {
            "agent": name,
            "model": keys[0][1] if len(keys) == 1 else None,
            "tenant_id": keys[0][2] if keys else (tenant_id if engine().multi_tenancy_enabled else None),
            "state": state,
            "failures": sum(m["failures"] for m in models),
            "retry_at": min(retry) if retry and state != "closed" else None,
            "models": models,
        }

    @staticmethod
    def open_for(agent: str | type, tenant_id: str | None = None, model: str | None = None) -> bool:
        """True while calls for this key are being refused (open, or half-open with a probe out)."""
        return bool(CircuitBreaker.status(agent, tenant_id, model)["state"] != "closed")

    @staticmethod
    def reset(agent: str | type, tenant_id: str | None = None, model: str | None = None) -> None:
        """Closes the named model's breaker, or every model's of the agent."""
        for key in _keys(agent, model, tenant_id):
            engine().breaker_reset(*key)

    @staticmethod
    def not_closed() -> list[dict[str, Any]]:
        """Every breaker that is open or half-open."""
        return engine().breakers_not_closed()
