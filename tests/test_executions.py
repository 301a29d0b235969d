"""Execution rows and the chainable query API of DESIGN §1."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import raw_sql
import tenantllm as tl
from fake_providers import FakeProvider, Step

STATUSES = ("running", "success", "error", "timeout", "blocked", "short_circuited", "cancelled")
INJECTION = "total_cost; DROP TABLE executions"


class Support(tl.Agent):
    model = "mock/fast"
    system = "You help customers of {company}."
    user = "Question: {query}"
    max_tokens = 200


class Plain(tl.Agent):
    model = "mock/fast"
    user = "Say: {text}"
    max_tokens = 100


class Slow(tl.Agent):
    model = "mock/slow"
    user = "Think about: {text}"
    max_tokens = 100


@dataclass
class Data:
    results: list[tl.AgentResult]  # successful calls, in call order
    error_tenant: str
    mid: datetime  # between the first batch and the rest
    start: datetime
    end: datetime

    @property
    def total(self) -> int:
        return len(self.results) + 1  # plus the failed call


def populate(configure: Any) -> Data:
    """8 executions: 7 successes (3 Support/t1, 2 Plain/t2, 1 Slow/t1, 1 Plain/no tenant) and
    one Plain/t2 error."""
    start = datetime.now(UTC)
    results = [Support.call(query="q" * (i + 1) * 10, company="Acme", tenant="t1") for i in range(3)]
    time.sleep(0.02)
    mid = datetime.now(UTC)
    time.sleep(0.02)
    results += [Plain.call(text=f"hello {i}", tenant="t2") for i in range(2)]
    results.append(Slow.call(text="the meaning of life", tenant="t1"))
    results.append(Plain.call(text="nobody's call"))
    configure(mock={"failure_rate": 1.0})
    with pytest.raises(tl.ProviderError):
        Plain.call(text="this one fails", tenant="t2")
    configure()
    end = datetime.now(UTC)
    return Data(results=results, error_tenant="t2", mid=mid, start=start, end=end)


@pytest.fixture
def data(configure: Any) -> Data:
    return populate(configure)


def ids(q: tl.ExecutionQuery) -> set[str]:
    return {e.id for e in q}


# ---------------------------------------------------------------- scopes


def test_count_all(data: Data) -> None:
    assert tl.Execution.all().count() == data.total == 8


def test_by_tenant(data: Data) -> None:
    q = tl.Execution.by_tenant("t1")
    assert q.count() == 4
    assert ids(q) == {r.execution_id for r in data.results if r.tenant_id == "t1"}
    assert tl.Execution.by_tenant("t2").count() == 3
    assert tl.Execution.by_tenant("nobody").count() == 0


def test_for_current_tenant(data: Data) -> None:
    with tl.tenant("t2"):
        assert tl.Execution.for_current_tenant().count() == 3
    with tl.tenant("t1"):
        assert tl.Execution.for_current_tenant().successful().count() == 4


def test_for_current_tenant_uses_the_resolver(data: Data, configure: Any) -> None:
    configure(tenant_resolver=lambda: "t1")
    assert tl.Execution.for_current_tenant().count() == 4


def test_for_current_tenant_without_a_tenant(data: Data) -> None:
    with pytest.raises(tl.InvalidTenantError):
        tl.Execution.for_current_tenant()


def test_with_and_without_tenant(data: Data) -> None:
    assert tl.Execution.with_tenant().count() == 7
    without = list(tl.Execution.without_tenant())
    assert [e.id for e in without] == [data.results[-1].execution_id]
    assert without[0].tenant_id is None


def test_calendar_scopes(data: Data) -> None:
    for q in (
        tl.Execution.today(),
        tl.Execution.this_week(),
        tl.Execution.this_month(),
        tl.Execution.last_n_days(7),
        tl.Execution.last_n_days(1),
    ):
        assert q.count() == data.total, q


def test_calendar_scopes_follow_the_database_timezone(data: Data) -> None:
    for tz in ("Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata"):
        tl.set_timezone(tz)
        assert tl.Execution.today().count() == data.total
        assert tl.Execution.last_n_days(30).count() == data.total


def test_last_n_days_must_be_positive(data: Data) -> None:
    with pytest.raises(tl.ConfigurationError, match="last_n_days"):
        tl.Execution.last_n_days(0).count()


def test_between(data: Data) -> None:
    assert tl.Execution.between(data.start, data.end).count() == data.total
    first_batch = {r.execution_id for r in data.results[:3]}
    assert ids(tl.Execution.between(data.start, data.mid)) == first_batch
    assert tl.Execution.between(data.mid, data.end).count() == data.total - 3
    assert tl.Execution.between(data.mid, None).count() == data.total - 3
    assert ids(tl.Execution.between(None, data.mid)) == first_batch
    # start <= started_at < end: an empty window and a window in the past
    assert tl.Execution.between(data.mid, data.mid).count() == 0
    assert tl.Execution.between(data.start - timedelta(days=2), data.start - timedelta(days=1)).count() == 0


def test_between_with_naive_datetimes_and_dates(data: Data) -> None:
    # Naive datetimes are UTC; a date is its UTC midnight.
    naive_mid = data.mid.replace(tzinfo=None)
    assert tl.Execution.between(naive_mid, None).count() == data.total - 3
    assert tl.Execution.between(None, naive_mid).count() == 3
    today = data.start.date()
    assert tl.Execution.between(today, today + timedelta(days=1)).count() == data.total


@pytest.mark.parametrize("tz", ["Asia/Tokyo", "America/New_York", "UTC", "-05:00"])
def test_between_with_other_timezones(data: Data, tz: str) -> None:
    from zoneinfo import ZoneInfo

    zone = timezone(timedelta(hours=-5)) if tz == "-05:00" else ZoneInfo(tz)
    start, mid = data.start.astimezone(zone), data.mid.astimezone(zone)
    assert tl.Execution.between(start, mid).count() == 3
    assert tl.Execution.between(mid, None).count() == data.total - 3


def test_between_rejects_non_dates(data: Data) -> None:
    with pytest.raises(tl.ConfigurationError, match="start"):
        tl.Execution.between("yesterday", None).count()  # type: ignore[arg-type]


def test_by_agent_with_class_or_name(data: Data) -> None:
    assert tl.Execution.by_agent(Support).count() == 3
    assert tl.Execution.by_agent("Support").count() == 3
    assert tl.Execution.by_agent(Plain).count() == 4
    assert tl.Execution.by_agent("Nobody").count() == 0


def test_by_model(data: Data) -> None:
    assert tl.Execution.by_model("mock/slow").count() == 1
    assert tl.Execution.by_model("mock/fast").count() == 7


def test_by_status_successful_failed(data: Data) -> None:
    assert tl.Execution.by_status("success").count() == 7
    assert tl.Execution.successful().count() == 7
    assert tl.Execution.by_status("error").count() == 1
    [failed] = list(tl.Execution.failed())
    assert failed.status == "error"
    assert failed.tenant_id == data.error_tenant
    assert failed.error_class == "ProviderError"
    assert tl.Execution.by_status("blocked").count() == 0


def test_chaining(data: Data) -> None:
    assert tl.Execution.by_tenant("t1").by_agent(Support).successful().count() == 3
    assert tl.Execution.by_tenant("t2").by_agent("Plain").failed().count() == 1
    assert tl.Execution.today().by_tenant("t2").by_model("mock/fast").successful().count() == 2
    assert tl.Execution.by_tenant("t1").by_model("mock/slow").by_agent(Support).count() == 0
    assert tl.Execution.successful().failed().count() == 0


def test_queries_are_immutable(data: Data) -> None:
    base = tl.Execution.by_tenant("t1")
    narrowed = base.by_agent(Slow)
    assert base.count() == 4
    assert narrowed.count() == 1


# ---------------------------------------------------------------- aggregates


def test_group_by_tenant_sum_total_cost(data: Data) -> None:
    expected: dict[str | None, Decimal] = defaultdict(Decimal)
    for r in data.results:
        expected[r.tenant_id] += r.total_cost
    expected[data.error_tenant] += Decimal(0)  # the failed call cost nothing

    got = tl.Execution.all().group_by("tenant_id").sum("total_cost")
    assert got == dict(expected)
    assert all(type(v) is Decimal for v in got.values())


def test_group_by_agent_count(data: Data) -> None:
    assert tl.Execution.all().group_by("agent").count() == {"Support": 3, "Plain": 4, "Slow": 1}
    assert tl.Execution.successful().group_by("status").count() == {"success": 7}


def test_group_by_several_fields_and_by_day(data: Data) -> None:
    got = tl.Execution.all().group_by("tenant_id", "agent").count()
    # Sorted by key, no tenant first; tuples in the order the fields were named.
    assert list(got.items()) == [
        ((None, "Plain"), 1), (("t1", "Slow"), 1), (("t1", "Support"), 3), (("t2", "Plain"), 3)
    ]
    today = datetime.now(UTC).date()  # the test database's timezone is UTC
    assert tl.Execution.today().group_by("day").count() == {today: 8}
    assert tl.Execution.all().group_by("day", "status").count() == {(today, "error"): 1, (today, "success"): 7}
    by_day = tl.Execution.this_month().group_by("day").sum("total_cost")
    assert by_day == {today: sum((r.total_cost for r in data.results), Decimal(0))}
    assert all(type(k) is date for k in by_day)
    # A bound inside a day reads the rows; the answer has the same shape.
    tokens = tl.Execution.between(data.start, None).group_by("day", "tenant_id").sum("total_tokens")
    assert tokens == {
        (today, t): sum(r.total_tokens for r in data.results if r.tenant_id == t) for t in (None, "t1", "t2")
    }
    for bad in ((), ("tenant_id", "tenant_id"), ("week", "day"), ("month", "week"), ("fortnight",), ("total_cost",)):
        with pytest.raises(tl.ConfigurationError):
            tl.Execution.all().group_by(*bad).count()


def test_group_by_week_and_month_fold_the_days(data: Data, db_path: Path) -> None:
    """Rows moved to days in other weeks and months (rollups rebuilt from them): each week and
    month holds the sum of its days, keyed by its Monday and its first day."""
    ids = [r["id"] for r in tl.Execution.all().to_dicts()]
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=n) for n in (0, 1, 6, 7, 13, 31, 45, 400)]
    for execution_id, day in zip(ids, days, strict=True):
        noon = int(datetime.combine(day, datetime.min.time(), UTC).timestamp() + 12 * 3600) * 1_000_000  # µs
        # Ids sort like start times (UUIDv7: the first 48 bits are the start in ms), and a
        # range's rows are found by id: a moved row gets the id of its new time.
        ms = noon // 1000
        moved = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}{execution_id[13:]}"
        raw_sql.query(
            db_path,
            f"UPDATE executions SET id = '{moved}', started_at = {noon}, completed_at = {noon}"
            f" WHERE id = '{execution_id}'",
        )
        details = f"UPDATE execution_details SET execution_id = '{moved}' WHERE execution_id = '{execution_id}'"
        raw_sql.query(db_path, details)
    tl.rebuild_counters()
    rows = tl.Execution.all().to_dicts()
    assert sorted(r["started_at"].date() for r in rows) == sorted(days)

    def expect(bucket: Any, by_tenant: bool = False) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for r in rows:
            k = (bucket(r["started_at"].date()), r["tenant_id"]) if by_tenant else bucket(r["started_at"].date())
            out[k] = out.get(k, Decimal(0)) + r["total_cost"]
        return out

    monday = lambda d: d - timedelta(days=d.weekday())  # noqa: E731
    first = lambda d: d.replace(day=1)  # noqa: E731
    assert tl.Execution.all().group_by("week").sum("total_cost") == expect(monday)
    assert tl.Execution.all().group_by("month").sum("total_cost") == expect(first)
    by_month = tl.Execution.all().group_by("month", "tenant_id").sum("total_cost")
    assert by_month == expect(first, by_tenant=True)
    assert list(by_month) == sorted(by_month, key=lambda k: (k[0], k[1] is not None, k[1] or ""))
    weeks = tl.Execution.all().group_by("week").count()
    assert sum(weeks.values()) == 8 and all(k.weekday() == 0 for k in weeks)
    # A bound inside a day reads the rest of that day from the rows; the folding is the same.
    since = datetime.combine(today - timedelta(days=13), datetime.min.time(), UTC) + timedelta(hours=1)
    recent = [r for r in rows if r["started_at"] >= since]
    got = tl.Execution.between(since, None).group_by("week").count()
    assert sum(got.values()) == len(recent) and set(got) == {monday(r["started_at"].date()) for r in recent}
    assert tl.Execution.all().limit(0).group_by("month").count() == {}
    assert tl.Execution.all().limit(0).group_by("tenant_id").sum("total_cost") == {}


def test_totals_over_whole_days_survive_purged_rows(data: Data, db_path: Path) -> None:
    """Daily rollups keep the totals of deleted executions (DESIGN §1b); rows-only queries
    see what is left."""
    whole_days = [
        lambda: tl.Execution.all().group_by("tenant_id").sum("total_cost"),
        lambda: tl.Execution.this_month().group_by("agent", "status").count(),
        lambda: tl.Execution.today().failed().count(),
        lambda: tl.Execution.last_n_days(7).by_tenant("t1").sum("total_tokens"),
    ]
    before = [f() for f in whole_days]
    raw_sql.query(db_path, "DELETE FROM executions")
    assert [f() for f in whole_days] == before
    assert tl.Execution.all().to_dicts() == []
    assert tl.Execution.between(data.start, None).count() == 0
    tl.rebuild_counters()  # no rows left: the rollups stay
    assert [f() for f in whole_days] == before


def test_count_and_sum(data: Data) -> None:
    assert tl.Execution.all().count() == 8
    assert tl.Execution.all().sum("total_tokens") == sum(r.total_tokens for r in data.results)
    total = tl.Execution.all().sum("total_cost")
    assert type(total) is Decimal
    assert total == sum((r.total_cost for r in data.results), Decimal(0))
    assert tl.Execution.by_tenant("t1").sum("input_cost") == sum(
        (r.input_cost for r in data.results if r.tenant_id == "t1"), Decimal(0)
    )


# 17 significant digits: a float keeps 15 to 17, so any float on the way loses the last ones.
WIDE = Decimal("98765432.123456789")


def test_amounts_past_float_precision_stay_exact(configure: Any) -> None:
    """Limits, prices, costs and sums with 17+ significant digits, end to end."""

    class Big(tl.Agent):
        model = "openai/big-model"
        user = "{q}"
        max_tokens = 1

    rich = 3 * WIDE  # 296296296.370370367
    with FakeProvider() as fp:
        # 1M input tokens at WIDE USD per 1M tokens: each call costs exactly WIDE.
        fp.default = Step(input_tokens=1_000_000, output_tokens=0)
        configure(base_urls={"openai": fp.base_url + "/v1"}, api_keys={"openai": "sk-test"},
                  pricing={"big-model": {"input": str(WIDE), "output": "0"}})
        tl.TenantBudget.create("rich", daily_limit=4 * WIDE, monthly_limit="987654321.987654321")
        results = [Big.call(q=f"call {i}", tenant="rich") for i in range(3)] + [Big.call(q="untenanted")]
        # Just one nano-dollar left: the next call's estimate does not fit.
        tl.TenantBudget.get("rich").update(daily_limit=rich + Decimal("0.000000001"))
        with pytest.raises(tl.BudgetExceededError) as info:
            Big.call(q="one too many", tenant="rich")
    assert (info.value.current, info.value.limit) == (rich, Decimal("296296296.370370368"))
    assert all((r.input_cost, r.output_cost, r.total_cost) == (WIDE, 0, WIDE) for r in results)
    assert tl.Execution.by_tenant("rich").sum("total_cost") == rich
    assert tl.Execution.successful().sum("input_cost") == 4 * WIDE
    assert tl.Execution.successful().group_by("tenant_id").sum("total_cost") == {"rich": rich, None: WIDE}
    assert [e["total_cost"] for e in tl.Execution.successful().by_tenant("rich").to_dicts()] == [WIDE] * 3
    assert tl.spend_by_tenant("daily")["rich"]["cost"] == rich
    b = tl.TenantBudget.get("rich")
    assert (b.daily_limit, b.monthly_limit) == (Decimal("296296296.370370368"), Decimal("987654321.987654321"))
    assert (b.current_daily_spending, b.daily_remaining) == (rich, Decimal("0.000000001"))
    assert b.monthly_remaining == Decimal("987654321.987654321") - rich


def test_sum_of_nothing_is_zero(data: Data) -> None:
    assert tl.Execution.by_tenant("nobody").sum("total_cost") == 0
    assert tl.Execution.by_tenant("nobody").sum("total_tokens") == 0
    assert tl.Execution.by_tenant("nobody").group_by("agent").count() == {}


def test_order_by_and_limit(data: Data) -> None:
    top = list(tl.Execution.all().order_by("-total_cost").limit(2))
    assert len(top) == 2
    costs = sorted((r.total_cost for r in data.results), reverse=True)
    assert [e.total_cost for e in top] == costs[:2]

    cheapest = list(tl.Execution.successful().order_by("total_cost").limit(1))
    assert cheapest[0].total_cost == min(r.total_cost for r in data.results)


def test_order_by_several_fields_and_offset(data: Data) -> None:
    q = tl.Execution.all().order_by("agent", "-started_at")
    agents = [e.agent for e in q]
    assert agents == sorted(agents)
    plain = [e for e in q if e.agent == "Plain"]
    assert [e.started_at for e in plain] == sorted((e.started_at for e in plain), reverse=True)
    assert [e.id for e in q.offset(2).limit(3)] == [e.id for e in q][2:5]


def test_first(data: Data) -> None:
    first = tl.Execution.all().first()
    assert first is not None
    assert first.id == data.results[0].execution_id
    latest = tl.Execution.all().order_by("-started_at").first()
    assert latest is not None and latest.status == "error"
    assert tl.Execution.by_tenant("nobody").first() is None


def test_iteration_yields_executions(data: Data) -> None:
    items = list(tl.Execution.all())
    assert len(items) == 8
    for e in items:
        assert isinstance(e, tl.Execution)
        assert type(e.total_cost) is Decimal
        assert e.started_at.tzinfo is not None
        assert e.status in STATUSES
        assert isinstance(e.attempts, list)
        assert isinstance(e.metadata, dict)


def test_get_has_prompts_and_response(data: Data) -> None:
    r = data.results[0]
    e = tl.Execution.get(r.execution_id)
    assert isinstance(e, tl.Execution)
    assert e.system_prompt == "You help customers of Acme."
    assert e.user_prompt == "Question: " + "q" * 10
    assert e.response == r.content
    assert e.total_cost == r.total_cost


def test_get_of_a_failed_call(data: Data) -> None:
    [failed] = list(tl.Execution.failed())
    e = tl.Execution.get(failed.id)
    assert e.user_prompt == "Say: this one fails"
    assert e.response is None


def test_get_unknown_id_is_a_key_error(data: Data) -> None:
    with pytest.raises(KeyError):
        tl.Execution.get("00000000-0000-7000-8000-000000000000")
    with pytest.raises(KeyError):
        tl.Execution.get("'; DROP TABLE executions; --")
    assert tl.Execution.all().count() == 8


def test_to_dicts(data: Data) -> None:
    dicts = tl.Execution.by_tenant("t1").to_dicts()
    assert len(dicts) == 4
    for d in dicts:
        assert d["tenant_id"] == "t1"
        assert type(d["total_cost"]) is Decimal
        assert {"id", "agent", "model_id", "status", "started_at", "total_tokens", "metadata"} <= set(d)
    assert {d["id"] for d in dicts} == ids(tl.Execution.by_tenant("t1"))


def test_to_pandas(data: Data) -> None:
    pytest.importorskip("pandas")
    df = tl.Execution.all().to_pandas()
    assert len(df) == 8
    assert {"id", "tenant_id", "total_cost"} <= set(df.columns)
    assert sum(df["total_cost"], Decimal(0)) == tl.Execution.all().sum("total_cost")


# ---------------------------------------------------------------- bad fields


@pytest.mark.parametrize(
    "run",
    [
        lambda: tl.Execution.all().order_by(INJECTION).count(),
        lambda: list(tl.Execution.all().order_by("-" + INJECTION)),
        lambda: tl.Execution.all().group_by(INJECTION).count(),
        lambda: tl.Execution.all().group_by("tenant_id").sum(INJECTION),
        lambda: tl.Execution.all().sum(INJECTION),
        lambda: tl.Execution.all().where(INJECTION, 1).count(),
        lambda: tl.Execution.all().where("no_such_field", "x").count(),
        lambda: tl.Execution.all().order_by("no_such_field").first(),
    ],
    ids=["order_by", "order_by_desc", "group_by", "grouped_sum", "sum", "where", "where_unknown", "order_unknown"],
)
def test_unknown_field_is_a_configuration_error(data: Data, run: Any) -> None:
    with pytest.raises(tl.ConfigurationError, match="unknown execution field"):
        run()
    # The table is intact and still usable.
    assert tl.Execution.all().count() == 8
    Plain.call(text="still works")
    assert tl.Execution.all().count() == 9


def test_wrong_kind_of_field(data: Data) -> None:
    with pytest.raises(tl.ConfigurationError, match="agent"):
        tl.Execution.all().sum("agent")
    with pytest.raises(tl.ConfigurationError, match="total_cost"):
        tl.Execution.all().group_by("total_cost").count()


def test_values_are_data_not_sql(data: Data) -> None:
    assert tl.Execution.by_tenant("t1' OR '1'='1").count() == 0
    assert tl.Execution.all().where("agent", "Plain' OR 1=1 --").count() == 0
    assert tl.Execution.all().count() == 8


def test_unknown_status_lists_valid_ones(data: Data) -> None:
    with pytest.raises(tl.ConfigurationError, match="nope") as info:
        tl.Execution.by_status("nope").count()
    for status in STATUSES:
        assert status in str(info.value)


@pytest.mark.parametrize("n", [-1, 2**63, True])
def test_bad_limit(data: Data, n: int) -> None:
    with pytest.raises(tl.ConfigurationError, match="limit"):
        tl.Execution.all().limit(n).count()  # (limit(0) is an empty result: test_notebook.py)


# ---------------------------------------------------------------- ids


def test_execution_ids_are_time_ordered() -> None:
    call_order = [Plain.call(text=f"call {i}").execution_id for i in range(30)]
    assert sorted(call_order) == call_order
    by_start = [e.id for e in tl.Execution.all().order_by("started_at")]
    assert by_start == sorted(by_start) == call_order
    assert [e.id for e in tl.Execution.all().order_by("-id")] == call_order[::-1]
