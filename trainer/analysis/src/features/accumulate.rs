//! Per-feature accumulators fed with sparse codes, chunk after chunk, in storage order.
//!
//! - [`FeatureStats`]: how often each feature fires, the sum and maximum of its activations, and a
//!   histogram of them in the store's log-spaced bins ([`loupe_store::features::hist_bin`]).
//! - [`TopExamples`]: each feature's `k` largest activations with their row (global index in
//!   storage order); ties go to the earlier row, so the result does not depend on the chunking.
//! - [`QuantileSampler`]: for each feature and histogram bin, the `m` tokens with the smallest
//!   pseudo-random priority (a hash of feature and row). Bottom-m samples merge exactly, so any
//!   range of bins — a quantile bucket — yields a uniform sample of its tokens without a second
//!   pass ([`QuantileSampler::buckets`]).
//!
//! All are exact and independent of the chunking (tested against brute force in
//! `tests/tests/analysis.rs`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use loupe_dict::Codes;

pub use loupe_store::features::{HIST_BINS, hist_bin, hist_bin_edge};

/// Firing counts, sums, maxima and histograms of every feature.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureStats {
    /// Tokens seen.
    pub tokens: u64,
    /// Tokens on which each feature was active.
    pub count: Vec<u64>,
    /// Sum of each feature's activations.
    pub sum: Vec<f64>,
    /// Largest activation of each feature (0 when it never fired).
    pub max: Vec<f32>,
    /// `[n_features, HIST_BINS]` counts.
    pub hist: Vec<u32>,
}

impl FeatureStats {
    pub fn new(n_features: usize) -> FeatureStats {
        FeatureStats {
            tokens: 0,
            count: vec![0; n_features],
            sum: vec![0.0; n_features],
            max: vec![0.0; n_features],
            hist: vec![0; n_features * HIST_BINS],
        }
    }

    /// Account for one chunk of codes.
    pub fn add(&mut self, codes: &Codes) {
        self.tokens += codes.tokens() as u64;
        for (&f, &v) in codes.feature.iter().zip(&codes.value) {
            let f = f as usize;
            self.count[f] += 1;
            self.sum[f] += v as f64;
            self.max[f] = self.max[f].max(v);
            self.hist[f * HIST_BINS + hist_bin(v)] += 1;
        }
    }

    /// Fraction of tokens on which feature `f` fired.
    pub fn density(&self, f: usize) -> f64 {
        self.count[f] as f64 / self.tokens.max(1) as f64
    }

    /// Mean activation of feature `f` over the tokens where it fired (0 when it never did).
    pub fn mean(&self, f: usize) -> f64 {
        if self.count[f] == 0 { 0.0 } else { self.sum[f] / self.count[f] as f64 }
    }
}

/// An activation and its row, ordered by value, then by *earlier* row first.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    value: f32,
    row: u64,
}

impl Eq for Entry {}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.total_cmp(&other.value).then(other.row.cmp(&self.row))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Each feature's `k` largest activations, as min-heaps bounded at `k`.
pub struct TopExamples {
    k: usize,
    heaps: Vec<BinaryHeap<Reverse<Entry>>>,
}

impl TopExamples {
    pub fn new(n_features: usize, k: usize) -> TopExamples {
        TopExamples { k, heaps: (0..n_features).map(|_| BinaryHeap::new()).collect() }
    }

    /// Account for one chunk of codes whose first token is row `first_row`.
    pub fn add(&mut self, codes: &Codes, first_row: u64) {
        if self.k == 0 {
            return;
        }
        for t in 0..codes.tokens() {
            let (features, values) = codes.row(t);
            for (&f, &value) in features.iter().zip(values) {
                let entry = Entry { value, row: first_row + t as u64 };
                let heap = &mut self.heaps[f as usize];
                if heap.len() < self.k {
                    heap.push(Reverse(entry));
                } else if heap.peek().is_some_and(|Reverse(min)| entry > *min) {
                    heap.pop();
                    heap.push(Reverse(entry));
                }
            }
        }
    }

    /// Per feature, `(value, row)` from the largest value down (ties: earlier row first).
    pub fn into_sorted(self) -> Vec<Vec<(f32, u64)>> {
        self.heaps
            .into_iter()
            .map(|heap| {
                let mut entries: Vec<Entry> = heap.into_iter().map(|Reverse(e)| e).collect();
                entries.sort_unstable_by(|a, b| b.cmp(a));
                entries.into_iter().map(|e| (e.value, e.row)).collect()
            })
            .collect()
    }
}

