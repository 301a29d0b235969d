"""Instructions per guarded mock call, counted by callgrind: `make bench-instructions` (or
`python benches/instructions.py [--python OTHER_PYTHON ...]`).

Wall-clock figures swing with the machine's load; instruction counts do not, so this is the
measure to compare two builds with (e.g. a commit against the one before it, or a baseline's
virtualenv given with --python). Each case runs twice under `valgrind --tool=callgrind`, with
`WARM` calls and then with `WARM + N`; the difference divided by N is one call's cost, so
interpreter start-up, imports, the store's opening and the warm-up cancel out. Counted in the
calling thread (callgrind's first thread) and in all threads (the checkpointer's and tokio's
threads included). Cases, as benches/run.py's:
- budget: `Guarded.call` for a tenant with hard daily budgets, global hard budgets, a breaker.
- rate: the same plus the tenant's rpm/tpm/max_concurrent and the global rpm/tpm, after `WARM`
  calls that stay in the one-minute window (the log is full: the worst case for the check).
- none: the same call with no budget or limit at all (its reservation holds nothing).
- otel-missing: budget with the `otel` extra not installed (importing `opentelemetry` fails).
- otel-on: budget with `opentelemetry` on (the SDK's tracer and meter, spans dropped by an
  exporter that does nothing). budget is the same call with it off: "no cost when disabled"
  compares budget with otel-missing (`--cases budget,otel-missing,otel-on`).
`--build DIR` measures another build of the same Python package (DIR holds a `tenantllm`
directory, e.g. an unpacked wheel). Needs valgrind. Nothing
here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

WARM = 300
N = 300


def child(case: str, calls: int, database: str | None = None) -> None:
    """The measured program (run under valgrind): `calls` guarded calls in `case`, on a new
    SQLite database or on `database` (benches/pg_instructions.py: a PostgreSQL URL)."""
    if case == "otel-missing":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]  # import fails, as if not installed
    import tenantllm as tl

    class Guarded(tl.Agent):
        model = "mock/bench"
        user = "Summarize: {text}"
        max_tokens = 64
        circuit_breaker = tl.BreakerPolicy(errors=10, within=60, cooldown=300)

    budgets: dict[str, object] = {"global_daily": 1_000_000, "global_monthly": 10_000_000, "enforcement": "hard"}
    if case == "none":
        budgets = {}
    limits: dict[str, object] = {"daily_limit": 1_000_000, "daily_token_limit": 10**12, "enforcement": "hard"}
    if case == "rate":
        budgets.update(global_rpm=10**9, global_tpm=10**15)
        limits.update(rpm_limit=10**9, tpm_limit=10**15, max_concurrent=1000)
    options: dict[str, object] = {}
    if case == "otel-on":
        options["opentelemetry"] = telemetry_on()
    tl.configure(database=database or os.path.join(tempfile.mkdtemp(), "cg.db"), budgets=budgets, **options)
    if case != "none":
        tl.TenantBudget.find_or_create("bench", **limits)
    for _ in range(calls):
        Guarded.call(text="the quarterly report", tenant="bench")


def telemetry_on() -> dict[str, object]:
    """`opentelemetry=` options with the SDK's providers and spans dropped as they end."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(Dropped()))
    return {"tracer_provider": tp, "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()])}


def count(python: str, build: str | None, case: str, calls: int, out_dir: Path) -> tuple[int, int]:
    """Instructions of the child run (`build`: a directory holding another build's `tenantllm`
    package, put first on the path): (calling thread, all threads)."""
    prefix = out_dir / f"{case}-{calls}"
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={prefix}.%p",
         python, "-W", "ignore", __file__, "--child", case, str(calls)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": build} if build else None,
    )
    per_thread = {}
    for f in out_dir.glob(f"{prefix.name}.*-*"):
        thread = int(f.name.rsplit("-", 1)[1])
        m = re.search(r"^summary: (\d+)", f.read_text(), re.M)
        per_thread[thread] = int(m.group(1)) if m else 0
        f.unlink()
    return per_thread[min(per_thread)], sum(per_thread.values())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--python", action="append", default=[], help="another build's python to measure too (repeatable)")
    p.add_argument(
        "--build", action="append", default=[],
        help="a directory with another build's tenantllm package, to measure with this python too (repeatable)",
    )
    p.add_argument("--cases", default="budget,rate", help="comma-separated: budget, rate, none, otel-missing, otel-on")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    builds: list[tuple[str, str | None]] = [(sys.executable, None), *((p, None) for p in args.python)]
    builds += [(sys.executable, b) for b in args.build]
    print(f"instructions per guarded mock call (callgrind; difference of {WARM} and {WARM + N} calls, / {N})")
    print(f"  {'python (build)':<44} {'case':<8} {'calling thread':>16} {'all threads':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for python, build in builds:
            name = f"{python} ({build})" if build else python
            for case in args.cases.split(","):
                try:
                    lo = count(python, build, case, WARM, Path(tmp))
                    hi = count(python, build, case, WARM + N, Path(tmp))
                except subprocess.CalledProcessError:
                    print(f"  {name:<44} {case:<8} {'(failed: does this build support it?)':>32}")
                    continue
                calling, every = ((h - lo_) / N for h, lo_ in zip(hi, lo, strict=True))
                print(f"  {name:<44} {case:<8} {calling:>16,.0f} {every:>14,.0f}", flush=True)


if __name__ == "__main__":
    main()
