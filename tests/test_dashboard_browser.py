"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, via selenium),
served by uvicorn on 127.0.0.1: it renders, loads nothing from elsewhere, and a tenant-scoped
viewer sees only its tenant even when it edits the URL."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from dashboard_data import KEYS, Sample, populate
from starlette.requests import Request
from tenantllm import dashboard
from tenantllm.dashboard import Viewer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_COPY = Path("/tmp/tenantllm-overview.png")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'tenantllm[dashboard]')")
from uvicorn_server import Server  # noqa: E402  (needs uvicorn, checked above)


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(
            f"browser tests need Debian's chromium and chromium-driver packages; missing: {', '.join(missing)} "
            "(apt-get install chromium chromium-driver)"
        )


def cookie_auth(request: Request) -> Viewer | None:
    """Test auth: no cookie sees everything; cookie `tenant=x` sees tenant x only."""
    tenant = request.cookies.get("tenant")
    return Viewer(all_tenants=True) if not tenant else Viewer(tenant_id=tenant)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1500", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, Sample]]:
    _require_browser()
    sample = populate(db_path, monkeypatch)
    with Server(dashboard.app(auth=cookie_auth, title="tenantllm")) as server:
        yield server, sample


def _text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def _click_and_wait(driver: Any, by: str, selector: str) -> None:
    """Click something that navigates, and wait for the new page (clicks do not wait).

    The old page is marked on its `window`; the new page has no mark. (Waiting for the old
    element to go stale raced: chromedriver sometimes answers a mid-navigation query with a
    generic inspector error instead of a stale-element one.)"""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__tlOldPage = true")
    driver.find_element(by, selector).click()
    WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return !window.__tlOldPage && document.readyState === 'complete'")
    )


