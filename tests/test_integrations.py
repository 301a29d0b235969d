"""FastAPI and Django integrations, with the real frameworks: the request's tenant is the
current tenant while a view runs (sync and async), and never leaks into the next request."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import django
import httpx
import pytest
import tenantllm as tl
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from tenantllm.integrations.django import TenantMiddleware as DjangoTenantMiddleware
from tenantllm.integrations.fastapi import TenantMiddleware, tenant_dependency
from tenantllm.tenancy import current_tenant_value


class Support(tl.Agent):
    model = "mock/support"
    user = "Question: {query}"
    max_tokens = 50


@pytest.fixture(autouse=True)
def _fast_mock(configure: Any) -> None:
    configure(mock={"latency_ms": 0})


def tenant_of(execution_id: str) -> str | None:
    return tl.Execution.get(execution_id).tenant_id


@tl.llm_tenant(id="slug", name="title")
@dataclass
class Org:
    slug: str
    title: str


# ------------------------------------------------------------------ FastAPI


def fastapi_app(**middleware: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenantMiddleware, **middleware)

    @app.get("/sync")
    def sync_view(q: str = "hi") -> dict[str, Any]:  # runs in a worker thread
        r = Support.call(query=q)
        return {"tenant": r.tenant_id, "execution": r.execution_id}

    @app.get("/async")
    async def async_view(request: Request, q: str = "hi", wait: float = 0) -> dict[str, Any]:
        await asyncio.sleep(wait)  # let other requests interleave
        r = await Support.acall(query=q)
        return {"tenant": r.tenant_id, "execution": r.execution_id, "state": request.state.tenantllm_tenant_id}

    return app


def test_fastapi_middleware_from_header_sync_and_async_views() -> None:
    with TestClient(fastapi_app(header="X-Tenant-ID")) as c:
        for route in ("/sync", "/async"):
            body = c.get(route, headers={"X-Tenant-ID": "acme"}).json()
            assert body["tenant"] == "acme" and tenant_of(body["execution"]) == "acme"
            # The next request, without the header, has no tenant: nothing leaked.
            body = c.get(route).json()
            assert body["tenant"] is None and tenant_of(body["execution"]) is None
            assert c.get(route, headers={"X-Tenant-ID": "   "}).json()["tenant"] is None
        assert c.get("/async", headers={"X-Tenant-ID": "globex"}).json()["state"] == "globex"
    assert current_tenant_value() is None
    assert tl.Execution.by_tenant("acme").count() == 2


async def test_fastapi_concurrent_async_requests_keep_their_own_tenant() -> None:
    app = fastapi_app(header="X-Tenant-ID")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        tenants = [f"t{i % 5}" for i in range(30)]
        # Later-started requests finish first, so contexts are interleaved.
        responses = await asyncio.gather(
            *[
                c.get("/async", params={"wait": (30 - i) / 1000}, headers={"X-Tenant-ID": t})
                for i, t in enumerate(tenants)
            ]
        )
    for t, r in zip(tenants, responses, strict=True):
        body = r.json()
        assert body["tenant"] == t and tenant_of(body["execution"]) == t
    assert current_tenant_value() is None


def test_fastapi_middleware_with_a_callable_returning_tenant_objects() -> None:
    orgs = {"k1": Org("acme", "Acme Corp"), "k2": Org("globex", "Globex")}

    async def from_api_key(request: Request) -> Org | None:  # async callables work too
        return orgs.get(request.headers.get("authorization", "").removeprefix("Bearer "))

    with TestClient(fastapi_app(tenant_from_request=from_api_key)) as c:
        assert c.get("/sync", headers={"Authorization": "Bearer k2"}).json()["tenant"] == "globex"
        assert c.get("/async", headers={"Authorization": "Bearer k1"}).json()["state"] == "acme"
        assert c.get("/sync", headers={"Authorization": "Bearer nope"}).json()["tenant"] is None


def test_fastapi_dependency() -> None:
    app = FastAPI()
    current_tenant = tenant_dependency(tenant_from_request=lambda request: request.query_params.get("org"))

    @app.get("/ask")
    async def ask(tenant_id: str | None = Depends(current_tenant)) -> dict[str, Any]:
        r = await Support.acall(query="hi")
        return {"dep": tenant_id, "tenant": r.tenant_id}

    @app.get("/ask-sync", dependencies=[Depends(current_tenant)])
    def ask_sync() -> dict[str, Any]:
        return {"tenant": Support.call(query="hi").tenant_id, "current": current_tenant_value()}

    @app.get("/plain")
    def plain() -> dict[str, Any]:
        return {"tenant": Support.call(query="hi").tenant_id}

    with TestClient(app) as c:
        assert c.get("/ask?org=acme").json() == {"dep": "acme", "tenant": "acme"}
        assert c.get("/ask-sync?org=globex").json() == {"tenant": "globex", "current": "globex"}
        assert c.get("/ask").json() == {"dep": None, "tenant": None}
        assert c.get("/plain?org=acme").json() == {"tenant": None}  # no dependency, no tenant
    assert current_tenant_value() is None


def test_fastapi_dependency_from_header() -> None:
    app = FastAPI(dependencies=[Depends(tenant_dependency(header="X-Org"))])

    @app.get("/")
    async def index() -> dict[str, Any]:
        return {"tenant": (await Support.acall(query="hi")).tenant_id}

    with TestClient(app) as c:
        assert c.get("/", headers={"X-Org": "initech"}).json() == {"tenant": "initech"}
        assert c.get("/").json() == {"tenant": None}


def test_fastapi_configuration_errors() -> None:
    with pytest.raises(tl.ConfigurationError, match="exactly one"):
        TenantMiddleware(FastAPI())
    with pytest.raises(tl.ConfigurationError, match="exactly one"):
        tenant_dependency(header="X-Tenant", tenant_from_request=lambda r: None)
    with pytest.raises(tl.ConfigurationError, match="header"):
        tenant_dependency(header=" ")
    with pytest.raises(tl.ConfigurationError, match="callable"):
        TenantMiddleware(FastAPI(), tenant_from_request="acme")  # type: ignore[arg-type]


# ------------------------------------------------------------------ Django


def _configure_django() -> None:
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="tests-only",
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=[],
            MIDDLEWARE=[f"{__name__}.FakeAuthenticationMiddleware", "tenantllm.integrations.django.TenantMiddleware"],
            DATABASES={},
        )
        django.setup()


@dataclass
class FakeUser:
    """What django.contrib.auth's request.user looks like to the default resolver."""

    is_authenticated: bool
    tenant: Any = None


