//! A set of transcoders that replaces every MLP of a model: what attribution graphs read.
//!
//! Two kinds fill it, both dictionaries of the store:
//! - per-layer transcoders (`plt`): one dictionary per layer, reading `blocks.L.ln2.hook_normalized`
//!   and writing `blocks.L.hook_mlp_out` (SAE family, `train-sae --input-hook`; a skip transcoder
//!   adds a learned linear map of its input);
//! - a cross-layer transcoder (`clt`, Ameisen et al. 2025): one dictionary whose layer-L features
//!   read layer L's MLP input and write the MLP outputs of layer L and every later layer.
//!
//! Either way, layer L's replacement MLP output is
//! `Σ_{l ≤ L} Σ_f a_{l,f} · w_dec[l][L − l][f] + b_dec[L] + W_skip[L] · x_L`, with
//! `a_{l,f} = σ(w_enc[l][f] · x_l + b_enc[l][f])` the activation of feature f of layer l on that
//! position's MLP input `x_l` (σ: TopK, JumpReLU or ReLU).

mod clt;
mod plt;

use anyhow::{Result, bail};

use super::kernels::Codes;

/// How a layer's pre-activations become activations (at inference, one token at a time).
#[derive(Clone, Debug, PartialEq)]
pub enum Activation {
    /// Each token keeps its k largest positive pre-activations.
    TopK { k: usize },
    /// Feature f is active when its pre-activation exceeds `threshold[f]`, with that value.
    JumpRelu { threshold: Vec<f32> },
    /// Every positive pre-activation.
    Relu,
}

/// The transcoder features of one layer: they read that layer's MLP input.
#[derive(Clone, Debug, PartialEq)]
pub struct TranscoderLayer {
    pub layer: usize,
    pub n_features: usize,
    /// `[n_features, d_model]` row-major: row f is feature f's encoder vector.
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub activation: Activation,
    /// The decoders to the MLP outputs of layers `layer`, `layer + 1`, … (one for a per-layer
    /// transcoder; `n_layers − layer` for a CLT), each `[n_features, d_model]` row-major.
    pub w_dec: Vec<Vec<f32>>,
    /// The bias added to this layer's MLP output, `[d_model]`.
    pub b_dec: Vec<f32>,
    /// The skip connection of this layer, `[d_model (out), d_model (in)]` row-major
    /// (out = W_skip · x); `None` without one.
    pub w_skip: Option<Vec<f32>>,
}

/// Transcoders for every layer of a model, in layer order.
#[derive(Clone, Debug, PartialEq)]
pub struct TranscoderSet {
    /// `plt` or `clt`.
    pub kind: String,
    /// The dictionaries it was loaded from (one per layer, or the CLT's one name).
    pub names: Vec<String>,
    pub d_model: usize,
    pub layers: Vec<TranscoderLayer>,
}

impl TranscoderSet {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Load the transcoders `names` of `store` as one set covering each of the model's
    /// `n_layers` layers exactly once: one CLT, or per-layer transcoders (any order). Errors
    /// name a missing or doubled layer, a dictionary that is not a transcoder of an MLP, and
    /// one whose width is not the model's.
    pub fn from_store(
        store: &loupe_store::Store,
        names: &[String],
        n_layers: usize,
    ) -> Result<TranscoderSet> {
        let manifest = store.manifest();
        for name in names {
            if !manifest.dictionaries.contains_key(name) {
                let known: Vec<&str> = manifest.dictionaries.keys().map(String::as_str).collect();
                let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                bail!("store {} has no dictionary named {name:?} (it has: {known})", store.root().display());
            }
        }
        match names {
            [one] if manifest.dictionaries[one].kind == "clt" => clt::load(store, one, n_layers),
            _ => plt::load(store, names, n_layers),
        }
    }

    /// Pre-activations of layer `layer`'s features on `x` (`[tokens, d_model]`), `[tokens, n]`.
    pub fn pre_activations(&self, layer: usize, x: &[f32]) -> Vec<f32> {
        let l = &self.layers[layer];
        let (d, n) = (self.d_model, l.n_features);
        let mut out = vec![0f32; x.len() / d * n];
        for (row, pre) in x.chunks_exact(d).zip(out.chunks_exact_mut(n)) {
            for (f, p) in pre.iter_mut().enumerate() {
                let w = &l.w_enc[f * d..(f + 1) * d];
                *p = w.iter().zip(row).map(|(a, b)| a * b).sum::<f32>() + l.b_enc[f];
            }
        }
        out
    }

    /// The active features of layer `layer` on each row of `x` (`[tokens, d_model]`).
    pub fn activations(&self, layer: usize, x: &[f32]) -> Codes {
        let l = &self.layers[layer];
        let n = l.n_features;
        let pre = self.pre_activations(layer, x);
        let mut codes = Codes { offsets: vec![0], ..Codes::default() };
        for row in pre.chunks_exact(n) {
            let mut active: Vec<(u32, f32)> = match &l.activation {
                Activation::Relu => {
                    row.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(f, v)| (f as u32, *v)).collect()
                }
                Activation::JumpRelu { threshold } => row
                    .iter()
                    .enumerate()
                    .filter(|(f, v)| **v > threshold[*f])
                    .map(|(f, v)| (f as u32, *v))
                    .collect(),
                Activation::TopK { k } => {
                    let mut all: Vec<(u32, f32)> =
                        row.iter().enumerate().map(|(f, v)| (f as u32, *v)).collect();
                    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    all.truncate(*k);
                    all.retain(|(_, v)| *v > 0.0);
                    all
                }
            };
            active.sort_by_key(|(f, _)| *f);
            codes.push_row(&active);
        }
        codes
    }

    /// The replacement MLP output of layer `layer` (`[tokens, d_model]`) given every layer's
    /// MLP input up to it (`inputs[l]`, `[tokens, d_model]`, for l ≤ `layer`): the decoded
    /// features of this and (CLT) earlier layers, the bias and the skip connection.
    pub fn output(&self, layer: usize, inputs: &[&[f32]]) -> Vec<f32> {
        let d = self.d_model;
        let tokens = inputs[layer].len() / d;
        let mut out: Vec<f32> = self.layers[layer].b_dec.iter().copied().cycle().take(tokens * d).collect();
        for (source, l) in self.layers.iter().enumerate().take(layer + 1) {
            let Some(w_dec) = l.w_dec.get(layer - source) else { continue };
            let codes = self.activations(source, inputs[source]);
            for t in 0..tokens {
                let (features, values) = codes.row(t);
                for (&f, &a) in features.iter().zip(values) {
                    let w = &w_dec[f as usize * d..(f as usize + 1) * d];
                    out[t * d..(t + 1) * d].iter_mut().zip(w).for_each(|(o, w)| *o += a * w);
                }
            }
        }
        if let Some(w_skip) = &self.layers[layer].w_skip {
            for (x, o) in inputs[layer].chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                for (i, o) in o.iter_mut().enumerate() {
                    *o += w_skip[i * d..(i + 1) * d].iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
                }
            }
        }
        out
    }
}
