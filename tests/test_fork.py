"""Forked workers (invariant 9): a child made by fork() after the parent has called works on
its first call (sync, async, HTTP provider, mock, guarded block), the parent keeps working,
and a hard budget holds across a fork pool and across the workers of `gunicorn --preload`."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tenantllm as tl
from fake_providers import FakeProvider
from tenantllm.config import engine

# Forking a process that has threads is what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


class Echo(tl.Agent):
    model = "mock/echo"
    user = "Echo {q}"
    max_tokens = 16


class Remote(tl.Agent):
    model = "gpt-4o-mini"
    user = "Answer {q}"
    max_tokens = 16


def _wait(pid: int, timeout: float = 60) -> int:
    """The child's exit code; a child still running after `timeout` hung, and is killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child {pid} hung")


def _forked(body: Callable[[], None]) -> int:
    """Starts `body` in a child made by os.fork(), which exits 0 if it returned; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _in_child(body: Callable[[], None], timeout: float = 60) -> int:
    """Runs `body` in a child made by os.fork(); 0 if it returned."""
    return _wait(_forked(body), timeout)


@pytest.fixture
def fp() -> Iterator[FakeProvider]:
    with FakeProvider() as server:
        yield server


def _calls(tag: str) -> None:
    """One of each kind of call, all tagged with `tag` as the tenant."""
    Echo.call(q="sync", tenant=tag)
    asyncio.run(Echo.acall(q="async", tenant=tag))
    Remote.call(q="http", tenant=tag)
    asyncio.run(Remote.acall(q="async http", tenant=tag))
    with tl.guarded(agent="Block", model="mock/echo", tenant=tag) as g:
        g.record(input_tokens=3, output_tokens=2)


def test_a_forked_child_calls_at_once_and_the_parent_keeps_working(db_path: Path, fp: FakeProvider) -> None:
    tl.configure(
        database=str(db_path),
        base_urls=fp.base_urls(),
        api_keys={"openai": "sk-test"},
        budgets={"global_daily": 100, "enforcement": "hard"},
    )
    tl.TenantBudget.create("child", daily_execution_limit=100, enforcement="hard")
    _calls("parent")  # runtime, threads, connections and the HTTP pool now exist
    assert _in_child(lambda: _calls("child")) == 0
    assert _in_child(lambda: _calls("child")) == 0  # a second child, from the same parent
    _calls("parent")
    for tenant, n in [("parent", 10), ("child", 10)]:
        rows = tl.Execution.by_tenant(tenant)
        assert rows.count() == n, tenant
        assert rows.by_status("success").count() == n, tenant
    assert engine().tenant_usage("child")["daily"]["executions"] == 10
    assert len(fp.requests) == 8


def test_a_forked_child_that_configures_again_leaves_the_parent_alone(db_path: Path) -> None:
    tl.configure(database=str(db_path))
    Echo.call(q="before", tenant="a")

    def child() -> None:
        tl.configure(database=str(db_path))  # drops the parent's engine in the child
        Echo.call(q="child", tenant="a")

    assert _in_child(child) == 0
    Echo.call(q="after", tenant="a")  # the parent's connections and threads still work
    assert tl.Execution.by_tenant("a").by_status("success").count() == 3


def test_a_forked_child_of_a_child_works(db_path: Path) -> None:
    tl.configure(database=str(db_path))
    Echo.call(q="parent", tenant="a")

    def child() -> None:
        Echo.call(q="child", tenant="a")
        assert _in_child(lambda: Echo.call(q="grandchild", tenant="a")) == 0

    assert _in_child(child) == 0
    assert tl.Execution.by_tenant("a").by_status("success").count() == 3


def test_a_forked_child_and_its_parent_writing_at_once_exclude_each_other(db_path: Path) -> None:
    """The child locks the file through descriptions of its own (on Linux our SQLite's locks
    belong to the open file description, and the parent's are inherited): the parent's and the
    child's writes at once exclude each other as two processes' do, so a hard limit holds,
    no row is lost and the file stays sound."""
    tl.configure(database=str(db_path))
    tl.TenantBudget.create("shared", daily_execution_limit=40, enforcement="hard")
    Echo.call(q="before", tenant="warm-up")

    def tries() -> None:
        for n in range(30):
            try:
                Echo.call(q=str(n), tenant="shared")
            except tl.BudgetExceededError:
                pass

    pid = _forked(tries)
    tries()
    assert _wait(pid) == 0
    rows = tl.Execution.by_tenant("shared")
    assert rows.count() == 60
    assert rows.successful().count() == 40
    assert engine().tenant_usage("shared")["daily"]["executions"] == 40
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


KILLED_PARENT = textwrap.dedent(
    """
    import os, sys, time
    import tenantllm as tl

    class Echo(tl.Agent):
        model = "mock/echo"
        user = "Echo {q}"

    tl.configure(database=sys.argv[1])
    Echo.call(q="before the fork", tenant="t")
    child = os.fork()
    if child == 0:
        time.sleep(60)  # alive, never touching the database, until the test kills it
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)  # killed here, its connections open
    """
)


def _ofd_locks_on(*paths: Path) -> list[str]:
    """/proc/locks' OFD lock lines on these files (by device and inode)."""
    keys = set()
    for p in paths:
        st = p.stat()
        keys.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    lines = Path("/proc/locks").read_text().splitlines()
    return [line for line in lines if "OFDLCK" in line and any(f" {k} " in line for k in keys)]


