//! The counting: two passes over the routed tokens.
//!
//! - [`Counts`] (pass 1): per expert its tokens, gate sum and tokens per domain; per token its
//!   routing entropy (histogram and sums) and id; per (expert, token id) the occurrences, kept
//!   sparse (a map holding only the pairs seen: 16 bytes and change per distinct pair).
//! - [`Pairs`] (pass 2): co-activation counts N(i ∧ j) for every expert i of a fixed set S (the
//!   most used, chosen after pass 1 by [`partner_set`]) against every expert j, dense
//!   (|S| × n_experts u32). Exact for those i; the cost is Σ over S's tokens of the experts active
//!   with them, which pass 1 measures per expert ([`Counts::pair_work`]), so the set is sized to
//!   a work and memory budget before any pair is counted. Counting every pair for 65,536 Monet
//!   experts with hundreds active per token (Σ_t active² ≈ 10¹⁰ at 150k tokens) is not affordable;
//!   a real MoE router (64 experts, top-8) fits whole.
//!
//! Chunks are routed and reduced in parallel (rayon) and merged in token order, so the result does
//! not depend on the thread count: the integer counts are exact, the float sums added in order.

use std::collections::HashMap;

use loupe_dict::Codes;
use rayon::prelude::*;

use super::routing::{Routed, entropy};

/// Bins of the routing-entropy histogram, equal width over [0, ln n_experts].
pub const ENTROPY_BINS: usize = 40;

/// What pass 1 counts.
#[derive(Clone, Debug)]
pub struct Counts {
    pub n_experts: usize,
    pub n_domains: usize,
    pub tokens: u64,
    /// Expert routings counted (Σ_t experts active at t).
    pub routed: u64,
    /// The fewest and most experts any token was routed to.
    pub active_range: (usize, usize),
    pub expert_tokens: Vec<u64>,
    pub gate_sum: Vec<f64>,
    /// Per expert, Σ over its tokens of the other experts routed with it: the pair updates its
    /// co-activation row costs in pass 2.
    pub pair_work: Vec<u64>,
    /// `[expert * n_domains + domain]`.
    pub expert_domain: Vec<u64>,
    pub domain_tokens: Vec<u64>,
    /// Occurrences per token id.
    pub token_count: Vec<u64>,
    /// Occurrences per (expert << 32 | token id).
    pub expert_token: HashMap<u64, u64>,
    /// Entropy (nats) of each token's chosen experts' normalised gates: sum and histogram.
    pub entropy_sum: f64,
    pub entropy_hist: Vec<u64>,
    /// Entropy of the router's full distribution, summed over tokens, where the source gives it.
    pub full_entropy_sum: Option<f64>,
}

/// The histogram bin of entropy `h` over [0, ln n] in [`ENTROPY_BINS`] bins (the last bin closed).
pub fn entropy_bin(h: f64, n_experts: usize) -> usize {
    let width = (n_experts as f64).ln() / ENTROPY_BINS as f64;
    if width > 0.0 { ((h / width).max(0.0) as usize).min(ENTROPY_BINS - 1) } else { 0 }
}

/// The entropy of one token's routing: its chosen experts' gates, normalised.
pub fn gate_entropy(gates: &[f32]) -> f64 {
    entropy(gates.iter().map(|&g| g as f64))
}

/// What one piece of a chunk reduces to in parallel.
struct Partial {
    entropy: Vec<f64>,
    /// Sorted (expert << 32 | token, occurrences) runs.
    vocab: Vec<(u64, u64)>,
}

impl Partial {
    fn of(codes: &Codes, token: &[u32]) -> Partial {
        let entropy = (0..codes.tokens()).map(|t| gate_entropy(codes.row(t).1)).collect();
        let mut keys: Vec<u64> = Vec::with_capacity(codes.nnz());
        for (t, &id) in token.iter().enumerate() {
            keys.extend(codes.row(t).0.iter().map(|&e| ((e as u64) << 32) | id as u64));
        }
        keys.sort_unstable();
        let mut vocab: Vec<(u64, u64)> = Vec::new();
        for k in keys {
            match vocab.last_mut() {
                Some((last, c)) if *last == k => *c += 1,
                _ => vocab.push((k, 1)),
            }
        }
        Partial { entropy, vocab }
    }
}

