//! Monet-style product-key experts (Park et al., ICLR 2025) fitted to captured activations.
//!
//! N = E² experts share √N-sized weights. Two sub-routers score E sub-experts per head
//! ([`router`]); expert (i, j) gets the gate Σ_h g1[h,i]·g2[h,j]. Its computation depends on the
//! decomposition (ψ = ReLU², `m` the expert width):
//! - horizontal (HD): expert (i, j) = v_j·ψ(u_i·x + c_i) + b_j — bottom layer of sub-expert i, top
//!   layer of sub-expert j;
//! - vertical (VD): input and output are split in halves; expert (i, j) =
//!   [v11_i·ψ(u1_i x) + v12_i·ψ(u2_j x) + b1_i ; v21_j·ψ(u1_i x) + v22_j·ψ(u2_j x) + b2_j], i.e. sub-
//!   expert i owns the left half of the hidden units and the top half of the output, j the rest.
//!
//! [`Monet::forward`] computes Σ_{i,j} gate(i,j)·expert_ij(x) without ever forming an expert:
//! because each softmax sums to one, the sum factorises into per-sub-expert products and two small
//! batched matmuls over the heads (the formulas are in the code); [`explicit`] evaluates the same sum
//! expert by expert for the tests. Training and inference ([`super::Dictionary`]) run the same sums
//! sparsely and by hand ([`sparse`], gradients in [`backward`]): only the sub-experts a token's
//! heads keep are touched. Every expert (i, j) is a feature (id i·E + j) whose activation on a
//! token is its gate; it is *active* when its gate exceeds [`sparse::GATE_FLOOR`] (1e-4) of the
//! token's total gate mass ([`Monet::codes`]): kept sub-experts with softmax weights ~1e-9 make
//! gates ~1e-18 that would otherwise count in L0, dead fraction and co-occurrence. The output
//! still uses every gate.
//!
//! Two modes: an autoencoder on one hook (d_out = d_in), or a transcoder from an MLP's input to
//! its output (the job's `input_hook`). [`train`] fits it, [`io`] stores it.

pub mod aux;
pub mod backward;
pub mod explicit;
pub mod io;
mod kernels;
pub mod phases;
pub mod router;
pub mod routes;
pub mod sparse;
#[cfg(test)]
mod tests;
pub mod train;

use anyhow::{Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::kernels::Codes;
pub use router::Router;

/// How expert weights are split between the two sub-experts of an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decomposition {
    Horizontal,
    Vertical,
}

impl std::str::FromStr for Decomposition {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "hd" | "horizontal" => Ok(Decomposition::Horizontal),
            "vd" | "vertical" => Ok(Decomposition::Vertical),
            _ => bail!("unknown decomposition {s:?} (expected hd or vd)"),
        }
    }
}

/// The shape of a Monet layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonetSpec {
    pub decomposition: Decomposition,
    pub d_in: usize,
    pub d_out: usize,
    /// Sub-experts per side, E (N = E² experts).
    pub experts: usize,
    /// Router heads, H.
    pub heads: usize,
    /// Sub-experts each head keeps (on average): σ = Φ⁻¹(1 − topk/E).
    pub topk: usize,
    /// Hidden width of an expert, m (even for VD).
    pub dim: usize,
}

impl MonetSpec {
    pub fn validate(&self) -> Result<()> {
        let s = self;
        if s.d_in == 0 || s.d_out == 0 || s.experts < 2 || s.heads == 0 || s.dim == 0 {
            bail!("Monet needs d_in, d_out, heads and dim ≥ 1 and at least 2 experts per side");
        }
        if s.topk == 0 || s.topk >= s.experts {
            bail!("topk = {} must be between 1 and experts − 1 = {}", s.topk, s.experts - 1);
        }
        if s.decomposition == Decomposition::Vertical
            && (!s.dim.is_multiple_of(2) || !s.d_out.is_multiple_of(2))
        {
            bail!(
                "the vertical decomposition needs an even expert dim and an even d_out (got {} and {})",
                s.dim,
                s.d_out
            );
        }
        Ok(())
    }

    /// Number of experts (features), E².
    pub fn n_experts(&self) -> usize {
        self.experts * self.experts
    }

