"""Celery: a real worker (prefork, so tasks also run in forked children) on Celery's filesystem
broker (no service needed) runs each task in the tenant it was sent in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tenantllm as tl

pytest.importorskip("celery", reason="celery is not installed (pip install 'tenantllm[celery]')")

TASKS = """
import os
import tenantllm as tl
from celery import Celery
from tenantllm.integrations.celery import install

ROOT = os.environ["CELERY_TEST_ROOT"]
app = Celery("tasks", broker="filesystem://", backend=f"file://{ROOT}/results")
app.conf.broker_transport_options = {
    "data_folder_in": f"{ROOT}/queue", "data_folder_out": f"{ROOT}/queue", "processed_folder": f"{ROOT}/done",
}
app.conf.worker_hijack_root_logger = False
tl.configure(database=os.environ["CELERY_TEST_DB"], mock={"latency_ms": 0})
install()


class Support(tl.Agent):
    model = "mock/support"
    user = "{query}"
    max_tokens = 20


@app.task
def ask(query):
    r = Support.call(query=query)
    return [r.tenant_id, r.execution_id]
"""


@pytest.fixture
def tasks(tmp_path: Path, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    for d in ("queue", "done", "results"):
        (tmp_path / d).mkdir()
    (tmp_path / "celery_tasks.py").write_text(TASKS)
    monkeypatch.setenv("CELERY_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("CELERY_TEST_DB", str(db_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool=prefork", "--concurrency=2",
         "--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    import celery_tasks  # type: ignore[import-not-found]

    try:
        yield celery_tasks
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            out, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, _ = worker.communicate()
        sys.modules.pop("celery_tasks", None)
        if "Traceback" in out:
            print(out)


def test_tasks_run_in_the_tenant_they_were_sent_in(tasks: Any) -> None:
    sent = []
    for i in range(6):
        tenant = ["acme", "globex", None][i % 3]
        if tenant is None:
            sent.append((None, tasks.ask.delay(f"q{i}")))
        else:
            with tl.tenant(tenant):
                sent.append((tenant, tasks.ask.delay(f"q{i}")))
    with tl.tenant({"id": "initech", "daily_limit": "0.000000001"}):  # runtime limits travel too
        blocked = tasks.ask.delay("too dear")
    explicit = tasks.ask.apply_async(("x",), headers={"tenantllm_tenant": 42})
    deadline = time.monotonic() + 90
    for tenant, result in sent:
        tenant_id, execution_id = result.get(timeout=max(1, deadline - time.monotonic()))
        assert tenant_id == tenant
        assert tl.Execution.get(execution_id).tenant_id == tenant
    with pytest.raises(Exception, match="budget exceeded for tenant initech"):
        blocked.get(timeout=max(1, deadline - time.monotonic()))
    assert explicit.get(timeout=max(1, deadline - time.monotonic()))[0] == "42"
    assert tl.Execution.by_tenant("initech").by_status("blocked").count() == 1
    assert tl.Execution.by_tenant("acme").count() == 2 and tl.Execution.without_tenant().count() == 2
