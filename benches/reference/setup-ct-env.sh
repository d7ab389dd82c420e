#!/usr/bin/env bash
# Creates (or reuses) the circuit-tracer environment: the reference for attribution graphs
# (tests/fixtures/graph_ref.py, benches/reference/graph.py, `loupe bench graph`).
#
#   benches/reference/setup-ct-env.sh            # prints the venv's python path on its last line
#   PY=$(benches/reference/setup-ct-env.sh | tail -1)
#
# circuit-tracer 0.5.0 needs transformers <= 4.57.3 while the main reference venv
# (benches/reference/setup-env.sh, ${LOUPE_CACHE:-~/.cache/loupe}/pyenv) has transformers 5, so it
# gets its own venv, ${LOUPE_CACHE:-~/.cache/loupe}/ctenv. To avoid a second multi-GB torch
# download, that venv sees the pyenv's site-packages through a .pth file (listed after its own, so
# its own transformers 4.57.3, tokenizers and huggingface-hub win) and takes torch from there. Every
# package comes from PyPI by name at a pinned version; pip pulls circuit-tracer's dependencies
# (transformer-lens, nnsight, ...). A venv that already imports the pinned versions is reused
# untouched, so a second run installs nothing.
set -euo pipefail

fail() { echo "error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${LOUPE_CACHE:-$HOME/.cache/loupe}"
venv="$cache/ctenv"
py="$venv/bin/python"

# Pinned versions (name==version, PyPI names). Keep in sync with the check below.
# circuit-tracer 0.5.0 asks for nnsight>=0.6.0, which pip resolves to the newest, 0.8.1; that release
# no longer has `nnsight.intervention.tracing`, which circuit-tracer's nnsight backend (the one for
# Gemma 3) imports. With 0.6.3 (the newest 0.6) it imports and runs.
pins=(
  "circuit-tracer==0.5.0"
  "transformers==4.57.3"
  "nnsight==0.6.3"
)

# Succeeds when the venv's python imports circuit-tracer and its backends at the pinned versions,
# with torch from the pyenv.
env_ok() {
  [ -x "$py" ] || return 1
  "$py" - "${pins[@]}" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if md.version(name) != version:
        sys.exit(1)
if md.version("torch") != "2.15.0":
    sys.exit(1)
import torch, transformers, transformer_lens, nnsight, circuit_tracer, gguf, safetensors
from circuit_tracer import attribute, ReplacementModel
import circuit_tracer.replacement_model.replacement_model_nnsight
import circuit_tracer.replacement_model.replacement_model_transformerlens
torch.ones(2) @ torch.ones(2)
EOF
}

if env_ok; then
  echo "reusing $venv" >&2
  echo "$py"
  exit 0
fi

# The base environment with torch (and gguf, safetensors, numpy) at their pins.
base_py="$("$here/setup-env.sh" | tail -1)" || fail "benches/reference/setup-env.sh failed"
site="$("$base_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

if [ ! -x "$py" ]; then
  rm -rf "$venv"
  echo "creating $venv" >&2
  "$base_py" -m venv "$venv" >&2 || fail "cannot create a venv with $base_py"
fi
own_site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# "zz-" sorts last: the pyenv's packages come after the venv's own.
echo "$site" >"$own_site/zz-loupe-pyenv.pth"

echo "installing pinned packages into $venv" >&2
"$py" -m pip install --disable-pip-version-check -q "${pins[@]}" >&2 \
  || fail "pip install of the pinned packages failed (is PyPI reachable?)"

env_ok || fail "the venv at $venv does not import the pinned packages after installing them"
echo "$py"
