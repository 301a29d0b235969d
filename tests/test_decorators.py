"""Decorators (DESIGN §1): `@tl.agent` functions on the mock provider, and `@tl.guard` /
`tl.guarded(...)` around users' own calls made with the real `openai` and `anthropic` SDKs
against the local fake server: usage and exact cost read from the SDK responses, tenant,
budget and breaker checked before the body runs, errors, cancellation, parent executions,
and the signatures type checkers see."""

from __future__ import annotations

import asyncio
import csv
import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import anthropic
import openai
import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Step

MILLION = Decimal(1_000_000)
MOCK_INPUT_PRICE = Decimal("0.15")  # USD per 1M tokens, the mock provider's built-in price
MOCK_OUTPUT_PRICE = Decimal("0.60")
ROOT = Path(__file__).resolve().parent.parent
PRICES_CSV = ROOT / "src" / "pricing" / "prices.csv"

OPENAI_SERVED = "gpt-4o-2024-08-06"
ANTHROPIC_SERVED = "claude-sonnet-4-5-20250929"


def csv_price(model: str) -> tuple[Decimal, Decimal, Decimal]:
    """(input, output, cached input) USD per 1M tokens for `model`, from the shipped table."""
    lines = [ln for ln in PRICES_CSV.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for row in csv.DictReader(lines):
        if row["model"] == model:
            inp = Decimal(row["input"])
            cached = (row["cached_input"] or "").strip()
            return inp, Decimal(row["output"]), Decimal(cached) if cached else inp
    raise AssertionError(f"{model} is not in {PRICES_CSV}")


def expected_cost(model: str, prompt: int, cached: int, output: int) -> tuple[Decimal, Decimal]:
    """(input cost, output cost): uncached input, cached input and output at their prices."""
    inp, out, cached_price = csv_price(model)
    return ((prompt - cached) * inp + cached * cached_price) / MILLION, output * out / MILLION


def only_row() -> tl.Execution:
    rows = list(tl.Execution.all())
    assert len(rows) == 1, [(r.agent, r.status) for r in rows]
    return tl.Execution.get(rows[0].id)


def row_count() -> int:
    return tl.Execution.all().count()


# ---------------------------------------------------------------- fake provider + SDK clients


@pytest.fixture
def fp(server: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> FakeProvider:
    """The module's fake server, reset; no SDK environment that could redirect the clients."""
    server.reset()
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return server


@pytest.fixture
def oai(fp: FakeProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fp.base_url + "/v1", api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
def ant(fp: FakeProvider) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fp.base_url, api_key="x", max_retries=0) as client:
        yield client


def chat(client: openai.OpenAI, text: str = "hello") -> Any:
    return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])


# ================================================================ @tl.agent


@tl.agent(model="mock/fast", temperature=0.2, max_tokens=200)
def summarize(text: str, style: str = "one line") -> None:
    """Summarize in {style}: {text}"""


@tl.agent(model="mock/fast")
def built(topic: str, n: int = 3) -> str:
    return f"List {n} facts about {topic}"


@tl.agent(model="mock/fast")
async def asummarize(text: str) -> None:
    """Summarize: {text}"""


@tl.agent(model="mock/fast")
async def abuilt(topic: str) -> str:
    await asyncio.sleep(0)
    return f"Tell me about {topic}"


class Holder:
    @staticmethod
    @tl.agent(model="mock/fast")
    def ask(question: str) -> None:
        """Q: {question}"""


def test_agent_docstring_is_the_template_and_call_returns_an_agent_result() -> None:
    r = summarize("The quick brown fox", tenant="acme")

    assert isinstance(r, tl.AgentResult)
    assert r.content == "[mock/fast] You asked: Summarize in one line: The quick brown fox"
    assert r.model_id == "mock/fast" and r.chosen_model_id == "mock/fast"
    assert r.tenant_id == "acme"
    assert isinstance(r.execution_id, str) and r.execution_id
    for cost in (r.input_cost, r.output_cost, r.total_cost):
        assert type(cost) is Decimal
    assert r.input_cost == r.input_tokens * MOCK_INPUT_PRICE / MILLION
    assert r.output_cost == r.output_tokens * MOCK_OUTPUT_PRICE / MILLION
    assert r.total_cost == r.input_cost + r.output_cost > 0

    e = only_row()
    assert e.id == r.execution_id and e.status == "success"
    assert e.agent == "summarize" and e.tenant_id == "acme"
    assert e.user_prompt == "Summarize in one line: The quick brown fox"
    assert (e.input_tokens, e.output_tokens, e.total_cost) == (r.input_tokens, r.output_tokens, r.total_cost)