    /// The router's cut on normalised logits, σ = Φ⁻¹(1 − topk/E).
    pub fn sigma(&self) -> f32 {
        use statrs::distribution::{ContinuousCDF, Normal};
        Normal::standard().inverse_cdf(1.0 - self.topk as f64 / self.experts as f64) as f32
    }

    /// Each weight's name and shape, in file order ([`Monet::named`]).
    pub fn shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (d, o, e, m, he) = (self.d_in, self.d_out, self.experts, self.dim, self.heads * self.experts);
        let mut out = vec![("router.w1", vec![d, he]), ("router.w2", vec![d, he])];
        match self.decomposition {
            Decomposition::Horizontal => out.extend([
                ("u", vec![d, e * m]),
                ("c", vec![e * m]),
                ("v", vec![e * m, o]),
                ("b", vec![e, o]),
            ]),
            Decomposition::Vertical => {
                let (h, w) = (e * m / 2, o / 2);
                out.extend([("u1", vec![d, h]), ("u2", vec![d, h]), ("c1", vec![h]), ("c2", vec![h])]);
                out.extend([
                    ("v11", vec![h, w]),
                    ("v12", vec![h, w]),
                    ("v21", vec![h, w]),
                    ("v22", vec![h, w]),
                ]);
                out.extend([("b1", vec![e, w]), ("b2", vec![e, w])]);
            }
        }
        out
    }

    /// Trainable parameters (the router's included).
    pub fn parameters(&self) -> usize {
        let (d, o, e, m, h) = (self.d_in, self.d_out, self.experts, self.dim, self.heads);
        let router = 2 * d * h * e;
        router
            + match self.decomposition {
                Decomposition::Horizontal => d * e * m + e * m + e * m * o + e * o,
                Decomposition::Vertical => {
                    2 * (d * e * m / 2 + e * m / 2) + 4 * (e * m / 2) * (o / 2) + e * o
                }
            }
    }
}

/// The expert weights of either decomposition (row-major; `x @ w` convention).
pub enum Experts {
    /// `u [d_in, E·m]`, `c [E·m]`, `v [E·m, d_out]`, `b [E, d_out]`.
    Horizontal { u: Var, c: Var, v: Var, b: Var },
    /// `u1, u2 [d_in, E·m/2]`, `c1, c2 [E·m/2]`, `v11 … v22 [E·m/2, d_out/2]`, `b1, b2 [E, d_out/2]`.
    Vertical { u: [Var; 2], c: [Var; 2], v: [Var; 4], b: [Var; 2] },
}

/// A Monet layer: router + experts.
///
/// Inference ([`super::Dictionary`]) runs the sparse code on a copy of the weights made at the
/// first encode: change the variables before that, not after.
pub struct Monet {
    pub spec: MonetSpec,
    pub router: Router,
    pub experts: Experts,
    sparse: std::sync::OnceLock<(sparse::Layout, sparse::Params)>,
}

fn randn(rng: &mut StdRng, shape: &[usize], std: f64) -> Result<Var> {
    let normal = Normal::new(0.0, std).expect("positive std");
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| normal.sample(rng) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?)?)
}

fn zeros(shape: &[usize]) -> Result<Var> {
    Ok(Var::zeros(shape, DType::F32, &Device::Cpu)?)
}

impl Monet {
    /// Random initialisation: Gaussian weights with std 1/√fan_in, zero biases.
    pub fn init(spec: MonetSpec, seed: u64) -> Result<Monet> {
        spec.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let (d, o, e, m) = (spec.d_in, spec.d_out, spec.experts, spec.dim);
        let router = Router::init(d, spec.heads, e, spec.topk, &mut rng)?;
        let experts = match spec.decomposition {
            Decomposition::Horizontal => Experts::Horizontal {
                u: randn(&mut rng, &[d, e * m], 1.0 / (d as f64).sqrt())?,
                c: zeros(&[e * m])?,
                v: randn(&mut rng, &[e * m, o], 1.0 / (m as f64).sqrt())?,
                b: zeros(&[e, o])?,
            },
            Decomposition::Vertical => {
                let h = e * m / 2;
                let std_v = 1.0 / (m as f64).sqrt();
                Experts::Vertical {
                    u: [
                        randn(&mut rng, &[d, h], 1.0 / (d as f64).sqrt())?,
                        randn(&mut rng, &[d, h], 1.0 / (d as f64).sqrt())?,
                    ],
                    c: [zeros(&[h])?, zeros(&[h])?],
                    v: [
                        randn(&mut rng, &[h, o / 2], std_v)?,
                        randn(&mut rng, &[h, o / 2], std_v)?,
                        randn(&mut rng, &[h, o / 2], std_v)?,
                        randn(&mut rng, &[h, o / 2], std_v)?,
                    ],
                    b: [zeros(&[e, o / 2])?, zeros(&[e, o / 2])?],
                }
            }
        };
        Ok(Monet { spec, router, experts, sparse: Default::default() })
    }

