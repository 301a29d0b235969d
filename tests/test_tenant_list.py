"""The dashboard's list of tenants (`Engine.tenant_list`, `Engine.tenant_rows`) against a plain
Python computation of the same list from the register, the budgets, the counters, today's
executions and the breakers: every sort in both directions, every filter alone and in pairs,
with and without a search, paged and whole. The core reads only what a query's order and
filters need and fetches the rest for the page's rows; each path must give the same rows."""

from __future__ import annotations

import calendar
import itertools
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from dashboard_data import FlakyAgent, SupportAgent
from tenantllm.config import engine

SORTS = ("spend_today", "spend_month", "share", "errors", "name", "runs_out")
FILTERS = ("near_limit", "blocked_today", "breaker_open", "no_budget", "runs_out")
LIMITS = ("daily_limit", "monthly_limit", "daily_token_limit", "monthly_token_limit", "daily_execution_limit",
          "monthly_execution_limit")
USED = {"daily_limit": ("today", "cost"), "monthly_limit": ("month", "cost"),
        "daily_token_limit": ("today", "tokens"), "monthly_token_limit": ("month", "tokens"),
        "daily_execution_limit": ("today", "executions"), "monthly_execution_limit": ("month", "executions")}


def _mock(db: Path, failure_rate: float) -> None:
    tl.configure(database=str(db), mock={"latency_ms": 0, "failure_rate": failure_rate, "seed": 5},
                 budgets={"global_monthly_executions": 1000})


def populate(db: Path) -> None:
    """Up to 24 tenants seen (some named, some not), calls of different sizes and counts (ties
    included), budgets of every kind (a zero limit, a nearly spent one, monthly limits that run
    out), budgets never used, failures, blocked calls and open breakers."""
    _mock(db, 0.0)
    for i in range(24):
        tenant: Any = f"t{i:02d}" if i % 3 else {"id": f"t{i:02d}", "name": f"Named {23 - i} Co"}
        if i % 4 == 1:
            monthly = "0.0002" if i % 8 == 1 else "50"
            tl.TenantBudget.create(f"t{i:02d}", name=f"Budget {i}", daily_limit="5", monthly_limit=monthly,
                                   enforcement="soft")
        if i % 6 == 2:
            tl.TenantBudget.create(f"t{i:02d}", daily_token_limit=60 + i, monthly_execution_limit=3, enforcement="soft")
        for j in range(i % 5):
            SupportAgent.call(query="x" * (1 + (i * 7 + j) % 9 * 20), company="C", tenant=tenant)
    tl.TenantBudget.create("t05-zero", name="Zero Ltd", daily_limit="0", enforcement="hard")
    with pytest.raises(tl.BudgetExceededError):
        SupportAgent.call(query="refused", company="Z", tenant="t05-zero")
    tl.TenantBudget.create("idle-a", name="Aardvark Idle")
    tl.TenantBudget.create("idle-b", monthly_token_limit=0)
    _mock(db, 1.0)
    for t in ("t03", "t07", "t07", "t11"):
        with pytest.raises(tl.ProviderError):
            SupportAgent.call(query="fails", company="F", tenant=t)
    for t in ("t09", "idle-a"):
        for n in range(2):
            with pytest.raises(tl.ProviderError):
                FlakyAgent.call(n=n, tenant=t)
    _mock(db, 0.0)


def expected_rows() -> dict[str, dict[str, Any]]:
    """Every tenant the list shows, worked out from public reads: what the list must say."""
    e = engine()
    glob = e.global_limits()
    seen = {t.id: t.name for t in tl.tenants()}
    budgets = {b["tenant_id"]: b for b in e.budget_all()}
    month = e.usage_by_tenant("monthly")
    ids = set(seen) | set(budgets) | {t for t, u in month.items() if u}
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    today_calls = [r for r in e.query_rows([("period", "today")]) if r["tenant_id"] is not None]
    assert all(r["started_at"] >= start for r in today_calls)
    breakers = [b["tenant_id"] for b in e.breakers_not_closed()]
    today = datetime.now(UTC).date()
    out = {}
    for t in ids:
        usage = e.tenant_usage(t)
        use = {"today": usage["daily"], "month": usage["monthly"]}
        b = budgets.get(t)

        def limit(f: str, b: dict[str, Any] | None = b) -> Any:
            return b[f] if b is not None and b[f] is not None else glob[f]

        shares = [Decimal(1) if limit(f) <= 0 else Decimal(use[p][k]) / Decimal(limit(f))
                  for f, (p, k) in USED.items() if limit(f) is not None]
        out[t] = {
            "tenant_id": t,
            "name": seen.get(t) or (b["name"] if b else None),
            "budget": b is not None,
            "today": use["today"]["cost"],
            "month": use["month"]["cost"],
            "errors": sum(r["tenant_id"] == t and r["status"] in ("error", "timeout") for r in today_calls),
            "blocked": sum(r["tenant_id"] == t and r["status"] in ("blocked", "rate_limited") for r in today_calls),
            "breakers": breakers.count(t),
            "share": max(shares) if shares else None,
            "runs_out": _runs_out(use["month"]["cost"], limit("monthly_limit"), today),
        }
    return out


