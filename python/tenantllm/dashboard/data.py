"""What the dashboard pages show, read through the core's query API (no SQL here).

Every function takes the `Engine` to read and `tenant`: the one tenant the viewer may see,
or None for a viewer who sees every tenant. Scoping happens here, in one place, so a page
cannot forget it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from tenantllm._core import Engine

Op = tuple[Any, ...]

# Period choices: label and the query operations that select it.
PERIODS: dict[str, tuple[str, list[Op]]] = {
    "today": ("Today", [("period", "today")]),
    "7d": ("Last 7 days", [("period", "last_n_days", 7)]),
    "30d": ("Last 30 days", [("period", "last_n_days", 30)]),
    "month": ("This month", [("period", "this_month")]),
    "last_month": ("Last month", [("period", "last_month")]),
    "all": ("All time", []),
}
# The overview's periods: those whose spend by tenant is one period of the tenant counters
# (`Engine.top_tenants`' periods), a range of one table. A rolling window of days sums a
# counter per tenant and day: 30 days of 50,000 tenants took seconds.
OVERVIEW_PERIODS = ("today", "month", "last_month")
TOP_TENANTS = 11  # the spend-by-tenant chart's bars besides OTHER_TENANTS
OTHER_TENANTS = "(all others)"  # other tenants and calls without one
STATUSES = ("success", "error", "timeout", "blocked", "short_circuited", "rate_limited", "cancelled", "running")
FAILED = ("error", "timeout")
MAX_PER_PAGE = 200

# Metadata keys whose values are never shown (users sometimes put credentials in metadata).
_SECRET_KEY = re.compile(r"api[_-]?key|secret|passw|authori[sz]ation|bearer|access[_-]?token|credential", re.I)
# Values that look like provider keys ("sk-...", "sk-ant-...", "AIza...") anywhere in shown JSON.
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk_[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,})")
REDACTED = "[redacted]"


def page_within(page: int, per_page: int, total: int) -> tuple[int, int]:
    """The number of pages of `total` rows (at least 1) and `page` brought within them."""
    pages = max(1, -(-total // per_page))
    return min(max(page, 1), pages), pages


def tenant_ops(tenant: str | None) -> list[Op]:
    return [] if tenant is None else [("eq", "tenant_id", tenant)]


def period_ops(period: str) -> list[Op]:
    return list(PERIODS[period][1])


def redact(value: Any) -> Any:
    """A copy of `value` (JSON-like) with secret-looking keys' values and key-like strings replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SECRET_VALUE.sub(REDACTED, value)
    return value


def redact_text(text: str | None) -> str | None:
    return None if text is None else _SECRET_VALUE.sub(REDACTED, text)


def today_in(engine: Engine) -> date:
    """Today in the engine's configured timezone (the calendar its counters use)."""
    return datetime.now(ZoneInfo(engine.timezone)).date()


# ------------------------------------------------------------------ overview


@dataclass
class Overview:
    period: str
    cost: Decimal
    tokens: int
    calls: int
    errors: int
    by_status: dict[str, int]
    daily: list[tuple[str, Decimal]]
    by_tenant: list[tuple[str, Decimal]]
    by_agent: list[tuple[str, Decimal]]
    recent_failures: list[dict[str, Any]]

    @property
    def error_rate(self) -> float | None:
        return None if self.calls == 0 else self.errors / self.calls


