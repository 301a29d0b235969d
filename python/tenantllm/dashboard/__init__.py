"""A read-only web dashboard: spend, tokens and errors over time, spend by tenant, budget
utilisation, executions (filterable, paginated, with their details) and open circuit breakers.

Needs the optional extra: ``pip install 'tenantllm[dashboard]'`` (Starlette, Jinja2, uvicorn).

Mount it in your application::

    from fastapi import FastAPI
    import tenantllm as tl
    from tenantllm import dashboard

    tl.configure(database="tenantllm.db")
    app = FastAPI()
    app.mount("/agents", dashboard.app(auth=my_auth))

or serve it on its own: ``tenantllm dashboard --database tenantllm.db``.

Days and months are those of the database's timezone (see ``tenantllm.set_timezone``),
whichever way the dashboard is served.

Which database it reads:

- ``app()`` (no ``database``) reads whatever your application configured with
  ``tenantllm.configure(...)``, looked up on every request, so it follows reconfiguration;
- ``app(database="path.db")`` reads that database through an engine of its own and leaves your
  application's configuration alone;
- the ``tenantllm dashboard`` command calls ``tenantllm.configure(database=...)`` itself (its
  process has no other configuration) and then serves ``app()``.

Who sees what: ``auth(request)`` returns ``Viewer(all_tenants=True)``, ``Viewer(tenant_id="t")``
(that tenant only, whatever the URL asks for) or ``None`` (403); it may be async. Without
``auth`` every request sees every tenant, so only use that where nobody else can reach the app
(the command binds to 127.0.0.1 then). API keys are never shown.

Charts are inline SVG rendered on the server; pages load nothing else (no JavaScript, CDN,
fonts or external CSS), enforced with a Content-Security-Policy header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"tenantllm.dashboard needs the 'dashboard' extra ({e.name} is missing): pip install 'tenantllm[dashboard]'"
    ) from e

from tenantllm.dashboard.auth import Auth, Viewer, allow_all, deny_all, tenant_header

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["Auth", "Viewer", "allow_all", "app", "deny_all", "tenant_header"]


def app(
    database: str | None = None,
    auth: Auth | None = None,
    title: str = "tenantllm",
) -> Starlette:
    """The dashboard as an ASGI application (mount it anywhere, or serve it with uvicorn).

    `database`: read this database with an engine of the dashboard's own instead of the
    application's configuration (see the module docstring). `auth`: per-request access,
    `request -> Viewer | None`; default: everyone sees everything. `title`: shown in the header."""
    from tenantllm import _core
    from tenantllm.config import engine as configured_engine
    from tenantllm.dashboard import views

    if database is not None:
        own = _core.Engine({"database": database})

        def engine() -> _core.Engine:
            return own

    else:
        engine = configured_engine
    if auth is not None and not callable(auth):
        raise _core.ConfigurationError(f"dashboard.app(): auth must be callable, got {type(auth).__name__}")
    return views.build(engine, auth or allow_all, title)
