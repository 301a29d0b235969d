"""Notebook-grade queries: readable reprs and HTML tables, DataFrames with stable columns and
dtypes (also when empty), float money on request, local times, `limit(0)` and `.all()`."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import tenantllm as tl

pd = pytest.importorskip("pandas")


class Support(tl.Agent):
    model = "mock/support"
    user = "Question: {q}"
    max_tokens = 50


@pytest.fixture
def rows(configure: Any) -> None:
    configure(mock={"latency_ms": 0})
    for tenant in ("acme", "acme", "globex"):
        Support.call(q="<b>hi</b>", tenant=tenant)


def test_reprs_and_html_tables(rows: None) -> None:
    e = tl.Execution.by_tenant("globex").first()
    assert e is not None
    assert repr(e).startswith(f"<Execution {e.id[:8]} Support mock/support tenant=globex success ")
    assert f"${e.total_cost}" in repr(e)
    table = e._repr_html_()
    assert table.count("<tr>") == 2 and "<td>globex</td>" in table
    q = tl.Execution.by_tenant("acme")
    html = q._repr_html_()
    assert "<caption>2 execution(s)</caption>" in html and html.count("<tr>") == 3
    assert "<caption>0 execution(s)</caption>" in tl.Execution.by_tenant("nobody")._repr_html_()
    b = tl.TenantBudget.create("acme", daily_limit=5)
    assert "<td>daily_limit</td><td>5</td>" in b._repr_html_() and "spent today" in b._repr_html_()


def test_to_pandas_columns_and_dtypes_do_not_depend_on_rows(rows: None) -> None:
    full = tl.Execution.all().to_pandas()
    empty = tl.Execution.by_tenant("nobody").to_pandas()
    assert len(full) == 3 and len(empty) == 0
    assert list(empty.columns) == list(full.columns)
    assert empty.dtypes.to_dict() == full.dtypes.to_dict()
    assert str(full["started_at"].dtype) == "datetime64[us, UTC]" and str(full["total_tokens"].dtype) == "int64"
    assert isinstance(full["total_cost"].iloc[0], Decimal)
    floats = tl.Execution.all().to_pandas(money="float")
    assert str(floats["total_cost"].dtype) == "float64"
    assert floats["total_cost"].sum() == pytest.approx(float(tl.Execution.all().sum("total_cost")))
    floats.describe()  # works on float money
    with pytest.raises(tl.ConfigurationError, match="money"):
        tl.Execution.all().to_pandas(money="cents")


def test_local_times_use_the_databases_timezone(tmp_path: Any) -> None:
    tl.configure(reset=True, database=str(tmp_path / "berlin.db"), timezone="Europe/Berlin", mock={"latency_ms": 0})
    Support.call(q="hi", tenant="acme")
    utc = tl.Execution.all().to_pandas()["started_at"].iloc[0]
    local = tl.Execution.all().to_pandas(local_times=True)["started_at"].iloc[0]
    assert str(local.tz) == "Europe/Berlin" and local == utc


def test_limit_zero_and_all(rows: None) -> None:
    none = tl.Execution.all().limit(0)
    assert list(none) == [] and none.to_dicts() == [] and none.count() == 0
    assert none.sum("total_cost") == Decimal(0) and none.sum("total_tokens") == 0
    assert none.first() is None and len(none.to_pandas()) == 0
    with pytest.raises(tl.ConfigurationError, match="limit"):
        list(tl.Execution.all().limit(-1))
    assert tl.Execution.today().all().count() == 3
    assert [e.tenant_id for e in tl.Execution.all().order_by("tenant_id").all()] == ["acme", "acme", "globex"]


def test_a_real_notebook_runs_with_nbconvert(tmp_path: Any, db_path: Any) -> None:
    """The notebook path as a user takes it: a .ipynb executed by nbconvert's kernel."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert")
    from nbconvert.preprocessors import ExecutePreprocessor

    cells = [
        f"import tenantllm as tl\ntl.configure(database={str(db_path)!r}, mock={{'latency_ms': 0}})",
        "class Support(tl.Agent):\n    model = 'mock/support'\n    user = '{q}'\n    max_tokens = 50\n"
        "for t in ('acme', 'acme', 'globex'):\n    Support.call(q='hi', tenant=t)",
        "tl.Execution.this_month()",
        "tl.Execution.this_month().first()",
        "tl.Execution.by_tenant('nobody').to_pandas().dtypes['total_cost']",
        "tl.Execution.this_month().to_pandas(money='float')['total_cost'].describe()['count']",
        "tl.Execution.all().limit(0).count()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    path = tmp_path / "explore.ipynb"
    nbformat.write(nb, path)
    ExecutePreprocessor(timeout=120, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    nbformat.write(nb, path)  # kept beside the test's database for a look after a failure
    out = [c.outputs[0]["data"] if c.outputs else {} for c in nb.cells]
    assert "<caption>3 execution(s)</caption>" in out[2]["text/html"]
    assert out[3]["text/html"].count("<tr>") == 2 and out[3]["text/plain"].startswith("<Execution ")
    assert out[4]["text/plain"] == "dtype('O')"
    assert out[5]["text/plain"] == "np.float64(3.0)" or out[5]["text/plain"] == "3.0"
    assert out[6]["text/plain"] == "0"