def _download(driver: Any, url: str, into: Path) -> str:
    """What the browser saves when the viewer opens `url`, a CSV export (served as an
    attachment, with the viewer's cookies), into an empty directory of its own."""
    import time

    into.mkdir(parents=True)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(into)})
    driver.get(url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done = [p for p in into.iterdir() if not p.name.endswith(".crdownload")]
        if done:
            return done[0].read_text()
        time.sleep(0.05)
    raise AssertionError(f"no download from {url}")


def _row_tenants(driver: Any, kind: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [str(e.get_attribute("data-tenant")) for e in driver.find_elements(By.CSS_SELECTOR, f"tr.{kind}")]


def test_overview_renders_in_chromium_with_nothing_fetched(
    browser: Any, served: tuple[Server, Sample], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    server, _ = served
    browser.delete_all_cookies()
    browser.get(server.url + "/?period=month")
    assert browser.title == "Overview · tenantllm"
    text = _text(browser).lower()  # the stat labels are upper-cased by CSS
    for label in ("spend", "tokens", "calls", "errors", "cost per day", "spend by tenant", "recent failures"):
        assert label in text
    assert "All tenants" in browser.find_element(By.ID, "viewer").text
    # The charts are laid out and visible.
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 3
    for chart in charts:
        assert chart.is_displayed() and chart.size["width"] > 200 and chart.size["height"] > 20
    bars = browser.find_elements(By.CSS_SELECTOR, "#cost-chart rect.bar")
    # A bar per day of the month so far; today's spend is the tallest.
    assert len(bars) == datetime.now(UTC).date().day and bars[-1].size["height"] > 1
    # The page loaded no resources at all (no CDN, fonts, scripts, stylesheets, images).
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources == []
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]

    shot = tmp_path / "overview.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    shutil.copyfile(shot, SCREENSHOT_COPY)

    # The other periods, by their links: last month had no calls, so no spend by tenant.
    _click_and_wait(browser, By.LINK_TEXT, "Last month")
    assert "period=last_month" in browser.current_url
    assert "no data" in browser.find_element(By.ID, "spend-by-tenant").text
    _click_and_wait(browser, By.LINK_TEXT, "Today")
    assert "acme" in browser.find_element(By.ID, "spend-by-tenant").text

    # Navigate through the pages by clicking, as a user would.
    _click_and_wait(browser, By.LINK_TEXT, "Tenants")
    assert _row_tenants(browser, "tenant") == ["acme", "globex", "initech"]
    _click_and_wait(browser, By.LINK_TEXT, "Executions")
    assert "15 executions" in _text(browser)
    browser.find_element(By.CSS_SELECTOR, "input[name=tenant_id]").send_keys("globex")
    browser.find_element(By.CSS_SELECTOR, "select[name=status] option[value=error]").click()
    _click_and_wait(browser, By.CSS_SELECTOR, "form.filters button")
    assert "tenant_id=globex" in browser.current_url and "2 executions" in _text(browser)
    _click_and_wait(browser, By.CSS_SELECTOR, "tr.execution a")
    assert "simulated failure" in _text(browser) and "Attempts (1)" in _text(browser)
    _click_and_wait(browser, By.LINK_TEXT, "Circuit breakers")
    assert _row_tenants(browser, "breaker") == ["globex"]


def test_tenants_list_pages_sorts_and_searches_in_chromium(
    browser: Any, served: tuple[Server, Sample], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    server, _ = served
    browser.delete_all_cookies()
    browser.get(server.url + "/tenants?per_page=2")
    assert _row_tenants(browser, "tenant") == ["acme", "globex"]  # spend today, largest first
    assert "3 tenants" in _text(browser) and "Page 1 of 2" in _text(browser)
    _click_and_wait(browser, By.CSS_SELECTOR, "a[rel=next]")
    assert _row_tenants(browser, "tenant") == ["initech"] and "Page 2 of 2" in _text(browser)
    _click_and_wait(browser, By.CSS_SELECTOR, "a[rel=prev]")
    assert _row_tenants(browser, "tenant") == ["acme", "globex"]
    # Sorting by a column heading, then the other way by clicking it again; paging keeps it.
    _click_and_wait(browser, By.CSS_SELECTOR, "a.sort[href*=\"sort=errors\"]")
    assert _row_tenants(browser, "tenant")[0] == "globex" and "sort=errors" in browser.current_url
    _click_and_wait(browser, By.CSS_SELECTOR, "a.sort[href*=\"sort=name\"]")
    assert _row_tenants(browser, "tenant") == ["acme", "globex"]
    _click_and_wait(browser, By.CSS_SELECTOR, "a.sort[href*=\"sort=name\"]")  # again: Z first
    assert _row_tenants(browser, "tenant") == ["initech", "globex"]
    _click_and_wait(browser, By.CSS_SELECTOR, "a[rel=next]")
    assert _row_tenants(browser, "tenant") == ["acme"] and "order=asc" not in browser.current_url
    # Search by name, then a filter, from the form.
    browser.get(server.url + "/tenants")
    browser.find_element(By.CSS_SELECTOR, "input[name=q]").send_keys("corp")
    _click_and_wait(browser, By.CSS_SELECTOR, "form.filters button")
    assert _row_tenants(browser, "tenant") == ["acme"]
    browser.find_element(By.CSS_SELECTOR, "input[name=q]").clear()
    browser.find_element(By.CSS_SELECTOR, "input[name=filter][value=breaker_open]").click()
    _click_and_wait(browser, By.CSS_SELECTOR, "form.filters button")
    assert _row_tenants(browser, "tenant") == ["globex"]
    # Into the tenant's page.
    _click_and_wait(browser, By.CSS_SELECTOR, "tr.tenant a")
    assert browser.title.startswith("globex") and "Recent failures" in _text(browser)
    assert _row_tenants(browser, "breaker") == ["globex"]
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    # When budgets run out: globex's monthly limit is what it spent, so it is out today.
    globex = tl.TenantBudget.get("globex")
    globex.update(monthly_limit=globex.current_monthly_spending)
    browser.get(server.url + "/tenants?per_page=2")
    _click_and_wait(browser, By.CSS_SELECTOR, "a.sort[href*=\"sort=runs_out\"]")
    assert "order=asc" in browser.current_url and _row_tenants(browser, "tenant")[0] == "globex"
    assert "runs out " + datetime.now(UTC).date().isoformat() in _text(browser)
    browser.find_element(By.CSS_SELECTOR, "input[name=filter][value=runs_out]").click()
    _click_and_wait(browser, By.CSS_SELECTOR, "form.filters button")
    assert _row_tenants(browser, "tenant") == ["globex"] and "1 tenant" in _text(browser)
    exported = _download(browser, browser.find_element(By.ID, "tenants-csv").get_attribute("href"), tmp_path / "csv")
    assert [r[0] for r in csv.reader(io.StringIO(exported))] == ["tenant_id", "globex"]


def test_tenant_scoped_viewer_sees_only_its_tenant_in_chromium(
    browser: Any, served: tuple[Server, Sample], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    server, sample = served
    browser.get(server.url + "/")
    browser.delete_all_cookies()
    browser.add_cookie({"name": "tenant", "value": "acme", "path": "/"})
    try:
        browser.get(server.url + "/")
        assert "Tenant: acme" in _text(browser)
        for path, kind in (("/executions?tenant_id=globex", "execution"), ("/tenants", "tenant"),
                           ("/breakers", "breaker"), ("/breakers?per_page=1&page=2", "breaker"),
                           ("/executions?per_page=200", "execution")):
            browser.get(server.url + path)
            page = _text(browser)
            assert "globex" not in page and "initech" not in page, path
            assert set(_row_tenants(browser, kind)) <= {"acme"}, path
        # The overview's periods, by their links, show acme's numbers only and no spend by tenant.
        browser.get(server.url + "/")
        for label in ("This month", "Last month", "Today"):
            _click_and_wait(browser, By.LINK_TEXT, label)
            assert "globex" not in _text(browser) and "Tenant: acme" in _text(browser), label
            assert not browser.find_elements(By.ID, "spend-by-tenant"), label
        # The tenants list's controls: search, filters, sorting and paging stay within acme.
        for query in ("q=globex", "filter=breaker_open", "sort=errors&order=asc", "per_page=1&page=2",
                      "filter=runs_out", "sort=runs_out&order=asc", "filter=no_budget&q=initech"):
            browser.get(server.url + "/tenants?" + query)
            assert "globex" not in _text(browser) and set(_row_tenants(browser, "tenant")) <= {"acme"}, query
        # The CSV exports, whatever they are asked for, hold acme's rows only (url, tenant
        # column, lines with the header).
        exports = (("/tenants.csv", 0, 2), ("/tenants.csv?q=globex", 0, 1), ("/tenants.csv?filter=runs_out", 0, 1),
                   ("/tenants.csv?sort=runs_out&order=asc", 0, 2), ("/executions.csv", 2, 9),
                   ("/executions.csv?tenant_id=globex", 2, 9), ("/executions.csv?status=failed", 2, 1))
        for i, (url, column, lines) in enumerate(exports):
            table = list(csv.reader(io.StringIO(_download(browser, server.url + url, tmp_path / str(i)))))
            assert table[0][column] == "tenant_id" and {r[column] for r in table[1:]} <= {"acme"}, url
            assert len(table) == lines and "globex" not in str(table) and "initech" not in str(table), url
        browser.get(server.url + "/tenants/acme")
        assert "month-end projection" in _text(browser).lower() and "globex" not in _text(browser)
        browser.get(server.url + "/tenants/globex")
        assert "Not found" in _text(browser) and "globex" not in browser.page_source.replace("/tenants/globex", "")
        browser.get(server.url + "/tenants")
        _click_and_wait(browser, By.CSS_SELECTOR, "tr.tenant a")
        assert browser.title.startswith("acme") and "globex" not in _text(browser)
        browser.get(server.url + "/executions?tenant_id=globex")
        assert "8 executions" in _text(browser)
        # Another tenant's execution by URL: 404.
        browser.get(server.url + f"/executions/{sample.ids['globex'][0]}")
        assert "Not found" in _text(browser) and "globex" not in browser.page_source
        browser.get(server.url + f"/executions/{sample.ids['acme'][0]}")
        assert "acme" in _text(browser)
        assert all(key not in browser.page_source for key in KEYS.values())
        assert tl.Execution.by_tenant("acme").count() == 8
    finally:
        browser.delete_all_cookies()
