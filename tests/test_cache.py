"""The response cache (`cache_ttl`): the same tenant's identical call within the TTL is answered
from the store on a `cached` row costing 0, with no provider request (counted on a fake OpenAI
server); anything that shapes the answer changes the key; entries expire and are swept."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import raw_sql
import tenantllm as tl
from fake_providers import FakeProvider, Step


class Faq(tl.Agent):
    model = "gpt-4o-mini"
    system = "You answer questions about {company}."
    user = "{q}"
    max_tokens = 200
    cache_ttl = 3600


@pytest.fixture
def fp(server: FakeProvider, db_path: Path) -> FakeProvider:
    server.reset()
    tl.configure(reset=True, database=str(db_path), base_urls=server.base_urls(), api_keys={"openai": "sk-o"})
    return server


def ask(agent: type[tl.Agent] = Faq, tenant: Any = "acme", **kw: Any) -> tl.AgentResult:
    params = {"company": "Acme", "q": "Opening hours?", **kw}
    return agent.call(tenant=tenant, **params)


def entries(db: Path) -> int:
    return int(raw_sql.query(db, "SELECT COUNT(*) FROM response_cache")[0][0] or 0)


def test_a_hit_answers_from_the_store_on_a_free_cached_row(fp: FakeProvider, db_path: Path) -> None:
    fp.script(Step(content="9 to 5.", input_tokens=40, output_tokens=5))
    first = ask()
    assert not first.cached and first.total_cost > 0 and len(fp.requests) == 1
    hit = ask()
    assert len(fp.requests) == 1, "no provider request"
    assert hit.cached and hit.content == "9 to 5." and hit.execution_id != first.execution_id
    assert (hit.total_cost, hit.input_tokens, hit.output_tokens, hit.attempts_count) == (0, 0, 0, 0)
    assert hit.chosen_model_id == first.chosen_model_id and hit.finish_reason == "stop"
    row = tl.Execution.get(hit.execution_id)
    assert row.cached and row.status == "success" and row.total_cost == 0 and row.total_tokens == 0
    assert row.attempts == [] and row.provider == "openai" and row.chosen_model_id == first.chosen_model_id
    assert row.metadata == {"cached_from": first.execution_id}
    assert row.response == "9 to 5." and row.user_prompt == "Opening hours?"
    assert not tl.Execution.get(first.execution_id).cached
    # Nothing is left reserved, and the counters hold two executions at the first one's cost.
    raw_sql.assert_counters_match_rows(db_path)
    assert tl.TenantBudget.find_or_create("acme").current_daily_spending == first.total_cost


def test_queries_filter_cached_rows_and_rollups_count_them_at_cost_zero(fp: FakeProvider) -> None:
    paid = ask()
    for _ in range(3):
        assert ask().cached
    ask(tenant="globex")
    assert tl.Execution.all().where("cached", True).count() == 3
    assert tl.Execution.all().where("cached", False).count() == 2
    assert [e.cached for e in tl.Execution.by_tenant("acme").order_by("started_at")] == [False, True, True, True]
    # Whole-day totals read the rollups: the cached calls are counted, at cost 0.
    assert tl.Execution.today().group_by("tenant_id").count() == {"acme": 4, "globex": 1}
    assert tl.Execution.today().by_tenant("acme").sum("total_cost") == paid.total_cost
    assert tl.Execution.today().where("cached", True).sum("total_cost") == Decimal(0)
    assert tl.Execution.by_tenant("acme").where("cached", True).group_by("day").count() != {}


def test_a_call_that_would_be_refused_is_refused_on_a_hit_too(fp: FakeProvider, db_path: Path) -> None:
    # The tenant's per-call keys are not part of the cache key: a hit must still be validated.
    ask()
    with pytest.raises(tl.ConfigurationError, match="nosuch"):
        ask(tenant={"id": "acme", "api_keys": {"nosuch": "k"}})
    assert len(fp.requests) == 1
    assert int(raw_sql.query(db_path, "SELECT COUNT(*) FROM executions")[0][0]) == 1


def test_two_tenants_never_share_an_entry(fp: FakeProvider, db_path: Path) -> None:
    a, b = ask(tenant="acme"), ask(tenant="globex")
    assert not a.cached and not b.cached and len(fp.requests) == 2
    no_tenant = ask(tenant=None)
    assert not no_tenant.cached and len(fp.requests) == 3
    assert ask(tenant="acme").cached and ask(tenant="globex").cached and ask(tenant=None).cached
    assert len(fp.requests) == 3 and entries(db_path) == 3


def test_what_shapes_the_answer_changes_the_key(fp: FakeProvider) -> None:
    ask()
    variants: list[tuple[type[tl.Agent], dict[str, Any]]] = [
        (Faq, {"q": "Closing hours?"}),
        (Faq, {"company": "Globex"}),
        (Faq, {"history": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        (type("Faq", (Faq,), {"temperature": 0.2}), {}),
        (type("Faq", (Faq,), {"max_tokens": 201}), {}),
        (type("Faq", (Faq,), {"model": "gpt-4o"}), {}),
        (type("Faq", (Faq,), {"fallback_models": ["gpt-4o"]}), {}),
        (type("Faq", (Faq,), {"system": None, "user": "You answer questions about {company}.{q}"}), {}),
    ]
    for agent, kw in variants:
        n = len(fp.requests)
        assert not ask(agent, **kw).cached, (agent, kw)
        assert len(fp.requests) == n + 1
    # The same agent under another class name, same settings: the key is the call's, not the name's.
    twin = type("FaqTwin", (Faq,), {})
    assert ask(twin).cached


def test_schema_and_tools_change_the_key(fp: FakeProvider) -> None:
    pytest.importorskip("pydantic")
    pytest.importorskip("jsonschema")
    fp.default = Step(content='{"hours": "9-5"}')

    def opening(day: str) -> str:
        """Opening hours on a day."""
        return "9-5"

    schema: dict[str, Any] = {"title": "Hours", "type": "object", "properties": {"hours": {"type": "string"}}}
    plain = ask()
    with_schema = type("Faq", (Faq,), {"schema": schema})
    other_schema = type("Faq", (Faq,), {"schema": {**schema, "required": ["hours"]}})
    with_tools = type("Faq", (Faq,), {"tools": [opening]})
    for agent in (with_schema, other_schema, with_tools):
        assert not ask(agent).cached
    assert ask(with_schema).parsed == {"hours": "9-5"} and ask(with_schema).cached
    assert ask(with_tools).cached and ask().content == plain.content


def test_entries_expire_and_expired_ones_are_swept(fp: FakeProvider, db_path: Path) -> None:
    # Long enough for a loaded machine to make the calls in between, short enough to wait for.
    short = type("Faq", (Faq,), {"cache_ttl": 3})
    for q in ("a", "b", "c"):
        ask(short, q=q)
    assert ask(short, q="a").cached and entries(db_path) == 3
    time.sleep(3.1)
    n = len(fp.requests)
    again = ask(short, q="a")
    assert not again.cached and len(fp.requests) == n + 1
    # That write removed the expired entries (b, c and the old a) and stored the new a.
    assert entries(db_path) == 1
    assert ask(short, q="a").cached


def test_concurrent_misses_both_call_and_leave_one_entry(fp: FakeProvider, db_path: Path) -> None:
    fp.script(Step(content="first", delay=0.3), Step(content="second", delay=0.3))
    results: list[tl.AgentResult] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        results.append(ask())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fp.requests) == 2 and not any(r.cached for r in results)
    assert entries(db_path) == 1
    stored = raw_sql.query(db_path, "SELECT content, execution_id FROM response_cache")[0]
    assert stored[0] in ("first", "second")
    assert stored[1] == next(r.execution_id for r in results if r.content == stored[0])
    hits = [ask() for _ in range(3)]
    assert {h.content for h in hits} == {stored[0]} and all(h.cached for h in hits)


def test_dry_run_reads_the_cache_and_writes_nothing(fp: FakeProvider, db_path: Path) -> None:
    plan = Faq.call(company="Acme", q="Opening hours?", tenant="acme", dry_run=True)
    assert plan["cached"] is False and plan["cache_ttl"] == 3600
    assert tl.Execution.all().count() == 0 and entries(db_path) == 0 and fp.requests == []
    ask()
    plan = Faq.call(company="Acme", q="Opening hours?", tenant="acme", dry_run=True)
    assert plan["cached"] is True
    assert Faq.call(company="Acme", q="Opening hours?", tenant="globex", dry_run=True)["cached"] is False
    assert tl.Execution.all().count() == 1 and len(fp.requests) == 1


def test_an_exhausted_budget_still_gets_cached_answers_but_counts_limits_apply(fp: FakeProvider) -> None:
    first = ask()
    # The tenant has spent exactly its daily limit: a new call needs more and is refused...
    tl.TenantBudget.create("acme", daily_limit=first.total_cost, daily_execution_limit=2, enforcement="hard")
    with pytest.raises(tl.BudgetExceededError) as e:
        ask(q="Something new?")
    assert e.value.scope == "tenant_daily"
    # ...a cached answer needs nothing, so it is given; the execution limit counts it.
    assert ask().cached
    with pytest.raises(tl.BudgetExceededError) as e:
        ask()
    assert e.value.scope == "tenant_daily_executions"
    assert len(fp.requests) == 1
    assert [x.status for x in tl.Execution.all().order_by("started_at")] == ["success", "blocked", "success", "blocked"]


def test_an_open_breaker_does_not_refuse_a_cached_answer(fp: FakeProvider) -> None:
    guarded = type("Faq", (Faq,), {"circuit_breaker": tl.BreakerPolicy(errors=1, within=60, cooldown=300)})
    ask(guarded)
    fp.script(Step(kind="status", status=400))
    with pytest.raises(tl.ProviderError):
        ask(guarded, q="Other?")
    assert tl.CircuitBreaker.open_for(agent=guarded, tenant_id="acme")
    with pytest.raises(tl.CircuitOpenError):
        ask(guarded, q="Other?")
    assert ask(guarded).cached


def test_a_hit_streams_as_one_piece_and_a_streamed_answer_is_kept(fp: FakeProvider) -> None:
    fp.script(Step(content="Nine to five, weekdays."))
    s = Faq.stream(company="Acme", q="Opening hours?", tenant="acme")
    assert "".join(s) == "Nine to five, weekdays." and not s.result.cached
    s = Faq.stream(company="Acme", q="Opening hours?", tenant="acme")
    assert list(s) == ["Nine to five, weekdays."] and s.result.cached
    assert ask().cached and len(fp.requests) == 1


async def test_acall_and_astream_hit_too(fp: FakeProvider) -> None:
    await Faq.acall(company="Acme", q="Async?", tenant="acme")
    assert (await Faq.acall(company="Acme", q="Async?", tenant="acme")).cached
    pieces = [p async for p in Faq.astream(company="Acme", q="Async?", tenant="acme")]
    assert len(pieces) == 1 and len(fp.requests) == 1


def test_answers_cut_off_are_not_kept(fp: FakeProvider, db_path: Path) -> None:
    fp.script(Step(content="Nine to", finish_reason="length"))
    assert ask().finish_reason == "length"
    assert not ask().cached and entries(db_path) == 1


def test_no_cache_ttl_means_no_cache(fp: FakeProvider, db_path: Path) -> None:
    off: list[type[tl.Agent]] = [type("Faq", (Faq,), {"cache_ttl": v}) for v in (None, 0)]
    for agent in off:
        ask(agent)
        assert not ask(agent).cached
    assert entries(db_path) == 0 and len(fp.requests) == 4


@pytest.mark.parametrize(
    ("ttl", "why"),
    [
        (-1, "cache_ttl must be from 0 to 2592000"),
        (2_592_001, "cache_ttl must be from 0"),
        ("1h", "cache_ttl must be a number"),
        (True, "cache_ttl must be a number"),
        (float("nan"), "cache_ttl must be from 0"),
    ],
)
def test_bad_cache_ttl_is_refused_and_records_nothing(fp: FakeProvider, ttl: Any, why: str) -> None:
    bad = type("Bad", (Faq,), {"cache_ttl": ttl})
    with pytest.raises(tl.ConfigurationError, match=why):
        ask(bad)
    assert tl.Execution.all().count() == 0 and fp.requests == []


class Mocked(tl.Agent):
    model = "mock/faq"
    user = "{q}"
    cache_ttl = 60


def test_a_cached_answer_across_processes(db_path: Path) -> None:
    """Another process (its own engine and connections) reads the entry this one wrote."""
    import subprocess
    import sys

    first = Mocked.call(q="shared?", tenant="acme")
    code = (
        "import tenantllm as tl, sys\n"
        f"tl.configure(database={str(db_path)!r})\n"
        "class Mocked(tl.Agent):\n    model = 'mock/faq'\n    user = '{q}'\n    cache_ttl = 60\n"
        "r = Mocked.call(q='shared?', tenant='acme')\n"
        "print(r.cached, r.content)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == f"True {first.content}"


def test_a_function_agent_caches_too() -> None:
    @tl.agent(model="mock/faq", cache_ttl=60)
    def answer(q: str) -> str:
        """{q}"""

    assert not answer(q="why?", tenant="acme").cached
    assert answer(q="why?", tenant="acme").cached
    with pytest.raises(tl.ConfigurationError, match="cache_ttl must be from 0"):

        @tl.agent(model="mock/faq", cache_ttl=-5)
        def bad(q: str) -> str:
            """{q}"""
