"""The `tenantllm` command: `demo` and `report`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import tenantllm as tl

DEMO_DB = "tenantllm-demo.db"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    fmt = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    return "\n".join([fmt[0], line, *fmt[1:]])


def _usd(d: Decimal | None) -> str:
    return "-" if d is None else f"${d:.6f}"


class SupportAgent(tl.Agent):
    model = "mock/support"
    system = "You help customers of {company}."
    user = "Question: {query}"
    max_tokens = 200
    retries = tl.Retries(max=2, base=0.01, max_delay=0.05)


class SummaryAgent(tl.Agent):
    model = "mock/summary"
    fallback_models = ("mock/summary-lite",)
    user = "Summarize in one line: {text}"
    max_tokens = 100
    circuit_breaker = tl.BreakerPolicy(errors=5, within=60, cooldown=30)


QUESTIONS = [
    "Where is my order?",
    "How do I reset my password?",
    "Can I change my shipping address after checkout?",
    "Do you ship to Canada?",
]


def demo(args: argparse.Namespace) -> int:
    path = args.database
    if path == DEMO_DB:  # the demo's own file: start afresh each run
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
    alerts: list[dict[str, Any]] = []
    tl.configure(
        database=path,
        budgets={"global_daily": 5, "enforcement": "hard"},
        mock={"latency_ms": 1, "failure_rate": 0.1, "seed": 7},
        on_alert=alerts.append,
    )
    tl.TenantBudget.create("acme", name="Acme Corp", daily_limit="0.00025", enforcement="hard")
    tl.TenantBudget.create("globex", name="Globex", daily_limit="0.00015", enforcement="soft")
    tl.TenantBudget.create("initech", name="Initech", monthly_token_limit=1_000_000)
    print(f"tenantllm {tl.__version__} demo: 3 tenants, 2 agents, mock provider (10% failures), database {path}\n")
    outcomes: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    for tenant in ("acme", "globex", "initech"):
        o = outcomes.setdefault(tenant, {"ok": 0, "blocked": 0, "failed": 0, "warned": 0})
        for i in range(args.calls):
            try:
                if i % 3 == 2:
                    r = SummaryAgent.call(text=" ".join(QUESTIONS), tenant=tenant)
                else:
                    r = SupportAgent.call(query=QUESTIONS[i % len(QUESTIONS)], company=tenant.title(), tenant=tenant)
                o["ok"] += 1
                o["warned"] += bool(r.budget_warnings)
            except tl.BudgetExceededError:
                o["blocked"] += 1
            except tl.ProviderError:
                o["failed"] += 1
            except tl.AllModelsExhaustedError:
                o["failed"] += 1
    elapsed = time.perf_counter() - start
    calls = sum(sum(v for k, v in o.items() if k != "warned") for o in outcomes.values())
    print(f"{calls} calls in {elapsed:.2f}s ({elapsed / calls * 1e3:.2f} ms per call incl. 1 ms mock latency)\n")
    today = tl.Execution.today()
    cost = today.group_by("tenant_id").sum("total_cost")
    tokens = today.group_by("tenant_id").sum("total_tokens")
    rows = []
    for b in tl.TenantBudget.all():
        o = outcomes[b.tenant_id]
        limit = b.daily_limit
        rows.append(
            [
                f"{b.tenant_id} ({b.enforcement})",
                o["ok"],
                o["blocked"],
                o["failed"],
                o["warned"],
                tokens.get(b.tenant_id, 0),
                _usd(cost.get(b.tenant_id, Decimal(0))),
                _usd(limit),
                _usd(b.daily_remaining) if limit is not None else "-",
            ]
        )
    print(_table(["tenant", "ok", "blocked", "failed", "warned", "tokens", "spent today", "daily limit", "left"], rows))
    print("\nBy agent and status:", dict(today.group_by("agent").count()), dict(today.group_by("status").count()))
    top = today.successful().order_by("-total_cost").first()
    if top is not None:
        print(
            f"Most expensive call: {top.agent} for {top.tenant_id}, {top.total_tokens} tokens, {_usd(top.total_cost)}"
        )
    print(
        f"Alerts raised: {len(alerts)}",
        *[
            f"\n  {a['kind']} {a.get('scope', '')} {a.get('threshold', '')}%"
            for a in alerts
            if a["kind"] == "budget_threshold"
        ],
    )
    print(
        f"\nQuery it yourself: python -c \"import tenantllm as tl; tl.configure(database='{path}'); "
        "print(tl.Execution.this_month().group_by('tenant_id').sum('total_cost'))\""
    )
    return 0


def report(args: argparse.Namespace) -> int:
    if not os.path.exists(args.database):
        print(f"tenantllm: no database at {args.database!r}", file=sys.stderr)
        return 2
    tl.configure(database=args.database)
    q = {"today": tl.Execution.today, "week": tl.Execution.this_week, "month": tl.Execution.this_month}[args.period]()
    spend = q.group_by(args.by).sum("total_cost")
    calls = q.group_by(args.by).count()
    tokens = q.group_by(args.by).sum("total_tokens")
    rows = sorted(((k or "-", calls[k], tokens[k], _usd(v)) for k, v in spend.items()), key=lambda r: r[0])
    print(_table([args.by, "calls", "tokens", "cost"], rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tenantllm", description=tl.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run agents for three tenants on the mock provider and print a report")
    d.add_argument("--database", default=DEMO_DB)
    d.add_argument("--calls", type=int, default=12, help="calls per tenant")
    d.set_defaults(func=demo)
    r = sub.add_parser("report", help="spend per tenant, agent or model")
    r.add_argument("--database", default=os.environ.get("TENANTLLM_DATABASE", "tenantllm.db"))
    r.add_argument("--by", choices=["tenant_id", "agent", "model_id", "provider", "status"], default="tenant_id")
    r.add_argument("--period", choices=["today", "week", "month"], default="month")
    r.set_defaults(func=report)
    args = p.parse_args(argv)
    try:
        code: int = args.func(args)
    except tl.TenantLLMError as e:
        print(f"tenantllm: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
