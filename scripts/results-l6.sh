#!/usr/bin/env bash
# Regenerates the SAE table of RESULTS.md: TopK, Mutual Choice, Feature Choice and g-SAE trained
# with the same settings on the same tokens of Gemma 3 270M's blocks.6.hook_resid_post, evaluated
# on the same held-out tokens (FVU, L0, dead, dense; CE-loss recovered and KL with the SAE spliced
# into the model).
#
#   scripts/results-l6.sh [STORE]        # default STORE: runs/l6 (outside git: runs/ is ignored)
#
# The capture takes the default corpus (Moby-Dick, then the State of the Union addresses) with
# loss gradients, which g-SAE needs and the others ignore: about 100 minutes of both cores here
# (the gradient pass dominates), resumable — rerun the script after an interruption. Training
# each SAE takes a minute or two. Set VARIANTS="topk mutual_choice" to train only some, and
# GRADS=0 to capture without gradients (everything but g-SAE, ~5 minutes).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
store="${1:-$root/runs/l6}"
cache="${LOUPE_CACHE:-$HOME/.cache/loupe}"
loupe="$root/target/release/loupe"
hook=blocks.6.hook_resid_post
variants="${VARIANTS:-topk mutual_choice feature_choice gsae}"
grads="${GRADS:-1}"

cargo build --release -p loupe --manifest-path "$root/Cargo.toml"
"$loupe" fetch

grad_flag=()
[ "$grads" = 1 ] && grad_flag=(--with-grads)
# 540,000 rows (at a batch boundary): ~523,600 training tokens + 16,384 held out.
"$loupe" capture --model "$cache/models/gemma-3-270m-q4_k_m.gguf" --corpus "$cache/corpus" \
  --store "$store" --hook "$hook" --context 256 --dtype f32 --max-tokens 540000 "${grad_flag[@]}"

for variant in $variants; do
  name="l6-$variant"
  # (grep reads all of the output: with -q it would stop early and, under pipefail, fail the pipe.)
  if "$loupe" store info "$store" | grep "^  $name .* done " > /dev/null; then
    echo "$name: already trained"
    continue
  fi
  # The same settings for every variant: 16,384 features (expansion 25.6), k 32, batch 4096,
  # one pass over the training tokens, 16,384 held-out tokens, 16 held-out contexts spliced.
  "$loupe" train-sae --store "$store" --hook "$hook" --dictionary "$name" --variant "$variant" \
    --n-features 16384 --k 32 --batch 4096 --eval-tokens 16384 --eval-contexts 16 \
    --checkpoint-every 20
done

# The table, from each dictionary's eval.json.
python3 - "$store" $variants <<'EOF'
import json, sys
store, variants = sys.argv[1], sys.argv[2:]
print("| variant | FVU | L0 | dead % | dense % | CE clean | CE spliced | CE zero-abl. | CE-loss recovered | KL |")
print("|---|---|---|---|---|---|---|---|---|---|")
for v in variants:
    try:
        e = json.load(open(f"{store}/dictionaries/l6-{v}/eval.json"))
    except FileNotFoundError:
        print(f"| {v} | (not trained) |||||||||")
        continue
    h, s = e["held_out"], e["splice"]
    if "skipped" in s:
        ce = "| – | – | – | – | – |"
    else:
        ce = (f"| {s['ce_clean']:.4f} | {s['ce_spliced']:.4f} | {s['ce_zero_ablation']:.4f} "
              f"| {s['ce_loss_recovered']:.4f} | {s['kl']:.4f} |")
    print(f"| {v} | {h['fvu']:.4f} | {h['l0']:.2f} | {100*h['dead_fraction']:.2f} "
          f"| {100*h['dense_fraction']:.2f} {ce}")
EOF