class FakeAuthenticationMiddleware:
    """Stands in for AuthenticationMiddleware: the `X-User` header names a user of a tenant."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        user = request.headers.get("X-User")
        request.user = FakeUser(True, Org(user, user.title())) if user else FakeUser(False)  # type: ignore[attr-defined]
        return self.get_response(request)


def sync_view(request: HttpRequest) -> JsonResponse:
    r = Support.call(query="hi")
    return JsonResponse({"tenant": r.tenant_id, "execution": r.execution_id})


async def async_view(request: HttpRequest) -> JsonResponse:
    await asyncio.sleep(float(request.GET.get("wait", "0")))
    r = await Support.acall(query="hi")
    return JsonResponse({"tenant": r.tenant_id, "execution": r.execution_id})


def tenant_from_query(request: HttpRequest) -> str | None:
    return request.GET.get("org")


urlpatterns = [path("sync", sync_view), path("async", async_view)]


@pytest.fixture
def django_ready() -> Iterator[None]:
    _configure_django()
    yield
    assert current_tenant_value() is None


def test_django_default_tenant_is_the_users(django_ready: None) -> None:
    c = Client()
    body = c.get("/sync", headers={"X-User": "acme"}).json()
    assert body["tenant"] == "acme" and tenant_of(body["execution"]) == "acme"
    body = c.get("/sync").json()  # anonymous: no tenant, nothing left over from the last request
    assert body["tenant"] is None and tenant_of(body["execution"]) is None
    assert c.get("/async", headers={"X-User": "globex"}).json()["tenant"] == "globex"


def test_django_tenant_from_a_setting_callable(django_ready: None) -> None:
    with override_settings(TENANTLLM_TENANT_FROM_REQUEST=f"{__name__}.tenant_from_query"):
        c = Client()
        assert c.get("/sync?org=initech").json()["tenant"] == "initech"
        assert c.get("/sync", headers={"X-User": "acme"}).json()["tenant"] is None
    with override_settings(TENANTLLM_TENANT_FROM_REQUEST=lambda request: {"id": "dict-tenant"}):
        assert Client().get("/sync").json()["tenant"] == "dict-tenant"


def test_django_tenant_from_a_header_setting(django_ready: None) -> None:
    with override_settings(TENANTLLM_TENANT_HEADER="X-Tenant-ID"):
        c = Client()
        assert c.get("/sync", headers={"X-Tenant-ID": "acme"}).json()["tenant"] == "acme"
        assert c.get("/sync").json()["tenant"] is None


def test_django_configuration_errors(django_ready: None) -> None:
    with override_settings(TENANTLLM_TENANT_FROM_REQUEST="no_such_module.fn"), pytest.raises(tl.ConfigurationError):
        DjangoTenantMiddleware(lambda r: None)
    with (
        override_settings(TENANTLLM_TENANT_FROM_REQUEST=f"{__name__}.tenant_from_query", TENANTLLM_TENANT_HEADER="X"),
        pytest.raises(tl.ConfigurationError, match="not both"),
    ):
        DjangoTenantMiddleware(lambda r: None)


async def test_django_async_client_concurrent_requests(django_ready: None) -> None:
    c = AsyncClient()
    tenants = [f"org{i % 4}" for i in range(12)]
    responses = await asyncio.gather(
        *[c.get(f"/async?wait={(12 - i) / 1000}", headers={"X-User": t}) for i, t in enumerate(tenants)]
    )
    for t, r in zip(tenants, responses, strict=True):
        body = r.json()
        assert body["tenant"] == t and tenant_of(body["execution"]) == t
    # A sync view served by the async handler (Django runs it in a thread with the context).
    body = (await c.get("/sync", headers={"X-User": "acme"})).json()
    assert body["tenant"] == "acme"
    assert (await c.get("/sync")).json()["tenant"] is None


def test_django_answers_refused_calls_with_429_or_503(django_ready: None, configure: Any) -> None:
    configure(mock={"latency_ms": 0}, budgets={"per_agent_daily": {"Support": 1000}})
    tl.TenantBudget.create("poor", daily_limit="0.000000001")
    c = Client()
    for route in ("/sync", "/async"):
        r = c.get(route, headers={"X-User": "poor"})
        assert r.status_code == 429 and int(r["Retry-After"]) >= 1
        body = r.json()
        assert body["error"] == "budget_exceeded" and body["scope"] == "tenant_daily" and "poor" in body["message"]
        assert c.get(route, headers={"X-User": "rich"}).status_code == 200
    configure(mock={"latency_ms": 0}, budgets={"per_agent_daily": {"Support": "0.000000001"}})
    r = c.get("/sync", headers={"X-User": "rich"})
    assert r.status_code == 503 and r.json()["error"] == "budget_exceeded" and int(r["Retry-After"]) >= 1


@dataclass
class PlainOrg:  # not decorated with @tl.llm_tenant
    pk: int


def test_int_tenant_ids_and_undecorated_objects() -> None:
    assert Support.call(query="hi", tenant=42).tenant_id == "42"
    with tl.tenant(7):
        assert Support.call(query="hi").tenant_id == "7"
    with pytest.raises(tl.InvalidTenantError, match=r"got PlainOrg; .*@tenantllm.llm_tenant"):
        Support.call(query="hi", tenant=PlainOrg(1))
    with pytest.raises(tl.InvalidTenantError, match="got True"):
        Support.call(query="hi", tenant=True)
    assert tl.Execution.by_tenant("42").count() == 1 and tl.Execution.by_tenant("7").count() == 1


DJANGO_PROJECT = """
import django, os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "proj_settings"
django.setup()
import tenantllm as tl

