//! Monet's auxiliary losses. The paper names them (uniformity, ambiguity) without formulas; these
//! are Loupe's, each computed per sub-router on its gate factors g (`[B, H, E]`, each row a
//! distribution over the E sub-experts) and averaged over the two sub-routers:
//!
//! - **uniformity** — experts should be used evenly across the batch. With p_i = mean over tokens
//!   and heads of g[·,·,i] (a distribution over sub-experts), L_u = E·Σ_i p_i² − 1: zero exactly
//!   when p is uniform, and E − 1 when one sub-expert takes everything (the Switch-Transformer
//!   balance loss with the routing probabilities standing in for the hard counts). Balanced
//!   sub-experts make balanced experts, since expert (i, j)'s usage factorises over heads.
//! - **ambiguity** — each token's route should be decisive. L_a = mean over tokens and heads of
//!   1 − max_i g[·,·,i]: zero when every head puts all its weight on one sub-expert, large when
//!   it hesitates between several (1 − 1/E at worst). Its gradient raises the leading logit
//!   against the others, sharpening the softmax.
//!
//! `uniformity_and_ambiguity_do_what_their_names_say` in tests/tests/monet.rs trains a router
//! on each loss alone and checks the usage spread and the route sharpness it controls.

use anyhow::Result;
use candle_core::{D, Tensor};

/// L_u for one sub-router's gates.
pub fn uniformity(g: &Tensor) -> Result<Tensor> {
    let e = g.dim(2)? as f64;
    let p = g.mean(0)?.mean(0)?; // [E]
    Ok(((p.sqr()?.sum_all()? * e)? - 1.0)?)
}

/// L_a for one sub-router's gates.
pub fn ambiguity(g: &Tensor) -> Result<Tensor> {
    Ok(g.max(D::Minus1)?.mean_all()?.affine(-1.0, 1.0)?)
}
