"""Runs the test suite on PostgreSQL: with TENANTLLM_TEST_STORE=postgres and
TENANTLLM_TEST_POSTGRES_URL set, every SQLite path given to `tl.configure` becomes a PostgreSQL
database of its own (created on first use), in the test process and in the processes tests
start (through `sitecustomize`, which PYTHONPATH brings along)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from typing import Any

SERVER = os.environ.get("TENANTLLM_TEST_POSTGRES_URL", "")
ACTIVE = os.environ.get("TENANTLLM_TEST_STORE") == "postgres" and bool(SERVER)
_created: set[str] = set()


def database_for(path: str) -> str:
    """The PostgreSQL URL standing in for the SQLite file `path`."""
    name = "tl_" + hashlib.sha1(path.encode()).hexdigest()[:20]
    if name not in _created:
        # CREATE DATABASE fails harmlessly when another process created it first.
        subprocess.run(["psql", "-X", "-q", "-d", SERVER, "-c", f"CREATE DATABASE {name}"], capture_output=True)
        _created.add(name)
    return SERVER.rsplit("/", 1)[0] + "/" + name


def drop_created() -> None:
    """Drops the databases this process created: each holds a few MB, and a whole run left
    hundreds behind, enough to fill a small disk."""
    if _created:
        script = "".join(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);\n" for name in sorted(_created))
        subprocess.run(["psql", "-X", "-q", "-d", SERVER], input=script, text=True, capture_output=True)
        _created.clear()


def install() -> None:
    import tenantllm as tl
    import tenantllm.config as config

    original = config.configure

    def configure(**options: Any) -> None:
        db = options.get("database")
        if db is None and (options.get("reset") or config._settings is None):
            db = os.environ.get("TENANTLLM_DATABASE")  # where configure() itself looks then
        if db and db != ":memory:" and not str(db).startswith(("postgres://", "postgresql://")):
            options["database"] = database_for(str(db))
        original(**options)

    config.configure = configure
    tl.configure = configure