class Support(tl.Agent):
    model = "mock/support"
    user = "{query}"

try:
    print(Support.call(query="hi").tenant_id)
except tl.TenantLLMError as e:
    print(type(e).__name__, e)
"""

SETTINGS = """
SECRET_KEY = "tests-only"
INSTALLED_APPS = ["tenantllm.integrations.django"]
TENANTLLM = {TENANTLLM}

def resolver():
    return "from-settings"
"""


def _django_project(tmp_path: Path, tenantllm: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "proj_settings.py").write_text(SETTINGS.replace("{TENANTLLM}", tenantllm))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", DJANGO_PROJECT], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )


def test_django_settings_configure_tenantllm(tmp_path: Path, configure: Any) -> None:
    db = tmp_path / "django.db"
    done = _django_project(
        tmp_path,
        repr(
            {
                "database": str(db),
                "multi_tenancy_enabled": True,
                "tenant_resolver": "proj_settings.resolver",
                "mock": {"latency_ms": 0},
            }
        ),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "from-settings"
    configure(database=str(db))
    assert tl.Execution.by_tenant("from-settings").count() == 1

    done = _django_project(tmp_path, repr({"database": str(db), "budget": {}}))
    assert done.returncode != 0 and "settings.TENANTLLM: unknown configure() option 'budget'" in done.stderr
    done = _django_project(tmp_path, repr({"tenant_resolver": "proj_settings.missing"}))
    assert done.returncode != 0 and "settings.TENANTLLM['tenant_resolver']: cannot import" in done.stderr


# A Django project on a real database (SQLite) with django.contrib.auth: the tenant function
# reads `request.user`, which loads the session and the user from the database; Django
# forbids that on the event loop (SynchronousOnlyOperation).
ASYNC_SETTINGS = """
SECRET_KEY = "tests-only"
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "async_views"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions",
                  "tenantllm.integrations.django"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "app.db"}}
MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware",
              "django.contrib.auth.middleware.AuthenticationMiddleware",
              "tenantllm.integrations.django.TenantMiddleware"]
TENANTLLM = {"database": DATABASE, "mock": {"latency_ms": 0}}
TENANTLLM_TENANT_FROM_REQUEST = "async_views.tenant_for"
"""

ASYNC_VIEWS = """
import threading
from django.http import JsonResponse
from django.urls import path
import tenantllm as tl

reads = []

def tenant_for(request):
    reads.append(threading.current_thread().name)
    user = request.user  # the session and the user, from the database
    return {"id": user.username, "name": user.get_full_name()} if user.is_authenticated else None

class Support(tl.Agent):
    model = "mock/support"
    user = "{q}"

async def ask(request):
    r = await Support.acall(q="hi")
    again = await Support.acall(q="again")  # the tenant is read once per request
    return JsonResponse({"tenant": r.tenant_id, "again": again.tenant_id})

@tl.agent(model="mock/support")
async def summarize(text: str) -> str:
    return text

async def function(request):
    return JsonResponse({"tenant": (await summarize("x")).tenant_id})

async def guarded(request):
    async with tl.guarded(agent="Raw", model="mock/support") as g:
        g.record(input_tokens=3, output_tokens=2)
        tenant = tl.Execution.get(g.execution_id).tenant_id
    return JsonResponse({"tenant": tenant})

async def stream(request):
    await tl.tenancy.ready()
    s = Support.astream(q="hi")
    _ = [c async for c in s]
    return JsonResponse({"tenant": s.result.tenant_id})

async def sync_call_on_the_loop(request):
    try:
        Support.call(q="hi")
    except tl.ConfigurationError as e:
        return JsonResponse({"error": str(e)})
    return JsonResponse({"error": None})

async def no_agent(request):
    return JsonResponse({"ok": True})

def sync_view(request):
    return JsonResponse({"tenant": Support.call(q="hi").tenant_id})

urlpatterns = [path("ask", ask), path("function", function), path("guarded", guarded), path("stream", stream),
               path("sync-call", sync_call_on_the_loop), path("none", no_agent), path("sync", sync_view)]
"""

ASYNC_MAIN = """
import asyncio, json, os
os.environ["DJANGO_SETTINGS_MODULE"] = "async_settings"
import django
django.setup()
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import AsyncClient
import async_views

call_command("migrate", verbosity=0)
User.objects.create_user("acme", password="pw", first_name="Acme", last_name="Inc")

async def main():
    out = {}
    c = AsyncClient()
    await c.aforce_login(await User.objects.aget(username="acme"))
    for route in ("ask", "function", "guarded", "stream", "sync-call", "sync", "none"):
        async_views.reads.clear()
        r = await c.get("/" + route)
        out[route] = {"status": r.status_code, "body": r.json(), "reads": len(async_views.reads)}
    r = await AsyncClient().get("/ask")
    out["anonymous"] = {"status": r.status_code, "body": r.json()}
    print(json.dumps(out))

asyncio.run(main())
"""


def test_django_async_views_read_the_tenant_off_the_event_loop(tmp_path: Path, configure: Any, db_path: Path) -> None:
    (tmp_path / "async_settings.py").write_text(f"DATABASE = {str(db_path)!r}\n" + ASYNC_SETTINGS)
    (tmp_path / "async_views.py").write_text(ASYNC_VIEWS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", ASYNC_MAIN], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for route in ("ask", "function", "guarded", "stream", "sync"):
        assert out[route]["status"] == 200 and out[route]["body"]["tenant"] == "acme", (route, out[route])
        assert out[route]["reads"] == 1, (route, out[route])
    assert out["ask"]["body"]["again"] == "acme"
    # A synchronous call on the loop before the tenant was read is told what to do instead.
    assert "await tenantllm.tenancy.ready()" in out["sync-call"]["body"]["error"]
    # A request that calls no agent never reads the tenant.
    assert out["none"] == {"status": 200, "body": {"ok": True}, "reads": 0}
    assert out["anonymous"] == {"status": 200, "body": {"tenant": None, "again": None}}
    configure(database=str(db_path))
    assert [(t.id, t.name) for t in tl.tenants()] == [("acme", "Acme Inc")]
