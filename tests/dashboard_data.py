"""Sample data for the dashboard tests: three tenants, successes, failures, a blocked call, an
open breaker, budgets and stored API keys; all on the mock provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl

SECRET = "k" * 44
# Keys that must never appear on any page.
KEYS = {
    "configured": "sk-CONFIGURED-4f9a8b7c6d5e",
    "stored_global": "sk-STOREDGLOBAL-1a2b3c4d5e",
    "stored_tenant": "sk-ant-STOREDTENANT-9z8y7x",
    "per_call": "sk-PERCALL-0f1e2d3c4b5a",
    "metadata": "sk-METADATA-77aa88bb99cc",
}


class SupportAgent(tl.Agent):
    model = "mock/support"
    system = "You help customers of {company}."
    user = "Question: {query}"
    max_tokens = 200


class SummaryAgent(tl.Agent):
    model = "mock/summary"
    user = "Summarize: {text}"
    max_tokens = 100

    def execution_metadata(self) -> dict[str, Any]:
        # Users sometimes put credentials in metadata; the dashboard must not show them.
        return {"plan": "pro", "api_key": KEYS["metadata"], "note": f"called with {KEYS['metadata']}"}


class FlakyAgent(tl.Agent):
    model = "mock/flaky"
    user = "ping {n}"
    circuit_breaker = tl.BreakerPolicy(errors=2, within=60, cooldown=600)


@dataclass
class Sample:
    db: Path
    ids: dict[str, list[str]] = field(default_factory=dict)  # tenant -> execution ids

    def add(self, tenant: str | None, execution_id: str) -> None:
        self.ids.setdefault(tenant or "", []).append(execution_id)


def _configure(db: Path, failure_rate: float) -> None:
    tl.configure(
        database=str(db),
        api_keys={"openai": KEYS["configured"]},
        mock={"latency_ms": 0, "failure_rate": failure_rate, "seed": 3},
    )


def populate(db: Path, monkeypatch: pytest.MonkeyPatch) -> Sample:
    """acme: 6 support + 2 summary successes (one with a per-call key); globex: 2 successes,
    2 errors then 1 short-circuited (breaker open); initech: 1 blocked by a zero budget;
    one call without a tenant. Leaves tenantllm configured on `db` with failures off."""
    monkeypatch.setenv("TENANTLLM_SECRET_KEY", SECRET)
    s = Sample(db)
    _configure(db, 0.0)
    tl.ApiConfiguration.set_global(openai=KEYS["stored_global"])
    tl.ApiConfiguration.set_for_tenant("acme", anthropic=KEYS["stored_tenant"])
    tl.TenantBudget.create("acme", name="Acme Corp", daily_limit="1.00", monthly_limit="20", enforcement="hard")
    tl.TenantBudget.create("globex", name="Globex", daily_token_limit=100, enforcement="soft")
    tl.TenantBudget.create("initech", name="Initech", daily_limit="0", enforcement="hard")
    for i in range(6):
        r = SupportAgent.call(query=f"question {i}", company="Acme", tenant="acme")
        s.add("acme", r.execution_id)
    for i in range(2):
        t: Any = {"id": "acme", "api_keys": {"openai": KEYS["per_call"]}} if i == 0 else "acme"
        s.add("acme", SummaryAgent.call(text=f"text {i}", tenant=t).execution_id)
    for i in range(2):
        s.add("globex", SupportAgent.call(query=f"g{i}", company="Globex", tenant="globex").execution_id)
    try:
        SupportAgent.call(query="blocked", company="Initech", tenant="initech")
    except tl.BudgetExceededError as e:
        s.add("initech", e.execution_id)
    s.add(None, SupportAgent.call(query="anonymous", company="Nobody").execution_id)

    _configure(db, 1.0)
    for i in range(2):
        with pytest.raises(tl.ProviderError):
            FlakyAgent.call(n=i, tenant="globex")
    with pytest.raises(tl.CircuitOpenError):
        FlakyAgent.call(n=9, tenant="globex")
    _configure(db, 0.0)
    for e in tl.Execution.by_tenant("globex").by_agent(FlakyAgent):
        s.add("globex", e.id)
    return s
