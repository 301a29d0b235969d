"""Who may see what: `auth(request) -> Viewer | None`, called on every request.

- `Viewer(all_tenants=True)` sees every tenant;
- `Viewer(tenant_id="acme")` sees only tenant "acme" (executions, budget, breakers): filters
  naming another tenant are ignored and another tenant's execution is a 404;
- `None` is refused with 403.

The callable may be async, and may raise `starlette.exceptions.HTTPException` (for example 401
with a `WWW-Authenticate` header) to ask for credentials.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.requests import Request


@dataclass(frozen=True)
class Viewer:
    """What one request may see: every tenant, or exactly one."""

    all_tenants: bool = False
    tenant_id: str | None = None

    def __post_init__(self) -> None:
        if self.all_tenants and self.tenant_id is not None:
            raise ValueError("Viewer: give all_tenants=True or a tenant_id, not both")
        if not self.all_tenants and (not isinstance(self.tenant_id, str) or not self.tenant_id.strip()):
            raise ValueError("Viewer: a viewer who does not see all tenants needs a non-empty tenant_id")

    @property
    def scope(self) -> str | None:
        """The one tenant this viewer is limited to, or None for all tenants."""
        return None if self.all_tenants else self.tenant_id


Auth = Callable[["Request"], "Viewer | Awaitable[Viewer | None] | None"]

EVERYTHING = Viewer(all_tenants=True)


def allow_all(request: Request) -> Viewer:
    """Every request sees every tenant. Only for a dashboard nobody else can reach (the CLI
    binds to 127.0.0.1 when no auth is configured) or one behind your own authentication."""
    return EVERYTHING


def deny_all(request: Request) -> None:
    """Every request is refused (403)."""
    return None


def tenant_header(name: str = "X-Tenant", *, admin_value: str | None = None) -> Auth:
    """Scope each request to the tenant named by header `name`; no header -> 403.

    With `admin_value`, a request whose header equals it sees every tenant. Only trust a
    header that a proxy in front of the dashboard sets after authenticating the user; a
    client that can reach the dashboard directly can send any header."""

    def auth(request: Request) -> Viewer | None:
        value = request.headers.get(name, "").strip()
        if not value:
            return None
        if admin_value is not None and value == admin_value:
            return EVERYTHING
        return Viewer(tenant_id=value)

    auth.__name__ = f"tenant_header({name!r})"
    return auth
