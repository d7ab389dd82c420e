#!/usr/bin/env bash
# RESULTS.md, "A cross-layer transcoder on Gemma 3 270M": train clt-0 on all 18 layers of the
# transcoder capture (every layer's ln2.hook_normalized and hook_mlp_out, f16), report per-layer
# FVU/L0 and CE-loss recovered with every MLP replaced; then the same all-layer splice for the
# per-layer transcoders plt-0 … plt-17 (trained by train-sae --input-hook) when the store has them.
#
#   scripts/results-clt.sh [STORE]      (default /work/data/tc-store; NAME=clt-0)
#
# The capture (46 KB/token): loupe capture --model gemma-3-270m-q4_k_m.gguf --dtype f16 with
# --hook blocks.L.ln2.hook_normalized --hook blocks.L.hook_mlp_out for L = 0..17.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-/work/data/tc-store}
name=${NAME:-clt-0}
loupe=${LOUPE:-target/release/loupe}
[ -x "$loupe" ] || cargo build --release --bin loupe
N_FEATURES=${N_FEATURES:-1024} K=${K:-16} BATCH=${BATCH:-2048} TOKENS=${TOKENS:-81920}
"$loupe" train-clt --store "$store" --dictionary "$name" --layers all \
  --n-features "$N_FEATURES" --k "$K" --batch "$BATCH" --tokens "$TOKENS" --lr "${LR:-2e-3}" \
  --eval-contexts 8
"$loupe" splice-transcoders --store "$store" --transcoders "$name" --eval-contexts 8
plt=$(seq -s, -f 'plt-%g' 0 17)
if "$loupe" store info "$store" | grep -q '^  plt-17 '; then
  "$loupe" splice-transcoders --store "$store" --transcoders "$plt" --eval-contexts 8
else
  echo "per-layer transcoders plt-0…plt-17 not in $store: skipped"
fi