def overview(engine: Engine, period: str, tenant: str | None) -> Overview:
    """The overview of one of OVERVIEW_PERIODS."""
    ops = period_ops(period) + tenant_ops(tenant)
    by_status: dict[str, int] = {str(k): int(v) for k, v in engine.query_grouped(ops, "status").items()}
    by_agent = [(str(k), v) for k, v in engine.query_grouped(ops, "agent", "total_cost").items()]
    cost: Decimal = sum((v for _, v in by_agent), Decimal(0))  # every execution has an agent
    tokens: int = engine.query_aggregate(ops, "total_tokens")
    by_tenant: list[tuple[str, Decimal]] = []
    if tenant is None:
        # The biggest spenders from the counters (at 50,000 tenants nearly every call is its
        # own rollup row); the rest in one row, so the bars still add up to the period's cost.
        by_tenant = [(t, u["cost"]) for t, u in engine.top_tenants(period, TOP_TENANTS)]
        rest = cost - sum((v for _, v in by_tenant), Decimal(0))
        if rest > 0:
            by_tenant.append((OTHER_TENANTS, rest))
    failures = engine.query_rows([*ops, ("in", "status", list(FAILED)), ("order", "started_at", True), ("limit", 10)])

    # Cost per day from the running counters of the viewer's scope (no scan of executions):
    # the last 14 days, or the month's days (so far).
    today = today_in(engine)
    first, last = today - timedelta(days=13), today
    if period == "month":
        first = today.replace(day=1)
    elif period == "last_month":
        last = today.replace(day=1) - timedelta(days=1)
        first = last.replace(day=1)
    scope = "global" if tenant is None else f"tenant:{tenant}"
    per_day = {d: u["cost"] for d, u in engine.usage_daily(scope, (today - first).days + 1)}
    daily = []
    for i in range((last - first).days + 1):
        d = (first + timedelta(days=i)).isoformat()
        daily.append((d, per_day.get(d, Decimal(0))))
    return Overview(
        period=period,
        cost=cost,
        tokens=tokens,
        calls=sum(by_status.values()),
        errors=sum(by_status.get(s, 0) for s in FAILED),
        by_status=by_status,
        daily=daily,
        by_tenant=by_tenant,
        by_agent=by_agent,
        recent_failures=[_row(r) for r in failures],
    )


# ------------------------------------------------------------------ tenants


@dataclass
class Meter:
    label: str
    used: Decimal | int
    limit: Decimal | int | None
    money: bool

    @property
    def fraction(self) -> float | None:
        if self.limit is None:
            return None
        if self.limit == 0:
            return 1.0  # nothing allowed: every call is refused (hard) or warned about (soft)
        return float(Decimal(self.used) / Decimal(self.limit))

    @property
    def level(self) -> str:
        f = self.fraction
        if f is None:
            return "none"
        return "over" if f >= 1 else "warn" if f >= 0.8 else "ok"


@dataclass
class TenantRow:
    tenant_id: str
    name: str | None
    enforcement: str
    has_budget: bool
    # From the register of tenants seen (None: no call yet).
    last_used_at: datetime | None = None
    errors_today: int = 0
    blocked_today: int = 0
    breakers_open: int = 0
    share: float | None = None
    # This month's spend at its daily average so far, carried to the month's end, and the day
    # the effective monthly limit runs out at that rate (None: not this month, or no limit).
    projected_month: Decimal = Decimal(0)
    runs_out: date | None = None
    meters: list[Meter] = field(default_factory=list)

    @property
    def level(self) -> str:
        levels = {m.level for m in self.meters}
        return next((lv for lv in ("over", "warn", "ok") if lv in levels), "none")


METERS = (
    # label, limit field, period, usage key, money
    ("Today", "daily_limit", "today", "cost", True),
    ("This month", "monthly_limit", "month", "cost", True),
    ("Tokens today", "daily_token_limit", "today", "tokens", False),
    ("Tokens this month", "monthly_token_limit", "month", "tokens", False),
    ("Calls today", "daily_execution_limit", "today", "executions", False),
    ("Calls this month", "monthly_execution_limit", "month", "executions", False),
)

_ZERO_USAGE: dict[str, Any] = {"cost": Decimal(0), "tokens": 0, "executions": 0}
# A tenant's own rate limits (a global one is shared, not inherited), with their use in the
# rate window ending now: label, limit field, usage key.
_RATE_METERS = (
    ("Calls this minute", "rpm_limit", "requests"),
    ("Tokens this minute", "tpm_limit", "tokens"),
    ("Calls in flight", "max_concurrent", "in_flight"),
)

