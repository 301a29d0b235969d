"""What the dashboard pages show, read through the core's query API (no SQL here).

Every function takes the `Engine` to read and `tenant`: the one tenant the viewer may see,
or None for a viewer who sees every tenant. Scoping happens here, in one place, so a page
cannot forget it.
"""

from __future__ import annotations

import json
import re
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
    "all": ("All time", []),
}
# Days shown by the overview's cost chart for each period.
CHART_DAYS = {"today": 14, "7d": 7, "30d": 30, "all": 30}
STATUSES = ("success", "error", "timeout", "blocked", "short_circuited", "rate_limited", "cancelled", "running")
FAILED = ("error", "timeout")
MAX_PER_PAGE = 200

# Metadata keys whose values are never shown (users sometimes put credentials in metadata).
_SECRET_KEY = re.compile(r"api[_-]?key|secret|passw|authori[sz]ation|bearer|access[_-]?token|credential", re.I)
# Values that look like provider keys ("sk-...", "sk-ant-...", "AIza...") anywhere in shown JSON.
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk_[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,})")
REDACTED = "[redacted]"


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
    ops = period_ops(period) + tenant_ops(tenant)
    by_status: dict[str, int] = {str(k): int(v) for k, v in engine.query_grouped(ops, "status").items()}
    by_agent = [(str(k), v) for k, v in engine.query_grouped(ops, "agent", "total_cost").items()]
    cost: Decimal = sum((v for _, v in by_agent), Decimal(0))  # every execution has an agent
    tokens: int = engine.query_aggregate(ops, "total_tokens")
    by_tenant: list[tuple[str, Decimal]] = []
    if tenant is None:
        by_tenant = [
            ("(no tenant)" if k is None else str(k), v)
            for k, v in engine.query_grouped(ops, "tenant_id", "total_cost").items()
        ]
    failures = engine.query_rows([*ops, ("in", "status", list(FAILED)), ("order", "started_at", True), ("limit", 10)])

    # Cost per day from the running counters of the viewer's scope (no scan of executions).
    today = today_in(engine)
    days = CHART_DAYS.get(period, today.day)  # "month": the days so far this month
    scope = "global" if tenant is None else f"tenant:{tenant}"
    per_day = {d: u["cost"] for d, u in engine.usage_daily(scope, days)}
    daily = []
    for i in range(days - 1, -1, -1):
        d = (today - timedelta(days=i)).isoformat()
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
    meters: list[Meter] = field(default_factory=list)

    @property
    def level(self) -> str:
        levels = {m.level for m in self.meters}
        return next((lv for lv in ("over", "warn", "ok") if lv in levels), "none")


_METERS = (
    # label, limit field, period, usage key, money
    ("Today", "daily_limit", "daily", "cost", True),
    ("This month", "monthly_limit", "monthly", "cost", True),
    ("Tokens today", "daily_token_limit", "daily", "tokens", False),
    ("Tokens this month", "monthly_token_limit", "monthly", "tokens", False),
    ("Calls today", "daily_execution_limit", "daily", "executions", False),
    ("Calls this month", "monthly_execution_limit", "monthly", "executions", False),
)
_ZERO_USAGE: dict[str, Any] = {"cost": Decimal(0), "tokens": 0, "executions": 0}
# A tenant's own rate limits (a global one is shared, not inherited), with their use in the
# rate window ending now: label, limit field, usage key.
_RATE_METERS = (
    ("Calls this minute", "rpm_limit", "requests"),
    ("Tokens this minute", "tpm_limit", "tokens"),
    ("Calls in flight", "max_concurrent", "in_flight"),
)


def tenants(engine: Engine, tenant: str | None) -> list[TenantRow]:
    """Stored budgets, every tenant seen and every tenant with usage this month, with
    utilisation against the effective limits (the tenant's own, else the global `budgets=`).
    Runtime overrides from a `tenant_config_resolver` live in the application and are not shown."""
    glob = engine.global_limits()
    usage: dict[str, dict[str, dict[str, Any]]]
    seen = {t["id"]: t for t in engine.tenants()}
    if tenant is None:
        budgets = {b["tenant_id"]: b for b in engine.budget_all()}
        daily, monthly = engine.usage_by_tenant("daily"), engine.usage_by_tenant("monthly")
        ids = sorted(set(budgets) | set(daily) | set(monthly) | set(seen))
        usage = {t: {"daily": daily.get(t, _ZERO_USAGE), "monthly": monthly.get(t, _ZERO_USAGE)} for t in ids}
    else:
        own = engine.budget_get(tenant)
        budgets = {} if own is None else {tenant: own}
        ids = [tenant]
        usage = {tenant: engine.tenant_usage(tenant)}
    rows = []
    for t in ids:
        b, s = budgets.get(t), seen.get(t)
        row = TenantRow(
            tenant_id=t,
            name=(None if s is None else s["name"]) or (None if b is None else b["name"]),
            enforcement=(b or glob)["enforcement"],
            has_budget=b is not None,
            last_used_at=None if s is None else s["last_used_at"],
        )
        for label, limit_field, period, key, money in _METERS:
            limit = b[limit_field] if b is not None and b[limit_field] is not None else glob[limit_field]
            used = usage[t][period][key]
            if limit is None and key == "executions":
                continue  # call limits are rare; show them only when set
            row.meters.append(Meter(label, used, limit, money))
        rated = [(label, b[f], key) for label, f, key in _RATE_METERS if b is not None and b[f] is not None]
        if rated:
            rate = usage[t].get("rate") or engine.tenant_usage(t)["rate"]
            row.meters.extend(Meter(label, rate[key], limit, False) for label, limit, key in rated)
        rows.append(row)
    return rows


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
    pages = max(1, -(-total // per_page))
    page = min(max(page, 1), pages)
    newest_first: list[Op] = [("order", "started_at", True), ("order", "id", True)]
    window: list[Op] = [*newest_first, ("offset", (page - 1) * per_page), ("limit", per_page)]
    rows = engine.query_rows([*ops, *window])
    return Page(rows=[_row(r) for r in rows], total=total, page=page, pages=pages, per_page=per_page)


def filter_options(engine: Engine, tenant: str | None) -> dict[str, list[str]]:
    """Distinct tenants, agents and models the viewer may filter by."""
    ops = tenant_ops(tenant)

    def distinct(by: str) -> list[str]:
        return sorted(str(k) for k in engine.query_grouped(ops, by) if k is not None)

    return {
        "tenants": [] if tenant is not None else distinct("tenant_id"),
        "agents": distinct("agent"),
        "models": distinct("model_id"),
    }


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
