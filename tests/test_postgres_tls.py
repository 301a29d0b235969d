"""TLS to PostgreSQL: the URL's `sslmode` and `sslrootcert`, as libpq reads them.

Runs when TENANTLLM_TEST_POSTGRES_TLS_URL names a server with `ssl=on` whose certificate,
signed by the CA in TENANTLLM_TEST_POSTGRES_TLS_CA, is for the URL's host name "localhost"
and not for 127.0.0.1 (`.ci/run` makes both and starts that server). The server itself says
whether a connection is encrypted (pg_stat_ssl)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import tenantllm as tl

TLS_URL = os.environ.get("TENANTLLM_TEST_POSTGRES_TLS_URL", "")
TLS_CA = os.environ.get("TENANTLLM_TEST_POSTGRES_TLS_CA", "")
if not (TLS_URL and TLS_CA):
    pytest.skip(
        "set TENANTLLM_TEST_POSTGRES_TLS_URL and TENANTLLM_TEST_POSTGRES_TLS_CA to run the TLS tests",
        allow_module_level=True,
    )


def psql(url: str, sql: str) -> str:
    exe = shutil.which("psql")
    assert exe, "psql is needed for the PostgreSQL tests (apt-get install postgresql-client)"
    done = subprocess.run(
        [exe, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def on(url: str, *, host: str | None = None, database: str | None = None, query: str = "") -> str:
    parts = urlsplit(url)
    netloc = parts.netloc if host is None else parts.netloc.replace(parts.hostname or "", host)
    path = parts.path if database is None else "/" + database
    return urlunsplit(parts._replace(netloc=netloc, path=path, query=query))


@pytest.fixture
def db() -> Iterator[str]:
    """A new database on the TLS server; dropped afterwards."""
    name = f"tl_tls_{uuid.uuid4().hex[:16]}"
    psql(TLS_URL, f"CREATE DATABASE {name}")
    try:
        yield on(TLS_URL, database=name)
    finally:
        tl.configure(database=":memory:")  # closes this process's connections
        psql(TLS_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def encrypted(url: str, app: str) -> list[bool]:
    """For each of the server's connections from `app`: is it TLS?"""
    rows = psql(
        on(url, database="postgres"),
        f"SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = '{app}'",
    )
    return [r == "t" for r in rows.split()]


def used(url: str, app: str) -> list[bool]:
    """Configures `url` as `app`, makes a budget and reads it back; the connections' TLS."""
    tl.configure(database=f"{url}&application_name={app}")
    tl.TenantBudget.create(app, daily_limit=5)
    assert tl.TenantBudget.get(app).daily_limit == 5
    return encrypted(url, app)


def params(sslmode: str, ca: str = TLS_CA) -> str:
    return f"sslmode={sslmode}&sslrootcert={quote(ca, safe='')}"


def test_verify_full_encrypts_every_connection(db: str) -> None:
    assert used(on(db, query=params("verify-full")), "tl-full") == [True]


def test_verify_ca_accepts_another_host_name_and_verify_full_refuses_it(db: str) -> None:
    by_ip = on(db, host="127.0.0.1")
    assert used(on(by_ip, query=params("verify-ca")), "tl-ca") == [True]
    with pytest.raises(tl.StoreError, match=r"TLS.*not valid for name") as info:
        tl.configure(database=on(by_ip, query=params("verify-full")))
    assert "cannot connect to PostgreSQL at postgres@127.0.0.1" in str(info.value)


def test_a_certificate_from_another_ca_is_refused(db: str, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(tmp_path / "k")]
    subprocess.run(
        ["openssl", "req", "-x509", *key, "-days", "1", "-subj", "/CN=another CA", "-out", str(other)],
        check=True,
        capture_output=True,
    )
    for sslmode in ("verify-full", "verify-ca", "require"):  # require with a root file verifies, as libpq
        with pytest.raises(tl.StoreError, match=r"TLS.*UnknownIssuer"):
            tl.configure(database=on(db, query=params(sslmode, str(other))))
    # Nothing was checked, so nothing was refused: the same server with sslmode=require alone.
    assert used(on(db, query="sslmode=require"), "tl-require") == [True]


def test_prefer_takes_tls_when_offered_and_disable_does_not(db: str) -> None:
    assert used(on(db, query="sslmode=prefer"), "tl-prefer") == [True]
    tl.configure(database=":memory:")
    assert used(on(db, query="sslmode=disable"), "tl-plain") == [False]


def test_bad_tls_options_are_configuration_errors(db: str, tmp_path: Path) -> None:
    with pytest.raises(tl.ConfigurationError, match="sslmode must be disable, prefer, require, verify-ca or verif"):
        tl.configure(database=on(db, query="sslmode=verify"))
    missing = tmp_path / "missing.pem"
    with pytest.raises(tl.ConfigurationError, match=r"sslrootcert .*missing\.pem"):
        tl.configure(database=on(db, query=params("verify-full", str(missing))))
