"""`Execution`: one row per call, and chainable queries over them (built into SQL by the core
from a fixed list of fields)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from tenantllm._core import ConfigurationError, InvalidTenantError
from tenantllm._html import html_table
from tenantllm.config import engine, settings
from tenantllm.tenancy import resolve

Op = tuple[Any, ...]


def _utc(t: Any) -> Any:
    """Datetimes to UTC for the core (which checks everything else)."""
    if isinstance(t, datetime):
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t


def _check_sum_field(field: Any) -> None:
    """The core takes no field for a count: a None here must not become one."""
    if not isinstance(field, str):
        raise ConfigurationError(f"sum field must be a string such as 'total_cost', got {type(field).__name__}")


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
    # Streams only: milliseconds from the call's start to its first piece of text.
    time_to_first_token_ms: int | None
    # Answered from the response cache (`cache_ttl`): no provider request, cost 0.
    cached: bool
    # From the details table; filled by `Execution.get` only.
    system_prompt: str | None = None
    user_prompt: str | None = None
    response: str | None = None
    # A tool loop's round: the calls made before it (name, arguments, result or error, duration_ms).
    tool_calls: list[dict[str, Any]] | None = None

    @classmethod
    def _from_row(cls, row: dict[str, Any]) -> Execution:
        if isinstance(row.get("tool_calls"), str):
            row = {**row, "tool_calls": json.loads(row["tool_calls"])}
        return cls(**row)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __repr__(self) -> str:
        tenant = f" tenant={self.tenant_id}" if self.tenant_id else ""
        error = f" {self.error_class}" if self.error_class else ""
        return (
            f"<Execution {self.id[:8]} {self.agent} {self.chosen_model_id or self.model_id}{tenant} "
            f"{self.status}{error} {self.total_tokens} tokens ${self.total_cost} "
            f"{self.started_at:%Y-%m-%d %H:%M:%S}Z>"
        )

    def _repr_html_(self) -> str:
        """A notebook's view: one row of the main fields."""
        return html_table(_SUMMARY, [[getattr(self, f) for f in _SUMMARY]])

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


# The columns a notebook shows for executions.
_SUMMARY = ("started_at", "agent", "model_id", "tenant_id", "status", "total_tokens", "total_cost", "duration_ms")
# Columns of `to_pandas()`: every field but the details only `Execution.get` fills.
_DETAILS = ("system_prompt", "user_prompt", "response", "tool_calls")
_COLUMNS = tuple(f.name for f in dataclasses.fields(Execution) if f.name not in _DETAILS)
_MONEY = ("input_cost", "output_cost", "total_cost", "cache_read_cost", "cache_write_cost")
_TIMES = ("started_at", "completed_at")
_TEXTS = ("id", "agent", "model_id", "chosen_model_id", "provider", "tenant_id", "status", "error_class",
          "error_message", "finish_reason", "parent_execution_id", "root_execution_id")  # fmt: skip
_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "total_tokens", "attempts_count", "cache_write_tokens")
# Rows shown by a query's notebook view.
_HTML_ROWS = 20


