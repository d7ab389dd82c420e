#!/usr/bin/env bash
# RESULTS.md, "Transcoders on Gemma 3 270M": one skip TopK transcoder per layer (plt-0 … plt-17,
# blocks.L.ln2.hook_normalized → blocks.L.hook_mlp_out, 4096 features, k 32), trained one after
# another, then the table of each one's eval.json, and skip vs no skip on layers 6 and 12.
#
#   scripts/results-transcoders.sh [STORE]        (default runs/transcoders)
#   TABLE_ONLY=1 scripts/results-transcoders.sh S (print the table of an existing store)
#
# The store holds every layer's MLP input and output (f16, ~150k tokens of the cached corpus, BOS
# prepended, contexts of 256). The RESULTS run trained layers 0–1 on one pass (136k tokens, batch
# 1024), layers 2–5 on 64k tokens (batch 1024) and layers 6–17 and the no-skip runs on 40,960
# tokens (batch 512): the 2-core machine was shared by six jobs. Set TOKENS/BATCH to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-runs/transcoders}
cache=${LOUPE_CACHE:-$HOME/.cache/loupe}
loupe=${LOUPE:-target/release/loupe}
tokens=${TOKENS:-40960}
batch=${BATCH:-512}
if [ -z "${TABLE_ONLY:-}" ]; then
  [ -x "$loupe" ] || cargo build --release --bin loupe
  "$loupe" fetch
  if [ ! -f "$store/manifest.json" ]; then
    hooks=()
    for L in $(seq 0 17); do hooks+=(--hook "blocks.$L.ln2.hook_normalized" --hook "blocks.$L.hook_mlp_out"); done
    "$loupe" capture --model "$cache/models/gemma-3-270m-q4_k_m.gguf" --corpus "$cache/corpus" \
      --store "$store" "${hooks[@]}" --context 256 --max-tokens 150960 --dtype f16
  fi
  train() { # name layer extra...
    local name=$1 L=$2; shift 2
    jq -e ".dictionaries[\"$name\"]" "$store/manifest.json" > /dev/null && return 0
    "$loupe" train-sae --store "$store" --hook "blocks.$L.hook_mlp_out" \
      --input-hook "blocks.$L.ln2.hook_normalized" "$@" --n-features 4096 --k 32 --lr 1e-3 \
      --tokens "$tokens" --batch "$batch" --checkpoint-every 0 --eval-contexts 4 --dictionary "$name"
  }
  for L in $(seq 0 17); do train "plt-$L" "$L" --skip; done
  for L in 6 12; do train "plt-noskip-$L" "$L"; done
fi

row() { # name label
  local e="$store/dictionaries/$1/eval.json" t
  [ -f "$e" ] || { echo "| $2 | (not trained) |"; return; }
  t=$(jq -r ".dictionaries[\"$1\"].tokens" "$store/manifest.json")
  jq -r --arg lab "$2" --arg tokens "$t" '"| \($lab) | \($tokens) | \(.held_out.fvu * 1000 | round / 1000) | \(.held_out.l0 * 10 | round / 10) | \(.held_out.dead_fraction * 1000 | round / 10) % | \(if .splice.ce_loss_recovered then (.splice.ce_loss_recovered * 1000 | round / 1000) else "–" end) | \(if .splice.kl then (.splice.kl * 1000 | round / 1000) else "–" end) |"' "$e"
}
echo "| layer | tokens | FVU | L0 | dead | CE-loss recovered | KL |"
echo "|---|---|---|---|---|---|---|"
for L in $(seq 0 17); do row "plt-$L" "$L"; done
echo
echo "| transcoder | tokens | FVU | L0 | dead | CE-loss recovered | KL |"
echo "|---|---|---|---|---|---|---|"
for L in 6 12; do
  row "plt-$L" "$L skip"
  row "plt-noskip-$L" "$L no skip"
done
