"""Tools: typed functions become JSON-schema tools, sent in each provider's own format; the
model's calls (replayed from each provider's documented tool-call reply) run between model
rounds, each round budgeted and recorded; errors go back to the model and are recorded."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Step, tool_call_step

KEYS = {"openai": "sk-o", "anthropic": "sk-a", "gemini": "g-k", "deepseek": "sk-d", "mistral": "sk-m"}
SEEN: list[tuple[str, str]] = []


def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict[str, Any]:
    """Current weather for a city."""
    SEEN.append((city, unit))
    return {"city": city, "temp": 3, "unit": unit}


async def get_time(zone: str) -> str:
    """The time in a zone."""
    return f"12:00 in {zone}"


def fails(x: int) -> str:
    """Always raises."""
    raise ValueError(f"bad x {x}")


class Weather(tl.Agent):
    model = "gpt-4o-mini"
    system = "Be brief."
    user = "{question}"
    tools = (get_weather, get_time,)


def on(model: str) -> type[tl.Agent]:
    return type("Weather", (Weather,), {"model": model})


@pytest.fixture
def fp(server: FakeProvider, db_path: Path) -> FakeProvider:
    server.reset()
    SEEN.clear()
    tl.configure(reset=True, database=str(db_path), base_urls=server.base_urls(), api_keys=KEYS)
    return server


PARAMETERS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "city": {"title": "City", "type": "string"},
        "unit": {"default": "c", "enum": ["c", "f"], "title": "Unit", "type": "string"},
    },
    "required": ["city"],
}


def rows() -> list[tl.Execution]:
    return sorted(tl.Execution.all(), key=lambda e: e.started_at)


def check_loop(r: tl.AgentResult) -> None:
    """Two rounds: both recorded, the second descending from the first and holding the call."""
    assert SEEN == [("Oslo", "c")]
    assert [(c["name"], c["arguments"], c["result"]) for c in r.tool_calls] == [
        ("get_weather", {"city": "Oslo"}, {"city": "Oslo", "temp": 3, "unit": "c"})
    ]
    assert isinstance(r.tool_calls[0]["duration_ms"], int)
    first, second = rows()
    assert (first.status, first.finish_reason, second.status) == ("success", "tool_calls", "success")
    assert second.id == r.execution_id and second.parent_execution_id == first.id == second.root_execution_id
    assert r.input_tokens == first.input_tokens + second.input_tokens == 82 + 11
    assert r.total_cost == first.total_cost + second.total_cost
    assert tl.Execution.get(r.execution_id).tool_calls == r.tool_calls
    assert tl.Execution.get(first.id).tool_calls is None


@pytest.mark.parametrize("model", ["gpt-4o-mini", "deepseek-chat", "mistral-small-latest"])
def test_openai_and_compatible_wire(fp: FakeProvider, model: str) -> None:
    fp.script(tool_call_step("openai", [("get_weather", {"city": "Oslo"})]), Step(content="3 degrees"))
    r = on(model).call(question="Weather in Oslo?", tenant="acme")
    assert r.content == "3 degrees"
    check_loop(r)
    first, second = (q.body for q in fp.requests)
    assert first is not None and second is not None
    assert first["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.", "parameters": PARAMETERS}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                          "parameters": first["tools"][1]["function"]["parameters"]}}]
    assert "tool_choice" not in first
    call = {"id": "call_0abc", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"}, indent=1)}}
    assert second["messages"][2:] == [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0abc", "content": '{"city":"Oslo","temp":3,"unit":"c"}'},
    ]


def test_anthropic_wire(fp: FakeProvider) -> None:
    fp.script(tool_call_step("anthropic", [("get_weather", {"city": "Oslo"})], text="Let me check."),
              Step(content="3 degrees"))
    r = on("claude-sonnet-4-5").call(question="Weather in Oslo?", tenant="acme")
    check_loop(r)
    first, second = (q.body for q in fp.requests)
    assert first is not None and second is not None
    assert first["tools"][0] == {"name": "get_weather", "description": "Current weather for a city.",
                                 "input_schema": PARAMETERS}
    tid = "toolu_01A09q90qw90lq917835lq0"
    assert second["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": tid, "name": "get_weather", "input": {"city": "Oslo"}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid,
                                      "content": '{"city":"Oslo","temp":3,"unit":"c"}', "is_error": False}]},
    ]


def test_gemini_wire(fp: FakeProvider) -> None:
    fp.script(tool_call_step("gemini", [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]),
              Step(content="3 degrees"))
    r = on("gemini-2.5-flash").call(question="Weather in Oslo?", tenant="acme")
    assert [c["result"] for c in r.tool_calls][1] == "12:00 in CET"  # the async tool, awaited
    first, second = (q.body for q in fp.requests)
    assert first is not None and second is not None
    decl = first["tools"][0]["functionDeclarations"][0]
    assert decl == {"name": "get_weather", "description": "Current weather for a city.",
                    "parametersJsonSchema": PARAMETERS}
    assert second["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                                    {"functionCall": {"name": "get_time", "args": {"zone": "CET"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather",
                                  "response": {"output": '{"city":"Oslo","temp":3,"unit":"c"}'}}},
            {"functionResponse": {"name": "get_time", "response": {"output": "12:00 in CET"}}}]},
    ]
    assert rows()[0].finish_reason == "tool_calls"


def test_the_last_round_is_told_to_answer(fp: FakeProvider) -> None:
    agent = type("Looping", (Weather,), {"max_tool_rounds": 2})
    fp.script(tool_call_step("openai", [("get_weather", {"city": "Oslo"})]), Step(content="done"))
    agent.call(question="x", tenant="acme")
    assert [q.body.get("tool_choice") for q in fp.requests if q.body] == [None, "none"]


def test_a_last_round_asking_for_tools_anyway_is_the_answer(fp: FakeProvider) -> None:
    """Without a schema any text is an answer: the last round's reply is the result as it
    came (its finish reason says it asked for tools), the calls it asks for are not run.
    With a schema it is checked like any answer (tests/test_structured.py)."""
    agent = type("Looping", (Weather,), {"max_tool_rounds": 2})
    fp.script(tool_call_step("openai", [("get_weather", {"city": "Oslo"})]),
              tool_call_step("openai", [("get_weather", {"city": "Bergen"})], text="And Bergen?"))
    r = agent.call(question="x", tenant="acme")
    assert (r.content, r.finish_reason) == ("And Bergen?", "tool_calls")
    assert SEEN == [("Oslo", "c")] and [c["arguments"] for c in r.tool_calls] == [{"city": "Oslo"}]
    assert [(e.status, e.finish_reason) for e in rows()] == [("success", "tool_calls")] * 2


def test_errors_unknown_tools_and_bad_arguments_go_back_to_the_model() -> None:
    class Mocked(tl.Agent):
        model = "mock/fast"
        user = "{q}"
        tools = (get_weather, fails,)

    script = '@tool fails {"x": 1}\n@tool nope {}\n@tool get_weather {"town": 1}\n@tool get_weather {oops'
    r = Mocked.call(q=f"Hi\n{script}", tenant="acme")
    errors = [c["error"] for c in r.tool_calls]
    assert errors[0] == "ValueError: bad x 1"
    assert errors[1].startswith("unknown tool 'nope'")
    assert "city: Field required" in errors[2] and "town: Extra inputs" in errors[2]
    assert errors[3].startswith("the arguments are not valid JSON")
    assert r.tool_calls[3]["arguments"] == "{oops"
    assert "fails -> ValueError: bad x 1" in r.content  # the model saw it
    assert tl.Execution.get(r.execution_id).tool_calls == r.tool_calls

    raising = type("Raising", (Mocked,), {"raise_tool_errors": True})
    with pytest.raises(ValueError, match="bad x 1"):
        raising.call(q='@tool fails {"x": 1}', tenant="acme")


def test_a_tool_loop_stops_at_the_budget_and_never_overspends() -> None:
    class Loop(tl.Agent):
        model = "mock/fast"
        user = "{q}"
        max_tokens = 50
        max_tool_rounds = 50
        tools = (get_weather,)

    tl.TenantBudget.create("acme", daily_limit="0.0003", enforcement="hard")
    with pytest.raises(tl.BudgetExceededError) as info:
        Loop.call(q='@loop get_weather {"city": "Oslo"}', tenant="acme")
    assert info.value.scope == "tenant_daily"
    done = tl.Execution.successful().count()
    assert done >= 2 and tl.Execution.by_status("blocked").count() == 1
    blocked = tl.Execution.by_status("blocked").first()
    assert blocked is not None and blocked.parent_execution_id is not None
    assert tl.TenantBudget.get("acme").current_daily_spending <= Decimal("0.0003")


def test_max_tool_rounds_bounds_the_loop() -> None:
    class Loop(tl.Agent):
        model = "mock/fast"
        user = "{q}"
        max_tool_rounds = 3
        tools = (get_weather,)

    r = Loop.call(q='@loop get_weather {"city": "Oslo"}', tenant="acme")
    assert tl.Execution.all().count() == 3 and len(r.tool_calls) == 2
    assert r.finish_reason == "stop" and "tool results" in r.content


async def test_acall_runs_sync_and_async_tools() -> None:
    class Mocked(tl.Agent):
        model = "mock/fast"
        user = "{q}"
        tools = (get_weather, get_time,)

    r = await Mocked.acall(q='x\n@tool get_time {"zone": "UTC"}\n@tool get_weather {"city": "Rome"}', tenant="acme")
    assert [c.get("result") for c in r.tool_calls] == ["12:00 in UTC", {"city": "Rome", "temp": 3, "unit": "c"}]


def untyped(city):  # type: ignore[no-untyped-def]
    """No hints."""
    return city


def test_bad_tools_fail_at_class_definition() -> None:
    for tools, why in [
        ([untyped], "parameter 'city' has no type hint"),
        (["get_weather"], "must hold functions"),
        ([get_weather, get_weather], "two tools are named"),
        (get_weather, "must be a list"),
    ]:
        with pytest.raises(tl.ConfigurationError, match=why):
            type("Bad", (tl.Agent,), {"model": "mock/x", "user": "{q}", "tools": tools})
    for rounds in (0, 51, "3", True):
        with pytest.raises(tl.ConfigurationError, match="max_tool_rounds"):
            type("Bad", (tl.Agent,), {"model": "mock/x", "user": "{q}", "tools": [get_weather],
                                      "max_tool_rounds": rounds})


def test_a_result_that_is_not_json_is_a_clear_error() -> None:
    def opaque(x: int) -> object:
        """Returns something JSON cannot hold."""
        return object()

    agent = type("Opaque", (tl.Agent,), {"model": "mock/x", "user": "{q}", "tools": [opaque]})
    with pytest.raises(tl.ConfigurationError, match="tool opaque returned a value that is not JSON-serialisable"):
        agent.call(q='@tool opaque {"x": 1}', tenant="acme")