    /// The layer with the given weights (file order, [`MonetSpec::shapes`]) and router BatchNorm
    /// running statistics.
    pub fn from_named(
        spec: MonetSpec,
        named: &[Vec<f32>],
        mean: [Vec<f32>; 2],
        var: [Vec<f32>; 2],
    ) -> Result<Monet> {
        spec.validate()?;
        let shapes = spec.shapes();
        if named.len() != shapes.len() {
            bail!("a {:?} Monet has {} weights, got {}", spec.decomposition, shapes.len(), named.len());
        }
        let mut vars = Vec::with_capacity(named.len());
        for ((name, shape), values) in shapes.iter().zip(named) {
            if values.len() != shape.iter().product::<usize>() {
                bail!("weight {name} should be {shape:?}, got {} values", values.len());
            }
            vars.push(Var::from_tensor(&Tensor::from_slice(values, shape.as_slice(), &Device::Cpu)?)?);
        }
        let mut it = vars.into_iter();
        let mut next = || it.next().expect("one variable per shape");
        let router = Router {
            w: [next(), next()],
            running_mean: mean,
            running_var: var,
            heads: spec.heads,
            experts: spec.experts,
            sigma: spec.sigma(),
        };
        let experts = match spec.decomposition {
            Decomposition::Horizontal => Experts::Horizontal { u: next(), c: next(), v: next(), b: next() },
            Decomposition::Vertical => Experts::Vertical {
                u: [next(), next()],
                c: [next(), next()],
                v: [next(), next(), next(), next()],
                b: [next(), next()],
            },
        };
        Ok(Monet { spec, router, experts, sparse: Default::default() })
    }

    /// The weights in the sparse code's layout (a copy).
    pub fn sparse_params(&self) -> Result<(sparse::Layout, sparse::Params)> {
        let named = self
            .named()
            .into_iter()
            .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let lay = sparse::Layout::of(&self.spec);
        let params = sparse::Params::from_named(&lay, &named);
        Ok((lay, params))
    }

    /// Inference weights, copied at the first call.
    fn cached(&self) -> &(sparse::Layout, sparse::Params) {
        // The variables are this layer's own f32 tensors; reading them cannot fail.
        self.sparse.get_or_init(|| self.sparse_params().expect("Monet weights are f32 tensors"))
    }

