//! The local replacement model of one prompt, as circuit-tracer builds it: the model's frozen
//! linear form ([`loupe_model::frozen`]) with every MLP replaced by its transcoders' output plus
//! an error term, so that it reproduces the real model's activations and logits exactly.
//!
//! Layer L's MLP output at position p ≥ 1 is
//! `Σ_{l ≤ L} Σ_f a_{l,p,f} · w_dec[l][L − l][f] + error[L][p] + b_dec[L] + W_skip[L] · x_L[p]`
//! with `a` the transcoder activations on the real MLP inputs (the sources), `error` = real
//! `hook_mlp_out` − the transcoders' output (a source), `b_dec` a constant and the skip
//! connection a linear path (gradients go through it, as in circuit-tracer). Position 0 (BOS)
//! has no feature or error nodes — circuit-tracer zeroes them, their activations dwarf the rest
//! —: its MLP output is a constant (the real one less its skip term) plus the skip term.

use std::ops::Range;

use anyhow::{Result, bail};
use candle_core::{D, Device, Tensor};
use loupe_dict::transcoder::{Activation, TranscoderSet};
use loupe_model::frozen::{Frozen, FrozenRun};

/// An active feature (a node candidate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Active {
    pub layer: usize,
    pub pos: usize,
    pub feature: u32,
    pub activation: f32,
}

/// What the frozen replacement model is fed: the sources.
#[derive(Clone, Debug)]
pub struct Sources {
    /// `[seq, d_model]`, `hook_embed`.
    pub embed: Tensor,
    /// One per entry of [`Replacement::active`].
    pub activations: Vec<f32>,
    /// Per layer `[seq, d_model]`.
    pub errors: Vec<Tensor>,
}

/// A target whose incoming edges are computed: a feature's pre-activation (encoder vector at
/// its layer's `ln2.hook_normalized`, plus b_enc) or a demeaned logit (demeaned unembedding row
/// at the final norm's output, `layer` = n_layers).
#[derive(Clone, Debug)]
pub struct Target {
    pub layer: usize,
    pub pos: usize,
    pub vector: Vec<f32>,
    pub constant: f32,
}

/// The replacement model of one prompt.
pub struct Replacement {
    pub frozen: Frozen,
    pub n_layers: usize,
    pub d_model: usize,
    pub seq: usize,
    /// Active features at positions ≥ 1, ordered by (layer, position, feature).
    pub active: Vec<Active>,
    /// Per layer, its features' range of `active`.
    pub layer_ranges: Vec<Range<usize>>,
    /// Per layer, `[seq, d_model]` (row 0 zero).
    pub errors: Vec<Tensor>,
    /// Per layer, `[seq, d_model]`: the MLP output's constant part.
    consts: Vec<Tensor>,
    /// Per layer, `[d_model (out), d_model (in)]`.
    pub skips: Vec<Option<Tensor>>,
    /// Per layer, the decoders `[n_features, d_model]` row-major (to this layer and, CLT,
    /// later ones).
    decoders: Vec<Vec<Vec<f32>>>,
    /// Per layer, the encoder `[n_features, d_model]`.
    encoders: Vec<Tensor>,
}

