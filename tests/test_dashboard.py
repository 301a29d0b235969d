"""The dashboard over ASGI (Starlette's TestClient): every page, filters, pagination, access
control, no API keys anywhere, 404s, mounting in FastAPI, and the SVG charts."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import tenantllm as tl
from dashboard_data import KEYS, Sample, SupportAgent, populate
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.testclient import TestClient
from tenantllm import dashboard
from tenantllm.dashboard import Viewer, charts
from tenantllm.dashboard.views import usd

PAGES = ["/", "/?period=7d", "/?period=30d", "/?period=month", "/?period=all", "/tenants", "/executions", "/breakers"]


@pytest.fixture
def sample(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sample:
    return populate(db_path, monkeypatch)


@pytest.fixture
def client(sample: Sample) -> Iterator[TestClient]:
    with TestClient(dashboard.app()) as c:
        yield c


def scoped_client(header: str = "X-Tenant", **kw: str) -> TestClient:
    return TestClient(dashboard.app(auth=dashboard.tenant_header(header, **kw)))


def rows(html: str, kind: str = "execution") -> list[str]:
    """The data-tenant attribute of each table row of a kind (execution, tenant, breaker)."""
    return re.findall(rf'<tr class="{kind}" data-tenant="([^"]*)"', html)


def total(html: str) -> int:
    m = re.search(r'<p class="muted" id="total">([\d,]+) execution', html)
    assert m, "no total on the page"
    return int(m.group(1).replace(",", ""))


def stat(html: str, name: str) -> str:
    m = re.search(rf'id="stat-{name}">.*?<div class="value">([^<]*)</div>', html, re.S)
    assert m, f"no {name} stat"
    return m.group(1)


def detail_links(html: str) -> list[str]:
    return re.findall(r'href="(/executions/[0-9a-f-]+)"', html)


# ------------------------------------------------------------------ packaging


def test_importing_tenantllm_does_not_import_starlette_or_jinja2() -> None:
    code = "import sys, tenantllm; print(sorted(m for m in ('starlette', 'jinja2', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ pages


def test_every_page_renders_self_contained(client: TestClient) -> None:
    for path in PAGES:
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/html")
        html = r.text
        # Nothing is loaded from anywhere: no scripts, stylesheets, images, fonts or CDN URLs;
        # the one <link> is the favicon, inline as a data: URL (so browsers do not fetch one).
        assert re.findall(r"<link[^>]*>", html) == [re.search(r'<link rel="icon" href="data:[^"]*">', html).group(0)]  # type: ignore[union-attr]
        page = re.sub(r'<link rel="icon" href="data:[^"]*">', "", html)
        for needle in ("<script", "src=", "@import", "url(", "http://", "https://"):
            assert needle not in page, (path, needle)
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"


def test_overview_shows_period_totals_charts_and_spend_by_tenant(client: TestClient, sample: Sample) -> None:
    html = client.get("/").text
    today = tl.Execution.today()
    assert stat(html, "spend") == usd(today.sum("total_cost"))
    assert stat(html, "tokens") == f"{today.sum('total_tokens'):,}"
    assert stat(html, "calls") == str(today.count()) == "15"
    assert stat(html, "errors") == "2"  # globex's two provider errors; blocked/short-circuited counted apart
    assert "1 blocked, 1 short-circuited" in html
    # Cost per day: an inline SVG with one bar per day (14 for "today"), tooltips with exact values.
    chart = re.search(r'<div class="card" id="cost-chart">(.*?)</div>', html, re.S)
    assert chart and chart.group(1).count('<rect class="bar"') == 14
    spend = re.search(r'id="spend-by-tenant">(.*?)</div>', html, re.S)
    assert spend is not None
    for tenant in ("acme", "globex", "(no tenant)"):
        assert f">{tenant}<" in spend.group(1)
    failures = re.search(r'id="recent-failures">(.*?)</table>', html, re.S)
    assert failures and failures.group(1).count("/executions/") == 2
    assert client.get("/?period=30d").text.count('<rect class="bar"') >= 30
    assert client.get("/?period=nonsense").status_code == 200  # unknown values fall back to the default


def test_tenants_page_shows_budget_status_and_utilisation(client: TestClient, sample: Sample) -> None:
    html = client.get("/tenants").text
    assert rows(html, "tenant") == ["acme", "globex", "initech"]
    acme = html[html.index('data-tenant="acme"') : html.index('data-tenant="globex"')]
    spent = tl.TenantBudget.get("acme").current_daily_spending
    assert f"{usd(spent)}\n" in acme or f"{usd(spent)} " in acme
    assert "of $1.00" in acme and "Acme Corp" in acme and "within budget" in acme
    assert 'class="meter"' in acme
    globex = html[html.index('data-tenant="globex"') : html.index('data-tenant="initech"')]
    used = tl.TenantBudget.get("globex").current_daily_tokens
    assert f"{used} of 100" in globex
    assert ("limit reached" if used >= 100 else "near limit" if used >= 80 else "within budget") in globex
    initech = html[html.index('data-tenant="initech"') :]
    assert "limit reached" in initech and "of $0.00" in initech  # a zero limit is 100% used


def test_executions_filters(client: TestClient, sample: Sample) -> None:
    def count(query: str) -> int:
        r = client.get(f"/executions?{query}")
        assert r.status_code == 200
        return total(r.text)

    assert count("") == 15
    assert count("tenant_id=acme") == 8  # as in the reference: /agents/executions?tenant_id=...
    assert set(rows(client.get("/executions?tenant_id=acme").text)) == {"acme"}
    assert count("agent=SummaryAgent") == 2
    assert count("model=mock/flaky") == 3
    assert count("status=error") == 2
    assert count("status=failed") == 2
    assert count("status=short_circuited&tenant_id=globex") == 1
    assert count("status=blocked") == 1
    assert count("tenant_id=acme&agent=SupportAgent&period=today") == 6
    assert count("period=7d&status=success") == 11
    assert count("tenant_id=nobody") == 0
    assert "No executions match" in client.get("/executions?tenant_id=nobody").text
    assert count("status=bogus") == 15  # unknown status: no filter rather than an error
    # The filter form offers the values that exist.
    form = client.get("/executions").text
    for option in ("acme", "globex", "initech", "SupportAgent", "FlakyAgent", "mock/summary"):
        assert f'<option value="{option}"' in form


def test_executions_are_paginated_newest_first(client: TestClient, sample: Sample) -> None:
    ids = [e.id for e in tl.Execution.all().order_by("-started_at", "-id")]
    seen: list[str] = []
    for page in (1, 2, 3, 4):
        html = client.get(f"/executions?per_page=4&page={page}").text
        assert f"Page {page} of 4" in html
        seen += [link.rsplit("/", 1)[1] for link in detail_links(html)]
    assert seen == ids
    first = client.get("/executions?per_page=4").text
    assert 'rel="next" href="/executions?per_page=4&amp;page=2"' in first and 'rel="prev"' not in first
    last = client.get("/executions?per_page=4&page=99").text  # beyond the end: the last page
    assert "Page 4 of 4" in last and 'rel="next"' not in last
    # Filters survive paging.
    filtered = client.get("/executions?tenant_id=acme&per_page=5").text
    assert "tenant_id=acme" in re.search(r'rel="next" href="([^"]+)"', filtered).group(1)  # type: ignore[union-attr]
    assert client.get("/executions?page=abc&per_page=-3").status_code == 200


def test_execution_detail_shows_attempts_prompts_response_metadata(client: TestClient, sample: Sample) -> None:
    summary = tl.Execution.by_agent("SummaryAgent").first()
    assert summary is not None
    html = client.get(f"/executions/{summary.id}").text
    assert summary.id in html and "mock/summary" in html and "acme" in html
    assert "Summarize: text" in html  # user prompt
    assert "[mock/summary] You asked: Summarize: text" in html  # response
    assert "&#34;plan&#34;: &#34;pro&#34;" in html  # metadata, escaped JSON
    assert "[redacted]" in html
    attempts = re.search(r'id="attempts">(.*?)</table>', html, re.S)
    assert attempts and attempts.group(1).count("<tr>") == 2  # header + one attempt

    failed = tl.Execution.by_status("error").first()
    assert failed is not None
    html = client.get(f"/executions/{failed.id}").text
    assert "simulated failure" in html and "503" in html and 'id="error"' in html

    blocked = tl.Execution.by_status("blocked").first()
    assert blocked is not None
    assert "No request was sent (budget)" in client.get(f"/executions/{blocked.id}").text


def test_breakers_page_lists_open_breakers(client: TestClient) -> None:
    html = client.get("/breakers").text
    assert rows(html, "breaker") == ["globex"]
    assert "FlakyAgent" in html and "mock/flaky" in html and "open" in html
    tl.CircuitBreaker.reset("FlakyAgent", tenant_id="globex", model="mock/flaky")
    assert "All circuit breakers are closed" in client.get("/breakers").text


def test_not_found(client: TestClient) -> None:
    for path in ("/executions/00000000-0000-0000-0000-000000000000", "/executions/nope", "/nowhere"):
        r = client.get(path)
        assert r.status_code == 404 and "Not found" in r.text, path


def test_empty_database_renders_every_page(tmp_path: Path) -> None:
    tl.configure(database=str(tmp_path / "empty.db"))
    with TestClient(dashboard.app()) as c:
        for path in PAGES:
            assert c.get(path).status_code == 200, path
        assert "no data" in c.get("/").text
        assert "No tenant has a budget" in c.get("/tenants").text
        assert "No executions match" in c.get("/executions").text


# ------------------------------------------------------------------ access control


def test_tenant_scoped_viewer_sees_only_its_tenant(sample: Sample) -> None:
    c = scoped_client()
    h = {"X-Tenant": "acme"}
    for path in PAGES:
        html = c.get(path, headers=h).text
        assert "Tenant: acme" in html
        for other in ("globex", "initech", "Globex", "Initech"):
            assert other not in html, (path, other)
    # Changing the URL does not widen the view.
    html = c.get("/executions?tenant_id=globex", headers=h).text
    assert total(html) == 8 and set(rows(html)) == {"acme"}
    assert c.get("/executions?status=error", headers=h).text.count('class="execution"') == 0
    for other in ("globex", "initech", ""):
        for execution_id in sample.ids[other]:
            assert c.get(f"/executions/{execution_id}", headers=h).status_code == 404
    for execution_id in sample.ids["acme"]:
        assert c.get(f"/executions/{execution_id}", headers=h).status_code == 200
    assert rows(c.get("/tenants", headers=h).text, "tenant") == ["acme"]
    assert rows(c.get("/breakers", headers=h).text, "breaker") == []
    # globex sees its own breaker and executions.
    g = {"X-Tenant": "globex"}
    assert rows(c.get("/breakers", headers=g).text, "breaker") == ["globex"]
    assert total(c.get("/executions", headers=g).text) == 5
    # Overview numbers are the tenant's own.
    assert stat(c.get("/", headers=h).text, "calls") == "8"


def test_no_viewer_is_forbidden(sample: Sample) -> None:
    c = scoped_client()
    for path in [*PAGES, f"/executions/{sample.ids['acme'][0]}"]:
        r = c.get(path)
        assert r.status_code == 403, path
        assert "acme" not in r.text
    c = TestClient(dashboard.app(auth=dashboard.deny_all))
    assert c.get("/").status_code == 403


def test_admin_header_value_sees_everything(sample: Sample) -> None:
    c = scoped_client(admin_value="*")
    assert total(c.get("/executions", headers={"X-Tenant": "*"}).text) == 15
    assert total(c.get("/executions", headers={"X-Tenant": "acme"}).text) == 8


def test_async_auth_and_auth_asking_for_credentials(sample: Sample) -> None:
    async def auth(request: Request) -> Viewer | None:
        user = request.headers.get("x-user")
        if user is None:
            raise HTTPException(401, "Log in first.", headers={"WWW-Authenticate": 'Basic realm="tenantllm"'})
        return Viewer(all_tenants=True) if user == "admin" else Viewer(tenant_id=user)

    c = TestClient(dashboard.app(auth=auth, title="Acme <AI> console"))
    r = c.get("/")
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="tenantllm"'
    assert "Log in first." in r.text
    admin = c.get("/executions", headers={"x-user": "admin"}).text
    assert total(admin) == 15 and "Acme &lt;AI&gt; console" in admin
    assert total(c.get("/executions", headers={"x-user": "globex"}).text) == 5


def test_viewer_validation() -> None:
    with pytest.raises(ValueError):
        Viewer()
    with pytest.raises(ValueError):
        Viewer(all_tenants=True, tenant_id="acme")
    with pytest.raises(ValueError):
        Viewer(tenant_id="  ")
    assert Viewer(tenant_id="a").scope == "a" and Viewer(all_tenants=True).scope is None
    with pytest.raises(tl.ConfigurationError):
        dashboard.app(auth="admin")  # type: ignore[arg-type]


def test_auth_returning_something_else_is_an_error(sample: Sample) -> None:
    c = TestClient(dashboard.app(auth=lambda r: True), raise_server_exceptions=False)  # type: ignore[arg-type,return-value]
    assert c.get("/").status_code == 500


# ------------------------------------------------------------------ secrets and escaping


def test_api_keys_never_appear_on_any_page(client: TestClient, sample: Sample) -> None:
    assert tl.ApiConfiguration.providers("acme")  # keys really are stored
    paths = [*PAGES, "/executions?per_page=200"]
    paths += [f"/executions/{i}" for ids in sample.ids.values() for i in ids]
    scoped = scoped_client()
    for path in paths:
        for html in (client.get(path).text, scoped.get(path, headers={"X-Tenant": "acme"}).text):
            for name, key in KEYS.items():
                assert key not in html, (path, name)
                assert key[8:] not in html, (path, name)  # not even a recognisable part


def test_data_is_escaped(tmp_path: Path) -> None:
    tl.configure(database=str(tmp_path / "x.db"), mock={"latency_ms": 0})
    evil = '<script>alert("x")</script>'
    SupportAgent.call(query=evil, company=evil, tenant=evil)
    tl.TenantBudget.create("<b>bold</b>", name="<i>n</i>", daily_limit=1)
    with TestClient(dashboard.app()) as c:
        execution = tl.Execution.all().first()
        assert execution is not None
        for path in [*PAGES, f"/executions/{execution.id}", "/executions?tenant_id=<b>bold</b>"]:
            html = c.get(path).text
            assert "<script" not in html and "<b>bold" not in html and "<i>n" not in html, path
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in c.get(f"/executions/{execution.id}").text


# ------------------------------------------------------------------ mounting and databases


def test_mounted_in_fastapi_under_a_prefix(sample: Sample) -> None:
    from fastapi import FastAPI

    api = FastAPI()
    api.mount("/agents", dashboard.app())
    with TestClient(api) as c:
        html = c.get("/agents/").text
        assert 'href="/agents/executions"' in html and 'href="/agents/tenants"' in html
        page = c.get("/agents/executions?tenant_id=acme").text
        assert total(page) == 8
        link = re.search(r'href="(/agents/executions/[0-9a-f-]+)"', page)
        assert link and c.get(link.group(1)).status_code == 200
        assert c.get("/agents/breakers").status_code == 200


def test_own_database_leaves_the_application_configuration_alone(sample: Sample, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    configured = tl.config.engine().database
    app = dashboard.app(database=str(other))
    assert tl.config.engine().database == configured
    with TestClient(app) as c:
        assert total(c.get("/executions").text) == 0  # the other database is empty
    with TestClient(dashboard.app()) as c:
        assert total(c.get("/executions").text) == 15


def test_follows_reconfiguration(sample: Sample, tmp_path: Path) -> None:
    with TestClient(dashboard.app()) as c:
        assert total(c.get("/executions").text) == 15
        tl.configure(database=str(tmp_path / "new.db"))
        assert total(c.get("/executions").text) == 0


# ------------------------------------------------------------------ charts and formatting


def test_charts_are_svg_and_escape_labels() -> None:
    svg = charts.column_chart([("2026-01-01", Decimal("0.5")), ("<x>", Decimal(2))], fmt=usd, label="Cost & <more>")
    assert svg.startswith("<svg") and svg.count('<rect class="bar"') == 2
    assert "&lt;x&gt;: $2.00" in svg and "Cost &amp; &lt;more&gt;" in svg and "<x>" not in svg
    assert "no data" in charts.column_chart([], fmt=usd, label="empty")
    bars = charts.bar_list([(f"t{i}", Decimal(i)) for i in range(20)], fmt=usd, label="by tenant", limit=5)
    assert bars.count('<rect class="bar"') == 5 and "16 others" in bars and ">t19<" in bars
    assert 'level-over' in charts.meter(1.5, "over") and "150% used" in charts.meter(1.5, "over")
    assert "no limit" in charts.meter(None, "none")


def test_money_formatting() -> None:
    assert usd(Decimal(0)) == "$0.00"
    assert usd(Decimal("1234.5")) == "$1,234.50"
    assert usd(Decimal("0.26")) == "$0.26"
    assert usd(Decimal("0.0000045")) == "$0.0000045"
    assert usd(None) == "-"