    /// Every trainable variable (for the optimiser), router first.
    pub fn vars(&self) -> Vec<Var> {
        self.named().into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// The output for `x` (`[B, d_in]`) given the gates' factors `g1`, `g2` (`[B, H, E]`), by the
    /// factorised sums (never forming an expert).
    pub fn forward_with(&self, x: &Tensor, g1: &Tensor, g2: &Tensor) -> Result<Tensor> {
        let (bsz, e) = (x.dim(0)?, self.spec.experts);
        // Σ_h g[b,h,i]: each sub-expert's total weight.
        let (s1, s2) = (g1.sum(1)?, g2.sum(1)?);
        // hidden[b, i, :] = ψ(x·u_i + c_i).
        let hidden = |u: &Var, c: &Var| -> Result<Tensor> {
            let pre = x.matmul(u.as_tensor())?.broadcast_add(c.as_tensor())?;
            let k = pre.dim(1)? / e;
            Ok(pre.relu()?.sqr()?.reshape((bsz, e, k))?)
        };
        // Σ_{i,j} Σ_h ga[b,h,i]·gb[b,h,j]·h[b,i,:] arranged by j: gbᵀ·(ga·h) over the heads.
        let cross = |h: &Tensor, ga: &Tensor, gb: &Tensor| -> Result<Tensor> {
            let per_head = ga.matmul(h)?; // [B, H, k]
            Ok(gb.transpose(1, 2)?.contiguous()?.matmul(&per_head)?) // [B, E, k]
        };
        let flat = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((bsz, ()))?) };
        let y = match &self.experts {
            Experts::Horizontal { u, c, v, b } => {
                let h = hidden(u, c)?;
                let mixed = flat(cross(&h, g1, g2)?)?;
                (mixed.matmul(v.as_tensor())? + s2.matmul(b.as_tensor())?)?
            }
            Experts::Vertical { u, c, v, b } => {
                let h1 = hidden(&u[0], &c[0])?;
                let h2 = hidden(&u[1], &c[1])?;
                let own = |h: &Tensor, s: &Tensor| -> Result<Tensor> {
                    flat(h.broadcast_mul(&s.unsqueeze(D::Minus1)?)?)
                };
                // Top half, indexed by i: v11 on h1 (own side), v12 on h2 routed j → i.
                let top = (own(&h1, &s1)?.matmul(v[0].as_tensor())?
                    + flat(cross(&h2, g2, g1)?)?.matmul(v[1].as_tensor())?
                    + s1.matmul(b[0].as_tensor())?)?;
                // Bottom half, indexed by j: v21 on h1 routed i → j, v22 on h2 (own side).
                let bottom = (flat(cross(&h1, g1, g2)?)?.matmul(v[2].as_tensor())?
                    + own(&h2, &s2)?.matmul(v[3].as_tensor())?
                    + s2.matmul(b[1].as_tensor())?)?;
                Tensor::cat(&[&top, &bottom], 1)?
            }
        };
        Ok(y)
    }

    /// Route with the running BatchNorm statistics (inference) and compute the output.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g1, g2) = self.router.route(x, false)?;
        self.forward_with(x, &g1, &g2)
    }

    /// The same layer for inputs `input` times smaller and outputs `output` times smaller than the
    /// ones it was trained on (the job's activation scaling, folded back): ψ's input and the
    /// router's logits are unchanged, the output is divided by `output`.
    pub fn folded(&self, input: f32, output: f32) -> Result<Monet> {
        let scaled = |v: &Var, by: f32| -> Result<Var> {
            Ok(Var::from_tensor(&v.as_tensor().affine(by as f64, 0.0)?)?)
        };
        let copy = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?)?) };
        let router = Router {
            w: [scaled(&self.router.w[0], input)?, scaled(&self.router.w[1], input)?],
            running_mean: self.router.running_mean.clone(),
            running_var: self.router.running_var.clone(),
            heads: self.router.heads,
            experts: self.router.experts,
            sigma: self.router.sigma,
        };
        let out = 1.0 / output;
        let experts = match &self.experts {
            Experts::Horizontal { u, c, v, b } => Experts::Horizontal {
                u: scaled(u, input)?,
                c: copy(c)?,
                v: scaled(v, out)?,
                b: scaled(b, out)?,
            },
            Experts::Vertical { u, c, v, b } => Experts::Vertical {
                u: [scaled(&u[0], input)?, scaled(&u[1], input)?],
                c: [copy(&c[0])?, copy(&c[1])?],
                v: [scaled(&v[0], out)?, scaled(&v[1], out)?, scaled(&v[2], out)?, scaled(&v[3], out)?],
                b: [scaled(&b[0], out)?, scaled(&b[1], out)?],
            },
        };
        Ok(Monet { spec: self.spec.clone(), router, experts, sparse: Default::default() })
    }

    /// Named weights, in a fixed order (the file layout of [`io`]).
    pub fn named(&self) -> Vec<(&'static str, &Var)> {
        let mut out = vec![("router.w1", &self.router.w[0]), ("router.w2", &self.router.w[1])];
        match &self.experts {
            Experts::Horizontal { u, c, v, b } => out.extend([("u", u), ("c", c), ("v", v), ("b", b)]),
            Experts::Vertical { u, c, v, b } => out.extend([
                ("u1", &u[0]),
                ("u2", &u[1]),
                ("c1", &c[0]),
                ("c2", &c[1]),
                ("v11", &v[0]),
                ("v12", &v[1]),
                ("v21", &v[2]),
                ("v22", &v[3]),
                ("b1", &b[0]),
                ("b2", &b[1]),
            ]),
        }
        out
    }

    /// The experts active on each token and their gates, as sparse codes over the E² features:
    /// feature i·E + j with value Σ_h g1[h,i]·g2[h,j], where that exceeds the floor
    /// ([`sparse::GATE_FLOOR`] of the token's total gate mass).
    pub fn codes(&self, g1: &Tensor, g2: &Tensor) -> Result<Codes> {
        let (_, heads, e) = g1.dims3()?;
        let (a, b) = (g1.flatten_all()?.to_vec1::<f32>()?, g2.flatten_all()?.to_vec1::<f32>()?);
        Ok(sparse::codes(&sparse::Routes::from_dense(&a, &b, heads, e), e))
    }

    /// The output and the active experts of `x` (`[B, d_in]`) by the sparse forward, routed with
    /// the running statistics.
    pub fn reconstruct_sparse(&self, x: &[f32]) -> (Codes, Vec<f32>) {
        let (lay, params) = self.cached();
        let norm =
            sparse::Norm { mean: self.router.running_mean.clone(), var: self.router.running_var.clone() };
        let mut codes = Codes { offsets: vec![0], ..Codes::default() };
        let mut out = Vec::with_capacity(x.len() / lay.d * lay.o);
        let (mut z, mut f, mut y) = (Default::default(), sparse::Forward::default(), Vec::new());
        for chunk in x.chunks(ENCODE_CHUNK * lay.d) {
            sparse::forward(params, lay, chunk, &norm, &mut z, &mut f, &mut y);
            let c = sparse::codes(&f.routes, lay.e);
            for t in 0..c.tokens() {
                let (f, v) = c.row(t);
                let row: Vec<(u32, f32)> = f.iter().copied().zip(v.iter().copied()).collect();
                codes.push_row(&row);
            }
            out.extend_from_slice(&y);
        }
        (codes, out)
    }
}

