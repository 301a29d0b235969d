"""The `tenantllm` command: `demo`, `report`, `budgets`, `tenants`, `timezone` and `dashboard`.

Errors are one line on stderr, never a traceback: exit code 2 for a bad command line or a
database that is missing or not a database, 1 for other tenantllm errors."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

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


def _int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


class CliError(Exception):
    """A problem to report in one line and exit with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _default_database() -> str:
    return os.environ.get("TENANTLLM_DATABASE", "tenantllm.db")


def _file_of(database: str) -> str | None:
    """The file a database setting names (None for ":memory:" or a server URL such as postgresql://)."""
    if database == ":memory:" or ("://" in database and not database.startswith("sqlite:///")):
        return None
    return database.removeprefix("sqlite:///") if database.startswith("sqlite:///") else database


def _shown(database: str) -> str:
    """The database setting as it may be printed: a URL's password is masked."""
    parts = urlsplit(database)
    if parts.password is None:
        return database
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _open(database: str) -> None:
    """Configure tenantllm on an existing database; CliError (exit 2) naming the path if it is
    missing or is not a usable database."""
    path = _file_of(database)
    if path is not None and not os.path.exists(path):
        raise CliError(f"no database at {path!r} (pass --database or set TENANTLLM_DATABASE)")
    if path is not None and os.path.isdir(path):
        raise CliError(f"{path!r} is a directory, not a database file")
    try:
        # Only the database's own settings apply here (its timezone among them).
        tl.configure(reset=True, database=database)
        tl.config.engine().query_aggregate([])  # reads the executions table: fails early on a foreign file
    except tl.StoreError as e:
        raise CliError(f"cannot use {path or _shown(database)!r} as a tenantllm database: {e}") from None


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
        reset=True,
        database=path,
        budgets={"global_daily": 5, "enforcement": "hard"},
        mock={"latency_ms": 1, "failure_rate": 0.1, "seed": 7},
        on_alert=alerts.append,
    )
    tl.TenantBudget.create("acme", name="Acme Corp", daily_limit="0.00025", enforcement="hard")
    tl.TenantBudget.create("globex", name="Globex", daily_limit="0.00015", enforcement="soft")
    tl.TenantBudget.create("initech", name="Initech", monthly_token_limit=1_000_000)
    print(
        f"tenantllm {tl.__version__} demo: 3 tenants, 2 agents, mock provider (10% failures), "
        f"database {_shown(path)}\n"
    )
    outcomes: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    tenants = ("acme", "globex", "initech")
    for n, tenant in enumerate(tenants, 1):
        print(f"  [{n}/{len(tenants)}] {tenant:<8} {args.calls} calls ...", end="", flush=True)
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
        print(f" {o['ok']} ok, {o['blocked']} blocked, {o['failed']} failed", flush=True)
    elapsed = time.perf_counter() - start
    calls = sum(sum(v for k, v in o.items() if k != "warned") for o in outcomes.values())
    print(f"\n{calls} calls in {elapsed:.2f}s ({elapsed / calls * 1e3:.2f} ms per call incl. 1 ms mock latency)\n")
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
        f"\nQuery it yourself: python -c \"import tenantllm as tl; tl.configure(database='{_shown(path)}'); "
        "print(tl.Execution.this_month().group_by('tenant_id').sum('total_cost'))\""
    )
    return 0


# `report --by`: a short name (as the help says) or the field's own name.
_GROUPS = {"tenant": "tenant_id", "agent": "agent", "model": "model_id", "provider": "provider", "status": "status"}
# `report --period`: named as the Python query methods are; "week"/"month" are kept as aliases.
_PERIODS = {"today": "today", "this_week": "this_week", "this_month": "this_month", "week": "this_week",
            "month": "this_month"}  # fmt: skip


