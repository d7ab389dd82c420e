//! The weights of an SAE and its batch-free inference rule.
//!
//! Inference, per variant: TopK and g-SAE keep each token's k largest positive pre-activations
//! (g-SAE has no gradient at inference, as in its paper); Mutual Choice and Feature Choice keep the
//! pre-activations above the thresholds learned in training (`threshold`, one per feature; Mutual
//! Choice's are all equal). Trained with scale-free selection (the default), their thresholds are
//! *relative*: feature f is active when `pre_f > θ_f · ‖x − b_dec‖`; SAELens has no such rule, so
//! those SAEs are saved with Loupe's own architecture name `relative_jumprelu`. With absolute
//! thresholds (`pre_f > θ_f`, trained with `scale_free = false`) the rule is SAELens' `jumprelu`
//! and the SAE loads in SAELens. JumpReLU SAEs (trained or imported) use the absolute rule;
//! standard (ReLU) SAEs keep every positive pre-activation.

use std::path::Path;

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::kernels::{self, Codes};
use super::{Dictionary, Variant};

/// Tokens encoded per GEMM at inference (bounds the `[tokens, n_features]` scratch).
const ENCODE_CHUNK: usize = 1024;

/// What an SAE is, independent of its weights' values.
#[derive(Clone, Debug, PartialEq)]
pub struct SaeSpec {
    pub variant: Variant,
    pub d_in: usize,
    pub n_features: usize,
    /// Active features per token (TopK, g-SAE) or mean active features per token (the others).
    pub k: usize,
}

/// An SAE's weights; see the module docs of [`super`] for the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Sae {
    pub spec: SaeSpec,
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// Per-feature inference thresholds (Mutual Choice, Feature Choice, JumpReLU).
    pub threshold: Option<Vec<f32>>,
    /// Whether `threshold` is relative to ‖x − b_dec‖ (scale-free Mutual and Feature Choice).
    pub threshold_relative: bool,
}

impl Sae {
    /// Tied initialisation: decoder rows drawn from a Gaussian and normalised to unit length, the
    /// encoder equal to the decoder, biases zero (b_dec is set from data by the trainer).
    pub fn init(spec: SaeSpec, seed: u64) -> Sae {
        let (n, d) = (spec.n_features, spec.d_in);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w_dec: Vec<f32> = (0..n * d).map(|_| StandardNormal.sample(&mut rng)).collect();
        w_dec.chunks_mut(d).for_each(normalize);
        let threshold = spec.variant.uses_threshold().then(|| vec![f32::INFINITY; n]);
        let (w_enc, b_enc, b_dec) = (w_dec.clone(), vec![0.0; n], vec![0.0; d]);
        Sae { w_enc, b_enc, w_dec, b_dec, threshold, threshold_relative: false, spec }
    }

    /// The same SAE for activations `scale` times smaller than the ones it was trained on: it
    /// encodes raw `x` exactly as this one encodes `scale·x` (same codes) and decodes to
    /// 1/`scale` of this one's reconstruction. Decoder rows are then no longer unit norm.
    /// (Relative thresholds scale too: ‖scale·x − b_dec‖ = scale·‖x − b_dec/scale‖.)
    pub fn folded(&self, scale: f32) -> Sae {
        if scale == 1.0 {
            return self.clone();
        }
        let mut out = self.clone();
        out.w_enc.iter_mut().for_each(|w| *w *= scale);
        out.w_dec.iter_mut().for_each(|w| *w /= scale);
        out.b_dec.iter_mut().for_each(|b| *b /= scale);
        if let Some(t) = out.threshold.as_mut().filter(|_| self.threshold_relative) {
            t.iter_mut().for_each(|t| *t *= scale);
        }
        out
    }

    /// The same SAE for an encoder that reads `x` rather than `x − b_dec` (SAELens'
    /// `apply_b_dec_to_input: false`): `w_enc·x + b_enc = w_enc·(x − b_dec) + (b_enc + w_enc·b_dec)`,
    /// so b_enc absorbs `w_enc·b_dec` (summed in f64). Every pre-activation keeps its value, so
    /// top-k selections and absolute thresholds stay as they are; relative thresholds, measured
    /// against ‖x − b_dec‖, cannot be folded this way and are refused.
    pub fn fold_input_bias(&mut self) -> Result<()> {
        if self.threshold_relative {
            bail!("relative thresholds are measured against x − b_dec; they cannot read x itself");
        }
        let d = self.spec.d_in;
        for (row, b) in self.w_enc.chunks(d).zip(self.b_enc.iter_mut()) {
            let shift: f64 = row.iter().zip(&self.b_dec).map(|(w, c)| *w as f64 * *c as f64).sum();
            *b = (*b as f64 + shift) as f32;
        }
        Ok(())
    }

