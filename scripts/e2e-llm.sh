#!/usr/bin/env bash
# End-to-end check of Loupe's auto-interp against a REAL OpenAI-compatible server on loopback:
# llama.cpp's server from the PyPI package `llama-cpp-python[server]`, serving the embedded
# Gemma 3 270M GGUF (fetched by `loupe fetch`). It explains 20 live features of an analysed
# dictionary with the delphi explainer (`loupe explain`), scores them with detection, fuzzing,
# simulation and embedding (`loupe score`), searches and exports the explanations, and checks
# the real protocol end to end, log-probabilities included. The quality of the explanations is
# poor (a 270M base model); the point is the protocol.
#
#   scripts/e2e-llm.sh [STORE [DICTIONARY]]
#
# STORE defaults to loupe-demo/ in the repository root (gitignored) and DICTIONARY to demo-topk;
# when the store has no analysis of the dictionary, `loupe demo --headless` builds it first (only
# for demo-topk). Environment: FEATURES (e.g. `0..20`; default the first 20 live features),
# E2E_OUT (the run folder; default a new /tmp/loupe-e2e.XXXXXX, kept: server log, LLM config,
# response cache, export), LOUPE_CACHE (default ~/.cache/loupe).
#
# Every request really goes to the server: the run uses a fresh response cache in the run folder,
# and --redo, so the store's earlier delphi explanations and scores of these features are
# replaced. The exit status is non-zero if the server never answers, fewer than 20 features get
# an explanation row, no score row is written, or no answer carries log-probabilities. The
# log-probabilities are checked in the answers themselves (the run's response cache holds every
# answer as Loupe parsed it); the detection/fuzzing AUROC they feed is reported too, but a small
# base model rarely answers with a readable 0/1 list, so no AUROC is only a warning.
#
# Time on a 2-core Xeon without a GPU (BENCHMARKS.md): ~20 min for the auto-interp part (71
# requests: explain ~4 min, score ~16 min; up to ~140 requests when every explanation parses),
# ~3 min for `loupe demo` when the store is new, ~5 min to build the venv the first time, and a
# cargo release build if the binary is stale.
#
# Needs: cargo, python3 (with venv and pip), curl, network access to PyPI the first time (the
# venv ${LOUPE_CACHE:-~/.cache/loupe}/llama-env is created with `pip install
# 'llama-cpp-python[server]' pyarrow` by package name when missing; it builds llama.cpp from
# source, so a C/C++ compiler), a few GB of free memory (the server keeps
# logits for the whole context to return log-probabilities).
#
# Two server-side settings are worked around here, not in Loupe:
# - The GGUF carries no chat template, so llama-cpp-python would fall back to the llama-2 format,
#   and its `--chat_format gemma` silently drops system messages (Loupe puts the task and the
#   explanation there). The server gets Gemma 3's own template instead (system text prepended
#   to the first user turn), through `--chat_format hf-tokenizer-config`.
# - On CPUs that advertise AMX where the VM does not let a process use it, llama.cpp's AMX
#   kernels crash (SIGSEGV at `ldtilecfg`). A one-token probe detects that, and then the server
#   starts with llama.cpp's extra buffer types (AMX, repacking) turned off.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

