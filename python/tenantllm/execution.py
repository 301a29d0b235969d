"""`Execution`: one row per call, and chainable queries over them (built into SQL by the core
from a fixed list of fields)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from tenantllm._core import InvalidTenantError
from tenantllm.config import engine, settings
from tenantllm.tenancy import resolve

Op = tuple[Any, ...]


def _utc(t: Any) -> Any:
    """Datetimes to UTC for the core (which checks everything else)."""
    if isinstance(t, datetime):
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t


def _agent_name(agent: str | type) -> Any:
    """An agent class's name; anything else goes to the core, which checks it."""
    return agent.__name__ if isinstance(agent, type) else agent


@dataclasses.dataclass(frozen=True)
class Execution:
    """One agent call. Costs are exact `Decimal` USD; times are timezone-aware UTC."""

    id: str
    agent: str
    model_id: str
    chosen_model_id: str | None
    provider: str
    tenant_id: str | None
    status: str
    error_class: str | None
    error_message: str | None
    started_at: datetime
    completed_at: datetime | None
    duration_ms: int | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    total_tokens: int
    input_cost: Decimal
    output_cost: Decimal
    total_cost: Decimal
    attempts_count: int
    attempts: list[dict[str, Any]]
    metadata: dict[str, Any]
    finish_reason: str | None
    parent_execution_id: str | None
    root_execution_id: str | None
    # Input tokens written to the prompt cache, and the parts of input_cost spent on cache
    # reads and writes.
    cache_write_tokens: int
    cache_read_cost: Decimal
    cache_write_cost: Decimal
    # From the details table; filled by `Execution.get` only.
    system_prompt: str | None = None
    user_prompt: str | None = None
    response: str | None = None

    @classmethod
    def _from_row(cls, row: dict[str, Any]) -> Execution:
        return cls(**row)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Entry points: each starts a query (see ExecutionQuery for the rest).
    @classmethod
    def get(cls, execution_id: str) -> Execution:
        """The execution with this id, with its prompts and response; KeyError if none."""
        row = engine().get_execution(execution_id)
        if row is None:
            raise KeyError(f"no execution with id {execution_id!r}")
        return cls._from_row(row)

    @classmethod
    def all(cls) -> ExecutionQuery:
        return ExecutionQuery()

    @classmethod
    def by_tenant(cls, tenant_id: str) -> ExecutionQuery:
        return ExecutionQuery().by_tenant(tenant_id)

    @classmethod
    def for_current_tenant(cls) -> ExecutionQuery:
        return ExecutionQuery().for_current_tenant()

    @classmethod
    def with_tenant(cls) -> ExecutionQuery:
        return ExecutionQuery().with_tenant()

    @classmethod
    def without_tenant(cls) -> ExecutionQuery:
        return ExecutionQuery().without_tenant()

    @classmethod
    def today(cls) -> ExecutionQuery:
        return ExecutionQuery().today()

    @classmethod
    def this_week(cls) -> ExecutionQuery:
        return ExecutionQuery().this_week()

    @classmethod
    def this_month(cls) -> ExecutionQuery:
        return ExecutionQuery().this_month()

    @classmethod
    def last_n_days(cls, n: int) -> ExecutionQuery:
        return ExecutionQuery().last_n_days(n)

    @classmethod
    def between(cls, start: datetime | date | None, end: datetime | date | None) -> ExecutionQuery:
        return ExecutionQuery().between(start, end)

    @classmethod
    def by_agent(cls, agent: str | type) -> ExecutionQuery:
        return ExecutionQuery().by_agent(agent)

    @classmethod
    def by_model(cls, model: str) -> ExecutionQuery:
        return ExecutionQuery().by_model(model)

    @classmethod
    def by_status(cls, status: str) -> ExecutionQuery:
        return ExecutionQuery().by_status(status)

    @classmethod
    def successful(cls) -> ExecutionQuery:
        return ExecutionQuery().successful()

    @classmethod
    def failed(cls) -> ExecutionQuery:
        return ExecutionQuery().failed()


