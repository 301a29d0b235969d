"""Python's own `sqlite3` (a notebook, pandas, Django) on the same database file in the same
process: its connections opening and closing the file lose none of our rows and break no
budget (DESIGN §1b). It runs on another SQLite than ours; on Linux the two exclude each other
as two processes do (open file description locks, src/store/sqlite/ofd_locks.rs). Every check
of what was written is made from another process, which sees only what reached the file and
its WAL."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tenantllm as tl

pytestmark = [
    pytest.mark.sqlite_only,
    # Elsewhere the two SQLites' locks do not exclude each other (README): nothing here holds.
    pytest.mark.skipif(sys.platform != "linux", reason="Python's sqlite3 may share the file on Linux only"),
]

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


def test_python_sqlite_write_lock_holds_our_calls_until_it_commits(db_path: Path) -> None:
    """Python's sqlite3 holding the write lock in this process makes our call wait (SQLite's busy
    wait, as for another process's lock), and the call proceeds once it commits."""
    tl.TenantBudget.create(TENANT, daily_limit=100)
    Note.call(n=-1, tenant=TENANT)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    done = threading.Event()
    waits: list[tuple[int, float]] = []

    def call() -> None:
        Note.call(n=0, tenant=TENANT)
        waits.append(tl._core.lock_waits())
        done.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert not done.wait(0.5), "the call wrote while Python's sqlite3 held the write lock"
    conn.execute("COMMIT")
    caller.join(30)
    assert done.is_set()
    count, waited = waits[0]
    assert count >= 1 and waited >= 0.4, waits
    conn.close()
    assert seen_from_another_process(db_path)["rows"] == 2


def test_our_write_lock_holds_python_sqlite_off_and_no_write_is_lost(db_path: Path) -> None:
    """Our calls and Python's sqlite3 writing the same file from two threads of this process:
    each side's write lock keeps the other out (Python's writes with no busy timeout are refused
    while ours is held), and every row of both sides reaches the file."""
    tl.TenantBudget.create(TENANT, daily_limit=100)
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    conn.execute("CREATE TABLE py_notes (n INTEGER)")
    stop = threading.Event()
    calls: list[str] = []

    def call() -> None:
        while not stop.is_set():
            calls.append(Note.call(n=len(calls), tenant=TENANT).execution_id)

    caller = threading.Thread(target=call)
    caller.start()
    impatient = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    refused = written = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline or (refused == 0 and time.monotonic() < deadline + 20):
        try:
            impatient.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            assert "locked" in str(e), e
            refused += 1
        else:
            impatient.execute("COMMIT")
        conn.execute("INSERT INTO py_notes (n) VALUES (?)", (written,))
        written += 1
    stop.set()
    caller.join(30)
    impatient.close()
    conn.close()
    assert refused > 0
    seen = seen_from_another_process(db_path)
    assert seen["integrity"] == "ok"
    assert seen["ids"] == sorted(calls)
    other = sqlite3.connect(db_path)
    assert other.execute("SELECT count(*), sum(n) FROM py_notes").fetchone() == (written, written * (written - 1) // 2)
    other.close()


def test_python_sqlite_closing_its_last_connection_leaves_our_wal(db_path: Path) -> None:
    """Python's sqlite3 closing its only connection to the file while ours are open neither
    checkpoints nor deletes the WAL we write to (our lock refuses it the EXCLUSIVE lock it
    asks for first), and our later calls reach other processes."""
    tl.TenantBudget.create(TENANT, daily_limit=100)
    Note.call(n=0, tenant=TENANT)
    wal = Path(f"{db_path}-wal")
    assert wal.exists()
    python_sqlite_visit(db_path)
    assert wal.exists()
    Note.call(n=1, tenant=TENANT)
    assert seen_from_another_process(db_path)["rows"] == 2


ONE_CALL = textwrap.dedent(
    """
    import sys
    import tenantllm as tl

    class Note(tl.Agent):
        model = "mock/notes"
        user = "Note {n}"
        max_tokens = 50

    tl.configure(database=sys.argv[1])
    print(Note.call(n=0, tenant=sys.argv[2]).execution_id)
    """
)


def posix_locks(db: Path) -> list[str]:
    """The POSIX locks this process holds on the file `db` (Python's sqlite3's: ours are OFD
    locks), as /proc/locks lists them."""
    pid, inode = str(os.getpid()), str(os.stat(db).st_ino)
    rows = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
    return [" ".join(r[1:]) for r in rows if r[1] == "POSIX" and r[4] == pid and r[5].rsplit(":", 1)[1] == inode]


def test_our_store_closing_leaves_python_sqlite_its_locks(db_path: Path) -> None:
    """tenantllm closing its connections to the file (here: configured elsewhere) while Python's
    sqlite3 has it open keeps that connection's locks (a close of the file drops every POSIX lock
    the process holds on it): another process's last close then still cannot checkpoint and
    delete the WAL under it, and neither side's writes are lost."""
    tl.TenantBudget.create(TENANT, daily_limit=100)
    ours = Note.call(n=0, tenant=TENANT).execution_id
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("CREATE TABLE py_notes (n INTEGER)")
    held = posix_locks(db_path)
    assert held
    tl.configure(database=":memory:")
    assert posix_locks(db_path) == held
    out = subprocess.run(
        [sys.executable, "-c", ONE_CALL, str(db_path), TENANT], capture_output=True, text=True, env=env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    conn.execute("INSERT INTO py_notes (n) VALUES (1)")
    conn.close()
    seen = seen_from_another_process(db_path)
    assert seen["integrity"] == "ok"
    assert seen["ids"] == sorted([ours, out.stdout.strip()])
    other = sqlite3.connect(db_path)
    assert other.execute("SELECT count(*) FROM py_notes").fetchone() == (1,)
    other.close()


# Imports sqlite3 after or before tenantllm, calls, lets sqlite3 read the file, and reports what
# Python's SQLite library says of its memory.
MEMORY = textwrap.dedent(
    """
    import ctypes, json, sys
    if sys.argv[2] == "sqlite3 first":
        import sqlite3
    import tenantllm as tl
    import sqlite3, _sqlite3

    class Note(tl.Agent):
        model = "mock/notes"
        user = "Note {n}"
        max_tokens = 50

    tl.configure(database=sys.argv[1])
    for n in range(3):
        Note.call(n=n, tenant="shared")
    conn = sqlite3.connect(sys.argv[1])
    rows = conn.execute("SELECT count(*) FROM executions").fetchone()[0]
    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    print(json.dumps({"rows": rows, "memory_used": used()}))
    conn.close()
    """
)


@pytest.mark.parametrize("first", ["tenantllm first", "sqlite3 first"])
def test_python_sqlite_keeps_its_memory_statistics(db_path: Path, first: str) -> None:
    """tenantllm turns memory statistics off in its own SQLite only: Python's keeps them, in
    whichever order the two are imported."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, str(db_path), first], capture_output=True, text=True, env=env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["rows"] == 3
    assert seen["memory_used"] > 0, seen
