"""Shared fixtures: every test gets its own, fresh database (a SQLite file; a PostgreSQL
database of its own when TENANTLLM_TEST_STORE=postgres, see store_mode/pg_everywhere.py)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl
from fake_providers import FakeProvider

STORE_MODE = str(Path(__file__).parent / "store_mode")
sys.path.insert(0, STORE_MODE)
import pg_everywhere  # noqa: E402  (found through the path above)

if pg_everywhere.ACTIVE:
    pg_everywhere.install()
    # Processes the tests start load store_mode/sitecustomize.py and map their databases too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [STORE_MODE, os.environ.get("PYTHONPATH")]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: tests of the SQLite file itself (skipped on PostgreSQL)")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if pg_everywhere.ACTIVE:
        pg_everywhere.drop_created()  # databases configured outside a test's own fixture
        pg_everywhere.drop_spares()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if pg_everywhere.ACTIVE:
        skip = pytest.mark.skip(reason="tests the SQLite file itself; the suite is running on PostgreSQL")
        for item in items:
            if "sqlite_only" in item.keywords:
                item.add_marker(skip)

Configure = Callable[..., None]


@pytest.fixture(autouse=True)
def _fresh_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Configures tenantllm on a new database file for each test."""
    monkeypatch.delenv("TENANTLLM_DATABASE", raising=False)
    db = tmp_path / "t.db"
    tl.configure(reset=True, database=str(db))  # nothing an earlier test configured carries over
    yield db
    if pg_everywhere.ACTIVE:
        # Close this process's pool first: dropping under open connections (WITH (FORCE))
        # works, but the killed pool then slows the next test. A test that left a broken
        # configuration behind (say, a bad secret in the environment) gets the forced drop.
        with contextlib.suppress(tl.ConfigurationError):
            tl.configure(reset=True, database=":memory:")
        gc.collect()  # an engine kept only by a reference cycle (an exception's frames) closes its pool now
        pg_everywhere.drop_created()


@pytest.fixture
def db_path(_fresh_database: Path) -> Path:
    """The path of this test's database file."""
    return _fresh_database


@pytest.fixture
def configure(db_path: Path) -> Configure:
    """Reconfigures tenantllm from the defaults with the options given and this test's
    database (`reset=True`): each call states all the options it wants, whatever earlier
    calls set. (`tl.configure()` itself changes only the options it names.)"""

    def reconfigure(**options: Any) -> None:
        options.setdefault("database", str(db_path))
        tl.configure(reset=True, **options)

    return reconfigure


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProvider]:
    """A local fake provider server shared by a module's tests (each module's `fp` fixture
    resets it per test)."""
    with FakeProvider() as fp:
        yield fp
