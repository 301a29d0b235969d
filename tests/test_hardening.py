"""Hardening (issue 15): extreme numbers never crash or wrap, agent names cannot corrupt
counters, provider usage is checked, keys do not leak through redirects or cut messages,
budget updates do not undo concurrent ones, database URLs are checked."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pg_everywhere
import pytest
import tenantllm as tl
from conftest import Configure
from fake_providers import FakeProvider, Step

KEYS = {"openai": "sk-test-openai-HARD3N", "anthropic": "sk-ant-test-HARD3N", "gemini": "g-test-key-HARD3N"}
# One model per wire format, all with built-in prices.
MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}


def agent(model: str = "mock/x", **attrs: Any) -> type[tl.Agent]:
    return type("Probe", (tl.Agent,), {"model": model, "user": "{q}", **attrs})


def call(model: str = "mock/x", tenant: Any = "acme", **attrs: Any) -> tl.AgentResult:
    return agent(model, **attrs).call(q="hello", tenant=tenant)


def budgets_cli(db_path: Path) -> list[str]:
    """`tenantllm budgets set acme` on this test's database, in another process."""
    db = pg_everywhere.database_for(str(db_path)) if pg_everywhere.ACTIVE else str(db_path)
    return [sys.executable, "-m", "tenantllm.cli", "budgets", "set", "acme", "--database", db]


def nothing_recorded() -> None:
    assert tl.Execution.all().count() == 0
    assert tl.TenantBudget.all() == []


# ------------------------------------------------------------------ numbers (invariant 8)

MONEY_OUT_OF_RANGE: list[Any] = [
    10**20, 2**63, 2**64, 10**400, -1, Decimal("-0.01"), 1e300, float("inf"), float("nan"),
    Decimal("1e30"), Decimal("79228162514264337593543950335"), "1e999", Decimal("NaN"), "1000000000.01",
]
COUNT_OUT_OF_RANGE: list[Any] = [2**63, 2**64, 10**16, 10**400, -1, -(2**70), 1.5, True, "5"]
SECONDS_OUT_OF_RANGE: list[Any] = [0, -1, 1e300, 10**400, float("inf"), float("nan"), 1e13]


def test_money_limits_out_of_range_are_configuration_errors_everywhere(configure: Configure) -> None:
    for v in MONEY_OUT_OF_RANGE:
        with pytest.raises(tl.ConfigurationError, match="daily_limit"):
            tl.TenantBudget.create("acme", daily_limit=v)
        with pytest.raises(tl.ConfigurationError, match="global_daily"):
            configure(budgets={"global_daily": v})
        with pytest.raises(tl.ConfigurationError, match="Batch"):
            configure(budgets={"per_agent_monthly": {"Batch": v}})
        with pytest.raises(tl.ConfigurationError, match="monthly_limit"):
            call(tenant={"id": "acme", "monthly_limit": v})
    # Request or database data reaching the resolver cannot crash the process either.
    configure(tenant_config_resolver=lambda tenant_id: {"daily_limit": 10**20})
    with pytest.raises(tl.ConfigurationError, match="daily_limit"):
        call()
    nothing_recorded()


def test_the_largest_documented_limits_are_accepted_and_enforced(configure: Configure) -> None:
    b = tl.TenantBudget.create(
        "acme", daily_limit=10**9, monthly_limit=Decimal("999999999.999999999"),
        daily_token_limit=10**15, monthly_execution_limit=10**15,
    )
    assert b.daily_limit == Decimal(10**9) and b.daily_token_limit == 10**15
    assert call().total_cost > 0
    assert tl.TenantBudget.get("acme").daily_remaining < Decimal(10**9)


def test_count_limits_out_of_range_are_configuration_errors(configure: Configure) -> None:
    for v in COUNT_OUT_OF_RANGE:
        with pytest.raises(tl.ConfigurationError, match="monthly_token_limit"):
            tl.TenantBudget.create("acme", monthly_token_limit=v)
        with pytest.raises(tl.ConfigurationError, match="global_daily_executions"):
            configure(budgets={"global_daily_executions": v})
    nothing_recorded()


