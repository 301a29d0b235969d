"""Refused calls in web apps: a FastAPI app served by a real uvicorn on 127.0.0.1 answers 429
(the tenant's own limit) or 503 (a global or per-agent limit, an open breaker) with a JSON body
and Retry-After, while another tenant's keep-alive requests keep succeeding; the tenant
function runs lazily so middleware order does not matter."""

from __future__ import annotations

import concurrent.futures
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
import tenantllm as tl
from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response
from tenantllm.integrations import error_response
from tenantllm.integrations.fastapi import TenantMiddleware, install
from uvicorn_server import Server


class Support(tl.Agent):
    model = "mock/support"
    user = "Question: {query}"
    max_tokens = 50


class Reports(tl.Agent):
    model = "mock/reports"
    user = "{query}"
    max_tokens = 50


class Flaky(tl.Agent):
    model = "mock/flaky"
    user = "{query}"
    max_tokens = 50
    retries = 0
    circuit_breaker = tl.BreakerPolicy(errors=1, within=60, cooldown=120)


AGENTS = {"support": Support, "reports": Reports, "flaky": Flaky}


def app_with_refusals() -> FastAPI:
    app = FastAPI()
    install(app)
    app.add_middleware(TenantMiddleware, header="X-Tenant-ID")

    @app.get("/sync/{agent}")
    def sync_view(agent: str) -> dict[str, Any]:  # runs in a worker thread
        return {"tenant": AGENTS[agent].call(query="hi").tenant_id}

    @app.get("/async/{agent}")
    async def async_view(agent: str) -> dict[str, Any]:
        return {"tenant": (await AGENTS[agent].acall(query="hi")).tenant_id}

    return app


def test_a_tenant_over_its_budget_gets_429_and_the_other_tenant_is_served(configure: Any) -> None:
    configure(mock={"latency_ms": 1})
    for poor in ("poor", "poor2"):
        tl.TenantBudget.create(poor, daily_limit="0.000000001")
    started = datetime.now(UTC)
    with Server(app_with_refusals()) as server:

        def requests(tenant: str) -> list[httpx.Response]:
            # One keep-alive connection per tenant, alternating sync and async routes.
            with httpx.Client(base_url=server.url, headers={"X-Tenant-ID": tenant}, timeout=30) as client:
                return [client.get(f"/{'sync' if i % 2 else 'async'}/support") for i in range(40)]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = {t: pool.submit(requests, t) for t in ("poor", "rich", "poor2", "rich2")}
            answers = {t: f.result() for t, f in futures.items()}

    assert [r.status_code for r in answers["rich"] + answers["rich2"]] == [200] * 80
    assert all(r.json()["tenant"] in ("rich", "rich2") for r in answers["rich"] + answers["rich2"])
    assert [r.status_code for r in answers["poor"] + answers["poor2"]] == [429] * 80
    refused = answers["poor"][0]
    body = refused.json()
    assert body["error"] == "budget_exceeded" and body["scope"] == "tenant_daily"
    # The day ends at the next UTC midnight: Retry-After counts the seconds until then.
    midnight = started.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() + 86400
    wait = int(refused.headers["Retry-After"])
    assert wait == body["retry_after"]
    assert midnight - datetime.now(UTC).timestamp() <= wait <= midnight - started.timestamp() + 1
    message = body["message"]
    assert "for tenant poor" in message
    assert message.index("spent $") < message.index("reserved in flight $") < message.index("this call needs up to $")
    assert tl.Execution.by_tenant("poor").by_status("blocked").count() == 40


def test_a_global_or_agent_limit_and_an_open_breaker_are_503(configure: Any) -> None:
    configure(mock={"latency_ms": 0}, budgets={"per_agent_daily": {"Reports": "0.000000001"}})
    with Server(app_with_refusals()) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for route in ("/sync/reports", "/async/reports"):
            r = client.get(route, headers={"X-Tenant-ID": "acme"})
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            body = r.json()
            # The service's own limits are not shown to its customers.
            assert body["error"] == "budget_exceeded" and "$" not in body["message"] and "scope" not in body
        assert client.get("/sync/support", headers={"X-Tenant-ID": "acme"}).status_code == 200

        configure(mock={"latency_ms": 0, "failure_rate": 1.0})
        with pytest.raises(tl.ProviderError):
            Flaky.call(query="x", tenant="acme")  # opens acme's breaker for Flaky
        r = client.get("/async/flaky", headers={"X-Tenant-ID": "acme"})
        assert r.status_code == 503 and r.json()["error"] == "circuit_open"
        assert 100 <= int(r.headers["Retry-After"]) <= 120


def test_error_fields() -> None:
    tl.TenantBudget.create("t", daily_limit="0.000000001", monthly_limit=1000)
    with pytest.raises(tl.BudgetExceededError) as caught:
        Support.call(query="hi", tenant="t")
    e = caught.value
    assert e.tenant_budget and e.scope == "tenant_daily" and e.limit == Decimal("0.000000001")
    assert e.resets_at.tzinfo is not None and e.resets_at > datetime.now(UTC)
    assert 0 < e.retry_after <= 86400
    assert (e.resets_at - datetime.now(UTC)).total_seconds() == pytest.approx(e.retry_after, abs=2)


def test_rate_limited_maps_by_scope() -> None:
    def refused(scope: str) -> tl.RateLimitedError:
        e = tl.RateLimitedError(f"{scope} limit reached")
        e.scope, e.limit, e.retry_after = scope, 60, 0.2
        return e

    own = error_response(refused("tenant_rpm"))
    assert own is not None and own.status == 429 and own.headers == {"Retry-After": "1"}
    assert own.body["error"] == "rate_limited"
    service = error_response(refused("global_tpm"))
    assert service is not None and service.status == 503
    assert error_response(ValueError("x")) is None
    assert error_response(tl.ProviderError("x")) is None


def test_tenant_function_runs_after_authentication_whatever_the_order(configure: Any) -> None:
    configure(mock={"latency_ms": 0})

    async def authenticate(request: Request, call_next: RequestResponseEndpoint) -> Response:
        request.state.org = request.headers.get("X-Org")
        return await call_next(request)

    app = FastAPI()
    # Authentication added first runs inside TenantMiddleware (Starlette runs the last added first).
    app.add_middleware(BaseHTTPMiddleware, dispatch=authenticate)
    app.add_middleware(TenantMiddleware, tenant_from_request=lambda request: request.state.org)

    @app.get("/sync")
    def sync_view(request: Request) -> dict[str, Any]:
        return {"tenant": Support.call(query="hi").tenant_id, "state": request.state.tenantllm_tenant_id}

    @app.get("/async")
    async def async_view() -> dict[str, Any]:
        return {"tenant": (await Support.acall(query="hi")).tenant_id}

    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/sync", headers={"X-Org": "acme"}).json() == {"tenant": "acme", "state": "acme"}
        assert client.get("/async", headers={"X-Org": "globex"}).json() == {"tenant": "globex"}
        assert client.get("/async").json() == {"tenant": None}
