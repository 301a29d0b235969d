"""Local fake LLM provider HTTP server for tests (standard library only).

One server answers, on 127.0.0.1, in the real wire formats of:

* OpenAI chat completions (also DeepSeek / Mistral): POST ``*/chat/completions``
* Anthropic messages: POST ``*/v1/messages``
* Gemini generateContent: POST ``*/models/{model}:generateContent``

and, when the request asks for a stream (``"stream": true``, Gemini's
``:streamGenerateContent?alt=sse``), as server-sent events in each provider's format: built
from the step (text in word pieces, usage in the provider's last events), or ``Step.sse``
replayed verbatim (recorded streams in tests/fixtures/streams), ``sse_delay`` seconds apart,
hanging up after ``sse_cut`` events if set.

Behaviour per request is scripted with :class:`Step` objects (FIFO queue,
falling back to ``FakeProvider.default``).  Every request is recorded.

    with FakeProvider() as fp:
        fp.script(Step(kind="status", status=429, retry_after="1"), Step())
        ...  # point the client at fp.base_url
        assert fp.requests[0].body["model"] == "gpt-4o-mini"
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self, cast
from urllib.parse import parse_qsl, urlsplit

from tenantllm.testing._server import error_body, success_body
from tenantllm.testing._server import route as _wire

KINDS = ("ok", "status", "slow", "malformed", "truncated", "reset", "empty_choices", "raw")
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass
class Recorded:
    """One request as received by the fake server."""

    method: str
    path: str  # path without the query string
    headers: dict[str, str]  # lower-cased keys
    body: dict[str, Any] | None  # parsed JSON object, None if not a JSON object
    query: dict[str, str]
    raw: bytes = b""  # raw request body


@dataclass
class Step:
    """How to answer one request."""

    kind: str = "ok"
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    content: str | None = None
    input_tokens: int = 11
    output_tokens: int = 7
    cached_tokens: int = 0
    model: str | None = None
    finish_reason: str | None = None
    # kind="raw": answer `body` verbatim with `status` and `headers` (recorded replies).
    body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    # Streams: a recorded event stream to replay instead of one built from the step, the
    # pause before each event after the first, and how many events to send before hanging up.
    sse: str | None = None
    sse_delay: float = 0.0
    sse_cut: int | None = None
    # Answer only once the test calls `release()` (or the server is reset or stopped), waiting
    # at most `delay` seconds (a minute if 0): a call stays in flight for as long as the test
    # needs, however slow a loaded machine is, instead of racing a fixed delay.
    held: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown Step kind {self.kind!r}; expected one of {KINDS}")


def _text_of(content: Any) -> str:
    """Text of an OpenAI/Anthropic message content (string or list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict)
        )
    return ""


def _last_user_text(fmt: str, body: dict[str, Any] | None) -> str:
    if not body:
        return ""
    if fmt == "gemini":
        for c in reversed(body.get("contents") or []):
            if isinstance(c, dict) and c.get("role", "user") == "user":
                return _text_of(c.get("parts"))
        return ""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            return _text_of(m.get("content"))
    return ""


def _wants_stream(fmt: str, path: str, body: dict[str, Any] | None) -> bool:
    if fmt == "gemini":
        return path.endswith(":streamGenerateContent")
    return bool((body or {}).get("stream"))


def _pieces(text: str) -> list[str]:
    """Text cut as a model streams it: word by word, spaces kept."""
    return re.findall(r"\S*\s*", text)[:-1] or [""]


