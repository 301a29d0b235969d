"""Alert delivery: `tl.alerts.webhook()` as `on_alert`, against a real HTTP receiver on
127.0.0.1. Alerts come from real calls (a soft budget far below one call's cost crosses 80 %
and 100 % at once)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl

SECRET = "whsec_test"


class Support(tl.Agent):
    model = "mock/support"
    user = "Question: {q}"


def over_budget(tenant: str) -> dict[str, Any]:
    """A tenant whose soft daily limit any call passes: each first call raises two alerts."""
    return {"id": tenant, "daily_limit": "0.0000001", "enforcement": "soft"}


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers each POST with the next of `script` ("ok", "fail" = 500, "hang" = no answer
    until the test ends), then "ok"; keeps every request, including failed ones."""

    script: list[str] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def answered(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.headers.get("x-answer") == "ok"]

    def wait_for(self, n: int, timeout: float = 20) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.answered()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.answered()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with rec.lock:
                answer = rec.script.pop(0) if rec.script else "ok"
                headers = {k.lower(): v for k, v in self.headers.items()} | {"x-answer": answer}
                rec.requests.append(Received(headers, body, time.monotonic()))
            if answer == "hang":
                rec.release.wait(60)
                return
            self.send_response(200 if answer == "ok" else 500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/llm"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield rec
    rec.release.set()
    server.shutdown()
    server.server_close()


def settled(hook: tl.alerts.Webhook, n: int, timeout: float = 10) -> tuple[int, int, int]:
    """The hook's counts once `n` alerts are settled (the receiver logs a request before the
    sender has read its answer)."""
    deadline = time.monotonic() + timeout
    while hook.delivered + hook.failed < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return hook.delivered, hook.failed, hook.dropped


def verify(r: Received, secret: str = SECRET) -> None:
    """What a receiver does: recompute the HMAC over "<t>." + body and compare in constant time."""
    parts = dict(p.split("=", 1) for p in r.headers["tenantllm-signature"].split(","))
    expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + r.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, parts["v1"])
    assert abs(time.time() - int(parts["t"])) < 300


def test_alerts_are_posted_signed(receiver: Receiver) -> None:
    hook = tl.alerts.webhook(receiver.url, secret=SECRET)
    tl.configure(on_alert=hook)
    Support.call(q="spend", tenant=over_budget("acme"))

    got = receiver.wait_for(2)
    assert [r.json["threshold"] for r in got] == [80, 100]
    for r in got:
        verify(r)
        assert r.headers["content-type"] == "application/json"
        assert r.json["kind"] == "budget_threshold" and r.json["counter"] == "tenant:acme"
        assert r.json["limit"] == "0.0000001"  # amounts as exact decimal strings
        assert r.json["current"]["tokens"] > 0
    with pytest.raises(AssertionError):
        verify(got[0], secret="another secret")
    tampered = Received(got[0].headers, got[0].body.replace(b"acme", b"acmf"), got[0].at)
    with pytest.raises(AssertionError):
        verify(tampered)
    assert settled(hook, 2) == (2, 0, 0)


def test_a_failing_receiver_gets_it_on_the_third_try_with_backoff(receiver: Receiver) -> None:
    receiver.script = ["fail", "fail"]
    hook = tl.alerts.webhook(receiver.url, secret=SECRET)
    tl.configure(on_alert=hook, budgets={"global_daily": "0.0000001", "enforcement": "soft"})
    Support.call(q="spend")  # global_daily crosses 80 % and 100 %

    got = receiver.wait_for(2)
    tries = receiver.requests[:3]
    assert [r.headers["x-answer"] for r in tries] == ["fail", "fail", "ok"]
    assert len({r.body for r in tries}) == 1 and len({r.headers["tenantllm-delivery"] for r in tries}) == 1
    assert tries[2].at - tries[1].at > (tries[1].at - tries[0].at) * 1.5  # the wait doubles: 0.5 s, 1 s
    assert tries[1].at - tries[0].at >= 0.4
    for r in tries:
        verify(r)
    assert [r.json["threshold"] for r in got] == [80, 100]  # order kept: the second waited for the first
    assert settled(hook, 2) == (2, 0, 0)


def test_giving_up_after_max_attempts_is_counted(receiver: Receiver) -> None:
    receiver.script = ["fail"] * 10
    hook = tl.alerts.webhook(receiver.url, secret=SECRET, max_attempts=2)
    hook({"kind": "breaker_closed", "agent": "A", "model": "m", "tenant_id": "t"})
    assert settled(hook, 1) == (0, 1, 0)
    assert len(receiver.requests) == 2


def test_a_hung_receiver_does_not_delay_calls_and_a_full_queue_drops(receiver: Receiver) -> None:
    receiver.script = ["hang"] * 100
    hook = tl.alerts.webhook(receiver.url, secret=SECRET, timeout=30, queue_size=3)
    tl.configure(on_alert=hook)
    Support.call(q="warm up")  # engine and database ready, no alert

    quiet = []
    for i in range(5):
        t0 = time.perf_counter()
        Support.call(q="plain", tenant=f"plain{i}")
        quiet.append(time.perf_counter() - t0)
    loud = []
    for i in range(5):  # two alerts each, while the receiver holds the first request for 30 s
        t0 = time.perf_counter()
        Support.call(q="spend", tenant=over_budget(f"t{i}"))
        loud.append(time.perf_counter() - t0)
    # A call that waited on the receiver would take 30 s; generous against a loaded machine.
    assert max(loud) < 2.0, (loud, quiet)
    deadline = time.monotonic() + 5
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(receiver.requests) == 1  # the sender is stuck on the first alert
    # One in flight, three queued, the rest dropped (seven if the sender had not yet taken the first).
    assert hook.dropped in (6, 7)
    assert hook.delivered == 0
    assert not hook.flush(0)  # gives up the queued alerts (the hung one carries on)
    # Ten alerts: one in flight, the rest either dropped or queued and given up by the flush.
    assert hook.failed == 9 - hook.dropped