def test_agent_settings_out_of_range_are_configuration_errors(configure: Configure) -> None:
    bad: list[dict[str, Any]] = [
        *({"timeout": v} for v in SECONDS_OUT_OF_RANGE),
        *({"retries": tl.Retries(max=1, max_delay=v)} for v in [1e300, 10**400, 601, float("nan"), -1]),
        *({"retries": tl.Retries(max=1, base=v)} for v in [1e300, 601, float("inf")]),
        *({"retries": v} for v in [2**40, 2**64, 10**400, 21]),
        *({"max_tokens": v} for v in [2**32, 2**64, 10**400, 100_000_001, 0]),
        *({"circuit_breaker": tl.BreakerPolicy(errors=v)} for v in [2**40, 2**64, 10_001]),
        *({"circuit_breaker": tl.BreakerPolicy(cooldown=v)} for v in SECONDS_OUT_OF_RANGE),
        *({"circuit_breaker": tl.BreakerPolicy(within=v)} for v in SECONDS_OUT_OF_RANGE),
    ]
    for attrs in bad:
        with pytest.raises(tl.ConfigurationError):
            call(**attrs)
        with pytest.raises(tl.ConfigurationError):
            tl.agent(model="mock/x", **attrs)(lambda q: None)
    for kw in [{"max_tokens": 2**32}, {"input_tokens": 2**64}, {"input_tokens": 100_000_001}]:
        with pytest.raises(tl.ConfigurationError):
            with tl.guarded(agent="Batch", model="mock/x", tenant="acme", **kw):
                pass
    nothing_recorded()
    # The documented maxima are accepted.
    assert call(timeout=86_400, max_tokens=100_000_000, retries=tl.Retries(max=20, base=600, max_delay=600),
                circuit_breaker=tl.BreakerPolicy(errors=10_000, within=2_592_000, cooldown=2_592_000)).content


def test_mock_settings_out_of_range(configure: Configure) -> None:
    for v in [1e300, 10**400, 3_600_001, -1, float("nan")]:
        with pytest.raises(tl.ConfigurationError, match="latency_ms"):
            configure(mock={"latency_ms": v})
    for v in [2**64, -1]:
        with pytest.raises(tl.ConfigurationError, match="seed"):
            configure(mock={"seed": v})


def test_the_longest_cooldown_opens_and_short_circuits(configure: Configure) -> None:
    # A cooldown of 1e13 s used to wrap: open with retry_at=None and never short-circuit.
    configure(mock={"failure_rate": 1.0})
    Flaky = agent(circuit_breaker=tl.BreakerPolicy(errors=1, within=60, cooldown=30 * 86_400))
    with pytest.raises(tl.ProviderError):
        Flaky.call(q="x", tenant="acme")
    status = tl.CircuitBreaker.status(Flaky, tenant_id="acme")
    assert status["state"] == "open" and status["retry_at"] is not None
    with pytest.raises(tl.CircuitOpenError):
        Flaky.call(q="x", tenant="acme")


def test_wrong_types_are_typed_errors_not_type_errors(configure: Configure) -> None:
    with pytest.raises(tl.ConfigurationError, match="openai"):
        tl.ApiConfiguration.set_global(openai=5)  # type: ignore[arg-type]
    with pytest.raises(tl.InvalidTenantError):
        tl.ApiConfiguration.set_for_tenant(5, openai="sk-x")  # type: ignore[arg-type]
    with pytest.raises(tl.ConfigurationError, match="tenant_id"):
        tl.Execution.by_tenant(5).count()  # type: ignore[arg-type]
    with pytest.raises(tl.ConfigurationError, match="agent"):
        tl.Execution.all().by_agent(5).count()  # type: ignore[arg-type]
    with pytest.raises(tl.ConfigurationError, match="user"):
        agent(user=None)
    for lookup in (tl.TenantBudget.find, tl.TenantBudget.get):
        with pytest.raises(tl.InvalidTenantError):
            lookup(5)  # type: ignore[arg-type]
    with pytest.raises(tl.ConfigurationError, match="execution id"):
        tl.Execution.get(5)  # type: ignore[arg-type]
    call()
    assert tl.Execution.by_tenant("acme").count() == 1


