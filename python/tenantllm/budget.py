"""`TenantBudget`: a tenant's own limits, stored in the database."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from tenantllm import _core
from tenantllm._html import html_table
from tenantllm.config import engine

_FIELDS = tuple(_core.TENANT_LIMIT_KEYS)


class TenantBudget:
    """Limits in USD (`daily_limit`, `monthly_limit`), tokens and executions per day/month,
    with `enforcement` "hard" (block) or "soft" (warn), and rate limits (`rpm_limit`,
    `tpm_limit`, `max_concurrent`, always enforced). Unset limits inherit `budgets=`."""

    tenant_id: str
    name: str | None
    daily_limit: Decimal | None
    monthly_limit: Decimal | None
    daily_token_limit: int | None
    monthly_token_limit: int | None
    daily_execution_limit: int | None
    monthly_execution_limit: int | None
    rpm_limit: int | None
    tpm_limit: int | None
    max_concurrent: int | None
    enforcement: str

    def __init__(self, row: dict[str, Any]) -> None:
        self._load(row)

    def _load(self, row: dict[str, Any]) -> None:
        self.tenant_id = row["tenant_id"]
        for f in _FIELDS:
            setattr(self, f, row[f])

    def _fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _FIELDS}

    def __repr__(self) -> str:
        limits = ", ".join(f"{k}={v!r}" for k, v in self._fields().items() if v is not None)
        return f"TenantBudget(tenant_id={self.tenant_id!r}, {limits})"

    def _repr_html_(self) -> str:
        """A notebook's view: the limits set, with today's and this month's use."""
        rows = [[k, v] for k, v in self._fields().items() if v is not None]
        rows += [
            ["spent today", self.current_daily_spending],
            ["spent this month", self.current_monthly_spending],
            ["tokens today", self.current_daily_tokens],
        ]
        return html_table(["TenantBudget " + self.tenant_id, ""], rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TenantBudget) and (self.tenant_id, self._fields()) == (
            other.tenant_id,
            other._fields(),
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    # ---- persistence
    @classmethod
    def create(cls, tenant_id: str, **fields: Any) -> TenantBudget:
        """Store a new budget; ConfigurationError if the tenant already has one."""
        return cls(engine().budget_put(tenant_id, fields, True))

    @classmethod
    def find(cls, tenant_id: str) -> TenantBudget | None:
        row = engine().budget_get(tenant_id)
        return None if row is None else cls(row)

    @classmethod
    def get(cls, tenant_id: str) -> TenantBudget:
        """The tenant's budget; KeyError if it has none."""
        b = cls.find(tenant_id)
        if b is None:
            raise KeyError(f"no budget for tenant {tenant_id!r}")
        return b

    @classmethod
    def find_or_create(cls, tenant_id: str, **defaults: Any) -> TenantBudget:
        found = cls.find(tenant_id)
        if found is not None:
            return found
        try:
            return cls.create(tenant_id, **defaults)
        except Exception:
            # Another process created it between find and create.
            found = cls.find(tenant_id)
            if found is None:
                raise
            return found

    @classmethod
    def all(cls) -> list[TenantBudget]:
        return [cls(r) for r in engine().budget_all()]

    def update(self, **changes: Any) -> TenantBudget:
        """Change the named fields, in one statement: fields changed meanwhile elsewhere (by
        another process or `tenantllm budgets set`) keep their new values, and this object
        is reloaded with what is stored. All are validated before anything is stored."""
        row = engine().budget_put(self.tenant_id, changes, False)
        self._load(row)
        return self

    def delete(self) -> bool:
        return engine().budget_delete(self.tenant_id)

    # ---- spending (from running counters, not a scan of executions)
    def _usage(self, period: str) -> dict[str, Any]:
        usage: dict[str, Any] = engine().tenant_usage(self.tenant_id)[period]
        return usage

    @property
    def current_daily_spending(self) -> Decimal:
        spent: Decimal = self._usage("daily")["cost"]
        return spent

    @property
    def current_monthly_spending(self) -> Decimal:
        spent: Decimal = self._usage("monthly")["cost"]
        return spent

    @property
    def current_daily_tokens(self) -> int:
        tokens: int = self._usage("daily")["tokens"]
        return tokens

    @property
    def current_monthly_tokens(self) -> int:
        tokens: int = self._usage("monthly")["tokens"]
        return tokens

    @property
    def current_rpm(self) -> int:
        """Calls admitted in the rate window ending now (counted where a rpm/tpm limit applies)."""
        n: int = self._usage("rate")["requests"]
        return n

    @property
    def current_tpm(self) -> int:
        """Tokens of the calls in the rate window ending now (estimates until they settle)."""
        n: int = self._usage("rate")["tokens"]
        return n

    @property
    def current_concurrent(self) -> int:
        """Calls holding one of the `max_concurrent` slots now."""
        n: int = self._usage("rate")["in_flight"]
        return n

    def _effective(self, field: str) -> Any:
        own = getattr(self, field)
        return own if own is not None else engine().global_limits()[field]

    @property
    def effective_daily_limit(self) -> Decimal | None:
        limit: Decimal | None = self._effective("daily_limit")
        return limit

    @property
    def effective_monthly_limit(self) -> Decimal | None:
        limit: Decimal | None = self._effective("monthly_limit")
        return limit

    @property
    def effective_daily_token_limit(self) -> int | None:
        limit: int | None = self._effective("daily_token_limit")
        return limit

    @property
    def effective_monthly_token_limit(self) -> int | None:
        limit: int | None = self._effective("monthly_token_limit")
        return limit

    @property
    def daily_remaining(self) -> Decimal | None:
        """USD left today under the effective daily limit (never negative); None if unlimited."""
        limit = self.effective_daily_limit
        return None if limit is None else max(limit - self.current_daily_spending, Decimal(0))

    @property
    def monthly_remaining(self) -> Decimal | None:
        limit = self.effective_monthly_limit
        return None if limit is None else max(limit - self.current_monthly_spending, Decimal(0))


def rebuild_counters() -> int:
    """Recompute every usage counter (per scope and period) from the execution rows, in one
    transaction; returns how many counters were written. Use after restoring a backup or
    deleting executions by hand. The days a purge deleted count with their daily rollups."""
    return engine().rebuild_counters()


def spend_by_tenant(period: str = "monthly") -> dict[str, dict[str, Any]]:
    """{tenant_id: {"cost": Decimal, "tokens": int, "executions": int}} for the current
    "daily" or "monthly" period, read from the counters (no scan of executions)."""
    return engine().usage_by_tenant(period)
