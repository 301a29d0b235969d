"""The dashboard over ASGI (Starlette's TestClient): every page, filters, pagination, access
control, no API keys anywhere, 404s, mounting in FastAPI, and the SVG charts."""

from __future__ import annotations

import calendar
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import raw_sql
import tenantllm as tl
from dashboard_data import KEYS, FlakyAgent, Sample, SupportAgent, populate
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.testclient import TestClient
from tenantllm import dashboard
from tenantllm.dashboard import Viewer, charts
from tenantllm.dashboard.views import usd

PAGES = ["/", "/?period=month", "/?period=last_month", "/tenants", "/executions", "/breakers",
         "/tenants?sort=errors&order=asc", "/tenants?q=a&filter=near_limit&filter=no_budget", "/tenants?page=2",
         "/tenants/acme"]


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
    # The biggest spenders from the counters, the rest (here the call without a tenant) in one bar.
    for tenant in ("acme", "globex", "(all others)"):
        assert f">{tenant}<" in spend.group(1)
    failures = re.search(r'id="recent-failures">(.*?)</table>', html, re.S)
    assert failures and failures.group(1).count("/executions/") == 2
    # This month: a bar per day so far; last month: one per day of it, and no spend (the sample's
    # calls all ran today), so no bars by tenant.
    today = datetime.now(UTC).date()
    month = client.get("/?period=month").text
    assert month.count('<rect class="bar"') - today.day == spend_bars(month) and stat(month, "calls") == "15"
    last = client.get("/?period=last_month").text
    last_days = calendar.monthrange(*((today.year, today.month - 1) if today.month > 1 else (today.year - 1, 12)))[1]
    assert last.count('<rect class="bar"') == last_days and stat(last, "calls") == "0" and spend_bars(last) == 0
    # Rolling windows and unknown values fall back to the default (today).
    for period in ("30d", "all", "nonsense"):
        assert stat(client.get(f"/?period={period}").text, "calls") == "15"


def spend_bars(html: str) -> int:
    """The bars of the overview's spend-by-tenant and spend-by-agent charts."""
    return sum(
        m.count('<rect class="bar"')
        for m in re.findall(r'id="spend-by-(?:tenant|agent)">(.*?)</div>', html, re.S)
    )


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


def tenants_total(html: str) -> int:
    m = re.search(r'<p class="muted" id="total">([\d,]+) tenant', html)
    assert m, "no total on the page"
    return int(m.group(1).replace(",", ""))


def test_tenants_are_sorted_searched_filtered_and_paged(client: TestClient, sample: Sample) -> None:
    def listed(query: str) -> list[str]:
        r = client.get(f"/tenants?{query}")
        assert r.status_code == 200, query
        return rows(r.text, "tenant")

    # Spend today, largest first, is the default; globex spent less than acme, initech nothing.
    assert listed("") == listed("sort=spend_today&order=desc") == ["acme", "globex", "initech"]
    assert listed("sort=spend_today&order=asc") == ["initech", "globex", "acme"]
    assert listed("sort=spend_month") == ["acme", "globex", "initech"]
    assert listed("sort=name") == ["acme", "globex", "initech"]  # names, A first
    assert listed("sort=name&order=desc") == ["initech", "globex", "acme"]
    assert listed("sort=errors")[0] == "globex"  # its 2 errors today
    # Share of the nearest limit: initech's zero limit is 100 % used.
    assert listed("sort=share")[0] == "initech"
    # Search: part of the id or of the name, any case; LIKE wildcards are plain characters.
    assert listed("q=glob") == ["globex"]
    assert listed("q=CORP") == ["acme"]
    assert listed("q=%25") == listed("q=_") == []
    assert "No tenant matches" in client.get("/tenants?q=nobody").text
    # Filters.
    assert listed("filter=breaker_open") == ["globex"]
    assert listed("filter=blocked_today") == ["initech"]
    near = {t for t in ("acme", "globex", "initech") if _nearest_share(t) >= 0.8}
    assert "initech" in near and set(listed("filter=near_limit")) == near
    assert listed("filter=no_budget") == []
    assert listed("filter=breaker_open&filter=blocked_today") == []  # filters combine
    assert listed("filter=bogus&sort=bogus") == ["acme", "globex", "initech"]  # unknown: ignored
    # Pages, with links that keep the order.
    html = client.get("/tenants?per_page=1&page=2&sort=name").text
    assert rows(html, "tenant") == ["globex"] and "Page 2 of 3" in html and tenants_total(html) == 3
    assert 'rel="next" href="/tenants?sort=name&amp;order=asc&amp;per_page=1&amp;page=3"' in html
    filtered = client.get("/tenants?per_page=1&filter=near_limit&filter=breaker_open&sort=name").text
    assert "filter=near_limit&amp;filter=breaker_open" in filtered  # the CSV link and pager keep both
    assert rows(client.get("/tenants?per_page=1&page=99&sort=name").text, "tenant") == ["initech"]  # the last


