#!/usr/bin/env bash
# Regenerate the CLT fixture with Loupe (tests/fixtures/clt-circuit-tracer) and check that
# circuit-tracer 0.5.0 loads it and computes the same pre-activations and outputs.
# Needs the circuit-tracer venv (~/.cache/loupe/ctenv) and a built workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE_WRITE_CLT_FIXTURE=1 cargo test --release -p loupe-tests --test integration -- clt::circuit_tracer_fixture
"${CT_PYTHON:-$HOME/.cache/loupe/ctenv/bin/python}" scripts/clt_circuit_tracer_check.py tests/fixtures/clt-circuit-tracer
