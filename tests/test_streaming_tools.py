"""`stream` / `astream` for agents with tools or a schema, against the fake server replaying
tool-call streams recorded by the providers' own SDK test suites or written from their docs
(tests/fixtures/streams/README.md names each source): every round streams, its tool-call
deltas are assembled, the tools run between rounds, each round is budgeted and settled like
`call`'s; a schema's answer streams and is validated at the end, with `call`'s one retry."""

from __future__ import annotations

import asyncio
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import pytest
import raw_sql
import tenantllm as tl
from fake_providers import FakeProvider, Step
from tenantllm.streaming import AsyncStream, Stream
from test_provider_contract import typed_dict_check
from test_streaming import FIXTURES, KEYS, PRICE, cost, reservations, rows, settled

FINAL = "It is 3 degrees and dry."
SEEN: list[tuple[str, Any]] = []


def get_weather(location: str) -> dict[str, Any]:
    """Current weather at a place."""
    SEEN.append(("get_weather", location))
    return {"location": location, "temp": 3}


async def get_time(zone: str) -> str:
    """The time in a zone."""
    SEEN.append(("get_time", zone))
    return f"12:00 {zone}"


def GetWeatherArgs(city: str, country: str, units: Literal["c", "f"] = "c") -> str:  # the recording's name
    """Get the temperature for the given country/city combo."""
    SEEN.append(("GetWeatherArgs", city))
    return f"3{units} in {city}"


def get_stock_price(ticker: str, exchange: str) -> float:
    """Fetch the latest price for a given ticker."""
    SEEN.append(("get_stock_price", ticker))
    return 231.5


TOOLS = (get_weather, get_time, GetWeatherArgs, get_stock_price)
OPENAI_CALLS = [
    ("GetWeatherArgs", {"city": "Edinburgh", "country": "GB", "units": "c"}, "3c in Edinburgh"),
    ("get_stock_price", {"ticker": "AAPL", "exchange": "NASDAQ"}, 231.5),
]
PARIS = ("get_weather", {"location": "Paris"}, {"location": "Paris", "temp": 3})
CET = ("get_time", {"zone": "CET"}, "12:00 CET")

# provider -> (agent model, wire format, recorded tool-call stream, its text, the calls it asks
# for with their results, its usage)
CASES: dict[str, tuple[str, str, str, str, list[tuple[str, Any, Any]], tuple[int, int]]] = {
    "openai": ("gpt-4o", "openai", "openai_chat_parallel_tool_calls.sse", "", OPENAI_CALLS, (149, 60)),
    "deepseek": ("deepseek/deepseek-chat", "openai", "openai_chat_parallel_tool_calls.sse", "", OPENAI_CALLS,
                 (149, 60)),
    "local": ("local/llama3", "openai", "openai_chat_parallel_tool_calls.sse", "", OPENAI_CALLS, (149, 60)),
    "mistral": ("mistral-small-latest", "openai", "mistral_tool_calls.sse", "", [PARIS, CET], (90, 38)),
    "anthropic": ("claude-sonnet-4-5", "anthropic", "anthropic_tool_use.sse",
                  "I'll check the current weather in Paris for you.", [PARIS], (377, 65)),
    "gemini": ("gemini-2.5-flash", "gemini", "gemini_function_calls.sse", "", [PARIS, CET], (61, 24 + 45)),
}


@pytest.fixture
def fp(server: FakeProvider) -> FakeProvider:
    server.reset()
    SEEN.clear()
    tl.configure(base_urls=server.base_urls(), api_keys=KEYS,
                 pricing={model: PRICE for model, *_ in CASES.values()})
    return server


def agent(model: str, **attrs: Any) -> type[tl.Agent]:
    body = {"model": model, "user": "{q}", "max_tokens": 200, "tools": TOOLS, **attrs}
    return type("Streamer", (tl.Agent,), body)


def sse(name: str) -> Step:
    return Step(sse=(FIXTURES / name).read_text())


def words(text: str) -> list[str]:
    """How the fake server cuts a reply it streams."""
    return re.findall(r"\S*\s*", text)[:-1]