def test_agent_keyword_arguments_and_defaults_fill_the_template() -> None:
    assert summarize(text="abc", style="haiku form").content.endswith("Summarize in haiku form: abc")
    assert summarize("abc").content.endswith("Summarize in one line: abc")  # default used


def test_agent_body_may_return_the_prompt() -> None:
    r = built("otters", tenant="acme")
    assert r.content == "[mock/fast] You asked: List 3 facts about otters"
    r = built("otters", n=5)
    assert r.content.endswith("List 5 facts about otters")
    assert r.tenant_id is None
    assert tl.Execution.get(r.execution_id).agent == "built"


def test_agent_tenant_from_context() -> None:
    with tl.tenant("ctx_tenant"):
        r = summarize("x")
    assert r.tenant_id == "ctx_tenant"
    with tl.tenant("ctx_tenant"):
        assert summarize("x", tenant="explicit").tenant_id == "explicit"  # explicit wins
    assert tl.Execution.by_tenant("ctx_tenant").count() == 1


def test_agent_system_template_is_filled_from_parameters() -> None:
    @tl.agent(model="mock/fast", system="You help customers of {company}.")
    def support(query: str, company: str = "Acme") -> None:
        """Question: {query}"""

    r = support("Where is my order?")
    e = tl.Execution.get(r.execution_id)
    assert e.system_prompt == "You help customers of Acme."
    assert e.user_prompt == "Question: Where is my order?"


async def test_async_agent_returns_an_awaitable() -> None:
    assert inspect.iscoroutinefunction(asummarize)
    pending = asummarize("sunsets", tenant="acme")
    assert inspect.isawaitable(pending)
    r = await pending
    assert isinstance(r, tl.AgentResult)
    assert r.content == "[mock/fast] You asked: Summarize: sunsets"
    assert r.tenant_id == "acme"
    assert type(r.total_cost) is Decimal and r.total_cost > 0
    assert tl.Execution.get(r.execution_id).agent == "asummarize"


async def test_async_agents_run_concurrently_with_their_own_tenants() -> None:
    async def one(i: int) -> tl.AgentResult:
        with tl.tenant(f"t{i}"):
            return cast(tl.AgentResult, await abuilt(f"topic {i}"))

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert [r.tenant_id for r in results] == [f"t{i}" for i in range(8)]
    assert [r.content for r in results] == [f"[mock/fast] You asked: Tell me about topic {i}" for i in range(8)]
    assert row_count() == 8


def test_agent_name_is_the_qualified_name() -> None:
    @tl.agent(model="mock/fast")
    def nested(q: str) -> None:
        """{q}"""

    r1 = Holder.ask("why?")
    r2 = nested("how?")
    assert Holder.ask.__qualname__ == "Holder.ask"
    assert tl.Execution.get(r1.execution_id).agent == "Holder.ask"
    assert nested.__qualname__ == "test_agent_name_is_the_qualified_name.<locals>.nested"
    assert tl.Execution.get(r2.execution_id).agent == nested.__qualname__
    assert tl.Execution.by_agent("Holder.ask").count() == 1


def test_agent_missing_argument_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="text"):
        summarize()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="bogus"):
        summarize("x", bogus=1)  # type: ignore[call-arg]
    assert row_count() == 0


def test_agent_body_must_return_str_or_none() -> None:
    @tl.agent(model="mock/fast")
    def numeric(x: int) -> int:
        return x

    @tl.agent(model="mock/fast")
    def no_prompt(x: int) -> None:
        pass

    with pytest.raises(tl.ConfigurationError, match="numeric"):
        numeric(3)
    with pytest.raises(tl.ConfigurationError, match="no_prompt"):
        no_prompt(3)  # returns None and has no docstring to render
    assert row_count() == 0


def test_agent_placeholder_that_is_not_a_parameter_fails_at_decoration() -> None:
    with pytest.raises(tl.ConfigurationError, match="missing"):

        @tl.agent(model="mock/fast")
        def broken(text: str) -> None:
            """Use {text} and {missing}"""

    with pytest.raises(tl.ConfigurationError, match="company"):

        @tl.agent(model="mock/fast", system="For {company}")
        def broken_system(text: str) -> None:
            """{text}"""


def test_agent_parameter_named_tenant_fails_at_decoration() -> None:
    with pytest.raises(tl.ConfigurationError, match="tenant"):

        @tl.agent(model="mock/fast")
        def shadow(text: str, tenant: str) -> None:
            """{text}"""


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", 9),
        ("temperature", "hot"),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("retries", -1),
        ("fallback_models", "mock/backup"),
        ("circuit_breaker", "often"),
        ("circuit_breaker", tl.BreakerPolicy(errors=0)),
        ("model", ""),
    ],
)
def test_agent_bad_options_fail_at_decoration(option: str, value: Any) -> None:
    called = False

    def fn(text: str) -> None:
        """{text}"""
        nonlocal called
        called = True

    kwargs: dict[str, Any] = {"model": "mock/fast", option: value}
    with pytest.raises(tl.ConfigurationError, match=option):
        tl.agent(**kwargs)(fn)
    assert not called and row_count() == 0