def test_slack_payload(receiver: Receiver) -> None:
    hook = tl.alerts.webhook(receiver.url, slack=True)
    tl.configure(on_alert=hook)
    Support.call(q="spend", tenant=over_budget("acme"))
    got = receiver.wait_for(2)
    assert set(got[0].json) == {"text", "blocks"}
    text = got[1].json["text"]
    assert "tenant_daily" in text and "100%" in text and "$0.0000001" in text
    assert got[1].json["blocks"] == [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    assert "tenantllm-signature" not in got[0].headers  # Slack URLs carry their own secret

    opened = tl.alerts.slack_text(
        {"kind": "breaker_opened", "agent": "Support", "model": "gpt-4o", "tenant_id": "acme", "retry_at": None}
    )
    assert "opened for Support on gpt-4o (tenant acme)" in opened
    signed = tl.alerts.webhook(receiver.url, slack=True, secret=SECRET)
    signed({"kind": "breaker_closed", "agent": "Support", "model": "gpt-4o", "tenant_id": None})
    [*_, last] = receiver.wait_for(3)
    verify(last)
    assert "closed for Support on gpt-4o (no tenant)" in last.json["text"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "ftp://example.com/x", "secret": "s"}, "http:// or https://"),
        ({"url": "file:///etc/passwd", "secret": "s"}, "http:// or https://"),
        ({"url": "https:///nohost", "secret": "s"}, "with a host"),
        ({"url": 42, "secret": "s"}, "url must be a string"),
        ({"url": "https://example.com/x", "secret": ""}, "secret must be a non-empty string"),
        ({"url": "https://example.com/x"}, "secret must be a non-empty string"),
        ({"url": "https://example.com/x", "secret": b"s"}, "secret must be a string"),
        ({"url": "https://example.com/x", "secret": "s", "slack": "yes"}, "slack must be True or False"),
        ({"url": "https://example.com/x", "secret": "s", "timeout": 0}, "timeout must be a number from 0.1"),
        ({"url": "https://example.com/x", "secret": "s", "max_attempts": 0}, "max_attempts .* from 1 to 20"),
        ({"url": "https://example.com/x", "secret": "s", "queue_size": 1.5}, "queue_size"),
        ({"url": "https://example.com/x", "secret": "s", "flush_timeout": -1}, "flush_timeout"),
    ],
)
def test_bad_input_is_a_configuration_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(tl.ConfigurationError, match=message):
        tl.alerts.webhook(**kwargs)


def test_the_secret_is_not_in_its_repr() -> None:
    hook = tl.alerts.webhook("https://hooks.slack.com/services/T0/B0/token", secret="topsecret")
    assert "topsecret" not in repr(hook) and "token" not in repr(hook)
    assert "hooks.slack.com" in repr(hook)


def _script(db: Path, url: str, body: str) -> str:
    return textwrap.dedent(f"""
        import os, sys, time, tenantllm as tl
        class Support(tl.Agent):
            model = "mock/support"
            user = "Question: {{q}}"
        def over(t):
            return {{"id": t, "daily_limit": "0.0000001", "enforcement": "soft"}}
        hook = tl.alerts.webhook({url!r}, secret={SECRET!r}, flush_timeout=float(os.environ.get("FLUSH", "5")))
        tl.configure(database={str(db)!r}, on_alert=hook)
    """) + textwrap.dedent(body)


def test_a_forked_child_sends_its_own_alerts_and_exit_flushes(receiver: Receiver, db_path: Path) -> None:
    body = """
        Support.call(q="parent", tenant=over("parent"))
        hook.flush()  # the parent's sender thread has run before the fork
        pid = os.fork()
        if pid == 0:
            Support.call(q="child", tenant=over("child"))
            sys.exit(0)  # a normal exit: the child's queue is flushed by its own atexit
        _, status = os.waitpid(pid, 0)
        print(status, hook.delivered)
    """
    done = subprocess.run([sys.executable, "-c", _script(db_path, receiver.url, body)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "2"]
    got = receiver.wait_for(4, timeout=5)
    for r in got:
        verify(r)
    assert sorted(r.json["counter"] for r in got) == ["tenant:child"] * 2 + ["tenant:parent"] * 2
    assert len(receiver.requests) == 4  # the parent's alerts were not sent again by the child


def test_exit_waits_for_a_slow_receiver_but_not_past_flush_timeout(receiver: Receiver, db_path: Path) -> None:
    receiver.script = ["fail"]  # the first attempt fails: delivered at exit after a 0.5 s backoff
    body = 'Support.call(q="x", tenant=over("acme"))\n'
    done = subprocess.run([sys.executable, "-c", _script(db_path, receiver.url, body)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(receiver.answered()) == 2

    receiver.script = ["hang"] * 10
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _script(db_path, receiver.url, body.replace("acme", "other"))],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "FLUSH": "1"})
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert "alerts not delivered by the flush's deadline" in done.stderr
    assert took < 15  # the flush gave up after 1 s, not the request's 10 s timeout or more