impl Replacement {
    /// The replacement model of the prompt `frozen` was made on, through `transcoders`.
    pub fn new(frozen: Frozen, transcoders: &TranscoderSet) -> Result<Replacement> {
        let (n_layers, d, seq) = (frozen.n_layers(), frozen.d_model, frozen.seq);
        if transcoders.n_layers() != n_layers || transcoders.d_model != d {
            bail!(
                "the transcoders cover {} layers of width {}, the model has {n_layers} of width {d}",
                transcoders.n_layers(),
                transcoders.d_model
            );
        }
        let dev = Device::Cpu;
        let mat = |v: &[f32], rows: usize| Tensor::from_slice(v, (rows, d), &dev);
        let mut active = Vec::new();
        let mut layer_ranges = Vec::with_capacity(n_layers);
        let mut encoders = Vec::with_capacity(n_layers);
        let mut decoders = Vec::with_capacity(n_layers);
        for (l, tl) in transcoders.layers.iter().enumerate() {
            let n = tl.n_features;
            let w_enc = mat(&tl.w_enc, n)?;
            let b_enc = Tensor::from_slice(&tl.b_enc, n, &dev)?;
            let pre = frozen.mlp_in[l].matmul(&w_enc.t()?)?.broadcast_add(&b_enc)?.to_vec2::<f32>()?;
            let start = active.len();
            for (pos, row) in pre.iter().enumerate().skip(1) {
                for (feature, activation) in activate(row, &tl.activation) {
                    active.push(Active { layer: l, pos, feature, activation });
                }
            }
            layer_ranges.push(start..active.len());
            encoders.push(w_enc);
            decoders.push(tl.w_dec.clone());
        }
        let skips: Vec<Option<Tensor>> = transcoders
            .layers
            .iter()
            .map(|tl| tl.w_skip.as_ref().map(|w| mat(w, d)).transpose())
            .collect::<candle_core::Result<_>>()?;
        let mut rep = Replacement {
            frozen,
            n_layers,
            d_model: d,
            seq,
            active,
            layer_ranges,
            errors: Vec::new(),
            consts: Vec::new(),
            skips,
            decoders,
            encoders,
        };
        let activations: Vec<f32> = rep.active.iter().map(|a| a.activation).collect();
        for (l, tl) in transcoders.layers.iter().enumerate() {
            let m = &rep.frozen.mlp_in[l];
            let skip = rep.skip(l, m)?;
            let b_dec = Tensor::from_slice(&tl.b_dec, (1, d), &dev)?;
            let features = rep.feature_output(l, &activations)?;
            let reconstruction = features.broadcast_add(&b_dec)?;
            let reconstruction = match &skip {
                Some(s) => (reconstruction + s)?,
                None => reconstruction,
            };
            let real = &rep.frozen.mlp_out[l];
            let error = (real - reconstruction)?;
            let zero_first = |t: &Tensor| -> candle_core::Result<Tensor> {
                Tensor::cat(&[Tensor::zeros((1, d), t.dtype(), &dev)?, t.narrow(0, 1, seq - 1)?], 0)
            };
            rep.errors.push(zero_first(&error)?);
            // Position 0: the real output less its skip term; later positions: b_dec.
            let first = match &skip {
                Some(s) => (real.narrow(0, 0, 1)? - s.narrow(0, 0, 1)?)?,
                None => real.narrow(0, 0, 1)?,
            };
            let rest = b_dec.broadcast_as((seq - 1, d))?.contiguous()?;
            rep.consts.push(Tensor::cat(&[first, rest], 0)?);
        }
        Ok(rep)
    }

    /// The skip term `W_skip · x` of layer `l` for `x` `[seq, d_model]`.
    fn skip(&self, l: usize, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(match &self.skips[l] {
            Some(w) => Some(x.matmul(&w.t()?)?),
            None => None,
        })
    }

    /// The decoded features writing layer `l`'s MLP output `[seq, d_model]` with the active
    /// features' activations `activations`.
    pub fn feature_output(&self, l: usize, activations: &[f32]) -> Result<Tensor> {
        let d = self.d_model;
        let mut out = vec![0f32; self.seq * d];
        for source in 0..=l {
            let Some(w) = self.decoders[source].get(l - source) else { continue };
            for i in self.layer_ranges[source].clone() {
                let a = &self.active[i];
                let row = &mut out[a.pos * d..(a.pos + 1) * d];
                let f = a.feature as usize;
                row.iter_mut().zip(&w[f * d..(f + 1) * d]).for_each(|(o, w)| *o += activations[i] * w);
            }
        }
        Ok(Tensor::from_vec(out, (self.seq, d), &Device::Cpu)?)
    }

    /// The decoders of layer `source`'s features into layer `source + offset`
    /// (`[n_features, d_model]` row-major), if they write it.
    pub fn decoder(&self, source: usize, offset: usize) -> Option<&[f32]> {
        self.decoders[source].get(offset).map(Vec::as_slice)
    }

    /// The sources of the real prompt.
    pub fn real_sources(&self) -> Sources {
        Sources {
            embed: self.frozen.embed.clone(),
            activations: self.active.iter().map(|a| a.activation).collect(),
            errors: self.errors.clone(),
        }
    }

    /// Every source zero: what is left are the constant terms.
    pub fn zero_sources(&self) -> Result<Sources> {
        Ok(Sources {
            embed: self.frozen.embed.zeros_like()?,
            activations: vec![0.0; self.active.len()],
            errors: self.errors.iter().map(|e| e.zeros_like()).collect::<candle_core::Result<_>>()?,
        })
    }

    /// The frozen replacement model's forward on `sources`.
    pub fn run(&self, sources: &Sources) -> Result<FrozenRun> {
        let mut mlp = |l: usize, m: &Tensor| -> Result<Tensor> {
            let mut out =
                ((self.feature_output(l, &sources.activations)? + &sources.errors[l])? + &self.consts[l])?;
            if let Some(s) = self.skip(l, m)? {
                out = (out + s)?;
            }
            Ok(out)
        };
        self.frozen.forward(&sources.embed, &mut mlp)
    }

