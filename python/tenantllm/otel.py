"""OpenTelemetry spans and metrics for calls (`configure(opentelemetry=True)`), after the
GenAI semantic conventions; needs `pip install 'tenantllm[otel]'`.

Each call is a CLIENT span named "chat {model}" in the caller's current trace, with a child
span per provider request (retries, fallbacks). Spans are made when the call has ended, with
the start and end times the core measured. A call with tools runs a loop of such calls: it is
an INTERNAL span `invoke_agent {agent}` whose children are each round's chat span and an
`execute_tool {name}` span per tool call, so the loop is one trace even with no span current.
Metrics: `gen_ai.client.token.usage` (by `gen_ai.token.type`),
`gen_ai.client.operation.duration` (seconds) and `tenantllm.cost` (USD, by tenant). Prompts
and replies are span attributes only with `opentelemetry={"capture_content": True}`; API keys
never are.

Options (`opentelemetry=` True or a dict): `capture_content` (bool, default False),
`tracer_provider` and `meter_provider` (default: the global ones).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tenantllm import _core
from tenantllm._core import AgentResult, ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from tenantllm.tools import Pending

OPERATION = "chat"
# tenantllm's provider names -> the conventions' `gen_ai.provider.name` values.
_PROVIDER_NAMES = {"gemini": "gcp.gemini", "mistral": "mistral_ai"}
_OPTIONS = frozenset({"capture_content", "tracer_provider", "meter_provider"})
# Token counts from 1 to 64M, as the conventions advise.
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]


def _ns(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def _provider(name: str) -> str:
    return _PROVIDER_NAMES.get(name, name)


class Telemetry:
    """The tracer and instruments of one configuration."""

    def __init__(self, option: Any) -> None:
        if option is True:
            option = {}
        if not isinstance(option, Mapping):
            raise ConfigurationError(
                f"opentelemetry must be True, False or a dict of options, got {type(option).__name__}"
            )
        unknown = sorted(set(option) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"opentelemetry: unknown option {unknown[0]!r}; expected one of " + ", ".join(sorted(_OPTIONS))
            )
        capture = option.get("capture_content", False)
        if not isinstance(capture, bool):
            raise ConfigurationError(
                f"opentelemetry capture_content must be True or False, got {type(capture).__name__}"
            )
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            raise ConfigurationError(
                "opentelemetry=True needs the OpenTelemetry API: pip install 'tenantllm[otel]'"
            ) from None
        self.capture_content = capture
        version = _core.__version__
        self.tracer = trace.get_tracer("tenantllm", version, tracer_provider=option.get("tracer_provider"))
        meter = metrics.get_meter("tenantllm", version, meter_provider=option.get("meter_provider"))
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per call, by input and output",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of calls",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.cost = meter.create_counter("tenantllm.cost", unit="USD", description="Cost of calls, by tenant")


@dataclass
class Call:
    """One call being observed: what it asked for, where it started, in which trace."""

    telemetry: Telemetry
    agent: str
    model: str
    tenant_id: str | None
    messages: list[dict[str, Any]]
    context: Context
    start_ns: int
    done: bool = False

    def _attributes(self) -> dict[str, Any]:
        a: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.request.model": self.model,
            "gen_ai.agent.name": self.agent,
        }
        if self.tenant_id is not None:
            a["tenantllm.tenant_id"] = self.tenant_id
        if self.telemetry.capture_content:
            a["gen_ai.input.messages"] = json.dumps(self.messages)
        return a

    def _span(self, attributes: dict[str, Any], start_ns: int) -> Span:
        from opentelemetry.trace import SpanKind

        return self.telemetry.tracer.start_span(
            f"{OPERATION} {self.model}", context=self.context, kind=SpanKind.CLIENT, attributes=attributes,
            start_time=start_ns,
        )

    def succeeded(self, r: AgentResult) -> AgentResult:
        """Records a call that returned `r`; returns it."""
        if self.done:
            return r
        self.done = True
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

        t = self.telemetry
        a = self._attributes()
        a.update(_outcome(r))
        if t.capture_content:
            a["gen_ai.output.messages"] = json.dumps(
                [{"role": "assistant", "parts": [{"type": "text", "content": r.content}],
                  "finish_reason": r.finish_reason or ""}]
            )
        start = _ns(r.started_at) or self.start_ns
        end = _ns(r.completed_at) or time.time_ns()
        span = self._span(a, start)
        inside = set_span_in_context(span, self.context)
        for n, attempt in enumerate(r.attempts, 1):
            at = attempt.get("started_at")
            a_start = at * 1000 if isinstance(at, int) else start
            child = t.tracer.start_span(
                f"attempt {attempt['model']}", context=inside, kind=SpanKind.INTERNAL, start_time=a_start,
                attributes={
                    "gen_ai.operation.name": OPERATION,
                    "gen_ai.request.model": attempt["model"],
                    "gen_ai.provider.name": _provider(attempt["provider"]),
                    "gen_ai.usage.input_tokens": attempt["input_tokens"],
                    "gen_ai.usage.output_tokens": attempt["output_tokens"],
                    "tenantllm.attempt": n,
                },
            )
            if attempt.get("error_class"):
                child.set_attribute("error.type", attempt["error_class"])
                child.set_status(Status(StatusCode.ERROR, attempt["error_class"]))
            child.end(end_time=a_start + attempt["duration_ms"] * 1_000_000)
        span.end(end_time=end)

        common = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": _provider(r.provider),
            "gen_ai.request.model": self.model,
            "gen_ai.response.model": r.chosen_model_id,
        }
        t.tokens.record(r.input_tokens, {**common, "gen_ai.token.type": "input"})
        t.tokens.record(r.output_tokens, {**common, "gen_ai.token.type": "output"})
        t.duration.record((end - start) / 1e9, common)
        cost = {**common, "tenantllm.tenant_id": self.tenant_id or ""}
        t.cost.add(float(r.total_cost), cost)
        return r

    def failed(self, e: BaseException) -> None:
        """Records a call that raised `e`."""
        self._failed(type(e).__name__, getattr(e, "execution_id", None), getattr(e, "provider", None))

    def cancelled(self) -> None:
        """Records a stream closed before its end (its row says cancelled)."""
        self._failed("CancelledError", None, None)

    def _failed(self, kind: str, execution_id: Any, provider: Any) -> None:
        if self.done:
            return
        self.done = True
        from opentelemetry.trace import Status, StatusCode

        end = time.time_ns()
        a = self._attributes()
        a["error.type"] = kind
        if isinstance(execution_id, str):
            a["tenantllm.execution_id"] = execution_id
        if isinstance(provider, str) and provider:
            a["gen_ai.provider.name"] = _provider(provider)
        span = self._span(a, self.start_ns)
        # The class only: a provider's message may quote the request.
        span.set_status(Status(StatusCode.ERROR, kind))
        span.end(end_time=end)
        self.telemetry.duration.record(
            (end - self.start_ns) / 1e9,
            {"gen_ai.operation.name": OPERATION, "gen_ai.request.model": self.model, "error.type": kind},
        )


def start(
    t: Telemetry,
    spec: _core.AgentSpec,
    tenant_id: str | None,
    system: str | None,
    user: str,
    history: Any,
) -> Call:
    """Begins observing a call."""
    from opentelemetry import context

    messages: list[dict[str, Any]] = []
    if t.capture_content:
        if system is not None:
            messages.append({"role": "system", "parts": [{"type": "text", "content": system}]})
        for turn in history or ():
            messages.append({"role": turn["role"], "parts": [{"type": "text", "content": turn["content"]}]})
        messages.append({"role": "user", "parts": [{"type": "text", "content": user}]})
    return Call(t, spec.name, spec.model, tenant_id, messages, context.get_current(), time.time_ns())


def _outcome(r: AgentResult) -> dict[str, Any]:
    """What a call's chat span and a tool loop's agent span say of its result."""
    a: dict[str, Any] = {
        "gen_ai.provider.name": _provider(r.provider),
        "gen_ai.response.model": r.chosen_model_id,
        "gen_ai.usage.input_tokens": r.input_tokens,
        "gen_ai.usage.output_tokens": r.output_tokens,
        "tenantllm.cost_usd": float(r.total_cost),
        "tenantllm.execution_id": r.execution_id,
    }
    if r.finish_reason is not None:
        a["gen_ai.response.finish_reasons"] = [r.finish_reason]
    return a


class AgentRun:
    """A call that runs a tool loop: its `invoke_agent {agent}` span, INTERNAL as the GenAI
    conventions ask of an agent run in the caller's process, started in the caller's current
    trace when the call starts and ended with the loop. Each round's chat span and each tool
    call's `execute_tool` span are its children."""

    def __init__(self, t: Telemetry, spec: _core.AgentSpec, tenant_id: str | None, provider: str | None) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        a: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": spec.name,
            "gen_ai.request.model": spec.model,
        }
        # Required by the conventions, so set now (`provider`: where the model's requests go)
        # for a run that ends before any round answers; a fallback's answer replaces it.
        if provider is not None:
            a["gen_ai.provider.name"] = _provider(provider)
        if tenant_id is not None:
            a["tenantllm.tenant_id"] = tenant_id
        self.telemetry = t
        self.span = t.tracer.start_span(f"invoke_agent {spec.name}", kind=SpanKind.INTERNAL, attributes=a)
        self.context = set_span_in_context(self.span)
        self.done = False

    @contextmanager
    def inside(self) -> Iterator[None]:
        """The rounds started in the block are children of the agent span (a round's span
        takes the context current when it starts); an exception leaving the block ends the
        run with it."""
        from opentelemetry import context

        token = context.attach(self.context)
        try:
            yield
        except BaseException as e:
            self.failed(e)
            raise
        finally:
            context.detach(token)

    @contextmanager
    def tool(self, p: Pending) -> Iterator[None]:
        """A tool call running in the block: its `execute_tool {name}` span, a child of the
        agent span and current in the block, so spans the tool's own code starts are its
        children whichever context runs it (a stream's reader: its `next()` runs the tools).
        A call the model got wrong (unknown tool, bad arguments) has `error.type`
        ToolCallRejected; an exception leaving the block (the tool raised, the call was
        cancelled, Ctrl-C) its class."""
        from opentelemetry import context
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

        a: dict[str, Any] = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": p.name,
                             "gen_ai.tool.call.id": p.id}
        if self.telemetry.capture_content:
            a["gen_ai.tool.call.arguments"] = p.arguments
        span = self.telemetry.tracer.start_span(f"execute_tool {p.name}", context=self.context,
                                                kind=SpanKind.INTERNAL, attributes=a)
        kind = "ToolCallRejected" if p.error else None
        # Detached on the way out of the block, so in the context it was attached in even when
        # the block awaits (a stream's `__anext__`): nothing leaks into the stream's reader.
        token = context.attach(set_span_in_context(span, self.context))
        try:
            yield
        except BaseException as e:
            kind = type(e).__name__
            raise
        finally:
            context.detach(token)
            if kind is not None:
                span.set_attribute("error.type", kind)
                span.set_status(Status(StatusCode.ERROR, kind))
            span.end()

    def succeeded(self, r: AgentResult) -> None:
        """Ends the run with the loop's result (tokens and cost of every round)."""
        if self.done:
            return
        self.done = True
        self.span.set_attributes(_outcome(r))
        self.span.end()

    def failed(self, e: BaseException) -> None:
        """Ends the run with what stopped the loop: a round's error (its span has the same
        `error.type`), a tool's exception (`raise_tool_errors`), a cancellation."""
        provider = getattr(e, "provider", None)
        if not self.done and isinstance(provider, str) and provider:
            self.span.set_attribute("gen_ai.provider.name", _provider(provider))
        self._failed(type(e).__name__)

    def cancelled(self) -> None:
        """Ends the run of a stream closed before its end."""
        self._failed("CancelledError")

    def _failed(self, kind: str) -> None:
        if self.done:
            return
        self.done = True
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("error.type", kind)
        self.span.set_status(Status(StatusCode.ERROR, kind))
        self.span.end()
