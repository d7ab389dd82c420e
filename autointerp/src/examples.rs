//! The examples an explainer sees and a scorer tests on, drawn from a feature analysis
//! (`features/<dict>/`), following delphi: a train set spread across the activation quantiles,
//! and a test set of other quantile examples plus non-activating windows.
//!
//! Non-activating windows are other features' example windows that do not overlap this
//! feature's own examples. The analysis keeps no per-window record of features that did *not*
//! fire, so a negative may rarely contain a weak activation of the feature; at the densities of
//! trained SAE features (≲1% of tokens) that is rare, and it can only lower a score.

use std::collections::HashSet;

use anyhow::Result;
use loupe_store::{Example, FeatureTables};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// A token window as shown to an LLM.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Store row of the window's centre token (the example id in provenance).
    pub row: u64,
    pub tokens: Vec<String>,
    /// The feature's activation on each token (all zero for a non-activating window).
    pub activations: Vec<f32>,
}

impl Window {
    fn from_example(tables: &FeatureTables, e: &Example, activating: bool) -> Window {
        Window {
            row: e.row,
            tokens: e.tokens.iter().map(|&t| tables.token_string(t)).collect(),
            activations: if activating { e.activations.clone() } else { vec![0.0; e.tokens.len()] },
        }
    }

    pub fn max_activation(&self) -> f32 {
        self.activations.iter().copied().fold(0.0, f32::max)
    }

    /// The plain text of the window.
    pub fn text(&self) -> String {
        self.tokens.concat()
    }
}

/// How many examples of each kind.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub train: usize,
    /// Activating test examples, and as many non-activating ones.
    pub test: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes { train: 40, test: 50 }
    }
}

/// One feature's examples.
#[derive(Clone, Debug, Default)]
pub struct Sets {
    pub train: Vec<Window>,
    pub test_activating: Vec<Window>,
    pub test_other: Vec<Window>,
}

/// Take examples round-robin across quantile buckets (lowest first), so every quantile shows.
fn across_buckets(quantile: Vec<Example>) -> Vec<Example> {
    let mut buckets: Vec<Vec<Example>> = Vec::new();
    for e in quantile {
        let b = e.bucket.as_ref().map_or(0, |b| b.index as usize);
        if buckets.len() <= b {
            buckets.resize_with(b + 1, Vec::new);
        }
        buckets[b].push(e);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while buckets.iter().any(|b| i < b.len()) {
        out.extend(buckets.iter().filter_map(|b| b.get(i).cloned()));
        i += 1;
    }
    out
}

/// The train and test sets of feature `f`, with the non-activating windows when `negatives`
/// (explainers need none). Deterministic for a given `seed`.
pub fn sets(tables: &FeatureTables, f: u32, sizes: Sizes, seed: u64, negatives: bool) -> Result<Sets> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ u64::from(f).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // Quantile examples spread over the range; top examples fill in when there are too few.
    let mut pool = across_buckets(tables.quantile_examples(f)?);
    let mut seen: HashSet<u64> = pool.iter().map(|e| e.row).collect();
    pool.extend(tables.top_examples(f)?.into_iter().filter(|e| seen.insert(e.row)));
    // With too few examples for both sets, split what there is in proportion.
    let want = sizes.train + sizes.test;
    let train_n =
        if pool.len() >= want { sizes.train } else { (pool.len() * sizes.train).div_ceil(want.max(1)) };
    let (train, rest) = pool.split_at(train_n);
    let own: Vec<(u32, u32, u32)> =
        pool.iter().map(|e| (e.doc, e.pos.saturating_sub(e.center as u32), e.tokens.len() as u32)).collect();
    let mut sets = Sets {
        train: train.iter().map(|e| Window::from_example(tables, e, true)).collect(),
        test_activating: rest
            .iter()
            .take(sizes.test)
            .map(|e| Window::from_example(tables, e, true))
            .collect(),
        test_other: Vec::new(),
    };
    let n = tables.n_features() as u32;
    // Features that often fire with this one make poor negatives.
    let skip: HashSet<u32> =
        tables.cooccurrence(f)?.iter().filter(|c| c.jaccard >= 0.2).map(|c| c.other).chain([f]).collect();
    let mut tries = 0;
    while negatives && sets.test_other.len() < sizes.test && n > 1 && tries < sizes.test * 20 {
        tries += 1;
        let g = rng.random_range(0..n);
        if skip.contains(&g) {
            continue;
        }
        let mut examples = tables.quantile_examples(g)?;
        if examples.is_empty() {
            examples = tables.top_examples(g)?;
        }
        let Some(e) = examples.choose(&mut rng) else { continue };
        let start = e.pos.saturating_sub(e.center as u32);
        let overlaps = own
            .iter()
            .any(|&(doc, s, len)| doc == e.doc && start < s + len && s < start + e.tokens.len() as u32);
        if !overlaps && seen.insert(e.row) {
            sets.test_other.push(Window::from_example(tables, e, false));
        }
    }
    Ok(sets)
}

/// The window's text with the runs of `marked` tokens wrapped in `<<` `>>`.
pub fn highlight(tokens: &[String], marked: &[bool]) -> String {
    let mut out = String::new();
    for (i, t) in tokens.iter().enumerate() {
        let open = marked[i] && (i == 0 || !marked[i - 1]);
        let close = marked[i] && (i + 1 == tokens.len() || !marked[i + 1]);
        if open {
            // Keep a leading space outside the marker: "the <<whale>>", not "the<< whale>>".
            let trimmed = t.trim_start();
            out.push_str(&t[..t.len() - trimmed.len()]);
            out.push_str("<<");
            out.push_str(trimmed);
        } else {
            out.push_str(t);
        }
        if close {
            out.push_str(">>");
        }
    }
    out
}

/// Tokens above 0.3 of the window's maximum activation (delphi's threshold).
pub fn activating_tokens(w: &Window) -> Vec<bool> {
    let max = w.max_activation();
    w.activations.iter().map(|&a| max > 0.0 && a > 0.3 * max).collect()
}
