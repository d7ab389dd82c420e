#!/usr/bin/env bash
# The stages depend one way only: store ← model ← dict ← analysis ← autointerp ← app
# (ARCHITECTURE.md, "Invariants"). For each crate, `cargo tree` lists the Loupe crates it pulls in
# (normal dependencies); any later stage among them fails the check with one line naming both.
set -euo pipefail
cd "$(dirname "$0")/.."

stages=(loupe-store loupe-model loupe-dict loupe-analysis loupe-autointerp loupe-cli loupe)
status=0
for i in "${!stages[@]}"; do
  crate=${stages[$i]}
  deps=$(cargo tree -p "$crate" -e normal --prefix none --locked | grep -o '^loupe[a-z-]*' | sort -u)
  for later in "${stages[@]:$((i + 1))}"; do
    if grep -qx "$later" <<<"$deps"; then
      echo "error: $crate depends on $later, a later stage (cargo tree -p $crate -i $later)" >&2
      status=1
    fi
  done
done
[ "$status" = 0 ] && echo "layers: each stage depends only on the stages before it"
exit "$status"
