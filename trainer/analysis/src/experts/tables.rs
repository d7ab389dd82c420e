//! The store tables ([`loupe_store::experts`]) from the counts: per expert usage and its
//! strongest token and domain, the co-activation rows kept, each expert's top token ids, its
//! tokens per domain, and the entropy histogram.
//!
//! Co-activation rows: every ordered pair (i, j), i ≠ j, among the `coactivation_experts` most
//! used (zeros included: the view's heatmap), then for every expert of the exactly counted set
//! ([`super::count::Pairs`]) its `coactivation_top` partners with the most shared tokens (ties to
//! the lower id); sorted by `expert_i`, then shared tokens (most first), then `expert_j`.

use std::collections::BTreeSet;

use loupe_store::{CoactivationRow, EntropyBin, ExpertDomainRow, ExpertRow, ExpertTokenRow, ExpertsTables};

use super::count::{Counts, ENTROPY_BINS, Pairs};

/// How many rows to keep.
#[derive(Clone, Copy, Debug)]
pub struct Keep {
    pub coactivation_experts: usize,
    pub coactivation_top: usize,
    pub vocab_top: usize,
}

/// Ratio as f32; 0 over 0 is 0.
fn ratio(a: u64, b: u64) -> f32 {
    if b == 0 { 0.0 } else { (a as f64 / b as f64) as f32 }
}

pub fn build(counts: &Counts, pairs: &Pairs, keep: Keep) -> ExpertsTables {
    let n = counts.n_experts;
    // Defined when the tokens counted come from at least two domains (a one-domain corpus, or
    // rows of one domain only, would make it each expert's usage).
    let domains_defined = counts.domain_tokens.iter().filter(|&&n| n > 0).count() >= 2;
    let vocab = vocab_rows(counts, keep.vocab_top);
    let mut domains = Vec::new();
    let mut experts = Vec::with_capacity(n);
    let mut top_token_of = vec![None; n];
    for row in &vocab {
        top_token_of[row.expert as usize].get_or_insert((row.token, row.share_of_expert));
    }
    for (e, top_token) in top_token_of.iter().enumerate() {
        let tokens = counts.expert_tokens[e];
        let mut best: Option<(f32, u32)> = None;
        for d in 0..counts.n_domains {
            let count = counts.expert_domain[e * counts.n_domains + d];
            if count == 0 {
                continue;
            }
            let specialization = domains_defined.then(|| ratio(count, counts.domain_tokens[d]));
            if let Some(s) = specialization
                && best.is_none_or(|(b, _)| s > b)
            {
                best = Some((s, d as u32));
            }
            domains.push(ExpertDomainRow {
                expert: e as u32,
                domain: d as u16,
                count,
                share_of_expert: ratio(count, tokens),
                specialization,
            });
        }
        let (top_token, top_token_share) = top_token.unwrap_or((0, 0.0));
        experts.push(ExpertRow {
            expert: e as u32,
            tokens,
            usage: ratio(tokens, counts.tokens),
            mean_gate: if tokens == 0 { 0.0 } else { (counts.gate_sum[e] / tokens as f64) as f32 },
            top_token_share,
            top_token,
            top_domain_specialization: best.map(|b| b.0),
            top_domain: best.map_or(0, |b| b.1),
        });
    }
    ExpertsTables {
        experts,
        coactivation: coactivation_rows(counts, pairs, keep),
        vocab,
        domains,
        entropy: entropy_bins(counts),
    }
}

/// Each expert's `top` token ids (most occurrences first, ties to the lower id).
fn vocab_rows(counts: &Counts, top: usize) -> Vec<ExpertTokenRow> {
    let mut all: Vec<(u32, u32, u64)> =
        counts.expert_token.iter().map(|(&k, &c)| ((k >> 32) as u32, k as u32, c)).collect();
    all.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)).then(a.1.cmp(&b.1)));
    let mut rows = Vec::new();
    let mut taken = 0;
    for (i, &(e, t, c)) in all.iter().enumerate() {
        taken = if i > 0 && all[i - 1].0 == e { taken + 1 } else { 0 };
        if taken < top {
            rows.push(ExpertTokenRow {
                expert: e,
                token: t,
                count: c,
                share_of_expert: ratio(c, counts.expert_tokens[e as usize]),
                share_of_token: ratio(c, counts.token_count[t as usize]),
            });
        }
    }
    rows
}