/// Tokens routed per batch at inference (bounds the `[tokens, 2·H·E]` logits).
const ENCODE_CHUNK: usize = 4096;

impl super::Dictionary for Monet {
    fn d_in(&self) -> usize {
        self.spec.d_in
    }

    fn d_out(&self) -> usize {
        self.spec.d_out
    }

    fn n_features(&self) -> usize {
        self.spec.n_experts()
    }

    fn encode(&self, x: &[f32]) -> Codes {
        self.reconstruct(x).0
    }

    fn reconstruct(&self, x: &[f32]) -> (Codes, Vec<f32>) {
        self.reconstruct_sparse(x)
    }

    fn save(&self, dir: &std::path::Path) -> Result<()> {
        io::save(self, &super::io::SaeMeta::default(), None, dir)
    }

    fn experts(&self) -> Option<super::ExpertLayout> {
        Some(super::ExpertLayout { n_experts: self.spec.n_experts(), features_per_expert: 1 })
    }

    /// Each expert is a feature, its gate the feature's activation.
    fn route(&self, x: &[f32]) -> Option<Codes> {
        Some(self.encode(x))
    }

    fn mean_feature_outputs(&self, inputs: &[Vec<f32>]) -> Option<Vec<f32>> {
        use rayon::prelude::*;
        let (d, o, e) = (self.spec.d_in, self.spec.d_out, self.spec.experts);
        // The weights are this layer's own variables; extracting them cannot fail.
        let w = explicit::ExpertWeights::of(self).expect("Monet weights are f32 tensors");
        let rows: Vec<Vec<f32>> = inputs
            .par_iter()
            .enumerate()
            .map(|(f, xs)| {
                let mut mean = vec![0.0f32; o];
                let n = xs.len() / d;
                for x in xs.chunks(d) {
                    let y = explicit::expert_with(self, &w, x, f / e, f % e);
                    mean.iter_mut().zip(y).for_each(|(m, v)| *m += v / n as f32);
                }
                mean
            })
            .collect();
        Some(rows.concat())
    }
}