    /// The same SAE without SAELens' `rescale_acts_by_decoder_norm` (TopK): SAELens multiplies
    /// feature f's pre-activation by ‖W_dec[f]‖ before selecting and divides the activation by it
    /// again before decoding. Folded: encoder row and b_enc times the norm, decoder row divided by
    /// it (SAELens' own `fold_W_dec_norm`), giving the same codes and reconstructions. A feature
    /// with a zero decoder row never fires (SAELens' pre-activation is 0 there). For SAEs without
    /// thresholds (SAELens has the setting on TopK only).
    pub fn fold_decoder_norms(&mut self) -> Result<()> {
        if self.threshold.is_some() {
            bail!("decoder-norm rescaling is a TopK setting; this SAE has thresholds");
        }
        let d = self.spec.d_in;
        let rows = self.w_enc.chunks_mut(d).zip(self.w_dec.chunks_mut(d)).zip(self.b_enc.iter_mut());
        for ((enc, dec), b) in rows {
            let norm = dec.iter().map(|v| *v as f64 * *v as f64).sum::<f64>().sqrt();
            if norm == 0.0 {
                // Pre-activation 0: TopK keeps positive values only.
                enc.fill(0.0);
                *b = 0.0;
                continue;
            }
            enc.iter_mut().for_each(|w| *w = (*w as f64 * norm) as f32);
            dec.iter_mut().for_each(|w| *w = (*w as f64 / norm) as f32);
            *b = (*b as f64 * norm) as f32;
        }
        Ok(())
    }

    /// Check shapes and values (a loaded file may be anything).
    pub fn validate(&self) -> Result<()> {
        let (n, d) = (self.spec.n_features, self.spec.d_in);
        let shapes = [
            ("W_enc", self.w_enc.len(), n * d),
            ("b_enc", self.b_enc.len(), n),
            ("W_dec", self.w_dec.len(), n * d),
            ("b_dec", self.b_dec.len(), d),
        ];
        for (name, got, want) in shapes {
            if got != want {
                bail!("{name} has {got} values, expected {want} (d_in {d}, n_features {n})");
            }
        }
        for (name, values) in
            [("W_enc", &self.w_enc), ("b_enc", &self.b_enc), ("W_dec", &self.w_dec), ("b_dec", &self.b_dec)]
        {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                // Named as in the SAELens file: W_enc is [d_in, d_sae] there (held transposed
                // here), W_dec [d_sae, d_in].
                let at = match name {
                    "W_enc" => format!("[{}, {}]", i % d, i / d),
                    "W_dec" => format!("[{}, {}]", i / d, i % d),
                    _ => format!("[{i}]"),
                };
                bail!("{name}{at} is {} (weights must be finite)", values[i]);
            }
        }
        if let Some(t) = &self.threshold {
            if t.len() != n {
                bail!("threshold has {} values, expected {n}", t.len());
            }
            if t.iter().any(|v| v.is_nan()) {
                bail!("threshold holds NaN");
            }
        } else if self.spec.variant.uses_threshold() || self.threshold_relative {
            bail!("a {} SAE needs a threshold tensor", self.spec.variant);
        }
        Ok(())
    }

    /// `pre[t, f] = w_enc[f] · (x[t] − b_dec)` (no b_enc) into `pre` (`[tokens, n]`), with `xc`
    /// receiving `x − b_dec`.
    pub fn pre_acts(&self, x: &[f32], xc: &mut Vec<f32>, pre: &mut Vec<f32>) {
        let d = self.spec.d_in;
        let tokens = x.len() / d;
        xc.clear();
        xc.extend_from_slice(x);
        xc.par_chunks_mut(d).for_each(|row| row.iter_mut().zip(&self.b_dec).for_each(|(v, b)| *v -= b));
        pre.resize(tokens * self.spec.n_features, 0.0);
        kernels::matmul_nt(xc, &self.w_enc, pre, tokens, self.spec.n_features, d, false);
    }

    /// Inference codes of one chunk's pre-activations (without b_enc); `xc` is `x − b_dec`.
    fn select_inference(&self, pre: &[f32], xc: &[f32], out: &mut Codes) {
        let (n, d) = (self.spec.n_features, self.spec.d_in);
        let rows: Vec<Vec<(u32, f32)>> = pre
            .par_chunks(n)
            .zip(xc.par_chunks(d))
            .map_init(Vec::new, |scratch, (row, xc)| {
                let mut sel = Vec::new();
                match &self.threshold {
                    Some(th) => {
                        let unit = if self.threshold_relative { kernels::dot(xc, xc).sqrt() } else { 1.0 };
                        for (f, ((p, b), t)) in row.iter().zip(&self.b_enc).zip(th).enumerate() {
                            let v = p + b;
                            if v > 0.0 && v > *t * unit {
                                sel.push((f as u32, v));
                            }
                        }
                    }
                    None if self.spec.variant == Variant::Relu => {
                        for (f, (p, b)) in row.iter().zip(&self.b_enc).enumerate() {
                            if p + b > 0.0 {
                                sel.push((f as u32, p + b));
                            }
                        }
                    }
                    None => kernels::topk_row(row, Some(&self.b_enc), self.spec.k, &mut sel, scratch),
                }
                sel.sort_unstable_by_key(|e| e.0);
                sel
            })
            .collect();
        for row in &rows {
            out.push_row(row);
        }
    }
}