def _runs_out(spent: Decimal, limit: Decimal | None, today: date) -> date | None:
    """The README's rule (tests/test_dashboard.py `_projection` checks its arithmetic)."""
    if limit is None or (spent == 0 and limit > 0):
        return None
    if spent >= limit:
        return today
    days = calendar.monthrange(today.year, today.month)[1]
    day = -(-int(limit * 10**9) * today.day // int(spent * 10**9))
    return today.replace(day=day) if day <= days else None


def expected_ids(rows: dict[str, dict[str, Any]], sort: str, descending: bool, filters: tuple[str, ...],
                 search: str | None) -> list[str]:
    keep = {
        "near_limit": lambda r: r["share"] is not None and r["share"] >= Decimal("0.8"),
        "blocked_today": lambda r: r["blocked"] > 0,
        "breaker_open": lambda r: r["breakers"] > 0,
        "no_budget": lambda r: not r["budget"],
        "runs_out": lambda r: r["runs_out"] is not None,
    }
    budget_names = {b["tenant_id"]: b["name"] for b in engine().budget_all()}
    needle = (search or "").strip().lower()
    found = [r for r in rows.values()
             if all(keep[f](r) for f in filters)
             and (not needle or any(needle in (s or "").lower()
                                    for s in (r["tenant_id"], r["name"], budget_names.get(r["tenant_id"]))))]
    found.sort(key=lambda r: r["tenant_id"])  # ties by id, whichever the direction (a stable sort)
    if sort in ("share", "runs_out"):  # those without one last, whichever the direction
        key = "share" if sort == "share" else "runs_out"
        having = sorted((r for r in found if r[key] is not None), key=lambda r: r[key], reverse=descending)
        return [r["tenant_id"] for r in having + [r for r in found if r[key] is None]]
    value: Callable[[dict[str, Any]], Any] = {
        "spend_today": lambda r: r["today"], "spend_month": lambda r: r["month"], "errors": lambda r: r["errors"],
        "name": lambda r: (r["name"] or r["tenant_id"]).lower(),
    }[sort]
    return [r["tenant_id"] for r in sorted(found, key=value, reverse=descending)]


def test_every_sort_filter_and_search_lists_what_a_plain_computation_does(db_path: Path) -> None:
    populate(db_path)
    rows = expected_rows()
    assert "t00" not in rows and {"t05-zero", "idle-a", "idle-b"} <= set(rows)  # no call, no budget: not listed
    # The data covers every filter, with some tenants left out by each.
    for f in FILTERS:
        assert 0 < len(expected_ids(rows, "name", False, (f,), None)) < len(rows), f
    e = engine()
    combos = [(), *((f,) for f in FILTERS), *itertools.combinations(FILTERS, 2)]
    searches = (None, "T1", "named 2", "idle")
    for sort, descending, filters, search in itertools.product(SORTS, (True, False), combos, searches):
        want = expected_ids(rows, sort, descending, filters, search)
        args = {"sort": sort, "descending": descending, "filters": list(filters), "search": search}
        got = e.tenant_list(**args, limit=50)
        case = (sort, descending, filters, search)
        assert [r["tenant_id"] for r in got["rows"]] == want and got["total"] == len(want), case
        # Pages are windows of the same order; an export is all of it.
        if not filters and search is None:
            paged = [r["tenant_id"] for o in range(0, 30, 4) for r in e.tenant_list(**args, offset=o, limit=4)["rows"]]
            assert paged == want, case
            assert [r["tenant_id"] for chunk in e.tenant_rows(**args, chunk=5) for r in chunk] == want, case
    # Each row's figures, whichever order read them.
    for sort in SORTS:
        for r in e.tenant_list(sort=sort, limit=50)["rows"]:
            x = rows[r["tenant_id"]]
            assert (r["name"], r["budget"] is not None, r["today"]["cost"], r["month"]["cost"]) == \
                (x["name"], x["budget"], x["today"], x["month"]), (sort, r["tenant_id"])
            assert (r["errors_today"], r["blocked_today"], r["breakers_open"], r["runs_out"]) == \
                (x["errors"], x["blocked"], x["breakers"], x["runs_out"]), (sort, r["tenant_id"])
            assert (r["share"] is None) == (x["share"] is None), (sort, r["tenant_id"])
            if x["share"] is not None:
                assert r["share"] == pytest.approx(float(x["share"])), (sort, r["tenant_id"])
            assert r == e.tenant_list(tenant_id=r["tenant_id"])["rows"][0]  # a scoped viewer's row
