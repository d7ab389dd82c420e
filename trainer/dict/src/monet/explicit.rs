//! The N-expert computation written out expert by expert: Σ_{i,j} gate(i,j)·expert_ij(x), with
//! each expert's weights sliced from the shared ones. O(E²) per token — the reference the
//! factorised [`super::Monet::forward_with`] is tested against on small E, never used in training;
//! analysis uses [`expert_with`] for what each expert writes on its top examples.

use anyhow::Result;
use candle_core::{Tensor, Var};

use super::{Experts, Monet};

fn values(v: &Var) -> Result<Vec<f32>> {
    Ok(v.as_tensor().flatten_all()?.to_vec1()?)
}

/// The expert weights as plain vectors, extracted once for many expert evaluations: the input
/// projections transposed (`[E·k, d_in]`, one contiguous row per hidden unit), the rest as stored.
pub struct ExpertWeights {
    vertical: bool,
    ut: Vec<Vec<f32>>,
    c: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    b: Vec<Vec<f32>>,
}

impl ExpertWeights {
    pub fn of(monet: &Monet) -> Result<ExpertWeights> {
        let d = monet.spec.d_in;
        let t = |u: &Var| -> Result<Vec<f32>> {
            let cols = u.as_tensor().dims()[1];
            Ok(crate::io::transpose(&values(u)?, d, cols))
        };
        let all = |vars: &[Var]| -> Result<Vec<Vec<f32>>> { vars.iter().map(values).collect() };
        Ok(match &monet.experts {
            Experts::Horizontal { u, c, v, b } => ExpertWeights {
                vertical: false,
                ut: vec![t(u)?],
                c: vec![values(c)?],
                v: vec![values(v)?],
                b: vec![values(b)?],
            },
            Experts::Vertical { u, c, v, b } => ExpertWeights {
                vertical: true,
                ut: vec![t(&u[0])?, t(&u[1])?],
                c: all(c)?,
                v: all(v)?,
                b: all(b)?,
            },
        })
    }
}

/// `ψ(x·u[:, i·k..(i+1)·k] + c[i·k..])` for one token, from the transposed `ut`: sub-expert i's
/// hidden units (ψ = ReLU²).
fn hidden(x: &[f32], ut: &[f32], c: &[f32], i: usize, k: usize) -> Vec<f32> {
    let d = x.len();
    (0..k)
        .map(|a| {
            let col = i * k + a;
            let pre = crate::kernels::dot(x, &ut[col * d..(col + 1) * d]) + c[col];
            pre.max(0.0).powi(2)
        })
        .collect()
}

/// `h · v[i·k..(i+1)·k, :]` (`v` is `[E·k, out]`).
fn up(h: &[f32], v: &[f32], out: usize, i: usize) -> Vec<f32> {
    let k = h.len();
    let mut y = vec![0.0; out];
    for (a, &ha) in h.iter().enumerate() {
        crate::kernels::axpy(ha, &v[(i * k + a) * out..(i * k + a + 1) * out], &mut y);
    }
    y
}

/// The output of expert (i, j) on one token `x`, from weights extracted once.
pub fn expert_with(monet: &Monet, w: &ExpertWeights, x: &[f32], i: usize, j: usize) -> Vec<f32> {
    let (m, o) = (monet.spec.dim, monet.spec.d_out);
    if !w.vertical {
        let h = hidden(x, &w.ut[0], &w.c[0], i, m);
        return up(&h, &w.v[0], o, j).iter().zip(&w.b[0][j * o..(j + 1) * o]).map(|(a, b)| a + b).collect();
    }
    let k = m / 2;
    let h1 = hidden(x, &w.ut[0], &w.c[0], i, k);
    let h2 = hidden(x, &w.ut[1], &w.c[1], j, k);
    let half = o / 2;
    let top = up(&h1, &w.v[0], half, i)
        .iter()
        .zip(up(&h2, &w.v[1], half, i))
        .zip(&w.b[0][i * half..(i + 1) * half])
        .map(|((a, c), b)| a + c + b)
        .collect::<Vec<f32>>();
    let bottom = up(&h1, &w.v[2], half, j)
        .iter()
        .zip(up(&h2, &w.v[3], half, j))
        .zip(&w.b[1][j * half..(j + 1) * half])
        .map(|((a, c), b)| a + c + b)
        .collect::<Vec<f32>>();
    top.into_iter().chain(bottom).collect()
}

/// The output of expert (i, j) on one token `x`.
pub fn expert(monet: &Monet, x: &[f32], i: usize, j: usize) -> Result<Vec<f32>> {
    Ok(expert_with(monet, &ExpertWeights::of(monet)?, x, i, j))
}

/// Σ_{i,j} gate(i,j)·expert_ij(x) for every token of `x` (`[B, d_in]`), with gate(i,j) =
/// Σ_h g1[h,i]·g2[h,j] from `g1`, `g2` (`[B, H, E]`). Returns `[B, d_out]` values.
pub fn forward(monet: &Monet, x: &Tensor, g1: &Tensor, g2: &Tensor) -> Result<Vec<f32>> {
    let (bsz, heads, e) = g1.dims3()?;
    let d = monet.spec.d_in;
    let o = monet.spec.d_out;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (a, b): (Vec<f32>, Vec<f32>) = (g1.flatten_all()?.to_vec1()?, g2.flatten_all()?.to_vec1()?);
    let w = ExpertWeights::of(monet)?;
    let mut out = vec![0.0f32; bsz * o];
    for t in 0..bsz {
        let row = &xs[t * d..(t + 1) * d];
        for i in 0..e {
            for j in 0..e {
                let gate: f32 =
                    (0..heads).map(|h| a[(t * heads + h) * e + i] * b[(t * heads + h) * e + j]).sum();
                if gate == 0.0 {
                    continue;
                }
                for (acc, y) in out[t * o..(t + 1) * o].iter_mut().zip(expert_with(monet, &w, row, i, j)) {
                    *acc += gate * y;
                }
            }
        }
    }
    Ok(out)
}
