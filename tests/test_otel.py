"""OpenTelemetry (`configure(opentelemetry=...)`): spans and metrics read back through the
real SDK's in-memory exporter and metric reader, calls sent over real HTTP to the fake
provider, and a real FastAPI app under uvicorn instrumented by OpenTelemetry's own
FastAPI instrumentation."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Step
from tenantllm.streaming import AsyncStream

pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (`make develop` installs it)")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

KEYS = {"openai": "sk-test-openai-7f3a9c", "anthropic": "sk-ant-test-51be02", "gemini": "g-test-key-88d1e4"}
RETRIES = tl.Retries(max=2, base=0.01, max_delay=0.02)


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def spans(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()

    def calls(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name.startswith("chat ")]

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            p
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == name
            for p in m.data.data_points
        ]

    def unit(self, name: str) -> str:
        data = self.reader.get_metrics_data()
        assert data is not None
        metrics = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        units = [m.unit for m in metrics if m.name == name]
        assert units, name
        return units[0]


@pytest.fixture
def otel(server: FakeProvider, db_path: Any) -> Otel:
    server.reset()
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    o = Otel(exporter, reader, tp, mp)
    configure(server, o, db=str(db_path))
    return o


def configure(fp: FakeProvider, o: Otel, db: str, **options: Any) -> None:
    tl.configure(
        reset=True,
        database=db,
        base_urls={"openai": fp.base_url + "/v1", "anthropic": fp.base_url, "gemini": fp.base_url},
        api_keys=dict(KEYS),
        opentelemetry={"tracer_provider": o.tracer_provider, "meter_provider": o.meter_provider, **options},
    )


def agent(model: str = "gpt-4o", **attrs: Any) -> type[tl.Agent]:
    body: dict[str, Any] = {"model": model, "user": "Question: {q}", "max_tokens": 100, **attrs}
    return type("Support", (tl.Agent,), body)


def ns(t: datetime | None) -> int:
    assert t is not None
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def children(o: Otel, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in o.spans() if s.parent is not None and s.parent.span_id == parent.context.span_id]


def all_attribute_text(o: Otel) -> str:
    return repr([dict(s.attributes or {}) for s in o.spans()])


def test_a_call_is_a_client_span_with_genai_attributes_and_metrics(otel: Otel, server: FakeProvider) -> None:
    server.script(Step(input_tokens=1000, output_tokens=100, content="Shipped."))

    r = agent().call(q="Where is my order?", tenant="acme")

    [span] = otel.calls()
    assert span.name == "chat gpt-4o"
    assert span.kind == SpanKind.CLIENT
    a = dict(span.attributes or {})
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.response.model"] == r.chosen_model_id
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (1000, 100)
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["tenantllm.tenant_id"] == "acme"
    assert a["tenantllm.execution_id"] == r.execution_id
    assert a["tenantllm.cost_usd"] == float(r.total_cost) > 0
    assert "error.type" not in a
    assert span.status.status_code == StatusCode.UNSET
    # The core's own times: the span is where the call was.
    assert (span.start_time, span.end_time) == (ns(r.started_at), ns(r.completed_at))
    assert tl.Execution.get(r.execution_id).started_at == r.started_at
    # Neither the prompt, the reply nor the key is an attribute unless asked for.
    text = all_attribute_text(otel)
    assert "Where is my order" not in text and "Shipped." not in text
    assert not any(k in text for k in KEYS.values())

    [attempt] = children(otel, span)
    assert attempt.attributes is not None and attempt.attributes["gen_ai.request.model"] == "gpt-4o"

    usage = {p.attributes["gen_ai.token.type"]: p for p in otel.points("gen_ai.client.token.usage")}
    assert (usage["input"].sum, usage["output"].sum) == (1000, 100)
    assert usage["input"].attributes["gen_ai.request.model"] == "gpt-4o"
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 1 and 0 <= duration.sum < 30
    assert otel.unit("gen_ai.client.operation.duration") == "s"
    [cost] = otel.points("tenantllm.cost")
    assert cost.value == pytest.approx(float(r.total_cost))
    assert cost.attributes["tenantllm.tenant_id"] == "acme"
    assert otel.unit("tenantllm.cost") == "USD"


def test_each_retry_and_fallback_is_a_child_span(otel: Otel, server: FakeProvider) -> None:
    err = Step(kind="status", status=500)
    server.script(err, err, Step(model="claude-sonnet-4-5-20250929"))

    r = agent(retries=tl.Retries(max=1, base=0.01, max_delay=0.02), fallback_models=["claude-sonnet-4-5"]).call(q="hi")

    [span] = otel.calls()
    assert dict(span.attributes or {})["gen_ai.provider.name"] == "anthropic"
    attempts = sorted(children(otel, span), key=lambda s: s.start_time or 0)
    assert [(s.attributes or {})["gen_ai.request.model"] for s in attempts] == ["gpt-4o", "gpt-4o", "claude-sonnet-4-5"]
    assert [(s.attributes or {}).get("error.type") for s in attempts] == ["ProviderError", "ProviderError", None]
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert [(s.attributes or {})["gen_ai.provider.name"] for s in attempts] == ["openai", "openai", "anthropic"]
    # Within the call, in order (ms precision), the trace is one.
    assert span.start_time is not None and span.end_time is not None
    for s in attempts:
        assert s.context is not None and span.context is not None and s.context.trace_id == span.context.trace_id
        assert s.start_time is not None and s.end_time is not None
        assert span.start_time - 2_000_000 <= s.start_time <= s.end_time <= span.end_time + 2_000_000
    assert [s.start_time for s in attempts] == sorted(s.start_time for s in attempts if s.start_time)
    assert r.attempts_count == 3


def test_failures_are_error_spans_with_their_class(otel: Otel, server: FakeProvider) -> None:
    server.script(Step(kind="status", status=401))
    with pytest.raises(tl.AuthenticationError):
        agent().call(q="hi", tenant="acme")

    tl.TenantBudget.create("poor", daily_limit="0.000001")
    with pytest.raises(tl.BudgetExceededError) as blocked:
        agent().call(q="hi", tenant="poor")

    auth, budget = otel.calls()
    assert auth.status.status_code == budget.status.status_code == StatusCode.ERROR
    assert dict(auth.attributes or {})["error.type"] == "AuthenticationError"
    assert dict(auth.attributes or {})["gen_ai.provider.name"] == "openai"
    b = dict(budget.attributes or {})
    assert b["error.type"] == "BudgetExceededError"
    assert b["tenantllm.execution_id"] == blocked.value.execution_id
    assert b["tenantllm.tenant_id"] == "poor"
    assert not any(k in all_attribute_text(otel) for k in KEYS.values())
    durations = {p.attributes.get("error.type") for p in otel.points("gen_ai.client.operation.duration")}
    assert durations == {"AuthenticationError", "BudgetExceededError"}
    assert otel.points("gen_ai.client.token.usage") == []


def test_prompts_and_replies_are_attributes_only_when_asked(otel: Otel, server: FakeProvider, db_path: Any) -> None:
    configure(server, otel, db=str(db_path), capture_content=True)
    server.script(Step(content="Tomorrow."))

    agent(system="Be brief.").call(q="When?", history=[{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}])

    [span] = otel.calls()
    a = dict(span.attributes or {})
    assert '"content": "Question: When?"' in str(a["gen_ai.input.messages"])
    assert '"role": "system"' in str(a["gen_ai.input.messages"]) and "Be brief." in str(a["gen_ai.input.messages"])
    assert '"content": "Hello"' in str(a["gen_ai.input.messages"])
    assert '"content": "Tomorrow."' in str(a["gen_ai.output.messages"])
    assert not any(k in all_attribute_text(otel) for k in KEYS.values())


def test_the_span_joins_the_callers_trace_in_threads_and_tasks(otel: Otel, server: FakeProvider) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    parents: dict[str, int] = {}

    def in_thread() -> None:
        with tracer.start_as_current_span("job") as job:
            parents["thread"] = job.get_span_context().span_id
            agent().call(q="a")

    async def in_task() -> None:
        with tracer.start_as_current_span("handler") as h:
            parents["task"] = h.get_span_context().span_id
            await agent().acall(q="b")

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    asyncio.run(in_task())
    agent().call(q="c")  # no current span: a trace of its own

    thread_call, task_call, root = otel.calls()
    by_name = {s.name: s for s in otel.spans() if not s.name.startswith(("chat ", "attempt "))}
    assert thread_call.parent is not None and thread_call.parent.span_id == parents["thread"]
    assert task_call.parent is not None and task_call.parent.span_id == parents["task"]
    assert thread_call.context is not None and by_name["job"].context is not None
    assert thread_call.context.trace_id == by_name["job"].context.trace_id
    assert root.parent is None


def test_a_fastapi_request_span_is_the_parent(otel: Otel) -> None:
    fastapi = pytest.importorskip("fastapi")
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.fastapi")
    from uvicorn_server import Server

    app = fastapi.FastAPI()

    @app.get("/ask")
    async def ask() -> dict[str, str]:
        r = await agent("mock/support").acall(q="hi", tenant="acme")
        return {"id": r.execution_id}

    @app.get("/ask-sync")
    def ask_sync() -> dict[str, str]:  # run in a worker thread by Starlette
        return {"id": agent("mock/support").call(q="hi", tenant="acme").execution_id}

    instrumentation.FastAPIInstrumentor.instrument_app(app, tracer_provider=otel.tracer_provider)
    with Server(app) as srv:
        ids = [httpx.get(srv.url + path, timeout=10).json()["id"] for path in ("/ask", "/ask-sync")]

    servers = [s for s in otel.spans() if s.kind == SpanKind.SERVER]
    assert len(servers) == 2
    for call, request, execution_id in zip(otel.calls(), servers, ids, strict=True):
        assert dict(call.attributes or {})["tenantllm.execution_id"] == execution_id
        assert call.context is not None and request.context is not None
        assert call.context.trace_id == request.context.trace_id
        assert call.parent is not None and call.parent.span_id == request.context.span_id


def test_streams_are_spans_that_end_with_the_stream(otel: Otel, server: FakeProvider) -> None:
    server.script(Step(content="one two three", input_tokens=5, output_tokens=3))
    s = agent().stream(q="hi")
    assert otel.calls() == []  # not before the stream has ended
    assert "".join(s) == "one two three"
    [done] = otel.calls()
    a = dict(done.attributes or {})
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (5, 3)
    assert (done.start_time, done.end_time) == (ns(s.result.started_at), ns(s.result.completed_at))

    server.script(Step(content="a b c d e f", sse_delay=0.05))
    with agent().stream(q="hi") as s2:
        next(s2)
    cancelled = otel.calls()[1]
    assert dict(cancelled.attributes or {})["error.type"] == "CancelledError"

    async def read_async() -> None:
        server.script(Step(content="x y"))
        async with agent().astream(q="hi") as s3:
            assert "".join([p async for p in s3]) == "x y"

    asyncio.run(read_async())
    assert len(otel.calls()) == 3
    assert "error.type" not in dict(otel.calls()[2].attributes or {})


def test_bad_options_are_refused_by_name_and_change_nothing(otel: Otel, server: FakeProvider) -> None:
    before = tl.config.settings()
    for bad, word in [("yes", "opentelemetry"), ({"capture_content": 1}, "capture_content"),
                      ({"exporter": 1}, "unknown option 'exporter'")]:
        with pytest.raises(tl.ConfigurationError, match=word):
            tl.configure(opentelemetry=bad)
    assert tl.config.settings() is before
    tl.configure(opentelemetry=False)
    agent("mock/support").call(q="hi")
    assert otel.calls() == []


def weather(city: str) -> dict[str, Any]:
    """Current weather for a city."""
    return {"city": city, "temp": 3}


def broken(x: int) -> str:
    """Always raises."""
    raise ValueError(f"bad x {x}")


class Tools(tl.Agent):
    model = "mock/fast"
    user = "{q}"
    tools = (weather, broken)


# Round 1 asks for three calls (one fine, one raising, one unknown tool); round 2 answers.
TOOL_CALLS = 'Hi\n@tool weather {"city": "Oslo"}\n@tool broken {"x": 1}\n@tool nope {}'
WAYS = ["call", "acall", "stream", "astream"]


def run(a: type[tl.Agent], how: str, q: str = TOOL_CALLS, tenant: str = "acme", history: Any = None) -> tl.AgentResult:
    """The agent called one of the four ways; streams read to their end."""
    if how == "call":
        return a.call(q=q, tenant=tenant, history=history)
    if how == "acall":
        return asyncio.run(a.acall(q=q, tenant=tenant, history=history))
    if how == "stream":
        with a.stream(q=q, tenant=tenant, history=history) as streamed:
            "".join(streamed)
        return streamed.result

    async def read() -> tl.AgentResult:
        async with a.astream(q=q, tenant=tenant, history=history) as streamed:
            "".join([piece async for piece in streamed])
        return streamed.result

    return asyncio.run(read())


def agent_span(o: Otel) -> ReadableSpan:
    [span] = [s for s in o.spans() if s.name.startswith("invoke_agent ")]
    return span


def tool_spans(o: Otel) -> list[ReadableSpan]:
    return sorted((s for s in o.spans() if s.name.startswith("execute_tool ")), key=lambda s: s.start_time or 0)


def parent_id(s: ReadableSpan) -> int | None:
    return None if s.parent is None else s.parent.span_id


def span_id(s: ReadableSpan) -> int:
    assert s.context is not None
    return int(s.context.span_id)


def check_within(parent: ReadableSpan, spans: Sequence[ReadableSpan]) -> None:
    assert parent.start_time is not None and parent.end_time is not None
    for s in spans:
        assert s.start_time is not None and s.end_time is not None
        assert parent.start_time <= s.start_time <= s.end_time <= parent.end_time, s.name


@pytest.mark.parametrize("how", WAYS)
def test_a_tool_loop_with_no_current_span_is_one_trace_under_its_agent_span(otel: Otel, how: str) -> None:
    pytest.importorskip("pydantic")
    agent("mock/fast").call(q="no tools", tenant="acme")  # a call without tools: its chat span alone
    assert [s.name for s in otel.spans() if s.parent is None] == ["chat mock/fast"]
    otel.exporter.clear()

    r = run(Tools, how, tenant="acme")

    top = agent_span(otel)
    assert (top.name, top.kind, top.parent) == ("invoke_agent Tools", SpanKind.INTERNAL, None)
    assert top.status.status_code == StatusCode.UNSET  # the tool's error went back to the model
    a = dict(top.attributes or {})
    assert a["gen_ai.operation.name"] == "invoke_agent"
    assert (a["gen_ai.agent.name"], a["gen_ai.request.model"]) == ("Tools", "mock/fast")
    assert a["tenantllm.tenant_id"] == "acme"
    assert a["gen_ai.provider.name"] == r.provider and a["gen_ai.response.model"] == r.chosen_model_id
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (r.input_tokens, r.output_tokens)
    assert a["tenantllm.execution_id"] == r.execution_id and a["tenantllm.cost_usd"] == float(r.total_cost)
    # One trace, one root: the rounds and the tool calls are the agent span's children, each
    # round's attempts the round's.
    assert top.context is not None
    assert {s.context.trace_id for s in otel.spans() if s.context is not None} == {top.context.trace_id}
    assert [s for s in otel.spans() if s.parent is None] == [top]
    rounds, tools = otel.calls(), tool_spans(otel)
    assert len(rounds) == 2 and [s.name for s in tools] == ["execute_tool weather", "execute_tool broken",
                                                            "execute_tool nope"]
    assert {parent_id(s) for s in [*rounds, *tools]} == {span_id(top)}
    attempts = [s for s in otel.spans() if s.name.startswith("attempt ")]
    assert len(attempts) == 2 and {parent_id(s) for s in attempts} == {span_id(s) for s in rounds}
    check_within(top, [*rounds, *tools])
    assert len(otel.spans()) == 1 + 2 + 3 + 2


@pytest.mark.parametrize("how", WAYS)
def test_under_an_app_span_the_agent_span_is_its_child(otel: Otel, how: str) -> None:
    pytest.importorskip("pydantic")
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as request:
        r = run(Tools, how, tenant="acme")

    top = agent_span(otel)
    assert parent_id(top) == request.get_span_context().span_id
    rounds, tools = otel.calls(), tool_spans(otel)
    assert len(rounds) == 2
    assert dict(rounds[-1].attributes or {})["tenantllm.execution_id"] == r.execution_id
    assert [s.name for s in tools] == ["execute_tool weather", "execute_tool broken", "execute_tool nope"]
    assert [(s.attributes or {}).get("error.type") for s in tools] == [None, "ValueError", "ToolCallRejected"]
    assert [s.status.status_code for s in tools] == [StatusCode.UNSET, StatusCode.ERROR, StatusCode.ERROR]
    assert dict(tools[0].attributes or {})["gen_ai.operation.name"] == "execute_tool"
    assert "gen_ai.tool.call.arguments" not in dict(tools[0].attributes or {})
    # All in the request's trace, under the agent span, in order: round 1, its tools, round 2.
    assert {parent_id(s) for s in [*rounds, *tools]} == {span_id(top)}
    assert rounds[0].end_time is not None and tools[-1].end_time is not None and rounds[1].start_time is not None
    assert rounds[0].end_time <= tools[0].start_time and tools[-1].end_time <= rounds[1].start_time  # type: ignore[operator]
    check_within(top, [*rounds, *tools])
    # The combined result spans both rounds and carries both rounds' requests.
    first = tl.Execution.get(str(dict(rounds[0].attributes or {})["tenantllm.execution_id"]))
    assert r.started_at == first.started_at and len(r.attempts) == 2


def error_type(s: ReadableSpan) -> str | None:
    return None if s.attributes is None else s.attributes.get("error.type")  # type: ignore[return-value]


@pytest.mark.parametrize("how", WAYS)
def test_a_tool_that_raises_ends_the_agent_span_with_its_class(otel: Otel, how: str) -> None:
    pytest.importorskip("pydantic")
    raising = type("Raising", (Tools,), {"raise_tool_errors": True})
    with pytest.raises(ValueError, match="bad x 1"):
        run(raising, how, q='@tool weather {"city": "Oslo"}\n@tool broken {"x": 1}', tenant="acme")

    top = agent_span(otel)
    assert top.name == "invoke_agent Raising" and top.end_time is not None
    assert (error_type(top), top.status.status_code) == ("ValueError", StatusCode.ERROR)
    assert dict(top.attributes or {})["gen_ai.provider.name"] == "mock"  # required; no round's error carries it
    [only_round] = otel.calls()  # the round asking for the calls succeeded
    assert error_type(only_round) is None and only_round.status.status_code == StatusCode.UNSET
    assert [(s.name, error_type(s)) for s in tool_spans(otel)] == [("execute_tool weather", None),
                                                                   ("execute_tool broken", "ValueError")]
    assert {parent_id(s) for s in [only_round, *tool_spans(otel)]} == {span_id(top)}
    assert [s for s in otel.spans() if s.parent is None] == [top]


@pytest.mark.parametrize("how", WAYS)
def test_a_budget_that_runs_out_between_rounds_ends_the_agent_span_with_it(otel: Otel, how: str) -> None:
    pytest.importorskip("pydantic")
    looping = type("Looping", (Tools,), {"max_tool_rounds": 50, "max_tokens": 50})
    tl.TenantBudget.create("acme", daily_limit="0.0003", enforcement="hard")
    with pytest.raises(tl.BudgetExceededError):
        run(looping, how, q='@loop weather {"city": "Oslo"}', tenant="acme")

    top = agent_span(otel)
    assert (error_type(top), top.status.status_code) == ("BudgetExceededError", StatusCode.ERROR)
    rounds = otel.calls()
    assert len(rounds) >= 3 and [error_type(s) for s in rounds] == [None] * (len(rounds) - 1) + ["BudgetExceededError"]
    tools = tool_spans(otel)
    assert len(tools) == len(rounds) - 1 and not any(error_type(s) for s in tools)
    assert {parent_id(s) for s in [*rounds, *tools]} == {span_id(top)}
    assert [s for s in otel.spans() if s.parent is None] == [top]


def test_a_tool_stream_closed_early_ends_the_agent_span_as_cancelled(otel: Otel, server: FakeProvider) -> None:
    pytest.importorskip("pydantic")
    with Tools.stream(q=TOOL_CALLS, tenant="acme") as streamed:
        next(streamed)
    top = agent_span(otel)
    assert (error_type(top), top.status.status_code) == ("CancelledError", StatusCode.ERROR)
    assert [s for s in otel.spans() if s.parent is None] == [top]
    assert {parent_id(s) for s in [*otel.calls(), *tool_spans(otel)]} == {span_id(top)}


@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_tool_stream_left_unclosed_ends_the_agent_span_when_collected(otel: Otel, how: str) -> None:
    """`for piece in Agent.stream(...): break` closes the stream when it is garbage-collected
    (no `with`): the agent span ends then too, as cancelled. (It was never ended: its rounds'
    and tools' spans were exported with a parent that never was.)"""
    pytest.importorskip("pydantic")
    if how == "stream":
        for _ in Tools.stream(q=TOOL_CALLS, tenant="acme"):
            break
    else:

        async def read() -> None:
            async for _ in Tools.astream(q=TOOL_CALLS, tenant="acme"):
                break

        asyncio.run(read())
    gc.collect()
    top = agent_span(otel)
    assert (error_type(top), top.status.status_code) == ("CancelledError", StatusCode.ERROR)


@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_tool_stream_whose_first_call_is_refused_ends_its_agent_span(otel: Otel, how: str) -> None:
    """The first round's call is refused as it is built (here a bad history): the agent span,
    started just before, ends with the error instead of never."""
    pytest.importorskip("pydantic")
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(tl.ConfigurationError):
        Tools.stream(q=TOOL_CALLS, tenant="acme", history=bad) if how == "stream" else Tools.astream(
            q=TOOL_CALLS, tenant="acme", history=bad)
    top = agent_span(otel)
    assert (error_type(top), top.status.status_code) == ("ConfigurationError", StatusCode.ERROR)


@pytest.mark.parametrize("how", WAYS)
def test_a_tool_loop_refused_before_its_first_round_answers_ends_the_agent_span_with_it(otel: Otel, how: str) -> None:
    pytest.importorskip("pydantic")
    bare = type("Bare", (Tools,), {"model": "gpt-4o"})  # its provider told by the name; no request goes out
    with pytest.raises(tl.ConfigurationError, match="role must be"):  # refused building round 1
        run(bare, how, history=[{"role": "robot", "content": "x"}])
    tl.TenantBudget.create("poor", daily_limit="0.000001")
    with pytest.raises(tl.BudgetExceededError):  # refused at round 1's admission
        run(bare, how, tenant="poor")

    runs = [s for s in otel.spans() if s.name == "invoke_agent Bare"]
    refused, blocked = sorted(runs, key=lambda s: s.start_time or 0)
    for span, kind in [(refused, "ConfigurationError"), (blocked, "BudgetExceededError")]:
        assert (error_type(span), span.status.status_code) == (kind, StatusCode.ERROR)
        assert dict(span.attributes or {})["gen_ai.provider.name"] == "openai"
    # The refused call never became a round; the blocked one is a failed round of its run.
    [round1] = otel.calls()
    assert (error_type(round1), parent_id(round1)) == ("BudgetExceededError", span_id(blocked))
    assert [s for s in otel.spans() if s.parent is None] == [refused, blocked]


def test_an_acall_cancelled_while_a_tool_runs_ends_its_spans_and_gives_the_context_back(otel: Otel) -> None:
    pytest.importorskip("pydantic")
    from opentelemetry import trace

    started = asyncio.Event()

    async def wait(x: int) -> str:
        """Waits until cancelled."""
        started.set()
        await asyncio.Event().wait()
        return "never"

    waiting: type[tl.Agent] = type("Waiting", (tl.Agent,), {"model": "mock/fast", "user": "{q}", "tools": (wait,)})
    tracer = otel.tracer_provider.get_tracer("app")
    seen: list[tuple[Any, Any]] = []

    async def app() -> None:
        with tracer.start_as_current_span("request") as request:
            try:
                await waiting.acall(q='@tool wait {"x": 1}', tenant="acme")
            except asyncio.CancelledError:
                seen.append((trace.get_current_span(), request))  # in the cancelled task itself
                raise

    async def main() -> None:
        task = asyncio.create_task(app())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [(current, request)] = seen
    assert current is request
    top = agent_span(otel)
    assert parent_id(top) == request.get_span_context().span_id and top.end_time is not None
    # As a cancelled call's chat span says it (Call.failed/cancelled): the class, ERROR.
    assert (error_type(top), top.status.status_code) == ("CancelledError", StatusCode.ERROR)
    [round1] = otel.calls()
    [tool] = tool_spans(otel)
    assert error_type(round1) is None
    assert (tool.name, error_type(tool), tool.status.status_code) == ("execute_tool wait", "CancelledError",
                                                                     StatusCode.ERROR)
    assert {parent_id(s) for s in [round1, tool]} == {span_id(top)}
    check_within(top, [round1, tool])


@pytest.mark.parametrize("how", ["call", "acall"])
def test_a_nested_agent_that_raises_gives_each_context_back_in_order(otel: Otel, how: str) -> None:
    pytest.importorskip("pydantic")
    from opentelemetry import trace

    inner: type[tl.Agent] = type("Inner", (Tools,), {"raise_tool_errors": True})
    ask = '@tool broken {"x": 2}'
    if how == "call":
        def consult(topic: str) -> str:
            """Asks the inner agent."""
            return str(inner.call(q=ask, tenant="acme").content)
    else:
        async def consult(topic: str) -> str:  # type: ignore[misc]
            """Asks the inner agent."""
            return str((await inner.acall(q=ask, tenant="acme")).content)

    outer: type[tl.Agent] = type("Outer", (tl.Agent,), {"model": "mock/fast", "user": "{q}", "tools": (consult,)})
    q = '@tool consult {"topic": "x"}'

    async def acall() -> Any:
        await outer.acall(q=q, tenant="acme")
        return trace.get_current_span()  # in the task that ran the call

    with otel.tracer_provider.get_tracer("app").start_as_current_span("request") as request:
        if how == "call":
            outer.call(q=q, tenant="acme")
            current = trace.get_current_span()
        else:
            current = asyncio.run(acall())
    assert current is request

    [outer_top] = [s for s in otel.spans() if s.name == "invoke_agent Outer"]
    [inner_top] = [s for s in otel.spans() if s.name == "invoke_agent Inner"]
    assert parent_id(outer_top) == request.get_span_context().span_id and error_type(outer_top) is None
    # The inner run, started by the outer run's tool (a child of its span), raised out of its
    # block inside the tool's: its span ended with it, and the outer run's context was
    # current again for its round 2.
    consult, broken = tool_spans(otel)  # by start: the outer tool ran the inner agent
    assert parent_id(inner_top) == span_id(consult) and error_type(inner_top) == "ValueError"
    assert [error_type(s) for s in otel.calls() if parent_id(s) == span_id(outer_top)] == [None, None]
    assert [error_type(s) for s in otel.calls() if parent_id(s) == span_id(inner_top)] == [None]
    assert [(s.name, parent_id(s), error_type(s)) for s in (consult, broken)] == [
        ("execute_tool consult", span_id(outer_top), "ValueError"),
        ("execute_tool broken", span_id(inner_top), "ValueError"),
    ]


@pytest.mark.parametrize("how", WAYS)
def test_with_telemetry_off_a_tool_loop_attaches_no_context(otel: Otel, how: str, monkeypatch: Any) -> None:
    pytest.importorskip("pydantic")
    from opentelemetry import context

    tl.configure(opentelemetry=False)
    attached: list[Any] = []
    real = context.attach
    def attach(c: Any) -> Any:
        attached.append(c)
        return real(c)

    monkeypatch.setattr(context, "attach", attach)
    assert len(run(Tools, how).tool_calls) == 3
    assert attached == [] and list(otel.spans()) == []


def span_making_tool(tracer: Any, kind: str) -> Any:
    """A tool whose own code starts a span, as an app's tool querying its database does; sync
    or async (awaiting in between, so the span stays current across an await)."""
    if kind == "sync":
        def lookup(city: str) -> str:
            """Looks the city up."""
            with tracer.start_as_current_span(f"lookup {city}"):
                return "3"
        return lookup

    async def lookup(city: str) -> str:  # type: ignore[misc]
        """Looks the city up."""
        with tracer.start_as_current_span(f"lookup {city}"):
            await asyncio.sleep(0)
            return "3"
    return lookup


def looking(tracer: Any, kind: str) -> type[tl.Agent]:
    """An agent whose tool starts a span of its own."""
    tools = (span_making_tool(tracer, kind),)
    return type("Looking", (tl.Agent,), {"model": "mock/fast", "user": "{q}", "tools": tools})


async def through_app_generator(streamed: AsyncStream) -> Any:
    """The pieces of a stream as an app hands them on (a web framework's streamed response):
    an async generator of its own, read across awaits."""
    async with streamed:
        async for piece in streamed:
            yield piece


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("how", WAYS)
def test_a_span_the_tools_own_code_starts_is_a_child_of_its_execute_tool_span(otel: Otel, how: str, kind: str) -> None:
    """Each tool call's `execute_tool` span is current while the tool runs, whichever of the
    four ways runs the loop (a stream's tools run in the reader's `next()`), and the caller's
    current span is its own again after each piece, at the end and after the call."""
    pytest.importorskip("pydantic")
    from opentelemetry import trace

    tracer = otel.tracer_provider.get_tracer("app")
    a = looking(tracer, kind)
    q = '@tool lookup {"city": "Oslo"}\n@tool lookup {"city": "Bergen"}'
    seen: list[bool] = []  # after each piece and at the end: is the caller's span current?

    def read() -> None:
        with tracer.start_as_current_span("request") as request:
            if how == "call":
                a.call(q=q, tenant="acme")
            else:
                with a.stream(q=q, tenant="acme") as streamed:
                    for _ in streamed:
                        seen.append(trace.get_current_span() is request)
            seen.append(trace.get_current_span() is request)

    async def aread() -> None:
        with tracer.start_as_current_span("request") as request:
            if how == "acall":
                await a.acall(q=q, tenant="acme")
            else:
                async for _ in through_app_generator(a.astream(q=q, tenant="acme")):
                    seen.append(trace.get_current_span() is request)
                    await asyncio.sleep(0)
            seen.append(trace.get_current_span() is request)

    if how in ("call", "stream"):
        read()
    else:
        asyncio.run(aread())
    assert seen and all(seen)
    assert trace.get_current_span() is trace.INVALID_SPAN

    top = agent_span(otel)
    [request] = [s for s in otel.spans() if s.name == "request"]
    assert parent_id(top) == span_id(request)
    tools = tool_spans(otel)
    assert [s.name for s in tools] == ["execute_tool lookup"] * 2
    assert {parent_id(s) for s in tools} == {span_id(top)}
    own = {s.name: s for s in otel.spans() if s.name.startswith("lookup ")}
    assert sorted(own) == ["lookup Bergen", "lookup Oslo"]
    # Each tool call's own span is a child of that call's execute_tool span, within it.
    for tool, city in zip(tools, ["Oslo", "Bergen"], strict=True):
        assert parent_id(own[f"lookup {city}"]) == span_id(tool)
        check_within(tool, [own[f"lookup {city}"]])
    check_within(top, tools)
    assert [error_type(s) for s in tools] == [None, None]


def tool_ran(o: Otel) -> bool:
    return any(s.name == "lookup Oslo" for s in o.spans())


@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_tool_stream_closed_early_after_its_tools_gives_the_callers_context_back(otel: Otel, how: str) -> None:
    """Closed in round 2, after the tools ran in a `next()`: the tool's span was its
    execute_tool span's child, and the caller's span is current again, also when the stream is
    read through an app's async generator closed by `break`."""
    pytest.importorskip("pydantic")
    from opentelemetry import trace

    tracer = otel.tracer_provider.get_tracer("app")
    a = looking(tracer, "sync")
    q = 'Checking\n@tool lookup {"city": "Oslo"}'
    seen: list[bool] = []
    with tracer.start_as_current_span("request") as request:
        if how == "stream":
            with a.stream(q=q, tenant="acme") as streamed:
                for _ in streamed:
                    seen.append(trace.get_current_span() is request)
                    if tool_ran(otel):  # a piece of round 2
                        break
            seen.append(trace.get_current_span() is request)
        else:

            async def aread() -> None:
                with tracer.start_as_current_span("task") as task:
                    gen = through_app_generator(a.astream(q=q, tenant="acme"))
                    async for _ in gen:
                        seen.append(trace.get_current_span() is task)
                        if tool_ran(otel):
                            break
                    await gen.aclose()
                    seen.append(trace.get_current_span() is task)

            asyncio.run(aread())
        seen.append(trace.get_current_span() is request)
    assert len(seen) >= 3 and all(seen)

    top = agent_span(otel)
    assert (error_type(top), top.status.status_code) == ("CancelledError", StatusCode.ERROR)
    [tool] = tool_spans(otel)
    [own] = [s for s in otel.spans() if s.name == "lookup Oslo"]
    assert parent_id(tool) == span_id(top) and parent_id(own) == span_id(tool)


@pytest.mark.parametrize("how", WAYS)
def test_a_tool_loops_answer_off_its_schema_ends_the_agent_span_with_the_error(otel: Otel, how: str) -> None:
    """The answer is parsed before the run ends: one that fails its schema raises, and the
    agent span says so (it ended OK before). Here the core's check passed and the schema's
    validator says no when the loop parses the answer (it reads state that changed between
    the two, as a check against the app's database may)."""
    pydantic = pytest.importorskip("pydantic")
    looks = itertools.count()

    class Invoice(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        number: int

        @pydantic.field_validator("number")  # type: ignore[untyped-decorator]
        @classmethod
        def still_open(cls, number: int) -> int:
            if next(looks):
                raise ValueError("closed meanwhile")
            return number

    invoicing = type("Invoicing", (Tools,), {"schema": Invoice})
    with pytest.raises(pydantic.ValidationError, match="closed meanwhile") as raised:
        run(invoicing, how, q='@tool weather {"city": "Oslo"}\n@json {"number": 1}')
    assert next(looks) == 2, "checked by the core, then parsed"

    top = agent_span(otel)
    kind = type(raised.value).__name__
    assert (error_type(top), top.status.status_code) == (kind, StatusCode.ERROR)
    rounds = otel.calls()
    assert [error_type(s) for s in rounds] == [None, None] and {parent_id(s) for s in rounds} == {span_id(top)}


def opaque(x: int) -> object:
    """Returns something JSON cannot hold."""
    return object()


async def async_opaque(x: int) -> object:
    """Returns something JSON cannot hold."""
    return object()


@pytest.mark.parametrize("tool", [opaque, async_opaque])
@pytest.mark.parametrize("how", WAYS)
def test_a_tool_result_json_cannot_hold_fails_its_execute_tool_span(otel: Otel, how: str, tool: Any) -> None:
    """The ConfigurationError is raised while the tool's span is open: it has the error (it
    ended OK, only the agent span had it), and nothing goes back to the model."""
    pytest.importorskip("pydantic")
    a = type("Opaque", (Tools,), {"tools": [tool]})
    with pytest.raises(tl.ConfigurationError, match="not JSON-serialisable"):
        run(a, how, q=f'@tool {tool.__name__} {{"x": 1}}')

    [span] = tool_spans(otel)
    assert (error_type(span), span.status.status_code) == ("ConfigurationError", StatusCode.ERROR)
    top = agent_span(otel)
    assert error_type(top) == "ConfigurationError" and parent_id(span) == span_id(top)
    check_within(top, [span])
    assert len(otel.calls()) == 1


@pytest.mark.parametrize("read_one", [False, True])
@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_stream_collected_unread_or_half_read_ends_its_rounds_span(
    otel: Otel, how: str, tools: bool, read_one: bool
) -> None:
    """A stream dropped without closing (never read, or `break` with no `with`) is closed
    when collected, its row cancelled: the round it was reading gets its chat span then,
    cancelled (it got none), ended within its agent span (a tool loop's)."""
    pytest.importorskip("pydantic")
    a = Tools if tools else agent("mock/fast")
    q = TOOL_CALLS if tools else "one two three four"
    if how == "stream":
        s = a.stream(q=q, tenant="acme")
        if read_one:
            next(s)
    else:

        async def start() -> Any:
            s = a.astream(q=q, tenant="acme")
            if read_one:
                await s.__anext__()
            return s

        s = asyncio.run(start())
    del s
    gc.collect()
    # The mock's round 1 asking for tools has no text: the first piece read is round 2's.
    *done, chat = otel.calls()
    assert [error_type(s) for s in done] == [None] * (tools and read_one)
    assert (error_type(chat), chat.status.status_code) == ("CancelledError", StatusCode.ERROR)
    if tools:
        top = agent_span(otel)
        assert (error_type(top), {parent_id(s) for s in otel.calls()}) == ("CancelledError", {span_id(top)})
        check_within(top, otel.calls())
    else:
        assert chat.parent is None and not any(s.name.startswith("invoke_agent ") for s in otel.spans())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_collecting_an_inherited_stream_ends_none_of_its_spans(otel: Otel) -> None:
    """A child forked while a stream is open (a fork pool started by a request handler)
    collects its copy unclosed without ending the parent's spans: only the parent ends
    them, once, and exports them."""
    pytest.importorskip("pydantic")
    s = Tools.stream(q=TOOL_CALLS, tenant="acme")
    before = len(otel.spans())
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            del s
            gc.collect()
            code = 0 if len(otel.spans()) == before else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child ended the parent's spans"
    del s
    gc.collect()
    assert error_type(agent_span(otel)) == "CancelledError"
