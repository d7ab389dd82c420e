//! Where the routing comes from: a dictionary with experts ([`Dictionary::route`], over the
//! activations of the hook it reads) or a captured router hook of a real MoE model. Either way a
//! chunk of activation rows becomes, per token, the chosen experts with their gates
//! ([`Routed::codes`], over expert ids) and, where the source gives the router's full
//! distribution, that distribution's entropy.
//!
//! Router hooks (names fixed in `store/src/experts.rs`'s doc and DESIGN.md):
//! - `blocks.L.mlp.hook_expert_weights`: the chosen experts are the non-zero entries, the gate is
//!   the value; the full distribution is not there.
//! - `blocks.L.mlp.hook_router_probs` / `hook_router_logits` (softmax first): the chosen experts
//!   are the `--top-k` largest probabilities (ties to the lower id), the gate is the probability
//!   (as stored: not renormalised over the chosen); the full distribution's entropy is measured
//!   too.

use anyhow::{Result, bail};
use loupe_dict::{Codes, Dictionary};

/// What a router hook holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterHook {
    ExpertWeights,
    Probs,
    Logits,
}

const ROUTER_HOOKS: &str =
    "blocks.L.mlp.hook_expert_weights, blocks.L.mlp.hook_router_probs or blocks.L.mlp.hook_router_logits";

impl RouterHook {
    /// The kind of router hook `hook` is, or an error saying which hooks are.
    pub fn parse(hook: &str) -> Result<RouterHook> {
        let kind = match hook.rsplit_once(".mlp.") {
            Some((block, leaf)) if is_block(block) => match leaf {
                "hook_expert_weights" => Some(RouterHook::ExpertWeights),
                "hook_router_probs" => Some(RouterHook::Probs),
                "hook_router_logits" => Some(RouterHook::Logits),
                _ => None,
            },
            _ => None,
        };
        kind.ok_or_else(|| {
            anyhow::anyhow!(
                "{hook} is not a router hook (expected {ROUTER_HOOKS}, or --dictionary with experts)"
            )
        })
    }
}

