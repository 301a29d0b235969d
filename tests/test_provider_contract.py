"""The providers' own replies, replayed through the real HTTP path (tests/fake_providers.py
serves them on 127.0.0.1): tokens, cost to the nano-dollar against the published price rule,
status, finish reason and refusal. The replies and their sources are in provider_replies.json.
Also: the retry hints the providers send, the parameters a model rejects, and the request
bodies we send, validated against the official SDKs' own request types."""

from __future__ import annotations

import json
import typing
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Step

MILLION = Decimal(1_000_000)
REPLIES: list[dict[str, Any]] = json.loads((Path(__file__).parent / "provider_replies.json").read_text())["replies"]
PROVIDERS = ("openai", "anthropic", "gemini", "deepseek", "mistral")


@pytest.fixture
def fp(server: FakeProvider) -> FakeProvider:
    server.reset()
    return server


def configure(fp: FakeProvider, tmp_path: Path) -> None:
    tl.configure(
        database=str(tmp_path / "c.db"),
        base_urls=fp.base_urls(),
        api_keys={p: f"test-key-{p}" for p in PROVIDERS},
    )


def agent(model: str, **attrs: Any) -> type[tl.Agent]:
    body = {"model": model, "system": "Be brief.", "user": "{q}", "max_tokens": 64, **attrs}
    return type("Contract", (tl.Agent,), body)


def deepseek_peak(at: datetime) -> bool:
    utc = at.astimezone(UTC)
    return utc.weekday() < 5 and utc.hour in (1, 2, 3, 6, 7, 8, 9)


def usd(lines: list[list[Any]]) -> Decimal:
    """Sum of tokens x USD per 1M tokens."""
    return sum((Decimal(tokens) * Decimal(price) for tokens, price, *_ in lines), Decimal(0)) / MILLION


