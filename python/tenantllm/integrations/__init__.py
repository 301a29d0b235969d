"""Set the current tenant for each web request, so agents called while handling it are
attributed to (and budgeted for) that tenant without passing `tenant=` everywhere.

- `tenantllm.integrations.fastapi`: `TenantMiddleware` (any ASGI app: FastAPI, Starlette) and
  `tenant_dependency(...)` for FastAPI's `Depends`;
- `tenantllm.integrations.django`: `TenantMiddleware` for Django's `MIDDLEWARE` setting.

Both set the same context as `with tenantllm.tenant(...)` for the duration of the request and
restore it afterwards, so nothing leaks into the next request served by the same worker. Both
also turn a refused call into an HTTP answer (`error_response`): 429 when the tenant's own
budget or rate limit refused it (the customer can act: wait or upgrade), 503 when a global or
per-agent limit or an open circuit breaker did (the service's problem), each with a JSON body
and `Retry-After`.

- `tenantllm.integrations.celery`: tasks sent inside `with tenantllm.tenant(...)` run in it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tenantllm._core import BudgetExceededError, CircuitOpenError, RateLimitedError

__all__ = ["REFUSALS", "ErrorResponse", "error_response"]

# The errors `error_response` answers; any other exception is left to the framework.
REFUSALS: tuple[type[Exception], ...] = (BudgetExceededError, RateLimitedError, CircuitOpenError)


@dataclass(frozen=True)
class ErrorResponse:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def _retry_after(exc: Exception) -> int:
    """Whole seconds (at least 1) until the call could succeed, for `Retry-After`."""
    if isinstance(exc, CircuitOpenError):
        retry_at = exc.retry_at
        seconds = (retry_at - datetime.now(UTC)).total_seconds() if isinstance(retry_at, datetime) else 1.0
    else:
        seconds = float(getattr(exc, "retry_after", 1.0) or 0.0)
    return max(1, math.ceil(seconds))


def _tenant_refused(exc: Exception) -> bool:
    """Whether the tenant's own limit refused the call (429), not the service's (503)."""
    if isinstance(exc, BudgetExceededError):
        return bool(exc.tenant_budget)
    if isinstance(exc, RateLimitedError):
        return not str(getattr(exc, "scope", "")).startswith(("global", "agent"))
    return False


def error_response(exc: Exception) -> ErrorResponse | None:
    """The HTTP answer to a call refused before it reached the provider, or None for any other
    error. A 503's body names only the kind of refusal: the service's own spend and limits are
    not the customer's business."""
    if not isinstance(exc, REFUSALS):
        return None
    kind = {BudgetExceededError: "budget_exceeded", RateLimitedError: "rate_limited", CircuitOpenError: "circuit_open"}
    error = next(name for cls, name in kind.items() if isinstance(exc, cls))
    retry_after = _retry_after(exc)
    body: dict[str, Any] = {"error": error, "retry_after": retry_after}
    if _tenant_refused(exc):
        status = 429
        body.update(message=str(exc), scope=getattr(exc, "scope", None))
    else:
        status = 503
        body["message"] = "the service cannot run this request right now; retry later"
    return ErrorResponse(status=status, body=body, headers={"Retry-After": str(retry_after)})


async def maybe_await(value: Any) -> Any:
    """`value`, awaited if it is awaitable (tenant callables may be sync or async)."""
    return await value if inspect.isawaitable(value) else value


def clean_header_value(value: str | None) -> str | None:
    """A header's tenant id, or None when it is missing or blank."""
    if value is None:
        return None
    value = value.strip()
    return value or None
