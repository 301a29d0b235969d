"""SQL straight to a test's database, under tenantllm: to damage or inspect what the store
wrote, and to check the usage counters against the rows they stand for.

`db` is a PostgreSQL URL, or a SQLite file's path (which becomes the PostgreSQL database
standing in for it when the suite runs on PostgreSQL, see store_mode/pg_everywhere.py)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pg_everywhere

Row = tuple[str | None, ...]
# (scope, period) -> (cost, tokens, executions, reserved_cost, reserved_tokens,
# reserved_executions); costs in nano-USD.
Counters = dict[tuple[str, str], tuple[int, ...]]


def query(db: Path | str, sql: str) -> list[Row]:
    """Runs one statement, committed; returns its rows with every value as text (None for
    NULL), the same on both databases."""
    url = str(db)
    if not url.startswith(("postgres://", "postgresql://")) and pg_everywhere.ACTIVE:
        url = pg_everywhere.database_for(url)
    if url.startswith(("postgres://", "postgresql://")):
        done = subprocess.run(
            ["psql", "-X", "-q", "-t", "--csv", "-P", "null=\\N", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        # CSV, since values may hold tabs and newlines (reservations.counters does).
        return [tuple(None if v == "\\N" else v for v in row) for row in csv.reader(io.StringIO(done.stdout))]
    # In a process of its own: a second SQLite library in this process (Python's) closing the
    # file drops the locks of tenantllm's (issue 14) and can make either miss the other's writes.
    done = subprocess.run([sys.executable, "-c", _SQLITE, url, sql], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [tuple(row) for row in json.loads(done.stdout)]


_SQLITE = """
import json, sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=30)
rows = [[None if v is None else str(v) for v in row] for row in c.execute(sys.argv[2])]
c.commit()
print(json.dumps(rows))
"""


def counters(db: Path | str) -> Counters:
    """Every usage_counters row but those all zero (the same as no row)."""
    rows = query(
        db,
        "SELECT scope, period, cost, tokens, executions, reserved_cost, reserved_tokens, reserved_executions "
        "FROM usage_counters",
    )
    values = {(str(r[0]), str(r[1])): tuple(int(str(v)) for v in r[2:]) for r in rows}
    return {k: v for k, v in values.items() if any(v)}


def counters_from_rows(db: Path | str) -> Counters:
    """What the counters must hold, computed from the executions and reservations tables
    (DESIGN §3, 2 and 7): each settled, admitted call counts in the global, agent and tenant
    scopes for the day and the month it started in (UTC: configure the test so); each call in
    flight holds its reservation on the counters its row lists."""
    totals: dict[tuple[str, str], list[int]] = {}

    def add(scope: str, period: str, values: tuple[int, ...], at: int) -> None:
        t = totals.setdefault((scope, period), [0] * 6)
        for i, v in enumerate(values):
            t[at + i] += v

    settled = query(
        db,
        "SELECT tenant_id, agent, started_at, total_cost, total_tokens FROM executions "
        "WHERE status NOT IN ('running', 'blocked', 'short_circuited')",
    )
    for tenant, agent, started_at, cost, tokens in settled:
        day = datetime.fromtimestamp(int(str(started_at)) / 1e6, UTC)
        scopes = ["global", f"agent:{agent}"] + ([f"tenant:{tenant}"] if tenant is not None else [])
        for scope in scopes:
            for period in (day.strftime("%Y-%m-%d"), day.strftime("%Y-%m")):
                add(scope, period, (int(str(cost)), int(str(tokens)), 1), 0)
    for keys, cost, tokens, executions in query(db, "SELECT counters, cost, tokens, executions FROM reservations"):
        for line in str(keys).splitlines():
            scope, period = line.split("\t")
            add(scope, period, (int(str(cost)), int(str(tokens)), int(str(executions))), 3)
    return {k: tuple(v) for k, v in totals.items()}


def assert_counters_match_rows(db: Path | str) -> None:
    """The counters hold what the rows say (nothing leaked, lost or doubled), and every call
    still `running` holds exactly one reservation, and only those do."""
    got, want = counters(db), counters_from_rows(db)
    assert got == want, {k: (got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k)}
    running = query(db, "SELECT id FROM executions WHERE status = 'running'")
    assert sorted(query(db, "SELECT execution_id FROM reservations")) == sorted(running)
