"""A testing kit for your own tests: an isolated tenantllm database per test, scripted
provider replies, and assertions on the executions your code left behind.

In your `conftest.py`::

    pytest_plugins = ["tenantllm.testing"]

    @pytest.fixture
    def tenantllm_options():            # optional: configure() options for every test
        return {"budgets": {"global_daily": 10}}

In a test::

    from tenantllm.testing import Failure, Reply

    def test_support_answers(llm):
        llm.script("Your order ships today.", Failure(503), Reply("Sorry!", output_tokens=40))
        assert answer_customer("acme", "Where is my order?") == "Your order ships today."
        [run] = llm.assert_executions(1, agent="SupportAgent", tenant_id="acme", status="success")
        assert run.total_cost > 0
        assert "Where is my order?" in llm.requests[0].text

Fixtures:
- `tenantllm_db`: tenantllm configured from the defaults (plus `tenantllm_options`) on a new
  SQLite file in the test's `tmp_path`; the path. Nothing carries over between tests.
- `llm`: `tenantllm_db` plus a `ScriptedLLM`: every built-in provider (OpenAI, Anthropic,
  Gemini, DeepSeek, Mistral) is pointed at a server on 127.0.0.1 that answers each request
  with the next scripted reply, in that provider's wire format, so your agents run their real
  code path (prices, retries, fallbacks, breakers, budgets, execution rows) with no network
  and no key. Models of the built-in `mock` provider are unaffected.

A scripted reply is a string (the content), a `Reply` (content, token usage, delay), a
`Failure` (an HTTP error status), or one of the provider error classes: `RateLimitError`
(429), `AuthenticationError` (401), `InvalidResponseError` (a reply without usage), any other
`ProviderError` (500). A retry or a fallback model takes the next reply. A request with no
reply left is answered 500 with a message saying so (`llm.remaining` counts what is left).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tenantllm._core import AuthenticationError, InvalidResponseError, ProviderError, RateLimitError
from tenantllm.config import configure
from tenantllm.execution import Execution, ExecutionQuery
from tenantllm.testing._server import Answer, ScriptedServer, error_body, success_body

__all__ = ["Failure", "Reply", "ScriptedLLM", "SentRequest", "llm", "tenantllm_db", "tenantllm_options"]

# The key every provider is given: the server ignores it, the core needs one.
TEST_KEY = "sk-tenantllm-testing"


@dataclass(frozen=True)
class Reply:
    """A successful answer: its content and the usage the provider reports (tokens >= 0)."""

    content: str = "ok"
    input_tokens: int = 10
    output_tokens: int = 5
    delay: float = 0.0  # seconds before answering (longer than an agent's `timeout` = a timeout)


@dataclass(frozen=True)
class Failure:
    """An HTTP error from the provider (429 and 5xx are retried by agents with `retries`)."""

    status: int = 500
    message: str = "scripted failure"
    retry_after: float | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class SentRequest:
    """A request the provider received."""

    wire: str  # "openai" (also DeepSeek, Mistral), "anthropic" or "gemini"
    model: str
    body: dict[str, Any] = field(repr=False)

    @property
    def text(self) -> str:
        """Every message's text, joined: what to search for what your code sent."""
        parts: list[str] = []

        def walk(value: Any) -> None:
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
            elif isinstance(value, dict):
                for k in ("content", "text", "parts", "system", "contents", "messages", "systemInstruction"):
                    if k in value:
                        walk(value[k])

        walk(self.body)
        return "\n".join(parts)


ScriptItem = str | Reply | Failure | type[ProviderError]

_STATUS_OF = ((RateLimitError, 429), (AuthenticationError, 401))


def _as_reply(item: Any) -> Reply | Failure | type[InvalidResponseError]:
    if isinstance(item, str):
        return Reply(item)
    if isinstance(item, (Reply, Failure)):
        return item
    if isinstance(item, type) and issubclass(item, InvalidResponseError):
        return InvalidResponseError
    if isinstance(item, type) and issubclass(item, ProviderError):
        status = next((s for cls, s in _STATUS_OF if issubclass(item, cls)), 500)
        return Failure(status, f"scripted {item.__name__}")
    raise TypeError(
        f"a scripted reply is a str, a Reply, a Failure or a ProviderError class, got {item!r}"
        " (for a timeout use Reply(delay=...) longer than the agent's timeout)"
    )


