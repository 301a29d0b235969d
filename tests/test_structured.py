"""Structured output: `schema =` a pydantic model or a JSON Schema dict, sent in each provider's
native form (checked on what the fake server received), the answer validated into `r.parsed`;
an answer off its schema is billed on an `error` row and asked for once more; a second one off
it is an InvalidResponseError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pydantic
import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Step, tool_call_step

KEYS = {"openai": "sk-o", "anthropic": "sk-a", "gemini": "g-k", "deepseek": "sk-d", "mistral": "sk-m"}
ANSWER = {"number": 42, "total": 9.5, "note": None}


class Invoice(pydantic.BaseModel):
    number: int
    total: float
    note: str | None = None


class Extract(tl.Agent):
    model = "gpt-4o-mini"
    user = "{text}"
    schema = Invoice


def on(model: str) -> type[tl.Agent]:
    return type("Extract", (Extract,), {"model": model})


@pytest.fixture
def fp(server: FakeProvider, db_path: Path) -> FakeProvider:
    server.reset()
    tl.configure(reset=True, database=str(db_path), base_urls=server.base_urls(), api_keys=KEYS)
    return server


def body(fp: FakeProvider) -> dict[str, Any]:
    b = fp.requests[-1].body
    assert b is not None
    return b


def test_openai_and_mistral_get_a_strict_json_schema(fp: FakeProvider) -> None:
    for model in ("gpt-4o-mini", "mistral-small-latest"):
        fp.script(Step(content=json.dumps(ANSWER)))
        r = on(model).call(text="Invoice 42, 9.50", tenant="acme")
        assert r.parsed == Invoice(number=42, total=9.5)
        fmt = body(fp)["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Invoice"
        assert fmt["json_schema"]["strict"] is True
        strict = fmt["json_schema"]["schema"]
        # Strict mode: closed, every property required (as the openai SDK makes pydantic schemas).
        assert strict["additionalProperties"] is False and strict["required"] == ["number", "total", "note"]
        assert "default" not in strict["properties"]["note"]


def test_deepseek_gets_json_object_and_the_schema_in_the_prompt(fp: FakeProvider) -> None:
    fp.script(Step(content=json.dumps(ANSWER)))
    r = on("deepseek-chat").call(text="Invoice 42", tenant="acme")
    assert r.parsed.number == 42
    b = body(fp)
    assert b["response_format"] == {"type": "json_object"}
    assert b["messages"][0]["role"] == "system" and '"number"' in b["messages"][0]["content"]


def test_anthropic_answers_through_a_forced_tool(fp: FakeProvider) -> None:
    fp.script(tool_call_step("anthropic", [("Invoice", ANSWER)], text="Here it is."))
    r = on("claude-sonnet-4-5").call(text="Invoice 42", tenant="acme")
    assert r.parsed == Invoice(number=42, total=9.5)
    assert json.loads(r.content) == ANSWER and r.finish_reason == "stop" and r.tool_calls == []
    b = body(fp)
    assert b["tool_choice"] == {"type": "tool", "name": "Invoice"}
    assert b["tools"][0]["name"] == "Invoice" and b["tools"][0]["input_schema"] == Invoice.model_json_schema()


def test_gemini_gets_a_response_json_schema(fp: FakeProvider) -> None:
    fp.script(Step(content=json.dumps(ANSWER)))
    r = on("gemini-2.5-flash").call(text="Invoice 42", tenant="acme")
    assert r.parsed.total == 9.5
    config = body(fp)["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == Invoice.model_json_schema()


async def test_an_answer_off_its_schema_twice_is_billed_on_two_error_rows(fp: FakeProvider) -> None:
    fp.script(Step(content='{"number": "forty-two"}'), Step(content='{"number": 4'))
    with pytest.raises(tl.InvalidResponseError, match="structured output"):
        await on("gpt-4o-mini").acall(text="Invoice 42", tenant="acme")
    assert len(fp.requests) == 2
    first, second = tl.Execution.all().order_by("started_at")
    assert [(e.status, e.error_class) for e in (first, second)] == [("error", "InvalidResponseError")] * 2
    assert all(e.total_cost > 0 and e.output_tokens == 7 for e in (first, second))
    assert "number: Input should be a valid integer" in (first.error_message or "")
    assert "not valid JSON" in (second.error_message or "")
    assert second.metadata == {"retry_of": first.id}


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet-4-5"])
def test_an_answer_off_its_schema_is_asked_for_once_more(fp: FakeProvider, model: str) -> None:
    fmt = "anthropic" if model.startswith("claude") else "openai"
    if fmt == "anthropic":
        fp.script(tool_call_step(fmt, [("Invoice", {"number": "x"})]), tool_call_step(fmt, [("Invoice", ANSWER)]))
    else:
        fp.script(Step(content="Sure! Here is the invoice."), Step(content=json.dumps(ANSWER)))
    r = on(model).call(text="Invoice 42", tenant="acme")
    assert r.parsed == Invoice(number=42, total=9.5) and len(fp.requests) == 2
    assert fp.requests[0].body == fp.requests[1].body, "the same request again"
    bad, good = tl.Execution.all().order_by("started_at")
    assert (bad.status, bad.error_class, good.status) == ("error", "InvalidResponseError", "success")
    assert bad.total_cost > 0 and good.total_cost > 0, "both billed"
    assert good.id == r.execution_id and good.metadata == {"retry_of": bad.id}


def test_a_json_schema_dict_gives_a_dict() -> None:
    class Dict(tl.Agent):
        model = "mock/fast"
        user = "{text}"
        schema: ClassVar[dict[str, Any]] = {
            "title": "Point", "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
        }

    assert Dict.call(text='@json {"x": 3}', tenant="acme").parsed == {"x": 3}
    with pytest.raises(tl.InvalidResponseError, match="x: 'no' is not of type 'integer'"):
        Dict.call(text='@json {"x": "no"}', tenant="acme")
    assert tl.Execution.failed().count() == 2  # asked once more


def test_bad_schemas_fail_at_class_definition() -> None:
    for schema, why in [
        ("Invoice", "must be a pydantic model class or a JSON Schema dict"),
        (int, "must be a pydantic model class"),
        ({"type": "array", "items": {}}, "of type \"object\""),
        ({"type": "object", "properties": 3}, "not a valid JSON Schema"),
    ]:
        with pytest.raises(tl.ConfigurationError, match=why):
            type("Bad", (tl.Agent,), {"model": "mock/x", "user": "{q}", "schema": schema})


SEEN: list[int] = []


def lookup(number: int) -> dict[str, Any]:
    """The invoice with this number."""
    SEEN.append(number)
    return {"number": number, "total": 9.5}


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
def test_a_last_round_asking_for_tools_anyway_is_an_answer_off_its_schema(fp: FakeProvider, fmt: str) -> None:
    """The last round is told to answer (tool_choice none, Anthropic's answer tool forced); a
    reply asking for tools anyway is its answer, checked like any: off the schema, an error
    row, asked once more; the calls it asks for are not run."""
    SEEN.clear()
    model = "claude-sonnet-4-5" if fmt == "anthropic" else "gpt-4o-mini"
    looking = type("Looking", (Extract,), {"model": model, "tools": [lookup], "max_tool_rounds": 2})
    again = tool_call_step(fmt, [("lookup", {"number": 42})], text="Let me look again.")
    good = tool_call_step(fmt, [("Invoice", ANSWER)]) if fmt == "anthropic" else Step(content=json.dumps(ANSWER))
    fp.script(tool_call_step(fmt, [("lookup", {"number": 42})]), again, good)
    r = looking.call(text="Invoice 42", tenant="acme")
    assert r.parsed == Invoice(number=42, total=9.5) and SEEN == [42] and len(r.tool_calls) == 1
    first, bad, retried = tl.Execution.all().order_by("started_at")
    assert (first.status, first.finish_reason) == ("success", "tool_calls")
    assert (bad.status, bad.error_class, bad.finish_reason) == ("error", "InvalidResponseError", "tool_calls")
    assert "structured output" in (bad.error_message or "") and bad.total_cost > 0
    assert (retried.status, retried.id, retried.metadata) == ("success", r.execution_id, {"retry_of": bad.id})
    assert fp.requests[1].body == fp.requests[2].body, "the same last round again"

    # Asking for tools twice in the last round: the call raises (both rows billed errors).
    fp.script(again, again)
    with pytest.raises(tl.InvalidResponseError, match="structured output"):
        type("Closed", (looking,), {"max_tool_rounds": 1}).call(text="Invoice 42", tenant="acme")
    assert SEEN == [42] and tl.Execution.by_status("error").count() == 3


def test_an_agent_without_tools_whose_answer_asks_for_tools_is_off_its_schema(fp: FakeProvider) -> None:
    """A server that sends tool calls to an agent that offered none: not an answer either."""
    fp.script(tool_call_step("openai", [("lookup", {"number": 42})]), Step(content=json.dumps(ANSWER)))
    r = Extract.call(text="Invoice 42", tenant="acme")
    assert r.parsed == Invoice(number=42, total=9.5)
    bad, good = tl.Execution.all().order_by("started_at")
    assert (bad.status, bad.error_class, good.metadata) == ("error", "InvalidResponseError", {"retry_of": bad.id})