impl Counts {
    pub fn new(n_experts: usize, n_domains: usize, full_distribution: bool) -> Counts {
        Counts {
            n_experts,
            n_domains,
            tokens: 0,
            routed: 0,
            active_range: (usize::MAX, 0),
            expert_tokens: vec![0; n_experts],
            gate_sum: vec![0.0; n_experts],
            pair_work: vec![0; n_experts],
            expert_domain: vec![0; n_experts * n_domains],
            domain_tokens: vec![0; n_domains],
            token_count: Vec::new(),
            expert_token: HashMap::new(),
            entropy_sum: 0.0,
            entropy_hist: vec![0; ENTROPY_BINS],
            full_entropy_sum: full_distribution.then_some(0.0),
        }
    }

    /// Count routed pieces (in token order) of rows with token ids `token` and domains `domain`.
    pub fn add(&mut self, pieces: &[Routed], token: &[u32], domain: &[u16]) {
        let mut starts = Vec::with_capacity(pieces.len());
        let mut at = 0;
        for p in pieces {
            starts.push(at);
            at += p.codes.tokens();
        }
        assert_eq!(at, token.len(), "routed tokens and token ids differ");
        let partials: Vec<Partial> = pieces
            .par_iter()
            .zip(starts.par_iter())
            .map(|(p, &s)| Partial::of(&p.codes, &token[s..s + p.codes.tokens()]))
            .collect();
        for ((piece, partial), &start) in pieces.iter().zip(&partials).zip(&starts) {
            let codes = &piece.codes;
            for t in 0..codes.tokens() {
                let (experts, gates) = codes.row(t);
                let (id, d) = (token[start + t] as usize, domain[start + t] as usize);
                let active = experts.len();
                self.tokens += 1;
                self.routed += active as u64;
                self.active_range = (self.active_range.0.min(active), self.active_range.1.max(active));
                if id >= self.token_count.len() {
                    self.token_count.resize(id + 1, 0);
                }
                self.token_count[id] += 1;
                self.domain_tokens[d] += 1;
                let h = partial.entropy[t];
                self.entropy_sum += h;
                self.entropy_hist[entropy_bin(h, self.n_experts)] += 1;
                for (&e, &g) in experts.iter().zip(gates) {
                    let e = e as usize;
                    self.expert_tokens[e] += 1;
                    self.gate_sum[e] += g as f64;
                    self.pair_work[e] += active as u64 - 1;
                    self.expert_domain[e * self.n_domains + d] += 1;
                }
            }
            if let (Some(sum), Some(full)) = (self.full_entropy_sum.as_mut(), &piece.full_entropy) {
                *sum += full.iter().sum::<f64>();
            }
            for &(k, c) in &partial.vocab {
                *self.expert_token.entry(k).or_insert(0) += c;
            }
        }
    }

    /// Experts by use, most tokens first (ties to the lower id); unused experts left out.
    pub fn by_use(&self) -> Vec<u32> {
        let mut order: Vec<u32> =
            (0..self.n_experts as u32).filter(|&e| self.expert_tokens[e as usize] > 0).collect();
        order.sort_by(|&a, &b| {
            self.expert_tokens[b as usize].cmp(&self.expert_tokens[a as usize]).then(a.cmp(&b))
        });
        order
    }
}

/// The experts whose co-activation rows are counted exactly: the most used first, the first
/// `forced` always, then as many more as fit `work` pair updates and `memory` bytes of counts.
pub fn partner_set(counts: &Counts, forced: usize, work: f64, memory: usize) -> Vec<u32> {
    let row_bytes = counts.n_experts * 4;
    let mut spent = 0.0;
    let mut set = Vec::new();
    for e in counts.by_use() {
        let cost = counts.pair_work[e as usize] as f64;
        if set.len() >= forced && (spent + cost > work || (set.len() + 1) * row_bytes > memory) {
            break;
        }
        spent += cost;
        set.push(e);
    }
    set
}

