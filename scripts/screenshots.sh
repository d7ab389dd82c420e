#!/usr/bin/env bash
# Screenshots of each view of the real app: starts `loupe gui` under Xvfb (wgpu on Mesa's CPU
# Vulkan driver) on a store the pipeline made, and saves one PNG per view with xwd + netpbm.
#
#   scripts/screenshots.sh [store] [out-dir]     # defaults: loupe-demo (from `loupe demo`), docs/screenshots
#   FEATURE=12 HEAD=5.1 scripts/screenshots.sh    # the feature page and the head shown
#   CIRCUIT=ioi-attribution scripts/screenshots.sh # the circuit shown with its edges
#   GRAPH=demo-ioi EXPERTS=demo-moex scripts/screenshots.sh  # the graph and expert tables shown
#
# Every view: feature-list, feature-page, prompt-lab, heads, head-pattern, circuits,
# circuits-edges, graph, experts (.png). The defaults are the names `loupe demo` writes.
#
# The README shows the PNGs this writes.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-loupe-demo}
out=${2:-docs/screenshots}
source scripts/install-deps.sh
[ -f "$store/manifest.json" ] || { echo "error: $store is not a store; run scripts/demo.sh --headless first" >&2; exit 1; }
cargo build --release --locked --bin loupe
mkdir -p "$out"

display=:94
Xvfb "$display" -screen 0 1400x900x24 -nolisten tcp &
xvfb=$!
trap 'kill $xvfb 2>/dev/null || true' EXIT
sleep 2

# One view: start the app with `args`, wait `secs`, grab the screen, close the app.
shot() {
  local name=$1 secs=$2
  shift 2
  DISPLAY=$display ./target/release/loupe gui "$store" "$@" &
  local app=$!
  sleep "$secs"
  kill -0 $app 2>/dev/null || { echo "error: loupe gui exited before the $name screenshot" >&2; exit 1; }
  xwd -root -display "$display" -silent | xwdtopnm 2>/dev/null | pnmtopng > "$out/$name.png"
  kill $app
  wait $app 2>/dev/null || true
  echo "wrote $out/$name.png"
}

shot feature-list 8 --dictionary "${DICTIONARY:-demo-topk}"
shot feature-page 8 --dictionary "${DICTIONARY:-demo-topk}" --feature "${FEATURE:-12}"
shot prompt-lab 25 --view prompt-lab --prompt "When Mary and John went to the store, John gave a drink to"
# The Heads view: the grid of the store's heads table (`loupe heads --store <store>` makes it; without
# one the view says so), then a head opened with its attention pattern on the prompt.
shot heads 8 --view heads
shot head-pattern 25 --head "${HEAD:-5.1}" --prompt "When Mary and John went to the store, John gave a drink to. When Mary and John went to the store, John gave a drink to"
# The Circuits view: the first task's ground truth (patching) with the task's evaluation below it
# (`loupe circuit` and `loupe circuit eval` make them; without any the view says what to run), then
# a circuit with edges (attribution patching's) when the store has it.
shot circuits 8 --view circuits
circuit=${CIRCUIT:-ioi-attribution}
if grep -q "\"$circuit\"" "$store/manifest.json"; then
  shot circuits-edges 8 --circuit "$circuit"
else
  echo "no circuit $circuit in $store: no circuits-edges screenshot (run \`loupe circuit --method attribution\`)"
fi
# The Graph view: the store's first attribution graph (`loupe graph --store <store> --transcoders …
# --prompt …` makes one; without any the view says so).
graph=${GRAPH:-demo-ioi}
if grep -q "\"$graph\"" "$store/manifest.json"; then
  shot graph 12 --graph "$graph"
else
  shot graph 12 --view graph
fi
# The Experts view: a MoE-X's expert tables (`loupe experts --dictionary <moex>` makes them).
experts=${EXPERTS:-demo-moex}
if grep -q "\"$experts\"" "$store/manifest.json"; then
  shot experts 10 --experts "$experts"
else
  shot experts 10 --view experts
fi
# Keep the PNGs small: 8-bit palette where pngquant is installed.
if command -v pngquant > /dev/null; then
  for f in "$out"/*.png; do pngquant --force --skip-if-larger --output "$f" 256 -- "$f" || true; done
fi
