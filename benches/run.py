"""tenantllm benchmark suite: `make bench` (or `python benches/run.py [--quick]`).

Measures the guard's overhead on the mock provider with zero latency, next to the libraries a
user would otherwise pick, in the same run. Prints a table and writes bench-results/latest.json.
Numbers are medians over repeated runs; nothing here is asserted by the test suite.

Python's sqlite3 is imported where it is used, after tenantllm, as in an app that imports
tenantllm first: importing it first would start SQLite before `import tenantllm` could turn its
memory statistics off (README, "Python's sqlite3 on the same file"), and every call would cost
~6 % more instructions.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tenantllm as tl
from tenantllm._core import lock_waits

# litellm fetches its price map from the internet at import unless told not to; the bench
# reaches nothing outside this machine.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
RESULTS: list[dict[str, Any]] = []


def report(name: str, value: float, unit: str, target: str = "", note: str = "") -> None:
    # The machine's 1-minute load average as the figure was taken: on a shared machine the
    # same code measures slower when others are busy, so every figure carries it.
    load = os.getloadavg()[0]
    RESULTS.append({"name": name, "value": value, "unit": unit, "target": target, "note": note, "load": load})
    print(f"  {name:<68} {value:>12,.1f} {unit:<8} {target:<10} {load:>5.1f} {note}", flush=True)


def per_call_us(fn: Callable[[], object], n: int, repeats: int) -> float:
    """Median over `repeats` runs of the mean time per call (µs) of `n` calls."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


class Bare(tl.Agent):
    model = "mock/bench"
    user = "Summarize: {text}"
    max_tokens = 64


class Guarded(tl.Agent):
    model = "mock/bench"
    user = "Summarize: {text}"
    max_tokens = 64
    circuit_breaker = tl.BreakerPolicy(errors=10, within=60, cooldown=300)


class BreakerOnly(tl.Agent):
    model = "mock/bench"
    user = "Summarize: {text}"
    max_tokens = 64
    circuit_breaker = tl.BreakerPolicy(errors=10, within=60, cooldown=300)


Case = tuple[dict[str, Any], Callable[[], object]]  # a configuration, and the call to time under it


def interleaved_us(cases: dict[str, Case], n: int, repeats: int) -> dict[str, float]:
    """Median µs per call of each case, over rounds of `n` calls. The cases take turns, in
    an order rotated every round, so drift in the machine's load, the database's size or
    the checkpointer's work after a case hits them all alike and differences mean something."""
    runs: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            config, fn = cases[name]
            tl.configure(reset=True, **config)  # exactly this configuration
            fn()  # the first call after configure opens the store
            t = time.perf_counter()
            for _ in range(n):
                fn()
            runs[name].append((time.perf_counter() - t) / n * 1e6)
    return {name: statistics.median(r) for name, r in runs.items()}


