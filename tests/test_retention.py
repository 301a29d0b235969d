"""Retention: `tl.purge()`, `tenantllm purge` and `configure(retention=...)`. Rows are made by
real calls, then aged by moving their time-ordered ids and start times back (what a clock
running for months would have written); counters and budgets must not move."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import raw_sql
import tenantllm as tl
from tenantllm.cli import main

DAY_MS = 86_400_000


class Support(tl.Agent):
    model = "mock/support"
    system = "You help {company}."
    user = "Question: {q}"

    def execution_metadata(self) -> dict[str, Any]:
        return {"plan": "pro"}


def aged_id(execution_id: str, days: float) -> str:
    """The UUIDv7 `execution_id` would have had `days` earlier: its 48-bit millisecond prefix moved."""
    hexdigits = execution_id.replace("-", "")
    ms = int(hexdigits[:12], 16) - round(days * DAY_MS)
    moved = f"{ms:012x}" + hexdigits[12:]
    return f"{moved[:8]}-{moved[8:12]}-{moved[12:16]}-{moved[16:20]}-{moved[20:]}"


def age(db: Path, ids: list[str], days: float) -> list[str]:
    """Moves these executions (and their details) `days` into the past; returns their new ids."""
    return [n for at in range(0, len(ids), 200) for n in _age(db, ids[at : at + 200], days)]


def move_to(db: Path, ids: list[str], when: datetime) -> list[str]:
    """Moves each of these executions to start at `when` (to the millisecond)."""
    started_ms = [int(i.replace("-", "")[:12], 16) for i in ids]
    return [age(db, [i], (ms - when.timestamp() * 1000) / DAY_MS)[0] for i, ms in zip(ids, started_ms, strict=True)]


def _age(db: Path, ids: list[str], days: float) -> list[str]:
    new = [aged_id(i, days) for i in ids]
    cases = " ".join(f"WHEN '{old}' THEN '{n}'" for old, n in zip(ids, new, strict=True))
    listed = ", ".join(f"'{i}'" for i in ids)
    raw_sql.query(db, f"UPDATE executions SET id = CASE id {cases} END, "
                      f"started_at = started_at - {round(days * DAY_MS) * 1000} WHERE id IN ({listed})")
    raw_sql.query(db, f"UPDATE execution_details SET execution_id = CASE execution_id {cases} END "
                      f"WHERE execution_id IN ({listed})")
    return new


def calls(n: int, tenant: str = "acme") -> list[str]:
    return [Support.call(q=f"question {i}", company="Acme", tenant=tenant).execution_id for i in range(n)]


def blocked_call() -> str:
    tl.TenantBudget.create("broke", daily_limit="0.0000001")
    with pytest.raises(tl.BudgetExceededError) as e:
        Support.call(q="spend", company="Acme", tenant="broke")
    return e.value.execution_id


def spend() -> dict[str, Any]:
    b = tl.TenantBudget.find("acme")
    return {"usage": tl.config.engine().tenant_usage("acme"), "budget": None if b is None else b.daily_limit}


def test_purge_clears_details_then_deletes_rows_and_leaves_counters(db_path: Path) -> None:
    tl.TenantBudget.create("acme", daily_limit="5.00")
    ids = [*calls(4), blocked_call()]
    ancient = age(db_path, ids[:2], 500)
    old = age(db_path, ids[2:], 40)  # two successes and the blocked call, with its error message
    fresh = calls(2)
    counters, before = raw_sql.counters(db_path), spend()
    assert tl.Execution.get(old[-1]).error_message

    plan = tl.purge(details_days=30, executions_days=400, dry_run=True)
    assert (plan["details"], plan["executions"], plan["dry_run"]) == (3, 2, True)
    assert len(list(tl.Execution.all())) == 7 and tl.Execution.get(ancient[0]).user_prompt  # nothing changed

    done = tl.purge(details_days=30, executions_days=400)
    assert (done["details"], done["executions"]) == (3, 2)
    assert sorted(e.id for e in tl.Execution.all()) == sorted(old + fresh)
    for i in old:
        e = tl.Execution.get(i)
        assert (e.system_prompt, e.user_prompt, e.response, e.error_message, e.metadata) == (None, None, None, None, {})
        assert e.status in ("success", "blocked") and e.agent == "Support"  # the row itself stays
    assert tl.Execution.get(old[0]).total_tokens > 0
    for i in fresh:
        e = tl.Execution.get(i)
        assert e.user_prompt and e.response and e.metadata == {"plan": "pro"}
    assert raw_sql.counters(db_path) == counters
    assert spend() == before
    again = tl.purge(details_days=30, executions_days=400)
    assert (again["details"], again["executions"]) == (0, 0)


@pytest.mark.sqlite_only
def test_purged_prompts_and_responses_are_gone_from_the_database_file(db_path: Path) -> None:
    marker = "purge-me-5b1e"
    ids = [Support.call(q=f"{marker} {i}", company="Acme").execution_id for i in range(20)]
    cleared = age(db_path, ids[:10], 40)
    age(db_path, ids[10:], 500)  # to be deleted
    kept = Support.call(q="kept-7c2d", company="Acme").execution_id
    done = tl.purge(details_days=30, executions_days=400)
    assert (done["details"], done["executions"]) == (10, 10)
    assert tl.Execution.get(kept).user_prompt and tl.Execution.get(cleared[0]).user_prompt is None
    assert sorted(e.id for e in tl.Execution.all()) == sorted([*cleared, kept])
    # Every page back in the file, and the WAL emptied (retried while the checkpointer runs).
    while raw_sql.query(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")[0][0] != "0":
        time.sleep(0.05)
    data = db_path.read_bytes()
    assert b"kept-7c2d" in data
    assert marker.encode() not in data


def test_totals_of_past_days_and_months_are_unchanged_by_a_purge(db_path: Path) -> None:
    """Rows aged into past days and months (rollups rebuilt from them, as if written then):
    grouped totals over whole days read the rollups, which a purge leaves alone."""
    ids = calls(3) + calls(2, tenant="beta")
    age(db_path, ids[:2], 500)
    age(db_path, ids[2:4], 45)
    tl.rebuild_counters()
    totals = [
        lambda: tl.Execution.all().group_by("tenant_id").sum("total_cost"),
        lambda: tl.Execution.all().group_by("day", "tenant_id").sum("total_tokens"),
        lambda: tl.Execution.all().group_by("month").sum("total_cost"),
        lambda: tl.Execution.all().group_by("month", "agent", "status").count(),
        lambda: tl.Execution.last_n_days(60).group_by("day").count(),
    ]
    before = [f() for f in totals]
    assert len(before[2]) >= 2 and sum(before[3].values()) == 5  # past months are in the rollups

    done = tl.purge(details_days=30, executions_days=400)
    assert (done["details"], done["executions"]) == (2, 2)
    assert len(list(tl.Execution.all())) == 3
    assert [f() for f in totals] == before


def test_the_dashboards_figures_of_purged_days_are_unchanged(db_path: Path) -> None:
    """The overview's last month and a tenant's page read rollups and counters: rows of those
    days purged, their figures, charts and spend bars stay what they were."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient
    from tenantllm import dashboard

    today = datetime.now(UTC).date()
    back = today.day + 3  # a few days into last month, within a tenant page's 30 days
    age(db_path, calls(3) + calls(2, tenant="beta"), back)
    tl.rebuild_counters()

    def figures() -> list[str]:
        with TestClient(dashboard.app()) as c:
            overview, tenant = c.get("/?period=last_month").text, c.get("/tenants/acme").text
        stats = [re.search(rf'id="stat-{n}">.*?<div class="value">([^<]*)</div>', overview, re.S) for n in
                 ("spend", "tokens", "calls")]
        cards = [re.search(rf'id="{n}">(.*?)</div>', page, re.S) for n, page in
                 (("cost-chart", overview), ("spend-by-tenant", overview), ("spend-by-agent", overview),
                  ("by-agent", tenant), ("by-model", tenant))]
        found = [m.group(1) for m in stats + cards if m is not None]
        assert len(found) == len(stats) + len(cards)
        return found

    before = figures()
    assert before[2] == "5" and ">beta<" in before[4] and before[3].count('<rect class="bar"') > 0
    assert ">Support<" in before[6] and "mock/support" in before[7]
    assert tl.purge(executions_days=back - 1)["executions"] == 5
    assert len(list(tl.Execution.all())) == 0
    assert figures() == before