fn coactivation_rows(counts: &Counts, pairs: &Pairs, keep: Keep) -> Vec<CoactivationRow> {
    let row = |i: u32, j: u32| {
        let both = pairs.both(i, j) as u64;
        CoactivationRow {
            expert_i: i,
            expert_j: j,
            both,
            p_j_given_i: ratio(both, counts.expert_tokens[i as usize]),
        }
    };
    let mut kept: BTreeSet<(u32, u32)> = BTreeSet::new();
    let mut rows = Vec::new();
    let heat = &pairs.members[..keep.coactivation_experts.min(pairs.members.len())];
    for &i in heat {
        for &j in heat {
            if i != j && kept.insert((i, j)) {
                rows.push(row(i, j));
            }
        }
    }
    for &i in &pairs.members {
        let mut partners: Vec<u32> =
            (0..pairs.n_experts as u32).filter(|&j| j != i && pairs.both(i, j) > 0).collect();
        partners.sort_by(|&a, &b| pairs.both(i, b).cmp(&pairs.both(i, a)).then(a.cmp(&b)));
        for &j in partners.iter().take(keep.coactivation_top) {
            if kept.insert((i, j)) {
                rows.push(row(i, j));
            }
        }
    }
    rows.sort_by(|a, b| {
        a.expert_i.cmp(&b.expert_i).then(b.both.cmp(&a.both)).then(a.expert_j.cmp(&b.expert_j))
    });
    rows
}

fn entropy_bins(counts: &Counts) -> Vec<EntropyBin> {
    let width = (counts.n_experts as f64).ln() / ENTROPY_BINS as f64;
    (0..ENTROPY_BINS)
        .map(|b| EntropyBin {
            lo: (b as f64 * width) as f32,
            hi: ((b + 1) as f64 * width) as f32,
            tokens: counts.entropy_hist[b],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::routing::Routed;
    use loupe_dict::Codes;

    /// With a budget that fits only the most used expert, only its partners are listed (besides
    /// the heatmap's pairs), and every listed count is exact.
    #[test]
    fn partners_only_for_the_counted_set() {
        let rows: Vec<Vec<(u32, f32)>> = vec![
            vec![(0, 1.0), (1, 1.0), (2, 1.0)],
            vec![(0, 1.0), (2, 1.0)],
            vec![(0, 1.0), (3, 1.0)],
            vec![(1, 1.0), (3, 1.0)],
        ];
        let routed =
            || Routed { codes: Codes::from_rows(rows.iter().map(Vec::as_slice)), full_entropy: None };
        let mut counts = Counts::new(4, 1, false);
        counts.add(&[routed()], &[1, 2, 3, 4], &[0; 4]);
        let members = crate::experts::count::partner_set(&counts, 1, 0.0, usize::MAX);
        assert_eq!(members, [0]);
        let mut pairs = Pairs::new(4, members);
        pairs.add(&[routed()]);
        let keep = Keep { coactivation_experts: 1, coactivation_top: 2, vocab_top: 1 };
        let t = build(&counts, &pairs, keep);
        let got: Vec<_> =
            t.coactivation.iter().map(|r| (r.expert_i, r.expert_j, r.both, r.p_j_given_i)).collect();
        assert_eq!(got, [(0, 2, 2, 2.0 / 3.0), (0, 1, 1, 1.0 / 3.0)]);
        // One domain: no specialization.
        assert!(t.domains.iter().all(|r| r.specialization.is_none()));
        assert!(t.experts.iter().all(|r| r.top_domain_specialization.is_none()));
        assert_eq!(t.vocab.len(), 4, "one token id per expert");
    }
}
