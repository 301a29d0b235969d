"""The `tenantllm` command: demo (with progress), report, budgets list/set/delete, dashboard
(loopback unless auth), and one-line errors with exit code 2 for missing or corrupt databases."""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from starlette.testclient import TestClient
from tenantllm.cli import main

# The command line takes database files by path and checks them before opening, so the
# PostgreSQL run of the suite (which maps paths given to configure()) cannot stand in here.
pytestmark = pytest.mark.sqlite_only


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def demo_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    db = tmp_path / "demo.db"
    assert main(["demo", "--database", str(db), "--calls", "6"]) == 0
    capsys.readouterr()
    return db


@pytest.fixture
def corrupt_db(tmp_path: Path) -> Path:
    p = tmp_path / "corrupt.db"
    p.write_bytes(b"this is not a database, just some text\n" * 200)
    return p


# ------------------------------------------------------------------ demo and report


def test_demo_shows_progress_per_tenant_and_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    code, out, err = run(capsys, "demo", "--database", str(tmp_path / "d.db"))
    assert time.perf_counter() - start < 3
    assert code == 0 and err == ""
    for n, tenant in enumerate(("acme", "globex", "initech"), 1):
        assert f"[{n}/3] {tenant}" in out
    assert out.index("[1/3] acme") < out.index("[3/3] initech") < out.index("36 calls in")
    assert "spent today" in out and "Alerts raised" in out
    assert tl.Execution.all().count() == 36