fail() { echo "e2e-llm: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

store=${1:-$repo/loupe-demo}
dict=${2:-demo-topk}
cache=${LOUPE_CACHE:-$HOME/.cache/loupe}
gguf=$cache/models/gemma-3-270m-q4_k_m.gguf
minilm=$cache/models/all-MiniLM-L6-v2
venv=$cache/llama-env
lpy=$venv/bin/python
train=10
test=10
windows=2
run=${E2E_OUT:-$(mktemp -d /tmp/loupe-e2e.XXXXXX)}
mkdir -p "$run"
t_start=$(now)
echo "e2e-llm: store $store, dictionary $dict, run folder $run"

# --- the loupe binary -------------------------------------------------------------------------
command -v cargo >/dev/null || fail "cargo not found: install Rust with rustup (https://rustup.rs)"
command -v curl >/dev/null || fail "curl not found"
cargo build --release --locked -p loupe
loupe=$repo/target/release/loupe

# --- the model files --------------------------------------------------------------------------
if [ ! -f "$gguf" ] || [ ! -f "$minilm/config.json" ]; then
  "$loupe" fetch
fi

# --- the llama.cpp server venv ----------------------------------------------------------------
if ! "$lpy" -c "import llama_cpp.server" >/dev/null 2>&1; then
  echo "e2e-llm: creating $venv (pip install 'llama-cpp-python[server]' pyarrow; builds llama.cpp, ~5 min on 2 cores)"
  python3 -m venv "$venv"
  "$lpy" -m pip install --quiet 'llama-cpp-python[server]' pyarrow
fi
if ! "$lpy" -c "import pyarrow" >/dev/null 2>&1; then
  "$lpy" -m pip install --quiet pyarrow
fi
echo "e2e-llm: $("$lpy" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"

# --- the store --------------------------------------------------------------------------------
has_analysis() {
  [ -d "$store" ] || return 1
  "$loupe" store info "$store" 2>/dev/null | awk -v d="$dict" '
    /^[^ ]/ { section = $1 }
    section == "analyses" && $1 == d && $2 == "on" { found = 1 }
    END { exit !found }'
}
if ! has_analysis; then
  [ "$dict" = demo-topk ] || fail "store $store has no analysis of dictionary $dict (run \`loupe analyze\` first)"
  echo "e2e-llm: $store has no analysis of $dict: running loupe demo --headless"
  t0=$(now)
  "$loupe" demo --headless --store "$store"
  echo "e2e-llm: demo took $(elapsed "$t0" "$(now)") s"
  has_analysis || fail "loupe demo did not leave an analysis of $dict in $store"
fi

# --- the features: the first 20 live ones -----------------------------------------------------
if [ -z "${FEATURES:-}" ]; then
  FEATURES=$("$lpy" - "$store/features/$dict/features.arrow" <<'EOF'
import sys
import pyarrow as pa
t = pa.ipc.open_file(sys.argv[1]).read_all()
ids, dead, count = (t.column(c).to_pylist() for c in ("feature_id", "dead", "count"))
live = [f for f, d, c in zip(ids, dead, count) if not d and c > 0][:20]
print(",".join(map(str, live)))
EOF
  )
fi
n_features=$("$lpy" -c "
import sys
n = 0
for part in sys.argv[1].split(','):
    a, _, b = part.partition('..')
    n += int(b) - int(a) if b else 1
print(n)" "$FEATURES")
[ "$n_features" -ge 20 ] || fail "only $n_features features chosen ($FEATURES); the check needs 20"
echo "e2e-llm: features $FEATURES"

# --- the server -------------------------------------------------------------------------------
# Gemma 3's chat template (as in its HF tokenizer_config.json), adapted to llama-cpp-python's
# hf-tokenizer-config formatter, which appends an empty assistant message to prompt the answer.
"$lpy" - "$run/gemma3-chat.json" <<'EOF'
import json, sys
template = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- if loop.last and message['role'] == 'assistant' and not message['content'] -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
with open(sys.argv[1], "w") as f:
    json.dump({"chat_template": template, "bos_token": "<bos>", "eos_token": "<end_of_turn>"}, f, indent=1)
EOF
# The server, or (with --probe) a one-token completion; LOUPE_LLAMA_NO_EXTRA_BUFTS=1 turns off
# llama.cpp's extra buffer types (AMX, repacking), which llama-cpp-python has no flag for.
cat >"$run/llama_server.py" <<'EOF'
import os, runpy, sys
if os.environ.get("LOUPE_LLAMA_NO_EXTRA_BUFTS") == "1":
    import llama_cpp.llama_cpp as C
    _default = C.llama_model_default_params
    def _params():
        p = _default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = _params
if sys.argv[1:2] == ["--probe"]:
    from llama_cpp import Llama
    m = Llama(model_path=sys.argv[2], n_ctx=64, n_threads=1, verbose=False)
    m("The", max_tokens=2, temperature=0)
    sys.exit(0)
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
EOF
export OMP_WAIT_POLICY=passive # spinning OpenMP threads stall badly on a shared 2-core machine
export LOUPE_LLAMA_NO_EXTRA_BUFTS=${LOUPE_LLAMA_NO_EXTRA_BUFTS:-0}
if ! "$lpy" "$run/llama_server.py" --probe "$gguf" >"$run/probe.log" 2>&1; then
  echo "e2e-llm: llama.cpp crashed on a one-token completion ($(tail -c 300 "$run/probe.log" | tr '\n' ' '));"
  echo "e2e-llm: retrying without its extra buffer types (AMX kernels, weight repacking)"
  export LOUPE_LLAMA_NO_EXTRA_BUFTS=1
  "$lpy" "$run/llama_server.py" --probe "$gguf" >"$run/probe.log" 2>&1 ||
    fail "llama.cpp cannot complete one token even without extra buffer types: see $run/probe.log"
fi
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
threads=$(nproc)
server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap stop_server EXIT
"$lpy" "$run/llama_server.py" --model "$gguf" --model_alias gemma-3-270m --host 127.0.0.1 --port "$port" \
  --n_ctx 4096 --n_threads "$threads" --n_threads_batch "$threads" --logits_all True \
  --chat_format hf-tokenizer-config --hf_tokenizer_config_path "$run/gemma3-chat.json" \
  >"$run/server.log" 2>&1 &
server_pid=$!
base_url=http://127.0.0.1:$port/v1
up=0
for _ in $(seq 300); do
  kill -0 "$server_pid" 2>/dev/null || break
  if curl -sf "$base_url/models" >/dev/null; then up=1; break; fi
  sleep 1
done
if [ "$up" != 1 ]; then
  tail -20 "$run/server.log" >&2
  fail "the llama.cpp server never answered on $base_url/models (log: $run/server.log)"
fi
echo "e2e-llm: llama.cpp server up on $base_url (pid $server_pid, $threads threads, extra buffer types $([ "$LOUPE_LLAMA_NO_EXTRA_BUFTS" = 1 ] && echo off || echo on))"

cat >"$run/llm.toml" <<EOF
base_url = "$base_url"
model = "gemma-3-270m"
concurrency = 1       # llama-cpp-python's server answers one request at a time
timeout_seconds = 600 # a 200-token answer on 2 loaded cores can take minutes
max_retries = 2
temperature = 0.0
logprobs = true
EOF
llm=(--llm-config "$run/llm.toml" --cache "$run/llm-cache")
sel=(--store "$store" --dictionary "$dict" --features "$FEATURES" --train-examples "$train" --test-examples "$test" --redo)
for j in "$store/explanations/$dict"/*.journal.jsonl; do
  [ -e "$j" ] && echo "e2e-llm: note: $j exists: an interrupted run's finished records are reused, not resent"
done

# --- explain, score, search, export -----------------------------------------------------------
t0=$(now)
"$loupe" explain "${sel[@]}" "${llm[@]}" --explainer delphi 2>&1 | tee "$run/explain.log"
t_explain=$(elapsed "$t0" "$(now)")
t0=$(now)
"$loupe" score "${sel[@]}" "${llm[@]}" --explainer delphi --scorers detection,fuzzing,simulation,embedding \
  --simulation-windows "$windows" 2>&1 | tee "$run/score.log"
t_score=$(elapsed "$t0" "$(now)")
stop_server
echo "e2e-llm: search \"words about the sea\":"
"$loupe" search --store "$store" --dictionary "$dict" -k 3 "words about the sea"
"$loupe" export --store "$store" --dictionary "$dict" --out "$run/export" --overwrite

# --- the check ----------------------------------------------------------------------------------
spent() { # requests sent, prompt tokens, completion tokens of a run's summary line
  sed -nE 's/.* ([0-9]+) requests sent \([0-9]+ of them retries\), ([0-9]+) from the cache, ([0-9]+) prompt \+ ([0-9]+) completion tokens.*/\1 \3 \4/p' "$1" | tail -1
}
read -r ex_req ex_prompt ex_completion <<<"$(spent "$run/explain.log")" || true
read -r sc_req sc_prompt sc_completion <<<"$(spent "$run/score.log")" || true
t_total=$(elapsed "$t_start" "$(now)")
"$lpy" - "$run" "$FEATURES" <<EOF
import glob, json, math, sys
import pyarrow.parquet as pq

run, features = sys.argv[1], set()
for part in sys.argv[2].split(","):
    a, _, b = part.partition("..")
    features.update(range(int(a), int(b)) if b else [int(a)])
rows = lambda name: [r for r in pq.read_table(f"{run}/export/{name}").to_pylist()
                     if r["explainer"] == "delphi" and r["feature_id"] in features]
ex, sc = rows("explanations.parquet"), rows("scores.parquet")
ok_ex = [e for e in ex if e["explanation"] is not None]
mean = lambda xs: (sum(xs) / len(xs)) if xs else float("nan")
fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

print()
print(f"explain: {len(ex)} explanation rows for {len(features)} features: {len(ok_ex)} explained, {len(ex) - len(ok_ex)} failed"
      f" ({${ex_req:-0}} requests, ${ex_prompt:-0} prompt + ${ex_completion:-0} completion tokens, ${t_explain} s)")
for e in ex:
    text = e["explanation"] if e["explanation"] is not None else "FAILED: " + (e["failure"] or "")
    print(f"  {e['feature_id']:>6}  {text[:110]}")
print(f"score: {len(sc)} score rows ({${sc_req:-0}} requests, ${sc_prompt:-0} prompt + ${sc_completion:-0} completion tokens, ${t_score} s)")
print(f"  {'scorer':<11} {'rows':>4} {'ok':>4} {'failed':>6} {'mean score':>10} {'AUROC rows':>10} {'mean AUROC':>10}")
by = {}
for s in sc:
    by.setdefault(s["scorer"], []).append(s)
auroc_rows = 0
for name in ("detection", "fuzzing", "simulation", "embedding"):
    rs = by.get(name, [])
    ok = [r for r in rs if r["failure"] is None]
    au = [r["auroc"] for r in ok if r["auroc"] is not None]
    if name in ("detection", "fuzzing"):
        auroc_rows += len(au)
    print(f"  {name:<11} {len(rs):>4} {len(ok):>4} {len(rs) - len(ok):>6} {fmt(mean([r['score'] for r in ok if r['score'] is not None])):>10}"
          f" {len(au):>10} {fmt(mean(au)):>10}")
    reasons = sorted({(r['failure'] or '')[:140] for r in rs if r['failure'] is not None})
    for why in reasons[:3]:
        print(f"      failure: {why}")

# Every answer the server gave is in this run's fresh cache, as Loupe parsed it.
responses = [json.load(open(p))["response"] for p in glob.glob(f"{run}/llm-cache/*/*.json")]
with_lp = [r for r in responses if r.get("logprobs")]
with_top = [r for r in with_lp if any(t.get("top") for t in r["logprobs"])]
cut = sum(1 for e in ex if e["max_tokens"] and e["completion_tokens"] >= e["max_tokens"])
print(f"responses: {len(responses)} answers, {len(with_lp)} with log-probabilities ({len(with_top)} with top alternatives);"
      f" {auroc_rows} detection/fuzzing rows with an AUROC; {cut} of {len(ex)} explain answers stopped at max_tokens")
if with_lp:
    t = with_lp[0]["logprobs"][0]
    print(f"  first log-probability as parsed: {json.dumps(t, ensure_ascii=False)[:200]}")

problems, notes = [], []
if len(ex) < 20:
    problems.append(f"only {len(ex)} features have an explanation row (need 20)")
if not sc:
    problems.append("no score row was written")
if not with_lp:
    problems.append("no response carried log-probabilities")
elif auroc_rows == 0:
    # The log-probabilities are there (above), but AUROC needs an answer that parses as a 0/1
    # list first, which a small base model may never give: a warning, not a failure.
    notes.append("no detection/fuzzing answer parsed as a 0/1 list, so no AUROC used the log-probabilities")
verdict = "PASS" if not problems else "FAIL (" + "; ".join(problems) + ")"
for n in notes:
    print(f"e2e-llm: warning: {n}")
total_req = ${ex_req:-0} + ${sc_req:-0}
total_tok = ${ex_prompt:-0} + ${ex_completion:-0} + ${sc_prompt:-0} + ${sc_completion:-0}
print()
print(f"e2e-llm: {verdict}: {len(ok_ex)}/{len(features)} features explained, {sum(1 for s in sc if s['failure'] is None)}/{len(sc)} scores ok,"
      f" logprobs in {len(with_lp)}/{len(responses)} answers, {auroc_rows} AUROCs; {total_req} requests, {total_tok} tokens;"
      f" explain ${t_explain} s + score ${t_score} s, ${t_total} s in all")
sys.exit(0 if not problems else 1)
EOF
