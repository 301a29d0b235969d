"""Django: configuration from settings, and a middleware that sets the current tenant for
each request and answers refused calls.

settings.py::

    INSTALLED_APPS = [..., "tenantllm.integrations.django"]
    TENANTLLM = {                      # the keywords of tenantllm.configure(), applied at startup
        "database": "tenantllm.db",
        "budgets": {"global_daily": 100},
    }
    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "tenantllm.integrations.django.TenantMiddleware",   # after authentication
    ]
    # optional: a callable (or its dotted path) request -> tenant id | tenant dict | @llm_tenant object | None
    TENANTLLM_TENANT_FROM_REQUEST = "myapp.tenancy.tenant_for_request"
    # optional, instead: trust a header set by an authenticating proxy
    TENANTLLM_TENANT_HEADER = "X-Tenant-ID"

Without either setting the tenant comes from the logged-in user: `request.user.tenant` (an
object or id), else `request.user.tenant_id`; anonymous users get no tenant. Every view then
runs inside `tenantllm.tenant(...)`, so `SupportAgent.call(...)` in a view is attributed to the
request's tenant; the context is restored when the response is returned. Sync and async views
(and ASGI or WSGI deployments) are supported. Under ASGI a sync tenant function (the default
one reads `request.user`, a database query) runs in Django's sync thread, not on the event loop,
when the request first calls an agent; an async view that only streams (`astream`) or calls
agents synchronously awaits `tenantllm.tenancy.ready()` first. A call a view makes that a budget, a rate limit
or an open breaker refuses becomes a 429 (the tenant's own limit) or 503 (a global or
per-agent limit, a breaker) JSON answer with `Retry-After` (see `tenantllm.integrations`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings  # type: ignore[import-untyped]
from django.http import JsonResponse  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from tenantllm._core import ConfigurationError
from tenantllm.integrations import clean_header_value, error_response
from tenantllm.tenancy import Deferred, tenant

__all__ = ["TenantMiddleware", "tenant_from_user"]

TenantFromRequest = Callable[[Any], Any]


def tenant_from_user(request: Any) -> Any:
    """The default: `request.user.tenant`, else `request.user.tenant_id`, for an
    authenticated user; None otherwise (or when no authentication middleware ran)."""
    user = getattr(request, "user", None)
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    for attr in ("tenant", "tenant_id"):
        value = getattr(user, attr, None)
        if value is not None:
            return value
    return None


def _configured_source() -> TenantFromRequest:
    source = getattr(settings, "TENANTLLM_TENANT_FROM_REQUEST", None)
    header = getattr(settings, "TENANTLLM_TENANT_HEADER", None)
    if source is not None and header is not None:
        raise ConfigurationError("set TENANTLLM_TENANT_FROM_REQUEST or TENANTLLM_TENANT_HEADER, not both")
    if isinstance(source, str):
        try:
            source = import_string(source)
        except ImportError as e:
            raise ConfigurationError(f"TENANTLLM_TENANT_FROM_REQUEST: cannot import {source!r}: {e}") from None
    if source is not None:
        if not callable(source):
            raise ConfigurationError("TENANTLLM_TENANT_FROM_REQUEST must be a callable or its dotted path")
        return source  # type: ignore[no-any-return]
    if header is not None:
        if not isinstance(header, str) or not header.strip():
            raise ConfigurationError("TENANTLLM_TENANT_HEADER must be a header name such as 'X-Tenant-ID'")
        name = header.strip()

        def from_header(request: Any) -> str | None:
            return clean_header_value(request.headers.get(name))

        return from_header
    return tenant_from_user


def _sync_only(source: TenantFromRequest, request: Any) -> Any:
    value = source(request)
    if isinstance(value, Awaitable):
        raise ConfigurationError("TENANTLLM_TENANT_FROM_REQUEST returned an awaitable; make it `async def`")
    return value


class TenantMiddleware:
    """Runs each request inside `tenantllm.tenant(<the request's tenant>)`."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.tenant_from_request = _configured_source()
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        with tenant(self.tenant_from_request(request)):
            return self.get_response(request)

    async def __acall__(self, request: Any) -> Any:
        source = self.tenant_from_request
        if iscoroutinefunction(source):
            value = await source(request)
        else:
            # A sync function may touch the ORM (`request.user`), which Django refuses on the
            # event loop: it runs in Django's sync thread, at the request's first agent call
            # (`Deferred`), so requests that call none never pay for it.
            value = Deferred(partial(_sync_only, source, request), sync_to_async(partial(_sync_only, source, request)))
        with tenant(value):
            return await self.get_response(request)

    def process_exception(self, request: Any, exception: Exception) -> Any:
        """Django's hook for an exception a view raised: refused calls become 429/503."""
        answer = error_response(exception)
        if answer is None:
            return None
        response = JsonResponse(answer.body, status=answer.status)
        for name, value in answer.headers.items():
            response[name] = value
        return response
