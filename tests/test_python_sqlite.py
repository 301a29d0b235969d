"""Python's own `sqlite3` (a notebook, pandas, Django) on the same database file in the same
process: its connections opening and closing the file lose none of our rows and break no
budget (DESIGN §1b). Every check is made from another process, which sees only what reached
the file and its WAL."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tenantllm as tl

pytestmark = pytest.mark.sqlite_only

TENANT = "shared"


class Note(tl.Agent):
    model = "mock/notes"
    user = "Note {n}"
    max_tokens = 50


def python_sqlite_visit(db: Path) -> int:
    """What a notebook does: open the file with Python's sqlite3, read, close."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM executions").fetchone()[0])
    finally:
        conn.close()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


SEEN = textwrap.dedent(
    """
    import json, sqlite3, sys
    import tenantllm as tl
    tl.configure(database=sys.argv[1])
    b = tl.TenantBudget.get(sys.argv[2])
    q = tl.Execution.by_tenant(sys.argv[2])
    print(json.dumps({
        "ids": sorted(e.id for e in q.successful()),
        "rows": q.count(),
        "cost": str(q.sum("total_cost")),
        "spent": str(b.current_daily_spending),
        "tokens": b.current_daily_tokens,
        "integrity": sqlite3.connect(sys.argv[1]).execute("PRAGMA integrity_check").fetchone()[0],
    }))
    """
)


def seen_from_another_process(db: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", SEEN, str(db), TENANT], capture_output=True, text=True, env=env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    seen: dict[str, Any] = json.loads(out.stdout)
    return seen


# Another process of the app: opens the database, lets Python's sqlite3 visit it, waits for
# the word, then calls (letting sqlite3 visit between calls) and reports what it got.
WORKER = textwrap.dedent(
    """
    import json, sqlite3, sys
    import tenantllm as tl

    class Note(tl.Agent):
        model = "mock/notes"
        user = "Note {n}"
        max_tokens = 50

    def visit():
        conn = sqlite3.connect(db)
        conn.execute("SELECT count(*) FROM usage_counters").fetchone()
        conn.close()

    db, tries = sys.argv[1], int(sys.argv[2])
    tl.configure(database=db, mock={"latency_ms": 20})
    visit()
    print("ready", flush=True)
    sys.stdin.readline()
    ids, cost, tokens, blocked = [], 0, 0, 0
    for n in range(tries):
        try:
            r = Note.call(n=n, tenant="shared")
            ids.append(r.execution_id)
            cost += r.total_cost
            tokens += r.total_tokens
        except tl.BudgetExceededError:
            blocked += 1
        visit()
    print(json.dumps({"ids": ids, "cost": str(cost), "tokens": tokens, "blocked": blocked}))
    """
)


def start_workers(db: Path, count: int, tries: int) -> list[subprocess.Popen[str]]:
    """Starts `count` workers one after the other (each has opened the file and let sqlite3
    visit it before the next starts), then lets them all call at once."""
    workers = []
    for _ in range(count):
        w = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(db), str(tries)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env(),
        )
        assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        workers.append(w)
    for w in workers:
        assert w.stdin is not None
        w.stdin.write("go\n")
        w.stdin.flush()
    return workers


def results(workers: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    outs = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    return outs


def test_rows_survive_python_sqlite_opening_and_closing_the_file(db_path: Path) -> None:
    tl.TenantBudget.create(TENANT, daily_limit=100)
    Note.call(n=-1, tenant="warm-up")
    python_sqlite_visit(db_path)
    workers = start_workers(db_path, 1, 10)  # the app's other worker writes meanwhile
    ids, cost, tokens = [], Decimal(0), 0
    for n in range(10):
        r = Note.call(n=n, tenant=TENANT)
        ids.append(r.execution_id)
        cost += r.total_cost
        tokens += r.total_tokens
        if n % 2:
            python_sqlite_visit(db_path)
        else:
            conn = sqlite3.connect(db_path)
            pd.read_sql("SELECT id, status FROM executions", conn)
            conn.close()
    for out in results(workers):
        ids += out["ids"]
        cost += Decimal(out["cost"])
        tokens += out["tokens"]

    seen = seen_from_another_process(db_path)
    assert seen["integrity"] == "ok"
    assert seen["ids"] == sorted(ids)
    assert Decimal(seen["cost"]) == cost
    assert Decimal(seen["spent"]) == cost
    assert seen["tokens"] == tokens
    # and this process still writes to the file the others read
    r = Note.call(n=99, tenant=TENANT)
    assert r.execution_id in seen_from_another_process(db_path)["ids"]


def test_hard_execution_limit_holds_across_processes_that_use_python_sqlite(db_path: Path) -> None:
    limit, procs, tries = 4, 4, 5
    tl.TenantBudget.create(TENANT, daily_execution_limit=limit, enforcement="hard")
    tl.configure(database=":memory:")  # only the workers have the file open
    outs = results(start_workers(db_path, procs, tries))
    tl.configure(database=str(db_path))
    admitted = [i for o in outs for i in o["ids"]]
    assert len(admitted) == limit
    assert sum(o["blocked"] for o in outs) == procs * tries - limit
    seen = seen_from_another_process(db_path)
    assert seen["integrity"] == "ok"
    assert seen["ids"] == sorted(admitted)
    assert seen["rows"] == procs * tries
    with pytest.raises(tl.BudgetExceededError):  # the counter says the limit is used up
        Note.call(n=0, tenant=TENANT)


# Imports tenantllm (after sqlite3 if told to), calls, lets sqlite3 read the file, and reports
# what the SQLite library says of its memory.
MEMORY = textwrap.dedent(
    """
    import ctypes, json, sys
    if sys.argv[2] == "sqlite3 first":
        import sqlite3
    import tenantllm as tl
    import sqlite3
    from tenantllm._sqlite_library import _library_of_python_sqlite3

    class Note(tl.Agent):
        model = "mock/notes"
        user = "Note {n}"
        max_tokens = 50

    tl.configure(database=sys.argv[1])
    for n in range(3):
        Note.call(n=n, tenant="shared")
    conn = sqlite3.connect(sys.argv[1])
    rows = conn.execute("SELECT count(*) FROM executions").fetchone()[0]
    conn.close()
    used = ctypes.CDLL(_library_of_python_sqlite3()).sqlite3_memory_used
    used.restype = ctypes.c_int64
    print(json.dumps({"rows": rows, "memory_used": used()}))
    """
)


@pytest.mark.parametrize("first", ["tenantllm first", "sqlite3 first"])
def test_memory_statistics_are_off_only_if_tenantllm_started_sqlite(db_path: Path, first: str) -> None:
    """`import tenantllm` turns SQLite's memory statistics off, unless Python's sqlite3 had
    already started SQLite (then they stay on); tenantllm and sqlite3 work either way."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, str(db_path), first], capture_output=True, text=True, env=env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["rows"] == 3
    assert (seen["memory_used"] == 0) == (first == "tenantllm first"), seen
