"""Reservation leases: renewed while a call or guarded block runs (so a live process never
loses its reservation), and run out within one lease when the process dies. The lease is
shortened through TENANTLLM_LEASE_SECONDS."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pg_everywhere
import pytest
import tenantllm as tl
from tenantllm.config import engine

LEASE = 2.0  # seconds; renewed every LEASE / 4


class Echo(tl.Agent):
    model = "mock/echo"
    user = "Echo {q}"
    max_tokens = 16


def sql(db_path: Path, query: str) -> list[tuple[str, ...]]:
    """Rows of a query on this test's database, SQLite file or PostgreSQL stand-in, as text."""
    if pg_everywhere.ACTIVE:
        out = subprocess.run(
            ["psql", "-X", "-q", "-tA", "-F", "\t", "-d", pg_everywhere.database_for(str(db_path)), "-c", query],
            capture_output=True, text=True, check=True,
        ).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]
    with sqlite3.connect(db_path) as c:
        return [tuple("" if v is None else str(v) for v in r) for r in c.execute(query).fetchall()]


@pytest.fixture
def short_lease(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TENANTLLM_LEASE_SECONDS", str(LEASE))
    tl.configure(database=str(db_path))
    return db_path


def counters(tenant: str) -> dict[str, object]:
    return dict(engine().tenant_usage(tenant)["daily"])


def assert_counters_match_rebuild(tenant: str) -> None:
    before = counters(tenant)
    tl.rebuild_counters()
    assert counters(tenant) == before


@pytest.mark.parametrize("lease", [None, "5", "0.5e1"])
def test_a_reservation_expires_one_lease_after_admission(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, lease: str | None
) -> None:
    if lease is not None:
        monkeypatch.setenv("TENANTLLM_LEASE_SECONDS", lease)
    tl.configure(database=str(db_path))
    tl.TenantBudget.create("acme", daily_limit=10, enforcement="hard")
    with tl.guarded(agent="Block", model="mock/echo", tenant="acme", timeout=3600) as g:
        [(started, expires)] = sql(
            db_path,
            f"SELECT e.started_at, r.expires_at FROM reservations r JOIN executions e ON e.id = r.execution_id "
            f"WHERE e.id = '{g.execution_id}'",
        )
        g.record(input_tokens=1, output_tokens=1)
    # The call's own length (here an hour) no longer enters: renewal covers it.
    assert int(expires) - int(started) == (120 if lease is None else 5) * 1_000_000


@pytest.mark.parametrize("bad", ["0", "3601", "soon", "nan", ""])
def test_a_bad_lease_setting_is_refused(db_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("TENANTLLM_LEASE_SECONDS", bad)
    with pytest.raises(tl.ConfigurationError, match="TENANTLLM_LEASE_SECONDS"):
        tl.configure(database=str(db_path))


@pytest.mark.parametrize("bad", [0, 0.5, 86401, float("nan"), "60", True, None])
def test_guarded_timeout_is_checked(bad: object) -> None:
    with pytest.raises(tl.ConfigurationError, match="timeout"):
        tl.guarded(agent="Block", model="mock/echo", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(tl.ConfigurationError, match="timeout"):
        tl.guard(agent="Block", model="mock/echo", timeout=bad)  # type: ignore[arg-type]


# A guarded block reserves its max_tokens; with this limit no call fits beside it. (A token
# limit, not an execution limit: a block whose lease ran out still counts as an execution.)
BLOCK_TOKENS = 1000
TOKEN_LIMIT = 1020


def test_a_guarded_block_longer_than_the_lease_keeps_its_reservation(short_lease: Path) -> None:
    tl.TenantBudget.create("acme", daily_token_limit=TOKEN_LIMIT, enforcement="hard")
    with tl.guarded(agent="Block", model="mock/echo", max_tokens=BLOCK_TOKENS, tenant="acme", timeout=60) as g:
        time.sleep(LEASE * 2.5)
        # The lease was renewed: the reservation still holds the tokens.
        with pytest.raises(tl.BudgetExceededError):
            Echo.call(q="too many", tenant="acme")
        g.record(input_tokens=5, output_tokens=5)
    [(status,)] = sql(short_lease, f"SELECT status FROM executions WHERE id = '{g.execution_id}'")
    assert status == "success"
    assert counters("acme")["executions"] == 1
    assert_counters_match_rebuild("acme")
    assert sql(short_lease, "SELECT COUNT(*) FROM reservations") == [("0",)]


def test_a_block_past_its_timeout_loses_its_reservation_and_is_counted_once(short_lease: Path) -> None:
    tl.TenantBudget.create("acme", daily_token_limit=TOKEN_LIMIT, enforcement="hard")
    with tl.guarded(agent="Block", model="mock/echo", max_tokens=BLOCK_TOKENS, tenant="acme", timeout=1) as g:
        time.sleep(1 + LEASE * 1.5)  # renewed for 1 s, then the lease ran out
        Echo.call(q="admitted", tenant="acme")  # its admission closes the block as abandoned
        row = sql(short_lease, f"SELECT status, error_class FROM executions WHERE id = '{g.execution_id}'")
        assert row == [("error", "Abandoned")]
        assert counters("acme")["executions"] == 2
        g.record(input_tokens=5, output_tokens=5)
    # The late settlement records what the block really used, without a third execution.
    [(status,)] = sql(short_lease, f"SELECT status FROM executions WHERE id = '{g.execution_id}'")
    assert status == "success"
    [(tokens,)] = sql(short_lease, "SELECT SUM(total_tokens) FROM executions WHERE tenant_id = 'acme'")
    assert counters("acme") == {"cost": counters("acme")["cost"], "tokens": int(tokens), "executions": 2}
    assert_counters_match_rebuild("acme")


SLOW_CALLER = textwrap.dedent(
    """
    import sys
    import tenantllm as tl

    tl.configure(database=sys.argv[1], mock={"latency_ms": 60_000})

    class Echo(tl.Agent):
        model = "mock/echo"
        user = "Echo {q}"
        max_tokens = 16

    print("calling", flush=True)
    Echo.call(q="never answered", tenant="acme")
    """
)


def test_a_killed_process_frees_its_reservation_when_the_lease_ends(short_lease: Path) -> None:
    # Each call reserves its prompt's bytes + 16 + max_tokens: the killed call's 51 tokens
    # leave no room for another (44 to 50), and once released every call fits.
    tl.TenantBudget.create("acme", daily_token_limit=60, enforcement="hard")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CALLER, str(short_lease)], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "calling\n"
        deadline = time.monotonic() + 30
        while not sql(short_lease, "SELECT execution_id FROM reservations"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(LEASE * 1.5)
        # Alive past its first lease: it still holds its tokens.
        with pytest.raises(tl.BudgetExceededError):
            Echo.call(q="blocked", tenant="acme")
    finally:
        proc.kill()
        proc.wait()
    killed_at = time.monotonic()
    with pytest.raises(tl.BudgetExceededError):
        Echo.call(q="still blocked", tenant="acme")
    while True:
        try:
            Echo.call(q="admitted", tenant="acme")
            break
        except tl.BudgetExceededError:
            assert time.monotonic() - killed_at < LEASE + 5, "the dead process's reservation never ran out"
            time.sleep(0.1)
    admitted = "SELECT status, error_class FROM executions WHERE tenant_id = 'acme' AND status IN ('error', 'success')"
    rows = sql(short_lease, admitted)
    assert sorted(rows) == [("error", "Abandoned"), ("success", "")]
    assert counters("acme")["executions"] == 2
    assert_counters_match_rebuild("acme")


GUARDED_CHILD = textwrap.dedent(
    """
    import sys
    import time
    import tenantllm as tl

    tl.configure(database=sys.argv[1])
    with tl.guarded(agent="Block", model="mock/echo", max_tokens=16, tenant="acme", timeout=3600) as g:
        print(g.execution_id, flush=True)
        time.sleep(600)
    """
)


@pytest.mark.parametrize(
    "budgeted",
    [True, False],
    ids=["budgeted", "unbudgeted"],
)
def test_a_killed_process_s_guarded_call_is_closed_when_its_lease_ends(short_lease: Path, budgeted: bool) -> None:
    """A worker killed inside a guarded block (OOM killer, SIGKILL) leaves a row that the first
    admission after its lease closes as abandoned, budget or none: renewed while the process
    lives, then one execution at no cost, and nothing left reserved."""
    if budgeted:
        tl.TenantBudget.create("acme", daily_limit=10, enforcement="hard")
    child = [sys.executable, "-c", GUARDED_CHILD, str(short_lease)]
    proc = subprocess.Popen(child, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        execution_id = proc.stdout.readline().strip()
        assert execution_id
        held = f"SELECT CASE counters WHEN '' THEN 0 ELSE 1 END FROM reservations WHERE execution_id = '{execution_id}'"
        assert sql(short_lease, held) == [(str(int(budgeted)),)]
        time.sleep(LEASE * 1.5)
        # Alive past its first lease: renewed, so an admission leaves it running.
        Echo.call(q="while it runs", tenant="acme")
        assert sql(short_lease, f"SELECT status FROM executions WHERE id = '{execution_id}'") == [("running",)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = time.monotonic()
    while sql(short_lease, f"SELECT status FROM executions WHERE id = '{execution_id}'") == [("running",)]:
        assert time.monotonic() - killed_at < LEASE + 5, "the killed process's call is running for ever"
        time.sleep(0.1)
        Echo.call(q="after", tenant="acme")  # each admission sweeps the leases that ran out
    row = sql(
        short_lease,
        "SELECT status, error_class, error_message, CASE WHEN completed_at >= started_at THEN 1 END, "
        f"total_tokens, total_cost, attempts_count FROM executions WHERE id = '{execution_id}'",
    )
    stopped = "the process running this call stopped before it finished"
    assert row == [("error", "Abandoned", stopped, "1", "0", "0", "0")]
    assert tl.Execution.by_status("running").count() == 0
    assert sql(short_lease, "SELECT COUNT(*) FROM reservations") == [("0",)]
    # The abandoned call counts as one execution that cost nothing, as a budgeted one always has.
    answered = tl.Execution.by_tenant("acme").successful()
    assert counters("acme") == {
        "cost": answered.sum("total_cost"),
        "tokens": answered.sum("total_tokens"),
        "executions": answered.count() + 1,
    }
    assert_counters_match_rebuild("acme")
