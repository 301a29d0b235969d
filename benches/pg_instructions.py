"""Instructions the PostgreSQL server runs per guarded call, counted by callgrind:
`make bench-pg-instructions` (or `python benches/pg_instructions.py [--python OTHER_PYTHON ...]`).

Like benches/instructions.py (whose cases and measured program this runs), but it counts the
server's side, which wall-clock figures on a loaded machine cannot compare: it starts a
private PostgreSQL 15 (initdb in a temporary directory, its own port, autovacuum and fsync
off) with the postmaster under `valgrind --tool=callgrind --trace-children=yes`, so each
backend it forks writes its own counts when it exits. Each build and case runs twice on a
fresh database of that server, with `WARM` calls and then `WARM + N`; the difference of the
two runs' client backends (those of the measured program's connections: not the server's
background processes, not psql's), divided by N, is one call's cost, so the migrations, the
connections' start-up and PL/pgSQL's first compilation of each function cancel out. With
`--functions K` it also prints the K server functions (C, by self cost) whose count per call
differs most from the first build's, with callgrind_annotate (Debian's server is stripped: its
static functions show as addresses, the same in every run of one server binary).

    .venv/bin/python benches/pg_instructions.py --python /work/base/.venv/bin/python
    .venv/bin/python benches/pg_instructions.py --cases budget,none,rate --query statement_cache_size=100

Needs valgrind and PostgreSQL 15's server binaries (`--bin`, default Debian's
/usr/lib/postgresql/15/bin); run as root, the server runs as the `postgres` user (initdb
refuses root). Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import instructions

WARM = 100
N = 200
PG_BIN = "/usr/lib/postgresql/15/bin"


def as_server_user(argv: list[str]) -> list[str]:
    """`argv` run as the `postgres` user when this runs as root (the server refuses root)."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def psql(url: str, sql: str) -> list[str]:
    out = subprocess.run(["psql", "-XAt", "-d", url, "-c", sql], check=True, capture_output=True, text=True)
    return out.stdout.split()


class Server:
    """A private PostgreSQL server whose postmaster runs under callgrind, each backend's
    counts written to `out_dir` as cg.PID when it exits."""

    def __init__(self, root: Path, bin_dir: str) -> None:
        self.data, self.out_dir, self.bin = root / "data", root / "callgrind", bin_dir
        self.out_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(self.out_dir, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        subprocess.run(
            as_server_user([f"{bin_dir}/initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                            "--locale=C.UTF-8", "-E", "UTF8"]),
            check=True, stdout=subprocess.DEVNULL,
        )
        settings = {"listen_addresses": "127.0.0.1", "port": self.port, "unix_socket_directories": str(root),
                    "autovacuum": "off", "fsync": "off", "max_connections": 40, "shared_buffers": "128MB"}
        self.postmaster = subprocess.Popen(
            as_server_user(["valgrind", "--tool=callgrind", "--trace-children=yes",
                            f"--callgrind-out-file={self.out_dir}/cg.%p", f"{bin_dir}/postgres", "-D", str(self.data),
                            *(a for k, v in settings.items() for a in ("-c", f"{k}={v}"))]),
            stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),
        )
        for _ in range(600):
            if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the server under callgrind did not start: see {root / 'server.log'}")

    def stop(self) -> None:
        subprocess.run(as_server_user([f"{self.bin}/pg_ctl", "-D", str(self.data), "stop", "-m", "immediate"]),
                       stdout=subprocess.DEVNULL, check=False)
        self.postmaster.wait()

    def backends(self, pids: list[int]) -> list[Path]:
        """The callgrind files of backends `pids`, once each has exited."""
        for pid in pids:
            for _ in range(1200):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"backend {pid} did not exit")
        return [self.out_dir / f"cg.{pid}" for pid in pids]


def run(server: Server, python: str, case: str, calls: int, query: str) -> list[Path]:
    """The callgrind files of the client backends of `calls` guarded calls in `case` by
    `python`'s build, on a new database (the store's URL options: `query`)."""
    name = f"tl_cg_{os.getpid()}_{time.time_ns()}"
    psql(server.url, f"CREATE DATABASE {name}")
    url = server.url.rsplit("/", 1)[0] + "/" + name
    out = subprocess.run([python, "-W", "ignore", __file__, "--child", case, str(calls), url, query],
                         check=True, capture_output=True, text=True)
    return server.backends([int(p) for p in out.stdout.split()])


def total(files: list[Path]) -> int:
    n = 0
    for f in files:
        m = re.search(r"^(?:summary|totals): (\d+)", f.read_text(), re.M)
        n += int(m.group(1)) if m else 0
    return n


def by_function(files: list[Path]) -> Counter[str]:
    """Self instructions by server function (callgrind_annotate's lines), over `files`."""
    counts: Counter[str] = Counter()
    line = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?)(?: \[[^]]*\])?$")
    for f in files:
        argv = ["callgrind_annotate", "--threshold=100", str(f)]
        body = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split("file:function", 1)[-1]
        for m in map(line.match, body.splitlines()):
            if m:
                counts[m.group(2)] += int(m.group(1).replace(",", ""))
    return counts


