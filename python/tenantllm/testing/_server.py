"""The scripted provider behind `tenantllm.testing`: an HTTP server on 127.0.0.1 that answers
in the OpenAI (also DeepSeek, Mistral), Anthropic and Gemini wire formats, one scripted reply
per request, so users' agents run their real code path (pricing, retries, fallbacks,
breakers, budgets) with no network and no key."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

_GEMINI = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent)$")


def route(path: str) -> tuple[str, str | None, bool] | None:
    """(format, model named in the path, whether Gemini was asked to stream) of a provider
    endpoint, None for anything else."""
    if path.endswith("/chat/completions"):
        return "openai", None, False
    if path.endswith("/v1/messages"):
        return "anthropic", None, False
    m = _GEMINI.search(path)
    return ("gemini", unquote(m.group(1)), m.group(2) == "streamGenerateContent") if m else None


def success_body(
    wire: str, model: str, text: str, input_tokens: int, output_tokens: int, *,
    finish_reason: str | None = None, cached_tokens: int = 0, empty: bool = False,
) -> dict[str, Any]:
    """A whole reply in the provider's format, shaped as its API reference shows one;
    `empty` leaves out the choice/candidate/content (what content filters return)."""
    if wire == "anthropic":
        return {
            "id": "msg_" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [] if empty else [{"type": "text", "text": text}],
            "stop_reason": finish_reason or "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_read_input_tokens": cached_tokens,
                "cache_creation_input_tokens": 0,
            },
        }
    if wire == "gemini":
        parts = [{"text": text}]
        candidate = {"content": {"role": "model", "parts": parts}, "finishReason": finish_reason or "STOP", "index": 0}
        return {
            "candidates": [] if empty else [candidate],
            "usageMetadata": {
                "promptTokenCount": input_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": input_tokens + output_tokens,
                "cachedContentTokenCount": cached_tokens,
            },
            "modelVersion": model,
        }
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason or "stop"}
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [] if empty else [choice],
        "usage": {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        },
    }


# The error types each provider documents for an HTTP status.
_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {  # status -> (type, code)
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 529: "overloaded_error",
}
_GEMINI_ERRORS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}


def error_body(wire: str, status: int, message: str) -> dict[str, Any]:
    """The provider's error body for an HTTP status."""
    if wire == "anthropic":
        etype = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": etype, "message": message}}
    if wire == "gemini":
        gstatus = _GEMINI_ERRORS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
        return {"error": {"code": status, "message": message, "status": gstatus}}
    otype, code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": otype, "param": None, "code": code}}


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
        wire = route(self.path.split("?", 1)[0])
        if wire is None or wire[2]:
            self._send(404, {"error": {"message": f"no provider endpoint at {self.path}"}}, {})
            return
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        fmt, path_model, _ = wire
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