/// What pass 2 counts: N(i ∧ j) for i in the set, every j.
pub struct Pairs {
    pub n_experts: usize,
    /// The set, and each expert's slot in it (`u32::MAX` when not in it).
    pub members: Vec<u32>,
    slot: Vec<u32>,
    /// `[slot * n_experts + j]`.
    pub counts: Vec<u32>,
}

impl Pairs {
    pub fn new(n_experts: usize, members: Vec<u32>) -> Pairs {
        let mut slot = vec![u32::MAX; n_experts];
        for (s, &e) in members.iter().enumerate() {
            slot[e as usize] = s as u32;
        }
        let counts = vec![0; members.len() * n_experts];
        Pairs { n_experts, members, slot, counts }
    }

    /// Tokens routed to both `i` (a member) and `j`.
    pub fn both(&self, i: u32, j: u32) -> u32 {
        let s = self.slot[i as usize];
        assert!(s != u32::MAX, "expert {i} is not in the co-activation set");
        self.counts[s as usize * self.n_experts + j as usize]
    }

    /// Count the co-activations of routed pieces. Parallel over blocks of the set's rows: each
    /// block reads every token and writes only its own rows.
    pub fn add(&mut self, pieces: &[Routed]) {
        let n = self.n_experts;
        if self.members.is_empty() {
            return;
        }
        let per_block = self.members.len().div_ceil(rayon::current_num_threads().max(1));
        let slot = &self.slot;
        self.counts.par_chunks_mut(per_block * n).enumerate().for_each(|(b, block)| {
            let lo = (b * per_block) as u32;
            let hi = lo + (block.len() / n) as u32;
            for piece in pieces {
                let codes = &piece.codes;
                for t in 0..codes.tokens() {
                    let experts = codes.row(t).0;
                    for &i in experts {
                        let s = slot[i as usize];
                        if s >= lo && s < hi {
                            let row = &mut block[(s - lo) as usize * n..][..n];
                            for &j in experts {
                                if j != i {
                                    row[j as usize] += 1;
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(rows: &[&[(u32, f32)]]) -> Routed {
        Routed { codes: Codes::from_rows(rows.iter().copied()), full_entropy: None }
    }

    #[test]
    fn counts_and_pairs_of_a_small_routing() {
        let a = routed(&[&[(0, 0.5), (2, 0.5)], &[(2, 1.0)]]);
        let b = routed(&[&[(0, 0.25), (1, 0.25), (2, 0.5)]]);
        let mut c = Counts::new(3, 2, false);
        c.add(&[a, b], &[7, 7, 9], &[0, 1, 1]);
        assert_eq!((c.tokens, c.routed, c.active_range), (3, 6, (1, 3)));
        assert_eq!(c.expert_tokens, [2, 1, 3]);
        assert_eq!(c.gate_sum, [0.75, 0.25, 2.0]);
        assert_eq!(c.pair_work, [1 + 2, 2, 1 + 2]);
        assert_eq!(c.expert_domain, [1, 1, 0, 1, 1, 2]);
        assert_eq!(c.expert_token[&((2 << 32) | 7)], 2);
        assert_eq!(c.by_use(), [2, 0, 1]);
        assert_eq!(partner_set(&c, 1, 0.0, usize::MAX), [2]);
        assert_eq!(partner_set(&c, 1, 1e9, usize::MAX), [2, 0, 1]);

        let mut p = Pairs::new(3, vec![2, 0]);
        p.add(&[routed(&[&[(0, 0.5), (2, 0.5)], &[(2, 1.0)]]), routed(&[&[(0, 0.25), (1, 0.25), (2, 0.5)]])]);
        assert_eq!((p.both(2, 0), p.both(2, 1), p.both(2, 2), p.both(0, 1)), (2, 1, 0, 1));
    }
}