def report(args: argparse.Namespace) -> int:
    _open(args.database)
    by = _GROUPS.get(args.by, args.by)
    q = getattr(tl.Execution, _PERIODS[args.period])()
    spend = q.group_by(by).sum("total_cost")
    calls = q.group_by(by).count()
    tokens = q.group_by(by).sum("total_tokens")
    rows = sorted(((k or "-", calls[k], tokens[k], _usd(v)) for k, v in spend.items()), key=lambda r: r[0])
    print(_table([by, "calls", "tokens", "cost"], rows))
    return 0


def _limit(kind: str) -> Callable[[str], Any]:
    """argparse type for a limit: a number, or "none" to remove the tenant's own limit."""

    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "unset", "-"):
            return None
        try:
            if kind == "usd":
                value: Any = Decimal(text)
                ok = value.is_finite() and value >= 0
            else:
                value = int(text.replace("_", ""))
                ok = value >= 0
        except (InvalidOperation, ValueError):
            ok = False
        if not ok:
            what = "an amount in USD such as 25 or 0.50" if kind == "usd" else "a whole number such as 500000"
            raise argparse.ArgumentTypeError(f"expected {what}, or 'none', got {text!r}")
        return value

    parse.__name__ = "USD amount" if kind == "usd" else "count"
    return parse


_BUDGET_OPTIONS = (
    # flag, field, kind
    ("--daily-limit", "daily_limit", "usd"),
    ("--monthly-limit", "monthly_limit", "usd"),
    ("--daily-token-limit", "daily_token_limit", "count"),
    ("--monthly-token-limit", "monthly_token_limit", "count"),
    ("--daily-execution-limit", "daily_execution_limit", "count"),
    ("--monthly-execution-limit", "monthly_execution_limit", "count"),
    ("--rpm-limit", "rpm_limit", "count"),
    ("--tpm-limit", "tpm_limit", "count"),
    ("--max-concurrent", "max_concurrent", "count"),
)


def _rate(used: int, limit: int | None) -> str:
    """A rate limit's use now: "12/60", or "-" without that limit."""
    return "-" if limit is None else f"{used:,}/{limit:,}"


def budgets_list(args: argparse.Namespace) -> int:
    _open(args.database)
    daily, monthly = tl.spend_by_tenant("daily"), tl.spend_by_tenant("monthly")
    zero = {"cost": Decimal(0), "tokens": 0, "executions": 0}
    rows = []
    for b in tl.TenantBudget.all():
        d, m = daily.get(b.tenant_id, zero), monthly.get(b.tenant_id, zero)
        rows.append(
            [
                b.tenant_id,
                b.name or "",
                b.enforcement,
                _usd(d["cost"]),
                _usd(b.daily_limit),
                _usd(m["cost"]),
                _usd(b.monthly_limit),
                _int(d["tokens"]),
                _int(b.daily_token_limit),
                _int(m["tokens"]),
                _int(b.monthly_token_limit),
                _rate(b.current_rpm, b.rpm_limit),
                _rate(b.current_tpm, b.tpm_limit),
                _rate(b.current_concurrent, b.max_concurrent),
            ]
        )
    if not rows:
        print(f"No tenant budgets in {_shown(args.database)}. Add one: tenantllm budgets set TENANT --daily-limit 25")
        return 0
    headers = ["tenant", "name", "enforcement", "today", "daily limit", "this month", "monthly limit",
               "tokens today", "daily tokens", "tokens month", "monthly tokens", "calls/min", "tokens/min", "in flight"]
    print(_table(headers, rows))
    print("\nLimits shown as '-' are the tenant's own unset ones: it inherits the global budgets= of the app.")
    return 0


