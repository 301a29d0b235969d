"""The HTTP providers against a local fake server speaking the real wire formats: what is sent
(endpoint, headers, body), what is parsed (content, tokens, served model), what it costs
(exactly, from `src/pricing/prices.csv`), how each failure surfaces, and where API keys come from."""

from __future__ import annotations

import csv
import email.utils
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Recorded, Step

MILLION = Decimal(1_000_000)
PRICES_CSV = Path(__file__).resolve().parent.parent / "src" / "pricing" / "prices.csv"
LOCAL_PRICE = {"input": "0.10", "output": "0.20"}

SYSTEM = "You help customers of Acme."
USER = "Question: where is my order?"
MAX_TOKENS = 321
TEMPERATURE = 0.25


# ---------------------------------------------------------------- prices from the CSV


@dataclass(frozen=True)
class Price:
    input: Decimal
    output: Decimal
    cached_input: Decimal | None


def csv_prices() -> dict[str, Price]:
    """model id -> price, read from the built-in table the library ships."""
    out: dict[str, Price] = {}
    lines = [ln for ln in PRICES_CSV.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for row in csv.DictReader(lines):
        cached = (row["cached_input"] or "").strip()
        out[row["model"]] = Price(Decimal(row["input"]), Decimal(row["output"]), Decimal(cached) if cached else None)
    return out


PRICES = csv_prices()


def expected_cost(price: Price, prompt_tokens: int, cached: int, output: int) -> tuple[Decimal, Decimal]:
    """(input cost, output cost) in USD: uncached input at the input price, cached input at
    the cached price (the input price when none is published), output at the output price."""
    cached_price = price.input if price.cached_input is None else price.cached_input
    input_cost = ((prompt_tokens - cached) * price.input + cached * cached_price) / MILLION
    output_cost = output * price.output / MILLION
    return input_cost, output_cost


def billed_price(p: Provider, at: datetime) -> Price:
    """The price of a request sent at `at`: DeepSeek's "@offpeak" row outside its peak hours
    (01:00-04:00 and 06:00-10:00 UTC, Monday to Friday)."""
    utc = at.astimezone(UTC)
    off_peak = PRICES.get(p.wire_model + "@offpeak")
    peak = utc.weekday() < 5 and utc.hour in (1, 2, 3, 6, 7, 8, 9)
    return p.price if off_peak is None or peak else off_peak


# ---------------------------------------------------------------- providers under test


@dataclass(frozen=True)
class Provider:
    name: str  # provider name as the library reports it
    model: str  # what the agent asks for
    wire_model: str  # the model id sent to the provider
    fmt: str  # wire format: openai | anthropic | gemini
    served: str  # the model the server says answered
    key: str | None  # the API key configured for it
    price: Price
    native_openai: bool = False  # OpenAI itself takes max_completion_tokens

    @property
    def id(self) -> str:
        return self.name


# Keys are long and distinctive so "the key does not appear in X" means something.
KEYS = {
    "openai": "sk-test-openai-7f3a9c",
    "anthropic": "sk-ant-test-51be02",
    "gemini": "g-test-key-88d1e4",
    "deepseek": "sk-test-deepseek-0c4f",
    "mistral": "sk-test-mistral-a9e2",
}

PROVIDERS = [
    Provider("openai", "gpt-4o", "gpt-4o", "openai", "gpt-4o-2024-08-06", KEYS["openai"], PRICES["gpt-4o"], True),
    Provider(
        "anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5-20250929",
        KEYS["anthropic"], PRICES["claude-sonnet-4-5"],
    ),
    Provider(
        "gemini", "gemini-2.5-flash", "gemini-2.5-flash", "gemini", "gemini-2.5-flash-001", KEYS["gemini"],
        PRICES["gemini-2.5-flash"],
    ),
    Provider(
        "deepseek", "deepseek/deepseek-flash", "deepseek-flash", "openai", "deepseek-flash-2026-08",
        KEYS["deepseek"], PRICES["deepseek-flash"],
    ),
    Provider(
        "mistral", "mistral-small-latest", "mistral-small-latest", "openai", "mistral-small-2603",
        KEYS["mistral"], PRICES["mistral-small-latest"],
    ),
    Provider(
        "local", "local/llama3", "llama3", "openai", "llama3:8b-instruct", None,
        Price(Decimal(LOCAL_PRICE["input"]), Decimal(LOCAL_PRICE["output"]), None),
    ),
]
KEYED = [p for p in PROVIDERS if p.key is not None]
ENV_VARS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "mistral": "MISTRAL_API_KEY",
}
ALL_ENV_VARS = [*ENV_VARS.values(), "GOOGLE_API_KEY"]