def test_the_list_joins_the_register_the_budgets_and_the_counters(client: TestClient, sample: Sample) -> None:
    """Every tenant seen, with a budget or with usage this month is listed once: here also a
    budget never used (its name sorts it) and a tenant seen without a budget."""
    tl.TenantBudget.create("zz-unused", name="Aardvark Ltd", daily_limit="5")
    SupportAgent.call(query="h", company="Hooli", tenant="hooli")
    html = client.get("/tenants?sort=name&order=asc").text
    assert rows(html, "tenant") == ["zz-unused", "acme", "globex", "hooli", "initech"]
    assert tenants_total(html) == 5
    assert rows(client.get("/tenants?filter=no_budget").text, "tenant") == ["hooli"]
    # Equal spend (none today) is ordered by id whichever the direction.
    assert rows(client.get("/tenants?sort=spend_today").text, "tenant")[-2:] == ["initech", "zz-unused"]
    assert rows(client.get("/tenants?sort=spend_today&order=asc").text, "tenant")[:2] == ["initech", "zz-unused"]
    assert rows(client.get("/tenants?q=aardvark").text, "tenant") == ["zz-unused"]


def test_calls_refused_by_a_rate_limit_count_as_blocked_today(db_path: Path) -> None:
    tl.configure(reset=True, database=str(db_path), mock={"latency_ms": 0})
    tl.TenantBudget.create("umbrella", rpm_limit=1)
    SupportAgent.call(query="a", company="Umbrella", tenant="umbrella")
    with pytest.raises(tl.RateLimitedError):
        SupportAgent.call(query="b", company="Umbrella", tenant="umbrella")
    SupportAgent.call(query="c", company="Hooli", tenant="hooli")
    with TestClient(dashboard.app()) as c:
        assert rows(c.get("/tenants?filter=blocked_today").text, "tenant") == ["umbrella"]


