"""`history=`: prior turns sent before the rendered prompt, in each provider's own message
format (checked on what the fake server received), counted in the reservation, and refused
with an error naming the bad turn before anything is recorded."""

from __future__ import annotations

from typing import Any

import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Step

HISTORY = [
    {"role": "user", "content": "My order is 42."},
    {"role": "assistant", "content": "Thanks, I see order 42."},
]
KEYS = {"openai": "sk-o", "anthropic": "sk-a", "gemini": "g-k", "deepseek": "sk-d", "mistral": "sk-m"}
PRICE = {"input": "1.00", "output": "2.00"}


@pytest.fixture
def fp(server: FakeProvider) -> FakeProvider:
    server.reset()
    tl.configure(base_urls=server.base_urls(), api_keys=KEYS, pricing={"local/llama3": PRICE})
    return server


def agent(model: str) -> type[tl.Agent]:
    return type("Helper", (tl.Agent,), {"model": model, "system": "Be brief.", "user": "Q: {q}"})


def test_openai_and_compatible_servers_get_messages(fp: FakeProvider) -> None:
    for model in ("gpt-4o", "deepseek/deepseek-chat", "mistral-small-latest", "local/llama3"):
        fp.reset()
        agent(model).call(q="Where is it?", tenant="acme", history=HISTORY)
        body = fp.requests[0].body
        assert body is not None
        assert body["messages"] == [{"role": "system", "content": "Be brief."}, *HISTORY,
                                    {"role": "user", "content": "Q: Where is it?"}], model


def test_anthropic_gets_messages_after_its_system_field(fp: FakeProvider) -> None:
    agent("claude-sonnet-4-5").call(q="Where is it?", tenant="acme", history=HISTORY)
    body = fp.requests[0].body
    assert body is not None and body["system"] == "Be brief."
    assert body["messages"] == [*HISTORY, {"role": "user", "content": "Q: Where is it?"}]


def test_gemini_gets_contents_with_the_model_role(fp: FakeProvider) -> None:
    agent("gemini-2.5-flash").call(q="Where is it?", tenant="acme", history=HISTORY)
    body = fp.requests[0].body
    assert body is not None
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "My order is 42."}]},
        {"role": "model", "parts": [{"text": "Thanks, I see order 42."}]},
        {"role": "user", "parts": [{"text": "Q: Where is it?"}]},
    ]


def test_streams_and_async_calls_send_it_too(fp: FakeProvider) -> None:
    s = agent("claude-sonnet-4-5").stream(q="x", tenant="acme", history=HISTORY)
    assert "".join(s)
    body = fp.requests[0].body
    assert body is not None and body["messages"][:2] == HISTORY and body["stream"] is True


async def test_acall_sends_it(fp: FakeProvider) -> None:
    await agent("gpt-4o").acall(q="x", tenant="acme", history=HISTORY)
    body = fp.requests[0].body
    assert body is not None and body["messages"][1:3] == HISTORY


def test_the_reservation_and_the_mock_count_it() -> None:
    a = agent("mock/fast")
    plain = a.call(q="x", tenant="acme", dry_run=True)
    with_history = a.call(q="x", tenant="acme", dry_run=True, history=HISTORY)
    assert with_history["history"] == HISTORY and plain["history"] == []
    grown = sum(len(t["content"]) for t in HISTORY)
    assert with_history["estimated_input_tokens"] >= plain["estimated_input_tokens"] + grown
    assert a.call(q="x", tenant="acme", history=HISTORY).input_tokens > a.call(q="x", tenant="acme").input_tokens


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ("hello", "history must be a list"),
        ({"role": "user", "content": "x"}, "history must be a list"),
        ([{"role": "robot", "content": "x"}], r'history\[0\]: role must be "user" or "assistant"'),
        ([HISTORY[0], {"role": "system", "content": "x"}], r'history\[1\]: role "system" is not a turn'),
        ([{"role": "user", "content": 5}], r"history\[0\].content must be a string"),
        ([{"role": "user"}], r'history\[0\] has no "content"'),
        ([{"role": "user", "content": "x", "name": "bob"}], r'history\[0\]: unknown key "name"'),
        (["x"], r"history\[0\] must be a dict"),
        ([HISTORY[0]] * 10_001, "at most 10000 turns"),
    ],
)
def test_bad_history_is_refused_naming_the_turn_and_records_nothing(history: Any, message: str) -> None:
    a = agent("mock/fast")
    with pytest.raises(tl.ConfigurationError, match=message):
        a.call(q="x", tenant="acme", history=history)
    with pytest.raises(tl.ConfigurationError, match=message):
        a.stream(q="x", tenant="acme", history=history)
    assert tl.Execution.all().count() == 0


def test_history_is_a_reserved_name() -> None:
    with pytest.raises(tl.ConfigurationError, match="reserved"):
        type("Bad", (tl.Agent,), {"model": "mock/x", "user": "{history}"})


def test_a_tuple_of_turns_works(fp: FakeProvider) -> None:
    fp.script(Step(content="ok"))
    assert agent("gpt-4o").call(q="x", tenant="acme", history=tuple(HISTORY)).content == "ok"
