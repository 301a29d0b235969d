# `make test` runs every check on a fresh machine: it makes its own virtualenv in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CARGO_FEATURES := --features python

.PHONY: test sqlite-lib cargo-test clippy develop pytest pytest-postgres ruff stubtest mypy bench bench-instructions bench-instructions-bundled demo wheels wheel-test clean

test: cargo-test clippy develop pytest ruff stubtest mypy pytest-postgres

$(BIN)/maturin:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "maturin>=1.8,<2" "pytest>=8" "pytest-asyncio>=0.23" pytest-timeout "ruff>=0.6" "mypy>=1.10" pandas \
		openai anthropic google-genai mistralai "starlette>=0.37" "jinja2>=3.1" "uvicorn>=0.30" httpx fastapi django selenium gunicorn \
		"celery>=5.3" "psycopg[binary]>=3.1" nbconvert nbformat ipykernel "jsonschema>=4" "opentelemetry-api>=1.27" "opentelemetry-sdk>=1.27" \
		opentelemetry-instrumentation-fastapi

# The extension links the system's SQLite, the library Python's sqlite3 uses, so a process
# has one SQLite (see Cargo.toml); .ci/run installs it on Debian.
sqlite-lib:
	@pkg-config --exists 'sqlite3 >= 3.35.0' || { echo "tenantllm links the system SQLite, 3.35.0 or newer:" \
		"install pkg-config and libsqlite3-dev (Debian, Ubuntu), sqlite-devel (Fedora) or sqlite (Homebrew)" >&2; exit 1; }

# The core's PostgreSQL tests are #[ignore]d (a plain `cargo test` lists them as ignored, never
# as passed); with a server named they run too.
cargo-test: sqlite-lib
	@if [ -n "$$TENANTLLM_TEST_POSTGRES_URL" ]; then \
		cargo test --quiet -- --include-ignored; \
	else \
		cargo test --quiet; \
		echo "SKIPPED: the core's PostgreSQL tests (set TENANTLLM_TEST_POSTGRES_URL to run them; .ci/run does)"; \
	fi

clippy: sqlite-lib
	cargo clippy --all-targets --quiet -- -D warnings
	cargo clippy --all-targets --quiet $(CARGO_FEATURES) -- -D warnings

# Release build: the concurrency tests and benchmarks need realistic speed.
develop: sqlite-lib $(BIN)/maturin
	$(BIN)/maturin develop --release --quiet

pytest: develop
	$(BIN)/pytest -q

# The same suite again with every database on PostgreSQL (tests/store_mode/pg_everywhere.py).
pytest-postgres: develop
	@if [ -n "$$TENANTLLM_TEST_POSTGRES_URL" ]; then \
		TENANTLLM_TEST_STORE=postgres $(BIN)/pytest -q -p no:cacheprovider; \
	else \
		echo "SKIPPED: the suite on PostgreSQL (set TENANTLLM_TEST_POSTGRES_URL to run it; .ci/run does)"; \
	fi

ruff: $(BIN)/maturin
	$(BIN)/ruff check python tests benches

stubtest: develop
	$(BIN)/python -m mypy.stubtest tenantllm._core

mypy: develop
	$(BIN)/python -m mypy python/tenantllm

# Peers measured in the same run: pybreaker and litellm (only installed for benchmarks). The
# dashboard benchmark builds its 10M-execution database once and keeps it (see its docstring).
bench: develop
	$(BIN)/pip install -q pybreaker litellm
	$(BIN)/python benches/run.py
	$(BIN)/python benches/rollups.py
	$(BIN)/python benches/dashboard.py

# Instructions per guarded call (callgrind; needs valgrind): load-independent, for comparing
# builds, e.g. BASE=/path/to/other/.venv/bin/python to measure that build in the same run.
bench-instructions: develop
	$(BIN)/python benches/instructions.py $(if $(BASE),--python $(BASE))

# The same measure for this build beside the same code with SQLite compiled in
# (`--features bundled-sqlite`, as the macOS and Windows wheels): what sharing the system's
# SQLite with Python's sqlite3 costs a call (issue 14). That build lives in its own target
# directory, so neither build undoes the other; its first build compiles every dependency again
# (10-20 minutes), later ones only what changed.
BUNDLED := target/bundled
bench-instructions-bundled: develop
	rm -rf $(BUNDLED)/wheels $(BUNDLED)/py
	CARGO_TARGET_DIR=$(BUNDLED) $(BIN)/maturin build --release --quiet --features python,bundled-sqlite --out $(BUNDLED)/wheels
	$(BIN)/python -m zipfile -e $(BUNDLED)/wheels/*.whl $(BUNDLED)/py
	$(BIN)/python benches/instructions.py --build $(BUNDLED)/py

demo: develop
	$(BIN)/tenantllm demo

# dist/: an abi3 wheel (CPython 3.11+) tagged manylinux_2_17 (glibc 2.17 or newer), linked by zig
# against that glibc, and an sdist; both checked by twine. The wheel depends on no libsqlite3.so
# and bundles none (README, "Installing the wheel"): an empty libsqlite3.a stands in for the
# library at link time, so SQLite's symbols stay undefined, and tenantllm/__init__.py makes
# the SQLite Python's sqlite3 already loaded global before _core binds to it. maturin's
# auditwheel check fails the build on any library outside the manylinux policy.
WHEEL_SQLITE := target/wheel-sqlite
wheels: $(BIN)/maturin
	$(BIN)/pip install -q "ziglang>=0.13" "twine>=6.1"
	rm -rf dist
	mkdir -p $(WHEEL_SQLITE) && printf '!<arch>\n' >$(WHEEL_SQLITE)/libsqlite3.a
	PATH="$(CURDIR)/$(BIN):$$PATH" CARGO_TARGET_DIR=target/wheels SQLITE3_LIB_DIR="$(CURDIR)/$(WHEEL_SQLITE)" \
		SQLITE3_STATIC=1 SQLITE3_NO_PKG_CONFIG=1 \
		$(BIN)/maturin build --release --quiet --zig --compatibility manylinux_2_17 --auditwheel check --out dist
	$(BIN)/maturin sdist --out dist
	$(BIN)/python -m twine check --strict dist/*

# Installs dist/'s wheel (no Rust on PATH) and sdist into fresh virtualenvs and uses them.
wheel-test:
	PY=$(PY) .ci/test-wheels

clean:
	rm -rf $(VENV) target dist python/tenantllm/*.so