async def drain(s: Stream | AsyncStream, into: list[str]) -> None:
    """Reads a stream to its end, each piece into `into`; a sync one in a thread of its own,
    as a sync app would (its async tools then run in an event loop of their own)."""
    if isinstance(s, AsyncStream):
        async with s:
            async for piece in s:
                into.append(piece)
        return

    def read_all() -> None:
        with s:
            into.extend(s)

    await asyncio.to_thread(read_all)


async def read(s: Stream | AsyncStream) -> list[str]:
    pieces: list[str] = []
    await drain(s, pieces)
    return pieces


def start(a: type[tl.Agent], mode: str, **params: Any) -> Stream | AsyncStream:
    return (a.astream if mode == "async" else a.stream)(tenant="acme", **params)


# ---------------------------------------------------------------- every provider


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("provider", list(CASES))
async def test_each_round_streams_and_the_tools_run_between(
    fp: FakeProvider, provider: str, mode: str, db_path: Path
) -> None:
    model, fmt, fixture, said, calls, (used_in, used_out) = CASES[provider]
    fp.script(sse(fixture), Step(content=FINAL, input_tokens=400, output_tokens=9))
    s = start(agent(model), mode, q="Weather?")
    pieces = await read(s)
    # Round 1's text (if any) as it came, then round 2's answer.
    assert "".join(pieces) == said + FINAL and pieces[-len(words(FINAL)):] == words(FINAL)
    r = s.result
    assert r.content == FINAL and r.finish_reason == "stop"
    assert [(c["name"], c["arguments"], c["result"]) for c in r.tool_calls] == calls
    assert [name for name, _ in SEEN] == [name for name, *_ in calls]
    first, second = rows()
    assert (first.status, first.finish_reason, first.input_tokens, first.output_tokens) == (
        "success", "tool_calls", used_in, used_out)
    assert (second.status, second.id, second.parent_execution_id) == ("success", r.execution_id, first.id)
    # A round that only asks for tools sends no text: no first token to time.
    assert (first.time_to_first_token_ms is None) == (said == "") and second.time_to_first_token_ms is not None
    assert r.input_tokens == used_in + 400 and r.total_cost == cost(used_in, used_out) + cost(400, 9)
    assert tl.Execution.get(r.execution_id).tool_calls == r.tool_calls
    assert reservations(db_path) == 0
    raw_sql.assert_counters_match_rows(db_path)
    check_second_request(provider, fmt, fp.requests[1].body, calls)


def check_second_request(provider: str, fmt: str, body: dict[str, Any] | None, calls: list[Any]) -> None:
    """The calls went back with their results in the provider's own format, streamed, and the
    body is one the provider's official SDK would send (its request types)."""
    import anthropic.types as anthropic_types
    import google.genai.types as genai_types
    import mistralai.client.models as mistral_models
    import openai.types.chat as openai_types

    assert body is not None
    if fmt == "openai":
        assert body["stream"] is True
        sent = body["messages"][-1 - len(calls):]
        assert [json.loads(c["function"]["arguments"]) for c in sent[0]["tool_calls"]] == [a for _, a, _ in calls]
        assert [m["role"] for m in sent] == ["assistant"] + ["tool"] * len(calls)
        assert [m["tool_call_id"] for m in sent[1:]] == [c["id"] for c in sent[0]["tool_calls"]]
        if provider == "mistral":
            request = mistral_models.ChatCompletionStreamRequest.model_validate(body)
            known = {f.alias or name for name, f in mistral_models.ChatCompletionStreamRequest.model_fields.items()}
            assert set(body) <= known and request.stream is True
        else:
            typed_dict_check(openai_types.completion_create_params.CompletionCreateParamsStreaming, body)
    elif fmt == "anthropic":
        assert body["stream"] is True
        assistant, results = body["messages"][1:]
        assert assistant["content"][1] == {"type": "tool_use", "id": "toolu_01NRLabsLyVHZPKxbKvkfSMn",
                                           "name": "get_weather", "input": {"location": "Paris"}}
        assert results["content"][0]["tool_use_id"] == "toolu_01NRLabsLyVHZPKxbKvkfSMn"
        typed_dict_check(anthropic_types.message_create_params.MessageCreateParamsStreaming, body)
    else:
        model, user = body["contents"][1:]
        assert [p["functionCall"] for p in model["parts"]] == [{"name": n, "args": a} for n, a, _ in calls]
        assert "thoughtSignature" in model["parts"][0] and "thoughtSignature" not in model["parts"][1]
        assert [p["functionResponse"]["name"] for p in user["parts"]] == ["get_weather", "get_time"]
        for content in body["contents"]:
            genai_types.Content.model_validate(content)
        genai_types.Tool.model_validate(body["tools"][0])


