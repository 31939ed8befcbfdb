# The README and .ci/run call these targets; nothing else is needed on a fresh machine of this kind.
PY ?= python3
PIP ?= $(PY) -m pip
CARGO_PROFILE ?= ci
export MATURIN_PEP517_ARGS ?= --profile $(CARGO_PROFILE)
# Tests and demos never reach for the network except loopback.
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: help setup build proto demo test test-rust test-python lint fmt bench-smoke ci services clean

help:
	@echo "make demo   - install and run 'evcore demo' on the embedded default"
	@echo "make test   - install test dependencies, start services if needed, run cargo and pytest"
	@echo "make lint   - ruff, mypy --strict, cargo fmt --check, cargo clippy -D warnings"

# Python dependencies (runtime and dev) without building the package itself.
setup:
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.8,<2" "grpcio-tools>=1.66" "mypy-protobuf>=3.6"
	$(PIP) install -q -e '.[dev]' --no-build-isolation

# Build the Rust extension into python/evcore (editable install) and generate protobuf code.
build: proto
	$(PIP) install -q --no-deps --no-build-isolation -e .

proto:
	$(PY) tools/gen_proto.py

demo: setup build
	evcore demo

# Start NATS and PostgreSQL if needed; delete evcore streams that earlier test runs left on the
# shared nats-server (each TELEMETRY stream reserves 1 GiB of its storage: sixty fill it).
services:
	bash .ci/services
	$(PY) .ci/clean_nats_streams.py

test: setup build services test-rust test-python

test-rust:
	cargo test -p evcore-core --profile $(CARGO_PROFILE)

# Two pytest workers (PYTEST_WORKERS=0 runs in one process). Most of the suite's time is waiting
# on real services and real-time clocks, not CPU: a two-worker run took 13.5 min wall for 5.6 min
# of CPU (one process: 24.7 min); four workers on this 2-core machine failed timing tests.
PYTEST_WORKERS ?= 2
test-python:
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 \
		$(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist worksteal)

lint:
	ruff check python tests bench
	ruff format --check python tests bench
	mypy
	$(PY) -m mypy.stubtest evcore._core
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --profile $(CARGO_PROFILE) -- -D warnings

fmt:
	ruff format python tests bench
	ruff check --fix python tests bench
	cargo fmt --all

# Every benchmark in its quick mode: checks they still run and still check their results.
BENCH_SMOKE ?= allocator bus planner ocpp audit control-loop
bench-smoke:
	set -e; for b in $(BENCH_SMOKE); do echo "== evcore bench $$b --quick --json"; evcore bench $$b --quick --json; done

ci: test lint bench-smoke

clean:
	rm -rf target python/evcore/_core*.so python/evcore/v1