def test_rebuild_counters_after_a_purge_keeps_totals_budgets_and_counters(db_path: Path) -> None:
    """Issue 19: a purge deletes whole days (its cutoff moves back to the start of its day), and
    `rebuild_counters()` afterwards keeps what only the rollups still know: whole-day totals,
    daily totals, today's and this month's counters, and a hard monthly limit still refusing.
    (The days deleted are in this month from the 3rd on.)"""
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=1)
    yesterday = datetime.combine(cutoff.date(), datetime.min.time(), UTC)
    two_days_ago = yesterday - timedelta(hours=12)
    acme = calls(12)
    move_to(db_path, acme[:4], two_days_ago)  # a whole day that goes
    move_to(db_path, acme[4:8], yesterday + (cutoff - yesterday) / 2)  # before the cutoff, in its day
    move_to(db_path, acme[8:], cutoff + (yesterday + timedelta(days=1) - cutoff) / 2)  # after it
    calls(3, tenant="beta")  # today
    tl.rebuild_counters()  # the rollups of the rows as moved
    monthly = tl.spend_by_tenant("monthly")["acme"]["cost"]
    tl.TenantBudget.create("acme", monthly_limit=monthly, enforcement="hard")
    whole_days = [
        lambda: tl.Execution.between(two_days_ago.date(), now.date() + timedelta(days=1)).group_by("tenant_id").count(),
        lambda: tl.Execution.all().group_by("day", "tenant_id").sum("total_cost"),
        lambda: tl.Execution.all().group_by("day", "agent").sum("total_tokens"),  # daily_totals
        lambda: tl.spend_by_tenant("monthly"),
        lambda: tl.spend_by_tenant("daily"),
    ]
    before, counters = [f() for f in whole_days], raw_sql.counters(db_path)
    assert before[0] == {"acme": 12, "beta": 3}

    plan = tl.purge(executions_days=1, dry_run=True)
    assert (plan["executions"], plan["executions_before"]) == (4, yesterday)
    done = tl.purge(executions_days=1)
    assert (done["executions"], done["executions_before"]) == (4, yesterday)
    assert len(list(tl.Execution.all())) == 11  # yesterday's rows all stay
    for rebuilt in (False, True, True):
        if rebuilt:
            assert tl.rebuild_counters() > 0
        assert [f() for f in whole_days] == before
        assert raw_sql.counters(db_path) == counters
        tl.purge(executions_days=400)  # a longer retention deletes nothing and moves nothing back
    with pytest.raises(tl.BudgetExceededError) as e:
        Support.call(q="more", company="Acme", tenant="acme")
    assert e.value.scope == "tenant_monthly"
    # Rows deleted by hand, with no purge behind them, come out of the counters.
    raw_sql.query(db_path, "DELETE FROM executions WHERE tenant_id = 'beta' AND status = 'success'")
    tl.rebuild_counters()
    assert "beta" not in tl.spend_by_tenant("daily")


