"""Circuit breakers (DESIGN §3 invariant 4): per (agent, model, tenant), shared through the
store across processes, one half-open probe, provider failures only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl


class Flaky(tl.Agent):
    model = "mock/flaky"
    user = "ping {n}"
    # Long enough for a loaded machine to check an open breaker before it half-opens; tests
    # wait for its retry_at rather than a fixed time.
    circuit_breaker = tl.BreakerPolicy(errors=3, within=60, cooldown=3)


class WithFallback(tl.Agent):
    model = "mock/primary"
    fallback_models = ("mock/backup",)
    user = "ping"
    circuit_breaker = tl.BreakerPolicy(errors=2, within=60, cooldown=60)


def _fail(tmp_path: Path, rate: float, **kw: Any) -> None:
    tl.configure(database=str(tmp_path / "b.db"), mock={"failure_rate": rate, "seed": 1}, **kw)


def _trip(agent: type[tl.Agent], tenant: str, n: int) -> None:
    for i in range(n):
        with pytest.raises(tl.ProviderError):
            agent.call(n=i, tenant=tenant)


def _cooled_down(agent: type[tl.Agent], tenant: str) -> None:
    """Sleeps until the open breaker lets its probe through."""
    retry_at = tl.CircuitBreaker.status(agent, tenant_id=tenant)["retry_at"]
    time.sleep(max(0.0, retry_at.timestamp() - time.time()) + 0.05)


def test_opens_per_tenant_then_probes_once_and_closes(tmp_path: Path) -> None:
    alerts: list[dict[str, Any]] = []
    _fail(tmp_path, 1.0, on_alert=alerts.append)
    _trip(Flaky, "bad", 3)
    assert tl.CircuitBreaker.open_for(Flaky, tenant_id="bad")
    assert not tl.CircuitBreaker.open_for(Flaky, tenant_id="good")
    status = tl.CircuitBreaker.status(Flaky, tenant_id="bad")
    assert status["state"] == "open" and status["retry_at"] is not None
    assert [a["kind"] for a in alerts] == ["breaker_opened"]
    assert alerts[0]["tenant_id"] == "bad"

    with pytest.raises(tl.CircuitOpenError) as info:
        Flaky.call(n=9, tenant="bad")
    e = info.value
    assert (e.agent, e.tenant_id, e.model) == ("Flaky", "bad", "mock/flaky")
    row = tl.Execution.by_status("short_circuited").first()
    assert row is not None and row.tenant_id == "bad" and row.attempts_count == 0

    # Another tenant is unaffected by "bad"'s breaker (its calls still reach the provider).
    with pytest.raises(tl.ProviderError):
        Flaky.call(n=1, tenant="good")

    _cooled_down(Flaky, "bad")  # the next call is the probe; success closes the breaker
    _fail(tmp_path, 0.0, on_alert=alerts.append)
    assert Flaky.call(n=2, tenant="bad").content
    assert tl.CircuitBreaker.status(Flaky, tenant_id="bad")["state"] == "closed"
    assert alerts[-1]["kind"] == "breaker_closed"


def test_failed_probe_reopens(tmp_path: Path) -> None:
    _fail(tmp_path, 1.0)
    _trip(Flaky, "t", 3)
    _cooled_down(Flaky, "t")
    with pytest.raises(tl.ProviderError):
        Flaky.call(n=0, tenant="t")  # the probe fails
    assert tl.CircuitBreaker.status(Flaky, tenant_id="t")["state"] == "open"
    with pytest.raises(tl.CircuitOpenError):
        Flaky.call(n=0, tenant="t")


def test_errors_before_sending_do_not_count(tmp_path: Path) -> None:
    _fail(tmp_path, 0.0, budgets={"global_daily": "0.0000001"})
    for i in range(5):
        with pytest.raises(tl.BudgetExceededError):
            Flaky.call(n=i, tenant="t")
    with pytest.raises(tl.MissingParameterError):
        Flaky.call(tenant="t")
    assert tl.CircuitBreaker.status(Flaky, tenant_id="t")["failures"] == 0


def test_open_primary_skips_to_fallback_and_all_open_short_circuits(tmp_path: Path) -> None:
    _fail(tmp_path, 1.0)
    for _ in range(2):
        with pytest.raises(tl.AllModelsExhaustedError):
            WithFallback.call(tenant="t")
    # both models failed twice: both open now
    assert tl.CircuitBreaker.open_for(WithFallback, tenant_id="t")
    assert tl.CircuitBreaker.open_for("WithFallback", tenant_id="t", model="mock/backup")
    with pytest.raises(tl.CircuitOpenError):
        WithFallback.call(tenant="t")
    tl.CircuitBreaker.reset("WithFallback", tenant_id="t", model="mock/backup")
    _fail(tmp_path, 0.0)
    r = WithFallback.call(tenant="t")  # primary still open: skipped, no request sent to it
    assert r.chosen_model_id == "mock/backup" and r.attempts_count == 1
    tl.CircuitBreaker.reset(WithFallback, tenant_id="t")
    assert not tl.CircuitBreaker.open_for(WithFallback, tenant_id="t")


def test_without_multi_tenancy_the_key_is_agent_and_model(tmp_path: Path) -> None:
    _fail(tmp_path, 1.0, multi_tenancy_enabled=False)
    _trip(Flaky, "a", 2)
    _trip(Flaky, "b", 1)  # a different tenant adds to the same breaker
    assert tl.CircuitBreaker.open_for(Flaky)
    assert tl.CircuitBreaker.open_for(Flaky, tenant_id="anything")


COOLDOWN = 4.0
PROBE = textwrap.dedent(
    """
    import sys, tenantllm as tl
    class Flaky(tl.Agent):
        model = "mock/flaky"
        user = "ping {n}"
        circuit_breaker = tl.BreakerPolicy(errors=3, within=60, cooldown=float(sys.argv[4]))
    tl.configure(database=sys.argv[1], mock={"failure_rate": float(sys.argv[2]), "latency_ms": float(sys.argv[3])})
    # Started and its store opened (a read), it calls when told: how long a process takes to
    # start on a loaded machine is then no part of the timings the test sets up.
    tl.CircuitBreaker.status("Flaky", tenant_id="shared", model="mock/flaky")
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        Flaky.call(n=1, tenant="shared")
        print("ok")
    except tl.CircuitOpenError:
        print("open")
    except tl.ProviderError:
        print("failed")
    """
)


def _ready(db: str, rate: float, latency_ms: float = 0) -> subprocess.Popen[str]:
    """A process ready to make one call (`_call`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen(
        [sys.executable, "-c", PROBE, db, str(rate), str(latency_ms), str(COOLDOWN)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _go(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("\n")
    p.stdin.flush()


def _call(p: subprocess.Popen[str]) -> str:
    """What the call of a process `_ready` started came to."""
    _go(p)
    return p.communicate(timeout=60)[0].strip()


def test_a_breaker_opened_by_one_process_is_seen_by_another(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    fresh = _ready(db, 0.0)
    outs = [_call(_ready(db, 1.0)) for _ in range(3)]
    opened = time.monotonic()
    assert outs == ["failed"] * 3
    # A process that never saw a failure is refused without calling the provider.
    assert _call(fresh) == "open"
    # Half-open: of two processes racing after the cooldown, exactly one is the probe; the
    # probe's reply takes long enough for the other to find it claimed.
    racers = [_ready(db, 0.0, latency_ms=COOLDOWN * 1000) for _ in range(2)]
    time.sleep(max(0.0, opened + COOLDOWN + 0.2 - time.monotonic()))
    for p in racers:
        _go(p)
    assert sorted(p.communicate(timeout=60)[0].strip() for p in racers) == ["ok", "open"]
    tl.configure(database=db)
    assert tl.CircuitBreaker.status("Flaky", tenant_id="shared", model="mock/flaky")["state"] == "closed"


def test_status_without_a_model_covers_every_model_of_the_agent(tmp_path: Path) -> None:
    _fail(tmp_path, 1.0, multi_tenancy_enabled=True)
    for _ in range(2):  # each call fails on the primary, then on the backup
        with pytest.raises(tl.TenantLLMError):
            WithFallback.call(tenant="acme")
    both = tl.CircuitBreaker.status(WithFallback, tenant_id="acme")
    assert both["state"] == "open" and both["model"] is None
    assert both["failures"] == sum(m["failures"] for m in both["models"])
    assert [m["model"] for m in both["models"]] == ["mock/primary", "mock/backup"]
    assert both["retry_at"] == min(m["retry_at"] for m in both["models"])
    # By name (as the README shows): the models whose breaker is not closed.
    assert tl.CircuitBreaker.status("WithFallback", tenant_id="acme")["state"] == "open"
    assert tl.CircuitBreaker.open_for("WithFallback", tenant_id="acme")
    assert not tl.CircuitBreaker.open_for("WithFallback", tenant_id="other")
    # One model closed again: the agent's calls go through, so the agent is closed.
    tl.CircuitBreaker.reset("WithFallback", tenant_id="acme", model="mock/backup")
    assert tl.CircuitBreaker.status(WithFallback, tenant_id="acme")["state"] == "closed"
    tl.CircuitBreaker.reset("WithFallback", tenant_id="acme")
    assert tl.CircuitBreaker.not_closed() == []
