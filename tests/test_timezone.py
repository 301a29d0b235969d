"""The database keeps its timezone: processes that name another one are refused, processes
that name none (the CLI, the dashboard, scripts) use it, and `set_timezone` changes it for every
process and rebuilds the counters in it. Real processes share the database (SQLite file or,
with TENANTLLM_TEST_STORE=postgres, a PostgreSQL database)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import tenantllm as tl
from starlette.testclient import TestClient
from tenantllm import cli, dashboard

LIMIT = 3


class Ping(tl.Agent):
    model = "mock/ping"
    user = "{text}"
    max_tokens = 20


def other_zone() -> str:
    """A zone whose date differs from UTC's right now (UTC+14 from 10:00 UTC, else UTC-11), so
    counters keyed in one zone are not found under the other's day."""
    return "Pacific/Kiritimati" if datetime.now(UTC).hour >= 10 else "Pacific/Pago_Pago"


def database() -> str:
    """The configured database as a CLI or dashboard names it (a URL when on PostgreSQL)."""
    return tl.config.engine().database


def today(zone: str) -> str:
    return datetime.now(ZoneInfo(zone)).date().isoformat()


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


CALLER = """
    import sys, time
    import tenantllm as tl

    class Ping(tl.Agent):
        model = "mock/ping"
        user = "{{text}}"
        max_tokens = 20

    options = dict(database={db!r}, budgets={{"global_daily_executions": {limit}, "enforcement": "hard"}})
    zone = {zone!r}
    if zone:
        options["timezone"] = zone
    try:
        tl.configure(**options)
    except tl.ConfigurationError as e:
        print("refused:", e)
        sys.exit(3)
    time.sleep(max(0.0, {start} - time.time()))  # both processes call at about the same time
    admitted = 0
    for i in range(2 * {limit}):
        try:
            Ping.call(text=str(i))
            admitted += 1
        except tl.BudgetExceededError:
            pass
    print("admitted", admitted)
"""


def caller(db: Path, zone: str | None, start: float) -> subprocess.Popen[str]:
    code = textwrap.dedent(CALLER.format(db=str(db), limit=LIMIT, zone=zone, start=start))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_with_different_timezones_cannot_double_a_daily_limit(db_path: Path) -> None:
    # The fixture created the database without naming a zone: it keeps UTC.
    assert tl.config.engine().timezone == "UTC"
    zone = other_zone()
    start = datetime.now(UTC).timestamp() + 3
    procs = [caller(db_path, "UTC", start), caller(db_path, zone, start), caller(db_path, None, start)]
    outs = [p.communicate(timeout=90) for p in procs]
    (utc_out, _), (other_out, _), (unnamed_out, _) = outs

    assert procs[1].returncode == 3, outs[1]
    assert "refused:" in other_out and zone in other_out and "UTC" in other_out, other_out
    assert "tenantllm timezone set" in other_out
    admitted = [int(o.split()[-1]) for o in (utc_out, unnamed_out)]
    assert sum(admitted) == LIMIT, outs
    # Every admitted call is counted on UTC's day, nothing on the other zone's.
    usage = dict(tl.config.engine().usage_daily("global", 2))
    assert usage[today("UTC")]["executions"] == LIMIT
    assert today(zone) not in usage
    assert tl.Execution.successful().count() == LIMIT


