//! Per-feature accumulators fed with sparse codes, chunk after chunk, in storage order.
//!
//! - [`FeatureStats`]: how often each feature fires, the sum and maximum of its activations, and a
//!   histogram of them in half-octave bins (bin b holds values in [2^(b/2 + MIN_LOG2),
//!   2^((b+1)/2 + MIN_LOG2)); values outside go to the first or last bin).
//! - [`TopExamples`]: each feature's `k` largest activations with their row (global index in
//!   storage order); ties go to the earlier row, so the result does not depend on the chunking.
//!
//! Both are exact (tested against brute force in `trainer/tests/analysis.rs`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::dict::Codes;

/// Histogram bins per feature.
pub const HIST_BINS: usize = 64;
/// log2 of the lower edge of the first bin.
pub const MIN_LOG2: f32 = -16.0;

/// The histogram bin of a positive activation.
pub fn bin_of(value: f32) -> usize {
    let b = ((value.log2() - MIN_LOG2) * 2.0).floor();
    if b.is_nan() { 0 } else { b.clamp(0.0, (HIST_BINS - 1) as f32) as usize }
}

/// The lower edge of bin `b`.
pub fn bin_lower_edge(b: usize) -> f32 {
    (b as f32 / 2.0 + MIN_LOG2).exp2()
}

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
            self.hist[f * HIST_BINS + bin_of(v)] += 1;
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