    /// The value of `target` in a run.
    pub fn target_value(&self, run: &FrozenRun, target: &Target) -> Result<f32> {
        let x = if target.layer < self.n_layers { &run.mlp_in[target.layer] } else { &run.final_normed };
        let x = x.get(target.pos)?.to_vec1::<f32>()?;
        Ok(x.iter().zip(&target.vector).map(|(a, b)| a * b).sum::<f32>() + target.constant)
    }

    /// Active feature `i` as a target: its encoder vector and b_enc.
    pub fn feature_target(&self, i: usize, transcoders: &TranscoderSet) -> Result<Target> {
        let a = &self.active[i];
        Ok(Target {
            layer: a.layer,
            pos: a.pos,
            vector: self.encoders[a.layer].get(a.feature as usize)?.to_vec1()?,
            constant: transcoders.layers[a.layer].b_enc[a.feature as usize],
        })
    }

    /// The real pre-activation of active feature `i`.
    pub fn feature_pre_activation(&self, i: usize, transcoders: &TranscoderSet) -> Result<f32> {
        let a = &self.active[i];
        let x = self.frozen.mlp_in[a.layer].get(a.pos)?;
        let w = self.encoders[a.layer].get(a.feature as usize)?;
        Ok((x * w)?.sum_all()?.to_scalar::<f32>()? + transcoders.layers[a.layer].b_enc[a.feature as usize])
    }

    /// circuit-tracer's logit targets: the most probable tokens at the last position, at most
    /// `max_logits`, until their probability reaches `probability` (the token that crosses it
    /// included). Each with its probability, its demeaned logit (logit − mean logit) and its
    /// target (the unembedding row less the mean row).
    pub fn logit_targets(&self, max_logits: usize, probability: f32) -> Result<Vec<(u32, f32, f32, Target)>> {
        let logits = self.frozen.logits.to_vec1::<f32>()?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        order.truncate(max_logits.max(1));
        let probs: Vec<f32> =
            order.iter().map(|&t| (((logits[t as usize] - max) as f64).exp() / z) as f32).collect();
        let mut cum = 0.0;
        let below = probs.iter().take_while(|p| {
            cum += **p;
            cum < probability
        });
        let keep = (below.count() + 1).min(order.len());
        let mean_logit = logits.iter().map(|&l| l as f64).sum::<f64>() / logits.len() as f64;
        let mean_row = self.frozen.unembed.mean(0)?;
        let mut out = Vec::with_capacity(keep);
        for (&t, &p) in order.iter().zip(&probs).take(keep) {
            let row = self.frozen.unembed.get(t as usize)?;
            let target = Target {
                layer: self.n_layers,
                pos: self.seq - 1,
                vector: (row - &mean_row)?.to_vec1()?,
                constant: 0.0,
            };
            out.push((t, p, (logits[t as usize] as f64 - mean_logit) as f32, target));
        }
        Ok(out)
    }
}

/// The active features `(feature, activation)` of one position's pre-activations, by feature
/// (as [`TranscoderSet::activations`]: TopK keeps the k largest positive, ties to the lower
/// index; JumpReLU those above their threshold; ReLU the positive).
fn activate(row: &[f32], activation: &Activation) -> Vec<(u32, f32)> {
    let mut active: Vec<(u32, f32)> = match activation {
        Activation::Relu => {
            row.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(f, v)| (f as u32, *v)).collect()
        }
        Activation::JumpRelu { threshold } => {
            row.iter().enumerate().filter(|(f, v)| **v > threshold[*f]).map(|(f, v)| (f as u32, *v)).collect()
        }
        Activation::TopK { k } => {
            let mut all: Vec<(u32, f32)> = row.iter().enumerate().map(|(f, v)| (f as u32, *v)).collect();
            let k = (*k).min(all.len());
            if k == 0 {
                return Vec::new();
            }
            let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            all.select_nth_unstable_by(k - 1, cmp);
            all.truncate(k);
            all.retain(|(_, v)| *v > 0.0);
            all
        }
    };
    active.sort_by_key(|(f, _)| *f);
    active
}

/// `(a · b)` summed over the last dim of two `[.., d]` tensors.
pub fn dot_last(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.broadcast_mul(b)?.sum(D::Minus1)?)
}
