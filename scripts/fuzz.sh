#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that reads a user's file (README, "Fuzzing").
#
#   scripts/fuzz.sh                  build, then run each target for FUZZ_SECONDS (default 20)
#   scripts/fuzz.sh TARGET [ARG...]  build, then run one target with libFuzzer's ARGs
#                                    (e.g. -runs=1000000, or a saved crash file to replay it)
#   scripts/fuzz.sh --seeds          rewrite the committed seed corpora (tests/fuzz/corpus)
#
# The targets (tests/fuzz/fuzz_targets) link libFuzzer (the libfuzzer-sys crate) and are built on
# stable Rust with LLVM's SanitizerCoverage passes, through -C flags only: no nightly, no
# cargo-fuzz. A panic, an abort, a crash, one allocation over 256 MiB (tests/fuzz/src/lib.rs), a
# resident size over 2 GiB or an input running over 10 s stops the run with the input saved in
# tests/fuzz/artifacts/TARGET/ and a non-zero exit. New inputs go to a temporary folder: the
# committed seeds stay as they are.
set -euo pipefail
cd "$(dirname "$0")/../tests/fuzz"

TARGETS=(gguf safetensors shard features manifest train_toml corpus llm_toml)

# What cargo-fuzz passes for `-s none`, minus its -Z flags.
export RUSTFLAGS="-Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing -Cforce-frame-pointers=yes"
# With an explicit --target, RUSTFLAGS reach only the target's code, not build scripts and
# proc-macros (which have no libFuzzer to link).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --bins --target "$host"
bin="target/$host/release"

if [[ "${1:-}" == "--seeds" ]]; then
  rm -rf corpus
  "$bin/make_seeds" corpus
  exit 0
fi

run() {
  local target=$1
  shift
  local work
  work=$(mktemp -d)
  mkdir -p "artifacts/$target"
  local dict=()
  if [[ "$target" == *_toml ]]; then dict=(-dict=dict/toml.dict); fi
  # -rss_limit_mb: the whole process; -timeout: seconds per input. RUST_LIB_BACKTRACE=0: errors
  # (anyhow, candle) capture no backtrace, ~100x faster on the error paths; panics still print one.
  RUST_LIB_BACKTRACE=0 "$bin/$target" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    "${dict[@]}" -artifact_prefix="artifacts/$target/" "$work" "corpus/$target" "$@"
  rm -rf "$work"
}

if [[ $# -gt 0 ]]; then
  target=$1
  shift
  run "$target" "$@"
  exit 0
fi

for target in "${TARGETS[@]}"; do
  log=$(mktemp)
  if ! run "$target" -max_total_time="${FUZZ_SECONDS:-20}" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "error: fuzz target $target failed; the input is in tests/fuzz/artifacts/$target/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
  echo "fuzz $target: $runs executions in ${FUZZ_SECONDS:-20} s, peak RSS $rss MB, no crash"
  rm -f "$log"
done
