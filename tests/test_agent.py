"""`Agent` subclasses on the built-in mock provider: results, prompts, parameters, dry runs,
validation of class attributes, async and concurrent calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any, cast

import pytest
import tenantllm as tl

MILLION = Decimal(1_000_000)
MOCK_INPUT_PRICE = Decimal("0.15")  # USD per 1M tokens, the mock provider's built-in price
MOCK_OUTPUT_PRICE = Decimal("0.60")


class Support(tl.Agent):
    model = "mock/fast"
    system = "You help customers of {company}."
    user = "Question: {query}"
    max_tokens = 200


class Echo(tl.Agent):
    model = "mock/fast"
    user = "Say: {text}"
    max_tokens = 100


class WithMetadata(tl.Agent):
    model = "mock/fast"
    user = "Hello {name}"

    def execution_metadata(self) -> Mapping[str, Any]:
        return {"plan": "pro", "name_length": len(self.params["name"])}


class BadMetadata(tl.Agent):
    model = "mock/fast"
    user = "Hello {name}"

    def execution_metadata(self) -> Mapping[str, Any]:
        return ["not", "a", "dict"]  # type: ignore[return-value]


def make_agent(name: str, base: type[tl.Agent], attrs: dict[str, Any]) -> type[tl.Agent]:
    """A subclass of `base` with the given class attributes, built at run time."""
    return cast("type[tl.Agent]", type(name, (base,), attrs))


def rows() -> int:
    return tl.Execution.all().count()


# ---------------------------------------------------------------- results


def test_call_returns_a_complete_agent_result() -> None:
    r = Support.call(query="Where is my order?", company="Acme", tenant="acme")

    assert isinstance(r, tl.AgentResult)
    assert r.content == "[mock/fast] You asked: Question: Where is my order?"
    assert str(r) == r.content
    assert r.model_id == "mock/fast"
    assert r.chosen_model_id == "mock/fast"
    assert r.tenant_id == "acme"
    assert r.attempts_count == 1
    assert isinstance(r.duration_ms, int) and r.duration_ms >= 0
    assert isinstance(r.execution_id, str) and r.execution_id
    assert r.input_tokens > 0 and r.output_tokens > 0
    assert r.total_tokens == r.input_tokens + r.output_tokens
    assert r.budget_warnings == []


def test_costs_are_exact_decimals() -> None:
    r = Support.call(query="How much does shipping cost?", company="Acme", tenant="acme")

    for cost in (r.input_cost, r.output_cost, r.total_cost):
        assert type(cost) is Decimal
    assert r.input_cost + r.output_cost == r.total_cost
    assert r.input_cost == r.input_tokens * MOCK_INPUT_PRICE / MILLION
    assert r.output_cost == r.output_tokens * MOCK_OUTPUT_PRICE / MILLION
    assert r.total_cost > 0


def test_result_matches_its_execution_row() -> None:
    r = Support.call(query="Where is my order?", company="Acme", tenant="acme")

    e = tl.Execution.get(r.execution_id)
    assert e.id == r.execution_id
    assert e.status == "success"
    assert e.agent == "Support"
    assert e.tenant_id == "acme"
    assert e.model_id == "mock/fast"
    assert e.provider == "mock"
    assert (e.input_tokens, e.output_tokens, e.total_tokens) == (r.input_tokens, r.output_tokens, r.total_tokens)
    assert (e.input_cost, e.output_cost, e.total_cost) == (r.input_cost, r.output_cost, r.total_cost)
    assert type(e.total_cost) is Decimal
    assert e.attempts_count == 1 and len(e.attempts) == 1
    assert e.started_at.tzinfo is not None
    assert e.completed_at is not None and e.completed_at >= e.started_at
    assert rows() == 1


def test_result_repr_shows_python_values() -> None:
    r = Echo.call(text="hi", tenant="acme")
    text = repr(r)
    assert text.startswith("AgentResult(")
    assert "tenant_id='acme'" in text
    assert "model_id='mock/fast'" in text
    assert "Decimal(" in text


def test_system_and_user_templates_are_rendered_and_stored() -> None:
    r = Support.call(query="Can I return shoes?", company="Acme Corp", tenant="acme")

    e = tl.Execution.get(r.execution_id)
    assert e.system_prompt == "You help customers of Acme Corp."
    assert e.user_prompt == "Question: Can I return shoes?"
    assert e.response == r.content


def test_template_values_are_not_reinterpreted() -> None:
    # A parameter containing braces is data, not a nested template.
    r = Echo.call(text="{company} {0} }{", tenant="acme")
    assert tl.Execution.get(r.execution_id).user_prompt == "Say: {company} {0} }{"


def test_no_tenant_is_allowed() -> None:
    r = Echo.call(text="hi")
    assert r.tenant_id is None
    assert tl.Execution.get(r.execution_id).tenant_id is None


# ---------------------------------------------------------------- parameters


def test_missing_parameter_is_named() -> None:
    with pytest.raises(tl.MissingParameterError, match="query"):
        Support.call(company="Acme", tenant="acme")
    assert issubclass(tl.MissingParameterError, tl.TenantLLMError)
    assert rows() == 0


def test_all_missing_parameters_are_named() -> None:
    with pytest.raises(tl.MissingParameterError) as info:
        Support.call(tenant="acme")
    assert "query" in str(info.value) and "company" in str(info.value)
    assert rows() == 0


def test_unexpected_parameter_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="colour"):
        Support.call(query="q", company="Acme", colour="red", tenant="acme")
    assert rows() == 0


def test_params_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Support.call("Where is my order?")  # type: ignore[call-arg]
    assert rows() == 0


# ---------------------------------------------------------------- dry run


def test_dry_run_returns_prompts_and_settings_without_a_row() -> None:
    plan = Support.call(query="Where is my order?", company="Acme", tenant="acme", dry_run=True)

    assert isinstance(plan, dict)
    assert plan["agent"] == "Support"
    assert plan["system"] == "You help customers of Acme."
    assert plan["user"] == "Question: Where is my order?"
    assert plan["tenant_id"] == "acme"
    assert plan["model"] == "mock/fast"
    assert plan["max_tokens"] == 200
    assert plan["fallback_models"] == []
    assert [m["provider"] for m in plan["models"]] == ["mock"]
    assert plan["models"][0]["input_price"] == MOCK_INPUT_PRICE
    assert type(plan["estimated_cost"]) is Decimal
    assert plan["estimated_cost"] > 0
    assert plan["estimated_tokens"] >= 200
    assert rows() == 0


def test_dry_run_estimate_bounds_the_real_cost() -> None:
    plan = Support.call(query="Where is my order?", company="Acme", dry_run=True)
    r = Support.call(query="Where is my order?", company="Acme")
    assert r.total_cost <= plan["estimated_cost"]
    assert r.total_tokens <= plan["estimated_tokens"]


def test_dry_run_still_checks_parameters() -> None:
    with pytest.raises(tl.MissingParameterError, match="query"):
        Support.call(company="Acme", dry_run=True)


def test_dry_run_rejects_what_the_real_call_rejects() -> None:
    tenant = {"id": "acme", "daily_limit": -1}
    with pytest.raises(tl.ConfigurationError, match="daily_limit"):
        Echo.call(text="hi", tenant=tenant)
    with pytest.raises(tl.ConfigurationError, match="daily_limit"):
        Echo.call(text="hi", tenant=tenant, dry_run=True)


# ---------------------------------------------------------------- metadata


def test_execution_metadata_is_stored_on_the_row() -> None:
    r = WithMetadata.call(name="Ada", tenant="acme")
    assert tl.Execution.get(r.execution_id).metadata == {"plan": "pro", "name_length": 3}


def test_execution_metadata_in_dry_run() -> None:
    plan = WithMetadata.call(name="Ada", dry_run=True)
    assert plan["metadata"] == {"plan": "pro", "name_length": 3}


def test_execution_metadata_must_be_a_dict() -> None:
    with pytest.raises(tl.ConfigurationError, match="execution_metadata"):
        BadMetadata.call(name="Ada")
    assert rows() == 0


# ---------------------------------------------------------------- bad class attributes


@pytest.mark.parametrize(
    ("attr", "value", "named"),
    [
        ("temperature", 5, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", "x", "max_tokens"),
        ("max_tokens", True, "max_tokens"),
        ("retries", -1, "retries"),
        ("retries", "2", "retries"),
        ("fallback_models", "gpt-4o", "fallback_models"),
        ("timeout", 0, "timeout"),
        ("timeout", -1.5, "timeout"),
        ("model", "nonsense-model-x", "nonsense-model-x"),
        ("model", "", "model"),
        ("circuit_breaker", 3, "circuit_breaker"),
    ],
)
def test_bad_class_attribute_is_a_configuration_error_at_call_time(attr: str, value: Any, named: str) -> None:
    agent = make_agent(f"Bad_{attr}", Echo, {attr: value})  # defining it is fine
    with pytest.raises(tl.ConfigurationError, match=named):
        agent.call(text="hi", tenant="acme")
    with pytest.raises(tl.ConfigurationError, match=named):
        agent.call(text="hi", dry_run=True)
    assert rows() == 0


def test_unknown_fallback_model_is_rejected_before_any_call() -> None:
    agent = make_agent("BadFallback", Echo, {"fallback_models": ("nonsense-model-y",)})
    with pytest.raises(tl.ConfigurationError, match="nonsense-model-y"):
        agent.call(text="hi")
    assert rows() == 0


def test_bad_retries_policy_is_rejected() -> None:
    agent = make_agent("BadBackoff", Echo, {"retries": tl.Retries(max=1, backoff="sometimes")})
    with pytest.raises(tl.ConfigurationError, match="backoff"):
        agent.call(text="hi")
    assert rows() == 0


def test_missing_user_template_is_rejected() -> None:
    agent = make_agent("NoUser", tl.Agent, {"model": "mock/fast"})
    with pytest.raises(tl.ConfigurationError, match="user"):
        agent.call()
    assert rows() == 0


@pytest.mark.parametrize("template", ["{0}", "{a b}", "{}", "Unclosed {"])
def test_invalid_template_is_a_configuration_error(template: str) -> None:
    # Raised when the class is defined or, at the latest, when it is called; never a row.
    with pytest.raises(tl.ConfigurationError, match="user"):
        agent = make_agent("BadTemplate", tl.Agent, {"model": "mock/fast", "user": template})
        agent.call()
    assert rows() == 0


def test_invalid_conversion_in_template_is_a_configuration_error() -> None:
    with pytest.raises(tl.ConfigurationError, match="user"):
        agent = make_agent("BadConversion", tl.Agent, {"model": "mock/fast", "user": "Say {x!z}"})
        agent.call(x="hi")
    assert rows() == 0


def test_placeholder_shadowing_a_call_keyword_is_rejected() -> None:
    with pytest.raises(tl.ConfigurationError, match="tenant"):
        agent = make_agent("Shadow", tl.Agent, {"model": "mock/fast", "user": "For {tenant}: {q}"})
        agent.call(q="x", tenant="acme")


# ---------------------------------------------------------------- async and concurrency


async def test_acall_returns_a_result() -> None:
    r = await Support.acall(query="Where is my order?", company="Acme", tenant="acme")
    assert isinstance(r, tl.AgentResult)
    assert r.content == "[mock/fast] You asked: Question: Where is my order?"
    assert r.input_cost + r.output_cost == r.total_cost
    assert tl.Execution.get(r.execution_id).status == "success"


async def test_acall_checks_parameters_and_supports_dry_run() -> None:
    with pytest.raises(tl.MissingParameterError, match="query"):
        await Support.acall(company="Acme")
    plan = await Support.acall(query="q", company="Acme", dry_run=True)
    assert plan["user"] == "Question: q"
    assert rows() == 0


async def test_50_concurrent_acalls() -> None:
    results = await asyncio.gather(*(Echo.acall(text=f"message {i}", tenant=f"t{i % 5}") for i in range(50)))
    assert len({r.execution_id for r in results}) == 50
    for i, r in enumerate(results):
        assert r.content == f"[mock/fast] You asked: Say: message {i}"
        assert r.tenant_id == f"t{i % 5}"
    assert rows() == 50
    assert tl.Execution.successful().count() == 50
    assert tl.Execution.all().sum("total_cost") == sum((r.total_cost for r in results), Decimal(0))


async def test_acall_does_not_block_the_event_loop(configure: Any) -> None:
    configure(mock={"latency_ms": 200})
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await Echo.acall(text="slow")
    finally:
        task.cancel()
    assert ticks >= 5


def test_sync_calls_from_8_threads_leave_one_row_each() -> None:
    per_thread = 10
    barrier = threading.Barrier(8)

    def work(n: int) -> list[str]:
        barrier.wait()
        return [Echo.call(text=f"thread {n} call {i}", tenant=f"t{n}").execution_id for i in range(per_thread)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = [i for batch in pool.map(work, range(8)) for i in batch]

    assert len(ids) == len(set(ids)) == 8 * per_thread
    assert rows() == 8 * per_thread
    assert {e.id for e in tl.Execution.all()} == set(ids)
    assert tl.Execution.all().group_by("tenant_id").count() == {f"t{n}": per_thread for n in range(8)}
