"""Where the PostgreSQL server's instructions per guarded call go, statement by statement:
`python benches/pg_variants.py [VARIANT ...]` (all of them when none is named).

Callgrind cannot attribute a stripped server's work to the SQL a PL/pgSQL function runs, so
this measures the difference instead: on a private server under callgrind (as
benches/pg_instructions.py starts it), each variant replaces the common path's
`tenantllm_settle` (38 arguments) or `tenantllm_admit` (27) with a copy that leaves one
statement or expression out (`REMOVED`), then counts the client backends' instructions per
call as pg_instructions.py does (`--warm` calls and `--warm + --calls`, the difference / calls).
A variant's change from `base` (the functions re-created unchanged) is about what that part
costs each call: a left-out statement also leaves out what it did, so some calls do a little
less or more later (the counters not written, the reservation left). The copies are cut from
the definitions migration 30 installs, so a later migration that rewrites these functions
needs the cut points below updated (a variant whose text is not found fails at once).

    .venv/bin/python benches/pg_variants.py --python /work/base/.venv/bin/python
    .venv/bin/python benches/pg_variants.py base settle-rollups --query ''

Needs what pg_instructions.py needs. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pg_instructions as pgi

ROLLUPS = ("daily_rollups", "monthly_rollups", "daily_totals")


def cut(text: str, start: str, end: str, replacement: str = "") -> str:
    """`text` with the span from `start` through the first `end` after it replaced."""
    i = text.index(start)
    j = text.index(end, i) + len(end)
    return text[:i] + replacement + text[j:]


def rollup(table: str) -> Callable[[str], str]:
    """Leaves out the settlement's statement that adds the call to `table` (and the insert
    that creates its row, which the measured calls do not reach)."""
    return lambda s: cut(s, f"UPDATE {table} SET", "END IF;")


def hard_condition(condition: str) -> Callable[[str], str]:
    """The hard limits' loop with its condition replaced by `condition`."""
    start = "IF usage[6 * p_hard[3 * h - 2] - 5 + p_hard[3 * h - 1]]::NUMERIC"
    end = "> p_hard[3 * h] THEN"
    return lambda a: cut(a, start, end, f"IF {condition} THEN")


# Each variant: (the settle function's edit, the admit function's edit), None for unchanged.
REMOVED: dict[str, tuple[Callable[[str], str] | None, Callable[[str], str] | None]] = {
    "base": (None, None),
    "settle-lock_timeout": (lambda s: cut(s, "v_set := set_config(", ";"), None),
    "settle-timezone": (lambda s: cut(s, "SELECT value INTO v_timezone", ";", "v_timezone := p_timezone;"), None),
    "settle-reservation": (lambda s: cut(s, "IF p_reserved THEN", "END IF;\n        END IF;"), None),
    "settle-details": (lambda s: cut(s, "WITH details AS (", "tool_calls = EXCLUDED.tool_calls\n        )"), None),
    "settle-row-as-select": (
        lambda s: cut(
            s,
            "UPDATE executions SET",
            "INTO v_tenant, v_agent, v_model;",
            "SELECT COALESCE(tenant_id, ''), agent, model_id INTO v_tenant, v_agent, v_model FROM executions"
            " WHERE id = p_id AND status = 'running';",
        ),
        None,
    ),
    "settle-daily": (rollup("daily_rollups"), None),
    "settle-daily-calls-only": (
        lambda s: cut(
            s,
            "UPDATE daily_rollups SET calls = calls + 1,",
            "WHERE period = p_day AND tenant_id",
            "UPDATE daily_rollups SET calls = calls + 1 WHERE period = p_day AND tenant_id",
        ),
        None,
    ),
    "settle-monthly": (rollup("monthly_rollups"), None),
    "settle-totals": (rollup("daily_totals"), None),
    "settle-monthly-totals": (lambda s: rollup("daily_totals")(rollup("monthly_rollups")(s)), None),
    "settle-rollups": (lambda s: rollup("daily_totals")(rollup("monthly_rollups")(rollup("daily_rollups")(s))), None),
    "settle-key-check": (
        lambda s: cut(
            s, "v_keys := string_to_array(v_counters", "END IF;", "v_keys := string_to_array(v_counters, E'\\n');"
        ),
        None,
    ),
    "settle-counters": (
        lambda s: cut(
            s,
            "WITH written AS (",
            "FROM written w;",
            "scopes := '{}'; periods := '{}'; recorded_cost := '{}'; recorded_tokens := '{}';"
            " recorded_executions := '{}';",
        ),
        None,
    ),
    "settle-alerts": (lambda s: cut(s, "FOR a IN 1..", "END LOOP;"), None),
    "admit-lock_timeout": (None, lambda a: cut(a, "v_set := set_config(", ";")),
    "admit-timezone": (None, lambda a: cut(a, "SELECT value INTO v_timezone", ";", "v_timezone := p_timezone;")),
    "admit-checks": (None, lambda a: cut(a, "outcome := CASE", "END;", "outcome := NULL;")),
    "admit-budget-stamp": (
        None,
        lambda a: cut(a, "WHEN p_budget_tenant IS NOT NULL", "IS DISTINCT FROM p_budget_stamp THEN 'budget'"),
    ),
    "admit-expired": (None, lambda a: cut(a, "WHEN EXISTS (SELECT 1 FROM reservations", "THEN 'expired'")),
    "admit-breaker": (None, lambda a: cut(a, "WHEN EXISTS (SELECT 1 FROM breakers", "THEN 'breaker'")),
    "admit-tenant": (None, lambda a: cut(a, "IF p_remember THEN", "END IF;")),
    "admit-counters-read-only": (
        None,
        lambda a: cut(
            a,
            "INSERT INTO usage_counters AS c (scope, period, reserved_cost",
            "c.reserved_executions - p_executions] AS v",
            "SELECT ARRAY[c.cost, c.tokens, c.executions, c.reserved_cost, c.reserved_tokens, c.reserved_executions]"
            " AS v"
            " FROM unnest(string_to_array(p_counters, E'\\n')) WITH ORDINALITY AS k(key, n) JOIN usage_counters c"
            " ON c.scope = split_part(k.key, E'\\t', 1) AND c.period = split_part(k.key, E'\\t', 2) ORDER BY k.n",
        ),
    ),
    "admit-hard": (None, lambda a: cut(a, "FOR h IN 1..", "END LOOP;")),
    "admit-hard-trivial": (None, hard_condition("h > 100")),
    "admit-hard-one-pair": (
        None,
        hard_condition("usage[6 * p_hard[3 * h - 2] - 5 + p_hard[3 * h - 1]] > p_hard[3 * h]"),
    ),
    "admit-hard-no-case": (
        None,
        hard_condition(
            "usage[6 * p_hard[3 * h - 2] - 5 + p_hard[3 * h - 1]]::NUMERIC"
            " + usage[6 * p_hard[3 * h - 2] - 2 + p_hard[3 * h - 1]] > p_hard[3 * h]"
        ),
    ),
}