fn is_block(s: &str) -> bool {
    s.strip_prefix("blocks.").is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

/// A routing source, ready to route chunks of rows.
pub enum Routing {
    Dictionary { dict: Box<dyn Dictionary>, n_experts: usize },
    Hook { kind: RouterHook, n_experts: usize, top_k: Option<usize> },
}

/// One chunk routed.
pub struct Routed {
    /// Per token, the chosen experts and their gates.
    pub codes: Codes,
    /// Per token, the entropy (nats) of the router's full softmax, where the source gives it.
    pub full_entropy: Option<Vec<f64>>,
}

impl Routing {
    /// A router hook of width `d` (= its number of experts); `top_k` is required for the
    /// probabilities and logits and refused for the expert weights.
    pub fn hook(hook: &str, d: usize, top_k: Option<usize>) -> Result<Routing> {
        let kind = RouterHook::parse(hook)?;
        match (kind, top_k) {
            (RouterHook::ExpertWeights, Some(_)) => bail!(
                "--top-k is for hook_router_probs and hook_router_logits: {hook}'s chosen experts are its non-zero entries"
            ),
            (RouterHook::Probs | RouterHook::Logits, None) => {
                bail!("{hook} holds the whole router distribution: pass --top-k K (experts chosen per token)")
            }
            (_, Some(k)) if k == 0 || k > d => bail!("--top-k {k} must be 1..={d} ({hook} has {d} experts)"),
            _ => {}
        }
        Ok(Routing::Hook { kind, n_experts: d, top_k })
    }

    pub fn n_experts(&self) -> usize {
        match self {
            Routing::Dictionary { n_experts, .. } | Routing::Hook { n_experts, .. } => *n_experts,
        }
    }

    /// Whether the full router distribution is available (and its entropy measured).
    pub fn has_full_distribution(&self) -> bool {
        matches!(self, Routing::Hook { kind: RouterHook::Probs | RouterHook::Logits, .. })
    }

    /// Route `x` (`[tokens, d]` rows of the source hook).
    pub fn route(&self, x: &[f32]) -> Result<Routed> {
        match self {
            Routing::Dictionary { dict, n_experts } => {
                let codes = dict.route(x).expect("a dictionary with experts routes");
                if let Some(&e) = codes.feature.iter().find(|&&e| e as usize >= *n_experts) {
                    bail!("the dictionary routed to expert {e} but has {n_experts} experts");
                }
                Ok(Routed { codes, full_entropy: None })
            }
            Routing::Hook { kind, n_experts, top_k } => Ok(route_hook(*kind, *n_experts, *top_k, x)),
        }
    }
}

/// Route rows of a router hook.
fn route_hook(kind: RouterHook, n: usize, top_k: Option<usize>, x: &[f32]) -> Routed {
    let tokens = x.len() / n;
    let mut codes = Codes { offsets: Vec::with_capacity(tokens + 1), ..Codes::default() };
    codes.offsets.push(0);
    let mut full = Vec::with_capacity(if kind == RouterHook::ExpertWeights { 0 } else { tokens });
    let mut probs = vec![0.0f64; n];
    let mut order: Vec<u32> = Vec::with_capacity(n);
    for row in x.chunks_exact(n) {
        match kind {
            RouterHook::ExpertWeights => {
                for (e, &v) in row.iter().enumerate() {
                    if v != 0.0 {
                        codes.feature.push(e as u32);
                        codes.value.push(v);
                    }
                }
            }
            RouterHook::Probs | RouterHook::Logits => {
                if kind == RouterHook::Logits {
                    softmax(row, &mut probs);
                } else {
                    // As stored (the entropy normalises them; f16 storage may leave the sum off 1).
                    for (p, &v) in probs.iter_mut().zip(row) {
                        *p = v as f64;
                    }
                }
                full.push(entropy(probs.iter().copied()));
                let k = top_k.expect("checked in Routing::hook");
                order.clear();
                order.extend(0..n as u32);
                // Largest first, ties to the lower id (a total order: the choice is deterministic).
                let by_prob =
                    |a: &u32, b: &u32| probs[*b as usize].total_cmp(&probs[*a as usize]).then(a.cmp(b));
                if k < n {
                    order.select_nth_unstable_by(k - 1, by_prob);
                }
                order[..k].sort_unstable_by(by_prob);
                for &e in &order[..k] {
                    codes.feature.push(e);
                    codes.value.push(probs[e as usize] as f32);
                }
            }
        }
        codes.offsets.push(codes.feature.len() as u32);
    }
    Routed { codes, full_entropy: (kind != RouterHook::ExpertWeights).then_some(full) }
}

/// Softmax of `logits` (max subtracted), in f64.
fn softmax(logits: &[f32], out: &mut [f64]) {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let mut sum = 0.0;
    for (o, &v) in out.iter_mut().zip(logits) {
        *o = (v as f64 - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

/// Entropy (nats) of the distribution `weights` normalised to sum 1 (non-positive weights count
/// as 0); 0 when nothing is positive.
pub fn entropy(weights: impl Iterator<Item = f64> + Clone) -> f64 {
    let sum: f64 = weights.clone().filter(|&w| w > 0.0).sum();
    if sum <= 0.0 {
        return 0.0;
    }
    -weights.filter(|&w| w > 0.0).map(|w| w / sum).map(|p| p * p.ln()).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_hooks_are_recognised_and_others_refused() {
        assert_eq!(RouterHook::parse("blocks.3.mlp.hook_expert_weights").unwrap(), RouterHook::ExpertWeights);
        assert_eq!(RouterHook::parse("blocks.12.mlp.hook_router_logits").unwrap(), RouterHook::Logits);
        for bad in ["blocks.0.hook_mlp_out", "blocks.x.mlp.hook_router_probs", "mlp.hook_router_probs"] {
            assert!(RouterHook::parse(bad).unwrap_err().to_string().contains("is not a router hook"));
        }
        assert!(Routing::hook("blocks.0.mlp.hook_router_probs", 4, None).is_err());
        assert!(Routing::hook("blocks.0.mlp.hook_expert_weights", 4, Some(2)).is_err());
        assert!(Routing::hook("blocks.0.mlp.hook_router_probs", 4, Some(5)).is_err());
    }

    #[test]
    fn top_k_of_logits_is_the_softmax_top_k_with_ties_to_the_lower_id() {
        let routing = Routing::hook("blocks.0.mlp.hook_router_logits", 4, Some(2)).unwrap();
        let r = routing.route(&[0.0, 1.0, 1.0, -1.0]).unwrap();
        assert_eq!(r.codes.feature, [1, 2]);
        let z = 2.0 * 1f64.exp() + 1.0 + (-1f64).exp();
        assert!((r.codes.value[0] as f64 - 1f64.exp() / z).abs() < 1e-6);
        let p = [1.0 / z, 1f64.exp() / z, 1f64.exp() / z, (-1f64).exp() / z];
        let h: f64 = -p.iter().map(|p| p * p.ln()).sum::<f64>();
        assert!((r.full_entropy.unwrap()[0] - h).abs() < 1e-12);
        assert_eq!(entropy([0.5, 0.5, 0.0].into_iter()), 2f64.ln());
    }
}
