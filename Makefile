# `make test` runs every check on a fresh machine: it makes its own virtualenv in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CARGO_FEATURES := --features python

.PHONY: test cargo-test clippy develop pytest pytest-postgres ruff stubtest mypy bench bench-instructions bench-pg-instructions demo wheels wheel-test clean

test: cargo-test clippy develop pytest ruff stubtest mypy pytest-postgres

$(BIN)/maturin:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "maturin>=1.8,<2" "pytest>=8" "pytest-asyncio>=0.23" pytest-timeout "ruff>=0.6" "mypy>=1.10" pandas \
		openai anthropic google-genai mistralai "starlette>=0.37" "jinja2>=3.1" "uvicorn>=0.30" httpx fastapi django selenium gunicorn \
		"celery>=5.3" "psycopg[binary]>=3.1" nbconvert nbformat ipykernel "jsonschema>=4" "opentelemetry-api>=1.27" "opentelemetry-sdk>=1.27" \
		opentelemetry-instrumentation-fastapi

# The core's PostgreSQL tests are #[ignore]d (a plain `cargo test` lists them as ignored, never
# as passed); with a server named they run too. Then the bindings' own tests (src/python/), on
# an interpreter embedded in the test binary.
cargo-test:
	@if [ -n "$$TENANTLLM_TEST_POSTGRES_URL" ]; then \
		cargo test --quiet -- --include-ignored; \
	else \
		cargo test --quiet; \
		echo "SKIPPED: the core's PostgreSQL tests (set TENANTLLM_TEST_POSTGRES_URL to run them; .ci/run does)"; \
	fi
	cargo test --quiet --lib $(CARGO_FEATURES) python::

clippy:
	cargo clippy --all-targets --quiet -- -D warnings
	cargo clippy --all-targets --quiet $(CARGO_FEATURES) -- -D warnings

# Release build: the concurrency tests and benchmarks need realistic speed.
develop: $(BIN)/maturin
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

# The same for the PostgreSQL server's side: instructions its backends run per guarded call,
# on a private PostgreSQL 15 it starts under callgrind (needs valgrind and PostgreSQL 15's
# server binaries; see the script's docstring), e.g. with BASE as above.
bench-pg-instructions: develop
	$(BIN)/python benches/pg_instructions.py $(if $(BASE),--python $(BASE))

demo: develop
	$(BIN)/tenantllm demo

# dist/: an abi3 wheel (CPython 3.11+) tagged manylinux_2_17 (glibc 2.17 or newer), linked by zig
# against that glibc, and an sdist; both checked by twine. The wheel carries its own SQLite,
# compiled in and exporting nothing (Cargo.toml). maturin's auditwheel check fails the build on
# any library outside the manylinux policy.
wheels: $(BIN)/maturin
	$(BIN)/pip install -q "ziglang>=0.13" "twine>=6.1"
	rm -rf dist
	PATH="$(CURDIR)/$(BIN):$$PATH" CARGO_TARGET_DIR=target/wheels \
		$(BIN)/maturin build --release --quiet --zig --compatibility manylinux_2_17 --auditwheel check --out dist
	$(BIN)/maturin sdist --out dist
	$(BIN)/python -m twine check --strict dist/*

# Installs dist/'s wheel (no Rust on PATH) and sdist into fresh virtualenvs and uses them.
wheel-test:
	PY=$(PY) .ci/test-wheels

clean:
	rm -rf $(VENV) target dist python/tenantllm/*.so