def tenants_list(args: argparse.Namespace) -> int:
    _open(args.database)
    zone = ZoneInfo(tl.config.engine().timezone)
    seen = {t.id: t for t in tl.tenants()}
    budgets = {b.tenant_id: b for b in tl.TenantBudget.all()}
    monthly = tl.spend_by_tenant("monthly")

    def when(t: datetime | None) -> str:
        return "-" if t is None else t.astimezone(zone).strftime("%Y-%m-%d %H:%M")

    rows = []
    for tid in sorted(seen.keys() | budgets.keys()):
        t, b = seen.get(tid), budgets.get(tid)
        name = (t.name if t else None) or (b.name if b else None) or ""
        spent = monthly.get(tid, {}).get("cost")
        first, last = (t.first_used_at, t.last_used_at) if t else (None, None)
        rows.append([tid, name, when(first), when(last), "yes" if b else "no", _usd(spent or Decimal(0))])
    if not rows:
        print(f"No tenants in {_shown(args.database)} yet: a tenant is remembered at its first call.")
        return 0
    print(_table(["tenant", "name", "first use", "last use", "budget", "this month"], rows))
    print(f"\nTimes in the database's timezone ({zone.key}); last use is accurate to the hour.")
    return 0


def budgets_set(args: argparse.Namespace) -> int:
    _open(args.database)
    changes = {field: getattr(args, field) for _, field, _ in _BUDGET_OPTIONS if hasattr(args, field)}
    if args.enforcement is not None:
        changes["enforcement"] = args.enforcement
    if args.name is not None:
        changes["name"] = args.name or None
    existing = tl.TenantBudget.find(args.tenant)
    if existing is None:
        b = tl.TenantBudget.create(args.tenant, **changes)
        verb = "Created"
    else:
        b = existing.update(**changes)
        verb = "Updated"
    print(f"{verb} {b!r}")
    return 0


def budgets_delete(args: argparse.Namespace) -> int:
    _open(args.database)
    b = tl.TenantBudget.find(args.tenant)
    if b is None:
        raise CliError(f"tenant {args.tenant!r} has no budget in {_shown(args.database)}", code=1)
    b.delete()
    print(f"Deleted the budget of {args.tenant!r} (it now inherits the global limits)")
    return 0


def timezone_show(args: argparse.Namespace) -> int:
    _open(args.database)
    print(tl.config.engine().timezone)
    return 0


