#!/usr/bin/env bash
# RESULTS.md, "An attribution graph of the IOI prompt on Gemma 3 270M": `loupe graph` of the IOI
# prompt through the per-layer transcoders plt-0 … plt-17 (trained by the transcoders section's
# script into the same store), its export as circuit-tracer's JSON, and the strongest path from
# the tokens into " Mary".
#
#   scripts/results-graph.sh [STORE] [OUT]   (default runs/tc-store, runs/prune-ioi.json)
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-runs/tc-store}
out=${2:-runs/prune-ioi.json}
loupe=${LOUPE:-target/release/loupe}
[ -x "$loupe" ] || cargo build --release --bin loupe
transcoders=$(seq -s, -f 'plt-%g' 0 17)
"$loupe" graph --store "$store" --transcoders "$transcoders" --name prune-ioi --overwrite \
  --prompt "When Mary and John went to the store, John gave a drink to"
"$loupe" graph export --store "$store" --name prune-ioi --out "$out"
"$loupe" graph path --store "$store" --name prune-ioi --to " Mary"
