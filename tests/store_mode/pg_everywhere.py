"""Runs the test suite on PostgreSQL: with TENANTLLM_TEST_STORE=postgres and
TENANTLLM_TEST_POSTGRES_URL set, every SQLite path given to `tl.configure` becomes a PostgreSQL
database of its own (created on first use), in the test process and in the processes tests
start (through `sitecustomize`, which PYTHONPATH brings along).

Creating, migrating and dropping a database per test cost about a second each, most of the
suite's time on PostgreSQL. So a test's database, once the test is over, is emptied and kept
under a spare name; the next test renames a spare to its own name and finds it migrated and
empty, as a new one would be after `configure`. A database a test changed beyond its rows, or
that something still uses, is dropped instead."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

SERVER = os.environ.get("TENANTLLM_TEST_POSTGRES_URL", "")
ACTIVE = os.environ.get("TENANTLLM_TEST_STORE") == "postgres" and bool(SERVER)
# With PgBouncer in front of that server (transaction pooling; .ci/run starts one), the stores
# connect through it; databases are still created and dropped on the server itself.
STORES = os.environ.get("TENANTLLM_TEST_PGBOUNCER_URL") or SERVER
_created: set[str] = set()

_SCHEMA = Path(__file__).resolve().parents[2] / "src" / "store" / "pg_schema.rs"
_SCHEMA_TEXT = _SCHEMA.read_text() if _SCHEMA.exists() else ""
# The tables the migrations make (and the version the store keeps beside them): a spare with
# any other table was changed by its test.
_TABLES = set(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", _SCHEMA_TEXT)) | {"schema_version"}
# Spares are kept per schema, so builds with other migrations on the same server never share.
_SPARE = "tl_spare_" + hashlib.sha1(_SCHEMA_TEXT.encode()).hexdigest()[:10] + "_"
_admin: tuple[int, psycopg.Connection[Any]] | None = None


def _server() -> psycopg.Connection[Any]:
    """This process's connection to the server's maintenance database (a forked child opens its
    own: a connection cannot be shared across a fork; one left busy by a command that a test's
    timeout interrupted is replaced)."""
    import psycopg  # only on PostgreSQL runs: a SQLite-only machine need not have it

    global _admin
    idle = psycopg.pq.TransactionStatus.IDLE
    if _admin is None or _admin[0] != os.getpid() or _admin[1].closed or _admin[1].info.transaction_status != idle:
        _admin = (os.getpid(), psycopg.connect(SERVER, autocommit=True))
    return _admin[1]


def _url(name: str, base: str = SERVER) -> str:
    return base.rsplit("/", 1)[0] + "/" + name


def database_for(path: str) -> str:
    """The PostgreSQL URL standing in for the SQLite file `path`."""
    name = "tl_" + hashlib.sha1(path.encode()).hexdigest()[:20]
    if name not in _created:
        _created.add(name)
        server = _server()
        if server.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            _claim_or_create(server, name)
    return _url(name, STORES)


def _claim_or_create(server: psycopg.Connection[Any], name: str) -> None:
    import psycopg

    spares = server.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (_SPARE + "%",)).fetchall()
    for (spare,) in spares:
        try:  # another process may claim the same spare first, or create `name` itself
            server.execute(f'ALTER DATABASE "{spare}" RENAME TO "{name}"')
            return
        except psycopg.errors.DuplicateDatabase:
            return
        except psycopg.Error:
            continue
    try:
        server.execute(f'CREATE DATABASE "{name}"')
    except psycopg.errors.DuplicateDatabase:
        pass


def drop_created() -> None:
    """Empties the databases this process created and keeps them as spares, or drops them:
    each holds a few MB, and a whole run left hundreds behind, enough to fill a small disk."""
    server = _server()
    for name in sorted(_created):
        if not _recycle(server, name):
            server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _created.clear()


def _recycle(server: psycopg.Connection[Any], name: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(_url(name), autocommit=True) as db:
            tables = {r[0] for r in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            if "schema_version" not in tables or not tables <= _TABLES:
                return False
            with db.transaction():
                for table in sorted(tables - {"schema_version"}):
                    db.execute(f'DELETE FROM "{table}"')
        if STORES != SERVER:  # PgBouncer keeps its server connections to it: end them
            server.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        # Renaming needs the database unused: connections just closed (this one, the test's
        # pool) take a moment to end, and the server itself waits up to 5 s for them before
        # refusing; one still open after two tries belongs to an engine still alive (a test
        # that left a failing configuration) or a stray process: the caller drops it (FORCE).
        for _ in range(2):
            try:
                server.execute(f'ALTER DATABASE "{name}" RENAME TO "{_SPARE}{uuid.uuid4().hex[:12]}"')
                return True
            except psycopg.errors.ObjectInUse:
                time.sleep(0.02)
        return False
    except psycopg.Error:  # gone already: the caller's drop does nothing
        return False


def drop_spares() -> None:
    """At the end of the run: the spares are of no use to another build."""
    server = _server()
    for (spare,) in server.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (_SPARE + "%",)).fetchall():
        server.execute(f'DROP DATABASE IF EXISTS "{spare}" WITH (FORCE)')


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