class ExecutionQuery:
    """An immutable, chainable query; nothing runs until a terminal method (count, sum,
    iteration, first, to_dicts, to_pandas) is called."""

    def __init__(self, ops: tuple[Op, ...] = ()) -> None:
        self._ops = ops

    def _and(self, *op: Any) -> ExecutionQuery:
        return ExecutionQuery((*self._ops, op))

    def __repr__(self) -> str:
        return f"ExecutionQuery({list(self._ops)!r})"

    # ---- filters
    def by_tenant(self, tenant_id: str) -> ExecutionQuery:
        return self._and("eq", "tenant_id", tenant_id)

    def for_current_tenant(self) -> ExecutionQuery:
        t = resolve(settings())
        if t.id is None:
            raise InvalidTenantError(
                "for_current_tenant(): no current tenant (use tenantllm.tenant() or a resolver)"
            )
        return self.by_tenant(t.id)

    def with_tenant(self) -> ExecutionQuery:
        return self._and("notnull", "tenant_id")

    def without_tenant(self) -> ExecutionQuery:
        return self._and("null", "tenant_id")

    def today(self) -> ExecutionQuery:
        return self._and("period", "today")

    def this_week(self) -> ExecutionQuery:
        return self._and("period", "this_week")

    def this_month(self) -> ExecutionQuery:
        return self._and("period", "this_month")

    def last_n_days(self, n: int) -> ExecutionQuery:
        return self._and("period", "last_n_days", n)

    def between(self, start: datetime | date | None, end: datetime | date | None) -> ExecutionQuery:
        """start <= started_at < end. Naive datetimes are UTC; a date is the start of that
        calendar day in the configured timezone; None leaves that side open."""
        return self._and("between", _utc(start), _utc(end))

    def by_agent(self, agent: str | type) -> ExecutionQuery:
        return self._and("eq", "agent", _agent_name(agent))

    def by_model(self, model: str) -> ExecutionQuery:
        return self._and("eq", "model_id", model)

    def by_status(self, status: str) -> ExecutionQuery:
        return self._and("eq", "status", status)

    def where(self, field: str, value: str | int) -> ExecutionQuery:
        return self._and("eq", field, value)

    def successful(self) -> ExecutionQuery:
        return self.by_status("success")

    def failed(self) -> ExecutionQuery:
        return self._and("in", "status", ["error", "timeout"])

    def order_by(self, *fields: str) -> ExecutionQuery:
        """`order_by("-total_cost", "started_at")`: a leading '-' sorts descending."""
        q = self
        for f in fields:
            q = q._and("order", f.removeprefix("-"), f.startswith("-"))
        return q

    def limit(self, n: int) -> ExecutionQuery:
        return self._and("limit", n)

    def offset(self, n: int) -> ExecutionQuery:
        return self._and("offset", n)

    def group_by(self, field: str) -> GroupedQuery:
        return GroupedQuery(self._ops, field)

    # ---- terminal
    def count(self) -> int:
        n: int = engine().query_aggregate(list(self._ops))
        return n

    def sum(self, field: str) -> Decimal | int:
        total: Decimal | int = engine().query_aggregate(list(self._ops), field)
        return total

    def to_dicts(self) -> list[dict[str, Any]]:
        return engine().query_rows(list(self._ops))

    def __iter__(self) -> Iterator[Execution]:
        return (Execution._from_row(r) for r in self.to_dicts())

    def first(self) -> Execution | None:
        q = self if any(op[0] == "order" for op in self._ops) else self.order_by("started_at")
        return next(iter(q.limit(1)), None)

    def to_pandas(self) -> Any:
        """A pandas DataFrame of the rows (needs `pip install tenantllm[pandas]`)."""
        try:
            import pandas as pd  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install 'tenantllm[pandas]'") from None
        return pd.DataFrame(self.to_dicts())


class GroupedQuery:
    """`query.group_by(field)`: aggregate per distinct value, as a dict."""

    def __init__(self, ops: tuple[Op, ...], field: str) -> None:
        self._ops = ops
        self._field = field

    def count(self) -> dict[str | None, int]:
        return engine().query_grouped(list(self._ops), self._field)

    def sum(self, field: str) -> dict[str | None, Any]:
        return engine().query_grouped(list(self._ops), self._field, field)
