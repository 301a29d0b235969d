"""`tenantllm.testing`, used the way a user would: a project's own test files, run by pytest
in a separate process (pytester), with the plugin enabled from their conftest.py."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest

pytest_plugins = ["tenantllm.testing"]


@pytest.fixture
def tenantllm_options():
    return {"budgets": {"per_agent_daily": {"Dear": "0.0001"}}}
"""

USER_TESTS = '''
from decimal import Decimal

import pytest
import tenantllm as tl
from tenantllm.testing import Failure, Reply


class Support(tl.Agent):
    model = "gpt-4o-mini"
    user = "Question: {q}"
    max_tokens = 50
    retries = tl.Retries(max=1, base=0.01, max_delay=0.02)


class Claude(tl.Agent):
    model = "claude-haiku-4-5"
    user = "{q}"
    max_tokens = 50


class Gem(tl.Agent):
    model = "gemini-3.5-flash"
    user = "{q}"
    max_tokens = 50


class Dear(tl.Agent):
    model = "gpt-4o-mini"
    user = "{q}"
    max_tokens = 4000


def answer_customer(tenant, question):  # the user's own code under test
    return Support.call(q=question, tenant=tenant).content


def test_scripted_replies_and_usage(llm):
    llm.script("Ships today.", Reply("Second", input_tokens=1000, output_tokens=2000))
    assert answer_customer("acme", "Where is my order?") == "Ships today."
    r = Support.call(q="again", tenant="acme")
    assert (r.content, r.input_tokens, r.output_tokens) == ("Second", 1000, 2000)
    assert r.total_cost == Decimal("0.00015") + Decimal("0.0012")  # gpt-4o-mini's prices
    runs = llm.assert_executions(2, agent="Support", tenant_id="acme", status="success")
    assert runs[1].total_cost == r.total_cost
    assert "Where is my order?" in llm.requests[0].text and llm.requests[0].model == "gpt-4o-mini"
    assert llm.remaining == 0


def test_failures_retries_and_errors(llm):
    llm.script(Failure(503), "after a retry")
    assert Support.call(q="x", tenant="t").attempts_count == 2
    llm.script(tl.RateLimitError, tl.RateLimitError)
    with pytest.raises(tl.RateLimitError):
        Support.call(q="x", tenant="t")
    llm.script(tl.AuthenticationError)
    with pytest.raises(tl.AuthenticationError, match="401"):
        Support.call(q="x", tenant="t")
    llm.assert_executions(2, tenant_id="t", status="error")
    with pytest.raises(TypeError, match="scripted reply"):
        llm.script(42)


def test_every_wire_format(llm):
    llm.script("from claude", Reply("from gemini", input_tokens=3, output_tokens=4))
    assert Claude.call(q="hi").content == "from claude"
    r = Gem.call(q="hi")
    assert (r.content, r.total_tokens) == ("from gemini", 7)
    assert [q.wire for q in llm.requests] == ["anthropic", "gemini"]


def test_budgets_from_options(llm):
    with pytest.raises(tl.BudgetExceededError):
        Dear.call(q="x")
    llm.assert_executions(1, agent="Dear", status="blocked")
    assert llm.requests == []


def test_nothing_left_is_a_clear_error(llm):
    with pytest.raises(tl.ProviderError, match="no scripted reply left"):
        Claude.call(q="hi")


def test_each_test_has_its_own_database(tenantllm_db, llm):
    assert tl.Execution.all().count() == 0
    assert str(tenantllm_db).endswith("tenantllm.db")


def test_a_failing_assertion_says_what_was_there(llm):
    llm.script("ok")
    Support.call(q="x", tenant="acme")
    llm.assert_executions(3, tenant_id="acme")
'''


def test_the_kit_in_a_users_project(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(
        ["*expected 3 execution(s) with agent=None tenant_id='acme' status=None, found 1;*"
         "('Support', 'acme', 'success')*"]
    )
