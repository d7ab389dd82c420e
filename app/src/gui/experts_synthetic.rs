//! A synthetic experts entry of any size, for `loupe bench gui --case experts` and the Experts
//! view's tests: Zipf-like usage over shuffled expert ids, two domains, a few top tokens and
//! partners per expert, every pair among the most used experts, an entropy histogram. Seeded:
//! the same `n` gives the same tables.

use loupe_store::{
    CoactivationRow, EntropyBin, ExpertDomainRow, ExpertRow, ExpertTokenRow, ExpertsEntry, ExpertsSettings,
    ExpertsSource, ExpertsTables,
};

/// The dictionary the synthetic experts say they are units of (not in the store).
pub const DICTIONARY: &str = "synthetic-monet";
/// Top tokens and partners kept per expert, and the experts whose pairs are all kept.
const TOKENS_PER_EXPERT: u32 = 8;
const PARTNERS_PER_EXPERT: u32 = 4;
const ALL_PAIRS: u32 = 64;
const TOKENS: u64 = 1_000_000;
const ENTROPY_BINS: u32 = 32;

/// A 64-bit linear congruential generator (enough for made-up tables).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    fn unit(&mut self) -> f32 {
        self.next(1 << 24) as f32 / (1 << 24) as f32
    }
}

/// `n` synthetic experts: their tables and entry.
pub fn synthetic(n: u32) -> (ExpertsTables, ExpertsEntry) {
    let mut rng = Lcg(23);
    // Usage by rank ~ 1/(rank + 10)^0.8, ranks shuffled over the ids.
    let mut rank: Vec<u32> = (0..n).collect();
    for i in (1..n as usize).rev() {
        rank.swap(i, rng.next(i as u64 + 1) as usize);
    }
    let weight = |r: u32| 1.0 / (r as f64 + 10.0).powf(0.8);
    let total: f64 = (0..n).map(weight).sum();
    let mean_active = 8.0f64;
    let mut by_rank = vec![0u32; n as usize];
    let mut tables = ExpertsTables::default();
    for e in 0..n {
        let r = rank[e as usize];
        by_rank[r as usize] = e;
        let usage = (mean_active * weight(r) / total).min(1.0);
        let tokens = (usage * TOKENS as f64).round() as u64;
        let top_token_share = 0.05 + 0.6 * rng.unit();
        let moby = rng.unit();
        let spec = [moby, 1.0 - moby].map(|s| s * usage as f32 * 2.0);
        let top_domain = u32::from(spec[1] > spec[0]);
        tables.experts.push(ExpertRow {
            expert: e,
            tokens,
            usage: usage as f32,
            mean_gate: 0.1 + 0.8 * rng.unit(),
            top_token_share,
            top_token: rng.next(50_000) as u32,
            top_domain_specialization: Some(spec[top_domain as usize]),
            top_domain,
        });
        let mut share = top_token_share;
        for k in 0..TOKENS_PER_EXPERT as u64 {
            let token = if k == 0 { tables.experts[e as usize].top_token } else { rng.next(50_000) as u32 };
            tables.vocab.push(ExpertTokenRow {
                expert: e,
                token,
                count: (share as f64 * tokens as f64).round() as u64,
                share_of_expert: share,
                share_of_token: rng.unit(),
            });
            share *= 0.6;
        }
        for (d, s) in [moby, 1.0 - moby].into_iter().enumerate() {
            tables.domains.push(ExpertDomainRow {
                expert: e,
                domain: d as u16,
                count: (s as f64 * tokens as f64).round() as u64,
                share_of_expert: s,
                specialization: Some(spec[d]),
            });
        }
    }
    // Partners: a few per expert, and every pair among the most used (as `loupe experts` keeps).
    let top: Vec<u32> = by_rank.iter().take(ALL_PAIRS as usize).copied().collect();
    for e in 0..n {
        let tokens = tables.experts[e as usize].tokens;
        let mut partners: Vec<u32> = if top.contains(&e) {
            top.iter().copied().filter(|&j| j != e).collect()
        } else {
            (0..PARTNERS_PER_EXPERT).map(|_| rng.next(n as u64) as u32).filter(|&j| j != e).collect()
        };
        partners.sort_unstable();
        partners.dedup();
        for j in partners {
            let p = rng.unit() * 0.5;
            tables.coactivation.push(CoactivationRow {
                expert_i: e,
                expert_j: j,
                both: (p as f64 * tokens as f64).round() as u64,
                p_j_given_i: p,
            });
        }
    }
    let max = (n as f32).ln();
    for b in 0..ENTROPY_BINS {
        let (lo, hi) = (max * b as f32 / ENTROPY_BINS as f32, max * (b + 1) as f32 / ENTROPY_BINS as f32);
        let centre = (b as f32 - ENTROPY_BINS as f32 * 0.3) / 4.0;
        tables.entropy.push(EntropyBin {
            lo,
            hi,
            tokens: (TOKENS as f32 * (-centre * centre).exp() / 7.0) as u64,
        });
    }
    let entry = ExpertsEntry {
        source: ExpertsSource::Dictionary {
            name: DICTIONARY.into(),
            kind: "monet".into(),
            hook: "blocks.6.hook_mlp_out".into(),
        },
        n_experts: n,
        features_per_expert: 1,
        domains: vec!["moby-dick".into(), "sotu".into()],
        domain_tokens: vec![TOKENS * 3 / 5, TOKENS * 2 / 5],
        mean_active: mean_active as f32,
        mean_entropy: max * 0.3,
        mean_router_entropy: None,
        settings: ExpertsSettings {
            tokens: TOKENS,
            gate_floor: Some(1e-6),
            top_k: None,
            coactivation_top: PARTNERS_PER_EXPERT,
            coactivation_experts: ALL_PAIRS,
            vocab_top: TOKENS_PER_EXPERT,
            model: "synthetic".into(),
            model_sha256: "0".repeat(64),
        },
        files: Vec::new(),
    };
    (tables, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_are_consistent() {
        let (t, e) = synthetic(1000);
        assert_eq!(t.experts.len(), 1000);
        assert!(t.experts.iter().enumerate().all(|(i, r)| r.expert == i as u32));
        let usage: f32 = t.experts.iter().map(|r| r.usage).sum();
        assert!((usage - e.mean_active).abs() < 0.01, "usages sum to the experts per token: {usage}");
        assert!(t.coactivation.iter().all(|r| r.expert_i != r.expert_j && r.expert_j < 1000));
        assert_eq!(synthetic(1000).0, t, "seeded");
    }
}
