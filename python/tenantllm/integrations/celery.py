"""Celery: a task sent inside `with tenantllm.tenant(...)` (or a request the web middleware
set a tenant for) runs in that tenant on the worker.

In the module that creates your Celery app (imported by the web app and by the workers)::

    from celery import Celery
    from tenantllm.integrations.celery import install

    app = Celery("proj", broker=...)
    install()

    @app.task
    def summarize(doc_id: int) -> str:
        return Summarizer.call(text=load(doc_id)).content   # attributed to the sender's tenant

    with tl.tenant("acme"):
        summarize.delay(42)

The sender's tenant travels in a message header (`tenantllm_tenant`): its id and any runtime
limits, never its API keys (brokers store messages in the clear; a worker uses the keys stored
with `ApiConfiguration` or its own configuration). A task sent outside any tenant runs with no
tenant, or with what the worker's `tenant_resolver` returns. Send with
`apply_async(..., headers={"tenantllm_tenant": "globex"})` to name one explicitly. Eager tasks
(`task_always_eager`) run in the caller's context and need nothing.
"""

from __future__ import annotations

import contextvars
from typing import Any

from celery import signals  # type: ignore[import-untyped]

from tenantllm.tenancy import _current, _from_value, current_tenant_value

__all__ = ["HEADER", "install"]

HEADER = "tenantllm_tenant"

# The context each running task's tenant was set in, by task id, to restore when it ends.
_tokens: dict[str, contextvars.Token[Any]] = {}


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is None or HEADER in headers:
        return  # an explicit header wins
    value = current_tenant_value()
    if value is None:
        return
    t = _from_value(value, "tenantllm.tenant()")
    headers[HEADER] = {"id": t.id, **(t.limits or {})}


def _header(task: Any) -> Any:
    request = task.request
    found = getattr(request, HEADER, None)
    if found is None:  # some Celery versions keep custom headers apart
        found = (getattr(request, "headers", None) or {}).get(HEADER)
    return found


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is None or task_id is None:
        return
    value = _header(task)
    if value is not None:
        # Checked where it is used: a bad header fails the task's agent calls, clearly.
        _tokens[task_id] = _current.set(value)


def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    token = _tokens.pop(task_id, None) if task_id is not None else None
    if token is not None:
        _current.reset(token)


def install() -> None:
    """Carry the current tenant from the sender to the task (safe to call more than once)."""
    signals.before_task_publish.connect(_on_publish, weak=False, dispatch_uid="tenantllm.publish")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="tenantllm.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="tenantllm.postrun")