def test_agent_retries_and_fallback_models(configure: Callable[..., None]) -> None:
    configure(mock={"failure_rate": 1.0, "seed": 1})

    @tl.agent(
        model="mock/primary",
        retries=tl.Retries(max=1, base=0.0, max_delay=0.0),
        fallback_models=["mock/backup"],
    )
    def flaky(x: str) -> None:
        """ping {x}"""

    with pytest.raises(tl.AllModelsExhaustedError) as info:
        flaky("a", tenant="acme")
    assert len(info.value.errors) == 4  # (1 try + 1 retry) x 2 models
    e = only_row()
    assert e.status == "error" and e.attempts_count == 4 and e.agent == flaky.__qualname__


def test_agent_circuit_breaker(configure: Callable[..., None]) -> None:
    configure(mock={"failure_rate": 1.0, "seed": 1})

    @tl.agent(model="mock/primary", circuit_breaker=tl.BreakerPolicy(errors=2, within=60, cooldown=60))
    def breaking(x: str) -> None:
        """ping {x}"""

    for i in range(2):
        with pytest.raises(tl.ProviderError):
            breaking(str(i), tenant="acme")
    with pytest.raises(tl.CircuitOpenError) as info:
        breaking("3", tenant="acme")
    assert (info.value.agent, info.value.tenant_id) == (breaking.__qualname__, "acme")
    assert tl.Execution.by_status("short_circuited").count() == 1
    with pytest.raises(tl.ProviderError):  # another tenant's breaker is closed
        breaking("4", tenant="other")


# ---------------------------------------------------------------- metadata preserved


def test_decorated_functions_keep_name_doc_signature_and_wrapped() -> None:
    def plain(text: str, style: str = "one line") -> None:
        """Summarize in {style}: {text}"""

    async def aplain(n: int, *, flag: bool = False) -> dict[str, Any]:
        """Async docs."""
        return {}

    cases: list[tuple[Callable[..., Any], Callable[..., Any]]] = [
        (plain, tl.agent(model="mock/fast")(plain)),
        (plain, tl.guard(agent="G", model="gpt-4o")(plain)),
        (aplain, tl.guard(agent="G", model="gpt-4o")(aplain)),
    ]
    for original, wrapped in cases:
        assert wrapped is not original
        assert wrapped.__name__ == original.__name__
        assert wrapped.__qualname__ == original.__qualname__
        assert wrapped.__doc__ == original.__doc__
        assert wrapped.__module__ == original.__module__
        assert cast(Any, wrapped).__wrapped__ is original
        assert inspect.signature(wrapped) == inspect.signature(original)
        assert inspect.iscoroutinefunction(wrapped) == inspect.iscoroutinefunction(original)
    assert inspect.signature(summarize) == inspect.signature(cast(Any, summarize).__wrapped__)
    assert list(inspect.signature(summarize).parameters) == ["text", "style"]
    assert inspect.iscoroutinefunction(asummarize) and not inspect.iscoroutinefunction(summarize)


# ================================================================ @tl.guard / tl.guarded with real SDKs