@pytest.fixture
def fp(server: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> FakeProvider:
    """The module's fake server, reset, with no provider key in the environment."""
    server.reset()
    for var in ALL_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return server


def configure(fp: FakeProvider, tmp_path: Path, *, api_keys: dict[str, str] | None = None) -> None:
    """Points every provider at the fake server; `configure()` replaces everything, so the
    database is given too."""
    tl.configure(
        database=str(tmp_path / "p.db"),
        base_urls=fp.base_urls(),
        api_keys=dict(KEYS) if api_keys is None else api_keys,
        pricing={"local/llama3": LOCAL_PRICE},
    )


def make_agent(model: str, **attrs: Any) -> type[tl.Agent]:
    """An agent class for `model`, with a system and a user prompt and no parameters."""
    body: dict[str, Any] = {
        "model": model,
        "system": SYSTEM,
        "user": USER,
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        **attrs,
    }
    name = "Agent_" + "".join(c if c.isalnum() else "_" for c in model)
    return type(name, (tl.Agent,), body)


def only_row() -> tl.Execution:
    rows = list(tl.Execution.all())
    assert len(rows) == 1, [r.status for r in rows]
    return tl.Execution.get(rows[0].id)


def assert_no_key_in(text: str) -> None:
    for key in KEYS.values():
        assert key not in text


# ---------------------------------------------------------------- success


PROMPT_TOKENS = 1000
CACHED_TOKENS = 400
OUTPUT_TOKENS = 250


def success_step(p: Provider) -> Step:
    # Anthropic's `input_tokens` excludes cache reads (reported apart); the others count them.
    input_tokens = PROMPT_TOKENS - CACHED_TOKENS if p.fmt == "anthropic" else PROMPT_TOKENS
    return Step(
        content=f"Hello from {p.name}",
        input_tokens=input_tokens,
        cached_tokens=CACHED_TOKENS,
        output_tokens=OUTPUT_TOKENS,
        model=p.served,
    )


@pytest.mark.parametrize("p", PROVIDERS, ids=lambda p: p.id)
def test_success_parses_reply_tokens_model_and_exact_cost(p: Provider, fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(success_step(p))

    r = make_agent(p.model).call()

    assert r.content == f"Hello from {p.name}"
    assert r.model_id == p.model
    assert r.chosen_model_id == p.served
    assert r.provider == p.name
    assert (r.input_tokens, r.cached_tokens, r.output_tokens) == (PROMPT_TOKENS, CACHED_TOKENS, OUTPUT_TOKENS)
    assert r.total_tokens == PROMPT_TOKENS + OUTPUT_TOKENS
    assert r.attempts_count == 1

    row = only_row()
    price = billed_price(p, row.started_at)
    input_cost, output_cost = expected_cost(price, PROMPT_TOKENS, CACHED_TOKENS, OUTPUT_TOKENS)
    # The chosen token counts make every component a whole number of nano-dollars: no rounding.
    assert (input_cost + output_cost).quantize(Decimal("1e-9")) == input_cost + output_cost
    assert input_cost > 0 and output_cost > 0
    for cost in (r.input_cost, r.output_cost, r.total_cost):
        assert type(cost) is Decimal
    assert r.input_cost == input_cost
    assert r.output_cost == output_cost
    assert r.total_cost == input_cost + output_cost

    assert row.id == r.execution_id
    assert row.status == "success"
    assert (row.model_id, row.chosen_model_id, row.provider) == (p.model, p.served, p.name)
    assert (row.input_tokens, row.cached_tokens, row.output_tokens) == (PROMPT_TOKENS, CACHED_TOKENS, OUTPUT_TOKENS)
    assert (row.input_cost, row.output_cost, row.total_cost) == (input_cost, output_cost, input_cost + output_cost)
    assert row.response == f"Hello from {p.name}"
    assert len(row.attempts) == 1 and row.attempts[0]["status"] == "success"


def test_cached_price_differs_from_input_price_where_published() -> None:
    """Guards the success test: the cached price really is exercised for these models."""
    for model in ("gpt-4o", "claude-sonnet-4-5", "gemini-2.5-flash", "deepseek-flash"):
        price = PRICES[model]
        assert price.cached_input is not None and price.cached_input < price.input
    assert PRICES["mistral-small-latest"].cached_input is None


def assert_openai_request(p: Provider, req: Recorded) -> None:
    assert req.method == "POST"
    assert req.path == "/v1/chat/completions"
    if p.key is None:
        assert "authorization" not in req.headers  # a self-hosted server gets no key
    else:
        assert req.headers["authorization"] == f"Bearer {p.key}"
    body = req.body
    assert body is not None
    assert body["model"] == p.wire_model
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    assert body["temperature"] == TEMPERATURE
    if p.native_openai:
        assert body["max_completion_tokens"] == MAX_TOKENS
        assert "max_tokens" not in body
    else:
        assert body["max_tokens"] == MAX_TOKENS
        assert "max_completion_tokens" not in body


def assert_anthropic_request(p: Provider, req: Recorded) -> None:
    assert req.method == "POST"
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == p.key
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in req.headers
    body = req.body
    assert body is not None
    assert body["model"] == p.wire_model
    assert body["system"] == SYSTEM
    assert body["messages"] == [{"role": "user", "content": USER}]
    assert body["max_tokens"] == MAX_TOKENS
    assert body["temperature"] == TEMPERATURE


def assert_gemini_request(p: Provider, req: Recorded) -> None:
    assert req.method == "POST"
    assert req.path == f"/v1beta/models/{p.wire_model}:generateContent"
    assert req.headers["x-goog-api-key"] == p.key
    assert "key" not in req.query  # never ?key=... in the URL
    assert req.query == {}
    assert "authorization" not in req.headers
    body = req.body
    assert body is not None
    assert body["systemInstruction"] == {"parts": [{"text": SYSTEM}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": USER}]}]
    assert body["generationConfig"]["maxOutputTokens"] == MAX_TOKENS
    assert body["generationConfig"]["temperature"] == TEMPERATURE


@pytest.mark.parametrize("p", PROVIDERS, ids=lambda p: p.id)
def test_request_on_the_wire_has_the_provider_shape(p: Provider, fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)

    make_agent(p.model).call()

    assert len(fp.requests) == 1
    req = fp.requests[0]
    {"openai": assert_openai_request, "anthropic": assert_anthropic_request, "gemini": assert_gemini_request}[p.fmt](
        p, req
    )
    # Only the provider's own key is sent.
    other_keys = [k for name, k in KEYS.items() if name != p.name]
    wire = repr(req.headers) + req.path + repr(req.query) + req.raw.decode()
    for k in other_keys:
        assert k not in wire


def test_no_system_prompt_means_no_system_message(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    for model in ("gpt-4o", "claude-sonnet-4-5", "gemini-2.5-flash"):
        make_agent(model, system=None).call()
    openai, anthropic, gemini = (r.body for r in fp.requests)
    assert openai is not None and anthropic is not None and gemini is not None
    assert openai["messages"] == [{"role": "user", "content": USER}]
    assert "system" not in anthropic
    assert "systemInstruction" not in gemini


@pytest.mark.parametrize("p", PROVIDERS, ids=lambda p: p.id)
def test_api_key_never_stored_or_shown(p: Provider, fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)

    r = make_agent(p.model).call()

    assert_no_key_in(repr(r))
    assert_no_key_in(str(tl.Execution.get(r.execution_id).to_dict()))
    assert_no_key_in(str(tl.Execution.all().to_dicts()))


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Failure:
    id: str
    step: Step
    error: type[tl.ProviderError]
    status: int | None
    retryable: bool
    retry_after: float | None = None
    any_status: bool = False  # body/parse failures: status 200 or None


FAILURES = [
    Failure("401", Step(kind="status", status=401), tl.AuthenticationError, 401, False),
    Failure("403", Step(kind="status", status=403), tl.AuthenticationError, 403, False),
    Failure("429", Step(kind="status", status=429, retry_after="7"), tl.RateLimitError, 429, True, 7.0),
    Failure("500", Step(kind="status", status=500), tl.ProviderError, 500, True),
    Failure("503", Step(kind="status", status=503), tl.ProviderError, 503, True),
    Failure("400", Step(kind="status", status=400), tl.ProviderError, 400, False),
    Failure("malformed", Step(kind="malformed"), tl.InvalidResponseError, None, True, any_status=True),
    Failure("truncated", Step(kind="truncated"), tl.InvalidResponseError, None, True, any_status=True),
    Failure("empty_choices", Step(kind="empty_choices"), tl.InvalidResponseError, None, True, any_status=True),
    Failure("reset", Step(kind="reset"), tl.ProviderError, None, True),
]


# An Anthropic reply with empty content and usage is a billed answer, not a malformed one
# (a refusal, or nothing to say): tests/test_provider_contract.py replays those.
FAILURE_CASES = [
    pytest.param(p, f, id=f"{f.id}-{p.id}")
    for f in FAILURES
    for p in PROVIDERS
    if not (f.id == "empty_choices" and p.fmt == "anthropic")
]


@pytest.mark.parametrize(("p", "f"), FAILURE_CASES)
def test_failure_raises_its_class_and_leaves_one_error_row(
    p: Provider, f: Failure, fp: FakeProvider, tmp_path: Path
) -> None:
    configure(fp, tmp_path)
    fp.script(f.step)

    with pytest.raises(tl.ProviderError) as info:
        make_agent(p.model).call()

    e = info.value
    assert type(e) is f.error
    assert isinstance(e, tl.TenantLLMError)
    assert e.provider == p.name
    assert e.model == p.model  # as the agent names it, like the row's model_id
    assert e.retryable is f.retryable
    if f.any_status:
        assert e.status in (None, 200)
    else:
        assert e.status == f.status
    if f.retry_after is not None:
        assert e.retry_after == pytest.approx(f.retry_after)
    assert len(fp.requests) == 1  # retries default to 0
    message = str(e) + repr(e.args) + repr(vars(e))
    assert_no_key_in(message)

    row = only_row()
    assert row.status == "error"
    assert row.error_class == f.error.__name__
    assert row.error_message
    assert row.model_id == p.model
    assert row.attempts_count == 1
    assert row.attempts[0]["status"] == "error"
    assert row.attempts[0]["error_class"] == f.error.__name__
    if not f.any_status:
        assert row.attempts[0]["http_status"] == f.status
    assert row.total_cost == 0 and row.input_tokens == 0 and row.output_tokens == 0
    assert_no_key_in(str(row.to_dict()))


def test_rate_limit_without_retry_after(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(Step(kind="status", status=429))

    with pytest.raises(tl.RateLimitError) as info:
        make_agent("gemini-2.5-flash").call()

    assert info.value.retry_after is None
    assert info.value.status == 429


@pytest.mark.parametrize("p", [PROVIDERS[0], PROVIDERS[1]], ids=lambda p: p.id)
def test_request_timeout_status_is_a_timeout(p: Provider, fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(Step(kind="status", status=408))

    with pytest.raises(tl.ProviderTimeoutError) as info:
        make_agent(p.model).call()

    assert (info.value.status, info.value.retryable) == (408, True)
    row = only_row()
    assert (row.status, row.error_class) == ("timeout", "ProviderTimeoutError")


def test_overloaded_529_is_a_retryable_provider_error(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(Step(kind="status", status=529))

    with pytest.raises(tl.ProviderError) as info:
        make_agent("claude-sonnet-4-5").call()

    assert type(info.value) is tl.ProviderError
    assert (info.value.status, info.value.retryable) == (529, True)


def test_connection_refused_is_a_provider_error(fp: FakeProvider, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tl.configure(
        database=str(tmp_path / "p.db"),
        base_urls={"openai": f"http://127.0.0.1:{port}/v1"},
        api_keys=dict(KEYS),
    )

    with pytest.raises(tl.ProviderError) as info:
        make_agent("gpt-4o").call()

    e = info.value
    assert type(e) is tl.ProviderError
    assert (e.provider, e.status, e.retryable) == ("openai", None, True)
    assert_no_key_in(str(e))
    row = only_row()
    assert (row.status, row.error_class) == ("error", "ProviderError")


def test_retry_after_as_http_date_is_parsed(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    fp.script(Step(kind="status", status=429, retry_after=when))

    with pytest.raises(tl.RateLimitError) as info:
        make_agent("gpt-4o").call()

    assert info.value.retry_after is not None
    assert 27 <= info.value.retry_after <= 31


def test_provider_error_message_is_surfaced(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)
    fp.script(Step(kind="status", status=401))

    with pytest.raises(tl.AuthenticationError, match="fake anthropic error"):
        make_agent("claude-sonnet-4-5").call()


# ---------------------------------------------------------------- API keys


@pytest.mark.parametrize("p", KEYED, ids=lambda p: p.id)
def test_missing_api_key_is_a_configuration_error_before_anything_happens(
    p: Provider, fp: FakeProvider, tmp_path: Path
) -> None:
    configure(fp, tmp_path, api_keys={})

    with pytest.raises(tl.ConfigurationError) as info:
        make_agent(p.model).call()

    assert ENV_VARS[p.name] in str(info.value)
    assert fp.requests == []
    assert tl.Execution.all().count() == 0


def test_missing_openai_key_without_api_keys_option(
    fp: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tl.configure(database=str(tmp_path / "p.db"), base_urls=fp.base_urls())

    with pytest.raises(tl.ConfigurationError, match="OPENAI_API_KEY"):
        make_agent("gpt-4o").call()

    assert fp.requests == []
    assert tl.Execution.all().count() == 0


def test_openai_key_from_the_environment(fp: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-3b7e11")
    tl.configure(database=str(tmp_path / "p.db"), base_urls=fp.base_urls())

    r = make_agent("gpt-4o").call()

    assert fp.requests[0].headers["authorization"] == "Bearer sk-from-env-3b7e11"
    assert "sk-from-env-3b7e11" not in str(tl.Execution.get(r.execution_id).to_dict())


def test_gemini_key_from_google_api_key(fp: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", "g-from-env-42")
    tl.configure(database=str(tmp_path / "p.db"), base_urls=fp.base_urls())

    make_agent("gemini-2.5-flash").call()

    assert fp.requests[0].headers["x-goog-api-key"] == "g-from-env-42"


def test_configured_key_wins_over_environment(
    fp: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-3b7e11")
    configure(fp, tmp_path)

    make_agent("gpt-4o").call()

    assert fp.requests[0].headers["authorization"] == f"Bearer {KEYS['openai']}"


def test_tenant_key_wins_over_configured_key(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path)

    r = make_agent("gpt-4o").call(tenant={"id": "acme", "api_keys": {"openai": "sk-tenant-acme-99"}})

    assert fp.requests[0].headers["authorization"] == "Bearer sk-tenant-acme-99"
    assert r.tenant_id == "acme"
    assert "sk-tenant-acme-99" not in str(tl.Execution.get(r.execution_id).to_dict())


def test_blank_configured_key_falls_through_to_environment(
    fp: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env-5")
    configure(fp, tmp_path, api_keys={"anthropic": "  "})

    make_agent("claude-sonnet-4-5").call()

    assert fp.requests[0].headers["x-api-key"] == "sk-ant-from-env-5"


def test_api_key_with_surrounding_whitespace_is_trimmed(
    fp: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys read from files end in a newline; it is never part of the key (regression: the raw
    value reached the HTTP header and failed as a retryable 'builder error')."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEYS["anthropic"] + "\r\n")
    configure(fp, tmp_path, api_keys={"openai": " " + KEYS["openai"] + "\n", "anthropic": ""})

    make_agent("gpt-4o").call()
    make_agent("claude-sonnet-4-5").call()

    assert fp.requests[0].headers["authorization"] == f"Bearer {KEYS['openai']}"
    assert fp.requests[1].headers["x-api-key"] == KEYS["anthropic"]


def test_local_provider_needs_no_key(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path, api_keys={})

    r = make_agent("local/llama3").call()

    assert r.provider == "local"
    assert "authorization" not in fp.requests[0].headers


def test_local_provider_sends_a_configured_key(fp: FakeProvider, tmp_path: Path) -> None:
    configure(fp, tmp_path, api_keys={"local": "sk-local-1d2c"})

    r = make_agent("local/llama3").call()

    assert fp.requests[0].headers["authorization"] == "Bearer sk-local-1d2c"
    assert "sk-local-1d2c" not in str(tl.Execution.get(r.execution_id).to_dict())


def test_unknown_custom_provider_without_base_url_is_a_configuration_error(
    fp: FakeProvider, tmp_path: Path
) -> None:
    configure(fp, tmp_path)

    with pytest.raises(tl.ConfigurationError, match="ollama"):
        make_agent("ollama/llama3").call()

    assert fp.requests == []
    assert tl.Execution.all().count() == 0
