#!/usr/bin/env bash
# Regenerates the Monet table of RESULTS.md: Monet HD and VD autoencoders (E 256: 65,536 experts)
# and a TopK SAE with the same number of parameters on Gemma 3 270M's blocks.6.hook_resid_post,
# plus a Monet VD transcoder from blocks.6.ln2.hook_normalized to blocks.6.hook_mlp_out, all on
# the same 1M+ training tokens and evaluated on the same held-out tokens.
#
#   scripts/results-monet-l6.sh [STORE]    # default STORE: runs/l6-monet (runs/ is ignored by git)
#
# The capture (three hooks, f16, ~1.06M tokens, no gradients) takes ~15 minutes on 2 cores and is
# resumable; each training run takes a few minutes. Rerun after an interruption: finished
# dictionaries are skipped, interrupted ones resume from their last checkpoint.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
store="${1:-$root/runs/l6-monet}"
cache="${LOUPE_CACHE:-$HOME/.cache/loupe}"
loupe="$root/target/release/loupe"
resid=blocks.6.hook_resid_post
mlp_in=blocks.6.ln2.hook_normalized
mlp_out=blocks.6.hook_mlp_out

cargo build --release -p loupe --manifest-path "$root/Cargo.toml"
"$loupe" fetch
# 1,064,960 rows: 1,048,576 training tokens (256 batches of 4096) + 16,384 held out.
"$loupe" capture --model "$cache/models/gemma-3-270m-q4_k_m.gguf" --corpus "$cache/corpus" \
  --store "$store" --hook "$resid" --hook "$mlp_in" --hook "$mlp_out" --context 256 --dtype f16 \
  --max-tokens 1064960

# (grep reads all of the output: with -q it would stop early and, under pipefail, fail the pipe.)
trained() { "$loupe" store info "$store" | grep "^  $1 .* done " > /dev/null; }
common=(--batch 4096 --eval-tokens 16384 --eval-contexts 16 --checkpoint-every 20)
# Monet E 256, H 4, topk 8, dim 16 has 6,721,536 parameters (either decomposition); a TopK SAE
# with n 5,248 has 6,723,328.
monet=(--experts 256 --heads 4 --topk 8 --dim 16)
trained l6-sae-equal || "$loupe" train-sae --store "$store" --hook "$resid" --dictionary l6-sae-equal \
  --variant topk --n-features 5248 --k 32 "${common[@]}"
trained l6-monet-hd || "$loupe" train-monet --store "$store" --hook "$resid" --dictionary l6-monet-hd \
  --decomposition hd "${monet[@]}" "${common[@]}"
trained l6-monet-vd || "$loupe" train-monet --store "$store" --hook "$resid" --dictionary l6-monet-vd \
  --decomposition vd "${monet[@]}" "${common[@]}"
trained l6-monet-vd-transcoder || "$loupe" train-monet --store "$store" --input-hook "$mlp_in" \
  --hook "$mlp_out" --dictionary l6-monet-vd-transcoder --decomposition vd "${monet[@]}" "${common[@]}"

python3 - "$store" <<'PY'
import json, sys
store = sys.argv[1]
rows = [("TopK SAE (n 5,248, k 32)", "l6-sae-equal"), ("Monet HD (E 256)", "l6-monet-hd"),
        ("Monet VD (E 256)", "l6-monet-vd"), ("Monet VD transcoder (E 256)", "l6-monet-vd-transcoder")]
print("| dictionary | FVU | features active / token | dead % | CE-loss recovered | KL |")
print("|---|---|---|---|---|---|")
for label, name in rows:
    try:
        e = json.load(open(f"{store}/dictionaries/{name}/eval.json"))
    except FileNotFoundError:
        print(f"| {label} | (not trained) | | | | |")
        continue
    h, s = e["held_out"], e["splice"]
    ce = "| – | – |" if "skipped" in s else f"| {s['ce_loss_recovered']:.4f} | {s['kl']:.4f} |"
    print(f"| {label} | {h['fvu']:.4f} | {h['l0']:.1f} | {100*h['dead_fraction']:.2f} {ce}")
PY