def test_guard_reads_usage_from_an_openai_response(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script(Step(content="short", input_tokens=1000, output_tokens=250, cached_tokens=400, model=OPENAI_SERVED))

    @tl.guard(agent="LegacySummarizer", model="gpt-4o", max_tokens=500)
    def legacy(text: str) -> Any:
        return chat(oai, f"Summarize: {text}")

    with tl.tenant("acme"):
        resp = legacy("a long text")

    assert isinstance(resp, openai.types.chat.ChatCompletion)  # the SDK's response, unchanged
    assert resp.choices[0].message.content == "short"
    assert len(fp.requests) == 1 and fp.requests[0].body is not None
    assert fp.requests[0].body["model"] == "gpt-4o"

    e = only_row()
    assert e.status == "success" and e.agent == "LegacySummarizer" and e.tenant_id == "acme"
    assert e.model_id == "gpt-4o" and e.chosen_model_id == OPENAI_SERVED
    assert (e.input_tokens, e.output_tokens, e.cached_tokens, e.total_tokens) == (1000, 250, 400, 1250)
    input_cost, output_cost = expected_cost("gpt-4o", 1000, 400, 250)
    assert (e.input_cost, e.output_cost, e.total_cost) == (input_cost, output_cost, input_cost + output_cost)
    assert type(e.total_cost) is Decimal
    assert tl.Execution.by_tenant("acme").sum("total_cost") == input_cost + output_cost


@pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")  # the SDK's notice
def test_guard_reads_usage_from_an_anthropic_response(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    # Anthropic reports cache reads apart from input_tokens; the row's input includes them.
    fp.script(Step(input_tokens=600, output_tokens=120, cached_tokens=400, model=ANTHROPIC_SERVED))

    @tl.guard(agent="Claude", model="claude-sonnet-4-5", max_tokens=100)
    def ask(q: str) -> Any:
        return ant.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": q}]
        )

    with tl.tenant("acme"):
        msg = ask("hi")
    assert isinstance(msg, anthropic.types.Message)

    e = only_row()
    assert e.status == "success" and e.provider == "anthropic"
    assert e.model_id == "claude-sonnet-4-5" and e.chosen_model_id == ANTHROPIC_SERVED
    assert (e.input_tokens, e.output_tokens, e.cached_tokens) == (1000, 120, 400)
    input_cost, output_cost = expected_cost("claude-sonnet-4-5", 1000, 400, 120)
    assert (e.input_cost, e.output_cost, e.total_cost) == (input_cost, output_cost, input_cost + output_cost)


def contract_reply(name: str) -> dict[str, Any]:
    """A provider reply from provider_replies.json (each names its source)."""
    import json

    replies = json.loads((Path(__file__).parent / "provider_replies.json").read_text())["replies"]
    reply: dict[str, Any] = next(r for r in replies if r["name"] == name)
    return reply


def test_guard_bills_anthropic_cache_writes_by_lifetime(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    case = contract_reply("anthropic-cache-writes-5m-1h")
    fp.script(Step(kind="raw", body=case["reply"]))

    @tl.guard(agent="Cached", model="claude-haiku-4-5", max_tokens=300)
    def ask(q: str) -> Any:
        return ant.messages.create(model="claude-haiku-4-5", max_tokens=300, messages=[{"role": "user", "content": q}])

    ask("hi")

    e = only_row()
    # 50 plain + 1,800 read (0.1x) + 2,000 written for 5 minutes (1.25x) + 1,000 for 1 hour (2x), $1 / 1M input.
    assert (e.input_tokens, e.cached_tokens, e.cache_write_tokens) == (4850, 1800, 3000)
    assert (e.cache_read_cost, e.cache_write_cost) == (Decimal("0.00018"), Decimal("0.0045"))
    assert e.input_cost == Decimal("0.00005") + Decimal("0.00018") + Decimal("0.0045")
    assert e.output_cost == Decimal("0.001")


def test_guard_reads_google_genai_usage_metadata(fp: FakeProvider) -> None:
    from google import genai  # a test dependency (the dev extra): missing, the test fails

    case = contract_reply("gemini-thoughts-only-max-tokens")
    fp.script(Step(kind="raw", body=case["reply"]))
    client = genai.Client(api_key="x", http_options={"base_url": fp.base_url, "api_version": "v1beta"})

    @tl.guard(agent="Gem", model="gemini-2.5-flash", max_tokens=1024)
    def ask(q: str) -> Any:
        return client.models.generate_content(model="gemini-2.5-flash", contents=q)

    resp = ask("hi")
    assert resp.usage_metadata is not None and resp.usage_metadata.thoughts_token_count == 1024

    e = only_row()
    assert (e.input_tokens, e.output_tokens, e.chosen_model_id) == (30, 1024, "gemini-2.5-flash")
    # $0.30 / 1M input, $2.50 / 1M output (thinking included)
    assert e.total_cost == (30 * Decimal("0.30") + 1024 * Decimal("2.50")) / 1_000_000


def test_guarded_block_with_record_response_and_result(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script(Step(input_tokens=300, output_tokens=50, model=OPENAI_SERVED))
    with tl.guarded(agent="Batch", model="gpt-4o", max_tokens=500, tenant="acme", metadata={"job": 7}) as g:
        assert g.execution_id is not None and not g.recorded
        assert g.record_response(chat(oai)) is True
        assert g.recorded

    assert g.result is not None and g.result.execution_id == g.execution_id
    assert (g.result.input_tokens, g.result.output_tokens) == (300, 50)
    assert g.result.tenant_id == "acme" and g.result.chosen_model_id == OPENAI_SERVED
    e = only_row()
    assert e.id == g.execution_id and e.metadata == {"job": 7}
    assert e.total_cost == g.result.total_cost == sum(expected_cost("gpt-4o", 300, 0, 50), Decimal(0))


def test_guarded_record_by_hand() -> None:
    with tl.guarded(agent="Batch", model="gpt-4o", max_tokens=500) as g:
        g.record(input_tokens=1200, output_tokens=300, cached_tokens=200)
    e = only_row()
    assert (e.input_tokens, e.output_tokens, e.cached_tokens) == (1200, 300, 200)
    assert e.chosen_model_id == "gpt-4o"
    assert (e.input_cost, e.output_cost) == expected_cost("gpt-4o", 1200, 200, 300)


def test_guarded_record_another_model_prices_that_model() -> None:
    with tl.guarded(agent="Batch", model="gpt-4o", max_tokens=500) as g:
        g.record(input_tokens=1000, output_tokens=100, model="gpt-4o-mini")
    e = only_row()
    assert e.model_id == "gpt-4o" and e.chosen_model_id == "gpt-4o-mini"
    assert (e.input_cost, e.output_cost) == expected_cost("gpt-4o-mini", 1000, 0, 100)


def test_guarded_record_rejects_bad_counts() -> None:
    with tl.guarded(agent="Batch", model="gpt-4o") as g:
        with pytest.raises(tl.ConfigurationError, match="output_tokens"):
            g.record(input_tokens=1, output_tokens=-1)
        g.record(input_tokens=1, output_tokens=1)
    assert only_row().status == "success"


async def test_guard_async_openai_client(fp: FakeProvider) -> None:
    fp.script(Step(input_tokens=800, output_tokens=40, cached_tokens=100, model=OPENAI_SERVED))
    async with openai.AsyncOpenAI(base_url=fp.base_url + "/v1", api_key="sk-test", max_retries=0) as client:

        @tl.guard(agent="AsyncLegacy", model="gpt-4o", max_tokens=100)
        async def legacy(text: str) -> Any:
            return await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": text}]
            )

        assert inspect.iscoroutinefunction(legacy)
        with tl.tenant("acme"):
            pending = legacy("hello")
            assert inspect.isawaitable(pending)
            resp = await pending
    assert isinstance(resp, openai.types.chat.ChatCompletion)
    e = only_row()
    assert e.status == "success" and e.tenant_id == "acme" and e.chosen_model_id == OPENAI_SERVED
    assert (e.input_tokens, e.output_tokens, e.cached_tokens) == (800, 40, 100)
    assert (e.input_cost, e.output_cost) == expected_cost("gpt-4o", 800, 100, 40)


async def test_async_with_guarded_and_async_openai_client(fp: FakeProvider) -> None:
    fp.script(Step(input_tokens=500, output_tokens=60, model=OPENAI_SERVED))
    async with openai.AsyncOpenAI(base_url=fp.base_url + "/v1", api_key="sk-test", max_retries=0) as client:
        async with tl.guarded(agent="AsyncBatch", model="gpt-4o", max_tokens=100, tenant="acme") as g:
            resp = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            g.record_response(resp)
    assert g.result is not None and g.result.tenant_id == "acme"
    e = only_row()
    assert (e.agent, e.status, e.input_tokens, e.output_tokens) == ("AsyncBatch", "success", 500, 60)
    assert (e.input_cost, e.output_cost) == expected_cost("gpt-4o", 500, 0, 60)


# ---------------------------------------------------------------- checked before the body runs


def test_budget_is_reserved_before_the_guarded_body_runs(fp: FakeProvider, oai: openai.OpenAI) -> None:
    tl.TenantBudget.create("acme", daily_limit="0.01", enforcement="hard")
    ran = False

    @tl.guard(agent="Expensive", model="gpt-4o", max_tokens=100_000)  # estimate: $1.00 of output
    def expensive() -> Any:
        nonlocal ran
        ran = True
        return chat(oai)

    with tl.tenant("acme"), pytest.raises(tl.BudgetExceededError) as info:
        expensive()
    assert not ran and fp.requests == []
    err = info.value
    assert (err.scope, err.tenant_id, err.agent, err.tenant_budget) == ("tenant_daily", "acme", "Expensive", True)
    e = only_row()
    assert (e.status, e.agent, e.tenant_id, e.total_cost) == ("blocked", "Expensive", "acme", Decimal(0))
    assert e.error_class == "BudgetExceededError"

    with pytest.raises(tl.BudgetExceededError):  # the context manager too; tenant= given directly
        with tl.guarded(agent="Expensive", model="gpt-4o", max_tokens=100_000, tenant="acme"):
            ran = True
    assert not ran and fp.requests == []
    assert tl.Execution.by_status("blocked").count() == 2


def test_declared_input_tokens_count_in_the_estimate() -> None:
    tl.TenantBudget.create("acme", daily_limit="0.01", enforcement="hard")
    ran = False
    with pytest.raises(tl.BudgetExceededError):
        with tl.guarded(agent="BigPrompt", model="gpt-4o", max_tokens=1, input_tokens=1_000_000, tenant="acme"):
            ran = True
    assert not ran
    with tl.guarded(agent="SmallPrompt", model="gpt-4o", max_tokens=100, input_tokens=100, tenant="acme") as g:
        ran = True
        g.record(input_tokens=100, output_tokens=10)
    assert ran


async def test_budget_blocks_async_guard_before_the_body() -> None:
    tl.TenantBudget.create("acme", daily_limit="0.01", enforcement="hard")
    ran = False

    @tl.guard(agent="AsyncExpensive", model="gpt-4o", max_tokens=100_000)
    async def expensive() -> None:
        nonlocal ran
        ran = True

    with tl.tenant("acme"), pytest.raises(tl.BudgetExceededError):
        await expensive()
    assert not ran and only_row().status == "blocked"


def test_breaker_is_checked_before_the_guarded_body() -> None:
    runs = 0

    class ProviderDown(Exception):
        pass

    @tl.guard(agent="Fragile", model="gpt-4o", circuit_breaker=tl.BreakerPolicy(errors=2, within=60, cooldown=60))
    def fragile() -> None:
        nonlocal runs
        runs += 1
        raise ProviderDown(f"down #{runs}")

    with tl.tenant("acme"):
        for _ in range(2):
            with pytest.raises(ProviderDown):
                fragile()
        with pytest.raises(tl.CircuitOpenError) as info:
            fragile()
    assert runs == 2
    assert (info.value.agent, info.value.tenant_id, info.value.model) == ("Fragile", "acme", "gpt-4o")
    errors = list(tl.Execution.by_status("error"))
    assert len(errors) == 2
    assert {r.error_class for r in errors} == {"ProviderDown"}
    assert {r.error_message for r in errors} == {"down #1", "down #2"}
    assert tl.Execution.by_status("short_circuited").count() == 1
    assert tl.CircuitBreaker.open_for("Fragile", tenant_id="acme", model="gpt-4o")

    ran = False
    with tl.tenant("other"), pytest.raises(ProviderDown):  # only acme's breaker is open
        with tl.guarded(agent="Fragile", model="gpt-4o", circuit_breaker=tl.BreakerPolicy(errors=2)):
            ran = True
            raise ProviderDown("x")
    assert ran


def test_breaker_opened_by_sdk_failures_stops_requests(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script(Step(kind="status", status=503), Step(kind="status", status=503))
    policy = tl.BreakerPolicy(errors=2, within=60, cooldown=60)

    @tl.guard(agent="SdkFragile", model="gpt-4o", circuit_breaker=policy)
    def legacy() -> Any:
        return chat(oai)

    with tl.tenant("acme"):
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                legacy()
        assert len(fp.requests) == 2
        with pytest.raises(tl.CircuitOpenError):
            legacy()
    assert len(fp.requests) == 2  # the third body never ran
    assert [r.error_class for r in tl.Execution.by_status("error")] == ["InternalServerError"] * 2
    assert tl.Execution.by_status("short_circuited").count() == 1


def test_body_exception_propagates_unchanged(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.script(Step(kind="status", status=500))

    @tl.guard(agent="Legacy", model="gpt-4o")
    def legacy() -> Any:
        return chat(oai)

    with pytest.raises(openai.InternalServerError) as info:
        legacy()
    assert info.value.status_code == 500
    e = only_row()
    assert (e.status, e.error_class) == ("error", "InternalServerError")
    assert (e.input_tokens, e.output_tokens, e.total_cost) == (0, 0, Decimal(0))

    boom = LookupError("exactly this one")
    with pytest.raises(LookupError) as caught:
        with tl.guarded(agent="Legacy", model="gpt-4o"):
            raise boom
    assert caught.value is boom
    assert tl.Execution.by_status("error").by_agent("Legacy").count() == 2
    assert {r.error_class for r in tl.Execution.by_status("error")} == {"InternalServerError", "LookupError"}


def test_body_that_reports_nothing_is_recorded_with_zero_usage() -> None:
    with pytest.warns(tl.UsageNotReported, match="Silent"):
        with tl.guarded(agent="Silent", model="gpt-4o", tenant="acme") as g:
            pass
    e = only_row()
    assert (e.status, e.input_tokens, e.output_tokens, e.total_cost) == ("success", 0, 0, Decimal(0))
    assert g.result is not None and g.result.total_tokens == 0


def test_guard_on_a_function_returning_no_response_warns() -> None:
    @tl.guard(agent="NoUsage", model="gpt-4o")
    def text_only() -> str:
        return "just text"

    with pytest.warns(tl.UsageNotReported):
        assert text_only() == "just text"
    assert only_row().total_tokens == 0


def test_a_reported_block_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tl.guarded(agent="Quiet", model="gpt-4o") as g:
            g.record(input_tokens=1, output_tokens=1)


async def test_cancellation_inside_async_with_is_cancelled_not_a_failure() -> None:
    policy = tl.BreakerPolicy(errors=1, within=60, cooldown=60)
    with pytest.raises(asyncio.CancelledError):
        async with tl.guarded(agent="Cancelled", model="gpt-4o", circuit_breaker=policy, tenant="acme") as g:
            raise asyncio.CancelledError
    e = tl.Execution.get(cast(str, g.execution_id))
    assert e.status == "cancelled"
    status = tl.CircuitBreaker.status("Cancelled", tenant_id="acme", model="gpt-4o")
    assert (status["state"], status["failures"]) == ("closed", 0)

    ran = False
    async with tl.guarded(agent="Cancelled", model="gpt-4o", circuit_breaker=policy, tenant="acme") as g2:
        ran = True
        g2.record(input_tokens=1, output_tokens=1)
    assert ran


async def test_cancelling_a_task_in_an_async_guard_records_cancelled() -> None:
    started = asyncio.Event()

    @tl.guard(agent="Slow", model="gpt-4o", circuit_breaker=tl.BreakerPolicy(errors=1))
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert only_row().status == "cancelled"
    assert not tl.CircuitBreaker.open_for("Slow", model="gpt-4o")


def test_keyboard_interrupt_in_a_sync_block_is_cancelled() -> None:
    with pytest.raises(KeyboardInterrupt):
        with tl.guarded(agent="Interrupted", model="gpt-4o", circuit_breaker=tl.BreakerPolicy(errors=1)):
            raise KeyboardInterrupt
    assert only_row().status == "cancelled"
    assert not tl.CircuitBreaker.open_for("Interrupted", model="gpt-4o")


def test_guard_bad_options_fail_at_decoration() -> None:
    with pytest.raises(tl.ConfigurationError, match="max_tokens"):
        tl.guard(agent="G", model="gpt-4o", max_tokens=0)
    with pytest.raises(tl.ConfigurationError):
        tl.guard(agent="", model="gpt-4o")
    with pytest.raises(tl.ConfigurationError, match="input_tokens"):
        tl.guarded(agent="G", model="gpt-4o", input_tokens=-1)
    with pytest.raises(tl.ConfigurationError, match="circuit_breaker"):
        tl.guard(agent="G", model="gpt-4o", circuit_breaker=cast(Any, "often"))
    assert row_count() == 0


# ---------------------------------------------------------------- parents


def test_calls_inside_a_guarded_block_record_it_as_parent() -> None:
    with tl.guarded(agent="Pipeline", model="gpt-4o", tenant="acme") as g:
        r1 = summarize("first", tenant="acme")
        r2 = built("second")
        g.record(input_tokens=0, output_tokens=0)
    for r in (r1, r2):
        e = tl.Execution.get(r.execution_id)
        assert (e.parent_execution_id, e.root_execution_id) == (g.execution_id, g.execution_id)
    outer = tl.Execution.get(cast(str, g.execution_id))
    assert outer.parent_execution_id is None

    after = summarize("after")  # the block is over: no parent
    e = tl.Execution.get(after.execution_id)
    assert (e.parent_execution_id, e.root_execution_id) == (None, None)


def test_calls_inside_a_guard_decorated_function_record_it_as_parent() -> None:
    child: list[tl.AgentResult] = []

    @tl.guard(agent="Wrapper", model="gpt-4o")
    def wrapper() -> dict[str, Any]:
        child.append(summarize("inner"))
        return {"model": "gpt-4o", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}

    wrapper()
    parent = tl.Execution.by_agent("Wrapper").first()
    assert parent is not None and (parent.input_tokens, parent.output_tokens) == (5, 2)
    e = tl.Execution.get(child[0].execution_id)
    assert (e.parent_execution_id, e.root_execution_id) == (parent.id, parent.id)


async def test_async_parents_follow_each_task() -> None:
    @tl.guard(agent="AsyncWrapper", model="gpt-4o")
    async def wrapper(i: int) -> str:
        await asyncio.sleep(0.01 * (3 - i))  # interleave the tasks
        r = await asummarize(f"task {i}")
        return str(r.execution_id)

    with pytest.warns(tl.UsageNotReported):
        children = await asyncio.gather(*(wrapper(i) for i in range(3)))
    parents = {tl.Execution.get(c).parent_execution_id for c in children}
    assert parents == {e.id for e in tl.Execution.by_agent("AsyncWrapper")}
    assert len(parents) == 3


def test_nested_guarded_blocks_record_the_outermost_as_root() -> None:
    with tl.guarded(agent="Outer", model="gpt-4o") as outer:
        with tl.guarded(agent="Inner", model="gpt-4o") as inner:
            r = summarize("deep")
            inner.record(input_tokens=0, output_tokens=0)
        outer.record(input_tokens=0, output_tokens=0)
    i = tl.Execution.get(cast(str, inner.execution_id))
    assert (i.parent_execution_id, i.root_execution_id) == (outer.execution_id, outer.execution_id)
    e = tl.Execution.get(r.execution_id)
    assert e.parent_execution_id == inner.execution_id
    assert e.root_execution_id == outer.execution_id


# ================================================================ type checkers


def run_mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """mypy --strict on one module in tmp_path, importing this checkout's tenantllm."""
    module = tmp_path / "uses_decorators.py"
    module.write_text(textwrap.dedent(source))
    env = {**os.environ, "MYPYPATH": str(ROOT / "python")}
    env.pop("MYPY_CACHE_DIR", None)
    return subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / ".mypy_cache"),
            "--no-error-summary", "--hide-error-context", "--show-error-codes", "--python-version", "3.11",
            str(module),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


MYPY_HEADER = """
    from __future__ import annotations

    from typing import Any

    import tenantllm as tl


    @tl.agent(model="mock/fast", temperature=0.2, retries=1)
    def summarize(text: str, style: str = "short") -> None:
        \"\"\"Summarize {text} in {style} style\"\"\"


    @tl.agent(model="mock/fast")
    async def asummarize(text: str) -> None:
        \"\"\"Summarize {text}\"\"\"


    @tl.guard(agent="Legacy", model="gpt-4o", max_tokens=500)
    def legacy(text: str, n: int = 1) -> dict[str, Any]:
        return {"text": text, "n": n}


    @tl.guard(agent="AsyncLegacy", model="gpt-4o")
    async def alegacy(text: str) -> dict[str, Any]:
        return {"text": text}
"""


def test_mypy_strict_accepts_correct_calls(tmp_path: Path) -> None:
    proc = run_mypy(
        tmp_path,
        MYPY_HEADER
        + """
    def use() -> None:
        summarize("x")
        summarize(text="x", style="long")
        out: dict[str, Any] = legacy("x", n=2)
        with tl.guarded(agent="Batch", model="gpt-4o", max_tokens=500) as g:
            g.record(input_tokens=1200, output_tokens=300)
        print(out, g.result)


    async def ause() -> None:
        await asummarize("x")
        out: dict[str, Any] = await alegacy("x")
        async with tl.guarded(agent="Batch", model="gpt-4o") as g:
            g.record(input_tokens=1, output_tokens=1, model="gpt-4o-mini")
        print(out)
    """,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_rejects_a_wrong_argument_type(tmp_path: Path) -> None:
    proc = run_mypy(
        tmp_path,
        MYPY_HEADER
        + """
    legacy(3)
    summarize(text=4)
    legacy("x", n="two")
    """,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stdout.splitlines() if ": error:" in ln]
    assert len(errors) == 3, proc.stdout
    assert 'Argument 1 to "legacy" has incompatible type "int"; expected "str"' in errors[0]
    assert 'Argument "text" to' in errors[1] and 'has incompatible type "int"; expected "str"' in errors[1]
    assert 'Argument "n" to "legacy" has incompatible type "str"; expected "int"' in errors[2]


def test_mypy_sees_agent_result_from_an_agent_call(tmp_path: Path) -> None:
    proc = run_mypy(
        tmp_path,
        MYPY_HEADER
        + """
    reveal_type(summarize("x"))


    async def ause() -> None:
        reveal_type(await asummarize("x"))
    """,
    )
    notes = [ln for ln in proc.stdout.splitlines() if "Revealed type is" in ln]
    assert len(notes) == 2, proc.stdout
    assert all('"tenantllm._core.AgentResult"' in n for n in notes), proc.stdout


def test_mypy_checks_calls_bound_to_a_tenant(tmp_path: Path) -> None:
    # A ParamSpec signature cannot also carry `tenant=` (PEP 612), so type-checked code binds
    # the tenant with with_tenant(); the wrapped parameters stay checked.
    proc = run_mypy(
        tmp_path,
        MYPY_HEADER
        + """
    r = summarize.with_tenant("acme")("x")
    reveal_type(r)


    async def ause() -> None:
        await asummarize.with_tenant({"id": "acme", "daily_limit": 5})("x")
    """,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"tenantllm._core.AgentResult"' in proc.stdout


def test_with_tenant_runs_for_that_tenant() -> None:
    @tl.agent(model="mock/fn")
    def ask(q: str) -> None:
        """Q: {q}"""

    assert ask.with_tenant("acme")("hi").tenant_id == "acme"