def test_set_timezone_rebuilds_and_running_processes_follow(db_path: Path) -> None:
    tl.configure(budgets={"global_daily_executions": 4, "enforcement": "hard"})
    for i in range(2):
        Ping.call(text=str(i))
    zone = other_zone()

    # Another process changes the zone with the command line, while this one runs.
    p = subprocess.run([sys.executable, "-m", "tenantllm.cli", "timezone", "set", zone, "--database", database()],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert zone in p.stdout and "was UTC" in p.stdout, p.stdout

    # This process follows at its next call: the two calls moved to the new zone's day,
    # and the daily limit still counts them (2 more fit, not 4).
    admitted = 0
    for i in range(4):
        try:
            Ping.call(text=str(i))
            admitted += 1
        except tl.BudgetExceededError:
            pass
    assert admitted == 2
    assert tl.config.engine().timezone == zone
    usage = dict(tl.config.engine().usage_daily("global", 2))
    assert usage[today(zone)]["executions"] == 4
    assert today("UTC") not in usage
    assert tl.Execution.today().count() == 4 + 2  # two blocked rows

    # A process started later that still names UTC is refused and changes nothing.
    p = run_python(f"""
        import tenantllm as tl
        try:
            tl.configure(database={str(db_path)!r}, timezone="UTC")
        except tl.ConfigurationError as e:
            print("refused:", e)
    """)
    assert "refused:" in p.stdout and zone in p.stdout, (p.stdout, p.stderr)
    assert dict(tl.config.engine().usage_daily("global", 2))[today(zone)]["executions"] == 4


def test_rebuild_from_a_script_that_names_no_zone_keeps_the_database_zone(db_path: Path) -> None:
    zone = other_zone()
    tl.set_timezone(zone)
    t = tl.TenantBudget.create("acme", daily_limit=100)
    for i in range(3):
        Ping.call(text=str(i), tenant="acme")
    spent = t.current_daily_spending
    assert spent > 0

    p = run_python(f"""
        import tenantllm as tl
        tl.configure(database={str(db_path)!r})
        print(tl.config.engine().timezone, tl.rebuild_counters())
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == zone
    assert tl.TenantBudget.get("acme").current_daily_spending == spent
    assert dict(tl.config.engine().usage_daily("tenant:acme", 2))[today(zone)]["executions"] == 3


def test_set_timezone_there_and_back_restores_the_counters() -> None:
    tl.TenantBudget.create("acme", daily_limit=100)
    for i in range(3):
        Ping.call(text=str(i), tenant="acme")
    before = tl.config.engine().usage_daily("tenant:acme", 2)
    zone = other_zone()
    assert tl.set_timezone(zone) > 0
    moved = tl.config.engine().usage_daily("tenant:acme", 2)
    assert [d for d, _ in moved] == [today(zone)]
    assert [u for _, u in moved] == [u for _, u in before]
    tl.set_timezone("UTC")
    assert tl.config.engine().usage_daily("tenant:acme", 2) == before


def test_set_timezone_rejects_bad_zones_and_changes_nothing() -> None:
    Ping.call(text="x")
    for bad in ("Mars/Olympus", "", 42):
        with pytest.raises(tl.ConfigurationError, match="timezone"):
            tl.set_timezone(bad)  # type: ignore[arg-type]
    assert tl.config.engine().timezone == "UTC"
    assert dict(tl.config.engine().usage_daily("global", 1))[today("UTC")]["executions"] == 1


def test_a_process_that_named_the_old_zone_can_reconfigure_after_set_timezone(db_path: Path) -> None:
    tl.configure(reset=True, database=str(db_path), timezone="UTC")
    tl.set_timezone(other_zone())
    tl.configure(store_prompts=False)  # it no longer names UTC: it follows the database
    assert tl.config.engine().timezone == other_zone()


def test_cli_uses_the_database_zone(capsys: pytest.CaptureFixture[str]) -> None:
    zone = other_zone()
    tl.set_timezone(zone)
    tl.TenantBudget.create("acme", daily_limit=100)
    r = Ping.call(text="x", tenant="acme")
    assert cli.main(["timezone", "show", "--database", database()]) == 0
    assert capsys.readouterr().out.strip() == zone
    # Today's spend comes from the counters of the zone's day; on UTC's day there is none.
    assert cli.main(["budgets", "list", "--database", database()]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("acme"))
    assert f"${r.total_cost:.6f}" in row, out
    assert cli.main(["report", "--period", "today", "--database", database()]) == 0
    assert "acme" in capsys.readouterr().out


def test_dashboard_uses_the_database_zone() -> None:
    zone = other_zone()
    Ping.call(text="x", tenant="acme")
    tl.set_timezone(zone)
    with TestClient(dashboard.app(database=database())) as c:
        page = c.get("/?period=today").text
        assert zone in page
        assert date.fromisoformat(today(zone)).isoformat() in page
        assert f"{zone} calendar" in c.get("/tenants").text
