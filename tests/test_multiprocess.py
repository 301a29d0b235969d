"""Several processes sharing one database file: every call leaves one row and the running
counters agree with the rows."""

from __future__ import annotations

import multiprocessing
import threading
from decimal import Decimal
from pathlib import Path

import tenantllm as tl

PROCESSES = 3
CALLS = 20
TENANT = "shared"


class Worker(tl.Agent):
    model = "mock/fast"
    user = "Process {n} says: {text}"
    max_tokens = 50


def work(database: str, n: int, start: threading.Event) -> list[tuple[str, str, int]]:
    """Runs in a spawned process: CALLS calls; returns (execution_id, total_cost, total_tokens)."""
    tl.configure(database=database)
    start.wait(timeout=30)
    out = []
    for i in range(CALLS):
        r = Worker.call(n=n, text="word " * (i % 7 + 1), tenant=TENANT)
        out.append((r.execution_id, str(r.total_cost), r.total_tokens))
    return out


def test_processes_share_one_database(db_path: Path) -> None:
    budget = tl.TenantBudget.create(TENANT, daily_limit=100, monthly_limit=1000)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(PROCESSES) as pool:
            pending = [pool.apply_async(work, (str(db_path), n, start)) for n in range(PROCESSES)]
            start.set()  # all processes begin calling at about the same time
            batches = [p.get(timeout=60) for p in pending]

    calls = [c for batch in batches for c in batch]
    ids = [c[0] for c in calls]
    cost = sum((Decimal(c[1]) for c in calls), Decimal(0))
    tokens = sum(c[2] for c in calls)

    assert len(calls) == PROCESSES * CALLS
    assert len(set(ids)) == PROCESSES * CALLS
    q = tl.Execution.all()
    assert q.count() == PROCESSES * CALLS
    assert {e.id for e in q} == set(ids)
    assert tl.Execution.successful().by_tenant(TENANT).count() == PROCESSES * CALLS

    # Counters (read by the budget) agree with the rows and with what the callers saw.
    assert q.sum("total_cost") == cost
    assert q.sum("total_tokens") == tokens
    assert budget.current_daily_spending == cost
    assert budget.current_monthly_spending == cost
    assert budget.current_daily_tokens == tokens
    assert budget.daily_remaining == Decimal(100) - cost
    assert tl.Execution.all().group_by("tenant_id").sum("total_cost") == {TENANT: cost}
