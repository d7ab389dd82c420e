#!/usr/bin/env bash
# The one command that runs every check of Loupe: formatting, lints, the whole test suite.
# It installs what the tests need first (system packages through apt when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
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
# The CLI tests run the `loupe` binary, so build every binary before testing.
cargo build --workspace --bins --locked
cargo test --workspace --locked
echo "all checks passed"
