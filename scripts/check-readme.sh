#!/usr/bin/env bash
# Runs every ```sh block of README.md in order, as a new user would on a fresh clone, and fails on
# the first block that does not work, naming its line in the README and the command.
#
#   scripts/check-readme.sh                  # README.md; after `cargo build --release --workspace --bins`
#   scripts/check-readme.sh --readme FILE    # another file (the self-test uses this)
#   scripts/check-readme.sh --self-test      # a README with a broken command must fail, naming its line
#   scripts/check-readme.sh --keep           # keep the scratch folder (its path is printed)
#   scripts/check-readme.sh --scratch DIR --from LINE   # go on in a kept scratch folder from a block
#
# How a block runs: `bash -eE -o pipefail` from the repository root, with target/release first on
# the PATH, each block in a fresh shell (variables do not carry over). Blocks fenced as `toml`,
# `text` or anything but `sh` are not commands. Before a block runs, these declared rewrites apply
# (each printed when it changes a block):
#   - `runs/...` and `loupe-demo...` paths point into a scratch folder instead (the README's stores
#     live there; a user's own runs/ is never touched);
#   - `~/.cache/loupe` becomes $LOUPE_CACHE when that is set;
#   - `loupe gui ARGS` starts the app under Xvfb (or the $DISPLAY there is) for GUI_SECONDS (6) and
#     checks it is still running and printed no `error:` line, then closes it;
#   - the blocks of the RULES table below are replaced or skipped, with the reason printed.
# Nothing else is changed: the sizes are the README's own (its walkthrough runs on a small store).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import os, re, shutil, subprocess, sys, tempfile, time

# What happens to a block whose text matches the pattern: ("skip", reason) or ("replace", new
# first line pattern's replacement, reason). The first matching rule wins.
RULES = [
    (r"^scripts/demo\.sh\b", "replace",
     (r"^scripts/demo\.sh\b[^#\n]*", 'scripts/demo.sh --headless --quick --store "$LOUPE_README_SCRATCH/loupe-demo-quick" '),
     "the full demo takes ~15 minutes: the same stages at the quick budget, headless"),
    (r"^scripts/test\.sh\b", "skip", "it is what runs this check"),
    (r"^scripts/fuzz\.sh\b", "skip", "scripts/test.sh runs the fuzz targets itself, after this check"),
    (r"llama_cpp|llama-env", "skip",
     "builds llama-cpp-python from source (~5 min) and starts a server; scripts/e2e-llm.sh checks that endpoint"),
    (r"--llm-config llm\.toml", "skip", "needs the llama.cpp server of the block before"),
    (r"/path/to/", "skip", "no real MoE weights can be fetched on this machine"),
]
GUI_SECONDS = int(os.environ.get("GUI_SECONDS", "6"))

PRELUDE = r'''set -eE -o pipefail
trap 'printf "%s\t%s\n" "$LINENO" "$BASH_COMMAND" > "$LOUPE_README_ERR"' ERR
gui_check() {
  local log; log=$(mktemp)
  loupe gui "$@" >"$log" 2>&1 &
  local app=$!
  sleep "$GUI_SECONDS"
  local why=""
  if ! kill -0 "$app" 2>/dev/null; then
    wait "$app" || true; why="exited within ${GUI_SECONDS} s"
  else
    kill "$app"; wait "$app" 2>/dev/null || true
    grep -q "^error:" "$log" && why="printed an error"
  fi
  if [ -n "$why" ]; then # name the README line that called it, not this function's
    cat "$log"; echo "loupe gui $* $why" >&2
    printf "%s\tloupe gui %s\n" "${BASH_LINENO[0]}" "$*" > "$LOUPE_README_ERR"
    exit 1
  fi
  echo "loupe gui $*: still running after ${GUI_SECONDS} s, closed"
}
'''