def definition(url: str, name: str, arguments: int) -> str:
    sql = f"SELECT pg_get_functiondef(oid) FROM pg_proc WHERE proname = '{name}' AND pronargs = {arguments}"
    out = subprocess.run(["psql", "-XAtq", "-d", url, "-c", sql], check=True, capture_output=True, text=True).stdout
    if "CREATE OR REPLACE FUNCTION" not in out:
        raise RuntimeError(f"{name} with {arguments} arguments is not installed")
    return out


def per_call(server: pgi.Server, python: str, template: str, case: str, warm: int, n: int, query: str) -> float:
    """Server instructions per guarded call on copies of database `template`."""
    totals = []
    for calls in (warm, warm + n):
        db = f"{template}_{calls}"
        pgi.psql(server.url, f"CREATE DATABASE {db} TEMPLATE {template}")
        url = server.url.rsplit("/", 1)[0] + "/" + db
        out = subprocess.run(
            [python, "-W", "ignore", pgi.__file__, "--child", case, str(calls), url, query],
            check=True,
            capture_output=True,
            text=True,
        )
        files = server.backends([int(p) for p in out.stdout.split()])
        totals.append(pgi.total(files))
        for f in files:
            f.unlink()
    return (totals[1] - totals[0]) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="*", help=f"of: {', '.join(REMOVED)}")
    p.add_argument("--python", default=sys.executable, help="the build whose calls are measured")
    p.add_argument("--case", default="budget", help="as instructions.py's: budget, rate, none")
    p.add_argument(
        "--query", default="statement_cache_size=100", help="the store's URL options ('' for unnamed statements)"
    )
    p.add_argument("--warm", type=int, default=30)
    p.add_argument("--calls", type=int, default=120)
    p.add_argument("--bin", default=pgi.PG_BIN, help="PostgreSQL's server binaries")
    args = p.parse_args()
    names = ["base"] + [v for v in args.variants or REMOVED if v != "base"]
    for name in names:
        if name not in REMOVED:
            p.error(f"no variant {name!r}")
    print(f"Server instructions per guarded call, {args.case}, the store's URL options: {args.query or 'none'}")
    with tempfile.TemporaryDirectory(prefix="pg_variants_") as tmp:
        server = pgi.Server(Path(tmp), args.bin)
        try:
            # One call migrates a template database and makes the rows the measured calls update.
            pgi.psql(server.url, "CREATE DATABASE tl_template")
            template = server.url.rsplit("/", 1)[0] + "/tl_template"
            subprocess.run(
                [args.python, "-W", "ignore", pgi.__file__, "--child", args.case, "1", template, args.query],
                check=True,
                capture_output=True,
            )
            settle, admit = definition(template, "tenantllm_settle", 38), definition(template, "tenantllm_admit", 27)
            base = None
            for i, name in enumerate(names):
                db = f"tl_variant_{i}"
                pgi.psql(server.url, f"CREATE DATABASE {db} TEMPLATE tl_template")
                url = server.url.rsplit("/", 1)[0] + "/" + db
                for text, edit in zip((settle, admit), REMOVED[name], strict=True):
                    subprocess.run(
                        ["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", url],
                        input=(edit or str)(text) + ";\n",
                        text=True,
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                n = per_call(server, args.python, db, args.case, args.warm, args.calls, args.query)
                base = n if base is None else base
                print(f"  {name:<26} {n:>12,.0f} {n - base:>+10,.0f}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
