"""Budget enforcement (DESIGN §3 invariants 2, 3, 7): hard limits block before any request,
soft limits warn and alert once, counters agree with the executions, and a hard limit holds
against 4 processes x 4 threads on one database file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import raw_sql
import tenantllm as tl


class Capped(tl.Agent):
    model = "mock/capped"
    user = "Tell me about {topic}"
    max_tokens = 50


def _db(tmp_path: Path) -> str:
    return str(tmp_path / "budget.db")


def test_hard_tenant_limit_blocks_with_a_blocked_row(tmp_path: Path) -> None:
    tl.configure(database=_db(tmp_path))
    tl.TenantBudget.create("acme", daily_limit="0.0001", enforcement="hard")
    ok = 0
    with pytest.raises(tl.BudgetExceededError) as info:
        for _ in range(100):
            Capped.call(topic="budgets", tenant="acme")
            ok += 1
    e = info.value
    assert (e.scope, e.tenant_id, e.agent, e.tenant_budget) == ("tenant_daily", "acme", "Capped", True)
    assert e.limit == Decimal("0.0001")
    assert isinstance(e.current, Decimal) and e.current <= e.limit
    assert tl.Execution.by_status("blocked").count() == 1
    blocked = tl.Execution.by_status("blocked").first()
    assert blocked is not None and blocked.error_class == "BudgetExceededError" and blocked.total_cost == 0
    assert tl.Execution.successful().count() == ok
    assert tl.TenantBudget.get("acme").current_daily_spending <= Decimal("0.0001")


def test_token_and_execution_limits(tmp_path: Path) -> None:
    tl.configure(database=_db(tmp_path), budgets={"global_daily_executions": 3})
    for _ in range(3):
        Capped.call(topic="x")
    with pytest.raises(tl.BudgetExceededError) as info:
        Capped.call(topic="x")
    assert info.value.scope == "global_daily_executions" and info.value.limit == 3
    assert info.value.tenant_budget is False
    tl.configure(database=_db(tmp_path), budgets={"global_monthly_tokens": 10})
    with pytest.raises(tl.BudgetExceededError) as info:
        Capped.call(topic="x")  # estimate (prompt bound + max_tokens) passes 10 tokens
    assert info.value.scope == "global_monthly_tokens"


def test_per_agent_limit_applies_to_that_agent_only(tmp_path: Path) -> None:
    class Other(tl.Agent):
        model = "mock/other"
        user = "hi"

    tl.configure(database=_db(tmp_path), budgets={"per_agent_daily": {"Capped": "0.00001"}})
    with pytest.raises(tl.BudgetExceededError) as info:
        Capped.call(topic="x")
    assert info.value.scope == "agent_daily"
    assert Other.call().content


def test_runtime_dict_overrides_resolver_which_overrides_stored(tmp_path: Path) -> None:
    tl.configure(database=_db(tmp_path), tenant_config_resolver=lambda t: {"daily_limit": "0.00001"})
    tl.TenantBudget.create("acme", daily_limit=100)
    with pytest.raises(tl.BudgetExceededError):
        Capped.call(topic="x", tenant="acme")  # resolver's tiny limit beats the stored one
    assert Capped.call(topic="x", tenant={"id": "acme", "daily_limit": 1}).content  # runtime beats both


def test_soft_limit_warns_and_alerts_once_per_threshold(tmp_path: Path) -> None:
    alerts: list[dict[str, Any]] = []
    tl.configure(database=_db(tmp_path), on_alert=alerts.append)
    tl.TenantBudget.create("soft", daily_limit="0.00005", enforcement="soft")
    results = [Capped.call(topic="x", tenant="soft") for _ in range(12)]
    assert all(r.content for r in results)  # never blocked
    assert any(r.budget_warnings for r in results)
    assert "tenant_daily" in next(w for r in results for w in r.budget_warnings)
    budget_alerts = [(a["scope"], a["threshold"]) for a in alerts if a["kind"] == "budget_threshold"]
    assert budget_alerts == [("tenant_daily", 80), ("tenant_daily", 100)]
    assert tl.TenantBudget.get("soft").current_daily_spending > Decimal("0.00005")


def test_on_alert_errors_never_break_a_call(tmp_path: Path) -> None:
    def boom(alert: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    tl.configure(database=_db(tmp_path), on_alert=boom, budgets={"global_daily": "0.00001", "enforcement": "soft"})
    assert Capped.call(topic="x").content


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_rebuild_counters_restores_damaged_counters_from_the_rows(db_path: Path) -> None:
    tl.configure(database=str(db_path), timezone="UTC", mock={"failure_rate": 0.3, "seed": 3})

    class Other(tl.Agent):
        model = "mock/other"
        user = "{q}"

    spent = Decimal(0)
    for i in range(40):
        with contextlib.suppress(tl.ProviderError):
            spent += Capped.call(topic=f"t{i}", tenant=f"t{i % 3}").total_cost
        with contextlib.suppress(tl.ProviderError):
            Other.call(q="x" * i)  # no tenant: global and agent counters only
    assert sum(v["cost"] for v in tl.spend_by_tenant("daily").values()) == spent
    assert tl.Execution.failed().count() > 0
    # A call in flight (for as long as the test needs) holds a reservation through the
    # rebuild; calls reserve where a limit applies.
    tl.configure(database=str(db_path), timezone="UTC", mock={"latency_ms": 600_000})
    tl.TenantBudget.create("t0", daily_limit=1)
    in_flight = asyncio.ensure_future(Capped.acall(topic="slow", tenant="t0"))
    await _until(lambda: raw_sql.query(db_path, "SELECT COUNT(*) FROM reservations") == [("1",)], "no reservation")

    # Damage every counter (the reservations too), add one for nothing, and lose some rows.
    raw_sql.query(db_path, "UPDATE usage_counters SET cost = cost * 3 + 7, tokens = tokens + 1, executions = 0, "
                           "reserved_cost = reserved_cost + 5, reserved_executions = 0")
    raw_sql.query(db_path, "INSERT INTO usage_counters (scope, period, cost) VALUES ('tenant:ghost', '2026-01-01', 9)")
    raw_sql.query(db_path, "DELETE FROM executions WHERE id IN (SELECT id FROM executions WHERE tenant_id = 't2' "
                           "AND status = 'success' ORDER BY id LIMIT 5)")
    expected = raw_sql.counters_from_rows(db_path)
    assert raw_sql.counters(db_path) != expected
    assert tl.rebuild_counters() > 0
    raw_sql.assert_counters_match_rows(db_path)
    reservation = next(v for k, v in expected.items() if k[0] == "tenant:t0" and len(k[1]) == 10)[3:]
    assert reservation[0] > 0 and reservation[2] == 1
    # Settling the call after the rebuild releases exactly its reservation.
    assert not in_flight.done()
    in_flight.cancel()
    with pytest.raises(asyncio.CancelledError):
        await in_flight
    await _until(lambda: tl.Execution.by_status("cancelled").count() == 1, "the cancelled call was not settled")
    raw_sql.assert_counters_match_rows(db_path)
    assert all(v[3:] == (0, 0, 0) for v in raw_sql.counters(db_path).values())
    assert sum(v["cost"] for v in tl.spend_by_tenant("daily").values()) == tl.Execution.today().with_tenant().sum(
        "total_cost"
    )


# Each call costs exactly what admission reserves for it: no input price, and the mock's
# answer always fills max_tokens (8 tokens at $1 / 1M = $0.000008). With 16 calls in flight
# for 20 ms each, a check that ignored the reservations of calls in flight would admit up
# to 15 calls too many, and the race would overshoot the limit on every run.
COST = Decimal("0.000008")
WORKER = textwrap.dedent(
    """
    import json, sys, threading
    import tenantllm as tl

    class Capped(tl.Agent):
        model = "mock/capped"
        user = "Tell me about {topic}"
        max_tokens = 8

    tl.configure(database=sys.argv[1], mock={"latency_ms": 20}, pricing={"mock/capped": {"input": "0", "output": "1"}})
    counts = {"ok": 0, "blocked": 0, "costs": []}
    lock = threading.Lock()

    def run():
        for i in range(int(sys.argv[2])):
            try:
                r = Capped.call(topic=f"race {i}", tenant="race")
                with lock:
                    counts["ok"] += 1
                    counts["costs"].append(str(r.total_cost))
            except tl.BudgetExceededError:
                with lock:
                    counts["blocked"] += 1

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps(counts))
    """
)


def test_hard_limit_holds_across_4_processes_x_4_threads(tmp_path: Path) -> None:
    db = _db(tmp_path)
    limit = Decimal("0.0005")
    tl.configure(database=db)
    tl.TenantBudget.create("race", daily_limit=limit, enforcement="hard")
    per_thread = 12
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, db, str(per_thread)], stdout=subprocess.PIPE, env=env, text=True
        )
        for _ in range(4)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ok = sum(o["ok"] for o in outs)
    blocked = sum(o["blocked"] for o in outs)
    assert {Decimal(c) for o in outs for c in o["costs"]} == {COST}
    cost = ok * COST
    assert ok + blocked == 4 * 4 * per_thread
    # Reservations make admission exact: as many calls as fit the limit, not one more.
    assert ok == limit // COST == 62, f"{ok} calls admitted, {cost} spent of {limit}"
    budget = tl.TenantBudget.get("race")
    assert budget.current_daily_spending == cost <= limit
    # every call left exactly one row
    assert tl.Execution.by_tenant("race").count() == ok + blocked
    assert tl.Execution.by_tenant("race").successful().count() == ok
    assert tl.Execution.by_tenant("race").by_status("blocked").count() == blocked
    assert tl.Execution.by_tenant("race").sum("total_cost") == cost
    raw_sql.assert_counters_match_rows(db)