/// A sampled token: its priority (smaller is kept), activation and row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub priority: u64,
    pub value: f32,
    pub row: u64,
}

/// The kept tokens of one (feature, bin) stratum, unordered, at most `m`.
#[derive(Clone, Debug)]
struct Stratum {
    bin: u16,
    kept: Vec<Sampled>,
}

/// splitmix64 of feature and row: a fixed pseudo-random priority, so samples do not depend on
/// the order or chunking of the rows.
pub fn priority(feature: u32, row: u64) -> u64 {
    let mut z = row ^ (u64::from(feature) << 40) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A feature's activation quantile bucket: bins `bins`, `tokens` tokens, and a uniform sample of
/// them (by priority).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantileBucket {
    pub bins: std::ops::Range<usize>,
    pub tokens: u64,
    pub sample: Vec<Sampled>,
}

/// Per feature and histogram bin, the `m` tokens of smallest priority.
pub struct QuantileSampler {
    m: usize,
    /// Per feature, strata sorted by bin.
    strata: Vec<Vec<Stratum>>,
}

impl QuantileSampler {
    pub fn new(n_features: usize, m: usize) -> QuantileSampler {
        QuantileSampler { m, strata: vec![Vec::new(); n_features] }
    }

    /// Account for one chunk of codes whose first token is row `first_row`.
    pub fn add(&mut self, codes: &Codes, first_row: u64) {
        if self.m == 0 {
            return;
        }
        for t in 0..codes.tokens() {
            let (features, values) = codes.row(t);
            let row = first_row + t as u64;
            for (&f, &value) in features.iter().zip(values) {
                let bin = hist_bin(value) as u16;
                let strata = &mut self.strata[f as usize];
                let i = match strata.binary_search_by_key(&bin, |s| s.bin) {
                    Ok(i) => i,
                    Err(i) => {
                        strata.insert(i, Stratum { bin, kept: Vec::with_capacity(self.m) });
                        i
                    }
                };
                let kept = &mut strata[i].kept;
                let p = priority(f, row);
                let entry = Sampled { priority: p, value, row };
                if kept.len() < self.m {
                    kept.push(entry);
                } else {
                    let (worst, max) = kept
                        .iter()
                        .enumerate()
                        .map(|(j, s)| (j, s.priority))
                        .max_by_key(|e| e.1)
                        .expect("m > 0");
                    if p < max {
                        kept[worst] = entry;
                    }
                }
            }
        }
    }

    /// Feature `f`'s activation quantile buckets from its histogram `hist` (`HIST_BINS` counts):
    /// up to `q` buckets of about equal token counts, with edges on bin edges (so a bucket may
    /// hold more than 1/q of the tokens when one bin does), each with a uniform sample of up to
    /// `m` of its tokens, in priority order. Empty for a feature that never fired.
    pub fn buckets(&self, f: usize, hist: &[u32], q: usize) -> Vec<QuantileBucket> {
        let total: u64 = hist.iter().map(|&c| u64::from(c)).sum();
        if total == 0 || q == 0 {
            return Vec::new();
        }
        // cum[b] = tokens in bins < b.
        let mut cum = vec![0u64; hist.len() + 1];
        for (b, &c) in hist.iter().enumerate() {
            cum[b + 1] = cum[b] + u64::from(c);
        }
        let first = hist.iter().position(|&c| c > 0).expect("total > 0");
        let last = hist.len() - hist.iter().rev().position(|&c| c > 0).expect("total > 0");
        let mut edges = vec![first];
        for i in 1..q {
            let target = (total * i as u64).div_ceil(q as u64);
            let edge = (first..=last).find(|&b| cum[b] >= target).unwrap_or(last);
            if edge > *edges.last().expect("nonempty") && edge < last {
                edges.push(edge);
            }
        }
        edges.push(last);
        edges
            .windows(2)
            .map(|w| {
                let bins = w[0]..w[1];
                let mut sample: Vec<Sampled> = self.strata[f]
                    .iter()
                    .filter(|s| bins.contains(&(s.bin as usize)))
                    .flat_map(|s| s.kept.iter().copied())
                    .collect();
                sample.sort_unstable_by_key(|s| s.priority);
                sample.truncate(self.m);
                QuantileBucket { tokens: cum[w[1]] - cum[w[0]], bins, sample }
            })
            .collect()
    }
}
