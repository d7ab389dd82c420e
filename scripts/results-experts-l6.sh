#!/usr/bin/env bash
# Regenerates RESULTS.md's "Experts on Gemma 3 270M layer 6" table: a Monet VD transcoder, a MoE-X
# transcoder and a TopK transcoder of equal parameter count (~6.72M), all from
# blocks.6.ln2.hook_normalized to blocks.6.hook_mlp_out, on the same tokens of a two-domain corpus,
# then `loupe experts` on the two mixtures for their domain specialization.
#
#   scripts/results-experts-l6.sh [DIR]    # default DIR: runs/experts-l6 (runs/ is ignored by git)
#
# The corpus is a two-domain slice of the default one: the first 300,000 bytes of Moby-Dick and the
# State of the Union addresses from 1993 on until 360,000 bytes (domains = the corpus's top-level
# folders, moby-dick/ and sotu/). Documents are read in path order, so the held-out rows (the
# last tenth) are all State of the Union. Capture ~3 min, training ~2 min (TopK), ~1 min (MoE-X),
# ~3 min (Monet), experts ~1 min each, on 2 cores. Reruns skip what is done. The last column needs
# pyarrow (PYTHON, default the venv of benches/reference/setup-ct-env.sh).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/runs/experts-l6}"
cache="${LOUPE_CACHE:-$HOME/.cache/loupe}"
loupe="$root/target/release/loupe"
store="$dir/store"
corpus="$dir/corpus"
mlp_in=blocks.6.ln2.hook_normalized
mlp_out=blocks.6.hook_mlp_out

cargo build --release -p loupe --manifest-path "$root/Cargo.toml"
"$loupe" fetch
if [ ! -d "$corpus" ]; then
  mkdir -p "$corpus.tmp/moby-dick" "$corpus.tmp/sotu"
  head -c 300000 "$cache/corpus/moby-dick/data.txt" > "$corpus.tmp/moby-dick/data.txt"
  total=0
  for f in $(ls "$cache/corpus/sotu" | sort | awk -F_ '$1 >= 1993'); do
    cp "$cache/corpus/sotu/$f" "$corpus.tmp/sotu/"
    total=$((total + $(stat -c %s "$corpus.tmp/sotu/$f")))
    [ "$total" -gt 360000 ] && break
  done
  mv "$corpus.tmp" "$corpus"
fi
"$loupe" capture --model "$cache/models/gemma-3-270m-q4_k_m.gguf" --corpus "$corpus" --store "$store" \
  --hook "$mlp_in" --hook "$mlp_out" --context 256 --dtype f16 --max-tokens 163840

trained() { "$loupe" store info "$store" | grep "^  $1 .* done " > /dev/null; }
common=(--store "$store" --input-hook "$mlp_in" --hook "$mlp_out" --tokens 405504 --batch 4096
  --checkpoint-every 0 --eval-contexts 16)
# Equal parameters: TopK n 5,248 (2·5,248·640 = 6,717,440 + biases), MoE-X E 16 × m 328 (the same
# 5,248 units), Monet VD E 256, H 4, dim 16 (6,721,536).
trained topk-l6 || "$loupe" train-sae "${common[@]}" --dictionary topk-l6 --variant topk \
  --n-features 5248 --k 32 --lr 1e-3
trained moex-l6 || "$loupe" train-moex "${common[@]}" --dictionary moex-l6 --experts 16 \
  --expert-width 328 --top-k 2 --lr 1e-3 --balance-alpha 0.1
trained monet-l6-vd || "$loupe" train-monet "${common[@]}" --dictionary monet-l6-vd \
  --decomposition vd --experts 256 --heads 4 --topk 8 --dim 16
for d in moex-l6 monet-l6-vd; do
  jq -e ".experts[\"$d\"]" "$store/manifest.json" > /dev/null || "$loupe" experts --store "$store" --dictionary "$d"
done

echo "| transcoder | FVU | active units / token | dead | CE-loss recovered | KL | experts / token | mean domain specialization lift |"
echo "|---|---|---|---|---|---|---|---|"
for d in topk-l6 moex-l6 monet-l6-vd; do
  e="$store/dictionaries/$d/eval.json"
  spec="–"; per="–"
  if jq -e ".experts[\"$d\"]" "$store/manifest.json" > /dev/null; then
    per=$(jq -r ".experts[\"$d\"].mean_active * 10 | round / 10" "$store/manifest.json")
    spec=$("${PYTHON:-$cache/ctenv/bin/python}" "$root/scripts/experts_lift.py" "$store" "$d")
  fi
  jq -r --arg d "$d" --arg per "$per" --arg spec "$spec" \
    '"| \($d) | \(.held_out.fvu * 1000 | round / 1000) | \(.held_out.l0 * 10 | round / 10) | \(.held_out.dead_fraction * 1000 | round / 10) % | \(.splice.ce_loss_recovered * 1000 | round / 1000) | \(.splice.kl * 1000 | round / 1000) | \($per) | \($spec) |"' "$e"
done
