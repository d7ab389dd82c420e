#!/usr/bin/env bash
# The one command that runs every check of Loupe: formatting, lints, the whole test suite.
# It installs what the tests need first: system packages through apt when missing, and the
# default model, embedding model and corpus into ~/.cache/loupe (`loupe fetch`, reused later).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v npm >/dev/null || need+=(npm)
if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "error: cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
if command -v rustup >/dev/null && ! rustup component list --installed | grep -q clippy; then
  rustup component add rustfmt clippy
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Tests run in release: several run the real Gemma 3 270M. The CLI tests run the `loupe`
# binary, so build every binary first; then fetch the defaults the model tests need.
cargo build --release --workspace --bins --locked
./target/release/loupe fetch
cargo test --release --workspace --locked
echo "all checks passed"