@pytest.mark.sqlite_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OFD locks are Linux's")
def test_a_parent_killed_while_its_child_lives_leaves_no_lock_behind(tmp_path: Path) -> None:
    """A child closes its copies of the parent's lock descriptions as it is forked, so the
    parent's locks end with the parent, as POSIX locks did: kept in the child, the locks of a
    parent killed inside a transaction would shut every other process out until the child
    exited. Checked in /proc/locks while the child lives on (a file this process has not
    opened, so every lock on it is theirs)."""
    db = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        shm = Path(f"{db}-shm")
        assert _ofd_locks_on(db, shm), "the parent holds its connection's locks"
        proc.kill()
        proc.wait(timeout=30)
        assert _ofd_locks_on(db, shm) == []
        tl.configure(database=str(db))
        Echo.call(q="after", tenant="t")
        assert tl.Execution.by_tenant("t").count() == 2
    finally:
        os.kill(child, signal.SIGKILL)


def _call(tenant: str) -> None:
    Echo.call(q="child", tenant=tenant)


def test_forks_while_other_threads_use_the_database(db_path: Path) -> None:
    """A fork lands while other threads are inside SQLite or PostgreSQL (holding the library's
    global mutexes). Before the fork gate, a child hung about once in 50 such forks."""
    tl.configure(database=str(db_path))
    Echo.call(q="warm", tenant="busy")
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            Echo.call(q="busy", tenant="busy")
            tl.Execution.by_tenant("busy").count()

    threads = [threading.Thread(target=busy) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            tenant = f"child{i}"
            assert _in_child(lambda: _call(tenant), timeout=30) == 0, i  # noqa: B023 - runs before the next turn
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert tl.Execution.all().by_status("success").count() == tl.Execution.all().count()
    assert sum(tl.Execution.by_tenant(f"child{i}").count() for i in range(40)) == 40


def _pool_call(n: int) -> str:
    try:
        Echo.call(q=str(n), tenant="pool")
        return "ok"
    except tl.BudgetExceededError:
        return "blocked"


def test_a_fork_pool_shares_one_hard_budget(db_path: Path) -> None:
    tl.TenantBudget.create("pool", daily_execution_limit=7, enforcement="hard")
    Echo.call(q="warm", tenant="warm")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        outcomes = pool.map(_pool_call, range(20), chunksize=1)
    assert outcomes.count("ok") == 7
    assert outcomes.count("blocked") == 13
    assert tl.Execution.by_tenant("pool").by_status("success").count() == 7
    assert Echo.call(q="parent", tenant="warm").content


GUNICORN_APP = textwrap.dedent(
    """
    import json
    import os
    import sys

    import tenantllm as tl

    tl.configure(database=os.environ["APP_DATABASE"])

    class Echo(tl.Agent):
        model = "mock/echo"
        user = "Echo {q}"
        max_tokens = 16

    Echo.call(q="loaded before the workers fork", tenant="warm")

    def app(environ, start_response):
        try:
            Echo.call(q="request", tenant="web")
            status, body = "200 OK", {"pid": os.getpid()}
        except tl.BudgetExceededError:
            status, body = "429 Too Many Requests", {"pid": os.getpid()}
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gunicorn_preload_workers_share_one_hard_budget(db_path: Path, tmp_path: Path) -> None:
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn, "gunicorn is a dev dependency (make develop installs it)"
    tl.TenantBudget.create("web", daily_execution_limit=12, enforcement="hard")
    (tmp_path / "webapp.py").write_text(GUNICORN_APP)
    port = _free_port()
    server = subprocess.Popen(
        [gunicorn, "--preload", "-w", "3", "-b", f"127.0.0.1:{port}", "--timeout", "60", "webapp:app"],
        cwd=tmp_path,
        env={**os.environ, "APP_DATABASE": str(db_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The socket answers as soon as the master binds it; wait for all three workers (their
        # "Booting worker" lines), or the first one up may serve every request alone.
        assert server.stderr is not None
        booted = 0
        while booted < 3:
            line = server.stderr.readline()
            assert line, f"gunicorn exited: {server.stderr.read()}"
            booted += "Booting worker" in line
        statuses: list[int] = []
        pids: set[int] = set()
        lock = threading.Lock()

        def request() -> None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            with lock:
                statuses.append(status)
                pids.add(json.loads(body)["pid"])

        threads = [threading.Thread(target=request) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert sorted(set(statuses)) == [200, 429]
        assert statuses.count(200) == 12
        assert statuses.count(429) == 18
        assert len(pids) >= 2, "several workers served"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert tl.Execution.by_tenant("web").by_status("success").count() == 12
    assert tl.Execution.by_tenant("web").by_status("blocked").count() == 18
    assert tl.Execution.by_tenant("warm").count() == 1  # made once, by the master before forking