# The tenants list: sort keys and filters (the core's names) with their labels.
TENANT_SORTS = {
    "spend_today": "Spend today",
    "spend_month": "Spend this month",
    "share": "Share of nearest limit",
    "errors": "Errors today",
    "name": "Name",
    "runs_out": "Monthly budget runs out",
}
TENANT_FILTERS = {
    "near_limit": "Over 80 % of a limit",
    "blocked_today": "Blocked today",
    "breaker_open": "Breaker open",
    "no_budget": "No budget",
    "runs_out": "Runs out this month",
}
TENANTS_PER_PAGE = 50
MAX_SEARCH = 200  # the core's limit on a search


@dataclass
class TenantQuery:
    """What the tenants list shows: search, filters, order and page (URL parameters)."""

    search: str | None = None
    filters: list[str] = field(default_factory=list)
    sort: str = "spend_today"
    descending: bool = True
    page: int = 1
    per_page: int = TENANTS_PER_PAGE

    def params(self) -> dict[str, Any]:
        """The query as URL parameters (for links and forms that keep it), page left out."""
        out: dict[str, Any] = {"sort": self.sort, "order": "desc" if self.descending else "asc"}
        if self.search:
            out["q"] = self.search
        if self.filters:
            out["filter"] = list(self.filters)
        if self.per_page != TENANTS_PER_PAGE:
            out["per_page"] = str(self.per_page)
        return out


@dataclass
class TenantPage:
    rows: list[TenantRow]
    total: int
    page: int
    pages: int
    per_page: int


def _tenant_row(engine: Engine, r: dict[str, Any], glob: dict[str, Any], *, rates: bool = True) -> TenantRow:
    """A row of `Engine.tenant_list` with its meters against the effective limits (the
    tenant's own, else the global `budgets=`), and with `rates` its own rate limits' use now
    (one more read per tenant that has them)."""
    b = r["budget"]
    row = TenantRow(
        tenant_id=r["tenant_id"],
        name=r["name"],
        enforcement=(b or glob)["enforcement"],
        has_budget=b is not None,
        last_used_at=r["last_used_at"],
        errors_today=r["errors_today"],
        blocked_today=r["blocked_today"],
        breakers_open=r["breakers_open"],
        share=r["share"],
        projected_month=r["projected_month"],
        runs_out=r["runs_out"],
    )
    for label, limit_field, period, key, money in METERS:
        limit = b[limit_field] if b is not None and b[limit_field] is not None else glob[limit_field]
        if limit is None and key == "executions":
            continue  # call limits are rare; show them only when set
        row.meters.append(Meter(label, r[period][key], limit, money))
    rated = [(label, b[f], key) for label, f, key in _RATE_METERS if rates and b is not None and b[f] is not None]
    if rated:
        rate = engine.tenant_usage(row.tenant_id)["rate"]
        row.meters.extend(Meter(label, rate[key], limit, False) for label, limit, key in rated)
    return row


