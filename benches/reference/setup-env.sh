#!/usr/bin/env bash
# Creates (or reuses) the Python reference environment used to regenerate the numerical-parity
# fixtures (tests/fixtures/regen.py) and by the benchmark reference scripts.
#
#   benches/reference/setup-env.sh            # prints the venv's python path on its last line
#   PY=$(benches/reference/setup-env.sh | tail -1)
#
# The venv lives at ${LOUPE_CACHE:-$HOME/.cache/loupe}/pyenv. Every package comes from PyPI by name
# at a pinned version. PyPI's Linux torch wheel depends on the CUDA runtime wheels (nvidia-*,
# several GB); they are installed as declared (torch will not import without them) and simply stay
# unused: everything here runs on the CPU. A venv that already imports every package at its pinned
# version is reused untouched, so a second run downloads nothing.
set -euo pipefail

fail() { echo "error: $*" >&2; exit 1; }

cache="${LOUPE_CACHE:-$HOME/.cache/loupe}"
venv="$cache/pyenv"
py="$venv/bin/python"

# Pinned versions (name==version, PyPI names). Keep in sync with the check below.
pins=(
  "torch==2.15.0"
  "transformers==5.23.0"
  "tokenizers==0.23.3"
  "gguf==0.19.0"
  "accelerate==1.15.0"
  "sentence-transformers==6.2.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
  "sentencepiece==0.2.3"
  "protobuf==7.36.2"
)

# Succeeds when the venv's python imports every pinned package at its pinned version.
env_ok() {
  [ -x "$py" ] || return 1
  "$py" - "${pins[@]}" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if md.version(name) != version:
        sys.exit(1)
import torch, transformers, gguf, accelerate, sentence_transformers, safetensors, numpy, sentencepiece, google.protobuf
torch.ones(2) @ torch.ones(2)
EOF
}

if env_ok; then
  echo "reusing $venv" >&2
  echo "$py"
  exit 0
fi

base="${PYTHON:-python3}"
command -v "$base" >/dev/null || fail "$base not found: install Python 3.10-3.13 (apt-get install python3 python3-venv)"
"$base" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' \
  || fail "$base is Python $("$base" -c 'import sys; print(sys.version.split()[0])'); need 3.10-3.13 (set PYTHON=...)"

mkdir -p "$cache" || fail "cannot create $cache"
if [ ! -x "$py" ]; then
  rm -rf "$venv"
  echo "creating $venv" >&2
  "$base" -m venv "$venv" >&2 || fail "cannot create a venv with $base (apt-get install python3-venv)"
fi

echo "installing pinned packages into $venv (torch pulls its CUDA wheels, ~4 GB, once)" >&2
"$py" -m pip install --disable-pip-version-check -q --upgrade pip >&2 \
  || fail "pip upgrade failed in $venv"
"$py" -m pip install --disable-pip-version-check -q "${pins[@]}" >&2 \
  || fail "pip install of the pinned packages failed (is PyPI reachable?)"

env_ok || fail "the venv at $venv does not import the pinned packages after installing them"
echo "$py"
