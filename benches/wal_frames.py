"""WAL frames a guarded mock call writes, by table: `python benches/wal_frames.py [--build DIR]`.

Each page a transaction changes is one frame (24-byte header and 4 KB page) appended to the WAL,
a cost in the kernel and in the checkpointer's copying that instruction counts do not show. It
runs benches/instructions.py's cases (budget, rate, none) under strace, which logs each pwrite64 to
the -wal file (a frame's header starts with its page number), once with `WARM` calls and once
with `WARM + N`; the difference divided by N is one call's frames, mapped to the tables and
indexes owning the pages with dbstat at the end. Needs strace and a Python sqlite3 with dbstat.
Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from instructions import WARM, N

# strace -xx writes every byte as \xNN, the path too: "-wal" is \x2d\x77\x61\x6c.
# A write another thread's interrupts ends in " <unfinished ...>" instead (its result follows on
# a line of its own): missing those lost ~5-15 % of the frames, a different share in each run.
HEADER = re.compile(
    r'pwrite64\(\d+<(?:\\x[0-9a-f]{2})*\\x2d\\x77\\x61\\x6c>, "((?:\\x[0-9a-f]{2}){4})"\.*, 24, \d+(?:\)| <unfinished)'
)


def frames(build: str | None, case: str, calls: int) -> collections.Counter[str]:
    """The WAL frames of `calls` guarded calls (after opening the store), by table."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace"
        env = {**os.environ, "TMPDIR": tmp, **({"PYTHONPATH": build} if build else {})}
        script = str(Path(__file__).with_name("instructions.py"))
        child = [sys.executable, "-W", "ignore", script, "--child", case, str(calls)]
        subprocess.run(
            ["strace", "-f", "-y", "-xx", "-s", "4", "-e", "trace=pwrite64", "-o", str(log), *child],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        pages = collections.Counter(
            int(m.group(1).replace("\\x", ""), 16) for m in map(HEADER.search, log.read_text().splitlines()) if m
        )
        (db,) = Path(tmp).glob("*/cg.db")
        owner = dict(sqlite3.connect(db).execute("SELECT pageno, name FROM dbstat"))
    by_table: collections.Counter[str] = collections.Counter()
    for page, n in pages.items():
        by_table[owner.get(page, "(freed)")] += n
    return by_table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--build", help="a directory with another build's tenantllm package, to measure instead")
    p.add_argument("--cases", default="budget,rate", help="comma-separated: budget, rate, none")
    args = p.parse_args()
    print(f"WAL frames per guarded mock call (strace; difference of {WARM} and {WARM + N} calls, / {N})")
    for case in args.cases.split(","):
        lo, hi = frames(args.build, case, WARM), frames(args.build, case, WARM + N)
        per = sorted(((hi[t] - lo[t]) / N, t) for t in hi | lo)[::-1]
        tables = ", ".join(f"{t} {v:.2f}" for v, t in per if abs(v) >= 0.05)
        print(f"  {case:<8} {sum(v for v, _ in per):6.2f}  {tables}")


if __name__ == "__main__":
    main()