def timezone_set(args: argparse.Namespace) -> int:
    _open(args.database)
    before = tl.config.engine().timezone
    written = tl.set_timezone(args.zone)
    after = tl.config.engine().timezone
    print(f"{_shown(args.database)} now keeps its budget days and months in {after} (was {before}); "
          f"rebuilt {written} counters")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _load_auth(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--auth must look like 'package.module:callable', got {spec!r}")
    sys.path.insert(0, os.getcwd())  # like uvicorn: modules in the current directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"--auth: cannot import {module_name!r}: {e}") from None
    finally:
        sys.path.pop(0)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise CliError(f"--auth: {spec!r} is not a callable (request -> Viewer | None)")
    return obj


def dashboard(args: argparse.Namespace) -> int:
    auth = _load_auth(args.auth) if args.auth else None
    if auth is None and not _is_loopback(args.host) and not args.insecure_no_auth:
        raise CliError(
            f"refusing to serve the dashboard on {args.host} without --auth: anyone who can reach it would see "
            "every tenant's data. Pass --auth module:callable, or --insecure-no-auth if something in front "
            "of it authenticates users."
        )
    try:
        import uvicorn

        from tenantllm import dashboard as dash
    except ImportError as e:
        raise CliError(f"the dashboard needs the 'dashboard' extra: pip install 'tenantllm[dashboard]' ({e})") from None
    _open(args.database)
    app = dash.app(auth=auth, title=args.title)  # reads the database configured just above
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tenantllm dashboard for {_shown(args.database)} at http://{url_host}:{args.port}/ (Ctrl-C to stop)")
    if auth is None and _is_loopback(args.host):
        print(f"No --auth configured: binding to {args.host} only, so only this machine can connect; "
              "every visitor sees all tenants.")
    elif auth is None:
        print(f"WARNING: no --auth and --insecure-no-auth: anyone who can reach {args.host}:{args.port} "
              "sees every tenant's data.")
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def purge(args: argparse.Namespace) -> int:
    _open(args.database)
    if args.details_days is None and args.executions_days is None:
        raise CliError("name --details-days and/or --executions-days")
    done = tl.purge(details_days=args.details_days, executions_days=args.executions_days, dry_run=args.dry_run)
    lines = []
    if done["details_before"] is not None:
        lines.append(f"clear the prompts, responses, metadata and error messages of {done['details']} executions "
                     f"started before {done['details_before']:%Y-%m-%d %H:%M} UTC")
    if done["executions_before"] is not None:
        lines.append(f"delete {done['executions']} executions started before "
                     f"{done['executions_before']:%Y-%m-%d %H:%M} UTC")
    for line in lines:
        print(f"{'Would' if args.dry_run else 'Did'} {line}")
    print("Counters, budgets and daily totals are not changed.")
    return 0


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    database: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand that runs `func` on a database (`--database`, by default TENANTLLM_DATABASE)."""
    c = sub.add_parser(name, help=help)
    c.add_argument("--database", default=database or _default_database())
    c.set_defaults(func=func)
    return c


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tenantllm", description=tl.__doc__)
    p.add_argument("--version", action="version", version=f"tenantllm {tl.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = _command(sub, "demo", demo, "run agents for three tenants on the mock provider and print a report", DEMO_DB)
    d.add_argument("--calls", type=int, default=12, help="calls per tenant")

    r = _command(sub, "report", report, "spend per tenant, agent or model")
    r.add_argument("--by", choices=[*_GROUPS, *(v for v in _GROUPS.values() if v not in _GROUPS)], default="tenant")
    r.add_argument("--period", choices=list(_PERIODS), default="this_month")

    b = sub.add_parser("budgets", help="list or set tenant budgets")
    bsub = b.add_subparsers(dest="budgets_command", required=True)
    _command(bsub, "list", budgets_list, "every tenant budget with today's and this month's usage")
    bs = _command(
        bsub, "set", budgets_set,
        "create or change a tenant's budget (only the options given change; 'none' removes a limit)",
    )
    bs.add_argument("tenant", help="tenant id")
    for flag, field, kind in _BUDGET_OPTIONS:
        bs.add_argument(flag, dest=field, type=_limit(kind), default=argparse.SUPPRESS,
                        metavar="USD" if kind == "usd" else "N")
    bs.add_argument("--enforcement", choices=["hard", "soft"], help="hard blocks calls, soft only warns")
    bs.add_argument("--name", help="display name of the tenant")
    bd = _command(bsub, "delete", budgets_delete, "remove a tenant's budget (it then inherits the global limits)")
    bd.add_argument("tenant")

    t = sub.add_parser("tenants", help="the tenants seen, with or without a budget")
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    _command(tsub, "list", tenants_list, "every tenant seen or with a budget: name, first and last use, spend")

    z = sub.add_parser("timezone", help="show or change the timezone of the database's budget days and months")
    zsub = z.add_subparsers(dest="timezone_command", required=True)
    _command(zsub, "show", timezone_show, "print the database's timezone")
    zt = _command(
        zsub, "set", timezone_set,
        "change it for every process using the database and rebuild the counters in it (one transaction)",
    )
    zt.add_argument("zone", help="an IANA timezone name, such as Europe/Berlin or UTC")

    pg = _command(sub, "purge", purge, "clear old executions' prompts and responses, or delete old executions")
    pg.add_argument("--details-days", type=int, metavar="N", help="clear the details of executions older than N days")
    pg.add_argument("--executions-days", type=int, metavar="N", help="delete executions older than N days")
    pg.add_argument("--dry-run", action="store_true", help="print what would go and change nothing")

    w = _command(sub, "dashboard", dashboard, "serve the web dashboard")
    w.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    w.add_argument("--port", type=int, default=8000)
    w.add_argument("--auth", metavar="MODULE:CALLABLE",
                   help="access control: a callable request -> tenantllm.dashboard.Viewer | None")
    w.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --auth (only behind an authenticating proxy)")
    w.add_argument("--title", default="tenantllm")
    w.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])

    args = p.parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as e:
        print(f"tenantllm: {e}", file=sys.stderr)
        return e.code
    except tl.TenantLLMError as e:
        print(f"tenantllm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tenantllm report | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