def test_error_messages_in_attempts_are_cleared_too(db_path: Path) -> None:
    tl.configure(mock={"failure_rate": 1.0})
    with pytest.raises(tl.ProviderError):
        Support.call(q="fail", company="Acme")
    [row] = tl.Execution.all()
    [aged] = age(db_path, [row.id], 31)
    assert tl.Execution.get(aged).attempts[0]["error_message"]

    tl.purge(details_days=30)

    e = tl.Execution.get(aged)
    assert e.error_message is None
    assert [a.get("error_message") for a in e.attempts] == [None]
    assert e.attempts[0]["model"] == "mock/support" and e.attempts[0]["error_class"]


def test_many_batches_while_calls_go_on(db_path: Path) -> None:
    ids = calls(1200)
    aged = age(db_path, ids, 500)
    counters = raw_sql.counters(db_path)
    made: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            made.extend(calls(1, tenant="busy"))

    t = threading.Thread(target=caller)
    t.start()
    try:
        done = tl.purge(executions_days=400)
    finally:
        stop.set()
        t.join()
    assert done["executions"] == 1200
    assert len(list(tl.Execution.all())) == len(made)
    assert not set(aged) & {e.id for e in tl.Execution.all()}
    assert made  # calls went on during the purge
    acme = {k: v for k, v in raw_sql.counters(db_path).items() if k[0] == "tenant:acme"}
    assert acme and acme == {k: v for k, v in counters.items() if k[0] == "tenant:acme"}