def _projection(spent: Decimal, limit: Decimal | None) -> tuple[Decimal, date | None]:
    """The README's rule, worked out here independently: this month's spend / days elapsed
    (today included) * days in the month, in nano-dollars rounded down; the limit runs out on
    the first day of the month whose end that rate reaches it."""
    today = datetime.now(UTC).date()  # the sample database's calendar is UTC
    days = calendar.monthrange(today.year, today.month)[1]
    nanos = int(spent * 10**9)
    projected = Decimal(nanos * days // today.day) / 10**9
    if limit is None:
        return projected, None
    if spent >= limit:
        return projected, today
    if spent == 0:
        return projected, None
    day = -(-int(limit * 10**9) * today.day // nanos)
    return projected, today.replace(day=day) if day <= days else None


def test_month_end_projection_and_when_the_budget_runs_out(client: TestClient, sample: Sample) -> None:
    from tenantllm.config import engine

    acme = tl.TenantBudget.get("acme")
    spent = acme.current_monthly_spending
    assert spent > 0
    # globex: a monthly limit its rate reaches this month; acme: $20, far off; initech: none.
    tl.TenantBudget.get("globex").update(monthly_limit=tl.TenantBudget.get("globex").current_monthly_spending * 2)
    listed = {r["tenant_id"]: r for r in engine().tenant_list(sort="name", descending=False)["rows"]}
    for t in ("acme", "globex", "initech"):
        b = tl.TenantBudget.get(t)
        expected = _projection(b.current_monthly_spending, b.monthly_limit)
        assert (listed[t]["projected_month"], listed[t]["runs_out"]) == expected, t
    assert listed["acme"]["runs_out"] is None and listed["initech"]["runs_out"] is None
    # Spent exactly the limit: out today.
    acme.update(monthly_limit=spent)
    [row] = engine().tenant_list(tenant_id="acme")["rows"]
    assert row["runs_out"] == _projection(spent, spent)[1] == datetime.now(UTC).date()
    # The page, the list's filter and its sort (soonest first; never-out last either way).
    html = client.get("/tenants/acme").text
    assert re.search(rf'id="runs-out">{row["runs_out"].isoformat()}<', html)
    assert usd(row["projected_month"]) in html
    out = {t for t, r in listed.items() if r["runs_out"] is not None} | {"acme"}
    assert set(rows(client.get("/tenants?filter=runs_out").text, "tenant")) == out
    soonest = rows(client.get("/tenants?sort=runs_out&order=asc").text, "tenant")
    latest = rows(client.get("/tenants?sort=runs_out&order=desc").text, "tenant")
    assert soonest[0] == "acme" and soonest[-1] == latest[-1] == "initech"
    # Without any monthly limit (own or global) nothing runs out; a global limit applies.
    acme.update(monthly_limit=None)
    assert "acme" not in rows(client.get("/tenants?filter=runs_out").text, "tenant")
    tl.configure(budgets={"global_monthly": str(spent)})
    assert "acme" in rows(client.get("/tenants?filter=runs_out").text, "tenant")
    csv_table = csv_rows(client.get("/tenants.csv?q=acme").text)
    acme_csv = dict(zip(csv_table[0], csv_table[1], strict=True))
    assert acme_csv["monthly_budget_runs_out"] == datetime.now(UTC).date().isoformat()
    assert Decimal(acme_csv["projected_month_cost"]) == _projection(spent, None)[0]


def test_spend_by_tenant_reads_the_counters(sample: Sample) -> None:
    from tenantllm.config import engine

    e = engine()
    month = {t: tl.TenantBudget.get(t).current_monthly_spending for t in ("acme", "globex", "initech")}
    ranked = sorted(month.items(), key=lambda tc: (-tc[1], tc[0]))
    top = [(t, u["cost"]) for t, u in e.top_tenants("month", 10)]
    assert [t for t, c in top if c > 0] == [t for t, c in ranked if c > 0]
    assert dict(top) == {t: c for t, c in month.items() if t in dict(top)}
    assert e.top_tenants("month", 1) == e.top_tenants("month", 10)[:1]
    # Every call in the sample ran today: today and the month give the same (a counter left
    # at zero by a refused call may exist in one period and not the other).
    def used(period: str) -> list[tuple[str, dict[str, object]]]:
        return [(t, u) for t, u in e.top_tenants(period, 10) if any(u.values())]

    assert used("today") == used("month")
    assert used("last_month") == []
    # Rolling windows and all time sum a counter per tenant and period: refused by name.
    for args, field in ((("week", 1), "period"), (("days", 1), "period"), (("all", 1), "period"),
                        (("today", 0), "limit"), (("today", 10_001), "limit")):
        with pytest.raises(tl.ConfigurationError, match=field):
            e.top_tenants(*args)


def _nearest_share(tenant: str) -> float:
    b = tl.TenantBudget.get(tenant)
    pairs = [(b.current_daily_spending, b.daily_limit), (b.current_daily_tokens, b.daily_token_limit)]
    return max(1.0 if lim == 0 else float(Decimal(used) / Decimal(lim)) for used, lim in pairs if lim is not None)


def test_tenant_detail_page(client: TestClient, sample: Sample) -> None:
    html = client.get("/tenants/acme").text
    agents = re.search(r'id="by-agent">(.*?)</table>', html, re.S)
    assert agents and "SupportAgent" in agents.group(1) and "SummaryAgent" in agents.group(1)
    assert re.search(r"SupportAgent</a></td>\s*<td class=\"num\">6<", agents.group(1))
    models = re.search(r'id="by-model">(.*?)</table>', html, re.S)
    assert models and "mock/support" in models.group(1) and "mock/summary" in models.group(1)
    assert "No failed calls" in html and "globex" not in html
    assert html.count('<rect class="bar"') == 30
    globex = client.get("/tenants/globex").text
    failures = re.search(r'id="failures">(.*?)</table>', globex, re.S)
    assert failures and failures.group(1).count('class="execution"') == 2
    # Failures older than the page's window (DETAIL_DAYS) are left out.
    [(old,)] = raw_sql.query(sample.db, "SELECT id FROM executions WHERE tenant_id = 'globex' AND status = 'error' "
                                        "ORDER BY id LIMIT 1")
    month_ago = 31 * 86_400 * 10**6
    raw_sql.query(sample.db, f"UPDATE executions SET started_at = started_at - {month_ago} WHERE id = '{old}'")
    failures = re.search(r'id="failures">(.*?)</table>', client.get("/tenants/globex").text, re.S)
    assert failures and failures.group(1).count('class="execution"') == 1 and old not in failures.group(1)
    assert rows(globex, "breaker") == ["globex"]
    assert re.search(r'id="errors-today">2<', globex)
    # The list links to it.
    assert 'href="/tenants/acme"' in client.get("/tenants").text


def csv_rows(text: str) -> list[list[str]]:
    import csv
    import io

    return list(csv.reader(io.StringIO(text)))


def test_csv_exports_follow_the_filters(client: TestClient, sample: Sample) -> None:
    r = client.get("/tenants.csv?filter=breaker_open")
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    table = csv_rows(r.text)
    assert table[0][:3] == ["tenant_id", "name", "enforcement"] and [t[0] for t in table[1:]] == ["globex"]
    everyone = csv_rows(client.get("/tenants.csv?sort=name").text)
    assert [t[0] for t in everyone[1:]] == ["acme", "globex", "initech"]
    acme = dict(zip(everyone[0], everyone[1], strict=True))
    assert Decimal(acme["Today limit"]) == 1
    assert Decimal(acme["Today used"]) == tl.TenantBudget.get("acme").current_daily_spending
    executions = csv_rows(client.get("/executions.csv?tenant_id=acme").text)
    assert len(executions) == 9 and {e[2] for e in executions[1:]} == {"acme"}
    ids = [e.id for e in tl.Execution.by_tenant("acme").order_by("-started_at", "-id")]
    assert [e[0] for e in executions[1:]] == ids
    assert len(csv_rows(client.get("/executions.csv").text)) == 16
    assert len(csv_rows(client.get("/executions.csv?status=failed").text)) == 3


def test_csv_cells_never_start_a_formula(client: TestClient, sample: Sample) -> None:
    tl.TenantBudget.create("evil", name='=HYPERLINK("http://x.invalid","y")')
    table = csv_rows(client.get("/tenants.csv?q=evil").text)
    assert table[1][1] == "'=HYPERLINK(\"http://x.invalid\",\"y\")"


def test_long_exports_are_read_in_chunks(client: TestClient, sample: Sample, monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantllm.dashboard import data, views

    monkeypatch.setattr(data, "EXPORT_CHUNK", 2)  # 15 executions, 3 tenants: several chunks each
    monkeypatch.setattr(views, "CSV_LINES_PER_SEND", 4)  # and sent 4 lines at a time, the last fewer
    ids = [e.id for e in tl.Execution.all().order_by("-started_at", "-id")]
    assert [e[0] for e in csv_rows(client.get("/executions.csv").text)[1:]] == ids
    assert [t[0] for t in csv_rows(client.get("/tenants.csv?sort=name").text)[1:]] == ["acme", "globex", "initech"]


def test_tenant_list_rejects_bad_arguments_by_name(sample: Sample) -> None:
    from tenantllm.config import engine

    e = engine()
    for kwargs, field in (({"sort": "cost"}, "sort"), ({"filters": ["hot"]}, "filter"), ({"limit": 0}, "limit"),
                          ({"offset": -1}, "offset"), ({"search": "x" * 201}, "search")):
        with pytest.raises(tl.ConfigurationError, match=field):
            e.tenant_list(**kwargs)
    for kwargs, field in (({"chunk": 0}, "chunk"), ({"sort": "cost"}, "sort"), ({"search": "x" * 201}, "search")):
        with pytest.raises(tl.ConfigurationError, match=field):
            e.tenant_rows(**kwargs)
    chunks = e.tenant_rows(sort="name", descending=False, chunk=2)
    assert [[r["tenant_id"] for r in c] for c in chunks] == [["acme", "globex"], ["initech"]]
    listed = e.tenant_list(sort="name", descending=False, limit=2)
    assert listed["total"] == 3 and [r["tenant_id"] for r in listed["rows"]] == ["acme", "globex"]
    only = e.tenant_list(tenant_id="nobody")  # a scoped viewer's tenant is listed even without data
    assert only["total"] == 1 and only["rows"][0]["budget"] is None and only["rows"][0]["share"] is None


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
    # The form keeps the filters (free text: no scan of executions for a list of values).
    form = client.get("/executions?tenant_id=acme&agent=SupportAgent&model=mock/support").text
    for name, value in (("tenant_id", "acme"), ("agent", "SupportAgent"), ("model", "mock/support")):
        assert f'name="{name}" value="{value}"' in form


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


def test_breakers_are_paged(client: TestClient, sample: Sample) -> None:
    tl.configure(database=str(sample.db), mock={"latency_ms": 0, "failure_rate": 1.0})
    for tenant in ("hooli", "umbrella"):
        for i in range(2):
            with pytest.raises(tl.ProviderError):
                FlakyAgent.call(n=i, tenant=tenant)
    first, second = client.get("/breakers?per_page=2").text, client.get("/breakers?per_page=2&page=2").text
    assert rows(first, "breaker") == ["globex", "hooli"] and rows(second, "breaker") == ["umbrella"]
    assert "3 breakers open or half-open" in first and "Page 1 of 2" in first
    assert 'href="/breakers?per_page=2&amp;page=2"' in first and 'href="/breakers?per_page=2&amp;page=1"' in second
    assert rows(client.get("/breakers?per_page=2&page=9").text, "breaker") == ["umbrella"]  # past the end: the last
    assert rows(client.get("/breakers?page=x").text, "breaker") == ["globex", "hooli", "umbrella"]
    # A tenant-scoped viewer's pages hold its own breakers only.
    h = {"X-Tenant": "hooli"}
    for query in ("", "?page=2", "?per_page=1&page=3"):
        assert rows(scoped_client().get(f"/breakers{query}", headers=h).text, "breaker") == ["hooli"], query


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
    # Every control of the tenants list and the exports stays within the viewer's tenant.
    for query in ("q=glob", "filter=breaker_open", "sort=errors", "page=2", "per_page=1&page=3"):
        assert set(rows(c.get(f"/tenants?{query}", headers=h).text, "tenant")) <= {"acme"}, query
    assert c.get("/tenants/globex", headers=h).status_code == 404
    assert c.get("/tenants/acme", headers=h).status_code == 200
    exported = c.get("/tenants.csv?q=glob", headers=h).text + c.get("/executions.csv?tenant_id=globex", headers=h).text
    assert "globex" not in exported and "initech" not in exported
    assert len(csv_rows(c.get("/executions.csv?tenant_id=globex", headers=h).text)) == 9
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