def test_report_by_tenant_agent_and_model(demo_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--database", str(demo_db))
    assert code == 0
    assert out.splitlines()[0].split() == ["tenant_id", "calls", "tokens", "cost"]
    assert {line.split()[0] for line in out.splitlines()[2:]} == {"acme", "globex", "initech"}
    code, out, _ = run(capsys, "report", "--database", str(demo_db), "--by", "agent", "--period", "today")
    assert code == 0 and "SupportAgent" in out and "SummaryAgent" in out
    code, out, _ = run(capsys, "report", "--database", f"sqlite:///{demo_db}", "--by", "model_id")
    assert code == 0 and "mock/support" in out
    # Short names as the help says, periods named as in Python (the old names still work).
    code, by_tenant, _ = run(capsys, "report", "--database", str(demo_db), "--by", "tenant", "--period", "this_month")
    assert code == 0 and by_tenant.splitlines()[0].split()[0] == "tenant_id"
    assert run(capsys, "report", "--database", str(demo_db), "--period", "month")[1] == by_tenant
    code, out, _ = run(capsys, "report", "--database", str(demo_db), "--by", "model", "--period", "this_week")
    assert code == 0 and "mock/support" in out


# ------------------------------------------------------------------ missing and corrupt databases


@pytest.mark.parametrize("command", [["report"], ["budgets", "list"], ["budgets", "set", "acme"], ["dashboard"]])
def test_missing_database_is_a_clear_error(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.db"
    code, out, err = run(capsys, *command, "--database", str(missing))
    assert code == 2 and out == ""
    assert err.startswith("tenantllm: no database at") and str(missing) in err and "Traceback" not in err
    assert not missing.exists()  # nothing was created


@pytest.mark.parametrize("command", [["report"], ["budgets", "list"], ["budgets", "set", "acme"], ["dashboard"]])
def test_corrupt_database_is_a_clear_error(
    command: list[str], corrupt_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = corrupt_db.read_bytes()
    code, out, err = run(capsys, *command, "--database", str(corrupt_db))
    assert code == 2 and out == ""
    assert str(corrupt_db) in err and "not a database" in err and "Traceback" not in err
    assert corrupt_db.read_bytes() == before


def test_directory_and_default_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "report", "--database", str(tmp_path))
    assert code == 2 and str(tmp_path) in err and "directory" in err
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "budgets", "list")
    assert code == 2 and "'tenantllm.db'" in err


def test_errors_from_a_real_process_have_no_traceback(corrupt_db: Path, tmp_path: Path) -> None:
    for args in (["report", "--database", str(corrupt_db)], ["budgets", "list", "--database", str(tmp_path / "x.db")]):
        p = subprocess.run([sys.executable, "-m", "tenantllm.cli", *args], capture_output=True, text=True)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and args[-1] in p.stderr


# ------------------------------------------------------------------ budgets


def test_budgets_set_creates_updates_and_clears(demo_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(demo_db)
    code, out, _ = run(capsys, "budgets", "set", "newco", "--database", db, "--daily-limit", "2.50",
                       "--monthly-limit", "40", "--daily-token-limit", "100_000", "--enforcement", "soft",
                       "--name", "New Co")
    assert code == 0 and out.startswith("Created")
    b = tl.TenantBudget.get("newco")
    assert (b.daily_limit, b.monthly_limit, b.daily_token_limit, b.enforcement, b.name) == (
        Decimal("2.5"), Decimal(40), 100_000, "soft", "New Co")
    # Only the options given change; "none" removes a limit.
    code, out, _ = run(capsys, "budgets", "set", "newco", "--database", db, "--monthly-limit", "none",
                       "--monthly-token-limit", "5000000")
    assert code == 0 and out.startswith("Updated")
    b = tl.TenantBudget.get("newco")
    assert (b.daily_limit, b.monthly_limit, b.monthly_token_limit, b.enforcement) == (
        Decimal("2.5"), None, 5_000_000, "soft")


@pytest.mark.parametrize(
    "bad", [["--daily-limit", "abc"], ["--daily-limit", "-1"], ["--daily-token-limit", "1.5"], ["--enforcement", "x"]]
)
def test_budgets_set_rejects_bad_values(bad: list[str], demo_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["budgets", "set", "acme", "--database", str(demo_db), *bad])
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err
    assert tl.TenantBudget.get("acme").daily_limit == Decimal("0.00025")  # unchanged


def test_budgets_list_and_delete(demo_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "budgets", "list", "--database", str(demo_db))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["tenant", "name", "enforcement"]
    acme = next(line for line in lines if line.startswith("acme"))
    assert "Acme Corp" in acme and "hard" in acme and "$0.000250" in acme
    assert any(line.startswith("initech") and "1,000,000" in line for line in lines)
    code, out, _ = run(capsys, "budgets", "delete", "globex", "--database", str(demo_db))
    assert code == 0 and tl.TenantBudget.find("globex") is None
    code, _, err = run(capsys, "budgets", "delete", "globex", "--database", str(demo_db))
    assert code == 1 and "no budget" in err
    for t in ("acme", "initech"):
        tl.TenantBudget.get(t).delete()
    code, out, _ = run(capsys, "budgets", "list", "--database", str(demo_db))
    assert code == 0 and "No tenant budgets" in out


# ------------------------------------------------------------------ dashboard


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces uvicorn.run: records what the command would serve."""
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    return calls


def _listeners(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (Linux /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # /proc prints each 32-bit word in host (little-endian) order.
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add(str(ipaddress.ip_address(words)))
    return found


def test_dashboard_without_auth_binds_to_loopback_only(demo_db: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tenantllm.cli", "dashboard", "--database", str(demo_db), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _listeners(port):
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the dashboard never listened"
            time.sleep(0.05)
        assert _listeners(port) == {"127.0.0.1"}  # not 0.0.0.0, not ::
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/executions?tenant_id=acme", timeout=30) as page:
            assert page.status == 200 and "6 executions" in page.read().decode()
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=30)
    assert "binding to 127.0.0.1 only" in out and f"http://127.0.0.1:{port}/" in out


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com"])
def test_dashboard_refuses_other_hosts_without_auth(
    host: str, demo_db: Path, served: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "dashboard", "--database", str(demo_db), "--host", host)
    assert code == 2 and served == [] and out == ""
    assert f"refusing to serve the dashboard on {host} without --auth" in err


def test_dashboard_insecure_no_auth_and_auth(
    demo_db: Path, served: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "dashboard", "--database", str(demo_db), "--host", "0.0.0.0", "--insecure-no-auth")
    assert code == 0 and "WARNING" in out and served[-1]["host"] == "0.0.0.0"
    code, out, _ = run(capsys, "dashboard", "--database", str(demo_db), "--host", "0.0.0.0",
                       "--auth", "tenantllm.dashboard:deny_all", "--title", "Ops")
    assert code == 0 and "WARNING" not in out and "only" not in out
    with TestClient(served[-1]["app"]) as c:
        assert c.get("/").status_code == 403
    for spec in ("nomodule_xyz:auth", "tenantllm.dashboard:nothing_here", "no-colon"):
        code, _, err = run(capsys, "dashboard", "--database", str(demo_db), "--auth", spec)
        assert code == 2 and "--auth" in err
    assert len(served) == 2


def test_database_url_passwords_are_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "report", "--database", "postgresql://app:s3cretpw@127.0.0.1:1/tenantllm")
    assert code == 2 and out == ""
    assert "s3cretpw" not in err and "app:***@127.0.0.1" in err and "Traceback" not in err