def sse_events(fmt: str, step: Step, model: str, text: str, body: dict[str, Any] | None) -> list[str]:
    """A reply as the provider streams it (each item one event, with its blank line)."""
    def data(obj: Any, event: str | None = None) -> str:
        head = f"event: {event}\n" if event else ""
        return f"{head}data: {json.dumps(obj)}\n\n"

    pieces = _pieces(text)
    if fmt == "openai":
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return data({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "choices": [choice]})

        usage = reply_body("openai", step, model, text)["usage"]
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": p}) for p in pieces]
        events.append(chunk({}, step.finish_reason or "stop"))
        if "mistral" in model:
            # Mistral puts the usage on its last chunk unasked (and takes no stream_options).
            last = json.loads(events[-1][len("data: "):])
            events[-1] = data({**last, "usage": usage})
        elif ((body or {}).get("stream_options") or {}).get("include_usage"):
            events.append(data({"id": cid, "object": "chat.completion.chunk", "model": model,
                                "choices": [], "usage": usage}))
        return [*events, "data: [DONE]\n\n"]
    if fmt == "anthropic":
        block = {"type": "text", "text": ""}
        stop = {"stop_reason": step.finish_reason or "end_turn", "stop_sequence": None}
        start = reply_body("anthropic", step, model, "")
        start["content"], start["stop_reason"] = [], None
        start["usage"] = {**start["usage"], "output_tokens": 1}
        return [
            data({"type": "message_start", "message": start}, "message_start"),
            data({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start"),
            *[data({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
                   "content_block_delta") for p in pieces],
            data({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            data({"type": "message_delta", "delta": stop, "usage": {"output_tokens": step.output_tokens}},
                 "message_delta"),
            data({"type": "message_stop"}, "message_stop"),
        ]
    events = []
    for i, p in enumerate(pieces):
        last = i == len(pieces) - 1
        r = reply_body("gemini", step, model, p)
        if not last:
            del r["candidates"][0]["finishReason"]
            r["usageMetadata"] = {"promptTokenCount": step.input_tokens, "totalTokenCount": step.input_tokens}
        events.append(data(r))
    return events


def reply_body(fmt: str, step: Step, model: str, text: str, empty: bool = False) -> dict[str, Any]:
    """The step's whole reply in the provider's format (the testing kit's bodies)."""
    return success_body(fmt, model, text, step.input_tokens, step.output_tokens,
                        finish_reason=step.finish_reason, cached_tokens=step.cached_tokens, empty=empty)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of concurrent acalls connect at once
    provider: FakeProvider

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response are expected; stay quiet


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # we always send Content-Length + Connection: close
    _in_flight = False

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        cast(_Server, self.server).provider._enter()
        self._in_flight = True
        try:
            self._serve()
        except _CLIENT_GONE:
            self.close_connection = True  # client went away (e.g. timed out while we slept)
        finally:
            self._land()

    def _land(self) -> None:
        """This request is no longer in flight. Called as a whole answer starts: its client can
        settle only after that, while this thread may return much later on a busy machine, so
        counting until then saw calls overlap that never did (max_in_flight 6 of 4)."""
        if self._in_flight:
            self._in_flight = False
            cast(_Server, self.server).provider._leave()

    do_GET = do_PUT = do_DELETE = do_POST

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()  # trailing CRLF (no trailers expected)
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        provider = cast(_Server, self.server).provider
        self.close_connection = True
        url = urlsplit(self.path)
        raw = self._read_body()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else None
        provider._record(Recorded(
            method=self.command,
            path=url.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            raw=raw,
        ))

        route = _wire(url.path) if self.command == "POST" else None
        if route is None:  # unknown endpoint: does not consume a script step
            err = {"error": {"code": 404, "message": f"no route for {self.command} {url.path}"}}
            self._send(404, json.dumps(err).encode())
            return
        fmt, path_model, _ = route
        step = provider._next_step()
        if step.held:
            provider._released.wait(step.delay or 60)
        elif step.delay > 0:
            time.sleep(step.delay)  # only blocks this request's thread

        if step.kind == "reset":
            self._reset()
            return
        if step.kind == "malformed":
            self._send(200, b'{"choices": [')
            return
        if step.kind == "raw":
            self._send(step.status, json.dumps(step.body).encode(), step.headers)
            return
        if step.kind == "status":
            headers = {"Retry-After": step.retry_after} if step.retry_after is not None else {}
            message = f"fake {fmt} error (HTTP {step.status})"
            self._send(step.status, json.dumps(error_body(fmt, step.status, message)).encode(), headers)
            return

        model = step.model or path_model or str((body or {}).get("model") or "unknown-model")
        text = step.content
        if text is None:
            text = "fake reply to: " + _last_user_text(fmt, body)[:40]
        if _wants_stream(fmt, url.path, body) and step.kind in ("ok", "slow", "raw"):
            if step.sse is not None:
                events = [e + "\n\n" for e in step.sse.replace("\r\n", "\n").split("\n\n") if e.strip()]
            else:
                events = sse_events(fmt, step, model, text, body)
            self._stream(events, step)
            return
        payload = json.dumps(reply_body(fmt, step, model, text, step.kind == "empty_choices"))
        data = payload.encode()
        if step.kind == "truncated":
            # Promise the whole body, deliver half, then hang up.
            self._send(200, data[: len(data) // 2], content_length=len(data))
            return
        self._send(200, data)  # "ok", "slow", "empty_choices"

    def _stream(self, events: list[str], step: Step) -> None:
        """Sends events as they are "generated", until the end or `sse_cut`."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        for i, event in enumerate(events):
            if step.sse_cut is not None and i >= step.sse_cut:
                self._reset()
                return
            if i and step.sse_delay > 0:
                time.sleep(step.sse_delay)
            self.wfile.write(event.encode())
            self.wfile.flush()

    def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None,
              content_length: int | None = None) -> None:
        self._land()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if content_length is None else content_length))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _reset(self) -> None:
        """Close abruptly: SO_LINGER (1, 0) makes close() send a TCP RST."""
        conn = self.connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the makefile() reference so close() is real
        conn.close()


class FakeProvider:
    """One server; start with ``with FakeProvider() as fp:`` or fp.start()/fp.stop()."""

    def __init__(self) -> None:
        self.base_url: str = ""
        self.port: int = 0
        self.requests: list[Recorded] = []
        # Requests being answered now, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self.default: Step = Step()
        self._script: deque[Step] = deque()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.provider = self
        self._server = server
        self.port = int(server.server_address[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"FakeProvider:{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def base_urls(self) -> dict[str, str]:
        """`configure(base_urls=...)` sending every built-in provider, and an OpenAI-compatible
        one named "local", to this server."""
        v1 = self.base_url + "/v1"
        root = self.base_url
        return {"openai": v1, "anthropic": root, "gemini": root, "deepseek": v1, "mistral": v1, "local": v1}

    def script(self, *steps: Step) -> None:
        """Queue behaviours, consumed one per (routed) request, FIFO."""
        with self._lock:
            self._script.extend(steps)

    def release(self) -> None:
        """Let the requests held by `Step(held=True)` (those waiting now, and later ones until
        the next reset) be answered."""
        self._released.set()

    def reset(self) -> None:
        """Forget recorded requests and any queued steps; answer successfully by default again.
        Held requests of an earlier test are released."""
        self.release()
        with self._lock:
            self._released = threading.Event()
            self.requests.clear()
            self.max_in_flight = self.in_flight
            self._script.clear()
            self.default = Step()

    def _next_step(self) -> Step:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)



def tool_call_step(fmt: str, calls: list[tuple[str, dict[str, Any]]], text: str | None = None) -> Step:
    """A reply asking for tool calls, as each provider documents it (answered verbatim):

    * OpenAI (and DeepSeek, Mistral): the API reference's function-calling example of "Create
      chat completion" (https://platform.openai.com/docs/api-reference/chat/create): `content`
      null, `tool_calls` with the arguments as JSON text, `finish_reason` "tool_calls";
    * Anthropic: "Tool use with Claude" (https://docs.anthropic.com/en/docs/build-with-claude/tool-use):
      a text block then `tool_use` blocks (`toolu_...` ids, `input` objects), `stop_reason` "tool_use";
    * Gemini: "Function calling with the Gemini API", REST (https://ai.google.dev/gemini-api/docs/function-calling):
      `functionCall` parts with `args` objects, `finishReason` "STOP".
    """
    if fmt == "openai":
        tool_calls = [
            {"id": f"call_{i}abc", "type": "function", "function": {"name": n, "arguments": json.dumps(a, indent=1)}}
            for i, (n, a) in enumerate(calls)
        ]
        body: dict[str, Any] = {
            "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1699896916, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": tool_calls},
                         "logprobs": None, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
        }
    elif fmt == "anthropic":
        blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        blocks += [{"type": "tool_use", "id": f"toolu_01A09q90qw90lq917835lq{i}", "name": n, "input": a}
                   for i, (n, a) in enumerate(calls)]
        body = {
            "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": blocks, "stop_reason": "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": 82, "output_tokens": 17},
        }
    else:
        parts: list[dict[str, Any]] = [{"text": text}] if text else []
        parts += [{"functionCall": {"name": n, "args": a}} for n, a in calls]
        body = {
            "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 82, "candidatesTokenCount": 17, "totalTokenCount": 99},
            "modelVersion": "gemini-2.5-flash",
        }
    return Step(kind="raw", body=body)
