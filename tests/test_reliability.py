"""Retries, fallbacks, timeouts, concurrency and cancellation against a local fake provider:
every call leaves exactly one execution row, whatever happens to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Recorded, Step

MILLION = Decimal(1_000_000)
KEYS = {"openai": "sk-test-openai-7f3a9c", "anthropic": "sk-ant-test-51be02", "gemini": "g-test-key-88d1e4"}
FAST_RETRIES = tl.Retries(max=2, base=0.01, max_delay=0.02)


@pytest.fixture
def fp(server: FakeProvider, tmp_path: Path) -> FakeProvider:
    """The module's fake server, reset, with tenantllm pointed at it on a fresh database."""
    server.reset()
    configure(server, tmp_path / "p.db")
    return server


def configure(fp: FakeProvider, db: Path) -> None:
    tl.configure(
        database=str(db),
        base_urls={"openai": fp.base_url + "/v1", "anthropic": fp.base_url, "gemini": fp.base_url},
        api_keys=dict(KEYS),
    )


def make_agent(model: str = "gpt-4o", **attrs: Any) -> type[tl.Agent]:
    body: dict[str, Any] = {"model": model, "user": "Question: {q}", "max_tokens": 100, **attrs}
    return type("Reliable", (tl.Agent,), body)


def status(code: int, retry_after: str | None = None) -> Step:
    return Step(kind="status", status=code, retry_after=retry_after)


def only_row() -> tl.Execution:
    rows = list(tl.Execution.all())
    assert len(rows) == 1, [r.status for r in rows]
    return tl.Execution.get(rows[0].id)


