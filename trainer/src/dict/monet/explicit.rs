//! The N-expert computation written out expert by expert: Σ_{i,j} gate(i,j)·expert_ij(x), with
//! each expert's weights sliced from the shared ones. O(E²) per token — the reference the
//! factorised [`super::Monet::forward_with`] is tested against on small E, never used in training.

use anyhow::Result;
use candle_core::{Tensor, Var};

use super::{Experts, Monet};

fn values(v: &Var) -> Result<Vec<f32>> {
    Ok(v.as_tensor().flatten_all()?.to_vec1()?)
}

/// `ψ(x·u[:, i·k..(i+1)·k] + c[i·k..])` for one token: sub-expert i's hidden units (ψ = ReLU²).
fn hidden(x: &[f32], u: &[f32], c: &[f32], cols: usize, i: usize, k: usize) -> Vec<f32> {
    (0..k)
        .map(|a| {
            let col = i * k + a;
            let pre: f32 = x.iter().enumerate().map(|(r, xv)| xv * u[r * cols + col]).sum::<f32>() + c[col];
            pre.max(0.0).powi(2)
        })
        .collect()
}

/// `h · v[i·k..(i+1)·k, :]` (`v` is `[E·k, out]`).
fn up(h: &[f32], v: &[f32], out: usize, i: usize) -> Vec<f32> {
    let k = h.len();
    (0..out).map(|o| (0..k).map(|a| h[a] * v[(i * k + a) * out + o]).sum()).collect()
}

/// The output of expert (i, j) on one token `x`.
pub fn expert(monet: &Monet, x: &[f32], i: usize, j: usize) -> Result<Vec<f32>> {
    let (e, m, o) = (monet.spec.experts, monet.spec.dim, monet.spec.d_out);
    Ok(match &monet.experts {
        Experts::Horizontal { u, c, v, b } => {
            let h = hidden(x, &values(u)?, &values(c)?, e * m, i, m);
            let b = values(b)?;
            up(&h, &values(v)?, o, j).iter().zip(&b[j * o..(j + 1) * o]).map(|(a, b)| a + b).collect()
        }
        Experts::Vertical { u, c, v, b } => {
            let k = m / 2;
            let h1 = hidden(x, &values(&u[0])?, &values(&c[0])?, e * k, i, k);
            let h2 = hidden(x, &values(&u[1])?, &values(&c[1])?, e * k, j, k);
            let half = o / 2;
            let (b1, b2) = (values(&b[0])?, values(&b[1])?);
            let top: Vec<f32> = up(&h1, &values(&v[0])?, half, i)
                .iter()
                .zip(up(&h2, &values(&v[1])?, half, i))
                .zip(&b1[i * half..(i + 1) * half])
                .map(|((a, c), b)| a + c + b)
                .collect();
            let bottom: Vec<f32> = up(&h1, &values(&v[2])?, half, j)
                .iter()
                .zip(up(&h2, &values(&v[3])?, half, j))
                .zip(&b2[j * half..(j + 1) * half])
                .map(|((a, c), b)| a + c + b)
                .collect();
            top.into_iter().chain(bottom).collect()
        }
    })
}

/// Σ_{i,j} gate(i,j)·expert_ij(x) for every token of `x` (`[B, d_in]`), with gate(i,j) =
/// Σ_h g1[h,i]·g2[h,j] from `g1`, `g2` (`[B, H, E]`). Returns `[B, d_out]` values.
pub fn forward(monet: &Monet, x: &Tensor, g1: &Tensor, g2: &Tensor) -> Result<Vec<f32>> {
    let (bsz, heads, e) = g1.dims3()?;
    let d = monet.spec.d_in;
    let o = monet.spec.d_out;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (a, b): (Vec<f32>, Vec<f32>) = (g1.flatten_all()?.to_vec1()?, g2.flatten_all()?.to_vec1()?);
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
                for (acc, y) in out[t * o..(t + 1) * o].iter_mut().zip(expert(monet, row, i, j)?) {
                    *acc += gate * y;
                }
            }
        }
    }
    Ok(out)
}