def test_configured_retention_runs_in_the_background(db_path: Path) -> None:
    aged = age(db_path, calls(3), 500)
    counters = raw_sql.counters(db_path)

    tl.configure(retention={"details_days": 30, "executions_days": 400})
    Support.call(q="now", company="Acme", tenant="other")  # the engine is up (its thread with it)

    deadline = time.monotonic() + 20
    while len(list(tl.Execution.all())) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e.id for e in tl.Execution.all() if e.id in aged] == []
    assert len(list(tl.Execution.all())) == 1
    acme = {k: v for k, v in raw_sql.counters(db_path).items() if k[0] == "tenant:acme"}
    assert acme and acme == {k: v for k, v in counters.items() if k[0] == "tenant:acme"}
    assert tl.purge(dry_run=True)["executions"] == 0  # the configured retention, as purge's default


@pytest.mark.parametrize(
    ("retention", "message"),
    [
        ({"details_days": 0}, "details_days.*from 1 to 36500.*got 0"),
        ({"executions_days": 36501}, "executions_days"),
        ({"executions_days": 10**30}, "executions_days"),
        ({"details_days": "30"}, "details_days.*whole number.*str"),
        ({"details_days": True}, "details_days.*bool"),
        ({"details_days": 1.5}, "details_days.*float"),
        ({"detail_days": 30}, "unknown key .detail_days."),
        ([30], "retention must be a dict"),
    ],
)
def test_bad_retention_is_refused_by_name_and_changes_nothing(retention: Any, message: str) -> None:
    before = tl.config.settings()
    with pytest.raises(tl.ConfigurationError, match=message):
        tl.configure(retention=retention)
    assert tl.config.settings() is before


def test_bad_purge_arguments_are_refused_by_name() -> None:
    with pytest.raises(tl.ConfigurationError, match=r"details_days.*got 0"):
        tl.purge(details_days=0)
    with pytest.raises(tl.ConfigurationError, match=r"executions_days.*str"):
        tl.purge(executions_days="400")  # type: ignore[arg-type]


def test_purge_needs_a_retention() -> None:
    with pytest.raises(tl.ConfigurationError, match="no retention"):
        tl.purge()
    with pytest.raises(tl.ConfigurationError, match="dry_run"):
        tl.purge(details_days=3, dry_run="yes")  # type: ignore[arg-type]


@pytest.mark.sqlite_only  # the CLI checks the database file exists (PostgreSQL: tl.purge above)
def test_cli_dry_run_prints_what_would_go_and_changes_nothing(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    age(db_path, calls(2), 500)
    calls(1)
    assert main(["purge", "--database", str(db_path), "--details-days", "30", "--executions-days", "400",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Would delete 2 executions started before" in out
    assert "Would clear the prompts, responses, metadata and error messages of 0 executions" in out
    assert len(list(tl.Execution.all())) == 3

    assert main(["purge", "--database", str(db_path), "--executions-days", "400"]) == 0
    assert "Did delete 2 executions" in capsys.readouterr().out
    assert len(list(tl.Execution.all())) == 1
    assert main(["purge", "--database", str(db_path)]) == 2


@pytest.mark.sqlite_only
def test_a_process_exits_cleanly_mid_purge_and_forked_children_work(db_path: Path) -> None:
    age(db_path, calls(1500), 500)
    script = textwrap.dedent(f"""
        import os, tenantllm as tl
        class Support(tl.Agent):
            model = "mock/support"
            system = "You help {{company}}."
            user = "Question: {{q}}"
        tl.configure(database={str(db_path)!r}, retention={{"executions_days": 400}})
        Support.call(q="parent", company="Acme")  # starts the background purge
        pid = os.fork()
        if pid == 0:
            # The child has no purge thread of the parent's; its own engine works (and purges).
            Support.call(q="child", company="Acme")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(status)
        # Exits with the purge under way: the batch in flight commits, none starts after.
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "0"
    assert raw_sql.query(db_path, "PRAGMA integrity_check") == [("ok",)]
    rows = raw_sql.query(db_path, "SELECT user_prompt FROM executions JOIN execution_details ON id = execution_id "
                                  "WHERE user_prompt IN ('Question: parent', 'Question: child')")
    assert sorted(r[0] or "" for r in rows) == ["Question: child", "Question: parent"]
    # Whatever the exit cut short, a later purge finishes.
    tl.purge(executions_days=400)
    assert len(list(tl.Execution.all())) == 2
    assert tl.purge(executions_days=400, dry_run=True)["executions"] == 0
