"""`tl.configure()`: validation, atomic changes of only the options named, pricing, the mock provider's settings and
the database option."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl

MILLION = Decimal(1_000_000)


class Echo(tl.Agent):
    model = "mock/fast"
    user = "Say: {text}"
    max_tokens = 100


class Priced(tl.Agent):
    model = "mock/priced"
    user = "Price this: {text}"
    max_tokens = 100


class Acme(tl.Agent):
    model = "acme-1"
    user = "Hello {text}"
    max_tokens = 100


class QuickRetry(tl.Agent):
    model = "mock/fast"
    user = "Say: {text}"
    max_tokens = 100
    retries = tl.Retries(max=2, backoff="constant", base=0.001, max_delay=0.001)


class ShortTimeout(tl.Agent):
    model = "mock/fast"
    user = "Say: {text}"
    max_tokens = 100
    timeout = 0.05


def rows() -> int:
    return tl.Execution.all().count()


# ---------------------------------------------------------------- options


def test_unknown_option_is_named(db_path: Path) -> None:
    with pytest.raises(tl.ConfigurationError, match="bogus_option"):
        tl.configure(database=str(db_path), bogus_option=1)


def test_hooks_must_be_callable(db_path: Path) -> None:
    with pytest.raises(tl.ConfigurationError, match="tenant_resolver"):
        tl.configure(database=str(db_path), tenant_resolver="acme")


def test_bad_timezone_is_named_and_previous_configuration_survives(configure: Any) -> None:
    configure(
        pricing={"mock/priced": {"input": "1.00", "output": "2.00"}},
        tenant_resolver=lambda: "kept",
    )
    before = Priced.call(text="hello")

    with pytest.raises(tl.ConfigurationError, match="Mars/Olympus") as info:
        configure(timezone="Mars/Olympus")
    assert "timezone" in str(info.value)

    after = Priced.call(text="hello")
    assert after.tenant_id == "kept"  # the old resolver is still installed
    assert after.total_cost == before.total_cost  # and the old pricing
    assert after.input_cost == after.input_tokens * Decimal("1.00") / MILLION
    assert rows() == 2  # and the old database


# ---------------------------------------------------------------- later calls


def test_a_later_configure_changes_only_the_options_it_names(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    alerts: list[dict[str, Any]] = []
    tl.configure(
        reset=True,
        database=str(db),
        timezone="Europe/Berlin",
        budgets={"global_daily_executions": 2, "enforcement": "hard"},
        tenant_resolver=lambda: "kept",
        on_alert=alerts.append,
    )
    Echo.call(text="one")
    tl.configure(pricing={"mock/priced": {"input": "1.00", "output": "2.00"}})

    engine = tl.config.engine()
    assert engine.database == str(db) or engine.database.startswith("postgres")
    assert engine.timezone == "Europe/Berlin"
    r = Priced.call(text="two")  # the new pricing applies...
    assert r.input_cost == r.input_tokens * Decimal("1.00") / MILLION
    assert r.tenant_id == "kept"  # ...and the resolver, budgets and alert hook stayed
    with pytest.raises(tl.BudgetExceededError):
        Echo.call(text="three")
    assert any(a["kind"] == "budget_threshold" for a in alerts)
    assert rows() == 3


def test_reset_starts_from_the_defaults(tmp_path: Path) -> None:
    tl.configure(reset=True, database=str(tmp_path / "a.db"), budgets={"global_daily_executions": 1},
                 tenant_resolver=lambda: "old")
    tl.configure(reset=True, database=str(tmp_path / "a.db"))
    r1, r2 = Echo.call(text="1"), Echo.call(text="2")  # no budget any more
    assert r1.tenant_id is None and r2.tenant_id is None


def test_an_option_named_none_goes_back_to_its_default(configure: Any) -> None:
    tl.configure(tenant_resolver=lambda: "t", budgets={"global_daily_executions": 1})
    tl.configure(tenant_resolver=None, budgets=None)
    assert Echo.call(text="1").tenant_id is None
    Echo.call(text="2")
    assert rows() == 2


def test_a_failed_later_configure_is_not_remembered(configure: Any) -> None:
    tl.configure(tenant_resolver=lambda: "kept")
    with pytest.raises(tl.ConfigurationError, match="global_daily"):
        tl.configure(budgets={"global_daily": -1})
    tl.configure(store_prompts=False)  # would fail if the bad budgets had been kept
    assert Echo.call(text="x").tenant_id == "kept"


def test_reset_must_be_a_bool(configure: Any) -> None:
    with pytest.raises(tl.ConfigurationError, match="reset"):
        tl.configure(reset="yes")
    assert Echo.call(text="x") is not None


def test_naming_another_timezone_than_the_database_is_refused(db_path: Path) -> None:
    with pytest.raises(tl.ConfigurationError) as info:
        tl.configure(timezone="Asia/Tokyo")
    msg = str(info.value)
    assert "Asia/Tokyo" in msg and "UTC" in msg and "timezone set" in msg
    assert tl.config.engine().timezone == "UTC"  # the old configuration stands
    Echo.call(text="x")
    assert rows() == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"timezone": "Not/AZone"},
        {"budgets": {"global_daily": -1}},
        {"mock": {"failure_rate": 2}},
        {"pricing": {"mock/x": {"input": "-1", "output": "1"}}},
        {"on_alert": 42},
        {"nonsense": True},
    ],
)
def test_failed_configure_leaves_the_old_engine(configure: Any, bad: dict[str, Any]) -> None:
    configure(tenant_resolver=lambda: "kept", mock={"latency_ms": 0})
    with pytest.raises(tl.ConfigurationError):
        configure(**bad)
    assert Echo.call(text="still here").tenant_id == "kept"
    assert rows() == 1


def test_a_new_database_takes_the_configured_timezone(tmp_path: Path) -> None:
    tl.configure(reset=True, database=str(tmp_path / "ny.db"), timezone="America/New_York")
    Echo.call(text="hi")
    assert tl.Execution.today().count() == 1
    assert tl.config.engine().timezone == "America/New_York"


# ---------------------------------------------------------------- budgets option


@pytest.mark.parametrize(
    ("budgets", "named"),
    [
        ({"global_daily": -1}, "global_daily"),
        ({"global_daily": float("nan")}, "global_daily"),
        ({"global_monthly": float("inf")}, "global_monthly"),
        ({"global_daily": "abc"}, "global_daily"),
        ({"global_daily": True}, "global_daily"),
        ({"global_daily": "NaN"}, "global_daily"),
        ({"global_daily_tokens": -5}, "global_daily_tokens"),
        ({"global_daily_tokens": 1.5}, "global_daily_tokens"),
        ({"per_agent_daily": {"Echo": -1}}, "Echo"),
        ({"per_agent_daily": 5}, "per_agent_daily"),
        ({"bogus": 1}, "bogus"),
        ({"enforcement": "medium"}, "medium"),
        ("lots", "budgets"),
    ],
)
def test_bad_budgets_are_rejected(configure: Any, budgets: Any, named: str) -> None:
    with pytest.raises(tl.ConfigurationError, match=named):
        configure(budgets=budgets)


def test_good_budgets_are_accepted(configure: Any) -> None:
    configure(
        budgets={
            "global_daily": Decimal("10"),
            "global_monthly": "200.50",
            "global_daily_tokens": 1_000_000,
            "global_monthly_tokens": None,
            "per_agent_daily": {"Echo": 5},
            "per_agent_monthly": {},
            "enforcement": "soft",
        }
    )
    assert Echo.call(text="hi").total_cost > 0


# ---------------------------------------------------------------- pricing


def test_pricing_override_changes_cost_exactly(configure: Any) -> None:
    default = Priced.call(text="hello world")  # a mock/* model has the mock price by default
    assert default.input_cost == default.input_tokens * Decimal("0.15") / MILLION

    configure(pricing={"mock/priced": {"input": "1.00", "output": "2.00"}})
    r = Priced.call(text="hello world")
    expected_in = r.input_tokens * Decimal("1.00") / MILLION
    expected_out = r.output_tokens * Decimal("2.00") / MILLION
    assert (r.input_cost, r.output_cost) == (expected_in, expected_out)
    assert r.total_cost == expected_in + expected_out
    assert type(r.total_cost) is Decimal

    row = tl.Execution.get(r.execution_id)
    assert row.total_cost == r.total_cost

    plan = Priced.call(text="hello world", dry_run=True)
    assert plan["models"][0]["input_price"] == Decimal("1.00")
    assert plan["models"][0]["output_price"] == Decimal("2.00")


def test_pricing_accepts_numbers_and_decimals(configure: Any) -> None:
    configure(pricing={"mock/priced": {"input": 3, "output": Decimal("4.5")}})
    r = Priced.call(text="hello")
    assert r.output_cost == r.output_tokens * Decimal("4.5") / MILLION


@pytest.mark.parametrize(
    ("pricing", "named"),
    [
        ({"mock/priced": {"input": "-1", "output": "2"}}, "input"),
        ({"mock/priced": {"input": "1", "output": "NaN"}}, "output"),
        ({"mock/priced": {"input": "1"}}, "output"),
        ({"mock/priced": {"input": "1", "output": "2", "extra": "3"}}, "extra"),
        ({"mock/priced": "1.00"}, "mock/priced"),
        ("cheap", "pricing"),
    ],
)
def test_bad_pricing_is_rejected(configure: Any, pricing: Any, named: str) -> None:
    with pytest.raises(tl.ConfigurationError, match=named):
        configure(pricing=pricing)


def test_priced_model_without_a_provider_cannot_be_routed(configure: Any) -> None:
    with pytest.raises(tl.ConfigurationError, match="provider"):
        Acme.call(text="x")

    configure(pricing={"acme-1": {"input": "1.00", "output": "2.00"}})  # pricing alone is accepted
    with pytest.raises(tl.ConfigurationError, match="provider") as info:
        Acme.call(text="x")
    assert "acme-1" in str(info.value)
    assert rows() == 0


# ---------------------------------------------------------------- mock provider


def test_mock_failure_rate_one_raises_provider_error_and_records_it(configure: Any) -> None:
    configure(mock={"failure_rate": 1.0})
    with pytest.raises(tl.ProviderError) as info:
        Echo.call(text="hi", tenant="acme")
    err = info.value
    assert err.provider == "mock"
    assert err.status == 503
    assert err.retryable is True
    assert isinstance(err, tl.TenantLLMError)

    [row] = list(tl.Execution.all())
    assert row.status == "error"
    assert row.tenant_id == "acme"
    assert row.error_class == "ProviderError"
    assert row.error_message
    assert row.total_cost == 0
    assert row.attempts_count == 1
    assert row.attempts[0]["http_status"] == 503


def test_mock_failures_are_retried(configure: Any) -> None:
    configure(mock={"failure_rate": 1.0})
    with pytest.raises(tl.ProviderError):
        QuickRetry.call(text="hi")
    [row] = list(tl.Execution.all())
    assert row.status == "error"
    assert row.attempts_count == 3


def test_mock_seeded_failures_repeat(configure: Any) -> None:
    def run() -> list[bool]:
        configure(mock={"failure_rate": 0.5, "seed": 7})
        out = []
        for _ in range(20):
            try:
                Echo.call(text="hi")
                out.append(True)
            except tl.ProviderError:
                out.append(False)
        return out

    first = run()
    assert first == run()
    assert True in first and False in first


def test_mock_latency(configure: Any) -> None:
    configure(mock={"latency_ms": 150})
    r = Echo.call(text="hi")
    assert r.duration_ms >= 150
    stored = tl.Execution.get(r.execution_id).duration_ms
    assert stored is not None and stored >= 150


def test_mock_latency_beyond_the_agent_timeout(configure: Any) -> None:
    configure(mock={"latency_ms": 1000})
    with pytest.raises(tl.ProviderTimeoutError):
        ShortTimeout.call(text="hi")
    [row] = list(tl.Execution.all())
    assert row.status == "timeout"


@pytest.mark.parametrize(
    ("mock", "named"),
    [
        ({"latency_ms": -1}, "latency_ms"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": "often"}, "failure_rate"),
        ({"speed": 1}, "speed"),
    ],
)
def test_bad_mock_settings(configure: Any, mock: dict[str, Any], named: str) -> None:
    with pytest.raises(tl.ConfigurationError, match=named):
        configure(mock=mock)


# ---------------------------------------------------------------- database


@pytest.mark.sqlite_only
def test_database_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_db = tmp_path / "from_env.db"
    monkeypatch.setenv("TENANTLLM_DATABASE", str(env_db))
    tl.configure()  # a database was named before (by the fixture): it stays
    assert rows() == 0 and not env_db.exists()
    tl.configure(reset=True)  # from the defaults: the environment's
    Echo.call(text="hi")
    assert env_db.exists()

    tl.configure(database=str(tmp_path / "t.db"))  # an explicit database wins over the env
    assert rows() == 0
    tl.configure(database=str(env_db))
    assert rows() == 1


@pytest.mark.sqlite_only
def test_sqlite_url_with_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tl.configure(database="sqlite:///relative.db")
    Echo.call(text="hi")
    assert (tmp_path / "relative.db").exists()
    assert not (tmp_path / "sqlite:").exists()

    tl.configure(database=str(tmp_path / "relative.db"))
    assert rows() == 1


@pytest.mark.sqlite_only
def test_sqlite_url_with_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "absolute.db"
    target.parent.mkdir()
    tl.configure(database=f"sqlite:///{target}")
    Echo.call(text="hi")
    assert target.exists()


def test_memory_database() -> None:
    tl.configure(database=":memory:")
    Echo.call(text="hi")
    Echo.call(text="again")
    assert rows() == 2


def test_database_is_shared_by_engines_on_the_same_file(configure: Any) -> None:
    Echo.call(text="one")
    configure(store_prompts=False)
    Echo.call(text="two")
    assert rows() == 2


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "content",
    [
        os.urandom(8192),
        b"SQLite format 3\x00" + b"\xff" * 8192,
        b"this is not a database\n" * 200,
    ],
    ids=["random", "bad-header", "text"],
)
def test_corrupt_database_is_a_store_error(configure: Any, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(content)
    with pytest.raises(tl.StoreError) as info:
        tl.configure(database=str(bad))
    message = str(info.value)
    assert "corrupt.db" in message
    assert "database" in message
    assert isinstance(info.value, tl.TenantLLMError)

    # The previous configuration still works.
    Echo.call(text="hi")
    assert rows() == 1


@pytest.mark.sqlite_only
def test_unopenable_database_is_a_store_error(tmp_path: Path) -> None:
    missing_dir = tmp_path / "no" / "such" / "dir" / "x.db"
    with pytest.raises(tl.StoreError, match=r"x\.db"):
        tl.configure(database=str(missing_dir))


@pytest.mark.sqlite_only
@pytest.mark.parametrize("database", ["", "   ", 42])
def test_bad_database_option(database: Any) -> None:
    with pytest.raises(tl.ConfigurationError, match="database"):
        tl.configure(database=database)
