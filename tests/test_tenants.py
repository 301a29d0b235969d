"""The register of tenants seen (DESIGN §1b, issue 16): every tenant a call ran for, budget or
not, with the name the app gave it and its first and last use; `tl.tenants()` and
`tenantllm tenants list`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from tenantllm.cli import main


class Echo(tl.Agent):
    model = "mock/echo"
    user = "{q}"
    max_tokens = 10


@tl.llm_tenant(id="slug", name="title")
@dataclass
class Org:
    slug: str
    title: str


def by_id() -> dict[str, tl.SeenTenant]:
    return {t.id: t for t in tl.tenants()}


def test_every_tenant_a_call_ran_for_is_remembered_with_its_name() -> None:
    before = datetime.now(UTC)
    Echo.call(q="hi", tenant=Org("acme", "Acme Inc."))
    Echo.call(q="hi", tenant={"id": "globex", "name": "Globex"})
    Echo.call(q="hi", tenant=42)
    with tl.guarded(agent="Raw", model="mock/echo", tenant="initech") as g:
        g.record(input_tokens=3, output_tokens=2)
    # A refused call was still a call the tenant made.
    tl.TenantBudget.create("poor", daily_execution_limit=0)
    with pytest.raises(tl.BudgetExceededError):
        Echo.call(q="hi", tenant={"id": "poor", "name": "Poor Co"})
    Echo.call(q="hi")  # no tenant: nothing to remember
    seen = by_id()
    assert {t: s.name for t, s in seen.items()} == {
        "acme": "Acme Inc.", "globex": "Globex", "42": None, "initech": None, "poor": "Poor Co",
    }
    for t in seen.values():
        assert before <= t.first_used_at <= t.last_used_at <= datetime.now(UTC)
        assert t.first_used_at.tzinfo is not None
    # Later calls keep the first use and a name a call without one does not know; a new name wins.
    first = seen["acme"].first_used_at
    Echo.call(q="hi", tenant="acme")
    assert by_id()["acme"] == seen["acme"]
    Echo.call(q="hi", tenant=Org("acme", "Acme Corporation"))
    assert by_id()["acme"].name == "Acme Corporation" and by_id()["acme"].first_used_at == first


def test_a_bad_name_is_refused_by_name_and_nothing_is_written() -> None:
    with pytest.raises(tl.InvalidTenantError, match="tenant name"):
        Echo.call(q="hi", tenant={"id": "x", "name": "two\nlines"})
    with pytest.raises(tl.InvalidTenantError, match="tenant name"):
        Echo.call(q="hi", tenant={"id": "x", "name": "n" * 256})
    with pytest.raises(tl.InvalidTenantError, match="name must be a string"):
        Echo.call(q="hi", tenant={"id": "x", "name": 5})
    assert tl.tenants() == [] and tl.Execution.all().count() == 0


def test_threads_remember_each_tenant_once() -> None:
    def run(worker: int) -> None:
        for i in range(20):
            Echo.call(q="hi", tenant={"id": f"t{i}", "name": f"Tenant {i}"})

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(t.id, t.name) for t in tl.tenants()] == sorted((f"t{i}", f"Tenant {i}") for i in range(20))


CALL = """
import sys
import tenantllm as tl
class Echo(tl.Agent):
    model = "mock/echo"
    user = "{q}"
tl.configure(database=sys.argv[1])
Echo.call(q="hi", tenant=sys.argv[2])
"""


def test_other_processes_keep_the_first_use_and_move_the_last(db_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    Echo.call(q="hi", tenant={"id": "acme", "name": "Acme"})
    first = by_id()["acme"]
    subprocess.run([sys.executable, "-c", CALL, str(db_path), "acme"], check=True, env=env, timeout=120)
    later = by_id()["acme"]
    assert later.first_used_at == first.first_used_at and later.last_used_at > first.last_used_at
    assert later.name == "Acme"  # the other process gave no name


@pytest.mark.sqlite_only  # the CLI is given the database file (as in test_cli.py)
def test_cli_lists_tenants_seen_and_tenants_with_a_budget(db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenants", "list", "--database", str(db_path)]) == 0
    assert "No tenants" in capsys.readouterr().out
    Echo.call(q="hi", tenant=Org("acme", "Acme Inc."))
    tl.TenantBudget.create("planned", name="Planned Ltd", daily_limit=5)
    assert main(["tenants", "list", "--database", str(db_path)]) == 0
    out = capsys.readouterr().out
    acme = next(line for line in out.splitlines() if line.startswith("acme "))
    planned = next(line for line in out.splitlines() if line.startswith("planned "))
    assert "Acme Inc." in acme and acme.split()[-2] == "no" and datetime.now(UTC).strftime("%Y-%m-%d") in acme
    assert "Planned Ltd" in planned and planned.split()[-2] == "yes" and planned.count(" - ") >= 1
    assert "database's timezone (UTC)" in out


def test_the_dashboard_lists_tenants_seen_without_a_budget_or_usage(configure: Any) -> None:
    from starlette.testclient import TestClient
    from tenantllm import dashboard
    from tenantllm.dashboard import data

    configure(budgets={"per_agent_daily": {"Echo": "0.000000001"}})
    with pytest.raises(tl.BudgetExceededError):
        Echo.call(q="hi", tenant={"id": "ghost", "name": "Ghost Ltd"})
    [row] = data.tenants(tl.config.engine(), None, data.TenantQuery()).rows
    assert (row.tenant_id, row.name, row.has_budget) == ("ghost", "Ghost Ltd", False)
    assert row.last_used_at == tl.tenants()[0].last_used_at
    with TestClient(dashboard.app()) as c:
        html = c.get("/tenants").text
        assert 'data-tenant="ghost"' in html and "Ghost Ltd" in html and "last call " in html
        # Found by its registered name; listed with no budget; its page opens.
        assert 'data-tenant="ghost"' in c.get("/tenants?q=ghost+ltd").text
        assert 'data-tenant="ghost"' in c.get("/tenants?filter=no_budget").text
        assert "Ghost Ltd" in c.get("/tenants/ghost").text
