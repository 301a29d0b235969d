"""CPU time a guarded call costs the calling process and, on PostgreSQL, the server's processes:
`python benches/cpu_per_call.py DATABASE [N]` (a SQLite path or a postgresql:// URL).

Where `make bench` times calls, this splits what they cost: the client's user and system
time (`getrusage`, all its threads) and, for a database on this machine, the CPU time of every
`postgres` process (from /proc; the server's background processes included, so run it on an
otherwise idle server). On a machine whose cores carry both the clients and the server, their
sum per call bounds the calls per second whatever the locking. CPU time depends far less on
the machine's load than wall time does, so builds can be compared on a busy machine
(alternate them; several rounds).

    .venv/bin/python benches/cpu_per_call.py 'postgresql://postgres@127.0.0.1:55432/a?statement_cache_size=100'
    /work/base/.venv/bin/python benches/cpu_per_call.py /tmp/b.db 3000

Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tenantllm as tl
from run import Guarded, postgres_ticks

WARM = 300  # calls before the measured ones: the store opened, statements prepared, pages cached


def postgres_cpu_seconds() -> float:
    """User + system CPU time of every process named postgres on this machine."""
    return sum(postgres_ticks().values()) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    db, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    tl.configure(
        reset=True,
        database=db,
        budgets={"global_daily": 1_000_000, "global_monthly": 10_000_000, "enforcement": "hard"},
    )
    tl.TenantBudget.find_or_create("bench", daily_limit=1_000_000, daily_token_limit=10**12, enforcement="hard")
    for _ in range(WARM):
        Guarded.call(text="the quarterly report", tenant="bench")
    r0, p0, w0 = resource.getrusage(resource.RUSAGE_SELF), postgres_cpu_seconds(), time.perf_counter()
    for _ in range(n):
        Guarded.call(text="the quarterly report", tenant="bench")
    r1, p1, w1 = resource.getrusage(resource.RUSAGE_SELF), postgres_cpu_seconds(), time.perf_counter()
    per = 1e6 / n
    server = f", postgres processes {(p1 - p0) * per:,.0f} µs" if db.startswith("postgresql://") else ""
    user, system = (r1.ru_utime - r0.ru_utime) * per, (r1.ru_stime - r0.ru_stime) * per
    wall = (w1 - w0) * per
    print(f"full guard, µs a call over {n:,}: wall {wall:,.0f}, client user {user:,.0f} sys {system:,.0f}{server}")


if __name__ == "__main__":
    main()
