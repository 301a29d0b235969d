"""The PostgreSQL store (DESIGN §3 across hosts): the behaviours the SQLite tests check, run on
`postgresql://` databases, plus what only a server has: lost connections.

Runs when TENANTLLM_TEST_POSTGRES_URL names a server (CI starts one); each test gets a new
database, created and dropped with psql."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import tenantllm as tl
from fake_providers import FakeProvider, Step

SERVER_URL = os.environ.get("TENANTLLM_TEST_POSTGRES_URL", "")
if not SERVER_URL:
    pytest.skip("set TENANTLLM_TEST_POSTGRES_URL to run the PostgreSQL tests", allow_module_level=True)

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def psql(url: str, sql: str) -> str:
    """Runs SQL with psql; returns the unaligned, tuples-only output."""
    exe = shutil.which("psql")
    if exe is None:
        pytest.fail("psql is needed for the PostgreSQL tests (apt-get install postgresql-client)")
    done = subprocess.run(
        [exe, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def scalar(url: str, sql: str) -> int:
    return int(psql(url, sql))


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture
def pg() -> Iterator[str]:
    """A new, empty database on the test server, configured; dropped afterwards."""
    name = f"tl_{uuid.uuid4().hex[:20]}"
    psql(SERVER_URL, f"CREATE DATABASE {name}")
    url = with_database(SERVER_URL, name)
    tl.configure(database=url)
    try:
        yield url
    finally:
        tl.configure(database=":memory:")  # closes this process's connections
        psql(SERVER_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def reserved(url: str) -> int:
    """Everything still reserved, over all counters."""
    return scalar(
        url, "SELECT COALESCE(SUM(reserved_cost + reserved_tokens + reserved_executions), 0) FROM usage_counters"
    )


class Capped(tl.Agent):
    model = "mock/capped"
    user = "Tell me about {topic}"
    max_tokens = 50


class Flaky(tl.Agent):
    model = "mock/flaky"
    user = "ping {n}"
    circuit_breaker = tl.BreakerPolicy(errors=3, within=60, cooldown=0.5)


# ---------------------------------------------------------------- executions and queries


def test_agent_calls_leave_rows_that_queries_find(pg: str) -> None:
    tl.configure(database=pg, mock={"failure_rate": 0.3, "seed": 7})
    results: dict[str, list[Any]] = {}
    failures = 0
    for i in range(30):
        tenant = f"t{i % 3}"
        try:
            results.setdefault(tenant, []).append(Capped.call(topic=f"q{i}", tenant=tenant))
        except tl.ProviderError:
            failures += 1
    ok = sum(len(v) for v in results.values())
    assert ok > 0 and failures > 0
    assert tl.Execution.today().count() == 30
    assert tl.Execution.by_tenant("t1").count() == 10
    assert tl.Execution.successful().count() == ok
    assert tl.Execution.failed().count() == failures
    by_tenant = tl.Execution.today().successful().group_by("tenant_id").sum("total_cost")
    assert by_tenant == {t: sum((r.total_cost for r in rs), Decimal(0)) for t, rs in results.items()}
    assert all(isinstance(v, Decimal) for v in by_tenant.values())
    assert tl.Execution.today().group_by("agent").count() == {"Capped": 30}
    assert tl.Execution.today().sum("total_tokens") == sum(r.total_tokens for rs in results.values() for r in rs)
    top = tl.Execution.successful().order_by("-total_cost").limit(3).to_dicts()
    assert [d["total_cost"] for d in top] == sorted((d["total_cost"] for d in top), reverse=True)
    r = results["t2"][0]
    e = tl.Execution.get(r.execution_id)
    assert (e.tenant_id, e.status, e.total_cost, e.agent) == ("t2", "success", r.total_cost, "Capped")
    assert e.user_prompt and e.response == r.content
    assert tl.Execution.with_tenant().count() == 30 and tl.Execution.without_tenant().count() == 0


async def test_many_async_calls_in_flight(pg: str) -> None:
    tl.configure(database=pg, mock={"latency_ms": 20})
    tl.TenantBudget.create("async", daily_limit=10)
    rs = await asyncio.gather(*(Capped.acall(topic=str(i), tenant="async") for i in range(200)))
    assert len({r.execution_id for r in rs}) == 200
    assert tl.Execution.by_tenant("async").successful().count() == 200
    assert tl.TenantBudget.get("async").current_daily_spending == sum((r.total_cost for r in rs), Decimal(0))
    assert reserved(pg) == 0


# ---------------------------------------------------------------- budgets


def test_tenant_budget_crud_and_spending(pg: str) -> None:
    b = tl.TenantBudget.create(tenant_id="acme", daily_limit="0.5", monthly_limit=5, daily_token_limit=10_000)
    with pytest.raises(tl.ConfigurationError, match="already exists"):
        tl.TenantBudget.create(tenant_id="acme", daily_limit=1)
    assert tl.TenantBudget.find_or_create("acme", daily_limit=99).daily_limit == Decimal("0.5")
    assert tl.TenantBudget.find("nobody") is None
    tl.TenantBudget.find_or_create("beta", daily_limit=1, enforcement="soft")
    assert [x.tenant_id for x in tl.TenantBudget.all()] == ["acme", "beta"]
    spent = sum((Capped.call(topic="x", tenant="acme").total_cost for _ in range(5)), Decimal(0))
    b = tl.TenantBudget.get("acme")
    assert b.current_daily_spending == b.current_monthly_spending == spent > 0
    assert b.daily_remaining == Decimal("0.5") - spent
    assert b.current_daily_tokens > 0
    b.update(daily_limit=50)
    assert tl.TenantBudget.get("acme").daily_limit == 50
    b.delete()
    assert tl.TenantBudget.find("acme") is None


def test_hard_tenant_limit_blocks_with_a_blocked_row(pg: str) -> None:
    tl.TenantBudget.create("acme", daily_limit="0.0001", enforcement="hard")
    ok = 0
    with pytest.raises(tl.BudgetExceededError) as info:
        for _ in range(100):
            Capped.call(topic="budgets", tenant="acme")
            ok += 1
    assert (info.value.scope, info.value.tenant_budget) == ("tenant_daily", True)
    assert tl.Execution.by_status("blocked").count() == 1
    assert tl.Execution.successful().count() == ok
    assert tl.TenantBudget.get("acme").current_daily_spending <= Decimal("0.0001")
    assert reserved(pg) == 0


RACER = textwrap.dedent(
    """
    import json, sys, threading
    from decimal import Decimal
    import tenantllm as tl

    class Capped(tl.Agent):
        model = "mock/capped"
        user = "Tell me about {topic}"
        max_tokens = 50

    tl.configure(database=sys.argv[1], mock={"latency_ms": 1})
    counts = {"ok": 0, "blocked": 0, "cost": "0"}
    lock = threading.Lock()

    def run():
        for i in range(int(sys.argv[2])):
            try:
                r = Capped.call(topic=f"race {i}", tenant="race")
                with lock:
                    counts["ok"] += 1
                    counts["cost"] = str(Decimal(counts["cost"]) + r.total_cost)
            except tl.BudgetExceededError:
                with lock:
                    counts["blocked"] += 1

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(counts))
    """
)


def test_hard_limit_holds_across_4_processes_x_4_threads(pg: str) -> None:
    limit = Decimal("0.0005")
    tl.TenantBudget.create("race", daily_limit=limit, enforcement="hard")
    per_thread = 12
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, pg, str(per_thread)], stdout=subprocess.PIPE, env=ENV, text=True)
        for _ in range(4)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ok = sum(o["ok"] for o in outs)
    blocked = sum(o["blocked"] for o in outs)
    cost = sum((Decimal(o["cost"]) for o in outs), Decimal(0))
    assert ok + blocked == 4 * 4 * per_thread
    assert ok > 0 and blocked > 0, "the limit should be reached mid-race"
    budget = tl.TenantBudget.get("race")
    assert budget.current_daily_spending == cost <= limit
    assert tl.Execution.by_tenant("race").count() == ok + blocked
    assert tl.Execution.by_tenant("race").successful().count() == ok
    assert tl.Execution.by_tenant("race").by_status("blocked").count() == blocked
    assert tl.Execution.by_tenant("race").sum("total_cost") == cost
    assert reserved(pg) == 0


def test_soft_limit_warns_and_alerts_once_per_threshold(pg: str) -> None:
    alerts: list[dict[str, Any]] = []
    tl.configure(database=pg, on_alert=alerts.append)
    tl.TenantBudget.create("soft", daily_limit="0.00005", enforcement="soft")
    results = [Capped.call(topic="x", tenant="soft") for _ in range(12)]
    assert all(r.content for r in results)
    assert any(r.budget_warnings for r in results)
    budget_alerts = [(a["scope"], a["threshold"]) for a in alerts if a["kind"] == "budget_threshold"]
    assert budget_alerts == [("tenant_daily", 80), ("tenant_daily", 100)]


def test_rebuilt_counters_agree_to_the_nano_dollar(pg: str) -> None:
    tl.configure(database=pg, mock={"failure_rate": 0.3, "seed": 3})
    spent = Decimal(0)
    for i in range(40):
        try:
            spent += Capped.call(topic=f"t{i}", tenant=f"t{i % 3}").total_cost
        except tl.ProviderError:
            pass
    before = tl.spend_by_tenant("daily")
    assert sum(v["cost"] for v in before.values()) == spent
    psql(pg, "UPDATE usage_counters SET cost = cost + 12345")  # damage them
    assert tl.spend_by_tenant("daily") != before
    assert tl.rebuild_counters() > 0
    assert tl.spend_by_tenant("daily") == before
    assert sum(before[t]["executions"] for t in before) == tl.Execution.today().count()


# ---------------------------------------------------------------- breakers

PROBE = textwrap.dedent(
    """
    import sys, tenantllm as tl
    class Flaky(tl.Agent):
        model = "mock/flaky"
        user = "ping {n}"
        circuit_breaker = tl.BreakerPolicy(errors=3, within=60, cooldown=0.5)
    tl.configure(database=sys.argv[1], mock={"failure_rate": float(sys.argv[2]), "latency_ms": float(sys.argv[3])})
    try:
        Flaky.call(n=1, tenant="shared")
        print("ok")
    except tl.CircuitOpenError:
        print("open")
    except tl.ProviderError:
        print("failed")
    """
)


def _run(db: str, rate: float, latency_ms: float = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE, db, str(rate), str(latency_ms)], stdout=subprocess.PIPE, text=True, env=ENV
    )


def test_a_breaker_opened_by_one_process_is_seen_by_another(pg: str) -> None:
    outs = [_run(pg, 1.0).communicate(timeout=60)[0].strip() for _ in range(3)]
    assert outs == ["failed"] * 3
    # A fresh process that never saw a failure is refused without calling the provider.
    assert _run(pg, 0.0).communicate(timeout=60)[0].strip() == "open"
    time.sleep(0.6)
    # Half-open: of processes racing after the cooldown, exactly one is the probe.
    racers = [_run(pg, 0.0, latency_ms=1500) for _ in range(3)]
    assert sorted(p.communicate(timeout=60)[0].strip() for p in racers) == ["ok", "open", "open"]
    assert tl.CircuitBreaker.status("Flaky", tenant_id="shared", model="mock/flaky")["state"] == "closed"
    assert tl.Execution.by_status("short_circuited").count() == 3


def test_breaker_opens_per_tenant_and_resets(pg: str) -> None:
    alerts: list[dict[str, Any]] = []
    tl.configure(database=pg, mock={"failure_rate": 1.0}, on_alert=alerts.append)
    for i in range(3):
        with pytest.raises(tl.ProviderError):
            Flaky.call(n=i, tenant="bad")
    assert tl.CircuitBreaker.open_for(Flaky, tenant_id="bad")
    assert not tl.CircuitBreaker.open_for(Flaky, tenant_id="good")
    assert [a["kind"] for a in alerts] == ["breaker_opened"]
    with pytest.raises(tl.CircuitOpenError):
        Flaky.call(n=9, tenant="bad")
    tl.CircuitBreaker.reset(Flaky, tenant_id="bad")
    assert tl.CircuitBreaker.status(Flaky, tenant_id="bad")["state"] == "closed"


# ---------------------------------------------------------------- API keys

SECRET = "tenantllm-test-secret-4b1d9a77"
KEY = "sk-pg-tenant-key-9f2e71c4d0"


def test_api_configuration_is_encrypted_in_the_database(pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTLLM_SECRET_KEY", SECRET)
    with FakeProvider() as fp:
        fp.default = Step()
        tl.configure(database=pg, base_urls={"openai": fp.base_url + "/v1"})
        tl.ApiConfiguration.set_for_tenant("acme", openai=KEY)
        assert tl.ApiConfiguration.providers("acme") == ["openai"]

        class Keyed(tl.Agent):
            model = "gpt-4o"
            user = "{q}"

        Keyed.call(q="hi", tenant="acme")
        assert fp.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert psql(pg, "SELECT pg_typeof(ciphertext) FROM api_configurations") == "bytea"
    assert scalar(pg, f"SELECT position(convert_to('{KEY}', 'UTF8') IN ciphertext) FROM api_configurations") == 0
    assert KEY not in psql(pg, "SELECT encode(nonce || ciphertext, 'escape') FROM api_configurations")
    dump = shutil.which("pg_dump")
    out = subprocess.run([dump, "-d", pg], capture_output=True, text=True, timeout=60) if dump else None
    if out is not None and out.returncode == 0:  # a pg_dump older than the server refuses to run
        assert "api_configurations" in out.stdout and KEY not in out.stdout


# ---------------------------------------------------------------- the server itself


def test_an_unreachable_server_is_a_clear_store_error() -> None:
    url = with_database(SERVER_URL, "postgres").replace(urlsplit(SERVER_URL).netloc, "nobody:pw@127.0.0.1:1")
    with pytest.raises(tl.StoreError, match="cannot connect") as info:
        tl.configure(database=url)
    assert "pw" not in str(info.value)


def _kill_connections(url: str) -> int:
    return scalar(
        url,
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )


def test_connections_lost_while_a_call_is_in_flight(pg: str) -> None:
    tl.configure(database=pg, mock={"latency_ms": 1000})
    tl.TenantBudget.create("conn", daily_limit=1)
    warm = Capped.call(topic="warm the pool", tenant="conn")
    assert reserved(pg) == 0
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(Capped.call(topic="in flight", tenant="conn"))
        except tl.StoreError as e:
            outcome.append(e)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.4)  # admitted: its reservation is held while the provider answers
    assert scalar(pg, "SELECT COUNT(*) FROM reservations") == 1
    assert _kill_connections(pg) >= 1
    t.join(timeout=30)
    [result] = outcome
    # It completes (the finish runs again on a new connection) or fails clearly; either way
    # it left exactly one row.
    assert isinstance(result, (tl.AgentResult, tl.StoreError)), result
    assert tl.Execution.by_tenant("conn").count() == 2
    if isinstance(result, tl.AgentResult):
        assert tl.Execution.get(result.execution_id).status == "success"
        assert reserved(pg) == 0
        assert scalar(pg, "SELECT COUNT(*) FROM reservations") == 0
        assert tl.TenantBudget.get("conn").current_daily_spending == warm.total_cost + result.total_cost


def test_many_calls_survive_repeated_connection_kills(pg: str) -> None:
    tl.configure(database=pg, mock={"latency_ms": 30})
    tl.TenantBudget.create("storm", daily_limit=10)
    done: list[Any] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(n):
            try:
                r: Any = Capped.call(topic=f"s{i}", tenant="storm")
            except tl.StoreError as e:
                r = e
            with lock:
                done.append(r)

    threads = [threading.Thread(target=worker, args=(25,)) for _ in range(6)]
    for t in threads:
        t.start()
    killed = 0
    while any(t.is_alive() for t in threads):
        killed += _kill_connections(pg)
        time.sleep(0.05)
    assert killed > 0
    ok = [r for r in done if isinstance(r, tl.AgentResult)]
    errors = [r for r in done if isinstance(r, tl.StoreError)]
    assert len(ok) + len(errors) == 150
    assert len(ok) >= 100, errors[:3]
    # No row is doubled or lost for a call that completed; a success is counted once.
    assert tl.Execution.by_tenant("storm").successful().count() == len(ok)
    assert {r.execution_id for r in ok} <= {e.id for e in tl.Execution.by_tenant("storm").successful()}
    assert tl.TenantBudget.get("storm").current_daily_spending == sum((r.total_cost for r in ok), Decimal(0))
    if not errors:
        assert tl.Execution.by_status("running").count() == 0
        assert reserved(pg) == 0