def test_the_replayed_streams_are_the_sdks_own_events() -> None:
    """Each event of the tool-call streams parses as the official SDK's stream type."""
    import anthropic.types as anthropic_types
    import google.genai.types as genai_types
    import mistralai.client.models as mistral_models
    import openai.types.chat as openai_types

    def events(name: str) -> list[tuple[str, str]]:
        raw = (FIXTURES / name).read_text()
        out = []
        for block in filter(str.strip, raw.split("\n\n")):
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((fields.get("event", ""), fields["data"]))
        return out

    for _, data in events("openai_chat_parallel_tool_calls.sse"):
        if data != "[DONE]":
            openai_types.ChatCompletionChunk.model_validate_json(data)
    for _, data in events("mistral_tool_calls.sse"):
        if data != "[DONE]":
            mistral_models.CompletionChunk.model_validate_json(data)
    for _, data in events("gemini_function_calls.sse"):
        genai_types.GenerateContentResponse.model_validate_json(data)
    stream_event = pydantic.TypeAdapter(anthropic_types.RawMessageStreamEvent)
    for event, data in events("anthropic_tool_use.sse"):
        if event != "ping":
            stream_event.validate_json(data)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_mock_streams_tool_loops(mode: str) -> None:
    a = agent("mock/fast", max_tool_rounds=3)
    s = start(a, mode, q='Weather?\n@tool get_weather {"location": "Oslo"}\n@tool get_time {"zone": "UTC"}')
    text = "".join(await read(s))
    r = s.result
    assert text == r.content and "get_weather -> " in text and "get_time -> 12:00 UTC" in text
    assert [c["result"] for c in r.tool_calls] == [{"location": "Oslo", "temp": 3}, "12:00 UTC"]
    assert [e.status for e in rows()] == ["success", "success"]


# ---------------------------------------------------------------- budgets, leaving early, errors


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_budget_that_runs_out_between_rounds_stops_the_stream(
    fp: FakeProvider, mode: str, db_path: Path
) -> None:
    a = agent("claude-sonnet-4-5")
    # Enough for round 1's reservation, not for round 2's on top of round 1's spend.
    first_estimate = a.call(q="Weather?", tenant="acme", dry_run=True)["estimated_cost"]
    tl.TenantBudget.create("acme", daily_limit=first_estimate, enforcement="hard")
    fp.script(sse("anthropic_tool_use.sse"), Step(content=FINAL))
    s = start(a, mode, q="Weather?")
    received: list[str] = []
    with pytest.raises(tl.BudgetExceededError) as info:
        await drain(s, received)
    assert "".join(received) == CASES["anthropic"][3], "round 1 streamed before the refusal"
    assert info.value.scope == "tenant_daily" and len(fp.requests) == 1
    first, blocked = rows()
    assert (first.status, blocked.status, blocked.parent_execution_id) == ("success", "blocked", first.id)
    assert SEEN == [("get_weather", "Paris")]
    assert tl.TenantBudget.get("acme").current_daily_spending == cost(377, 65) <= Decimal(first_estimate)
    assert reservations(db_path) == 0
    with pytest.raises(RuntimeError, match="closed before its end or failed"):
        _ = s.result


def test_a_looping_mock_stream_never_overspends() -> None:
    a = agent("mock/fast", max_tokens=50, max_tool_rounds=50)
    tl.TenantBudget.create("acme", daily_limit="0.0003", enforcement="hard")
    with pytest.raises(tl.BudgetExceededError):
        list(a.stream(q='@loop get_weather {"location": "Oslo"}', tenant="acme"))
    assert tl.Execution.successful().count() >= 2 and tl.Execution.by_status("blocked").count() == 1
    assert tl.TenantBudget.get("acme").current_daily_spending <= Decimal("0.0003")


