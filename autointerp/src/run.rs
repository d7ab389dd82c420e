//! What `loupe explain` and `loupe score` share: choosing features, the summary of a run, and
//! merging finished records into the store's tables.

use std::collections::HashSet;
use std::ops::Range;

use anyhow::{Result, bail};
use loupe_store::FeatureTables;

use crate::budget::Spent;
use crate::search::IndexReport;

/// Which features a run covers: `None` means every feature that is not dead. Ranges are
/// checked against the dictionary before they are expanded.
pub fn select_features(tables: &FeatureTables, features: Option<&[Range<u32>]>) -> Result<Vec<u32>> {
    let n = tables.n_features() as u32;
    match features {
        Some(ranges) => {
            if let Some(bad) = ranges.iter().find(|r| r.end > n) {
                let shown = if bad.len() == 1 {
                    bad.start.to_string()
                } else {
                    format!("{}..{}", bad.start, bad.end)
                };
                bail!("--features {shown}: the dictionary has features 0..{n}");
            }
            let mut seen = HashSet::new();
            Ok(ranges.iter().flat_map(|r| r.clone()).filter(|f| seen.insert(*f)).collect())
        }
        None => Ok((0..n).filter(|&f| tables.densities()[f as usize] > 0.0).collect()),
    }
}

/// Parse a feature list: `0..20`, `3,7,9`, or a mix (`0..4,10`), as ranges (a single id is a
/// range of one).
pub fn parse_features(text: &str) -> Result<Vec<Range<u32>>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("--features {text:?}: {part:?} is not a feature id or a range A..B");
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a >= b {
                    return Err(bad());
                }
                out.push(a..b);
            }
            None => {
                let f: u32 = part.parse().map_err(|_| bad())?;
                out.push(f..f.checked_add(1).ok_or_else(bad)?);
            }
        }
    }
    if out.is_empty() {
        bail!("--features {text:?} names no feature");
    }
    Ok(out)
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// Records finished by this run (failed ones included), and those skipped as already done.
    pub finished: usize,
    pub skipped: usize,
    /// Failed records among `finished`, with the first few reasons.
    pub failed: usize,
    pub failures: Vec<(u32, String)>,
    pub spent: Spent,
    /// Records committed for this explainer or scorer set.
    pub committed: usize,
    /// What rebuilding the search index took (explain runs with an embedder).
    pub index: Option<IndexReport>,
}

impl RunSummary {
    /// Why the run did no work at all, when every record it finished failed (the failed records
    /// are committed all the same): the caller exits non-zero with this line.
    pub fn nothing_done(&self, what: &str) -> Option<String> {
        if self.finished == 0 || self.failed < self.finished {
            return None;
        }
        let first =
            self.failures.first().map(|(f, why)| format!(" (feature {f}: {why})")).unwrap_or_default();
        Some(format!(
            "{what}: all {} failed{first}; the failed rows are recorded in the store",
            self.finished
        ))
    }

    pub fn note_failure(&mut self, feature: u32, why: &str) {
        self.failed += 1;
        if self.failures.len() < 5 {
            self.failures.push((feature, why.to_string()));
        }
    }
}

/// A multi-threaded runtime for the LLM requests of one run.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}
