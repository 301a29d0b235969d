"""What the benchmarks that build a large SQLite database once share (benches/dashboard.py,
benches/rollups.py): where the database is kept, and opening a fresh one for a bulk load."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

import tenantllm as tl


def bench_dir() -> Path:
    """$TENANTLLM_BENCH_DIR, default <temp dir>/tenantllm-bench: databases built once live here."""
    d = Path(os.environ.get("TENANTLLM_BENCH_DIR") or Path(tempfile.gettempdir()) / "tenantllm-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def open_for_load(db: Path, **config: str) -> tuple[Path, sqlite3.Connection, list[str]]:
    """Creates the schema through tenantllm (`configure(**config)`) in `db`'s temporary name
    ("<db>.building", renamed once complete, so an interrupted build is never reused), and
    opens it for a bulk load: no journal, no syncs, a 1 GB cache, and the executions table's
    indexes dropped. Returns the temporary path, the connection (autocommit) and the indexes'
    SQL to run after the load: one sort each instead of millions of random inserts."""
    tmp = db.with_suffix(".building")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    tl.configure(reset=True, database=str(tmp), **config)
    tl.Execution.all().count()  # opens the database: migrations run
    tl.configure(reset=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'executions' AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    return tmp, conn, [sql for _, sql in indexes]


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes), printed with every figure: on a shared
    machine the same code measures slower when others are busy."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())