def test_breaking_out_in_a_later_round_cancels_only_that_round(fp: FakeProvider, db_path: Path) -> None:
    fp.script(sse("anthropic_tool_use.sse"), Step(content=FINAL, sse_delay=0.15, input_tokens=400))
    said = CASES["anthropic"][3]
    received = ""
    with agent("claude-sonnet-4-5").stream(q="Weather?", tenant="acme") as s:
        for piece in s:
            received += piece
            if len(received) > len(said):
                break
    first, second = rows()
    assert (first.status, second.status, second.error_class) == ("success", "cancelled", "CancelledError")
    assert second.input_tokens == 400 and 0 < second.output_tokens < 9
    assert reservations(db_path) == 0
    raw_sql.assert_counters_match_rows(db_path)
    with pytest.raises(RuntimeError, match="closed before its end"):
        _ = s.result


async def test_cancelling_astream_in_a_later_round_is_billed_as_cancelled(fp: FakeProvider, db_path: Path) -> None:
    fp.script(sse("openai_chat_parallel_tool_calls.sse"), Step(content=FINAL, sse_delay=0.15, input_tokens=400))
    first_piece = asyncio.Event()

    async def consume() -> None:
        async for _ in agent("gpt-4o").astream(q="Weather?", tenant="acme"):
            first_piece.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_piece.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done = await asyncio.to_thread(settled, 2)
    assert [e.status for e in done] == ["success", "cancelled"]
    assert reservations(db_path) == 0


def fails(x: int) -> str:
    """Always raises."""
    raise ValueError(f"bad x {x}")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_tool_errors_go_back_to_the_model_or_raise_from_the_stream(mode: str, db_path: Path) -> None:
    a = agent("mock/fast", tools=(fails,))
    s = start(a, mode, q='@tool fails {"x": 1}')
    assert "fails -> ValueError: bad x 1" in "".join(await read(s))
    assert s.result.tool_calls[0]["error"] == "ValueError: bad x 1"
    raising = agent("mock/fast", tools=(fails,), raise_tool_errors=True)
    with pytest.raises(ValueError, match="bad x 1"):
        await read(start(raising, mode, q='@tool fails {"x": 1}'))
    assert [e.status for e in rows()] == ["success", "success", "success"]
    assert reservations(db_path) == 0


def stops(x: int) -> str:
    """Raises what ends a `for` loop."""
    raise StopIteration(x)


async def astops(x: int) -> str:
    """Raises what ends an `async for` loop."""
    raise StopAsyncIteration(x)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_tool_raising_what_ends_a_loop_does_not_end_the_stream_as_if_complete(mode: str, db_path: Path) -> None:
    """With raise_tool_errors, a tool's StopIteration (StopAsyncIteration in astream) leaving
    the stream as it is would end the reader's loop quietly, the answer missing: it is a
    RuntimeError, its cause the tool's exception, as PEP 479 does for generators."""
    tool, ends = (stops, "StopIteration") if mode == "sync" else (astops, "StopAsyncIteration")
    raising = agent("mock/fast", tools=(tool,), raise_tool_errors=True)
    with pytest.raises(RuntimeError, match=f"a tool raised {ends}") as e:
        await read(start(raising, mode, q=f'@tool {tool.__name__} {{"x": 1}}'))
    assert isinstance(e.value.__cause__, (StopIteration, StopAsyncIteration))
    assert [r.status for r in rows()] == ["success"]
    assert reservations(db_path) == 0


# ---------------------------------------------------------------- schema


class Invoice(pydantic.BaseModel):
    number: int
    total: float
    note: str | None = None


