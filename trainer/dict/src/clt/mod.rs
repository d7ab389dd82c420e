//! Cross-layer transcoders (CLT; Ameisen et al. 2025, "Circuit Tracing"): one dictionary whose
//! layer-l features read layer l's MLP input `blocks.l.ln2.hook_normalized` and write the MLP
//! outputs `blocks.L.hook_mlp_out` of layer l and of every later layer L.
//!
//! - [`Clt`] (here): the weights and the inference rule. Layer i (of the CLT's `n_layers`,
//!   model layer `first_layer + i`) has `pre_i = W_enc_i x_i + b_enc_i`, each token keeping its
//!   `k` largest positive pre-activations (TopK per layer and token), and layer L's replacement
//!   MLP output is `ŷ_L = Σ_{i ≤ L} W_dec[i→L]ᵀ a_i + b_dec_L`;
//! - [`train`]: the training step (hand-written sparse forward/backward, Adam), [`job`]:
//!   `train-clt` over a store (evaluation, all-layer splicing, listing), [`files`]: the files.
//!
//! Layout (row-major `f32`), the same as circuit-tracer's: `w_enc[i]` `[n, d]`, `b_enc[i]` `[n]`,
//! `w_dec[i]` `[n, n_layers − i, d]` (feature f's decoders to layers i, i+1, … are contiguous, so
//! the per-feature backward pass streams one row), `b_dec[i]` `[d]`, and `threshold[i]` `[n]`:
//! JumpReLU thresholds that approximate TopK for readers without TopK (circuit-tracer has only
//! ReLU and JumpReLU); Loupe itself encodes with TopK.

pub mod files;
pub mod job;
pub mod train;

use anyhow::{Result, bail};
use rayon::prelude::*;

use super::kernels::{Codes, axpy, matmul_nt, topk_row};
use super::transcoder::{Activation, TranscoderLayer, TranscoderSet};

/// A cross-layer transcoder over model layers `first_layer .. first_layer + n_layers`.
#[derive(Clone, Debug, PartialEq)]
pub struct Clt {
    pub first_layer: usize,
    pub n_layers: usize,
    pub d: usize,
    /// Features per layer.
    pub n_features: usize,
    pub k: usize,
    pub w_enc: Vec<Vec<f32>>,
    pub b_enc: Vec<Vec<f32>>,
    pub w_dec: Vec<Vec<f32>>,
    pub b_dec: Vec<Vec<f32>>,
    pub threshold: Vec<Vec<f32>>,
}

impl Clt {
    /// Decoders written by layer `i`'s features (to layers i .. n_layers).
    pub fn targets(&self, i: usize) -> usize {
        self.n_layers - i
    }

    /// Shapes agree with the settings, every value is finite.
    pub fn validate(&self) -> Result<()> {
        let (l, n, d) = (self.n_layers, self.n_features, self.d);
        if l == 0 || n == 0 || d == 0 {
            bail!("a CLT needs at least one layer, feature and dimension");
        }
        if self.k == 0 || self.k > n {
            bail!("TopK k = {} must be between 1 and the features per layer, {n}", self.k);
        }
        let lens = |v: &Vec<Vec<f32>>| v.iter().map(Vec::len).collect::<Vec<_>>();
        let ok = lens(&self.w_enc) == vec![n * d; l]
            && lens(&self.b_enc) == vec![n; l]
            && lens(&self.b_dec) == vec![d; l]
            && lens(&self.threshold) == vec![n; l]
            && lens(&self.w_dec) == (0..l).map(|i| n * (l - i) * d).collect::<Vec<_>>();
        if !ok {
            bail!("the CLT's tensors do not have the shapes of {l} layers × {n} features × d {d}");
        }
        let all = [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec, &self.threshold];
        if all.iter().any(|v| v.iter().flatten().any(|x| !x.is_finite())) {
            bail!("the CLT has non-finite weights");
        }
        Ok(())
    }

