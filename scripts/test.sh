#!/usr/bin/env bash
# The one command that runs every check of Loupe: formatting, lints, the whole test suite.
# It installs what the tests need first: system packages through apt when missing, and the
# default model, embedding model and corpus into ~/.cache/loupe (`loupe fetch`, reused later).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/install-deps.sh
if command -v rustup >/dev/null && ! rustup component list --installed | grep -q clippy; then
  rustup component add rustfmt clippy
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/check-layers.sh
# Tests run in release: several run the real Gemma 3 270M. The CLI tests run the `loupe`
# binary, so build every binary first; then fetch the defaults the model tests need.
cargo build --release --workspace --bins --locked
./target/release/loupe fetch
cargo test --release --workspace --locked
# The README's commands, as a new user runs them (scripts/check-readme.sh: every ```sh block on a
# scratch folder, small sizes; the self-test first checks that a broken command fails it).
scripts/check-readme.sh --self-test
scripts/check-readme.sh
# A short coverage-guided run of every fuzz target (README, "Fuzzing"): builds the instrumented
# targets (their own workspace and target folder), then 10 s each; a crash fails the run.
FUZZ_SECONDS=10 scripts/fuzz.sh
echo "all checks passed"