@pytest.mark.parametrize("case", REPLIES, ids=lambda c: c["name"])
def test_reply_is_billed_as_the_provider_bills_it(case: dict[str, Any], fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(Step(kind="raw", body=case["reply"]))
    e = case["expect"]

    # Retries allowed: a billed answer without text must not be retried as an error.
    r = agent(case["model"], retries=tl.Retries(max=2, base=0, max_delay=0)).call(q="hello")

    assert len(fp.requests) == 1, case["source"]
    assert r.provider == case["provider"]
    assert r.content == e["content"]
    assert (r.input_tokens, r.output_tokens, r.cached_tokens, r.cache_write_tokens) == (
        e["input_tokens"], e["output_tokens"], e["cached_tokens"], e["cache_write_tokens"],
    )
    row = tl.Execution.get(r.execution_id)
    rule = e["rule"] if "off_peak_rule" not in e or deepseek_peak(row.started_at) else e["off_peak_rule"]
    assert r.total_cost == usd(rule), rule
    assert r.input_cost + r.output_cost == r.total_cost
    assert r.cache_read_cost == usd([line for line in rule if line[2].startswith("cache read")])
    assert r.cache_write_cost == usd([line for line in rule if line[2].startswith("cache write")])
    assert (r.finish_reason, r.finish_reason_raw) == (e["finish_reason"], e["finish_reason_raw"])
    assert r.refusal == e["refusal"]

    assert row.status == "success" and row.error_class is None
    assert (row.total_cost, row.input_tokens, row.output_tokens) == (r.total_cost, r.input_tokens, r.output_tokens)
    assert (row.cache_write_tokens, row.cache_read_cost, row.cache_write_cost) == (
        r.cache_write_tokens, r.cache_read_cost, r.cache_write_cost,
    )
    assert row.finish_reason == e["finish_reason"]
    assert row.attempts_count == 1
    attempt = row.attempts[0]
    assert attempt["finish_reason"] == e["finish_reason_raw"]
    assert attempt.get("refusal") == e["refusal"]
    assert attempt["cost_nanos"] == int(r.total_cost * 1_000_000_000)


# ---------------------------------------------------------------- retry hints


def raw_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Step:
    return Step(kind="raw", status=status, body=body, headers=headers)


# The Gemini API's answers, as https://ai.google.dev/gemini-api/docs/troubleshooting and
# https://cloud.google.com/apis/design/errors#error_details describe them (google.rpc details).
GEMINI_QUOTA = {
    "error": {
        "code": 429,
        "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests"}],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"},
        ],
    }
}
GEMINI_BAD_KEY = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ],
    }
}
OPENAI_SERVER_ERROR = {
    "error": {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


def test_gemini_retry_info_sets_the_wait(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(raw_error(429, GEMINI_QUOTA))
    with pytest.raises(tl.RateLimitError) as info:
        agent("gemini-2.5-flash").call(q="hi")
    assert info.value.retry_after == 37.0


def test_gemini_invalid_key_is_an_authentication_error_and_not_retried(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(raw_error(400, GEMINI_BAD_KEY), Step())
    with pytest.raises(tl.AuthenticationError) as info:
        agent("gemini-2.5-flash", retries=tl.Retries(max=2, base=0, max_delay=0)).call(q="hi")
    assert (info.value.status, info.value.retryable, len(fp.requests)) == (400, False, 1)
    assert "test-key" not in str(info.value)


def test_x_should_retry_false_stops_retries(fp: FakeProvider, tmp_path: Path) -> None:
    """openai-python and anthropic-sdk-python obey `x-should-retry` over the status code."""
    configure(fp, tmp_path)
    fp.script(raw_error(500, OPENAI_SERVER_ERROR, {"x-should-retry": "false"}), Step())
    with pytest.raises(tl.ProviderError) as info:
        agent("gpt-4o", retries=tl.Retries(max=2, base=0, max_delay=0)).call(q="hi")
    assert (info.value.retryable, len(fp.requests)) == (False, 1)


def test_x_should_retry_true_and_retry_after_ms(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    # 409 is not retried by its status; the server says otherwise and asks for 50 ms.
    conflict = {"error": {"message": "conflict", "type": "invalid_request_error", "param": None, "code": None}}
    fp.script(raw_error(409, conflict, {"x-should-retry": "true", "retry-after-ms": "50", "retry-after": "9"}), Step())
    r = agent("gpt-4o", retries=tl.Retries(max=1, base=0, max_delay=0)).call(q="hi")
    assert (r.attempts_count, len(fp.requests)) == (2, 2)
    fp.script(raw_error(429, conflict, {"retry-after-ms": "250", "retry-after": "9"}))
    with pytest.raises(tl.RateLimitError) as info:
        agent("gpt-4o").call(q="hi")
    assert info.value.retry_after == 0.25


# ---------------------------------------------------------------- parameters a model rejects


@pytest.mark.parametrize(("model", "dropped"), [("o3-mini", True), ("claude-sonnet-5", True), ("gpt-4o", False)])
def test_a_parameter_the_model_rejects_is_not_sent(model: str, dropped: bool, fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    a = agent(model, temperature=0.3)

    plan = a.call(q="hi", dry_run=True)
    assert plan["models"][0]["dropped_params"] == (["temperature"] if dropped else [])

    r = a.call(q="hi")
    assert ("temperature" in (fp.requests[0].body or {})) is not dropped
    attempt = tl.Execution.get(r.execution_id).attempts[0]
    assert attempt.get("dropped_params", []) == (["temperature"] if dropped else [])


def reply_with_usage(name: str, model: str) -> dict[str, Any]:
    """The fixture `name`'s reply as `model` would send it (same usage)."""
    case = next(c for c in REPLIES if c["name"] == name)
    return {**case["reply"], "model": model}


# The published prices (USD per 1M input / output tokens; prices.csv names the pages).
@pytest.mark.parametrize(
    ("model", "fixture", "input_price", "output_price"),
    [
        ("o1", "openai-dated-snapshot", "15.00", "60.00"),
        ("o3-mini", "openai-dated-snapshot", "1.10", "4.40"),
        ("o3-mini-2025-01-31", "openai-dated-snapshot", "1.10", "4.40"),
        ("claude-sonnet-4", "anthropic-end-turn", "3.00", "15.00"),
        ("claude-sonnet-4-20250514", "anthropic-end-turn", "3.00", "15.00"),
    ],
)
def test_unpriced_popular_models_are_priced(
    model: str, fixture: str, input_price: str, output_price: str, fp: FakeProvider, tmp_path: Path
) -> None:
    configure(fp, tmp_path)
    assert agent(model).call(q="hi", dry_run=True)["estimated_cost"] > 0
    fp.script(Step(kind="raw", body=reply_with_usage(fixture, model)))
    r = agent(model).call(q="hi")
    assert r.total_cost == usd([[r.input_tokens, input_price], [r.output_tokens, output_price]]) > 0, model


# ---------------------------------------------------------------- request bodies vs the SDKs


def body_of(fp: FakeProvider, model: str, **attrs: Any) -> dict[str, Any]:
    fp.reset()
    agent(model, temperature=0.5, **attrs).call(q="What is 2+2?")
    assert len(fp.requests) == 1 and fp.requests[0].body is not None
    return fp.requests[0].body


def typed_dict_check(td: Any, body: dict[str, Any], extra_body: frozenset[str] = frozenset()) -> None:
    """No key the TypedDict lacks (but those the SDK documents as `extra_body`), every
    required key, each value of its declared type."""
    import pydantic

    typed = {k: v for k, v in body.items() if k not in extra_body}
    hints = typing.get_type_hints(td)
    assert set(typed) <= set(hints), set(typed) - set(hints)
    assert td.__required_keys__ <= set(typed), td.__required_keys__ - set(typed)
    pydantic.TypeAdapter(td).validate_python(typed)


def test_request_bodies_match_the_official_sdk_types(fp: FakeProvider, tmp_path: Path) -> None:
    # The SDKs are test dependencies (the dev extra, make test): a missing one fails here.
    import anthropic.types as anthropic_types
    import google.genai.types as genai_types
    import mistralai.client.models as mistral_models
    import openai.types.chat as openai_types
    configure(fp, tmp_path)

    for model in ("gpt-4o", "deepseek-flash"):
        typed_dict_check(openai_types.completion_create_params.CompletionCreateParamsNonStreaming, body_of(fp, model))
    # anthropic 1.x dropped temperature from its request types; the API still takes it on the
    # models that sample, sent as extra_body (MIGRATION.md, "Removed deprecated request parameters").
    body = body_of(fp, "claude-sonnet-4-5")
    assert body["temperature"] == 0.5
    typed_dict_check(
        anthropic_types.message_create_params.MessageCreateParamsNonStreaming, body, frozenset({"temperature"})
    )

    body = body_of(fp, "gemini-2.5-flash")
    assert set(body) == {"contents", "generationConfig", "systemInstruction"}
    for content in body["contents"]:
        genai_types.Content.model_validate(content)  # extra="forbid": an unknown field fails
    genai_types.Content.model_validate(body["systemInstruction"])
    genai_types.GenerationConfig.model_validate(body["generationConfig"])

    body = body_of(fp, "mistral-small-latest")
    request = mistral_models.ChatCompletionRequest.model_validate(body)
    known = {f.alias or name for name, f in mistral_models.ChatCompletionRequest.model_fields.items()}
    assert set(body) <= known, set(body) - known
    assert request.max_tokens == 64 and request.temperature == 0.5


def test_pricing_override_takes_cache_write_prices(fp: FakeProvider, tmp_path: Path) -> None:
    with pytest.raises(tl.ConfigurationError, match=r'pricing\["my-model"\]\.cache_write'):
        tl.configure(
            database=str(tmp_path / "c.db"), pricing={"my-model": {"input": "1", "output": "2", "cache_write": "x"}}
        )
    tl.configure(
        database=str(tmp_path / "c.db"),
        base_urls=fp.base_urls(),
        api_keys={"anthropic": "test-key-anthropic"},
        pricing={"anthropic/my-model": {"input": "1", "output": "2", "cache_write": "3", "cache_write_1h": "4"}},
    )
    case = next(c for c in REPLIES if c["name"] == "anthropic-cache-writes-5m-1h")
    fp.script(Step(kind="raw", body=case["reply"]))
    r = agent("anthropic/my-model").call(q="hi")
    # 50 plain x $1 + 1,800 read (no cached price: $1) + 2,000 x $3 + 1,000 x $4, per 1M tokens
    assert r.cache_write_cost == Decimal("0.010")
    assert r.input_cost == Decimal("0.00005") + Decimal("0.0018") + Decimal("0.010")
