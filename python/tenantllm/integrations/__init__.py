"""Set the current tenant for each web request, so agents called while handling it are
attributed to (and budgeted for) that tenant without passing `tenant=` everywhere.

- `tenantllm.integrations.fastapi`: `TenantMiddleware` (any ASGI app: FastAPI, Starlette) and
  `tenant_dependency(...)` for FastAPI's `Depends`;
- `tenantllm.integrations.django`: `TenantMiddleware` for Django's `MIDDLEWARE` setting.

Both set the same context as `with tenantllm.tenant(...)` for the duration of the request and
restore it afterwards, so nothing leaks into the next request served by the same worker.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__: list[str] = []


async def maybe_await(value: Any) -> Any:
    """`value`, awaited if it is awaitable (tenant callables may be sync or async)."""
    return await value if inspect.isawaitable(value) else value


def clean_header_value(value: str | None) -> str | None:
    """A header's tenant id, or None when it is missing or blank."""
    if value is None:
        return None
    value = value.strip()
    return value or None