def parse(path):
    """The README's fenced blocks: (language, line of the first command line, lines)."""
    blocks, lines = [], open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w-]*)", lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            blocks.append((m.group(1), i + 2, lines[i + 1:j]))
            i = j + 1
        else:
            i += 1
    return blocks

def rewrite(text):
    new = re.sub(r'(?<![\w/.$-])runs/', '"$LOUPE_README_SCRATCH"/runs/', text)
    new = re.sub(r'(?<![\w/.$-])loupe-demo', '"$LOUPE_README_SCRATCH"/loupe-demo', new)
    if os.environ.get("LOUPE_CACHE"):
        new = new.replace("~/.cache/loupe", '"$LOUPE_CACHE"')
    new = re.sub(r'(^|[;&|]\s*)loupe gui\b', r'\1gui_check', new, flags=re.M)
    return new

def start_display(scratch):
    """A display for `loupe gui`: the one there is, else Xvfb (None when neither)."""
    if os.environ.get("DISPLAY"):
        return None, os.environ["DISPLAY"]
    if not shutil.which("Xvfb"):
        return None, None
    disp = ":%d" % (90 + os.getpid() % 500)
    xvfb = subprocess.Popen(["Xvfb", disp, "-screen", "0", "1400x900x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    return xvfb, disp

def check(readme, keep, scratch=None, start=0):
    repo = os.getcwd()
    if scratch is None:
        scratch = tempfile.mkdtemp(prefix="loupe-readme.")
    else:
        keep = True
    os.makedirs(os.path.join(scratch, "runs"), exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = os.path.join(repo, "target", "release") + os.pathsep + env["PATH"]
    env["LOUPE_README_SCRATCH"] = scratch
    env["LOUPE_README_ERR"] = os.path.join(scratch, "err")
    env["GUI_SECONDS"] = str(GUI_SECONDS)
    if not env.get("XDG_RUNTIME_DIR"):  # winit prints an `error:` line without one
        env["XDG_RUNTIME_DIR"] = os.path.join(scratch, "xdg")
        os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
    prelude = os.path.join(scratch, "prelude.sh")
    open(prelude, "w").write(PRELUDE)
    xvfb, display = start_display(scratch)
    if display:
        env["DISPLAY"] = display
    name = os.path.relpath(readme, repo) if os.path.isabs(readme) else readme
    print(f"check-readme: {name}, scratch folder {scratch}", flush=True)
    t_all, ran, skipped, ok = time.time(), 0, [], False
    try:
        for lang, line, lines in parse(readme):
            if lang != "sh" or line < start:
                continue
            text = "\n".join(lines)
            first = next((l for l in lines if l.strip() and not l.startswith("#")), "")
            rule = next((r for r in RULES if re.search(r[0], first if r[0].startswith("^") else text)), None)
            if rule and rule[1] == "skip":
                print(f"check-readme: {name}:{line}: SKIPPED `{first}`: {rule[2]}", flush=True)
                skipped.append(line)
                continue
            if rule and rule[1] == "replace":
                pat, repl = rule[2]
                text = re.sub(pat, repl, text, count=1, flags=re.M)
                print(f"check-readme: {name}:{line}: REPLACED `{first}`: {rule[3]}", flush=True)
            new = rewrite(text)
            if "gui_check" in new and not display:
                print(f"check-readme: {name}:{line}: SKIPPED `{first}`: no display and no Xvfb", flush=True)
                skipped.append(line)
                continue
            print(f"check-readme: {name}:{line}: running", flush=True)
            for l in new.split("\n"):
                print(f"    {l}", flush=True)
            script = os.path.join(scratch, "block.sh")
            open(script, "w").write(f'source "{prelude}"\n' + new + "\n")
            if os.path.exists(env["LOUPE_README_ERR"]):
                os.remove(env["LOUPE_README_ERR"])
            log = os.path.join(scratch, f"block-{line}.log")
            t0 = time.time()
            with open(log, "w") as out:
                p = subprocess.run(["bash", "--noprofile", "--norc", script], cwd=repo, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            took = time.time() - t0
            if p.returncode != 0:
                at, cmd = line, first
                if os.path.exists(env["LOUPE_README_ERR"]):
                    n, _, cmd = open(env["LOUPE_README_ERR"]).read().rstrip("\n").partition("\t")
                    at = line + int(n) - 2
                tail = open(log, errors="replace").read().replace("\r", "\n").rstrip().split("\n")[-25:]
                print("\n".join("    | " + l for l in tail))
                print(f"check-readme: FAIL: {name}:{at}: `{cmd}` exited with status {p.returncode} "
                      f"(block at line {line}, {took:.0f} s; log {log})", flush=True)
                keep = True
                return 1
            print(f"check-readme: {name}:{line}: ok ({took:.1f} s)", flush=True)
            ran += 1
        ok = True
        print(f"check-readme: PASS: {ran} blocks ran, {len(skipped)} skipped "
              f"(lines {', '.join(map(str, skipped)) or 'none'}), {time.time() - t_all:.0f} s", flush=True)
        return 0
    finally:
        if xvfb:
            xvfb.kill()
            xvfb.wait()
        if keep:
            print(f"check-readme: scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

def self_test():
    """A README with a broken command must fail naming that line; a good one must pass; a text
    block must not run."""
    me = os.path.abspath(os.path.join("scripts", "check-readme.sh"))
    d = tempfile.mkdtemp(prefix="loupe-readme-selftest.")
    try:
        marker = os.path.join(d, "text-block-ran")
        good = ("# A README\n\n```sh\necho one\nloupe --version\n```\n\n"
                f"```text\ntouch {marker}\n```\n\n")
        bad = good + "```sh\ntrue\nloupe no-such-command --flag\necho never\n```\n"
        open(os.path.join(d, "good.md"), "w").write(good)
        open(os.path.join(d, "bad.md"), "w").write(bad)
        broken_line = bad.split("\n").index("loupe no-such-command --flag") + 1
        r = subprocess.run([me, "--readme", os.path.join(d, "good.md")], capture_output=True, text=True)
        assert r.returncode == 0, f"a good README failed:\n{r.stdout}{r.stderr}"
        r = subprocess.run([me, "--readme", os.path.join(d, "bad.md")], capture_output=True, text=True)
        out = r.stdout + r.stderr
        assert r.returncode != 0, f"a broken command passed:\n{out}"
        want = f"bad.md:{broken_line}: `loupe no-such-command --flag`"
        assert want in out, f"the failure does not name line {broken_line} and the command:\n{out}"
        assert not os.path.exists(marker), "a text block ran"
        print(f"check-readme: self-test passed (a broken command fails the check as `{want}`)")
        return 0
    except AssertionError as e:
        print(f"check-readme: self-test FAILED: {e}")
        return 1
    finally:
        shutil.rmtree(d, ignore_errors=True)

args = sys.argv[1:]
readme, keep, scratch, start = "README.md", False, None, 0
while args:
    a = args.pop(0)
    if a == "--readme" and args:
        readme = args.pop(0)
    elif a == "--scratch" and args:
        scratch = os.path.abspath(args.pop(0))
    elif a == "--from" and args:
        start = int(args.pop(0))
    elif a == "--keep":
        keep = True
    elif a == "--self-test":
        sys.exit(self_test())
    else:
        print(f"error: unknown argument {a!r} (--readme FILE, --keep, --scratch DIR, --from LINE, --self-test)", file=sys.stderr)
        sys.exit(2)
if not os.path.isfile(readme):
    print(f"error: {readme} is not a file", file=sys.stderr)
    sys.exit(2)
if not os.access(os.path.join("target", "release", "loupe"), os.X_OK):
    print("error: target/release/loupe is missing: run `cargo build --release --workspace --bins` first",
          file=sys.stderr)
    sys.exit(2)
sys.exit(check(os.path.abspath(readme), keep, scratch, start))
PY
