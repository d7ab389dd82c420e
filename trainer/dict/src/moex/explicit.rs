//! MoE-X as the explicit wide MLP, for the tests: one `[E·m, d_in]` encoder over every unit, a
//! gate per unit from the routing (g_e for the units of a chosen expert e, 0 otherwise), one
//! `[E·m, d_out]` decoder. No expert is singled out: every unit of every expert is computed, then
//! masked. [`super::Moex::forward`] must give the same output and codes.

use super::Moex;
use super::router::Routing;
use crate::kernels::dot;

/// The output `[B, d_out]` and the dense feature activations `[B, E·m]` of `x` (`[B, d_in]`)
/// under `routing`.
pub fn forward(moex: &Moex, routing: &Routing, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (d, o, m) = (moex.spec.d_in, moex.spec.d_out, moex.spec.expert_width);
    let n = moex.spec.n_features();
    let tokens = x.len() / d;
    let mut y = vec![0f32; tokens * o];
    let mut acts = vec![0f32; tokens * n];
    for t in 0..tokens {
        let xt = &x[t * d..(t + 1) * d];
        let mut mask = vec![0f32; n];
        for s in routing.token_slots(t) {
            let e = routing.expert[s] as usize;
            mask[e * m..(e + 1) * m].fill(routing.gate[s]);
        }
        let a = &mut acts[t * n..(t + 1) * n];
        for (f, (a, w)) in a.iter_mut().zip(moex.w_enc.chunks(d)).enumerate() {
            *a = mask[f] * (dot(w, xt) + moex.b_enc[f]).max(0.0);
        }
        let yt = &mut y[t * o..(t + 1) * o];
        yt.copy_from_slice(&moex.b_dec);
        for (&a, row) in a.iter().zip(moex.w_dec.chunks(o)) {
            if a != 0.0 {
                yt.iter_mut().zip(row).for_each(|(y, w)| *y += a * w);
            }
        }
    }
    (y, acts)
}
