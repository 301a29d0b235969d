"""`Agent.stream` / `astream` against the fake server speaking each provider's server-sent
events (built from the step, or recorded streams from the providers' SDK test suites replayed
verbatim, tests/fixtures/streams/README.md): pieces as they arrive, usage from the provider's
last events, the reservation held and settled, early exits billed as `cancelled`, retries and
fallbacks only before the first piece, and the README's FastAPI example."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import raw_sql
import tenantllm as tl
from fake_providers import FakeProvider, Step
from uvicorn_server import Server

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "streams"
README = Path(__file__).resolve().parent.parent / "README.md"
PRICE = {"input": "1.00", "output": "2.00"}  # USD per 1M tokens, for every model below
KEYS = {"openai": "sk-o", "anthropic": "sk-a", "gemini": "g-k", "deepseek": "sk-d", "mistral": "sk-m"}
# (agent model, wire format, path the request must go to)
MODELS = {
    "openai": ("gpt-4o", "openai", "/v1/chat/completions"),
    "anthropic": ("claude-sonnet-4-5", "anthropic", "/v1/messages"),
    "gemini": ("gemini-2.5-flash", "gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
    "deepseek": ("deepseek/deepseek-chat", "openai", "/v1/chat/completions"),
    "mistral": ("mistral-small-latest", "openai", "/v1/chat/completions"),
    "local": ("local/llama3", "openai", "/v1/chat/completions"),
}
TEXT = "Streams arrive piece by piece, billed at the end."


@pytest.fixture
def fp(server: FakeProvider) -> FakeProvider:
    server.reset()
    return server


def setup(fp: FakeProvider, model: str, **agent: Any) -> type[tl.Agent]:
    tl.configure(
        base_urls=fp.base_urls(),
        api_keys=KEYS,
        pricing={m: PRICE for m, _, _ in MODELS.values()},
    )
    attrs = {"model": model, "user": "Say: {q}", "max_tokens": 200, **agent}
    return type("Streamer", (tl.Agent,), attrs)


def rows() -> list[tl.Execution]:
    return list(tl.Execution.all().order_by("started_at"))


def settled(n: int = 1, timeout: float = 10) -> list[tl.Execution]:
    """The rows once `n` of them are no longer running (a stream dropped unread settles in
    the background)."""
    deadline = time.monotonic() + timeout
    while True:
        done = [r for r in rows() if r.status != "running"]
        if len(done) >= n or time.monotonic() > deadline:
            return done
        time.sleep(0.02)


def cost(input_tokens: int, output_tokens: int) -> Decimal:
    return (input_tokens * Decimal(PRICE["input"]) + output_tokens * Decimal(PRICE["output"])) / 1_000_000


def reservations(db: Path) -> int:
    return int(raw_sql.query(db, "SELECT COUNT(*) FROM reservations")[0][0] or 0)


def counted(text: str) -> int:
    """Tokens the core counts for text a provider did not report usage for."""
    return (len(text.encode()) + 3) // 4


# ---------------------------------------------------------------- every provider


@pytest.mark.parametrize("provider", list(MODELS))
def test_each_provider_streams_pieces_and_bills_its_reported_usage(
    fp: FakeProvider, provider: str, db_path: Path
) -> None:
    model, fmt, path = MODELS[provider]
    agent = setup(fp, model)
    fp.script(Step(content=TEXT, input_tokens=31, output_tokens=12))
    with agent.stream(q="hi", tenant="acme") as s:
        pieces = list(s)
    assert pieces == re.findall(r"\S*\s*", TEXT)[:-1]
    r = s.result
    assert (r.content, r.input_tokens, r.output_tokens, r.total_cost) == (TEXT, 31, 12, cost(31, 12))
    assert r.provider == provider and r.time_to_first_token_ms is not None
    [row] = rows()
    assert (row.status, row.output_tokens, row.total_cost, row.id) == ("success", 12, cost(31, 12), r.execution_id)
    assert row.time_to_first_token_ms == r.time_to_first_token_ms
    sent = fp.requests[0]
    assert sent.path == path
    if fmt == "gemini":
        assert sent.query == {"alt": "sse"}
    else:
        assert sent.body is not None and sent.body["stream"] is True
    if fmt == "openai":
        # Mistral sends usage unasked and refuses unknown fields; the others are asked for it.
        assert sent.body is not None
        assert ("stream_options" in sent.body) == (provider != "mistral")
    assert reservations(db_path) == 0
    raw_sql.assert_counters_match_rows(db_path)


def test_mock_streams_word_by_word() -> None:
    agent = type("M", (tl.Agent,), {"model": "mock/fast", "user": "{q}"})
    s = agent.stream(q="one two three", tenant="acme")
    assert "".join(s) == "[mock/fast] You asked: one two three" == s.result.content
    assert rows()[0].status == "success"


# ---------------------------------------------------------------- recorded streams


@pytest.mark.parametrize(
    ("provider", "fixture", "content", "usage", "finish"),
    [
        # openai/openai-python, test_completions_streaming.py::test_parse_nothing (live recording)
        ("openai", "openai_chat_include_usage.sse", None, (14, 30), "stop"),
        # anthropics/anthropic-sdk-python, tests/lib/streaming/fixtures/basic_response.txt
        ("anthropic", "anthropic_basic.sse", "Hello there!", (11, 6), "stop"),
        # the Gemini REST reference's streamGenerateContent?alt=sse response
        ("gemini", "gemini_stream.sse", None, (8, 27), "stop"),
    ],
)
def test_recorded_streams(
    fp: FakeProvider, provider: str, fixture: str, content: str | None, usage: tuple[int, int], finish: str
) -> None:
    agent = setup(fp, MODELS[provider][0])
    fp.script(Step(sse=(FIXTURES / fixture).read_text()))
    s = agent.stream(q="hi", tenant="acme")
    text = "".join(s)
    r = s.result
    assert text == r.content
    if content is not None:
        assert text == content
    else:
        assert len(text) > 40
    assert (r.input_tokens, r.output_tokens, r.finish_reason, r.total_cost) == (*usage, finish, cost(*usage))


def test_a_recorded_refusal_streams_no_text_and_is_billed(fp: FakeProvider) -> None:
    # openai/openai-python .inline-snapshot 173417d55340: refusal deltas, content null.
    agent = setup(fp, "gpt-4o")
    fp.script(Step(sse=(FIXTURES / "openai_chat_refusal.sse").read_text()))
    s = agent.stream(q="hi", tenant="acme")
    assert list(s) == []
    r = s.result
    assert (r.content, r.finish_reason, r.input_tokens, r.output_tokens) == ("", "refusal", 79, 11)
    assert r.refusal is not None and r.refusal.startswith("I'm")


# ---------------------------------------------------------------- leaving early


SLOW = {"content": TEXT, "sse_delay": 0.15, "input_tokens": 31, "output_tokens": 12}


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_breaking_out_bills_what_was_received_as_cancelled(fp: FakeProvider, provider: str, db_path: Path) -> None:
    agent = setup(fp, MODELS[provider][0])
    fp.script(Step(**SLOW))
    received = ""
    with agent.stream(q="hi", tenant="acme") as s:
        for piece in s:
            received += piece
            if len(received) > 10:
                break
    # Closed when the block ended: settled by then, no wait needed.
    [row] = rows()
    assert row.status == "cancelled" and row.error_class == "CancelledError"
    assert row.output_tokens == counted(received)
    # Anthropic and Gemini report the input at the start; OpenAI only at the end.
    assert row.input_tokens == (counted("Say: hi") + 3 if provider == "openai" else 31)
    assert row.total_cost == cost(row.input_tokens, row.output_tokens) > 0
    assert reservations(db_path) == 0
    raw_sql.assert_counters_match_rows(db_path)
    with pytest.raises(RuntimeError, match="closed before its end"):
        _ = s.result


def test_a_stream_dropped_unread_is_cancelled(fp: FakeProvider, db_path: Path) -> None:
    agent = setup(fp, "gpt-4o")
    fp.script(Step(**SLOW))
    for _ in agent.stream(q="hi", tenant="acme"):
        break  # the stream is garbage: its task sees the reader gone
    [row] = settled()
    assert row.status == "cancelled" and row.output_tokens > 0
    assert reservations(db_path) == 0


async def test_asyncio_cancellation_is_billed_as_cancelled(fp: FakeProvider, db_path: Path) -> None:
    agent = setup(fp, "claude-sonnet-4-5")
    fp.script(Step(**SLOW))
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in agent.astream(q="hi", tenant="acme"):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [row] = await asyncio.to_thread(settled)
    assert row.status == "cancelled" and row.input_tokens == 31 and row.output_tokens >= 1
    assert reservations(db_path) == 0


async def test_astream_to_the_end(fp: FakeProvider) -> None:
    agent = setup(fp, "gemini-2.5-flash")
    fp.script(Step(content=TEXT, input_tokens=5, output_tokens=9))
    async with agent.astream(q="hi", tenant="acme") as s:
        text = "".join([p async for p in s])
    assert text == TEXT == s.result.content and s.result.output_tokens == 9


# ---------------------------------------------------------------- failures


def test_retries_and_fallbacks_apply_before_the_first_piece(fp: FakeProvider) -> None:
    agent = setup(fp, "gpt-4o", retries=tl.Retries(max=1, base=0), fallback_models=["claude-sonnet-4-5"])
    # A 503, then a stream cut before any text (only the role chunk): both retried / fallen back.
    fp.script(Step(kind="status", status=503), Step(content=TEXT, sse_cut=1), Step(content=TEXT))
    s = agent.stream(q="hi", tenant="acme")
    assert "".join(s) == TEXT
    assert s.result.attempts_count == 3 and s.result.provider == "anthropic"
    [row] = rows()
    assert [a["status"] for a in row.attempts] == ["error", "error", "success"]


def test_a_stream_broken_after_its_first_piece_is_not_retried(fp: FakeProvider, db_path: Path) -> None:
    agent = setup(fp, "gpt-4o", retries=tl.Retries(max=3, base=0))
    fp.script(Step(content=TEXT, sse_cut=4))  # role chunk + 3 pieces, then a reset
    received = ""
    with pytest.raises(tl.ProviderError):
        for piece in agent.stream(q="hi", tenant="acme"):
            received += piece
    assert received and len(fp.requests) == 1
    [row] = rows()
    assert row.status == "error" and row.output_tokens == counted(received)
    assert row.total_cost > 0 and reservations(db_path) == 0


def test_an_error_event_before_any_text_is_retried(fp: FakeProvider) -> None:
    agent = setup(fp, "claude-sonnet-4-5", retries=tl.Retries(max=1, base=0))
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    overloaded = f"event: error\ndata: {json.dumps(error)}\n\n"
    fp.script(Step(sse=overloaded), Step(content="ok then"))
    s = agent.stream(q="hi", tenant="acme")
    assert "".join(s) == "ok then"
    assert "Overloaded" in (rows()[0].attempts[0]["error_message"] or "")


def test_a_budget_refusal_raises_from_the_first_next(fp: FakeProvider) -> None:
    agent = setup(fp, "gpt-4o")
    tl.TenantBudget.create("poor", daily_limit="0.000001", enforcement="hard")
    s = agent.stream(q="hi", tenant="poor")
    with pytest.raises(tl.BudgetExceededError):
        next(s)
    assert list(s) == [] and fp.requests == []
    assert rows()[0].status == "blocked"


def test_a_slow_first_piece_times_out_and_a_slow_stream_is_cut(fp: FakeProvider) -> None:
    # 1.5 s: a loaded machine still gets the first piece in time; the stream takes 3.2 s.
    agent = setup(fp, "gpt-4o", timeout=1.5)
    fp.script(Step(content=TEXT, held=True))  # no first piece until the test is over
    with pytest.raises(tl.ProviderTimeoutError):
        list(agent.stream(q="hi", tenant="acme"))
    fp.script(Step(content=TEXT, sse_delay=0.4))
    received = ""
    with pytest.raises(tl.ProviderTimeoutError):
        for piece in agent.stream(q="hi", tenant="acme"):
            received += piece
    row = rows()[-1]
    assert row.status == "timeout" and row.output_tokens == counted(received) > 0


# ---------------------------------------------------------------- FastAPI (README example)


def readme_fastapi_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [block] = [b for b in blocks if "StreamingResponse" in b]
    return block


@pytest.fixture
def app(fp: FakeProvider) -> Iterator[Server]:
    pytest.importorskip("fastapi")
    agent = setup(fp, "gpt-4o", user="{query}", system="You help customers of {company}.")
    namespace: dict[str, Any] = {"SupportAgent": agent, "tl": tl}
    exec(readme_fastapi_example(), namespace)  # the README's own code
    with Server(namespace["app"]) as server:
        yield server


def test_readme_fastapi_example_streams_events(fp: FakeProvider, app: Server) -> None:
    import httpx

    fp.script(Step(content=TEXT, sse_delay=0.01))
    with httpx.Client() as c, c.stream("GET", f"http://127.0.0.1:{app.port}/ask?q=hi&org=acme") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert "".join(events) == TEXT
    assert settled()[0].status == "success"
    tl.TenantBudget.create("poor", daily_limit="0.000001", enforcement="hard")
    resp2 = httpx.get(f"http://127.0.0.1:{app.port}/ask?q=hi&org=poor")
    assert resp2.status_code == 429 and "budget" in resp2.json()["error"]


def test_readme_fastapi_example_client_disconnect_is_cancelled(fp: FakeProvider, app: Server, db_path: Path) -> None:
    fp.script(Step(content=TEXT, sse_delay=0.2, input_tokens=31))
    with socket.create_connection(("127.0.0.1", app.port)) as sock:
        sock.sendall(b"GET /ask?q=hi&org=acme HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
    # The client hung up after the first event; the provider was still streaming.
    [row] = settled()
    assert row.status == "cancelled" and 0 < row.output_tokens < 12
    assert reservations(db_path) == 0
