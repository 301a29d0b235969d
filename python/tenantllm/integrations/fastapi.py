"""FastAPI / Starlette: take the tenant from each request, and answer refused calls.

As middleware (every route; works for any ASGI app)::

    from tenantllm.integrations.fastapi import TenantMiddleware, install

    app = FastAPI()
    install(app)    # BudgetExceededError & co. become 429/503 JSON answers with Retry-After
    app.add_middleware(TenantMiddleware, tenant_from_request=lambda request: request.state.org_slug)
    # or, behind a gateway that authenticates users and sets the header:
    app.add_middleware(TenantMiddleware, header="X-Tenant-ID")

As a dependency (only the routes or routers that declare it)::

    from tenantllm.integrations.fastapi import tenant_dependency

    current_tenant = tenant_dependency(tenant_from_request=lambda request: request.user.org_id)

    @app.post("/ask")
    async def ask(q: str, tenant_id: str | None = Depends(current_tenant)):
        return (await SupportAgent.acall(query=q)).content     # attributed to tenant_id

`tenant_from_request(request)` may be sync or async and returns what `tenant=` accepts (an id,
a tenant dict or an `@llm_tenant` object) or None for no tenant. The middleware calls a sync
one when the request first calls an agent, so it sees what authentication middleware put in
`request.state` whatever the order the middleware were added in; an async one (and `header=`)
is read when the request starts, so add authentication middleware after `TenantMiddleware`
(Starlette runs the last added first). A header is only a safe source
when something in front of the app authenticates the user and sets it; clients can send any
header. Exactly one of `tenant_from_request` and `header` is required.

Sync routes work too: FastAPI runs them in a thread with a copy of the request's context.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tenantllm._core import ConfigurationError
from tenantllm.integrations import REFUSALS, clean_header_value, error_response, maybe_await
from tenantllm.tenancy import Deferred, _from_value, tenant

TenantFromRequest = Callable[[Any], Any | Awaitable[Any]]

__all__ = ["TenantMiddleware", "install", "tenant_dependency"]


async def _refused(request: Request, exc: Exception) -> Response:
    answer = error_response(exc)
    if answer is None:  # registered only for REFUSALS
        raise exc
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


def install(app: Starlette) -> None:
    """Answer calls refused by a budget, a rate limit or an open circuit breaker with 429 (the
    tenant's own limit) or 503 (a global or per-agent limit, a breaker), a JSON body
    `{"error", "message", "retry_after"}` and a `Retry-After` header, instead of a 500."""
    for cls in REFUSALS:
        app.add_exception_handler(cls, _refused)


def _source(tenant_from_request: TenantFromRequest | None, header: str | None, where: str) -> TenantFromRequest:
    if (tenant_from_request is None) == (header is None):
        raise ConfigurationError(f"{where}: give exactly one of tenant_from_request= and header=")
    if tenant_from_request is not None:
        if not callable(tenant_from_request):
            raise ConfigurationError(f"{where}: tenant_from_request must be callable")
        return tenant_from_request
    assert header is not None
    if not isinstance(header, str) or not header.strip():
        raise ConfigurationError(f"{where}: header must be a header name such as 'X-Tenant-ID'")
    name = header.strip()

    def from_header(conn: HTTPConnection) -> str | None:
        return clean_header_value(conn.headers.get(name))

    return from_header


def _tenant_id(value: Any) -> str | None:
    """The id of what the callable returned (validated the way `tenant=` is)."""
    return _from_value(value, "tenant_from_request").id


class TenantMiddleware:
    """ASGI middleware: runs each HTTP request and WebSocket session inside
    `tenantllm.tenant(tenant_from_request(connection))`. The tenant's id is also put in
    `request.state.tenantllm_tenant_id` once it is known (at the start with `header=` or an
    async function, at the first agent call with a sync function)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenant_from_request: TenantFromRequest | None = None,
        header: str | None = None,
    ) -> None:
        self.app = app
        self.tenant_from_request = _source(tenant_from_request, header, "TenantMiddleware")
        # A sync function is read lazily (see the module's docstring); a header needs no wait.
        self.lazy = tenant_from_request is not None and not _is_async(tenant_from_request)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = Request(scope, receive) if scope["type"] == "http" else HTTPConnection(scope, receive)
        source = self.tenant_from_request

        def read(value: Any) -> Any:
            conn.state.tenantllm_tenant_id = _tenant_id(value)
            return value

        def read_now() -> Any:
            value = source(conn)
            if inspect.isawaitable(value):
                raise ConfigurationError(
                    "TenantMiddleware: tenant_from_request returned an awaitable; make it `async def`"
                )
            return read(value)

        value = Deferred(read_now) if self.lazy else read(await maybe_await(source(conn)))
        with tenant(value):
            await self.app(scope, receive, send)


def _is_async(fn: Callable[..., Any]) -> bool:
    call = type(fn).__call__ if not inspect.isroutine(fn) else None  # a callable object's method
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))


def tenant_dependency(
    *, tenant_from_request: TenantFromRequest | None = None, header: str | None = None
) -> Callable[[Request], AsyncIterator[str | None]]:
    """A FastAPI dependency that sets the current tenant for the rest of the request and
    yields its id (None without one). Use it in `Depends(...)`, `APIRouter(dependencies=...)`
    or `FastAPI(dependencies=...)`."""
    source = _source(tenant_from_request, header, "tenant_dependency")

    async def current_tenant(request: Request) -> AsyncIterator[str | None]:
        value = await maybe_await(source(request))
        tenant_id = _tenant_id(value)
        with tenant(value):
            yield tenant_id

    return current_tenant