    /// Pre-activations (with `b_enc`) of layer `i` on `x` (`[tokens, d]`), `[tokens, n]`.
    pub fn pre_activations(&self, i: usize, x: &[f32]) -> Vec<f32> {
        let (n, d) = (self.n_features, self.d);
        let tokens = x.len() / d;
        let mut pre = vec![0f32; tokens * n];
        matmul_nt(x, &self.w_enc[i], &mut pre, tokens, n, d, false);
        pre.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(&self.b_enc[i]).for_each(|(p, b)| *p += b));
        pre
    }

    /// Layer `i`'s active features on each row of `x`: the k largest positive pre-activations.
    pub fn encode(&self, i: usize, x: &[f32]) -> Codes {
        codes_topk(&self.pre_activations(i, x), self.n_features, self.k)
    }

    /// Every layer's replacement MLP output `[tokens, d]` from the layers' codes.
    pub fn decode(&self, codes: &[Codes]) -> Vec<Vec<f32>> {
        let (l, d) = (self.n_layers, self.d);
        let tokens = codes[0].tokens();
        let mut out = vec![0f32; tokens * l * d];
        self.decode_into(codes, &mut out);
        (0..l)
            .map(|layer| {
                (0..tokens).flat_map(|t| out[(t * l + layer) * d..(t * l + layer + 1) * d].to_vec()).collect()
            })
            .collect()
    }

    /// [`Clt::decode`] into `out`, `[tokens, n_layers, d]` (token-major).
    pub fn decode_into(&self, codes: &[Codes], out: &mut [f32]) {
        let (l, d) = (self.n_layers, self.d);
        out.par_chunks_mut(l * d).enumerate().for_each(|(t, o)| {
            for (layer, b) in self.b_dec.iter().enumerate() {
                o[layer * d..(layer + 1) * d].copy_from_slice(b);
            }
            for (i, c) in codes.iter().enumerate() {
                let w = (l - i) * d;
                let (fs, vs) = c.row(t);
                for (&f, &a) in fs.iter().zip(vs) {
                    axpy(a, &self.w_dec[i][f as usize * w..(f as usize + 1) * w], &mut o[i * d..]);
                }
            }
        });
    }

    /// Codes of every layer and every layer's output, from every layer's input `[tokens, d]`.
    pub fn forward(&self, inputs: &[&[f32]]) -> (Vec<Codes>, Vec<Vec<f32>>) {
        let codes: Vec<Codes> = (0..self.n_layers).map(|i| self.encode(i, inputs[i])).collect();
        let out = self.decode(&codes);
        (codes, out)
    }

    /// The same CLT reading inputs multiplied by `input[i]` and writing outputs multiplied by
    /// `output[L]` — with `1 / scale`, the weights for raw activations of a CLT trained on scaled
    /// ones. TopK picks the same features (pre-activations are unchanged).
    pub fn rescaled(&self, input: &[f32], output: &[f32]) -> Clt {
        let mut c = self.clone();
        let d = self.d;
        for (i, w) in c.w_enc.iter_mut().enumerate() {
            w.iter_mut().for_each(|v| *v *= input[i]);
        }
        for (i, w) in c.w_dec.iter_mut().enumerate() {
            let per = (self.n_layers - i) * d;
            for row in w.chunks_mut(per) {
                for (j, v) in row.iter_mut().enumerate() {
                    *v *= output[i + j / d];
                }
            }
        }
        for (b, s) in c.b_dec.iter_mut().zip(output) {
            b.iter_mut().for_each(|v| *v *= s);
        }
        c
    }

    /// As a [`TranscoderSet`] (kind `clt`) of model `n_model_layers` layers; it must cover them.
    pub fn to_set(&self, name: &str, n_model_layers: usize) -> Result<TranscoderSet> {
        if self.first_layer != 0 || self.n_layers != n_model_layers {
            bail!(
                "CLT {name} covers layers {}..={}, but the model has layers 0..={}: a transcoder set must \
                 replace every MLP",
                self.first_layer,
                self.first_layer + self.n_layers - 1,
                n_model_layers - 1
            );
        }
        let (n, d) = (self.n_features, self.d);
        let layers = (0..self.n_layers)
            .map(|i| {
                let t = self.targets(i);
                let w_dec = (0..t)
                    .map(|j| {
                        let mut w = Vec::with_capacity(n * d);
                        for f in 0..n {
                            w.extend_from_slice(&self.w_dec[i][(f * t + j) * d..(f * t + j + 1) * d]);
                        }
                        w
                    })
                    .collect();
                TranscoderLayer {
                    layer: i,
                    n_features: n,
                    w_enc: self.w_enc[i].clone(),
                    b_enc: self.b_enc[i].clone(),
                    activation: Activation::TopK { k: self.k },
                    w_dec,
                    b_dec: self.b_dec[i].clone(),
                    w_skip: None,
                }
            })
            .collect();
        Ok(TranscoderSet { kind: "clt".into(), names: vec![name.to_string()], d_model: d, layers })
    }
}

