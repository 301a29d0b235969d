"""What only the PostgreSQL store has: its encrypted column, an unreachable server, and lost
connections. (The whole suite also runs on PostgreSQL: `make test` with
TENANTLLM_TEST_POSTGRES_URL set, see tests/store_mode/pg_everywhere.py.)

Runs when TENANTLLM_TEST_POSTGRES_URL names a server (CI starts one); each test gets a new
database, created and dropped with psql."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import raw_sql
import tenantllm as tl
from fake_providers import FakeProvider, Step

SERVER_URL = os.environ.get("TENANTLLM_TEST_POSTGRES_URL", "")
if not SERVER_URL:
    pytest.skip("set TENANTLLM_TEST_POSTGRES_URL to run the PostgreSQL tests", allow_module_level=True)
# In the PostgreSQL pass, through PgBouncer when one is named (see tests/store_mode/pg_everywhere.py);
# the SQLite pass connects directly.
POOLER_URL = os.environ.get("TENANTLLM_TEST_PGBOUNCER_URL", "")
STORE_URL = POOLER_URL if POOLER_URL and os.environ.get("TENANTLLM_TEST_STORE") == "postgres" else SERVER_URL



def psql_exe() -> str:
    exe = shutil.which("psql")
    if exe is None:
        pytest.fail("psql is needed for the PostgreSQL tests (apt-get install postgresql-client)")
    return exe


def psql(url: str, sql: str) -> str:
    """Runs SQL with psql; returns the unaligned, tuples-only output."""
    done = subprocess.run(
        [psql_exe(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def scalar(url: str, sql: str) -> int:
    return int(psql(url, sql))


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture
def pg() -> Iterator[str]:
    """A new, empty database on the test server, configured; dropped afterwards."""
    name = f"tl_{uuid.uuid4().hex[:20]}"
    psql(SERVER_URL, f"CREATE DATABASE {name}")
    url = with_database(STORE_URL, name)
    tl.configure(database=url)
    try:
        yield url
    finally:
        tl.configure(database=":memory:")  # closes this process's connections
        psql(SERVER_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def reserved(url: str) -> int:
    """Everything still reserved, over all counters."""
    return scalar(
        url, "SELECT COALESCE(SUM(reserved_cost + reserved_tokens + reserved_executions), 0) FROM usage_counters"
    )


def wait_for(url: str, count_sql: str, what: str, deadline: float) -> None:
    """Polls `count_sql` until it counts something; fails naming `what` past `deadline`."""
    while scalar(url, count_sql) == 0:
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@contextmanager
def held_elsewhere(url: str, lock_sql: str) -> Iterator[None]:
    """Another session runs `lock_sql` in a transaction it keeps open; entered once it holds
    what that took, ended (the session killed) on exit."""
    holder = subprocess.Popen(
        [psql_exe(), "-X", "-q", "-d", url, "-c", f"BEGIN; {lock_sql}; SELECT pg_sleep(60); COMMIT;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PGAPPNAME": "tl-lock-holder"},
    )
    try:
        holding = "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'tl-lock-holder'"
        holding += " AND state = 'active' AND wait_event = 'PgSleep'"
        wait_for(url, holding, "the lock holder never got its lock", time.monotonic() + 20)
        yield
    finally:
        psql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'tl-lock-holder'")
        holder.wait(timeout=30)


class Capped(tl.Agent):
    model = "mock/capped"
    user = "Tell me about {topic}"
    max_tokens = 50


# ---------------------------------------------------------------- executions and queries


# ---------------------------------------------------------------- budgets


SECRET = "tenantllm-test-secret-4b1d9a77"
KEY = "sk-pg-tenant-key-9f2e71c4d0"


def test_api_configuration_is_encrypted_in_the_database(pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTLLM_SECRET_KEY", SECRET)
    with FakeProvider() as fp:
        fp.default = Step()
        tl.configure(database=pg, base_urls={"openai": fp.base_url + "/v1"})
        tl.ApiConfiguration.set_for_tenant("acme", openai=KEY)
        assert tl.ApiConfiguration.providers("acme") == ["openai"]

        class Keyed(tl.Agent):
            model = "gpt-4o"
            user = "{q}"

        Keyed.call(q="hi", tenant="acme")
        assert fp.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert psql(pg, "SELECT pg_typeof(ciphertext) FROM api_configurations") == "bytea"
    assert scalar(pg, f"SELECT position(convert_to('{KEY}', 'UTF8') IN ciphertext) FROM api_configurations") == 0
    assert KEY not in psql(pg, "SELECT encode(nonce || ciphertext, 'escape') FROM api_configurations")
    # A pg_dump older than the server refuses to run: take the server's own when installed.
    major = scalar(pg, "SHOW server_version_num") // 10000
    dump = next((p for p in glob.glob(f"/usr/lib/postgresql/{major}/bin/pg_dump")), shutil.which("pg_dump"))
    assert dump, "pg_dump is needed for this test (apt-get install postgresql-client)"
    out = subprocess.run([dump, "-d", pg], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "api_configurations" in out.stdout and KEY not in out.stdout


# ---------------------------------------------------------------- the server itself


def test_an_unreachable_server_is_a_clear_store_error() -> None:
    url = with_database(SERVER_URL, "postgres").replace(urlsplit(SERVER_URL).netloc, "nobody:pw@127.0.0.1:1")
    with pytest.raises(tl.StoreError, match="cannot connect") as info:
        tl.configure(database=url)
    assert "pw" not in str(info.value)


def test_a_lock_held_elsewhere_fails_the_call_clearly_and_changes_nothing(pg: str) -> None:
    # A transaction stuck in another session holds the counters; the URL sets a short
    # lock_timeout (the default is 30 s, like SQLite's busy timeout).
    tl.TenantBudget.create("locked", daily_limit=1)
    Capped.call(topic="before", tenant="locked")
    spent = tl.TenantBudget.get("locked").current_daily_spending
    with held_elsewhere(pg, "LOCK TABLE usage_counters"):
        tl.configure(database=pg + "?options=-c%20lock_timeout%3D500")
        started = time.monotonic()
        with pytest.raises(tl.StoreError, match="lock timeout"):
            Capped.call(topic="while locked", tenant="locked")
        assert time.monotonic() - started < 10
    assert tl.Execution.by_tenant("locked").count() == 1
    assert tl.TenantBudget.get("locked").current_daily_spending == spent
    assert reserved(pg) == 0
    raw_sql.assert_counters_match_rows(pg)


def test_a_settlement_locks_its_counters_in_key_order(pg: str) -> None:
    # Deadlock freedom rests on every transaction taking the counters it writes in one order,
    # sorted by (scope, period) bytewise. The settlement writes its counters in one INSERT ...
    # ON CONFLICT over the sorted keys (migration 20), which keeps that order only because the
    # server runs it row by row; and deadlocks are retried silently, so a wrong order would only
    # show as stalls. So: another session holds the middle counter, and while the settlement
    # waits for it, the counters before it must be locked by the settlement and those after free.
    tl.TenantBudget.create("order", daily_limit=100, monthly_limit=1000)
    Capped.call(topic="first", tenant="order")
    in_order = 'SELECT scope || \'|\' || period FROM usage_counters ORDER BY scope COLLATE "C", period COLLATE "C"'
    keys = [tuple(k.split("|")) for k in psql(pg, in_order).split()]
    assert len(keys) == 6, keys  # global, tenant and agent, each daily and monthly

    def where(key: tuple[str, ...]) -> str:
        return f"scope = '{key[0]}' AND period = '{key[1]}'"

    middle = len(keys) // 2
    admitted, settle = threading.Event(), threading.Event()

    def call() -> None:
        with tl.guarded(tenant="order", agent="Capped", model="mock/capped") as guard:
            guard.record(input_tokens=10, output_tokens=5)
            admitted.set()
            settle.wait(timeout=60)

    settling = threading.Thread(target=call)
    settling.start()
    assert admitted.wait(timeout=60)
    try:
        with held_elsewhere(pg, f"SELECT 1 FROM usage_counters WHERE {where(keys[middle])} FOR UPDATE"):
            settle.set()
            waiting = "SELECT COUNT(*) FROM pg_stat_activity"
            waiting += " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            wait_for(pg, waiting, "the settlement never waited for the held counter", time.monotonic() + 20)
            for i, key in enumerate(keys):
                if i == middle:
                    continue
                nowait = f"SELECT 1 FROM usage_counters WHERE {where(key)} FOR UPDATE NOWAIT"
                probe = subprocess.run(
                    [psql_exe(), "-X", "-q", "-d", pg, "-c", nowait],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                locked = "could not obtain lock" in probe.stderr
                assert locked == (i < middle), (key, probe.stderr)
    finally:
        settle.set()
        settling.join(timeout=60)
    assert tl.Execution.by_tenant("order").count() == 2
    assert reserved(pg) == 0
    raw_sql.assert_counters_match_rows(pg)


def _kill_connections(url: str) -> int:
    """Ends the server's other sessions on `url`'s database (on the server itself: through
    PgBouncer, they are its server connections)."""
    return scalar(
        with_database(SERVER_URL, urlsplit(url).path.lstrip("/")),
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )


def test_connections_lost_while_a_call_is_in_flight(pg: str) -> None:
    tl.configure(database=pg, mock={"latency_ms": 3000})
    tl.TenantBudget.create("conn", daily_limit=1)
    warm = Capped.call(topic="warm the pool", tenant="conn")
    assert reserved(pg) == 0
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(Capped.call(topic="in flight", tenant="conn"))
        except tl.StoreError as e:
            outcome.append(e)

    t = threading.Thread(target=call)
    t.start()
    # Admitted: its reservation is held while the provider answers (3 s). Watched for, not
    # waited for a fixed time: on a loaded machine the admission, and each look with psql,
    # can take most of a second.
    deadline = time.monotonic() + 10
    while (held := scalar(pg, "SELECT COUNT(*) FROM reservations")) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held == 1
    assert _kill_connections(pg) >= 1
    t.join(timeout=30)
    [result] = outcome
    # It completes (the finish runs again on a new connection) or fails clearly; either way
    # it left exactly one row, and the counters hold what the rows say: a call left `running`
    # holds its reservation (until its lease ends), a settled one holds none.
    assert isinstance(result, (tl.AgentResult, tl.StoreError)), result
    assert tl.Execution.by_tenant("conn").count() == 2
    raw_sql.assert_counters_match_rows(pg)
    if isinstance(result, tl.AgentResult):
        assert tl.Execution.get(result.execution_id).status == "success"
        assert reserved(pg) == 0
        assert tl.TenantBudget.get("conn").current_daily_spending == warm.total_cost + result.total_cost


def test_many_calls_survive_repeated_connection_kills(pg: str) -> None:
    tl.configure(database=pg, mock={"latency_ms": 30})
    tl.TenantBudget.create("storm", daily_limit=10)
    done: list[Any] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(n):
            try:
                r: Any = Capped.call(topic=f"s{i}", tenant="storm")
            except tl.StoreError as e:
                r = e
            with lock:
                done.append(r)

    threads = [threading.Thread(target=worker, args=(25,)) for _ in range(6)]
    for t in threads:
        t.start()
    killed = 0
    while any(t.is_alive() for t in threads):
        killed += _kill_connections(pg)
        time.sleep(0.05)
    assert killed > 0
    ok = [r for r in done if isinstance(r, tl.AgentResult)]
    errors = [r for r in done if isinstance(r, tl.StoreError)]
    assert len(ok) + len(errors) == 150
    assert len(ok) >= 100, errors[:3]
    # No row is doubled or lost for a call that completed; a success is counted once.
    assert tl.Execution.by_tenant("storm").successful().count() == len(ok)
    assert {r.execution_id for r in ok} <= {e.id for e in tl.Execution.by_tenant("storm").successful()}
    assert tl.TenantBudget.get("storm").current_daily_spending == sum((r.total_cost for r in ok), Decimal(0))
    # At most one row per call (an admission cut off before its commit leaves none), and
    # whatever the errors, nothing is leaked: only calls left `running` hold reservations.
    assert len(ok) <= tl.Execution.by_tenant("storm").count() <= 150
    raw_sql.assert_counters_match_rows(pg)
    if not errors:
        assert tl.Execution.by_status("running").count() == 0
        assert reserved(pg) == 0


# ---------------------------------------------------------------- the command line


def test_cli_report_and_budgets_on_postgresql(pg: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tenantllm.cli import main

    assert main(["demo", "--database", pg, "--calls", "6"]) == 0
    capsys.readouterr()
    spend = tl.Execution.this_month().group_by("tenant_id").sum("total_cost")
    calls = tl.Execution.this_month().group_by("tenant_id").count()

    # A real process, as a user runs it: one line per tenant with its calls from the server.
    p = subprocess.run([sys.executable, "-m", "tenantllm.cli", "report", "--database", pg],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["tenant_id", "calls", "tokens", "cost"]
    per_tenant = {line.split()[0]: int(line.split()[1]) for line in lines[2:]}
    assert per_tenant == calls == {"acme": 6, "globex": 6, "initech": 6}
    assert main(["report", "--database", pg, "--by", "agent", "--period", "today"]) == 0
    out = capsys.readouterr().out
    assert "SupportAgent" in out and "SummaryAgent" in out

    assert main(["budgets", "set", "newco", "--database", pg, "--daily-limit", "98765432.123456789",
                 "--monthly-token-limit", "5_000_000", "--name", "New Co"]) == 0
    assert capsys.readouterr().out.startswith("Created")
    assert main(["budgets", "set", "acme", "--database", pg, "--daily-limit", "none"]) == 0
    assert capsys.readouterr().out.startswith("Updated")
    assert main(["budgets", "delete", "globex", "--database", pg]) == 0
    assert main(["budgets", "list", "--database", pg]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert set(rows) >= {"acme", "initech", "newco"} and "globex" not in rows
    assert "New Co" in rows["newco"] and "5,000,000" in rows["newco"]
    assert f"{spend['acme']:.6f}" in rows["acme"]  # today's spend, read from the server's counters
    b = tl.TenantBudget.get("newco")
    assert (b.daily_limit, b.monthly_token_limit) == (Decimal("98765432.123456789"), 5_000_000)
    assert tl.TenantBudget.get("acme").daily_limit is None and tl.TenantBudget.find("globex") is None
    assert main(["budgets", "delete", "globex", "--database", pg]) == 1


def test_cli_on_a_missing_postgresql_database_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from tenantllm.cli import main

    url = with_database(SERVER_URL, f"tl_missing_{uuid.uuid4().hex[:12]}")
    for command in (["report"], ["budgets", "list"]):
        assert main([*command, "--database", url]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("tenantllm: cannot use") and "Traceback" not in err


def test_a_foreign_postgresql_database_is_one_line() -> None:
    """Another application's database with an `executions` table: refused in one line, as a
    foreign SQLite file is, and left as it was."""
    name = f"tl_foreign_{uuid.uuid4().hex[:12]}"
    psql(SERVER_URL, f"CREATE DATABASE {name}")
    url = with_database(STORE_URL, name)
    try:
        psql(url, "CREATE TABLE executions (id BIGSERIAL PRIMARY KEY, command TEXT); CREATE TABLE jobs (id INT)")
        with pytest.raises(tl.StoreError, match="not a tenantllm database") as e:
            tl.configure(database=url)
        assert "\n" not in str(e.value) and "CREATE" not in str(e.value) and len(str(e.value)) < 300
        tables = "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'"
        assert psql(url, tables) == "executions,jobs"
    finally:
        tl.configure(database=":memory:")
        psql(SERVER_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
