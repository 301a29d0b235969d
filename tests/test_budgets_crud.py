"""`tl.TenantBudget`: create / find / get / find_or_create / all / update / delete, spending
read from the running counters, and validation that changes nothing on bad input."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import tenantllm as tl

Budget = tl.TenantBudget


class Small(tl.Agent):
    model = "mock/fast"
    user = "Say: {text}"
    max_tokens = 50


def spend(tenant: str, n: int) -> list[tl.AgentResult]:
    return [Small.call(text="word " * (i + 1), tenant=tenant) for i in range(n)]


# ---------------------------------------------------------------- CRUD


def test_create_and_read_back() -> None:
    b = Budget.create(
        tenant_id="t1",
        daily_limit=50,
        monthly_limit=500,
        daily_token_limit=500_000,
        monthly_token_limit=5_000_000,
        enforcement="hard",
    )
    assert b.tenant_id == "t1"
    assert b.daily_limit == Decimal(50) and type(b.daily_limit) is Decimal
    assert b.monthly_limit == Decimal(500)
    assert b.daily_token_limit == 500_000
    assert b.monthly_token_limit == 5_000_000
    assert b.daily_execution_limit is None
    assert b.enforcement == "hard"

    assert Budget.get("t1") == b
    assert Budget.find("t1") == b


def test_create_accepts_decimal_strings_exactly() -> None:
    b = Budget.create("t1", daily_limit="12.345678901", monthly_limit=Decimal("0.10"), name="Acme")
    assert b.daily_limit == Decimal("12.345678901")
    assert Budget.get("t1").monthly_limit == Decimal("0.10")
    assert Budget.get("t1").name == "Acme"


def test_defaults() -> None:
    b = Budget.create("t1")
    assert b.enforcement == "hard"
    assert b.daily_limit is None and b.monthly_limit is None
    assert b.daily_token_limit is None and b.monthly_token_limit is None


def test_find_and_get_missing() -> None:
    assert Budget.find("nobody") is None
    with pytest.raises(KeyError, match="nobody"):
        Budget.get("nobody")


def test_find_or_create_creates_once_and_returns_existing_unchanged() -> None:
    created = Budget.find_or_create("t1", daily_limit=25, monthly_limit=250, enforcement="hard")
    assert created.daily_limit == Decimal(25)
    again = Budget.find_or_create("t1", daily_limit=99, monthly_limit=999, enforcement="soft")
    assert again == created
    assert Budget.get("t1").daily_limit == Decimal(25)
    assert Budget.get("t1").enforcement == "hard"
    assert len(Budget.all()) == 1


def test_find_or_create_with_bad_defaults_raises() -> None:
    with pytest.raises(tl.ConfigurationError, match="daily_limit"):
        Budget.find_or_create("t1", daily_limit=-5)
    assert Budget.all() == []


def test_all() -> None:
    assert Budget.all() == []
    Budget.create("a", daily_limit=1)
    Budget.create("b", monthly_limit=2)
    Budget.create("c", enforcement="soft")
    assert sorted(b.tenant_id for b in Budget.all()) == ["a", "b", "c"]
    assert all(isinstance(b, Budget) for b in Budget.all())


def test_update() -> None:
    b = Budget.create("t1", daily_limit=50, monthly_limit=500)
    returned = b.update(daily_limit=Decimal("75.5"), enforcement="soft")
    assert returned is b
    assert b.daily_limit == Decimal("75.5")
    assert b.monthly_limit == Decimal(500)  # untouched fields are kept
    stored = Budget.get("t1")
    assert stored.daily_limit == Decimal("75.5")
    assert stored.monthly_limit == Decimal(500)
    assert stored.enforcement == "soft"


def test_update_can_clear_a_limit() -> None:
    b = Budget.create("t1", daily_limit=50, monthly_limit=500)
    b.update(daily_limit=None)
    assert Budget.get("t1").daily_limit is None
    assert Budget.get("t1").monthly_limit == Decimal(500)


def test_delete() -> None:
    b = Budget.create("t1", daily_limit=50)
    Budget.create("t2", daily_limit=60)
    assert b.delete() is True
    assert Budget.find("t1") is None
    assert b.delete() is False
    assert [x.tenant_id for x in Budget.all()] == ["t2"]


def test_create_twice_is_a_configuration_error() -> None:
    Budget.create("t1", daily_limit=50)
    with pytest.raises(tl.ConfigurationError, match="t1"):
        Budget.create("t1", daily_limit=10)
    assert Budget.get("t1").daily_limit == Decimal(50)
    assert len(Budget.all()) == 1


def test_budgets_persist_across_configure(configure: Any) -> None:
    Budget.create("t1", daily_limit=50)
    configure(store_prompts=False)
    assert Budget.get("t1").daily_limit == Decimal(50)


# ---------------------------------------------------------------- spending


def test_spending_equals_sum_of_results() -> None:
    b = Budget.create("t1", daily_limit=1, monthly_limit=10)
    results = spend("t1", 5)
    spend("other", 2)  # another tenant's calls are not counted
    Small.call(text="no tenant")

    cost = sum((r.total_cost for r in results), Decimal(0))
    tokens = sum(r.total_tokens for r in results)
    assert b.current_daily_spending == cost
    assert type(b.current_daily_spending) is Decimal
    assert b.current_monthly_spending == cost
    assert b.current_daily_tokens == tokens
    assert b.current_monthly_tokens == tokens
    assert b.daily_remaining == Decimal(1) - cost
    assert b.monthly_remaining == Decimal(10) - cost


def test_spending_without_calls_is_zero() -> None:
    b = Budget.create("t1", daily_limit=1)
    assert b.current_daily_spending == 0
    assert b.current_daily_tokens == 0
    assert b.daily_remaining == Decimal(1)


def test_spending_counts_calls_made_before_the_budget_existed() -> None:
    results = spend("t1", 3)
    b = Budget.create("t1", daily_limit=1)
    assert b.current_daily_spending == sum((r.total_cost for r in results), Decimal(0))


def test_failed_calls_cost_nothing(configure: Any) -> None:
    b = Budget.create("t1", daily_limit=1)
    ok = spend("t1", 2)
    configure(mock={"failure_rate": 1.0})
    with pytest.raises(tl.ProviderError):
        Small.call(text="fails", tenant="t1")
    assert b.current_daily_spending == sum((r.total_cost for r in ok), Decimal(0))


def test_remaining_is_none_without_a_limit() -> None:
    b = Budget.create("t1")
    spend("t1", 1)
    assert b.daily_remaining is None
    assert b.monthly_remaining is None


def test_effective_token_limits_inherit_global(configure: Any) -> None:
    configure(budgets={"global_daily_tokens": 123_456, "global_monthly_tokens": 9_999_999, "global_daily": 40})
    inherits = Budget.create("inherits", daily_limit=1)
    own = Budget.create("own", daily_token_limit=777)

    assert inherits.effective_daily_token_limit == 123_456
    assert inherits.effective_monthly_token_limit == 9_999_999
    assert own.effective_daily_token_limit == 777
    assert own.effective_monthly_token_limit == 9_999_999
    assert own.effective_daily_limit == Decimal(40)
    assert inherits.effective_daily_limit == Decimal(1)

    configure()  # no global limits any more
    assert inherits.effective_daily_token_limit is None
    assert own.effective_daily_token_limit == 777


def test_daily_remaining_uses_the_inherited_limit(configure: Any) -> None:
    configure(budgets={"global_daily": 2})
    b = Budget.create("t1", monthly_limit=100)
    results = spend("t1", 2)
    assert b.daily_remaining == Decimal(2) - sum((r.total_cost for r in results), Decimal(0))


# ---------------------------------------------------------------- bad input


BAD_FIELDS = [
    ({"daily_limit": -1}, "daily_limit"),
    ({"daily_limit": float("nan")}, "daily_limit"),
    ({"monthly_limit": float("inf")}, "monthly_limit"),
    ({"daily_limit": "abc"}, "daily_limit"),
    ({"daily_limit": True}, "daily_limit"),
    ({"daily_limit": [1]}, "daily_limit"),
    ({"daily_token_limit": -3}, "daily_token_limit"),
    ({"daily_token_limit": 1.5}, "daily_token_limit"),
    ({"monthly_token_limit": "100"}, "monthly_token_limit"),
    ({"daily_execution_limit": False}, "daily_execution_limit"),
    ({"enforcement": "medium"}, "medium"),
    ({"enforcement": None, "colour": "red"}, "colour"),
    ({"name": 5}, "name"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_FIELDS)
def test_create_with_bad_field_stores_nothing(fields: dict[str, Any], named: str) -> None:
    Budget.create("existing", daily_limit=5)
    before = Budget.all()
    with pytest.raises(tl.ConfigurationError, match=named):
        Budget.create("t1", **fields)
    assert Budget.all() == before
    assert Budget.find("t1") is None


@pytest.mark.parametrize("tenant_id", ["", "   ", 123, None, "a\nb", "x" * 300], ids=repr)
def test_create_with_bad_tenant_id_stores_nothing(tenant_id: Any) -> None:
    with pytest.raises(tl.InvalidTenantError, match="tenant_id"):
        Budget.create(tenant_id, daily_limit=5)
    assert Budget.all() == []


@pytest.mark.parametrize(("fields", "named"), BAD_FIELDS)
def test_failed_update_changes_nothing(fields: dict[str, Any], named: str) -> None:
    b = Budget.create("t1", daily_limit=50, monthly_limit=500, daily_token_limit=1000, enforcement="hard")
    stored = Budget.get("t1")
    with pytest.raises(tl.ConfigurationError, match=named):
        b.update(**fields)
    assert Budget.get("t1") == stored
    assert b == stored  # the object itself was not changed either


def test_update_cannot_change_the_tenant_id() -> None:
    b = Budget.create("t1", daily_limit=50)
    with pytest.raises(tl.ConfigurationError, match="tenant_id"):
        b.update(tenant_id="t2")
    assert Budget.find("t2") is None
    assert Budget.get("t1").daily_limit == Decimal(50)
