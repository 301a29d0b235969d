"""The version lives in Cargo.toml only: the package metadata, `tenantllm.__version__` and
`tenantllm --version` all report it. The built wheel and sdist are tested by `make wheel-test`
(.ci/test-wheels), which needs `make wheels` first."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import tenantllm as tl

ROOT = Path(__file__).resolve().parent.parent


def cargo_version() -> str:
    with (ROOT / "Cargo.toml").open("rb") as f:
        version: str = tomllib.load(f)["package"]["version"]
    return version


def test_one_version_everywhere() -> None:
    version = cargo_version()
    assert tl.__version__ == version
    assert importlib.metadata.version("tenantllm") == version
    out = subprocess.run(
        [sys.executable, "-m", "tenantllm.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout.strip()) == (0, f"tenantllm {version}")


def test_changelog_has_the_version() -> None:
    assert f"## [{cargo_version()}]" in (ROOT / "CHANGELOG.md").read_text()