def wait_until(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


async def await_until(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


@pytest.fixture
def arrivals(fp: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.monotonic() of each request's arrival at the fake server."""
    times: list[float] = []
    record = fp._record

    def timed(rec: Recorded) -> None:
        times.append(time.monotonic())
        record(rec)

    monkeypatch.setattr(fp, "_record", timed)
    return times


# ---------------------------------------------------------------- retries


def test_retries_until_success(fp: FakeProvider) -> None:
    fp.script(status(500), status(500), Step(input_tokens=1000, output_tokens=100))

    r = make_agent(retries=FAST_RETRIES).call(q="hi")

    assert r.attempts_count == 3
    assert len(fp.requests) == 3
    expected = (1000 * Decimal("2.50") + 100 * Decimal("10.00")) / MILLION  # gpt-4o in prices.csv
    assert r.total_cost == expected
    row = only_row()
    assert row.status == "success"
    assert row.attempts_count == 3
    assert [a["status"] for a in row.attempts] == ["error", "error", "success"]
    assert [a["http_status"] for a in row.attempts[:2]] == [500, 500]
    assert [a["error_class"] for a in row.attempts] == ["ProviderError", "ProviderError", None]
    assert [a["cost_nanos"] for a in row.attempts[:2]] == [0, 0]
    assert row.attempts[2]["cost_nanos"] == int(expected * 1_000_000_000)
    assert row.total_cost == expected


def test_retries_exhausted_raise_the_last_error(fp: FakeProvider) -> None:
    fp.default = status(503)

    with pytest.raises(tl.ProviderError) as info:
        make_agent(retries=FAST_RETRIES).call(q="hi")

    assert type(info.value) is tl.ProviderError
    assert info.value.status == 503
    assert len(fp.requests) == 3
    row = only_row()
    assert (row.status, row.error_class, row.attempts_count) == ("error", "ProviderError", 3)
    assert row.total_cost == 0


@pytest.mark.parametrize("code", [401, 403, 400])
def test_non_retryable_errors_are_not_retried(fp: FakeProvider, code: int) -> None:
    fp.script(status(code), Step())

    with pytest.raises(tl.ProviderError) as info:
        make_agent(retries=FAST_RETRIES).call(q="hi")

    assert info.value.status == code
    assert info.value.retryable is False
    assert len(fp.requests) == 1
    assert only_row().attempts_count == 1


def test_invalid_responses_are_retried(fp: FakeProvider) -> None:
    fp.script(Step(kind="malformed"), Step(kind="reset"), Step(content="finally"))

    r = make_agent(retries=FAST_RETRIES).call(q="hi")

    assert r.content == "finally"
    assert [a["error_class"] for a in only_row().attempts] == ["InvalidResponseError", "ProviderError", None]


def test_rate_limit_waits_for_retry_after(fp: FakeProvider, arrivals: list[float]) -> None:
    fp.script(status(429, retry_after="0.3"), Step())

    t0 = time.monotonic()
    r = make_agent(retries=tl.Retries(max=1, base=0.01, max_delay=0.02)).call(q="hi")
    elapsed = time.monotonic() - t0

    assert r.attempts_count == 2
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.25  # Retry-After wins over the 0.02 s backoff cap
    assert elapsed >= 0.25
    assert only_row().attempts[0]["http_status"] == 429


def test_rate_limit_with_retries_exhausted_is_a_rate_limit_error(fp: FakeProvider) -> None:
    fp.default = status(429, retry_after="0.05")

    with pytest.raises(tl.RateLimitError) as info:
        make_agent(retries=tl.Retries(max=1, base=0.01, max_delay=0.02)).call(q="hi")

    assert info.value.retry_after == pytest.approx(0.05)
    assert len(fp.requests) == 2
    assert only_row().error_class == "RateLimitError"


def test_retry_after_beyond_a_minute_is_not_waited_for(fp: FakeProvider) -> None:
    fp.script(status(429, retry_after="120"), Step())

    t0 = time.monotonic()
    with pytest.raises(tl.RateLimitError) as info:
        make_agent(retries=FAST_RETRIES).call(q="hi")

    assert time.monotonic() - t0 < 2
    assert info.value.retry_after == 120
    assert len(fp.requests) == 1


# ---------------------------------------------------------------- fallbacks


def test_fallback_model_answers_when_the_primary_keeps_failing(fp: FakeProvider) -> None:
    fp.script(status(500), status(500), Step(model="claude-sonnet-4-5-20250929", input_tokens=1000, output_tokens=100))

    r = make_agent(retries=tl.Retries(max=1, base=0.01, max_delay=0.02), fallback_models=["claude-sonnet-4-5"]).call(
        q="hi"
    )

    assert r.model_id == "gpt-4o"
    assert r.chosen_model_id == "claude-sonnet-4-5-20250929"
    assert r.provider == "anthropic"
    assert r.attempts_count == 3
    assert r.total_cost == (1000 * Decimal("3.00") + 100 * Decimal("15.00")) / MILLION  # claude-sonnet-4-5
    assert [req.path for req in fp.requests] == ["/v1/chat/completions", "/v1/chat/completions", "/v1/messages"]
    row = only_row()
    assert row.status == "success"
    assert (row.model_id, row.chosen_model_id, row.provider) == ("gpt-4o", "claude-sonnet-4-5-20250929", "anthropic")
    assert [(a["model"], a["status"]) for a in row.attempts] == [
        ("gpt-4o", "error"),
        ("gpt-4o", "error"),
        ("claude-sonnet-4-5", "success"),
    ]
    assert [a["provider"] for a in row.attempts] == ["openai", "openai", "anthropic"]


def test_fallback_after_non_retryable_error(fp: FakeProvider) -> None:
    fp.script(status(401), Step(content="from gemini"))

    r = make_agent(retries=FAST_RETRIES, fallback_models=["gemini-2.5-flash"]).call(q="hi")

    assert r.content == "from gemini"
    assert r.attempts_count == 2
    assert len(fp.requests) == 2


def test_all_models_exhausted(fp: FakeProvider) -> None:
    fp.script(status(500), status(503), status(401), Step())

    with pytest.raises(tl.AllModelsExhaustedError) as info:
        make_agent(retries=tl.Retries(max=1, base=0.01, max_delay=0.02), fallback_models=["claude-sonnet-4-5"]).call(
            q="hi"
        )

    errors = info.value.errors
    assert [(e["model"], e["error_class"], e["status"]) for e in errors] == [
        ("gpt-4o", "ProviderError", 500),
        ("gpt-4o", "ProviderError", 503),
        ("claude-sonnet-4-5", "AuthenticationError", 401),
    ]
    assert [e["provider"] for e in errors] == ["openai", "openai", "anthropic"]
    assert all(e["message"] for e in errors)
    assert len(fp.requests) == 3
    row = only_row()
    assert (row.status, row.error_class, row.attempts_count) == ("error", "AllModelsExhaustedError", 3)
    assert row.chosen_model_id is None
    assert row.total_cost == 0
    for key in KEYS.values():
        assert key not in str(info.value) and key not in str(row.to_dict())


# ---------------------------------------------------------------- timeouts


# The provider's answer is held (a minute) rather than slow for a fixed time: a call that did
# not time out would wait for it, and a loaded machine's slowness cannot pass for a timeout.


def test_timeout_raises_and_records_timeout(fp: FakeProvider) -> None:
    fp.script(Step(kind="slow", held=True))

    t0 = time.monotonic()
    with pytest.raises(tl.ProviderTimeoutError) as info:
        make_agent(timeout=0.2).call(q="hi")
    elapsed = time.monotonic() - t0

    assert elapsed < 5
    assert info.value.retryable is True
    row = only_row()
    assert (row.status, row.error_class) == ("timeout", "ProviderTimeoutError")
    assert row.attempts[0]["error_class"] == "ProviderTimeoutError"


def test_timeout_then_retry_succeeds(fp: FakeProvider) -> None:
    fp.script(Step(kind="slow", held=True), Step(content="second time"))

    t0 = time.monotonic()
    r = make_agent(timeout=0.2, retries=FAST_RETRIES).call(q="hi")

    assert time.monotonic() - t0 < 5
    assert r.content == "second time"
    assert [a["status"] for a in only_row().attempts] == ["error", "success"]


# ---------------------------------------------------------------- async


async def test_many_concurrent_acalls(fp: FakeProvider) -> None:
    fp.default = Step(delay=0.05)
    agent = make_agent()

    results = await asyncio.gather(*(agent.acall(q=f"n{i}", tenant=f"t{i % 7}") for i in range(200)))

    assert len(results) == 200
    assert len({r.execution_id for r in results}) == 200
    assert sorted(r.content for r in results) == sorted(f"fake reply to: Question: n{i}" for i in range(200))
    assert len(fp.requests) == 200
    assert tl.Execution.all().count() == 200
    assert tl.Execution.successful().count() == 200
    assert tl.Execution.by_tenant("t0").count() == len(range(0, 200, 7))


async def test_acall_errors_raise_the_same_classes(fp: FakeProvider) -> None:
    fp.script(status(401))

    with pytest.raises(tl.AuthenticationError):
        await make_agent().acall(q="hi")

    assert only_row().status == "error"


async def test_cancelling_an_acall_records_it_as_cancelled(fp: FakeProvider) -> None:
    fp.script(Step(kind="slow", delay=5))

    task = asyncio.ensure_future(make_agent().acall(q="hi"))
    # Cancelled while the provider answers: not after a fixed pause, which a loaded machine
    # (or a PostgreSQL store opening its first connection) can spend before the request is sent.
    assert await await_until(lambda: len(fp.requests) == 1, timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await await_until(lambda: tl.Execution.by_status("cancelled").count() == 1, timeout=10)
    row = only_row()
    assert row.error_class == "CancelledError"
    assert row.completed_at is not None
    assert len(fp.requests) == 1


async def test_asyncio_timeout_around_acall_records_it_as_cancelled(fp: FakeProvider) -> None:
    fp.script(Step(kind="slow", held=True))

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await make_agent().acall(q="hi")

    assert time.monotonic() - t0 < 5
    assert await await_until(lambda: tl.Execution.by_status("cancelled").count() == 1)
    assert tl.Execution.all().count() == 1


async def test_cancelling_during_backoff_keeps_the_failed_attempts(fp: FakeProvider) -> None:
    fp.script(status(500), Step())

    task = asyncio.ensure_future(make_agent(retries=tl.Retries(max=1, base=4, max_delay=4)).acall(q="hi"))
    assert await await_until(lambda: len(fp.requests) == 1)
    await asyncio.sleep(0.2)  # now waiting 2-4 s before the retry
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await await_until(lambda: tl.Execution.by_status("cancelled").count() == 1)
    row = only_row()
    assert [(a["status"], a["http_status"]) for a in row.attempts] == [("error", 500)]
    assert len(fp.requests) == 1


async def test_cancelled_acall_releases_its_reservation(fp: FakeProvider, tmp_path: Path) -> None:
    """A cancelled call spends nothing and leaves no in-flight reservation behind."""
    tl.configure(
        database=str(tmp_path / "p.db"),
        base_urls={"openai": fp.base_url + "/v1"},
        api_keys=dict(KEYS),
        budgets={"global_daily": "0.0002"},  # one call's estimate fits, two do not
    )
    fp.script(Step(kind="slow", delay=5))

    task = asyncio.ensure_future(make_agent(max_tokens=10).acall(q="hi"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await await_until(lambda: tl.Execution.by_status("cancelled").count() == 1)

    r = await make_agent(max_tokens=10).acall(q="again")
    assert r.total_cost > 0
    assert tl.Execution.successful().sum("total_cost") == r.total_cost


@pytest.mark.sqlite_only
async def test_reservation_outlives_honoured_retry_after_waits(fp: FakeProvider, tmp_path: Path) -> None:
    """A live call's budget reservation must not expire while it waits out Retry-After headers
    (regression: the lease allowed only max_delay per retry, so after ~63 s the call was marked
    Abandoned, its reservation released, and its execution counted twice when it finished).
    Now the lease is renewed while the call runs."""
    db = tmp_path / "p.db"
    tl.configure(
        database=str(db),
        base_urls={"openai": fp.base_url + "/v1"},
        api_keys=dict(KEYS),
        budgets={"global_daily": "100"},
    )
    fp.default = status(429, retry_after="59")  # under the 60 s cap: honoured
    agent = make_agent(timeout=1, retries=tl.Retries(max=2, base=0.01, max_delay=0.02))

    task = asyncio.ensure_future(agent.acall(q="hi"))
    try:
        assert await await_until(lambda: len(fp.requests) == 1)
        await asyncio.sleep(0.1)  # now waiting out the first Retry-After
        with contextlib.closing(sqlite3.connect(db)) as conn:
            leases = conn.execute(
                "SELECT r.expires_at - e.started_at FROM reservations r JOIN executions e ON e.id = r.execution_id"
            ).fetchall()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # The lease is the fixed 120 s, renewed while the call waits (up to its worst case, two
    # honoured Retry-After waits + three 1 s attempts; tests/test_leases.py covers renewal).
    assert [lease for (lease,) in leases] == [120_000_000]


# ---------------------------------------------------------------- sync: Ctrl-C and the GIL

CTRL_C_SCRIPT = """
import sys
import tenantllm as tl

db, base = sys.argv[1], sys.argv[2]
tl.configure(database=db, base_urls={"openai": base + "/v1"}, api_keys={"openai": "sk-test-sub"})

class Slow(tl.Agent):
    model = "gpt-4o"
    user = "Question: {q}"
    timeout = 60

print("calling", flush=True)
Slow.call(q="hi")
print("returned", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_a_sync_call(fp: FakeProvider, tmp_path: Path) -> None:
    fp.script(Step(kind="slow", delay=60))
    db = tmp_path / "sub.db"
    env = {k: v for k, v in os.environ.items() if k not in ("TENANTLLM_DATABASE", "OPENAI_API_KEY")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, str(db), fp.base_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # Interrupt once the request is in flight. The server holds it for 60 s, so an exit
        # well before that was the interrupt, not the answer; the bound is loose because the
        # child's exit (settling its row, stopping the runtime) took over 5 s on a loaded machine.
        assert wait_until(lambda: len(fp.requests) == 1, timeout=10), "the subprocess never sent its request"
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert "calling" in out and "returned" not in out
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err

    configure(fp, db)
    rows = list(tl.Execution.all())
    assert [r.status for r in rows] == ["cancelled"]
    assert rows[0].error_class == "CancelledError"


def test_sync_call_releases_the_gil(fp: FakeProvider) -> None:
    fp.script(Step(kind="slow", held=True))  # the call blocks until the counting is done
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(make_agent().call(q="hi")))

    worker.start()
    assert wait_until(lambda: len(fp.requests) == 1)
    count = 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        count += 1
    still_running = worker.is_alive()
    fp.release()
    worker.join(timeout=5)

    assert still_running  # the counting happened while the call was blocked
    assert count > 1000
    assert len(results) == 1 and results[0].content.startswith("fake reply")


def test_sync_calls_from_many_threads(fp: FakeProvider) -> None:
    fp.default = Step(held=True)  # answered once all 20 are in flight at once
    agent = make_agent()
    results: list[Any] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        r = agent.call(q=f"n{i}")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    # No call waits for another's answer: all 20 requests arrive while none is answered
    # (counted, not timed: a loaded machine is slow either way).
    all_at_once = wait_until(lambda: len(fp.requests) == 20, timeout=30)
    fp.release()
    for t in threads:
        t.join(timeout=10)

    assert all_at_once, len(fp.requests)
    assert len(results) == 20
    assert tl.Execution.successful().count() == 20
