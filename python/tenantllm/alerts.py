"""Alert delivery: `webhook()` makes an `on_alert` handler that posts each alert to a URL.

The sending is done here, in Python with the standard library, not by the core's HTTP client:
alerts are rare (a threshold crossed, a breaker opened), they reach Python as dicts anyway
(`on_alert` is a Python hook), and one sender thread per webhook and process (urllib releases
the GIL while it waits on the network) needs no new binding, exit hook or fork handling across
the Rust boundary. A call only appends the encoded alert to a bounded queue.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import urllib.parse
import uuid
import weakref
from collections import deque
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from tenantllm._core import ConfigurationError

if TYPE_CHECKING:
    import urllib.request

log = logging.getLogger("tenantllm.alerts")

SIGNATURE_HEADER = "Tenantllm-Signature"
DELIVERY_HEADER = "Tenantllm-Delivery"
# Backoff between attempts: BASE_DELAY, then doubling, at most MAX_DELAY seconds.
BASE_DELAY = 0.5
MAX_DELAY = 30.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _plain(value: Any) -> Any:
    """JSON for the values alerts carry: amounts as exact decimal strings, times in ISO 8601."""
    if isinstance(value, Decimal):
        return format(value, "f")  # 0.0000001, not 1E-7
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def slack_text(alert: Mapping[str, Any]) -> str:
    """One line saying what happened, for a chat message."""
    kind = alert.get("kind")
    who = f"tenant {alert['tenant_id']}" if alert.get("tenant_id") else "no tenant"
    if kind == "budget_threshold":
        current = alert.get("current") or {}
        scope = str(alert.get("scope", ""))
        used = current.get("tokens") if scope.endswith("_tokens") else current.get("cost")
        unit = "" if scope.endswith("_tokens") else "$"
        return (
            f":warning: Budget {scope} ({alert.get('counter')}, {alert.get('period')}) passed "
            f"{alert.get('threshold')}%: {unit}{_plain(used)} of {unit}{_plain(alert.get('limit'))} "
            f"({alert.get('enforcement')})"
        )
    if kind == "breaker_opened":
        return (
            f":rotating_light: Circuit breaker opened for {alert.get('agent')} on {alert.get('model')} "
            f"({who}); retry at {_plain(alert.get('retry_at'))}"
        )
    if kind == "breaker_closed":
        return f":white_check_mark: Circuit breaker closed for {alert.get('agent')} on {alert.get('model')} ({who})"
    return f"tenantllm alert: {json.dumps(dict(alert), default=_plain, sort_keys=True)}"


def _slack_payload(alert: Mapping[str, Any]) -> dict[str, Any]:
    text = slack_text(alert)
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}


@functools.cache
def _opener() -> urllib.request.OpenerDirector:
    """Built at the first delivery, not at import: urllib.request (http.client, email) costs
    `import tenantllm` ~10 ms, and most apps never send a webhook."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        """A redirect is a failed delivery (urllib would resend a POST as a GET without its body)."""

        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(NoRedirect)


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return value


class Webhook:
    """An `on_alert` handler posting each alert as JSON to `url` from a background thread
    (see `webhook()`). `delivered`, `failed` (given up after every attempt) and `dropped`
    (the queue was full) count this process's alerts."""

    def __init__(
        self, url: str, secret: str | None, slack: bool, timeout: float, max_attempts: int, queue_size: int,
        flush_timeout: float,
    ) -> None:
        self.url = url
        self._secret = secret
        self.slack = slack
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.queue_size = queue_size
        self.flush_timeout = flush_timeout
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """Fresh state: at creation and in a forked child (the parent's thread and lock stay behind)."""
        self._cond = threading.Condition()
        self._pending: deque[bytes] = deque()
        self._sending = 0  # alerts taken from the queue, not yet settled
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None  # set by flush(): no attempt or wait past it
        self.delivered = self.failed = self.dropped = 0

    def __repr__(self) -> str:  # the URL's path can hold a token (Slack's does): scheme and host only
        parts = urllib.parse.urlsplit(self.url)
        return f"<tenantllm.alerts.Webhook {parts.scheme}://{parts.netloc}/... slack={self.slack}>"

    def __call__(self, alert: Mapping[str, Any]) -> None:
        """Queues the alert; never blocks and never raises for a slow or failing receiver."""
        payload = _slack_payload(alert) if self.slack else dict(alert)
        body = json.dumps(payload, default=_plain, separators=(",", ":")).encode()
        with self._cond:
            if len(self._pending) >= self.queue_size:
                self.dropped += 1
                log.warning("alert webhook queue full (%d): alert dropped (%d so far)", self.queue_size, self.dropped)
                return
            self._pending.append(body)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tenantllm-alerts", daemon=True)
                self._thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` seconds (default `flush_timeout`) for the queued alerts to be
        sent, waiting out backoff up to then; alerts still queued then are given up (counted
        in `failed`, logged). True when nothing was left. Called for every webhook at exit."""
        deadline = self._start_flush(self.flush_timeout if timeout is None else _number("timeout", timeout, 0, 3600))
        return self._finish_flush(deadline)

    def _start_flush(self, wait: float) -> float:
        with self._cond:
            self._deadline = time.monotonic() + wait
            self._cond.notify_all()
            return self._deadline

    def _finish_flush(self, deadline: float) -> bool:
        with self._cond:
            while self._pending or self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            done = not self._pending and not self._sending
            if not done:
                self.failed += len(self._pending)
                log.warning("alert webhook: %d alerts not delivered by the flush's deadline",
                            len(self._pending) + self._sending)
                self._pending.clear()
            if self._deadline == deadline:  # not a later flush's
                self._deadline = None
            self._cond.notify_all()
            return done

    def _run(self) -> None:
        """Sends until the queue is empty, then ends (the next alert starts another thread): no
        thread is left behind, and a webhook no longer configured can be collected."""
        while True:
            with self._cond:
                if not self._pending:
                    self._thread = None
                    return
                body = self._pending.popleft()
                self._sending += 1
            ok = self._deliver(body)
            with self._cond:
                self._sending -= 1
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1
                self._cond.notify_all()

    def _deliver(self, body: bytes) -> bool:
        delivery = str(uuid.uuid4())  # the same on every attempt: receivers can drop repeats
        for attempt in range(self.max_attempts):
            if attempt and not self._pause(min(BASE_DELAY * 2 ** (attempt - 1), MAX_DELAY)):
                break
            timeout = self._time_left(self.timeout)
            if timeout <= 0:
                break
            error = self._post(body, delivery, timeout)
            if error is None:
                return True
            log.warning("alert webhook attempt %d/%d failed: %s", attempt + 1, self.max_attempts, error)
        log.error("alert webhook gave up on an alert (delivery %s)", delivery)
        return False

    def _post(self, body: bytes, delivery: str, timeout: float) -> str | None:
        """One attempt; None when the receiver answered 2xx, else why not."""
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery, "User-Agent": "tenantllm-alerts"}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, int(time.time()), body)
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _opener().open(request, timeout=timeout) as response:
                response.read()
                return None
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except (OSError, ValueError) as e:  # refused, reset, timed out, TLS, a bad answer
            return f"{type(e).__name__}: {e}"

    def _time_left(self, seconds: float) -> float:
        """`seconds`, cut short by a flush's deadline."""
        with self._cond:
            if self._deadline is None:
                return seconds
            return min(seconds, self._deadline - time.monotonic())

    def _pause(self, seconds: float) -> bool:
        """Waits `seconds` before a retry; False when a flush's deadline comes first."""
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                limit = end if self._deadline is None else min(end, self._deadline)
                left = limit - time.monotonic()
                if left <= 0:
                    return self._deadline is None or time.monotonic() < self._deadline
                self._cond.wait(left)


def webhook(
    url: str,
    *,
    secret: str | None = None,
    slack: bool = False,
    timeout: float = 10.0,
    max_attempts: int = 6,
    queue_size: int = 1000,
    flush_timeout: float = 5.0,
) -> Webhook:
    """An `on_alert` handler that POSTs each alert as JSON to `url` (http or https):
    `tl.configure(on_alert=tl.alerts.webhook("https://ops.example/hooks/llm", secret="..."))`.

    Each request carries `Tenantllm-Signature: t=<unix seconds>,v1=<hex>`, the HMAC-SHA256
    under `secret` of the timestamp, a ".", and the raw body, and `Tenantllm-Delivery`, an id
    that stays the same across retries. `secret` is required unless `slack=True`, which sends
    `{"text": ..., "blocks": [...]}` for a Slack incoming webhook (signed too if a secret is given).

    Alerts are sent in order by one background thread per webhook and process: a call only
    queues them. An attempt fails on a connection error, after `timeout` seconds (0.1 to 300)
    or on an answer other than 2xx (redirects included) and is retried after 0.5 s, 1 s, 2 s,
    ... (at most 30 s) up to `max_attempts` (1 to 20) attempts in all. At most `queue_size`
    alerts (1 to 1,000,000) wait; more are dropped, counted in `dropped` and logged. A forked
    child sends its own alerts with its own thread. At interpreter exit the queue is flushed
    for at most `flush_timeout` seconds (0 to 300)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"webhook url must be a string, got {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"webhook url must be an http:// or https:// URL with a host, got {url!r}")
    if not isinstance(slack, bool):
        raise ConfigurationError(f"slack must be True or False, got {type(slack).__name__}")
    if secret is not None and not isinstance(secret, str):
        raise ConfigurationError(f"webhook secret must be a string, got {type(secret).__name__}")
    if secret == "" or (secret is None and not slack):
        raise ConfigurationError("webhook secret must be a non-empty string (it signs every request)")
    return Webhook(
        url,
        secret,
        slack,
        _number("timeout", timeout, 0.1, 300),
        _whole("max_attempts", max_attempts, 1, 20),
        _whole("queue_size", queue_size, 1, 1_000_000),
        _number("flush_timeout", flush_timeout, 0, 300),
    )


# Every webhook of this process, for the fork and exit hooks (a dropped webhook drops out).
_live: weakref.WeakSet[Webhook] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for w in list(_live):
        w._reset()


def _flush_all_at_exit() -> None:
    """Flushes every webhook at once: the wait is the longest `flush_timeout`, not their sum
    (no thread may be started at exit, so the deadlines are all set first)."""
    deadlines = [(w, w._start_flush(w.flush_timeout)) for w in list(_live)]
    for w, deadline in deadlines:
        w._finish_flush(deadline)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_all_at_exit)