def test_cli_budget_out_of_range_is_one_line_not_a_traceback(db_path: Path) -> None:
    call()  # the database exists
    argv = [*budgets_cli(db_path), "--daily-limit", "100000000000000000000"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "panic" not in r.stderr.lower(), r.stderr
    assert "daily_limit" in r.stderr and "at most" in r.stderr, r.stderr
    assert tl.TenantBudget.find("acme") is None


# ------------------------------------------------------------------ agent names

@pytest.mark.parametrize("name", ["Batch\tnightly", "Batch\nnightly", "a\x1bb", "x" * 256, " "])
def test_agent_names_are_checked_like_tenant_ids(configure: Configure, name: str) -> None:
    with pytest.raises(tl.ConfigurationError, match="agent name"):
        with tl.guarded(agent=name, model="mock/x", tenant="acme"):
            pass
    with pytest.raises(tl.ConfigurationError, match="agent name"):
        type(name, (tl.Agent,), {"model": "mock/x", "user": "{q}"}).call(q="x", tenant="acme")
    with pytest.raises(tl.ConfigurationError, match="agent name"):
        configure(budgets={"per_agent_daily": {name: 5}})
    nothing_recorded()


def test_a_reservation_releases_what_it_took(configure: Configure) -> None:
    """A block that reserves and ends releases its reservation, so the next block fits."""
    configure(budgets={"global_daily": "0.01", "per_agent_daily": {"Batch nightly": "0.01"}})
    for _ in range(5):
        with tl.guarded(agent="Batch nightly", model="gpt-4o", max_tokens=600, tenant="acme") as g:
            g.record(input_tokens=10, output_tokens=10)


# ------------------------------------------------------------------ provider usage

@pytest.fixture
def fp(server: FakeProvider, monkeypatch: pytest.MonkeyPatch, configure: Configure) -> FakeProvider:
    server.reset()
    configure(base_urls=server.base_urls(), api_keys=dict(KEYS))
    return server


BAD_USAGE: list[dict[str, Any]] = [
    {"input_tokens": -100_000_000},
    {"output_tokens": -1},
    {"cached_tokens": -5},
    {"input_tokens": 2**62},
    {"output_tokens": 100_000_001},
    {"input_tokens": 12.5},
    {"cached_tokens": "7"},
    {"input_tokens": 2**64},
]


@pytest.mark.parametrize("wire", sorted(MODELS))
def test_bad_provider_usage_is_an_invalid_response_with_an_error_row(fp: FakeProvider, wire: str) -> None:
    tl.TenantBudget.create("acme", daily_limit="0.05", enforcement="hard")
    for usage in BAD_USAGE:
        fp.script(Step(**usage))
        with pytest.raises(tl.InvalidResponseError, match=r"usage|malformed"):
            call(MODELS[wire])
    # Out of range is not retried: the same server would answer the same way.
    fp.script(Step(input_tokens=-1), Step())
    with pytest.raises(tl.InvalidResponseError, match="usage"):
        call(MODELS[wire], retries=2)
    rows = list(tl.Execution.all())
    assert len(rows) == len(BAD_USAGE) + 1 and len(fp.requests) == len(BAD_USAGE) + 1
    assert {r.status for r in rows} == {"error"}
    assert {r.error_class for r in rows} == {"InvalidResponseError"}
    assert all(r.total_cost == 0 and r.total_tokens == 0 for r in rows)
    # Counters never went down: no budget was handed back.
    spent = tl.spend_by_tenant("daily")["acme"]
    assert spent["cost"] == 0 and spent["tokens"] == 0
    # The hard budget still holds: a call that could cost more than $0.05 is refused.
    with pytest.raises(tl.BudgetExceededError):
        call(MODELS[wire], max_tokens=100_000)


def test_bad_usage_reported_by_a_guarded_block(configure: Configure) -> None:
    bad = [{"prompt_tokens": -100, "completion_tokens": 1}, {"prompt_tokens": 2**64, "completion_tokens": 1},
           {"input_tokens": 1, "output_tokens": 2**62}]
    for usage in bad:
        with pytest.raises(tl.InvalidResponseError):
            with tl.guarded(agent="Batch", model="gpt-4o", tenant="acme") as g:
                g.record_response({"usage": usage})
    with pytest.raises(tl.InvalidResponseError):
        with tl.guarded(agent="Batch", model="gpt-4o", tenant="acme") as g:
            g.record(input_tokens=2**62, output_tokens=0)
    rows = list(tl.Execution.all())
    assert len(rows) == 4 and {(r.status, r.error_class) for r in rows} == {("error", "InvalidResponseError")}
    assert tl.spend_by_tenant("daily")["acme"]["cost"] == 0


# ------------------------------------------------------------------ cancelled acall

async def test_a_cancelled_acall_is_settled_when_the_cancellation_arrives(fp: FakeProvider,
                                                                         configure: Configure) -> None:
    """The row is `cancelled` (not `running`) and the reservation released by the time
    `await task` raises CancelledError, not a moment later."""
    slow = agent("gpt-4o", max_tokens=10)
    estimate = slow.call(q="hi", tenant="acme", dry_run=True)["estimated_cost"]
    # One call's reservation fits, two do not.
    configure(base_urls=fp.base_urls(), api_keys=dict(KEYS), budgets={"global_daily": estimate * 3 / 2})
    for i in range(1, 6):
        fp.script(Step(kind="slow", delay=5))
        task = asyncio.ensure_future(slow.acall(q="hi", tenant="acme"))
        while len(fp.requests) < 2 * i - 1:  # the slow request arrived
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rows = [r for r in tl.Execution.all() if r.status != "success"]
        assert [(r.status, r.error_class) for r in rows] == [("cancelled", "CancelledError")] * i
        assert all(r.completed_at is not None and r.total_cost == 0 for r in rows)
        # The reservation is gone: a call admitted now fits the limit.
        fp.script(Step(input_tokens=1, output_tokens=1))
        assert (await slow.acall(q="hi", tenant="acme")).total_tokens == 2


# ------------------------------------------------------------------ redirects

class _Redirector(BaseHTTPRequestHandler):
    target = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.send_response(307)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()


@pytest.fixture
def redirector(fp: FakeProvider) -> Iterator[str]:
    """A second loopback server (another port: another origin) redirecting to `fp`."""
    handler = type("Redirect", (_Redirector,), {"target": fp.base_url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("wire", sorted(MODELS))
def test_redirects_are_not_followed_with_the_key(fp: FakeProvider, redirector: str, configure: Configure,
                                                 wire: str) -> None:
    urls = {"openai": redirector + "/v1", "anthropic": redirector, "gemini": redirector}
    configure(base_urls=urls, api_keys=dict(KEYS))
    with pytest.raises(tl.ProviderError, match="redirect") as e:
        call(MODELS[wire], retries=2)
    assert e.value.status == 307 and not e.value.retryable
    assert fp.requests == []  # the key never reached the other origin
    assert KEYS[wire] not in str(e.value)


# ------------------------------------------------------------------ key redaction

class _PlainError(BaseHTTPRequestHandler):
    body = b""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(500)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.body)


def test_a_key_in_a_long_error_body_is_redacted_at_every_offset(configure: Configure) -> None:
    key = "sk-leak-0123456789abcdefghij"
    handler: type[_PlainError] = type("Plain", (_PlainError,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        configure(base_urls={"openai": f"http://127.0.0.1:{server.server_address[1]}/v1"}, api_keys={"openai": key})
        cut = 500
        for offset in range(cut - len(key) - 2, cut + 3):
            handler.body = ("<" * offset + key + ">" * 300).encode()
            with pytest.raises(tl.ProviderError) as e:
                call("gpt-4o")
            row = tl.Execution.all().order_by("-started_at").first()
            assert row is not None and row.status == "error"
            for text in [str(e.value), row.error_message or "", json.dumps(row.attempts)]:
                for n in range(6, len(key) + 1):
                    assert key[:n] not in text, (offset, text[-80:])
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ budgets

def test_update_changes_only_the_named_fields(db_path: Path) -> None:
    mine = tl.TenantBudget.create("acme", daily_limit=10, enforcement="hard")
    # An operator changes other fields meanwhile, from another process.
    argv = [*budgets_cli(db_path), "--monthly-limit", "50", "--enforcement", "soft"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    mine.update(daily_limit=12)
    stored = tl.TenantBudget.get("acme")
    assert (stored.daily_limit, stored.monthly_limit, stored.enforcement) == (Decimal(12), Decimal(50), "soft")
    assert mine == stored  # reloaded from what is stored
    mine.update(monthly_limit=None)
    assert tl.TenantBudget.get("acme").monthly_limit is None
    with pytest.raises(tl.ConfigurationError):
        mine.update(daily_limit=10**20)
    with pytest.raises(tl.ConfigurationError, match="nosuch"):
        mine.update(nosuch=1)
    assert tl.TenantBudget.get("acme") == mine


# ------------------------------------------------------------------ database URLs and files

@pytest.mark.sqlite_only
@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://app:s3cr3t-pw@127.0.0.1:1/x",
    "mysql://app:s3cr3t-pw@127.0.0.1/x",
    "http://app:s3cr3t-pw@127.0.0.1/x",
])
def test_unknown_url_schemes_are_errors_with_the_password_masked(url: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(tl.ConfigurationError, match="scheme") as e:
        tl.configure(database=url)
    assert "s3cr3t" not in str(e.value) and "***" in str(e.value)
    assert list(cwd.iterdir()) == []  # nothing was created as a file


@pytest.mark.sqlite_only
def test_url_schemes_are_case_insensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(tl.StoreError) as e:  # PostgreSQL, on a port nothing listens on
        tl.configure(database="POSTGRESQL://app:s3cr3t-pw@127.0.0.1:1/x")
    assert "s3cr3t" not in str(e.value)
    assert list(cwd.iterdir()) == []
    tl.configure(database=f"SQLite:///{tmp_path / 'upper.db'}")
    call()
    assert (tmp_path / "upper.db").exists()


@pytest.mark.sqlite_only
def test_a_foreign_sqlite_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE executions (id INTEGER PRIMARY KEY, command TEXT, host TEXT)")
        c.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY)")
    with pytest.raises(tl.StoreError, match="not a tenantllm database") as e:
        tl.configure(database=str(path))
    assert "\n" not in str(e.value) and "CREATE" not in str(e.value) and len(str(e.value)) < 300
    with sqlite3.connect(path) as c:  # untouched
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"executions", "jobs"}


def test_configured_keys_for_unknown_providers_are_refused(configure: Configure) -> None:
    with pytest.raises(tl.ConfigurationError, match="nosuch"):
        configure(api_keys={"nosuch": "k"})
    configure(api_keys={"local": "k"}, base_urls={"local": "http://127.0.0.1:1/v1"})


# ------------------------------------------------------------------ no panic reaches Python

def test_extreme_values_never_escape_as_non_tenantllm_errors(configure: Configure) -> None:
    """Every extreme value through every numeric entry point: a TenantLLMError or success,
    never a PanicException, OverflowError, TypeError or ValueError."""
    values: list[Any] = [0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**400, -(10**400), 1e300, -1e300,
                         float("inf"), float("nan"), 1e-300, Decimal("1e-30"), Decimal("1e28"), "1e400", None]
    entry_points: list[Callable[[Any], Any]] = [
        lambda v: tl.TenantBudget.create("acme", daily_limit=v).delete(),
        lambda v: tl.TenantBudget.create("acme", daily_execution_limit=v).delete(),
        lambda v: configure(budgets={"global_monthly": v, "global_monthly_tokens": 5}),
        lambda v: configure(mock={"latency_ms": 0, "failure_rate": v}),
        lambda v: call(tenant={"id": "acme", "daily_token_limit": v}),
        lambda v: call(temperature=v),
        lambda v: call(timeout=v),
        lambda v: call(retries=tl.Retries(max=1, base=v)),
        lambda v: call(circuit_breaker=tl.BreakerPolicy(within=v)),
        lambda v: tl.Execution.all().last_n_days(v).count(),
        lambda v: tl.Execution.all().limit(v).count(),
    ]
    for fn in entry_points:
        for v in values:
            try:
                fn(v)
            except tl.TenantLLMError:
                pass
            configure()


# ------------------------------------------------------------------ every public argument

# Values of the wrong type or outside every range, for arguments of each kind.
WRONG_FOR_TEXT: list[Any] = [5, 1.5, float("nan"), b"x", ["x"], {"x": 1}, object(), True]
WRONG_FOR_ID: list[Any] = [*WRONG_FOR_TEXT, "", "a\x00b", "a\tb", "x" * 256]
WRONG_FOR_COUNT: list[Any] = [None, "5", 1.5, float("nan"), float("inf"), -1, 2**64, 10**400, True, b"5", []]
WRONG_FOR_SECONDS: list[Any] = [None, "5", float("nan"), float("inf"), -1, 0, 1e300, 10**400, True, []]


def probe() -> type[tl.Agent]:
    return type("Probe", (tl.Agent,), {"model": "mock/x", "user": "{q}"})


def call_in(context: Any) -> None:
    """A call that takes its tenant from `with context:` (`tl.tenant(...)`)."""
    with context:
        probe().call(q="x")


# (what is probed, how, the values it must refuse, a pattern its error names)
PUBLIC_ARGUMENTS: list[tuple[str, Callable[[Any], Any], list[Any], str]] = [
    ("CircuitBreaker.status agent", lambda v: tl.CircuitBreaker.status(agent=v, model="mock/x"),
     [*WRONG_FOR_TEXT, None], "agent"),
    ("CircuitBreaker.status model", lambda v: tl.CircuitBreaker.status(agent="A", model=v), WRONG_FOR_TEXT, "model"),
    ("CircuitBreaker.status agent without model", lambda v: tl.CircuitBreaker.status(agent=v),
     WRONG_FOR_TEXT, "agent"),
    ("CircuitBreaker.status tenant_id", lambda v: tl.CircuitBreaker.status(agent=probe(), tenant_id=v),
     WRONG_FOR_TEXT, "tenant_id"),
    ("CircuitBreaker.open_for agent", lambda v: tl.CircuitBreaker.open_for(agent=v, model="mock/x"),
     WRONG_FOR_TEXT, "agent"),
    ("CircuitBreaker.reset agent", lambda v: tl.CircuitBreaker.reset(agent=v, model="mock/x"), WRONG_FOR_TEXT, "agent"),
    ("CircuitBreaker.reset tenant_id", lambda v: tl.CircuitBreaker.reset(agent=probe(), tenant_id=v),
     WRONG_FOR_TEXT, "tenant_id"),
    ("ApiConfiguration.providers", lambda v: tl.ApiConfiguration.providers(v), WRONG_FOR_TEXT, "tenant_id"),
    ("ApiConfiguration.set_global", lambda v: tl.ApiConfiguration.set_global(openai=v), WRONG_FOR_TEXT, "openai"),
    ("ApiConfiguration.set_for_tenant", lambda v: tl.ApiConfiguration.set_for_tenant(v, openai="k"),
     [*WRONG_FOR_TEXT, None], "tenant_id"),
    ("spend_by_tenant", lambda v: tl.spend_by_tenant(v), [*WRONG_FOR_TEXT, None, "weekly", ""], "period"),
    ("order_by", lambda v: tl.Execution.all().order_by(v).count(), [*WRONG_FOR_TEXT, None, "", "nosuch"],
     "order_by|field"),
    ("group_by", lambda v: tl.Execution.all().group_by(v).count(), [*WRONG_FOR_TEXT, None, "", "nosuch"],
     "group_by|field"),
    ("group_by(...).sum", lambda v: tl.Execution.all().group_by("agent").sum(v), [*WRONG_FOR_TEXT, None, "agent"],
     "sum|field"),
    ("sum", lambda v: tl.Execution.all().sum(v), [*WRONG_FOR_TEXT, None, "status"], "sum|field"),
    ("by_tenant", lambda v: tl.Execution.by_tenant(v).count(), WRONG_FOR_TEXT, "tenant_id"),
    ("by_agent", lambda v: tl.Execution.by_agent(v).count(), [*WRONG_FOR_TEXT, None], "agent"),
    ("by_model", lambda v: tl.Execution.by_model(v).count(), [*WRONG_FOR_TEXT, None], "model"),
    ("by_status", lambda v: tl.Execution.by_status(v).count(), [*WRONG_FOR_TEXT, None, "", "nosuch"], "status"),
    ("where field", lambda v: tl.Execution.all().where(v, "x").count(), [*WRONG_FOR_TEXT, None, "", "nosuch"], "field"),
    ("limit", lambda v: tl.Execution.all().limit(v).count(), WRONG_FOR_COUNT, "limit"),
    ("offset", lambda v: tl.Execution.all().offset(v).count(), WRONG_FOR_COUNT, "offset"),
    ("last_n_days", lambda v: tl.Execution.last_n_days(v).count(), [*WRONG_FOR_COUNT, 0, 100_001], "last_n_days"),
    ("between", lambda v: tl.Execution.between(v, None).count(), [*WRONG_FOR_TEXT, "2026-01-01"], "start"),
    ("Execution.get", lambda v: tl.Execution.get(v), [*WRONG_FOR_TEXT, None], "execution id"),
    ("TenantBudget.create tenant_id", lambda v: tl.TenantBudget.create(v, daily_limit=1), [*WRONG_FOR_ID, None],
     "tenant"),
    ("TenantBudget.create name", lambda v: tl.TenantBudget.create("acme", name=v), WRONG_FOR_TEXT, "name"),
    ("TenantBudget.create enforcement", lambda v: tl.TenantBudget.create("acme", enforcement=v),
     [*WRONG_FOR_TEXT, "", "strict"], "enforcement"),
    ("TenantBudget.find", lambda v: tl.TenantBudget.find(v), [*WRONG_FOR_TEXT, None], "tenant"),
    ("TenantBudget.find_or_create", lambda v: tl.TenantBudget.find_or_create(v), [*WRONG_FOR_ID, None], "tenant"),
    ("usage_daily days (dashboard)", lambda v: tl.config.engine().usage_daily("global", v),
     [*WRONG_FOR_COUNT, 0, 100_001, 2**40], "days"),
    ("usage_daily scope (dashboard)", lambda v: tl.config.engine().usage_daily(v, 3), [*WRONG_FOR_TEXT, None], "scope"),
    ("set_timezone", lambda v: tl.set_timezone(v), [*WRONG_FOR_TEXT, None, "", "Mars/Olympus", "a\x00b"], "timezone"),
    ("configure database", lambda v: tl.configure(database=v), [*WRONG_FOR_TEXT, "", "a\x00b"], "database"),
    ("configure timezone", lambda v: tl.configure(timezone=v), [*WRONG_FOR_TEXT, "", "Mars/Olympus"], "timezone"),
    ("configure multi_tenancy_enabled", lambda v: tl.configure(multi_tenancy_enabled=v), [5, "yes", 1.5, []],
     "multi_tenancy_enabled"),
    ("configure budgets", lambda v: tl.configure(budgets=v), [5, "x", [], {"nosuch": 1}], "budgets|nosuch"),
    ("configure enforcement", lambda v: tl.configure(budgets={"enforcement": v}), [*WRONG_FOR_TEXT, ""],
     "enforcement"),
    ("configure pricing", lambda v: tl.configure(pricing={"m": {"input": v, "output": "1"}}),
     [b"x", ["x"], object(), True, "-1", "1e999", float("inf"), float("nan")], "input|pricing"),
    ("configure api_keys", lambda v: tl.configure(api_keys={"openai": v}), WRONG_FOR_TEXT, "api_keys"),
    ("configure base_urls", lambda v: tl.configure(base_urls={"openai": v}), WRONG_FOR_TEXT, "base_urls"),
    ("configure mock seed", lambda v: tl.configure(mock={"seed": v}), [*WRONG_FOR_COUNT[1:], 2**64], "seed"),
    ("configure hooks", lambda v: tl.configure(tenant_resolver=v), [5, "x", []], "tenant_resolver"),
    ("Agent.model", lambda v: call(model=v), [*WRONG_FOR_TEXT, None, ""], "model"),
    ("Agent.temperature", lambda v: call(temperature=v), ["1", float("nan"), float("inf"), -1, 3, 10**400, []],
     "temperature"),
    ("Agent.max_tokens", lambda v: call(max_tokens=v), [*WRONG_FOR_COUNT, 0, 100_000_001], "max_tokens"),
    ("Agent.timeout", lambda v: call(timeout=v), WRONG_FOR_SECONDS, "timeout"),
    ("Agent.system", lambda v: call(system=v), [5, b"x", ["x"], "{q!x}", "{0}"], "system"),
    ("Agent.retries", lambda v: call(retries=v), [*WRONG_FOR_COUNT, 21], "retries"),
    ("Retries.backoff", lambda v: call(retries=tl.Retries(backoff=v)), [*WRONG_FOR_TEXT, None, "", "random"],
     "backoff"),
    ("Retries.base", lambda v: call(retries=tl.Retries(base=v)), [None, "1", float("nan"), -1, 601, 10**400],
     "base"),
    ("Agent.fallback_models", lambda v: call(fallback_models=v), [5, "gpt-4o", [5], [None], [""]], "fallback|model"),
    ("Agent.circuit_breaker", lambda v: call(circuit_breaker=v), [5, "x", {"errors": 1}], "circuit_breaker"),
    ("BreakerPolicy.errors", lambda v: call(circuit_breaker=tl.BreakerPolicy(errors=v)), [*WRONG_FOR_COUNT, 0, 10_001],
     "errors"),
    ("BreakerPolicy.within", lambda v: call(circuit_breaker=tl.BreakerPolicy(within=v)), WRONG_FOR_SECONDS, "within"),
    # (int ids are taken as their decimal string)
    ("call tenant", lambda v: call(tenant=v), [*WRONG_FOR_ID[1:-1], [], "x" * 256], "tenant"),
    ("call tenant dict", lambda v: call(tenant={"id": "acme", **v}),
     [{"nosuch": 1}, {"api_keys": 5}, {"api_keys": {"openai": 5}}, {"name": 5}, {"enforcement": "x"}],
     "nosuch|api_keys|openai|name|enforcement"),
    ("call dry_run", lambda v: probe().call(q="x", tenant="acme", dry_run=v), [5, "yes", None], "dry_run"),
    ("execution_metadata", lambda v: type("M", (probe(),), {"execution_metadata": lambda self: v}).call(
        q="x", tenant="acme"), [5, "x", [1], {"x": float("nan")}], "metadata"),
    ("tenant()", lambda v: call_in(tl.tenant(v)), [1.5, b"x", [], "", "a\tb", {"id": 1.5}, {"nosuch": 1}],
     "tenant"),
    ("@agent model", lambda v: tl.agent(model=v)(lambda q: "x"), [*WRONG_FOR_TEXT, None, ""], "model"),
    ("@agent system", lambda v: tl.agent(model="mock/x", system=v)(lambda q: "x"), [5, "{nosuch}"], "system|nosuch"),
    ("guarded agent", lambda v: tl.guarded(agent=v, model="mock/x", tenant="acme").__enter__(),
     [*WRONG_FOR_ID, None], "agent"),
    ("guarded model", lambda v: tl.guarded(agent="B", model=v, tenant="acme").__enter__(),
     [*WRONG_FOR_TEXT, None, ""], "model"),
    ("guarded max_tokens", lambda v: tl.guarded(agent="B", model="mock/x", max_tokens=v), [*WRONG_FOR_COUNT, 0],
     "max_tokens"),
    ("guarded input_tokens", lambda v: tl.guarded(agent="B", model="mock/x", input_tokens=v, tenant="acme").__enter__(),
     [*WRONG_FOR_COUNT, 100_000_001], "input_tokens"),
    ("guarded timeout", lambda v: tl.guarded(agent="B", model="mock/x", timeout=v), [*WRONG_FOR_SECONDS, 86_401],
     "timeout"),
    ("guarded metadata", lambda v: tl.guarded(agent="B", model="mock/x", metadata=v), [5, "x", [1]], "metadata"),
    ("guard agent", lambda v: tl.guard(agent=v, model="mock/x"), [*WRONG_FOR_ID, None], "agent"),
    ("llm_tenant id", lambda v: tl.llm_tenant(id=v), [*WRONG_FOR_TEXT, None, "", "not an attribute"], "llm_tenant"),
    ("guarded record", lambda v: tl.guarded(agent="B", model="mock/x").record(input_tokens=v, output_tokens=1),
     [v for v in WRONG_FOR_COUNT if v not in (2**64, 10**400)], "input_tokens"),  # too large: InvalidResponseError
]


def stored_state() -> tuple[Any, ...]:
    """Everything a refused call must leave as it was."""
    e = tl.config.engine()
    return (tl.Execution.all().to_dicts(), tl.TenantBudget.all(), e.database, e.timezone, tl.spend_by_tenant("daily"),
            tl.ApiConfiguration.providers(), tl.CircuitBreaker.not_closed())


@pytest.mark.parametrize("what, run, refused, names", PUBLIC_ARGUMENTS, ids=[p[0] for p in PUBLIC_ARGUMENTS])
def test_every_public_argument_refuses_bad_values_naming_it(configure: Configure, monkeypatch: pytest.MonkeyPatch,
                                                            what: str, run: Callable[[Any], Any], refused: list[Any],
                                                            names: str) -> None:
    """Wrong types, None, negative, NaN, inf, huge ints, empty strings and control characters:
    a TenantLLMError naming the argument, nothing changed, never a TypeError or a panic."""
    if pg_everywhere.ACTIVE and what == "configure database":
        pytest.skip("the PostgreSQL pass turns every database value into a PostgreSQL URL")
    monkeypatch.setenv("TENANTLLM_SECRET_KEY", "tenantllm-test-secret-hardening")
    configure()
    call()  # a row, so queries have something to refuse to read
    before = stored_state()
    for v in refused:
        with pytest.raises(tl.TenantLLMError, match=names) as e:
            run(v)
        assert "\n" not in str(e.value).strip(), (v, str(e.value))
        assert stored_state() == before, (what, v)
        configure()