def sync_overhead(db: str, n: int, repeats: int, store: str = "SQLite") -> None:
    print(f"\nSync call overhead on {store}, mock provider with zero latency (µs per call, median)")
    target = "<= 100" if store == "SQLite" else "< 500"
    plain: dict[str, Any] = {"database": db}
    budgeted: dict[str, Any] = {
        "database": db,
        "budgets": {"global_daily": 1_000_000, "global_monthly": 10_000_000, "enforcement": "hard"},
    }
    tl.configure(reset=True, **budgeted)
    tl.TenantBudget.find_or_create("bench", daily_limit=1_000_000, daily_token_limit=10**12, enforcement="hard")
    us = interleaved_us(
        {
            "bare": (plain, lambda: Bare.call(text="the quarterly report")),
            "breaker": (plain, lambda: BreakerOnly.call(text="the quarterly report")),
            "full": (budgeted, lambda: Guarded.call(text="the quarterly report", tenant="bench")),
        },
        max(n // 3, 1),
        repeats * 3,
    )
    report(f"tenantllm/{store}: unbudgeted call (no tenant, no breaker)", us["bare"], "µs")
    report(f"tenantllm/{store}: + breaker check (closed breaker)", us["breaker"] - us["bare"], "µs", note="difference")
    report(f"tenantllm/{store}: full guard (tenant, breaker, hard budgets, row)", us["full"], "µs", target)
    report(f"tenantllm/{store}: hard budget added over unbudgeted", us["full"] - us["breaker"], "µs", note="difference")
    # The tail: single calls that waited (on the disk, the machine, or the checkpointer). The
    # first call after configure opens the database (2-15 ms at load 13): reported on its own.
    tl.configure(reset=True, **budgeted)
    first, _ = timed_calls(lambda: Guarded.call(text="the quarterly report", tenant="bench"), 1)
    report(f"tenantllm/{store}: full guard, first call after configure (opens the database)", first[0], "µs")
    name = f"tenantllm/{store}: full guard, single calls"
    spans: list[Span] = []
    with machine_stalls() as stalls:
        each, waits = timed_calls(lambda: Guarded.call(text="the quarterly report", tenant="bench"), n * 3, spans)
    if store == "SQLite":
        report_tail(name, each, "<= 10000", waits_us=waits)
        report_unstalled(name, each, spans, stalls, "<= 10000")
    else:
        report_tail(name, each, p50_target="< 500", p99_target="< 2000")
        report_unstalled(name, each, spans, stalls, "")


def after_cut_back(db: str, rounds: int, mb: int = 48) -> None:
    """An idle WAL of `mb` MB cut back, `rounds` times: each time one write of that much (another
    connection, Python's sqlite3) that the checkpointer copies and restarts, then nothing. While
    the checkpointer cuts the idle WAL back, a writer in another connection that only takes
    SQLite's write lock (`BEGIN IMMEDIATE`, then `ROLLBACK`: it writes nothing, so the WAL stays
    idle) every ms, trying again every 100 µs while it is taken (SQLite's own busy handler sleeps
    1, 2, 5, 10 ms...), tells how long the cut back holds writes; once the file is cut back, 20
    guarded calls: the first against the rest."""
    import sqlite3

    print(f"\nCalls after the checkpointer cut back an idle WAL of {mb} MB ({rounds} times)")
    tl.configure(reset=True, database=db, budgets={"global_daily": 1_000_000, "enforcement": "hard"})
    tl.TenantBudget.find_or_create("bench", daily_limit=1_000_000, daily_token_limit=10**12, enforcement="hard")

    def call() -> object:
        return Guarded.call(text="the quarterly report", tenant="bench")

    timed_calls(call, 100)  # warm
    other = sqlite3.connect(db, isolation_level=None, timeout=30)
    other.execute("CREATE TABLE IF NOT EXISTS bench_filler (v BLOB)")
    prober = sqlite3.connect(db, isolation_level=None, timeout=0)

    def write_lock_wait() -> float:
        t = time.perf_counter()
        while True:
            try:
                prober.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError:
                time.sleep(0.0001)
        prober.execute("ROLLBACK")
        return time.perf_counter() - t

    wal = f"{db}-wal"
    holds: list[float] = []
    firsts: list[float] = []
    rest: list[float] = []
    for n in range(rounds):
        other.execute("DELETE FROM bench_filler")
        other.execute("INSERT INTO bench_filler VALUES (?)", (bytes([n % 256]) * (mb << 20),))
        longest, deadline = 0.0, time.monotonic() + 30
        # The cut back ends once the file is 16 MB at most (`WAL_KEEP_BYTES`).
        while os.path.getsize(wal) > 16 << 20 and time.monotonic() < deadline:
            longest = max(longest, write_lock_wait())
            time.sleep(0.001)
        holds.append(longest * 1e6)
        each, _ = timed_calls(call, 20)
        firsts.append(each[0])
        rest.extend(each[1:])
    other.close()
    prober.close()
    name = f"tenantllm/SQLite: idle {mb} MB WAL cut back"
    report(
        f"{name}, longest write-lock wait of another connection",
        max(holds),
        "µs",
        "<= 10000",
        f"median of rounds {statistics.median(holds):,.0f} µs",
    )
    report(f"{name}, first call after it, median", statistics.median(firsts), "µs")
    report(f"{name}, first call after it, max", max(firsts), "µs", "<= 10000", f"of {len(firsts)}")
    report(f"{name}, the 19 calls after the first, median", statistics.median(rest), "µs")
    report(f"{name}, the 19 calls after the first, max", max(rest), "µs", "", f"of {len(rest)}")


class Cached(Guarded):
    cache_ttl = 3600


def cache_hits(db: str, n: int, repeats: int) -> None:
    """A response-cache hit (a read of the entry, then the admission and the row of a call
    that costs nothing) next to the same guarded call answered by the mock provider."""
    print("\nResponse cache on SQLite, mock provider with zero latency (µs per call, median)")
    budgeted: dict[str, Any] = {"database": db, "budgets": {"global_daily": 1_000_000, "enforcement": "hard"}}
    tl.configure(reset=True, **budgeted)
    tl.TenantBudget.find_or_create("bench", daily_limit=1_000_000, enforcement="hard")
    Cached.call(text="the quarterly report", tenant="bench")
    us = interleaved_us(
        {
            "miss": (budgeted, lambda: Guarded.call(text="the quarterly report", tenant="bench")),
            "hit": (budgeted, lambda: Cached.call(text="the quarterly report", tenant="bench")),
        },
        max(n // 3, 1),
        repeats * 3,
    )
    report("tenantllm/SQLite: full guard, answered by the provider", us["miss"], "µs")
    report("tenantllm/SQLite: full guard, answered from the cache", us["hit"], "µs")


# A call's or a stall's start and end (`time.monotonic`, s).
Span = tuple[float, float]


def timed_calls(call: Callable[[], object], k: int, spans: list[Span] | None = None) -> tuple[list[float], list[float]]:
    """`k` single calls: each one's latency and how long it waited for a database lock (µs):
    SQLite's write lock held by another connection (the checkpointer restarting the WAL,
    another process) or this process's writer held by another thread (a retention batch, a
    lease renewal). It tells a call slowed by the database from one slowed by the machine.
    With `spans`, each call's start and end (`time.monotonic`, s) are appended to it."""
    each, waits = [], []
    for _ in range(k):
        before = lock_waits()[1]
        t = time.perf_counter()
        start = time.monotonic()
        call()
        each.append((time.perf_counter() - t) * 1e6)
        waits.append((lock_waits()[1] - before) * 1e6)
        if spans is not None:
            spans.append((start, time.monotonic()))
    return each, waits


# A wake-up this late (s) after a sleep of 1 ms: the machine did not run the sentinel.
STALL_S = 0.002
# The sentinel: a process of its own (a thread would wait for the GIL a call holds) that only
# sleeps 1 ms at a time until its stdin closes, then prints each late wake-up's span
# (`time.monotonic`, the same clock in every process).
SENTINEL = textwrap.dedent(
    """
    import select, sys, time
    late, stalls = float(sys.argv[1]), []
    print("ready", flush=True)
    last = time.monotonic()
    while not select.select([sys.stdin], [], [], 0.001)[0]:
        now = time.monotonic()
        if now - last > late:
            stalls.append((last, now))
        last = now
    for a, b in stalls:
        print(a, b)
    """
)


@contextlib.contextmanager
def machine_stalls() -> Iterator[list[Span]]:
    """The spans (`time.monotonic`, s) in which a sentinel process that only sleeps 1 ms at a
    time woke more than `STALL_S` late: the VM paused, or the host ran something else. A call
    that overlapped none was not slowed by the machine that way; what it spent is its own."""
    stalls: list[Span] = []
    sentinel = subprocess.Popen(
        [sys.executable, "-c", SENTINEL, str(STALL_S + 0.001)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert sentinel.stdout is not None and sentinel.stdout.readline().strip() == "ready"
    try:
        yield stalls
    finally:
        out, _ = sentinel.communicate("", timeout=60)
        stalls.extend((float(a), float(b)) for a, b in (line.split() for line in out.splitlines()))


def report_unstalled(name: str, latencies_us: list[float], spans: list[Span], stalls: list[Span], target: str) -> None:
    """The slowest of the calls (`spans`, from `timed_calls`) that no stall of the machine
    (`machine_stalls`) overlapped: beside the max, it tells a slow call from a paused VM."""
    # Stalls follow one another, so their ends are sorted too: the first that ends after a
    # call began is the only one that can overlap it without an earlier one doing so.
    ends = [b for _, b in stalls]
    overlapped = [(i := bisect.bisect_right(ends, start)) < len(stalls) and stalls[i][0] < end for start, end in spans]
    clear = [us for us, hit in zip(latencies_us, overlapped, strict=True) if not hit]
    longest = max((b - a for a, b in stalls), default=0.0) * 1e3
    note = (
        f"{sum(overlapped):,} of {len(spans):,} calls overlapped one of {len(stalls):,} stalls"
        f" (a sentinel sleeping 1 ms woke > {STALL_S * 1e3:.0f} ms late; longest {longest:,.1f} ms)"
    )
    report(f"{name}, max of calls no machine stall overlapped", max(clear, default=0.0), "µs", target, note)


# The percentiles a tail reports, each as the index into `n` sorted latencies.
TAIL: tuple[tuple[str, Callable[[int], int]], ...] = (
    ("p50", lambda n: n // 2),
    ("p99", lambda n: n * 99 // 100),
    ("p99.9", lambda n: n * 999 // 1000),
)


def report_tail(
    name: str,
    latencies_us: list[float],
    max_target: str = "",
    p50_target: str = "",
    p99_target: str = "",
    waits_us: list[float] | None = None,
) -> None:
    """p50, p99, p99.9 and the slowest of single-call latencies (µs); with `waits_us` (each
    call's lock wait, from `timed_calls`), the longest lock wait and the slowest call's."""
    each = sorted(latencies_us)
    targets = {"p50": p50_target, "p99": p99_target}
    for label, at in TAIL:
        report(f"{name}, {label}", each[at(len(each))], "µs", targets.get(label, ""))
    report(f"{name}, max", each[-1], "µs", max_target, f"of {len(each):,}")
    if waits_us is not None:
        waited = sum(1 for w in waits_us if w > 0)
        note = f"{waited:,} of {len(waits_us):,} calls waited, {sum(waits_us) / 1e3:,.1f} ms in all"
        report(f"{name}, longest lock wait", max(waits_us), "µs", note=note)
        slowest = max(range(len(latencies_us)), key=latencies_us.__getitem__)
        report(f"{name}, lock wait of the slowest call", waits_us[slowest], "µs")


def rate_limit_overhead(db: str, n: int, repeats: int, store: str = "SQLite") -> None:
    """The same guarded call for a tenant with hard budgets only and for one that also has
    every rate limit (rpm, tpm, max_concurrent) and the global rpm/tpm: the admission then
    also counts the window's admissions and the calls in flight, and logs this one. The
    limits are high enough never to refuse, so both do the same work otherwise; the window
    holds every call of the last minute (up to `n` x rounds), the worst case for the count."""
    print(f"\nRate limits on {store} (µs per call, median; mock provider, zero latency)")
    budgets = {"global_daily": 1_000_000, "enforcement": "hard"}
    off: dict[str, Any] = {"database": db, "budgets": budgets}
    on: dict[str, Any] = {"database": db, "budgets": {**budgets, "global_rpm": 10**9, "global_tpm": 10**15}}
    tl.configure(reset=True, **off)
    limits: dict[str, Any] = {"daily_limit": 1_000_000, "daily_token_limit": 10**12}
    tl.TenantBudget.find_or_create("bench-budget", **limits)
    tl.TenantBudget.find_or_create("bench-rate", rpm_limit=10**9, tpm_limit=10**15, max_concurrent=1000, **limits)
    us = interleaved_us(
        {
            "off": (off, lambda: Guarded.call(text="the quarterly report", tenant="bench-budget")),
            "on": (on, lambda: Guarded.call(text="the quarterly report", tenant="bench-rate")),
        },
        max(n // 3, 1),
        repeats * 3,
    )
    report(f"tenantllm/{store}: guarded call, hard budgets only", us["off"], "µs")
    report(f"tenantllm/{store}: guarded call, + tenant and global rate limits", us["on"], "µs")
    share = (us["on"] - us["off"]) / us["off"] * 100
    report(f"tenantllm/{store}: rate limits added over budgets only", share, "%", "< 10", note="difference")


def sqlite_insert_peer(db: str, n: int, repeats: int) -> None:
    import sqlite3  # after tenantllm: see the module's docstring

    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS executions (id TEXT PRIMARY KEY, agent TEXT, model TEXT, tenant_id TEXT,"
        " status TEXT, started_at INTEGER, input_tokens INTEGER, output_tokens INTEGER, total_cost INTEGER)"
    )
    counter = iter(range(10**9))

    def insert() -> None:
        i = next(counter)
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO executions VALUES (?, 'A', 'gpt-4o', 't1', 'success', ?, 100, 20, 1234)",
            (f"id-{i}", time.time_ns()),
        )
        conn.execute("COMMIT")

    report("peer: plain sqlite3 insert of one execution row", per_call_us(insert, n, repeats), "µs")


def pybreaker_peer(n: int, repeats: int) -> None:
    try:
        import pybreaker  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        print("  (pybreaker not installed: pip install pybreaker)")
        return
    cb = pybreaker.CircuitBreaker(fail_max=10, reset_timeout=300)
    report(
        "peer: pybreaker CircuitBreaker.call (in-process only)",
        per_call_us(lambda: cb.call(lambda: None), n, repeats),
        "µs",
    )


def litellm_peer(n: int, repeats: int) -> None:
    try:
        import litellm  # type: ignore[import-not-found,import-untyped,unused-ignore]
        from litellm import BudgetManager  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        print("  (litellm not installed: pip install litellm)")
        return
    msgs = [{"role": "user", "content": "Summarize: the quarterly report"}]

    def completion() -> Any:
        return litellm.completion(model="gpt-4o", messages=msgs, mock_response="ok")

    report("peer: litellm.completion(mock_response=...)", per_call_us(completion, max(n // 10, 20), repeats), "µs")
    bm = BudgetManager(project_name="bench", client_type="local")
    for u in range(100):
        bm.create_budget(total_budget=1000, user=f"user{u}")
    resp = completion()
    counter = iter(range(10**9))
    report(
        "peer: litellm BudgetManager.update_cost (100 users)",
        per_call_us(
            lambda: bm.update_cost(completion_obj=resp, user=f"user{next(counter) % 100}"), max(n // 10, 20), repeats
        ),
        "µs",
    )


WORKER = textwrap.dedent(
    """
    import sys, threading, time, tenantllm as tl
    class Guarded(tl.Agent):
        model = "mock/bench"
        user = "Summarize: {text}"
        max_tokens = 64
        circuit_breaker = tl.BreakerPolicy(errors=10, within=60, cooldown=300)
    tl.configure(database=sys.argv[1], budgets={"global_daily": 1000000, "enforcement": "hard"})
    n = int(sys.argv[2])
    start = float(sys.argv[3])
    process, tenants = int(sys.argv[4]), int(sys.argv[5])
    Guarded.call(text="warm up", tenant="tenant0")
    while time.time() < start:
        time.sleep(0.001)
    latencies = []
    def run(t):
        for i in range(n):
            t0 = time.perf_counter()
            Guarded.call(text="report", tenant=f"tenant{(process * 4 + t) % tenants}")
            latencies.append((time.perf_counter() - t0) * 1e6)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(time.time())
    print(" ".join(f"{x:.0f}" for x in latencies))
    """
)

# Dashboard scans or backups in another process: `readers` threads, each holding read
# transactions over the executions open for `hold` seconds, one after another, until stdin
# closes. Two or more start `hold / readers` apart, so their reads overlap and at every moment
# one still uses the WAL.
LONG_READER = textwrap.dedent(
    """
    import sqlite3, sys, threading, time
    hold, readers = float(sys.argv[2]), int(sys.argv[3])
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    reads = []
    def read(delay):
        conn = sqlite3.connect(sys.argv[1], isolation_level=None, check_same_thread=False)
        done.wait(delay)
        while not done.is_set():
            conn.execute("BEGIN")
            conn.execute("SELECT tenant_id, count(*), sum(total_cost) FROM executions GROUP BY tenant_id").fetchall()
            done.wait(hold)
            conn.execute("COMMIT")
            reads.append(1)
            if readers == 1:
                done.wait(0.05)
    threads = [threading.Thread(target=read, args=(i * hold / readers,)) for i in range(readers)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(len(reads))
    """
)


def throughput(
    db: str, per_thread: int, store: str = "SQLite", long_reads: float = 0.0, readers: int = 1, tenants: int = 16
) -> None:
    """16 threads in 4 processes calling through the full guard, spread over `tenants` tenants
    (16: one each; 1: all on one tenant, whose counters every call then waits for); with
    `long_reads` (SQLite), another process meanwhile holds read transactions of that many
    seconds, one after another (in each of `readers` threads, overlapping when there are
    several)."""
    reading = f", another process reading for {long_reads:g} s at a time" if long_reads else ""
    if readers > 1:
        reading += f" in {readers} overlapping threads"
    spread = "one tenant" if tenants == 1 else f"{tenants} tenants"
    print(f"\nThroughput on {store}, 4 processes x 4 threads, {spread}, one database, full guard{reading}")
    tl.configure(reset=True, database=db)
    Guarded.call(text="the database exists", tenant="tenant0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    reader = None
    if long_reads:
        argv = [sys.executable, "-c", LONG_READER, db, str(long_reads), str(readers)]
        reader = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    start = time.time() + 1.5  # let every process import and configure first
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, db, str(per_thread), str(start), str(i), str(tenants)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(4)
    ]
    wal, latencies, ends = 0, [], []
    while any(p.poll() is None for p in procs):
        with contextlib.suppress(FileNotFoundError):
            wal = max(wal, os.path.getsize(db + "-wal"))
        time.sleep(0.05)
    for p in procs:
        end, each = p.communicate()[0].splitlines()
        ends.append(float(end))
        latencies += [float(x) for x in each.split()]
    reads = reader.communicate("")[0].strip() if reader else ""
    total = 16 * per_thread
    target = ("> 3000" if store.startswith("PostgreSQL") else ">= 5000") if not long_reads and tenants > 1 else ""
    one = ", one tenant" if tenants == 1 else ""
    extra = f"{' + long reads' if long_reads else ''}{' (overlapping)' if readers > 1 else ''}"
    name = f"tenantllm/{store}: 4x4{one}{extra}"
    report(f"{name}, guarded calls/s", total / (max(ends) - start), "calls/s", target)
    report_tail(f"{name}, single calls", latencies)
    if store == "SQLite":
        report(f"{name}, largest WAL file", wal / 2**20, "MB", note=f"{reads} long reads" if reads else "")


def psql_url(server: str) -> str:
    """`server` without its query: the store's own options (`?statement_cache_size=100`),
    which psql refuses, go only to the store."""
    return server.split("?", 1)[0]


@contextlib.contextmanager
def postgres_database(server: str, synchronous_commit: str = "") -> Iterator[str]:
    """A fresh database on the PostgreSQL server at `server` (created with psql), dropped
    afterwards so runs leave nothing behind on the server; with `synchronous_commit`, the
    database's own setting of it (a deployer's choice the library never makes for them).
    The URL it yields keeps `server`'s query."""
    server, query = psql_url(server), server.partition("?")[2]
    name = f"tl_bench_{os.getpid()}_{time.time_ns()}"
    subprocess.run(["psql", "-X", "-q", "-d", server, "-c", f"CREATE DATABASE {name}"], check=True)
    if synchronous_commit:
        setting = f"ALTER DATABASE {name} SET synchronous_commit = {synchronous_commit}"
        subprocess.run(["psql", "-X", "-q", "-d", server, "-c", setting], check=True)
    try:
        yield server.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    finally:
        tl.configure(reset=True, database=":memory:")  # closes this process's connections to it
        subprocess.run(["psql", "-X", "-q", "-d", server, "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


async def _fake_openai(port_holder: list[int], delay: float) -> asyncio.AbstractServer:
    body = json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "model": "bench-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        }
    ).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                await asyncio.sleep(delay)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()  # client gone, or the loop is shutting down

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=2048)
    port_holder.append(server.sockets[0].getsockname()[1])
    return server


def concurrent_acalls(db: str, n: int, repeats: int) -> None:
    print(f"\n{n} concurrent acalls against a local server answering after 100 ms")

    class Remote(tl.Agent):
        model = "local/bench-model"
        user = "Summarize: {text}"
        max_tokens = 64

    async def main() -> float:
        port: list[int] = []
        server = await _fake_openai(port, 0.1)
        tl.configure(
            reset=True,
            database=db,
            base_urls={"local": f"http://127.0.0.1:{port[0]}/v1"},
            pricing={"local/bench-model": {"input": "1", "output": "2"}},
        )
        await Remote.acall(text="warm up", tenant="t")
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            await asyncio.gather(*(Remote.acall(text=f"doc {i}", tenant=f"t{i % 10}") for i in range(n)))
            runs.append(time.perf_counter() - t)
        server.close()
        return statistics.median(runs)

    report(f"tenantllm: {n} concurrent acall, total wall time", asyncio.run(main()) * 1e3, "ms", "<= 400")


async def _fake_openai_stream(port_holder: list[int], delay: float) -> asyncio.AbstractServer:
    """An OpenAI-compatible server streaming its reply (server-sent events, chunked) after
    `delay` seconds, keeping connections alive."""
    def event(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return event({"id": "x", "object": "chat.completion.chunk", "model": "bench-model", "choices": [choice]})

    usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    events = [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": w}) for w in ("Hello", " streaming", " world")),
        chunk({}, "stop"),
        event({"id": "x", "object": "chat.completion.chunk", "model": "bench-model", "choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
    ]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length")),
                    0,
                )
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                await asyncio.sleep(delay)
                for e in events:
                    writer.write(f"{len(e):x}\r\n".encode() + e + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=2048)
    port_holder.append(server.sockets[0].getsockname()[1])
    return server


def streams(db: str, n_first: int, n_concurrent: int, repeats: int) -> None:
    """Time to the first piece over the openai SDK's own against the same server, and
    `n_concurrent` streams at once against a server answering in 100 ms, SDK alongside."""
    print(f"\nstreams: time to first piece ({n_first} each, server answering at once), {n_concurrent} concurrent")
    import openai

    class Streamer(tl.Agent):
        model = "local/bench-model"
        user = "Summarize: {text}"
        max_tokens = 64

    async def first_piece_ms(server_delay: float) -> tuple[float, float]:
        port: list[int] = []
        server = await _fake_openai_stream(port, server_delay)
        url = f"http://127.0.0.1:{port[0]}/v1"
        tl.configure(reset=True, database=db, base_urls={"local": url},
                     pricing={"local/bench-model": {"input": "1", "output": "2"}})
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)

        async def ours() -> float:
            t = time.perf_counter()
            async with Streamer.astream(text="doc", tenant="t") as s:
                await anext(s)
                took = time.perf_counter() - t
                async for _ in s:
                    pass
            return took

        async def sdk() -> float:
            t = time.perf_counter()
            stream = await client.chat.completions.create(
                model="bench-model", messages=[{"role": "user", "content": "Summarize: doc"}], max_tokens=64,
                stream=True, stream_options={"include_usage": True})
            took = 0.0
            async for c in stream:
                if not took and c.choices and c.choices[0].delta.content:
                    took = time.perf_counter() - t
            return took

        await ours()
        await sdk()
        mine, theirs = [], []
        for _ in range(n_first):  # taking turns, so load drift hits both alike
            mine.append(await ours())
            theirs.append(await sdk())
        await client.close()
        server.close()
        return statistics.median(mine) * 1e3, statistics.median(theirs) * 1e3

    ours_ms, sdk_ms = asyncio.run(first_piece_ms(0.0))
    report("tenantllm: astream, time to first piece", ours_ms, "ms")
    report("openai SDK: async stream, time to first piece (same server)", sdk_ms, "ms")
    report("tenantllm: time to first piece added over the SDK's", ours_ms - sdk_ms, "ms", "< 1")

    async def concurrent(ours: bool) -> float:
        port: list[int] = []
        server = await _fake_openai_stream(port, 0.1)
        url = f"http://127.0.0.1:{port[0]}/v1"
        tl.configure(reset=True, database=db, base_urls={"local": url},
                     pricing={"local/bench-model": {"input": "1", "output": "2"}})
        # A thousand connects at once outlast the SDK's default connect timeout on a busy machine.
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60,
                                    http_client=openai.DefaultAsyncHttpxClient(limits=httpx_limits(n_concurrent)))

        async def one(i: int) -> None:
            if ours:
                async for _ in Streamer.astream(text=f"doc {i}", tenant=f"t{i % 10}"):
                    pass
            else:
                stream = await client.chat.completions.create(
                    model="bench-model", messages=[{"role": "user", "content": f"Summarize: doc {i}"}],
                    max_tokens=64, stream=True, stream_options={"include_usage": True})
                async for _ in stream:
                    pass

        await one(0)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n_concurrent)))
            runs.append(time.perf_counter() - t)
        await client.close()
        server.close()
        return statistics.median(runs) * 1e3

    report(f"tenantllm: {n_concurrent} concurrent astream, total wall time", asyncio.run(concurrent(True)), "ms")
    sdk_ms = asyncio.run(concurrent(False))
    report(f"openai SDK: {n_concurrent} concurrent async streams, total wall time", sdk_ms, "ms")


def httpx_limits(n: int) -> Any:
    import httpx

    return httpx.Limits(max_connections=n, max_keepalive_connections=n)


def _uuid7(ms: int, seq: int) -> str:
    """A UUIDv7 for a bulk-loaded row: the id's leading bits are its start time, as tenantllm's."""
    rand_a, rand_b = (seq >> 48) & 0xFFF, 0x8000 | ((seq >> 36) & 0x3FFF)
    return f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{rand_a:03x}-{rand_b:04x}-{seq & 0xFFFFFFFFFFFF:012x}"


def spend_queries(db: str, rows: int, tenants: int, repeats: int) -> None:
    import sqlite3  # after tenantllm: see the module's docstring

    print(f"\nAnalytics over {rows:,} executions and {tenants:,} tenants")
    tl.configure(reset=True, database=db)
    conn = sqlite3.connect(db)
    now = time.time_ns() // 1000
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO executions (id, agent, model_id, chosen_model_id, provider, tenant_id, status, started_at,"
        " completed_at, duration_ms, input_tokens, output_tokens, total_tokens, input_cost, output_cost, total_cost,"
        " attempts_count) VALUES (?, 'Bench', 'gpt-4o', 'gpt-4o', 'openai', ?, 'success', ?, ?, 5, 100, 20, 120,"
        " 250000, 200000, 450000, 1)",
        ((_uuid7((now - i) // 1000, i), f"tenant{i % tenants:04d}", now - i, now - i + 5000) for i in range(rows)),
    )
    conn.commit()
    conn.close()
    t = time.perf_counter()
    tl.rebuild_counters()
    print(f"  (loaded and rebuilt counters in {time.perf_counter() - t:.1f}s)")
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        spend = tl.spend_by_tenant("monthly")
        samples.append((time.perf_counter() - t) * 1e3)
    assert len(spend) >= tenants
    report("tenantllm: spend by tenant this month, from counters", statistics.median(samples), "ms", "<= 10")
    samples = []
    for _ in range(max(repeats // 4, 3)):
        t = time.perf_counter()
        grouped = tl.Execution.this_month().with_tenant().group_by("tenant_id").sum("total_cost")
        samples.append((time.perf_counter() - t) * 1e3)
    assert len(grouped) >= tenants
    report("tenantllm: ad-hoc group_by over executions", statistics.median(samples), "ms", "<= 150")


def telemetry_overhead(db: str, n: int, repeats: int) -> None:
    """Calls with `opentelemetry` off, on (SDK tracer and meter, spans dropped by a no-op
    exporter), and on with content capture. Off must cost nothing: compare it with the same
    case on main (`unbudgeted call` in sync_overhead, same machine, same run)."""
    print("\nOpenTelemetry, mock provider with zero latency (µs per call, median)")
    from instructions import telemetry_on

    try:
        on = telemetry_on()
    except ImportError:
        print("  (skipped: pip install opentelemetry-sdk)")
        return

    def call() -> object:
        return Bare.call(text="the quarterly report")

    us = interleaved_us(
        {
            "off": ({"database": db}, call),
            "on": ({"database": db, "opentelemetry": on}, call),
            "content": ({"database": db, "opentelemetry": {**on, "capture_content": True}}, call),
        },
        max(n // 3, 1),
        repeats * 3,
    )
    report("tenantllm: unbudgeted call, opentelemetry off", us["off"], "µs")
    report("tenantllm: unbudgeted call, opentelemetry on (SDK spans + metrics)", us["on"], "µs")
    report("tenantllm: opentelemetry added over off", us["on"] - us["off"], "µs", note="difference")
    report("tenantllm: capture_content added over on", us["content"] - us["on"], "µs", note="difference")


# Seconds after a purge whose calls still count as during it: its pages reach the database
# file after it ends (the checkpointer), and calls that wait for that wait for the purge.
AFTER_PURGE = 0.5
# How fast the first phase assumes a purge goes (rows/s; about what it does on a loaded
# machine while calls write back to back: it has SQLite's write lock 1/50 of the time), to make
# it about as long as a purge phase.
PURGE_ROWS_PER_S = 2_000


def wal_restarts(db: str) -> int:
    """How many times the WAL of `db` has been started over: the checkpoint sequence number in
    its header (bytes 12-15), which SQLite counts up at each restart and writes with the first
    frame after it."""
    with contextlib.suppress(FileNotFoundError), open(db + "-wal", "rb") as f:
        header = f.read(16)
        if len(header) == 16:
            return int.from_bytes(header[12:16], "big")
    return 0


class Phases:
    """The calls of one kind of phase (several phases, one after another with others between):
    each call's latency and lock wait (µs), and the phases' seconds and WAL restarts."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.waits: list[float] = []
        self.seconds = 0.0
        self.restarts = 0
        self.count = 0
        # PostgreSQL (`ServerSide`): per call, whether an autovacuum worker worked on the
        # database around it; CPU seconds of each of `CPU_PARTS` in all of this kind's phases.
        self.autovacuum: list[bool] = []
        self.cpu = dict.fromkeys(CPU_PARTS, 0.0)
        self.wal = 0.0  # bytes of WAL the server wrote (all its databases)

    def start(self, db: str) -> None:
        self._began, self._restarts = time.perf_counter(), wal_restarts(db)

    def elapsed(self) -> float:
        return time.perf_counter() - self._began

    def add(self, latencies: list[float], waits: list[float]) -> None:
        self.latencies.extend(latencies)
        self.waits.extend(waits)

    def stop(self, db: str) -> None:
        self.seconds += self.elapsed()
        self.restarts += wal_restarts(db) - self._restarts
        self.count += 1

    def waited_share(self) -> float:
        """The share of calls that waited for a lock."""
        return sum(1 for w in self.waits if w > 0) / max(len(self.waits), 1)

    def mean_wait(self) -> float:
        """The mean lock wait per call (µs)."""
        return sum(self.waits) / max(len(self.waits), 1)

    def describe(self) -> str:
        calls, restarts = len(self.latencies), self.restarts
        return f"{self.count} phases, {self.seconds:.1f} s, {calls:,} calls, {restarts} restarts"


def postgres_ticks() -> dict[int, int]:
    """User + system CPU time (clock ticks) of every process named postgres on this machine, by pid."""
    ticks = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                s = f.read()
        except OSError:  # the process ended meanwhile
            continue
        if s[s.index("(") + 1 : s.rindex(")")].startswith("postgres"):
            fields = s[s.rindex(")") + 2 :].split()
            ticks[int(s[: s.index(" ")])] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def machine_ticks() -> int:
    """Clock ticks all cores of this machine spent busy since boot (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return sum(fields) - fields[3] - fields[4]


# Where a PostgreSQL server's CPU time goes during a phase, as `ServerSide` splits it.
CPU_PARTS = ("bench process", "its database's backends", "its autovacuum", "other postgres", "rest of machine")


class ServerSide:
    """What the PostgreSQL server does beside a phase's timed calls, for a server on this
    machine: whether autovacuum works on the bench's database (its workers, sampled between
    chunks of calls: a worker that starts and ends between two samples is seen only in the
    tables' `autovacuum_count`), the purged tables' dead rows, and the CPU time of the bench
    process, of the database's backends (calls and purge), of its autovacuum workers, of the
    server's other processes (other databases, the checkpointer, the WAL writer) and of the
    rest of the machine. On a machine whose cores carry both calls and server, that says
    whether a slower phase lost its CPU to the purge, to autovacuum or to something else. And
    the WAL the server wrote (all its databases): a call's commit waits for the WAL to reach
    the disk, the purge's and autovacuum's records before it too."""

    TABLES = ("executions", "execution_details")

    def __init__(self, url: str) -> None:
        import psycopg  # only on PostgreSQL runs

        self.conn = psycopg.connect(psql_url(url), autocommit=True)
        self.autovacuum_ticks: dict[int, int] = {}  # worker pid -> its ticks when last seen
        self.working: list[str] = []  # what the workers said at the last sample

    def sample(self) -> bool:
        """Whether an autovacuum worker works on this database now (and what on, `working`)."""
        rows = self.conn.execute(
            "SELECT pid, query FROM pg_stat_activity"
            " WHERE backend_type = 'autovacuum worker' AND datname = current_database()"
        ).fetchall()
        self.working = [q.removeprefix("autovacuum: ") for _, q in rows]
        for pid, _ in rows:
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                self.autovacuum_ticks[pid] = int(fields[11]) + int(fields[12])
        return bool(rows)

    def tables(self) -> dict[str, tuple[int, int, int]]:
        """(dead rows, autovacuums, autoanalyzes) of each purged table, as the statistics say."""
        rows = self.conn.execute(
            "SELECT relname, n_dead_tup, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables"
            " WHERE relname = ANY(%s)",
            (list(self.TABLES),),
        ).fetchall()
        return {name: (dead, vacuums, analyzes) for name, dead, vacuums, analyzes in rows}

    def backends(self) -> set[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        return {pid for (pid,) in rows}

    def begin(self) -> tuple[Any, ...]:
        self.autovacuum_ticks.clear()
        self.sample()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        lsn = self.conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        return (usage.ru_utime + usage.ru_stime, postgres_ticks(), dict(self.autovacuum_ticks), machine_ticks(), lsn)

    def wal_since(self, began: tuple[Any, ...]) -> float:
        """Bytes of WAL the server wrote since `began` (`begin`)."""
        row = self.conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", began[-1]).fetchone()
        return float(row[0]) if row else 0.0

    def end(self, began: tuple[Any, ...]) -> dict[str, float]:
        """CPU seconds of each of `CPU_PARTS` since `began` (`begin`)."""
        self.sample()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        own0, server0, workers0, machine0, _ = began
        server, backends, tick = postgres_ticks(), self.backends(), os.sysconf("SC_CLK_TCK")
        # A process seen now counts from its ticks at the start (0 if it started since); a
        # worker gone since counts up to its last sample.
        since = {pid: t - server0.get(pid, 0) for pid, t in server.items()}
        for pid, t in self.autovacuum_ticks.items():
            since[pid] = max(since.get(pid, 0), t - workers0.get(pid, 0))
        ours = sum(since.get(pid, 0) for pid in backends) / tick
        autovacuum = sum(since[pid] for pid in self.autovacuum_ticks) / tick
        postgres = sum(since.values()) / tick
        own = usage.ru_utime + usage.ru_stime - own0
        rest = (machine_ticks() - machine0) / tick - own - postgres
        return dict(zip(CPU_PARTS, (own, ours, autovacuum, postgres - ours - autovacuum, rest), strict=True))


def load_old_executions(db: str, starts: list[int], tenants: int = 1) -> None:
    """Bulk-loads settled executions (with their details) that started at `starts` (UTC micros),
    of `tenants` tenants in turn, into the SQLite file or PostgreSQL database `db`."""
    columns = (
        "id, agent, model_id, chosen_model_id, provider, tenant_id, status, started_at, completed_at, duration_ms,"
        " input_tokens, output_tokens, total_tokens, input_cost, output_cost, total_cost, attempts_count, metadata"
    )
    model = ("Bench", "gpt-4o", "gpt-4o", "openai")
    usage = (5, 100, 20, 120, 250000, 200000, 450000, 1, '{"plan": "pro"}')
    ids = [_uuid7(t // 1000, i) for i, t in enumerate(starts)]
    rows = [(ids[i], *model, f"t{i % tenants}", "success", t, t + 5000, *usage) for i, t in enumerate(starts)]
    details = [(id, "Summarize: a report", "ok") for id in ids]
    if db.startswith("postgresql://"):
        import psycopg  # only on PostgreSQL runs

        with psycopg.connect(psql_url(db), autocommit=True) as conn, conn.cursor() as cur:
            for table, names, values in (
                ("executions", columns, rows),
                ("execution_details", "execution_id, user_prompt, response", details),
            ):
                with conn.transaction(), cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    for row in values:
                        copy.write_row(row)
            # Now, not by autovacuum while the first calls are timed (their p50 was 5x).
            cur.execute("VACUUM ANALYZE executions, execution_details")
        return
    import sqlite3  # after tenantllm: see the module's docstring

    conn = sqlite3.connect(db)
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO executions ({columns}) VALUES ({', '.join('?' * len(rows[0]))})", rows)
    conn.executemany("INSERT INTO execution_details (execution_id, user_prompt, response) VALUES (?, ?, ?)", details)
    conn.commit()
    conn.close()


def retention_under_load(db: str, rows: int, calls: int, phases: int = 10, tenants: int = 1) -> None:
    """Single-call latency while `tl.purge()` deletes `rows` old executions, against the same
    calls with no purge running, in the same run and interleaved: `phases` purges, each of a
    `phases`-th of the rows (one day's worth), with calls timed during each, and calls with no
    purge before the first (`calls` of them), between them and after the last (`calls` in all,
    each phase about as long as a purge phase), so all see the same machine. Each kind of phase
    reports its tail, the calls that waited for a lock, and (SQLite) its WAL restarts a second
    (the purge's own frames add restarts, and restarts are when calls wait). A purge must
    leave calls' latency as it is: the ratios to the calls before any purge say, and those of
    each purge to the calls just before and after it (their median over the rounds). On
    PostgreSQL each phase also prints a line: whether autovacuum worked on the database, the
    purged tables' dead rows and where the machine's CPU went (`ServerSide`). `db` is a
    SQLite file or a PostgreSQL database's URL (where calls wait for no lock of the purge's:
    its batches compete with them for the server). The old rows are of `tenants` tenants in
    turn: on SQLite a deleted row's entry in the tenants' index is on a page of its own when
    a batch deletes fewer rows than there are tenants, so each row costs more to delete."""
    postgres = db.startswith("postgresql://")
    store = "PostgreSQL" if postgres else "SQLite"
    print(f"\nCalls while a purge deletes {rows:,} old executions in {phases} rounds on {store} (single-call latency)")
    tl.configure(reset=True, database=db)
    # Round r's rows started at noon (UTC, the store's calendar) 500 - r days before today, so
    # `executions_days=499 - r`, whose cutoff a purge moves back to the start of its day,
    # deletes them and none of the next round's.
    day, now = 86_400_000_000, time.time_ns() // 1000
    per = rows // phases
    today = now - now % day
    load_old_executions(db, [today - (500 - i // per) * day + day // 2 + i % per for i in range(per * phases)], tenants)

    def timed(k: int) -> tuple[list[float], list[float]]:
        return timed_calls(lambda: Guarded.call(text="the quarterly report", tenant="bench"), k)

    def purge(days: int, done: dict[str, Any]) -> None:
        t, cpu = time.perf_counter(), time.thread_time()
        done.update(tl.purge(executions_days=days))
        done["seconds"], done["cpu"] = time.perf_counter() - t, time.thread_time() - cpu

    server = ServerSide(db) if postgres else None
    around: list[bool] = [False]  # whether autovacuum worked at the last sample

    def chunk(phase: Phases) -> None:
        """10 timed calls; on PostgreSQL, each marked as with autovacuum if a worker worked on
        the database at the sample before or after them."""
        phase.add(*timed(10))
        if server:
            now = server.sample()
            phase.autovacuum.extend([now or around[0]] * 10)
            around[0] = now

    def phase_done(phase: Phases, kind: str, began: tuple[Any, ...], first: int, tables: dict[str, Any]) -> None:
        """On PostgreSQL, one line on the phase just ended: its calls, autovacuum, CPU split."""
        if not server:
            return
        cpu, wal, seconds = server.end(began), server.wal_since(began), phase.elapsed()
        for part, t in cpu.items():
            phase.cpu[part] += t
        phase.wal += wal
        each = sorted(phase.latencies[first:])
        vacuumed = sum(phase.autovacuum[first:]) / max(len(each), 1)
        after = server.tables()
        counts = " ".join(
            f"{t.removeprefix('execution_')}: dead {dead:,}, +{vacuums - tables[t][1]}v +{analyzes - tables[t][2]}a"
            for t, (dead, vacuums, analyzes) in after.items()
        )
        cores = " ".join(f"{c / seconds:.2f}" for c in cpu.values())
        print(
            f"    {kind:<20} {seconds:5.1f} s {len(each):6,} calls p50 {each[len(each) // 2]:7,.0f} p99"
            f" {each[len(each) * 99 // 100]:7,.0f} µs, autovacuum {vacuumed:4.0%} {','.join(server.working)}"
            f" | {counts} | WAL {wal / seconds / 1e6:.2f} MB/s | cores {cores}",
            flush=True,
        )

    tl.TenantBudget.find_or_create("bench", daily_limit=1_000_000, enforcement="hard")
    timed(50)  # the first calls open the database and warm its pages: in no phase
    kinds = ("no purge yet", "during a purge", "no purge, after one")
    seen = {kind: Phases() for kind in kinds}
    purged, purging, busy, purge_cpu = 0, 0.0, 0.0, 0.0
    each_phase: tuple[list[list[float]], list[list[float]]] = ([], [])  # (with no purge, during one)
    if server:
        parts = ", ".join(CPU_PARTS)
        print(f"    calls | each purged table: dead rows, +autovacuums v +autoanalyzes a | WAL | cores: {parts}")
    # Every phase lasts as long as the purge phases before it did on average (the first as
    # long as a purge at `PURGE_ROWS_PER_S` would), and has at least its share of `calls`.
    length = per / PURGE_ROWS_PER_S + AFTER_PURGE
    for r in range(phases + 1):
        kind = kinds[0] if r == 0 else kinds[2]
        quiet, start = seen[kind], len(seen[kind].latencies)
        tables, began = (server.tables(), server.begin()) if server else ({}, ())
        quiet.start(db)
        # The calls before any purge are all in one phase: as many as each other kind.
        while len(quiet.latencies) < (calls if r == 0 else calls * r // phases) or quiet.elapsed() < length:
            chunk(quiet)
        phase_done(quiet, kind, began, start, tables)
        quiet.stop(db)
        each_phase[0].append(quiet.latencies[start:])
        if r == phases:
            break
        during = seen[kinds[1]]
        done: dict[str, Any] = {}
        worker = threading.Thread(target=purge, args=(499 - r, done))
        start = len(during.latencies)
        tables, began = (server.tables(), server.begin()) if server else ({}, ())
        cpu = time.process_time()
        during.start(db)
        worker.start()
        ended = float("inf")
        while time.perf_counter() < ended + AFTER_PURGE:
            chunk(during)
            if ended == float("inf") and not worker.is_alive():
                ended = time.perf_counter()
                busy += time.process_time() - cpu
        phase_done(during, kinds[1], began, start, tables)
        during.stop(db)
        each_phase[1].append(during.latencies[start:])
        worker.join()
        assert done["executions"] == per, done
        purged += per
        purging += done["seconds"]
        purge_cpu += done["cpu"]
        length = during.seconds / (r + 1)
    name = "tenantllm/PostgreSQL" if postgres else "tenantllm"
    for kind, p in seen.items():
        report_tail(f"{name}: guarded call, {kind}", p.latencies, waits_us=None if postgres else p.waits)
        if not postgres:
            report(f"{name}: {kind}, WAL restarts", p.restarts / p.seconds, "/s", note=p.describe())
    # A purge must slow neither the calls during it nor those after it (the checkpointer copies
    # its pages and syncs them after it ends): both against the calls before any purge, and the
    # calls during purges against all calls with none (about as many calls, so the slowest of
    # each compare). Beside the tail, which a loaded machine sets, how often calls waited for a
    # lock and how long on average, which it hardly does.
    quiet = Phases()
    for kind in (kinds[0], kinds[2]):
        quiet.add(seen[kind].latencies, seen[kind].waits)
        quiet.autovacuum += seen[kind].autovacuum
    for kind, against, base in (
        (kinds[1], "no purge yet", seen[kinds[0]]),
        (kinds[2], "no purge yet", seen[kinds[0]]),
        (kinds[1], "no purge", quiet),
    ):
        other, first = sorted(seen[kind].latencies), sorted(base.latencies)
        for label, at in (*TAIL, ("max", lambda n: n - 1)):
            target = {"p99": "<= 1.2", "max": "<= 1"}.get(label, "")
            ratio = other[at(len(other))] / first[at(len(first))]
            report(f"{name}: {kind} / {against}, {label}", ratio, "x", target)
        if postgres:
            continue
        for label, per_call in (("calls that waited", Phases.waited_share), ("lock wait per call", Phases.mean_wait)):
            ratio = per_call(seen[kind]) / max(per_call(base), 1e-9)
            note = f"{per_call(seen[kind]):.4g} against {per_call(base):.4g}"
            report(f"{name}: {kind} / {against}, {label}", ratio, "x", note=note)
    if server:
        server_split(name, seen, quiet, purge_cpu / purging)
        server.conn.close()
    # Each purge against the calls just before and just after it: the machine's load changes
    # over a run (other processes come and go), and these pairs see nearly the same machine,
    # where the ratios of all calls compare tails from different minutes.
    quiets, durings = each_phase
    for label, at in TAIL[:2]:
        ratios = sorted(
            sorted(d)[at(len(d))] / sorted(q)[at(len(q))]
            for d, q in ((durings[r], quiets[r] + quiets[r + 1]) for r in range(phases))
        )
        note = f"{phases} rounds, {ratios[0]:.2f} to {ratios[-1]:.2f}, {min(map(len, durings)):,}+ calls during each"
        target = "<= 1.2" if label == "p99" else ""
        median = statistics.median(ratios)
        report(f"{name}: during a purge / just before and after, {label}, median", median, "x", target, note)
    # Cores the process kept busy while purging (calls and purge): above 1 the purge competes
    # with the calls for the machine's CPUs, not only for the database.
    cores = f"{busy / purging:.2f} cores busy"
    report(f"{name}: purge of old executions (tl.purge)", purged / purging, "rows/s", ">= 1000", cores)


def server_split(name: str, seen: dict[str, Phases], quiet: Phases, purge_thread: float) -> None:
    """On PostgreSQL: where the machine's CPU went in each kind of phase (cores: CPU seconds a
    second, split as `CPU_PARTS`), the purge's duty cycle (the cores its batches add to the
    database's backends, with its own thread's), and the calls with and without autovacuum
    working on the database around them, so a slower phase can be put down to the purge's
    batches, to autovacuum or to the machine."""
    during, quiets = seen["during a purge"], [p for kind, p in seen.items() if kind != "during a purge"]
    for kind, p in seen.items():
        note = ", ".join(f"{part} {t / p.seconds:.2f}" for part, t in p.cpu.items())
        report(f"{name}: {kind}, cores busy", sum(p.cpu.values()) / p.seconds, "cores", note=note)
        note = f"{p.wal / len(p.latencies) / 1e3:.1f} KB per call"
        report(f"{name}: {kind}, WAL written (whole server)", p.wal / p.seconds / 1e6, "MB/s", note=note)
    backends = "its database's backends"
    quiet_s = sum(p.seconds for p in quiets)
    per_call = {
        label: sum(p.cpu[backends] for p in ps) / sum(len(p.latencies) for p in ps)
        for label, ps in (("during", [during]), ("quiet", quiets))
    }
    # The backends' CPU time beyond what the calls of the phase would have cost at the quiet
    # phases' rate per call: the purge's batches.
    batches = during.cpu[backends] - per_call["quiet"] * len(during.latencies)
    note = f"backends {batches / during.seconds:.3f} + its thread {purge_thread:.3f} cores"
    report(f"{name}: purge's duty cycle", batches / during.seconds + purge_thread, "cores", note=note)
    report(
        f"{name}: database's backends per call, during / no purge",
        per_call["during"] / per_call["quiet"],
        "x",
        note=f"{per_call['during'] * 1e6:,.0f} against {per_call['quiet'] * 1e6:,.0f} µs ({quiet_s:.0f} s quiet)",
    )
    split: dict[tuple[str, bool], list[float]] = {}
    for kind, p in (("during a purge", during), ("no purge", quiet)):
        for latency, vacuumed in zip(p.latencies, p.autovacuum, strict=True):
            split.setdefault((kind, vacuumed), []).append(latency)
    for (kind, vacuumed), each in sorted(split.items()):
        each.sort()
        label = f"{kind}, {'with' if vacuumed else 'no'} autovacuum"
        for tail, at in TAIL[:2]:
            report(f"{name}: {label}, {tail}", each[at(len(each))], "µs", note=f"of {len(each):,} calls")
    for tail, at in TAIL[:2]:
        both = [sorted(split.get((kind, False), [])) for kind in ("during a purge", "no purge")]
        if all(both):
            ratio = both[0][at(len(both[0]))] / both[1][at(len(both[1]))]
            report(f"{name}: during a purge / no purge, both without autovacuum, {tail}", ratio, "x", "<= 1.2")


def purges_under_load(d: Path, postgres: str | None, quick: bool) -> None:
    # Enough calls of each kind for a p99 of 30 calls or more (report_tail says how many).
    rows, calls = (40_000, 3000) if quick else (200_000, 3000)
    retention_under_load(str(d / "purge.db"), rows, calls)
    if postgres:
        with postgres_database(postgres) as url:
            retention_under_load(url, rows, calls)


def import_time(repeats: int) -> None:
    print("\nImport time (fresh interpreter, minus `python -c pass`)")

    # As an installed package imports: from bytecode (pip compiles it at install), so with
    # PYTHONDONTWRITEBYTECODE dropped and one warm-up run each; else this times the compiler.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def wall(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        return time.perf_counter() - t

    base = statistics.median(wall("pass") for _ in range(repeats))
    wall("import tenantllm")
    ours = statistics.median(wall("import tenantllm") for _ in range(repeats))
    report("tenantllm: import tenantllm", (ours - base) * 1e3, "ms", "<= 100")
    try:
        import importlib.util

        if importlib.util.find_spec("litellm"):
            wall("import litellm")
            theirs = statistics.median(wall("import litellm") for _ in range(3))
            report("peer: import litellm", (theirs - base) * 1e3, "ms")
    except ImportError:
        pass


def postgres_benchmarks(server: str, n: int, repeats: int, per_thread: int, guard_only: bool) -> None:
    """The guarded call on PostgreSQL: as the server is configured, and again on a database
    whose commits do not wait for the disk (synchronous_commit=off), since every admission
    and settlement commits, and on a disk whose flush takes milliseconds (pg_test_fsync
    tells) that flush is most of the call."""
    settings = ["fsync", "synchronous_commit", "wal_sync_method"]
    shown = []
    for s in settings:
        argv = ["psql", "-XAt", "-d", psql_url(server), "-c", f"SHOW {s}"]
        value = subprocess.run(argv, capture_output=True, text=True)
        shown.append(f"{s}={value.stdout.strip()}")
    print("\nPostgreSQL server: " + ", ".join(shown))
    for commit in ("", "off"):
        store = "PostgreSQL" + (" (synchronous_commit off)" if commit else "")
        with postgres_database(server, commit) as url:
            sync_overhead(url, n // 3, repeats, store)
        if not guard_only and not commit:
            with postgres_database(server) as url:
                rate_limit_overhead(url, n // 5, repeats, store)
        with postgres_database(server, commit) as url:
            throughput(url, per_thread // 2, store)
        with postgres_database(server, commit) as url:
            throughput(url, per_thread // 2, store, tenants=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    p.add_argument(
        "--postgres",
        default=os.environ.get("TENANTLLM_TEST_POSTGRES_URL"),
        help="a PostgreSQL server URL: also measure the guarded call there (default: $TENANTLLM_TEST_POSTGRES_URL)",
    )
    p.add_argument(
        "--guard",
        action="store_true",
        help="only the guarded call on SQLite and PostgreSQL side by side (latency, throughput), no peers or analytics",
    )
    p.add_argument(
        "--cut-back",
        action="store_true",
        help="only calls after the checkpointer cut an idle WAL back (and how long it held writes)",
    )
    p.add_argument(
        "--retention",
        action="store_true",
        help="only calls during and between purges, on SQLite and (with --postgres) PostgreSQL",
    )
    args = p.parse_args()
    n, repeats = (300, 3) if args.quick else (3000, 7)
    per_thread = 100 if args.quick else 1000
    print(f"tenantllm {tl.__version__} benchmarks, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"  {'measure':<68} {'median':>12} {'unit':<8} {'target':<10} {'load':>5}")
    if args.cut_back:
        with tempfile.TemporaryDirectory() as tmp:
            after_cut_back(str(Path(tmp) / "cut.db"), 3 if args.quick else 10)
        write_results()
        return
    if args.retention:
        with tempfile.TemporaryDirectory() as tmp:
            purges_under_load(Path(tmp), args.postgres, args.quick)
        write_results()
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        os.chdir(d)  # litellm's BudgetManager writes user_cost.json into the working directory
        sync_overhead(str(d / "sync.db"), n, repeats)
        after_cut_back(str(d / "cut.db"), 3 if args.quick else 10)
        if not args.guard:
            rate_limit_overhead(str(d / "rate.db"), n, repeats)
            sqlite_insert_peer(str(d / "peer.db"), n, repeats)
            pybreaker_peer(n * 10, repeats)
            litellm_peer(n, repeats)
        throughput(str(d / "tp.db"), per_thread)
        throughput(str(d / "tp-one.db"), per_thread, tenants=1)
        if not args.guard:
            throughput(str(d / "tp-read.db"), per_thread, long_reads=1.0)
            throughput(str(d / "tp-overlap.db"), per_thread, long_reads=0.4, readers=2)
        if args.postgres:
            postgres_benchmarks(args.postgres, n, repeats, per_thread, args.guard)
        else:
            print("\n(PostgreSQL skipped: pass --postgres URL or set TENANTLLM_TEST_POSTGRES_URL)")
        if not args.guard:
            cache_hits(str(d / "cache.db"), n, repeats)
            concurrent_acalls(str(d / "acall.db"), 1000, 3 if args.quick else 5)
            streams(str(d / "stream.db"), 50 if args.quick else 300, 1000, 3 if args.quick else 5)
            spend_queries(str(d / "big.db"), 50_000 if args.quick else 1_000_000, 1000, 20)
            telemetry_overhead(str(d / "otel.db"), n, repeats)
            purges_under_load(d, args.postgres, args.quick)
            import_time(3 if args.quick else 7)
    write_results()


def write_results() -> None:
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(RESULTS, indent=2))
    print(f"\nwrote {out / 'latest.json'}")


if __name__ == "__main__":
    main()