impl Sae {
    /// Inference codes of `x`, the encoder reading `x − b_dec` (`subtract_b_dec`, an SAE) or `x`
    /// itself (a transcoder, whose b_dec is its output bias).
    pub fn encode_input(&self, x: &[f32], subtract_b_dec: bool) -> Codes {
        let d = self.spec.d_in;
        assert!(x.len().is_multiple_of(d), "encode: input is not [tokens, d_in]");
        let mut codes = Codes { offsets: vec![0], ..Codes::default() };
        let (mut xc, mut pre) = (Vec::new(), Vec::new());
        for chunk in x.chunks(ENCODE_CHUNK * d) {
            if subtract_b_dec {
                self.pre_acts(chunk, &mut xc, &mut pre);
            } else {
                xc.clear();
                xc.extend_from_slice(chunk);
                pre.resize(chunk.len() / d * self.spec.n_features, 0.0);
                kernels::matmul_nt(
                    &xc,
                    &self.w_enc,
                    &mut pre,
                    chunk.len() / d,
                    self.spec.n_features,
                    d,
                    false,
                );
            }
            self.select_inference(&pre, &xc, &mut codes);
        }
        codes
    }

    /// Reconstruction of `codes` into `out` (`[tokens, d_in]`): b_dec + Σ z·W_dec[f].
    pub fn decode(&self, codes: &Codes, out: &mut [f32]) {
        codes.decode_into(&self.w_dec, self.spec.d_in, Some(&self.b_dec), out);
    }
}

impl Dictionary for Sae {
    fn d_in(&self) -> usize {
        self.spec.d_in
    }

    fn n_features(&self) -> usize {
        self.spec.n_features
    }

    fn encode(&self, x: &[f32]) -> Codes {
        self.encode_input(x, true)
    }

    fn reconstruct(&self, x: &[f32]) -> (Codes, Vec<f32>) {
        let codes = self.encode(x);
        let mut out = vec![0.0; x.len()];
        self.decode(&codes, &mut out);
        (codes, out)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        super::io::save_sae(self, &super::io::SaeMeta::default(), dir)
    }

    fn decoder_directions(&self) -> Option<&[f32]> {
        Some(&self.w_dec)
    }
}

/// Scale `row` to unit length (a zero row stays zero).
#[inline(always)]
pub fn normalize(row: &mut [f32]) {
    let norm = kernels::dot(row, row).sqrt();
    if norm > 0.0 {
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

/// Geometric median of the rows of `x` (`[rows, d]`) by Weiszfeld's iterations, starting at the
/// mean: at most 100 iterations, stopping when a step moves less than 1e-6 of the estimate's norm.
pub fn geometric_median(x: &[f32], d: usize) -> Vec<f32> {
    let rows = x.len() / d;
    let mut y = vec![0.0f64; d];
    for row in x.chunks(d) {
        y.iter_mut().zip(row).for_each(|(a, b)| *a += *b as f64);
    }
    y.iter_mut().for_each(|v| *v /= rows.max(1) as f64);
    for _ in 0..100 {
        let mut num = vec![0.0f64; d];
        let mut den = 0.0f64;
        for row in x.chunks(d) {
            let dist = row.iter().zip(&y).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt();
            let w = 1.0 / dist.max(1e-8);
            num.iter_mut().zip(row).for_each(|(n, v)| *n += w * *v as f64);
            den += w;
        }
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let step = next.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let norm = next.iter().map(|v| v * v).sum::<f64>().sqrt();
        y = next;
        if step < 1e-6 * norm.max(1e-12) {
            break;
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}
