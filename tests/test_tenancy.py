"""Which tenant a call runs for: explicit `tenant=`, `with tl.tenant(...)`, the configured
resolvers, and rejection of bad tenants."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
import tenantllm as tl


class Echo(tl.Agent):
    model = "mock/fast"
    user = "Say: {text}"
    max_tokens = 100


def rows() -> int:
    return tl.Execution.all().count()


def stored_tenant(r: tl.AgentResult) -> str | None:
    return tl.Execution.get(r.execution_id).tenant_id


# ---------------------------------------------------------------- explicit tenants


def test_tenant_id_string() -> None:
    r = Echo.call(text="hi", tenant="acme_corp")
    assert r.tenant_id == "acme_corp"
    assert stored_tenant(r) == "acme_corp"


def test_tenant_dict_with_limits() -> None:
    r = Echo.call(text="hi", tenant={"id": "acme_corp", "daily_limit": 100})
    assert r.tenant_id == "acme_corp"
    assert stored_tenant(r) == "acme_corp"
    plan = Echo.call(text="hi", tenant={"id": "acme_corp", "daily_limit": 100}, dry_run=True)
    assert plan["tenant_id"] == "acme_corp"
    assert plan["tenant_limits"] == {"daily_limit": 100}


def test_tenant_dict_limits_are_enforced() -> None:
    with pytest.raises(tl.BudgetExceededError) as info:
        Echo.call(text="hi", tenant={"id": "tiny", "daily_limit": Decimal("0.0000001")})
    err = info.value
    assert err.tenant_id == "tiny"
    assert err.scope == "tenant_daily"
    assert err.tenant_budget is True
    [row] = list(tl.Execution.all())
    assert row.status == "blocked"
    assert row.tenant_id == "tiny"


async def test_acall_with_tenant_dict() -> None:
    r = await Echo.acall(text="hi", tenant={"id": "acme_corp", "daily_limit": 100})
    assert r.tenant_id == "acme_corp"


# ---------------------------------------------------------------- context


def test_tenant_context() -> None:
    with tl.tenant("ctx"):
        r = Echo.call(text="hi")
    assert r.tenant_id == "ctx"
    assert Echo.call(text="after").tenant_id is None


def test_nested_tenant_contexts_restore() -> None:
    with tl.tenant("outer"):
        assert Echo.call(text="1").tenant_id == "outer"
        with tl.tenant("inner"):
            assert Echo.call(text="2").tenant_id == "inner"
            with tl.tenant({"id": "innermost", "daily_limit": 5}):
                assert Echo.call(text="3").tenant_id == "innermost"
            assert Echo.call(text="4").tenant_id == "inner"
        assert Echo.call(text="5").tenant_id == "outer"
    assert Echo.call(text="6").tenant_id is None


def test_tenant_context_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), tl.tenant("doomed"):
        raise RuntimeError("boom")
    assert Echo.call(text="hi").tenant_id is None


def test_explicit_tenant_wins_over_context() -> None:
    with tl.tenant("ctx"):
        assert Echo.call(text="hi", tenant="explicit").tenant_id == "explicit"
        assert Echo.call(text="hi", tenant=None).tenant_id is None


async def test_tenant_context_is_per_task() -> None:
    async def run(tenant_id: str) -> str | None:
        with tl.tenant(tenant_id):
            await asyncio.sleep(0.01)  # interleave the tasks
            r: tl.AgentResult = await Echo.acall(text=tenant_id)
            return r.tenant_id

    got = await asyncio.gather(*(run(f"task{i}") for i in range(10)))
    assert got == [f"task{i}" for i in range(10)]


# ---------------------------------------------------------------- resolvers


def test_tenant_resolver_used_without_explicit_tenant(configure: Any) -> None:
    configure(tenant_resolver=lambda: "resolved")
    r = Echo.call(text="hi")
    assert r.tenant_id == "resolved"
    assert stored_tenant(r) == "resolved"


def test_context_wins_over_resolver(configure: Any) -> None:
    configure(tenant_resolver=lambda: "resolved")
    with tl.tenant("ctx"):
        assert Echo.call(text="hi").tenant_id == "ctx"


def test_resolver_may_return_a_dict_or_none(configure: Any) -> None:
    configure(tenant_resolver=lambda: {"id": "from_dict", "monthly_limit": "7.5"})
    plan = Echo.call(text="hi", dry_run=True)
    assert plan["tenant_id"] == "from_dict"
    assert plan["tenant_limits"] == {"monthly_limit": "7.5"}

    configure(tenant_resolver=lambda: None)
    assert Echo.call(text="hi").tenant_id is None


def test_explicit_none_means_no_tenant_even_with_a_resolver(configure: Any) -> None:
    calls: list[int] = []

    def resolver() -> str:
        calls.append(1)
        return "resolved"

    configure(tenant_resolver=resolver)
    r = Echo.call(text="hi", tenant=None)
    assert r.tenant_id is None
    assert stored_tenant(r) is None
    assert calls == []


def test_multi_tenancy_disabled_ignores_the_resolver(configure: Any) -> None:
    calls: list[int] = []

    def resolver() -> str:
        calls.append(1)
        return "resolved"

    configure(tenant_resolver=resolver, multi_tenancy_enabled=False)
    r = Echo.call(text="hi")
    assert r.tenant_id is None
    assert calls == []


def test_multi_tenancy_enabled_must_be_a_bool(configure: Any) -> None:
    with pytest.raises(tl.ConfigurationError, match="multi_tenancy_enabled"):
        configure(multi_tenancy_enabled="no")


def test_bad_resolver_result_is_an_invalid_tenant(configure: Any) -> None:
    configure(tenant_resolver=lambda: 1.5)
    with pytest.raises(tl.InvalidTenantError, match="tenant_resolver"):
        Echo.call(text="hi")
    assert rows() == 0


def test_tenant_config_resolver_supplies_limits(configure: Any) -> None:
    asked: list[str] = []

    def limits(tenant_id: str) -> dict[str, Any] | None:
        asked.append(tenant_id)
        return {"daily_limit": 7, "enforcement": "soft"} if tenant_id == "vip" else None

    configure(tenant_config_resolver=limits)
    assert Echo.call(text="hi", tenant="vip", dry_run=True)["tenant_limits"] == {
        "daily_limit": 7,
        "enforcement": "soft",
    }
    assert Echo.call(text="hi", tenant="other", dry_run=True)["tenant_limits"] is None
    assert asked == ["vip", "other"]

    # No tenant: nothing to look up.
    assert Echo.call(text="hi", dry_run=True)["tenant_limits"] is None
    assert asked == ["vip", "other"]


def test_runtime_tenant_limits_win_over_tenant_config_resolver(configure: Any) -> None:
    asked: list[str] = []

    def limits(tenant_id: str) -> dict[str, Any]:
        asked.append(tenant_id)
        return {"daily_limit": 7}

    configure(tenant_config_resolver=limits)
    plan = Echo.call(text="hi", tenant={"id": "vip", "daily_limit": 3}, dry_run=True)
    assert plan["tenant_limits"] == {"daily_limit": 3}
    assert asked == []


def test_tenant_config_resolver_limits_are_enforced(configure: Any) -> None:
    configure(tenant_config_resolver=lambda tenant_id: {"daily_limit": "0.0000001"})
    with pytest.raises(tl.BudgetExceededError) as info:
        Echo.call(text="hi", tenant="capped")
    assert info.value.tenant_budget is True
    assert info.value.tenant_id == "capped"


@pytest.mark.parametrize("result", [["daily_limit", 7], "daily_limit=7", 7])
def test_tenant_config_resolver_must_return_a_dict(configure: Any, result: Any) -> None:
    configure(tenant_config_resolver=lambda tenant_id: result)
    with pytest.raises(tl.InvalidTenantError, match="tenant_config_resolver"):
        Echo.call(text="hi", tenant="acme")
    with pytest.raises(tl.InvalidTenantError, match="tenant_config_resolver"):
        Echo.call(text="hi", tenant="acme", dry_run=True)
    assert rows() == 0


def test_tenant_config_resolver_with_unknown_limit_key(configure: Any) -> None:
    configure(tenant_config_resolver=lambda tenant_id: {"daily_limt": 5})
    with pytest.raises(tl.ConfigurationError, match="daily_limt"):
        Echo.call(text="hi", tenant="acme")
    assert rows() == 0


# ---------------------------------------------------------------- bad tenants


@pytest.mark.parametrize(
    "tenant",
    [
        "",
        "   ",
        True,  # not an int id
        12.5,
        ["acme"],
        {"name": "Acme"},
        {"id": "acme", "colour": "red"},
        {"id": ""},
        {"id": 5.0},
        {"id": "acme", "api_keys": "sk-not-a-dict"},
        "line\nbreak",
        "x" * 300,
    ],
    ids=repr,
)
def test_bad_tenant_is_rejected_without_a_row(tenant: Any) -> None:
    with pytest.raises(tl.InvalidTenantError):
        Echo.call(text="hi", tenant=tenant)
    assert rows() == 0


def test_bad_tenant_messages_name_the_problem() -> None:
    with pytest.raises(tl.InvalidTenantError, match="'id'"):
        Echo.call(text="hi", tenant={"name": "Acme"})
    with pytest.raises(tl.InvalidTenantError, match="colour"):
        Echo.call(text="hi", tenant={"id": "acme", "colour": "red"})
    with pytest.raises(tl.InvalidTenantError, match="float"):
        Echo.call(text="hi", tenant=12.5)


def test_bad_tenant_in_context() -> None:
    with tl.tenant(""), pytest.raises(tl.InvalidTenantError, match="tenant"):
        Echo.call(text="hi")
    assert rows() == 0


async def test_bad_tenant_with_acall() -> None:
    with pytest.raises(tl.InvalidTenantError):
        await Echo.acall(text="hi", tenant={"name": "no id"})
    assert rows() == 0


@pytest.mark.parametrize(
    ("tenant", "named"),
    [
        ({"id": "acme", "daily_limit": -1}, "daily_limit"),
        ({"id": "acme", "daily_limit": "abc"}, "daily_limit"),
        ({"id": "acme", "daily_token_limit": 1.5}, "daily_token_limit"),
        ({"id": "acme", "enforcement": "medium"}, "medium"),
    ],
)
def test_bad_runtime_limits_are_rejected_without_a_row(tenant: dict[str, Any], named: str) -> None:
    with pytest.raises(tl.TenantLLMError, match=named):
        Echo.call(text="hi", tenant=tenant)
    assert rows() == 0


# ---------------------------------------------------------------- tenants the app already has


def test_llm_tenant_limits_create_the_budget_once_on_first_call(configure: Any) -> None:
    import threading
    from dataclasses import dataclass

    configure(mock={"latency_ms": 0})

    @tl.llm_tenant(id="pk", name="title", limits={"daily_limit": "0.5", "monthly_token_limit": 10_000},
                   enforcement="soft")  # fmt: skip
    @dataclass
    class Org:
        pk: int
        title: str

    assert tl.TenantBudget.find("7") is None  # nothing happens before a call
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def first_call() -> None:
        barrier.wait()
        try:
            Echo.call(text="hi", tenant=Org(7, "Seven"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    b = tl.TenantBudget.get("7")
    assert (b.daily_limit, b.monthly_token_limit, b.enforcement, b.name) == (Decimal("0.5"), 10_000, "soft", "Seven")
    assert [x.tenant_id for x in tl.TenantBudget.all()] == ["7"]
    assert tl.Execution.by_tenant("7").count() == 8

    # An operator's change stands, in this process and in a freshly configured one.
    b.update(daily_limit="0.000000001", enforcement="hard")
    with pytest.raises(tl.BudgetExceededError):
        Echo.call(text="hi", tenant=Org(7, "Seven"))
    configure(mock={"latency_ms": 0})
    with pytest.raises(tl.BudgetExceededError):
        Echo.call(text="hi", tenant=Org(7, "Seven"))
    assert tl.TenantBudget.get("7").daily_limit == Decimal("0.000000001")


def test_llm_tenant_limits_are_checked_when_decorating() -> None:
    with pytest.raises(tl.ConfigurationError, match="unknown limit 'daily'"):
        tl.llm_tenant(limits={"daily": 5})
    with pytest.raises(tl.ConfigurationError, match="limits must be a dict"):
        tl.llm_tenant(limits=5)  # type: ignore[arg-type]


def test_require_tenant(configure: Any) -> None:
    configure(require_tenant=True, multi_tenancy_enabled=True)
    with pytest.raises(tl.InvalidTenantError, match="require_tenant=True"):
        Echo.call(text="hi")
    assert rows() == 0  # refused before anything was recorded
    assert Echo.call(text="hi", tenant="acme").tenant_id == "acme"
    with pytest.raises(tl.ConfigurationError, match="require_tenant must be True or False"):
        tl.configure(require_tenant="yes")
    configure()  # the default: no tenant needed
    assert Echo.call(text="hi").tenant_id is None