class ScriptedLLM:
    """The scripted provider of one test: `script(...)` queues replies, `requests` lists what
    was sent, `assert_executions(...)` checks the rows your code left."""

    def __init__(self) -> None:
        self.requests: list[SentRequest] = []
        self._replies: deque[Reply | Failure | type[InvalidResponseError]] = deque()
        self._lock = threading.Lock()
        self.server = ScriptedServer(self._respond)

    def script(self, *replies: ScriptItem) -> None:
        """Queue replies, one per provider request, in order."""
        converted = [_as_reply(r) for r in replies]  # all checked before any is queued
        with self._lock:
            self._replies.extend(converted)

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._replies)

    def _respond(self, wire: str, model: str, body: dict[str, Any]) -> Answer:
        with self._lock:
            self.requests.append(SentRequest(wire, model, body))
            reply = self._replies.popleft() if self._replies else None
        if reply is None:
            message = f"tenantllm.testing: no scripted reply left for this request (model {model!r}); see llm.script()"
            return 500, error_body(wire, 500, message), {}, 0.0
        if isinstance(reply, Failure):
            headers = {} if reply.retry_after is None else {"Retry-After": f"{reply.retry_after:g}"}
            return reply.status, error_body(wire, reply.status, reply.message), headers, reply.delay
        if isinstance(reply, Reply):
            body = success_body(wire, model, reply.content, reply.input_tokens, reply.output_tokens)
            return 200, body, {}, reply.delay
        body_without_usage = success_body(wire, model, "", 0, 0)
        for usage in ("usage", "usageMetadata"):
            body_without_usage.pop(usage, None)
        return 200, body_without_usage, {}, 0.0

    def executions(
        self, *, agent: str | None = None, tenant_id: str | None = None, status: str | None = None
    ) -> list[Execution]:
        """The executions recorded in this test's database, oldest first, filtered."""
        q: ExecutionQuery = Execution.all()
        if agent is not None:
            q = q.by_agent(agent)
        if tenant_id is not None:
            q = q.by_tenant(tenant_id)
        if status is not None:
            q = q.by_status(status)
        return list(q.order_by("started_at"))

    def assert_executions(
        self, count: int, *, agent: str | None = None, tenant_id: str | None = None, status: str | None = None
    ) -> list[Execution]:
        """Asserts exactly `count` executions match; returns them (oldest first)."""
        found = self.executions(agent=agent, tenant_id=tenant_id, status=status)
        if len(found) != count:
            seen = [(e.agent, e.tenant_id, e.status) for e in self.executions()]
            raise AssertionError(
                f"expected {count} execution(s) with agent={agent!r} tenant_id={tenant_id!r} status={status!r}, "
                f"found {len(found)}; all executions (agent, tenant_id, status): {seen}"
            )
        return found

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def tenantllm_options() -> dict[str, Any]:
    """`configure()` options for every test (override it in your conftest.py)."""
    return {}


@pytest.fixture
def tenantllm_db(tmp_path: Path, tenantllm_options: dict[str, Any]) -> Iterator[Path]:
    """tenantllm configured from the defaults on a new database file; its path."""
    path = tmp_path / "tenantllm.db"
    configure(reset=True, **{**tenantllm_options, "database": str(path)})
    yield path
    configure(reset=True, database=":memory:")  # nothing reaches the next test


@pytest.fixture
def llm(tenantllm_db: Path, tenantllm_options: dict[str, Any]) -> Iterator[ScriptedLLM]:
    """Every provider answered by a script (see the module's docstring)."""
    scripted = ScriptedLLM()
    urls = scripted.server.base_urls()
    try:
        configure(
            base_urls={**tenantllm_options.get("base_urls", {}), **urls},
            api_keys={**{p: TEST_KEY for p in urls}, **tenantllm_options.get("api_keys", {})},
        )
        yield scripted
    finally:
        scripted.close()