ANSWER = {"number": 42, "total": 9.5, "note": None}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("model", ["gpt-4o", "mistral-small-latest", "gemini-2.5-flash", "deepseek/deepseek-chat"])
async def test_a_schema_answer_streams_and_is_parsed_at_the_end(fp: FakeProvider, model: str, mode: str) -> None:
    fp.script(Step(content=json.dumps(ANSWER)))
    s = start(agent(model, tools=(), schema=Invoice), mode, q="Invoice 42, 9.50")
    pieces = await read(s)
    assert len(pieces) > 1 and "".join(pieces) == json.dumps(ANSWER)
    assert s.result.parsed == Invoice(number=42, total=9.5) and rows()[0].status == "success"
    body = fp.requests[0].body
    assert body is not None
    if model.startswith("gemini"):
        assert body["generationConfig"]["responseJsonSchema"] == Invoice.model_json_schema()
    else:
        assert body["stream"] is True and body["response_format"]["type"] in ("json_schema", "json_object")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_anthropic_streams_the_answer_tools_input(fp: FakeProvider, mode: str) -> None:
    # The recorded tool_use stream read as the answer of a schema named like its tool: the
    # text before the tool is the model's preamble, the tool's input the answer.
    schema: dict[str, Any] = {"title": "get_weather", "type": "object",
                              "properties": {"location": {"type": "string"}}, "required": ["location"]}
    fp.script(sse("anthropic_tool_use.sse"))
    s = start(agent("claude-sonnet-4-5", tools=(), schema=schema), mode, q="Weather?")
    assert await read(s) == ['{"locati', 'on": "P', "ar", 'is"}']
    r = s.result
    assert (r.parsed, r.finish_reason, r.tool_calls) == ({"location": "Paris"}, "stop", [])
    body = fp.requests[0].body
    assert body is not None and body["tool_choice"] == {"type": "tool", "name": "get_weather"}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_answer_off_its_schema_is_asked_again_and_that_answer_streams_too(
    fp: FakeProvider, mode: str, db_path: Path
) -> None:
    bad = '{"number": "forty-two"}'
    fp.script(Step(content=bad), Step(content=json.dumps(ANSWER)))
    s = start(agent("gpt-4o", tools=(), schema=Invoice), mode, q="Invoice 42")
    assert "".join(await read(s)) == bad + json.dumps(ANSWER)
    assert s.result.content == json.dumps(ANSWER) and s.result.parsed.number == 42
    first, second = rows()
    assert (first.status, first.error_class, second.status) == ("error", "InvalidResponseError", "success")
    assert second.metadata == {"retry_of": first.id} and first.total_cost > 0
    assert fp.requests[0].body == fp.requests[1].body
    assert reservations(db_path) == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_second_answer_off_its_schema_raises_from_the_stream(mode: str) -> None:
    class Point(tl.Agent):
        model = "mock/fast"
        user = "{q}"
        schema: ClassVar[dict[str, Any]] = {"title": "Point", "type": "object",
                                            "properties": {"x": {"type": "integer"}}, "required": ["x"]}

    with pytest.raises(tl.InvalidResponseError, match="x: 'no' is not of type 'integer'"):
        await read(start(Point, mode, q='@json {"x": "no"}'))
    assert [(e.status, e.error_class) for e in rows()] == [("error", "InvalidResponseError")] * 2
    s = start(Point, mode, q='@json {"x": 3}')
    assert "".join(await read(s)) == '{"x": 3}' and s.result.parsed == {"x": 3}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_tools_and_a_schema_stream_together(mode: str) -> None:
    a = agent("mock/fast", schema=Invoice)
    s = start(a, mode, q=f'@tool get_weather {{"location": "Oslo"}}\n@json {json.dumps(ANSWER)}')
    assert "".join(await read(s)) == json.dumps(ANSWER)
    r = s.result
    assert r.parsed == Invoice(number=42, total=9.5) and r.tool_calls[0]["name"] == "get_weather"
    assert [e.finish_reason for e in rows()] == ["tool_calls", "stop"]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_last_round_asking_for_tools_anyway_is_off_its_schema_and_asked_again(
    fp: FakeProvider, mode: str, db_path: Path
) -> None:
    """The last round (told to answer) streams tool calls anyway: that is its answer, off the
    schema, so it is asked for once more, as `call`'s; the calls are not run."""
    fp.script(sse("openai_chat_parallel_tool_calls.sse"), Step(content=json.dumps(ANSWER)))
    s = start(agent("gpt-4o", schema=Invoice, max_tool_rounds=1), mode, q="Invoice 42")
    assert "".join(await read(s)) == json.dumps(ANSWER)
    assert s.result.parsed == Invoice(number=42, total=9.5) and s.result.tool_calls == [] and SEEN == []
    bad, good = rows()
    assert (bad.status, bad.error_class, bad.finish_reason) == ("error", "InvalidResponseError", "tool_calls")
    assert (good.status, good.metadata) == ("success", {"retry_of": bad.id})
    assert [q.body["tool_choice"] for q in fp.requests if q.body] == ["none", "none"]
    assert reservations(db_path) == 0