def print_functions(per_call: Counter[str], first: Counter[str], k: int) -> None:
    """The `k` functions whose instructions per call differ most from `first`'s (the first
    build's), or the `k` costliest when these are the first build's."""
    differs = per_call is not first
    names = sorted(set(per_call) | set(first), key=lambda f: -abs(per_call[f] - first[f] if differs else per_call[f]))
    for f in names[:k]:
        print(f"      {per_call[f]:>12,.0f} {per_call[f] - first[f]:>+10,.0f}  {f[:100]}")


def child(case: str, calls: int, url: str, query: str) -> None:
    """The measured program (not under valgrind): instructions.py's, on `url` (with the
    store's options `query`); prints the process ids of the server's backends serving it, so
    their counts can be told apart."""
    instructions.child(case, calls, f"{url}?{query}" if query else url)
    print(*psql(url, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--python", action="append", default=[], help="another build's python to measure too (repeatable)")
    p.add_argument("--cases", default="budget", help="comma-separated, as instructions.py's: budget, rate, none")
    p.add_argument("--query", default="", help="the store's URL options, e.g. statement_cache_size=100")
    p.add_argument("--warm", type=int, default=WARM)
    p.add_argument("--calls", type=int, default=N)
    p.add_argument("--functions", type=int, default=0, metavar="K", help="the K functions that differ most per call")
    p.add_argument("--bin", default=PG_BIN, help="PostgreSQL's server binaries")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        case, calls, url, query = args.child
        child(case, int(calls), url, query)
        return
    pythons = [sys.executable, *args.python]
    warm, n = args.warm, args.calls
    print("PostgreSQL server instructions per guarded call (callgrind, the client backends)")
    print(f"  the difference of {warm} and {warm + n} calls, / {n}; the store's URL options: {args.query or 'none'}")
    print(f"  {'python':<44} {'case':<8} {'per call':>12}")
    with tempfile.TemporaryDirectory(prefix="pg_instructions_") as tmp:
        server = Server(Path(tmp), args.bin)
        first: dict[str, Counter[str]] = {}
        try:
            for python in pythons:
                for case in args.cases.split(","):
                    lo, hi = (run(server, python, case, calls, args.query) for calls in (warm, warm + n))
                    print(f"  {python:<44} {case:<8} {(total(hi) - total(lo)) / n:>12,.0f}", flush=True)
                    if args.functions:
                        per_call = by_function(hi)
                        per_call.subtract(by_function(lo))
                        per_call = Counter({f: c / n for f, c in per_call.items()})
                        print_functions(per_call, first.setdefault(case, per_call), args.functions)
                    for f in lo + hi:
                        f.unlink()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