class ExecutionQuery:
    """An immutable, chainable query; nothing runs until a terminal method (count, sum,
    iteration, first, to_dicts, to_pandas) is called.

    Statuses: `successful()` is `success`; `failed()` is `error` and `timeout` (the provider or
    the call failed); a call refused before any request is neither: `blocked` (a budget),
    `short_circuited` (an open breaker), `rate_limited`; and `cancelled` (the caller gave up)."""

    def __init__(self, ops: tuple[Op, ...] = ()) -> None:
        self._ops = ops

    def _and(self, *op: Any) -> ExecutionQuery:
        return ExecutionQuery((*self._ops, op))

    def __repr__(self) -> str:
        return f"ExecutionQuery({list(self._ops)!r})"

    def _repr_html_(self) -> str:
        """A notebook's view: the count and the first rows (runs the query)."""
        total = self.count()
        shown = list(self.limit(_HTML_ROWS)) if total else []
        note = f"{total} execution(s)" + (f", first {len(shown)} shown" if total > len(shown) else "")
        return html_table(_SUMMARY, [[getattr(e, f) for f in _SUMMARY] for e in shown], note)

    def _is_empty(self) -> bool:
        """`limit(0)` was applied: no rows, whatever the filters (the core takes limits >= 1)."""
        return ("limit", 0) in self._ops

    def _core_ops(self) -> list[Op]:
        return [op for op in self._ops if op != ("limit", 0)]

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

    def where(self, field: str, value: str | int | bool) -> ExecutionQuery:
        """Rows whose `field` equals `value`: `where("cached", True)` for answers from the
        response cache."""
        return self._and("eq", field, int(value) if isinstance(value, bool) else value)

    def successful(self) -> ExecutionQuery:
        return self.by_status("success")

    def failed(self) -> ExecutionQuery:
        """`error` and `timeout` rows; not `blocked`, `short_circuited`, `rate_limited` (refused
        before a request) nor `cancelled`."""
        return self._and("in", "status", ["error", "timeout"])

    def all(self) -> ExecutionQuery:
        """This query (as `Execution.all()` starts one): `Execution.today().all()`."""
        return self

    def order_by(self, *fields: str) -> ExecutionQuery:
        """`order_by("-total_cost", "started_at")`: a leading '-' sorts descending."""
        q = self
        for f in fields:
            if not isinstance(f, str):
                raise ConfigurationError(f"order_by field must be a string, got {type(f).__name__}")
            q = q._and("order", f.removeprefix("-"), f.startswith("-"))
        return q

    def limit(self, n: int) -> ExecutionQuery:
        """At most n rows (n >= 0; `limit(0)` is an empty result)."""
        if n == 0 and not isinstance(n, bool):
            return ExecutionQuery((*self._ops, ("limit", 0)))
        return self._and("limit", n)

    def offset(self, n: int) -> ExecutionQuery:
        return self._and("offset", n)

    def group_by(self, *fields: str) -> GroupedQuery:
        """Totals per value of a field (`group_by("tenant_id")`: keys are tenant ids), of several
        (`group_by("tenant_id", "model_id")`: keys are tuples), or per calendar day, week or
        month in the database's timezone (`"day"`, `"week"`, `"month"`: keys are
        `datetime.date`s, a week's Monday and a month's first day). Over tenant_id, agent,
        model_id, status and time buckets, with whole days or no time filter, the answer comes
        from the daily rollups, which keep the totals of purged executions."""
        if not fields:
            raise ConfigurationError("group_by needs at least one field, such as 'tenant_id' or 'day'")
        return GroupedQuery(self._ops, fields)

    # ---- terminal
    def count(self) -> int:
        n: int = engine().query_aggregate(self._core_ops())
        return 0 if self._is_empty() else n

    def sum(self, field: str) -> Decimal | int:
        _check_sum_field(field)
        total: Decimal | int = engine().query_aggregate(self._core_ops(), field)  # also checks the field
        return type(total)(0) if self._is_empty() else total

    def to_dicts(self) -> list[dict[str, Any]]:
        return [] if self._is_empty() else engine().query_rows(self._core_ops())

    def __iter__(self) -> Iterator[Execution]:
        return (Execution._from_row(r) for r in self.to_dicts())

    def first(self) -> Execution | None:
        q = self if any(op[0] == "order" for op in self._ops) else self.order_by("started_at")
        return next(iter(q.limit(1)), None)

    def to_pandas(self, *, money: str = "decimal", local_times: bool = False) -> Any:
        """A pandas DataFrame of the rows (needs `pip install tenantllm[pandas]`), with the
        same columns and dtypes when empty. `money="float"` gives float64 cost columns for
        `describe()` and plots (the default keeps exact `Decimal`s); `local_times=True` shows
        times in the database's timezone instead of UTC."""
        if money not in ("decimal", "float"):
            raise ConfigurationError(f'to_pandas: money must be "decimal" or "float", got {money!r}')
        if not isinstance(local_times, bool):
            raise ConfigurationError(f"to_pandas: local_times must be True or False, got {local_times!r}")
        try:
            import pandas as pd  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install 'tenantllm[pandas]'") from None
        frame = pd.DataFrame(self.to_dicts(), columns=list(_COLUMNS))
        text = pd.Series(["", None]).dtype  # what this pandas infers for text (object, or str in pandas 3)
        for c in _TEXTS:
            frame[c] = frame[c].astype(text)
        for c in _TIMES:
            frame[c] = pd.to_datetime(frame[c], utc=True).astype("datetime64[us, UTC]")  # the stored precision
            if local_times:
                frame[c] = frame[c].dt.tz_convert(engine().timezone)
        for c in _COUNTS:
            frame[c] = frame[c].astype("int64")
        frame["duration_ms"] = frame["duration_ms"].astype("Int64")  # None while running
        frame["cached"] = frame["cached"].astype("bool")
        for c in _MONEY:
            frame[c] = frame[c].astype("float64") if money == "float" else frame[c].astype(object)
        return frame


# Weeks and months are folded from the core's days: counts and sums of days add up exactly.
_BUCKETS = {"week": lambda d: d - timedelta(days=d.weekday()), "month": lambda d: d.replace(day=1)}


class GroupedQuery:
    """`query.group_by(*fields)`: an aggregate per distinct value (or tuple of values), as a
    dict sorted by key, None first."""

    def __init__(self, ops: tuple[Op, ...], fields: tuple[str, ...]) -> None:
        self._ops = ops
        self._fields = fields
        for f in fields:
            if not isinstance(f, str):
                raise ConfigurationError(f"group_by field must be a string such as 'tenant_id', got {type(f).__name__}")
        days = ["day" if f in _BUCKETS else f for f in fields]
        if len(set(days)) < len(days) and any(f in _BUCKETS for f in fields):
            raise ConfigurationError(f"group_by: {', '.join(fields)} name more than one time bucket")
        # One field: the dict's keys are its values; several: tuples.
        self._by: str | list[str] = days[0] if len(days) == 1 else days

    def count(self) -> dict[Any, int]:
        return self._grouped()

    def sum(self, field: str) -> dict[Any, Any]:
        _check_sum_field(field)
        return self._grouped(field)

    def _grouped(self, *field: str) -> dict[Any, Any]:
        if ("limit", 0) in self._ops:
            return {}
        days: dict[Any, Any] = engine().query_grouped(list(self._ops), self._by, *field)
        if not any(f in _BUCKETS for f in self._fields):
            return days
        folded: dict[Any, Any] = {}
        for key, total in days.items():
            parts = [
                _BUCKETS[f](v) if f in _BUCKETS else v
                for f, v in zip(self._fields, key if isinstance(key, tuple) else (key,), strict=True)
            ]
            k = tuple(parts) if len(parts) > 1 else parts[0]
            folded[k] = folded[k] + total if k in folded else total
        return dict(sorted(folded.items(), key=lambda kv: _none_first(kv[0])))


def _none_first(key: Any) -> tuple[Any, ...]:
    """The core's order of group keys: by value, None before any value."""
    parts = key if isinstance(key, tuple) else (key,)
    return tuple((p is not None, p) for p in parts)