def tenants(engine: Engine, tenant: str | None, q: TenantQuery) -> TenantPage:
    """One page of tenants: every tenant seen (the register), with a stored budget or with usage
    this month (a scoped viewer: only its own), sorted, searched and filtered by the database
    from the running counters.
    Runtime overrides from a `tenant_config_resolver` live in the application and are not shown."""
    glob = engine.global_limits()

    def fetch(page: int) -> dict[str, Any]:
        return engine.tenant_list(
            sort=q.sort,
            descending=q.descending,
            search=q.search,
            filters=q.filters,
            tenant_id=tenant,
            offset=(page - 1) * q.per_page,
            limit=q.per_page,
        )

    found = fetch(q.page)
    if not found["rows"] and q.page > 1:  # past the end: the last page, whose number we now know
        found = fetch(1)
        last = max(1, -(-found["total"] // q.per_page))
        found = fetch(last) if last > 1 else found
    total = found["total"]
    page, pages = page_within(q.page, q.per_page, total)
    return TenantPage([_tenant_row(engine, r, glob) for r in found["rows"]], total, page, pages, q.per_page)


# Rows an export turns into Python objects at a time (tenants) or reads at a time (executions).
EXPORT_CHUNK = 10_000


def tenants_export(engine: Engine, tenant: str | None, q: TenantQuery) -> Iterator[TenantRow]:
    """Every tenant the list's search and filters select, in its order: the list is built
    once (its order is computed, not indexed) and handed over a chunk at a time."""
    glob = engine.global_limits()
    chunks = engine.tenant_rows(
        sort=q.sort, descending=q.descending, search=q.search, filters=q.filters, tenant_id=tenant, chunk=EXPORT_CHUNK
    )
    for chunk in chunks:
        yield from (_tenant_row(engine, r, glob, rates=False) for r in chunk)


@dataclass
class TenantDetail:
    row: TenantRow
    daily: list[tuple[str, dict[str, Any]]]  # the last DETAIL_DAYS days, oldest first
    by_agent: list[tuple[str, Decimal, int]]  # name, cost, calls over DETAIL_DAYS
    by_model: list[tuple[str, Decimal, int]]
    recent_failures: list[dict[str, Any]]
    breakers: list[dict[str, Any]]


DETAIL_DAYS = 30


def tenant_detail(engine: Engine, tenant_id: str, viewer_scope: str | None) -> TenantDetail | None:
    """One tenant's page, or None when the viewer may not see it (indistinguishable from a
    tenant that does not exist). Per-day usage comes from the counters; agents, models and
    failures from the tenant's own executions of the last DETAIL_DAYS days (its index)."""
    if viewer_scope is not None and tenant_id != viewer_scope:
        return None
    found = engine.tenant_list(tenant_id=tenant_id, limit=1)["rows"]
    if not found:
        return None
    glob = engine.global_limits()
    today = today_in(engine)
    per_day = dict(engine.usage_daily(f"tenant:{tenant_id}", DETAIL_DAYS))
    daily = []
    for i in range(DETAIL_DAYS - 1, -1, -1):
        d = (today - timedelta(days=i)).isoformat()
        daily.append((d, per_day.get(d, dict(_ZERO_USAGE))))
    ops: list[Op] = [("period", "last_n_days", DETAIL_DAYS), *tenant_ops(tenant_id)]

    def grouped(by: str) -> list[tuple[str, Decimal, int]]:
        cost = engine.query_grouped(ops, by, "total_cost")
        calls = engine.query_grouped(ops, by)
        return sorted(((str(k), cost[k], int(calls[k])) for k in calls), key=lambda t: (-t[1], t[0]))

    # Within the window, like the rest of the page: the tenant's calls of DETAIL_DAYS days by
    # its index (a range of ids), each row read to check its status; unbounded, a tenant
    # without failures had every call it ever made read (200 rows, 1.9 s from a cold disk).
    failures = engine.query_rows([*ops, ("in", "status", list(FAILED)), ("order", "started_at", True), ("limit", 20)])
    return TenantDetail(
        row=_tenant_row(engine, found[0], glob),
        daily=daily,
        by_agent=grouped("agent"),
        by_model=grouped("model_id"),
        recent_failures=[_row(r) for r in failures],
        breakers=breakers(engine, tenant_id),
    )


# ------------------------------------------------------------------ executions


@dataclass
class Filters:
    tenant_id: str | None = None
    agent: str | None = None
    model: str | None = None
    status: str | None = None
    period: str = "all"

    def ops(self) -> list[Op]:
        ops: list[Op] = period_ops(self.period) + tenant_ops(self.tenant_id)
        if self.agent:
            ops.append(("eq", "agent", self.agent))
        if self.model:
            ops.append(("eq", "model_id", self.model))
        if self.status == "failed":
            ops.append(("in", "status", list(FAILED)))
        elif self.status:
            ops.append(("eq", "status", self.status))
        return ops

    def params(self) -> dict[str, str]:
        """The filters as query parameters (for links that keep them)."""
        p = {"tenant_id": self.tenant_id, "agent": self.agent, "model": self.model, "status": self.status}
        out = {k: v for k, v in p.items() if v}
        if self.period != "all":
            out["period"] = self.period
        return out


@dataclass
class Page:
    rows: list[dict[str, Any]]
    total: int
    page: int
    pages: int
    per_page: int


def executions(engine: Engine, filters: Filters, page: int, per_page: int) -> Page:
    ops = filters.ops()
    total: int = engine.query_aggregate(ops)
    page, pages = page_within(page, per_page, total)
    newest_first: list[Op] = [("order", "started_at", True), ("order", "id", True)]
    window: list[Op] = [*newest_first, ("offset", (page - 1) * per_page), ("limit", per_page)]
    rows = engine.query_rows([*ops, *window])
    return Page(rows=[_row(r) for r in rows], total=total, page=page, pages=pages, per_page=per_page)


def executions_export(engine: Engine, filters: Filters) -> Iterator[dict[str, Any]]:
    """Every execution the filters select, newest first, a chunk at a time, each chunk from
    where the last one ended (a keyset: no chunk steps over the rows before it)."""
    ops = filters.ops()
    newest_first: list[Op] = [("order", "started_at", True), ("order", "id", True)]
    after: list[Op] = []
    while True:
        rows = engine.query_rows([*ops, *after, *newest_first, ("limit", EXPORT_CHUNK)])
        yield from (_row(r) for r in rows)
        if len(rows) < EXPORT_CHUNK:
            return
        after = [("before", rows[-1]["started_at"], rows[-1]["id"])]


def execution(engine: Engine, execution_id: str, tenant: str | None) -> dict[str, Any] | None:
    """One execution with its details, or None if it does not exist or belongs to a tenant
    the viewer may not see (the two are indistinguishable to the viewer)."""
    row = engine.get_execution(execution_id)
    if row is None or (tenant is not None and row["tenant_id"] != tenant):
        return None
    row = _row(row)
    row["metadata_json"] = json.dumps(redact(row["metadata"]), indent=2, sort_keys=True, default=str)
    for k in ("system_prompt", "user_prompt", "response"):
        row[k] = redact_text(row.get(k))
    attempts = []
    for a in row["attempts"]:
        a = redact(dict(a))
        a["cost"] = Decimal(a.get("cost_nanos") or 0).scaleb(-9)
        attempts.append(a)
    row["attempts"] = attempts
    return row


def _row(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    r["error_message"] = redact_text(r.get("error_message"))
    return r


# ------------------------------------------------------------------ breakers


def breakers(engine: Engine, tenant: str | None) -> list[dict[str, Any]]:
    """Open and half-open breakers the viewer may see."""
    found = engine.breakers_not_closed()
    if tenant is not None:
        found = [b for b in found if b.get("tenant_id") == tenant]
    return sorted(found, key=lambda b: (str(b.get("tenant_id") or ""), b["agent"], b["model"]))


BREAKERS_PER_PAGE = 50


def breakers_page(engine: Engine, tenant: str | None, page: int, per_page: int) -> Page:
    """One page of `breakers` (a breaker per tenant, agent and model: at 50,000 tenants an
    outage opens thousands)."""
    found = breakers(engine, tenant)
    page, pages = page_within(page, per_page, len(found))
    start = (page - 1) * per_page
    return Page(rows=found[start : start + per_page], total=len(found), page=page, pages=pages, per_page=per_page)
