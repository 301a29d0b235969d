"""Analytics over daily rollups: `python benches/rollups.py` (run by `make bench`).

Builds SQLite databases of 1M executions over 30 days and 10M over 300 days (about a million
a month either way; 500 tenants, 4 agents, 2 models, 3 outcomes) once, with bulk SQL (rows and
their rollups, no calls), and keeps them in $TENANTLLM_BENCH_DIR (default: <temp
dir>/tenantllm-bench); later runs reuse them. Then times grouped totals that read rollups:
this calendar month (the monthly table), the last 30 days (the daily one), the last 30 days as
of the 15th, and ranges between two times (the parts of days at their ends read from the
rows). Target: under 10 ms for `group_by("tenant_id").sum("total_cost")` over a month at 1M
and at 10M. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import tenantllm as tl
from bulk_db import bench_dir, load, open_for_load

TENANTS = 500
SIZES = ((1_000_000, 30), (10_000_000, 300))  # (executions, days)
# Bump when the generated data changes, so a cached database of an older shape is rebuilt.
DATASET = "rollups-v2"  # v2: with daily_totals (v1 left them empty, so counts over all tenants read nothing)
ROLLED = ("input_tokens", "output_tokens", "cached_tokens", "total_tokens", "input_cost", "output_cost", "total_cost",
          "attempts_count", "cache_write_tokens", "cache_read_cost", "cache_write_cost", "duration_ms",
          "time_to_first_token_ms")  # fmt: skip


def build(db: Path, executions: int, days: int) -> None:
    """Creates the schema through tenantllm (a UTC database), then loads rows and their
    rollups with SQL run inside SQLite."""
    tmp, conn, indexes = open_for_load(db, timezone="UTC")
    t = time.perf_counter()
    conn.execute("BEGIN")
    # Row i starts at now - span + i * span / n (ascending ids: appends to the clustered key).
    conn.execute(
        """
        WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < :n - 1),
        r AS (SELECT i, :now - :span + i * :span / :n AS ms,
                     CASE WHEN i % 50 = 0 THEN 'error' WHEN i % 100 = 1 THEN 'blocked' ELSE 'success' END AS status
              FROM c)
        INSERT INTO executions (id, agent, model_id, provider, tenant_id, status, started_at, completed_at,
            duration_ms, input_tokens, output_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count)
        SELECT printf('%08x-%04x-7%03x-%04x-%012x', ms >> 16, ms & 65535, (i >> 48) & 4095,
                      32768 | ((i >> 36) & 16383), i & 281474976710655),
               'Agent' || (i % 4), CASE i % 3 WHEN 0 THEN 'gpt-4o' ELSE 'gpt-4o-mini' END, 'openai',
               printf('tenant%04d', (i * 7919) % :tenants), status, ms * 1000, ms * 1000 + 800000, 800,
               300, 100, 400, 750 + i % 97 * 10, 1000, 1750 + i % 97 * 10, 1
        FROM r
        """,
        {"n": executions, "now": time.time_ns() // 1_000_000, "span": days * 86_400_000, "tenants": TENANTS},
    )
    for sql in indexes:
        conn.execute(sql)
    sums = ", ".join(f"SUM(COALESCE({c}, 0))" for c in ROLLED)
    columns = "period, tenant_id, agent, model_id, status, calls, " + ", ".join(ROLLED)
    conn.execute(
        f"INSERT INTO daily_rollups ({columns}) SELECT strftime('%Y-%m-%d', started_at / 1000000, 'unixepoch'),"
        f" COALESCE(tenant_id, ''), agent, model_id, status, COUNT(*), {sums} FROM executions"
        " WHERE status <> 'running' GROUP BY 1, 2, 3, 4, 5"
    )
    monthly = ", ".join(f"SUM({c})" for c in ("calls", *ROLLED))
    conn.execute(
        f"INSERT INTO monthly_rollups ({columns}) SELECT substr(period, 1, 7), tenant_id, agent, model_id, status,"
        f" {monthly} FROM daily_rollups GROUP BY 1, 2, 3, 4, 5"
    )
    # The daily rollups without the tenant, which questions over all tenants read.
    totals = columns.replace("tenant_id, ", "")
    conn.execute(
        f"INSERT INTO daily_totals ({totals}) SELECT period, agent, model_id, status, {monthly} FROM daily_rollups"
        " GROUP BY 1, 2, 3, 4"
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    tmp.rename(db)
    print(f"  (built {db.name} in {time.perf_counter() - t:.0f} s)")


def _month() -> tl.ExecutionQuery:
    return tl.Execution.this_month()


def _days() -> tl.ExecutionQuery:
    return tl.Execution.last_n_days(30)


def _mid_month() -> tl.ExecutionQuery:
    """`last_n_days(30)` as it reads on the 15th (the 16th of last month to the 16th of this
    one): the days before this month are half a month of daily rollups, the worst case for
    reading whole months less days. The query cannot be told another today, and the
    databases hold calls up to the day they were built."""
    first = date.today().replace(day=1)
    return tl.Execution.between((first - timedelta(days=1)).replace(day=16), first.replace(day=16))


def _hours(days: int) -> tl.ExecutionQuery:
    """From this time `days` days ago to now: the range's ends are inside days."""
    now = datetime.now(UTC)
    return tl.Execution.between(now - timedelta(days=days), now)


def _spend(q: tl.ExecutionQuery) -> object:
    return q.group_by("tenant_id").sum("total_cost")


SPEND = '.group_by("tenant_id").sum("total_cost")'
CASES = {
    f"this_month(){SPEND}": lambda: _spend(_month()),
    "this_month().count()": lambda: _month().count(),
    'this_month().group_by("agent", "status").count()': lambda: _month().group_by("agent", "status").count(),
    f"last_n_days(30){SPEND}": lambda: _spend(_days()),
    'last_n_days(30).group_by("day").sum("total_cost")': lambda: _days().group_by("day").sum("total_cost"),
    f"last_n_days(30) on the 15th{SPEND}": lambda: _spend(_mid_month()),
    f"between(now - 30 days, now){SPEND}": lambda: _spend(_hours(30)),
    "between(now - 30 days, now).count()": lambda: _hours(30).count(),
    f"between(now - 7 days, now){SPEND}": lambda: _spend(_hours(7)),
    f"between(now - 1 day, now){SPEND}": lambda: _spend(_hours(1)),
}


def median_ms(f: object, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()  # type: ignore[operator]
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="only the 1M database")
    args = p.parse_args()
    for executions, days in SIZES[:1] if args.quick else SIZES:
        db = bench_dir() / f"{DATASET}-{executions}.db"
        if not db.exists():
            build(db, executions, days)
        tl.configure(reset=True, database=str(db))
        rollups = sqlite3.connect(db).execute("SELECT COUNT(*) FROM daily_rollups").fetchone()[0]
        print(f"\n{executions:,} executions over {days} days, {TENANTS} tenants ({rollups:,} daily rollups)")
        spend = tl.Execution.this_month().group_by("tenant_id").sum("total_cost")
        assert len(spend) == TENANTS, len(spend)
        for name, f in CASES.items():
            print(f"  {name:<72} {median_ms(f, 15):>8.2f} ms  ({load()})", flush=True)
    tl.configure(reset=True)


if __name__ == "__main__":
    sys.exit(main())