/// TopK codes of pre-activations `[tokens, n]` (k largest positive per row, feature order).
pub fn codes_topk(pre: &[f32], n: usize, k: usize) -> Codes {
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(n)
        .map_init(Vec::new, |scratch, row| {
            let mut out = Vec::with_capacity(k);
            topk_row(row, None, k, &mut out, scratch);
            out.sort_unstable_by_key(|e| e.0);
            out
        })
        .collect();
    Codes::from_rows(rows.iter().map(Vec::as_slice))
}

/// `--layers`: `all`, one layer `5`, or a range `0-17`, as (first, count) within `n_model` layers.
pub fn parse_layers(spec: &str, n_model: usize) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--layers {spec:?}: expected all, a layer, or a range like 0-17");
    let (a, b) = match spec.trim() {
        "all" => (0, n_model.saturating_sub(1)),
        s => match s.split_once('-') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let a: usize = s.parse().map_err(|_| bad())?;
                (a, a)
            }
        },
    };
    if a > b || b >= n_model {
        bail!("--layers {spec}: the model has layers 0..={}", n_model.saturating_sub(1));
    }
    Ok((a, b - a + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    pub(crate) fn random_clt(l: usize, n: usize, d: usize, k: usize, seed: u64) -> Clt {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut r =
            |len: usize, s: f32| (0..len).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s).collect::<Vec<_>>();
        Clt {
            first_layer: 0,
            n_layers: l,
            d,
            n_features: n,
            k,
            w_enc: (0..l).map(|_| r(n * d, 1.0)).collect(),
            b_enc: (0..l).map(|_| r(n, 0.3)).collect(),
            w_dec: (0..l).map(|i| r(n * (l - i) * d, 0.5)).collect(),
            b_dec: (0..l).map(|_| r(d, 0.2)).collect(),
            threshold: vec![vec![0.0; n]; l],
        }
    }

    #[test]
    fn transcoder_set_output_equals_the_clt_forward() {
        let (l, n, d, k, tokens) = (3, 40, 8, 5, 7);
        let clt = random_clt(l, n, d, k, 1);
        clt.validate().unwrap();
        let mut rng = StdRng::seed_from_u64(2);
        let xs: Vec<Vec<f32>> =
            (0..l).map(|_| (0..tokens * d).map(|_| rng.random::<f32>() - 0.5).collect()).collect();
        let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        let (codes, out) = clt.forward(&inputs);
        let set = clt.to_set("c", l).unwrap();
        for layer in 0..l {
            assert_eq!(set.activations(layer, inputs[layer]).feature, codes[layer].feature);
            let want = set.output(layer, &inputs);
            for (a, b) in want.iter().zip(&out[layer]) {
                assert!((a - b).abs() < 1e-4, "layer {layer}: {a} vs {b}");
            }
        }
        assert!(clt.to_set("c", l + 1).unwrap_err().to_string().contains("every MLP"));
    }

    #[test]
    fn rescaling_round_trips_the_outputs() {
        let (l, n, d, k) = (2, 16, 4, 3);
        let clt = random_clt(l, n, d, k, 3);
        let (s_in, s_out) = (vec![2.0, 0.5], vec![4.0, 0.25]);
        let raw = clt.rescaled(&s_in, &s_out.iter().map(|s| 1.0 / s).collect::<Vec<_>>());
        let x: Vec<Vec<f32>> =
            (0..l).map(|i| (0..3 * d).map(|j| (j as f32 * 0.37 + i as f32).sin()).collect()).collect();
        let scaled: Vec<Vec<f32>> =
            x.iter().zip(&s_in).map(|(x, s)| x.iter().map(|v| v * s).collect()).collect();
        let (_, a) = raw.forward(&x.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let (_, b) = clt.forward(&scaled.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for layer in 0..l {
            for (a, b) in a[layer].iter().zip(&b[layer]) {
                assert!((a * s_out[layer] - b).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn layers_parse() {
        assert_eq!(parse_layers("all", 18).unwrap(), (0, 18));
        assert_eq!(parse_layers("2-5", 18).unwrap(), (2, 4));
        assert_eq!(parse_layers("7", 18).unwrap(), (7, 1));
        assert!(parse_layers("3-18", 18).is_err());
        assert!(parse_layers("x", 18).is_err());
    }
}
