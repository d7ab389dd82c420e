#!/usr/bin/env bash
# RESULTS.md, "Circuits": IOI and greater-than on Gemma 3 270M — activation patching (the ground
# truth), attribution patching and the discrete-SAE method, then `loupe circuit eval`.
#
#   scripts/results-circuits.sh [STORE]     (default runs/circuits; reruns reuse stored circuits)
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-runs/circuits}
cache=${LOUPE_CACHE:-$HOME/.cache/loupe}
loupe=${LOUPE:-target/release/loupe}
[ -x "$loupe" ] || cargo build --release --bin loupe
"$loupe" fetch
if [ ! -f "$store/manifest.json" ]; then
  # A circuit needs only the store's model: a small capture records it.
  "$loupe" capture --model "$cache/models/gemma-3-270m-q4_k_m.gguf" \
    --corpus "$cache/corpus/moby-dick/data.txt" --store "$store" \
    --hook blocks.6.hook_resid_post --max-tokens 256
fi
for task in ioi greater-than; do
  for method in patching attribution discrete-sae; do
    "$loupe" circuit --store "$store" --task "assets/tasks/$task.jsonl" --method "$method"
  done
  "$loupe" circuit eval --store "$store" --task "assets/tasks/$task.jsonl"
done
