"""Shared fixtures: every test gets its own, fresh SQLite database file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tenantllm as tl

Configure = Callable[..., None]


@pytest.fixture(autouse=True)
def _fresh_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Configures tenantllm on a new database file for each test."""
    monkeypatch.delenv("TENANTLLM_DATABASE", raising=False)
    db = tmp_path / "t.db"
    tl.configure(database=str(db))
    yield db


@pytest.fixture
def db_path(_fresh_database: Path) -> Path:
    """The path of this test's database file."""
    return _fresh_database


@pytest.fixture
def configure(db_path: Path) -> Configure:
    """Reconfigures tenantllm with extra options, keeping this test's database.

    `tl.configure()` replaces the whole configuration, so every call states all its options."""

    def reconfigure(**options: Any) -> None:
        options.setdefault("database", str(db_path))
        tl.configure(**options)

    return reconfigure
