"""Where the PostgreSQL server's time goes in a guarded call, statement by statement.

    .venv/bin/python benches/pg_statements.py postgresql://postgres@127.0.0.1:55432/postgres [calls]

(add `?statement_cache_size=100` to the URL for prepared statements: README, PostgreSQL).

Runs `calls` (default 1,000) full-guard calls (tenant with hard budgets, breaker, global
budget: benches/run.py's `Guarded`) on a fresh database and prints pg_stat_statements' plan and
execution time per statement, the statements inside the server-side functions included. The
server needs `shared_preload_libraries = 'pg_stat_statements'`, `pg_stat_statements.track =
all` and `pg_stat_statements.track_planning = on`; the script creates the extension in the
server's default database and resets its counters (other databases' statements are left out
of the table, not out of the reset). Server times on a loaded machine are noise; the counts
(calls, rows, plans) are not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import tenantllm as tl
from run import Guarded, postgres_database, psql_url


def psql(server: str, sql: str) -> list[list[str]]:
    argv = ["psql", "-XAt", "-F", "\x1f", "-d", psql_url(server), "-c", sql]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return [line.split("\x1f") for line in out.stdout.splitlines() if line]


def backend_cpu(server: str, dbname: str) -> float:
    """CPU seconds (user + system) the server's processes serving `dbname` have used so far:
    unlike statement times, not inflated when a loaded machine preempts them. Linux, server
    on this machine, readable /proc."""
    pids = [int(r[0]) for r in psql(server, f"SELECT pid FROM pg_stat_activity WHERE datname = '{dbname}'")]
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    server = sys.argv[1]
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    psql(server, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    budgets = {"global_daily": 1_000_000, "global_monthly": 10_000_000, "enforcement": "hard"}
    with postgres_database(server) as url:
        tl.configure(reset=True, database=url, budgets=budgets)
        tl.TenantBudget.find_or_create("bench", daily_limit=1_000_000, daily_token_limit=10**12, enforcement="hard")
        for _ in range(50):  # the first calls read the stored budget and make the counters
            Guarded.call(text="the quarterly report", tenant="bench")
        name = psql_url(url).rsplit("/", 1)[1]
        psql(server, "SELECT pg_stat_statements_reset()")
        cpu = backend_cpu(server, name)
        t = time.perf_counter()
        for _ in range(calls):
            Guarded.call(text="the quarterly report", tenant="bench")
        wall = (time.perf_counter() - t) * 1e6 / calls
        cpu = (backend_cpu(server, name) - cpu) * 1e6 / calls
        rows = psql(
            server,
            "SELECT s.calls, s.rows, s.plans, round(s.total_plan_time::numeric, 1), "
            "round(s.total_exec_time::numeric, 1), s.toplevel, regexp_replace(left(s.query, 110), '\\s+', ' ', 'g') "
            "FROM pg_stat_statements s "
            f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{name}' ORDER BY s.total_exec_time DESC",
        )
        # The outer statements' times include the statements inside the functions they call.
        top = sum(float(r[3]) + float(r[4]) for r in rows if r[5] == "t")
        print(f"{calls} guarded calls, {wall:.0f} µs each in the client (wall)")
        print(f"server CPU (its processes for this database, /proc): {cpu:.0f} µs per call")
        print(f"server time of top-level statements: {top * 1000 / calls:.0f} µs per call (plan + exec)")
        print(f"{'calls':>6} {'rows':>6} {'plans':>6} {'plan µs/call':>12} {'exec µs/call':>12}  top  statement")
        for c, n, plans, plan, exec_, toplevel, query in rows:
            plan_us, exec_us = float(plan) * 1000 / calls, float(exec_) * 1000 / calls
            print(f"{c:>6} {n:>6} {plans:>6} {plan_us:>12.1f} {exec_us:>12.1f}  {toplevel:<3}  {query}")


if __name__ == "__main__":
    main()
