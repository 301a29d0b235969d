"""The scripted provider behind `tenantllm.testing`: an HTTP server on 127.0.0.1 that answers
in the OpenAI (also DeepSeek, Mistral), Anthropic and Gemini wire formats, one scripted reply
per request, so users' agents run their real code path (pricing, retries, fallbacks,
breakers, budgets) with no network and no key."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_GEMINI = re.compile(r"/models/([^/:]+):generateContent$")


def _wire(path: str) -> tuple[str, str | None] | None:
    """(format, model named in the path) of a provider endpoint, None for anything else."""
    if path.endswith("/chat/completions"):
        return "openai", None
    if path.endswith("/v1/messages"):
        return "anthropic", None
    m = _GEMINI.search(path)
    return ("gemini", m.group(1)) if m else None


def success_body(wire: str, model: str, text: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    if wire == "anthropic":
        return {
            "id": "msg_test", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }  # fmt: skip
    if wire == "gemini":
        return {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": input_tokens, "candidatesTokenCount": output_tokens},
            "modelVersion": model,
        }
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                  "total_tokens": input_tokens + output_tokens},
    }  # fmt: skip


def error_body(wire: str, status: int, message: str) -> dict[str, Any]:
    if wire == "anthropic":
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    if wire == "gemini":
        return {"error": {"code": status, "message": message, "status": "UNAVAILABLE"}}
    return {"error": {"message": message, "type": "server_error", "code": None}}


# What the server does with one request: (status, JSON body, extra headers, seconds to wait first).
Answer = tuple[int, dict[str, Any], dict[str, str], float]
# Given (wire format, model, request body), the answer; called once per provider request.
Responder = Callable[[str, str, dict[str, Any]], Answer]


class ScriptedServer:
    def __init__(self, respond: Responder) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.respond = respond  # type: ignore[attr-defined]
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def base_urls(self) -> dict[str, str]:
        """`configure(base_urls=...)` sending every built-in provider here."""
        v1 = self.url + "/v1"
        return {"openai": v1, "deepseek": v1, "mistral": v1, "anthropic": self.url, "gemini": self.url}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        wire = _wire(self.path.split("?", 1)[0])
        if wire is None:
            self._send(404, {"error": {"message": f"no provider endpoint at {self.path}"}}, {})
            return
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        fmt, path_model = wire
        model = path_model or str(body.get("model", ""))
        status, payload, headers, delay = self.server.respond(fmt, model, body)  # type: ignore[attr-defined]
        if delay > 0:
            time.sleep(delay)
        try:
            self._send(status, payload, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout passed while we waited)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True
