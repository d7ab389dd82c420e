//! One training step of a TopK-family SAE, computed sparsely.
//!
//! Forward: `pre = W_enc (x − b_dec)` is the one dense GEMM; the variant selects (token, feature)
//! pairs from `pre + b_enc` ([`super::topk`], [`super::mutual_choice`], [`super::feature_choice`],
//! [`super::gsae`]); the reconstruction `x̂ = b_dec + Σ z·W_dec[f]` touches only the selected rows.
//! Loss: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch, plus the auxiliaries:
//! - AuxK (α = `auxk_alpha`, 1/32): features that have not fired for `dead_tokens` tokens
//!   reconstruct the residual e = x − x̂ (detached) with each token's `k_aux` largest of their
//!   pre-activations, without b_dec; loss α·‖e − ê‖² / Σ‖x − x̄‖². Feature Choice uses aux_zipf
//!   (the same over under-used features, see [`super::feature_choice`]).
//! - Multi-TopK (`multi_topk`): the FVU of the top-4k reconstruction, weighted 1/8.
//! - ReLU and JumpReLU: their L1 / L0 penalty, with JumpReLU's threshold pseudo-gradients from
//!   the band pairs ([`super::jumprelu`]).
//!
//! A transcoder ([`super::transcode`], `cfg.transcoder`) reads `x` and reconstructs another hook's
//! `y`: `pre = W_enc x` (no b_dec on the input), `ŷ = b_dec + Σ z·W_dec[f] (+ W_skip x)`, FVU
//! against `y`; the encoder path adds nothing to b_dec's gradient. Its skip connection is one
//! dense GEMM each way: forward `x·W_skipᵀ`, gradient `Σ_t dX_t ⊗ x_t` over the reconstructions
//! with bias.
//!
//! Backward, per source of selected pairs (main codes, multi, aux), with upstream `dX = ∂loss/∂x̂`:
//! `dz = dX·W_dec[f]`, `∂W_dec[f] += z·dX`, `∂b_enc[f] += dz`, `∂W_enc[f] += dz·(x − b_dec)`,
//! and `∂b_dec = Σ dX (reconstructions with b_dec) − Σ_f ∂b_enc[f]·W_enc[f]` (through the
//! encoder's input: Σ over pairs of dz·W_enc[f], grouped by feature). All of it runs in one pass
//! over blocks of features in parallel: each feature's pairs (feature-major order) give its rows'
//! full gradients while its weight rows are in cache, and Adam (PyTorch's formulas) is applied in
//! the same pass: no `[batch, n_features]` gradient or decoder product exists, no weight gradient
//! is stored, and the weight rows are streamed once. Before Adam, the component of each
//! decoder row's gradient parallel to the row is removed; after it, rows are renormalised.

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::amx;
pub use super::config::{TrainConfig, default_lr};
use super::kernels::{self, Codes};
use super::loss::upstream;
pub use super::loss::{sq_dist, total_variance};
use super::sae::{Sae, SaeSpec, geometric_median};
use super::topk::select_among;
use super::transcode::Skip;
use super::{Variant, feature_choice, gsae, jumprelu, mutual_choice, topk};

/// Feature ranges of the feature-major decode (fixed, so results do not depend on threads).
const DECODE_PARTS: usize = 2;
/// Tokens per encoder GEMM + selection chunk for TopK: bounds the `[chunk, n]` pre-activation
/// buffer. Smaller chunks keep it in cache but make the GEMM repack W_enc once per chunk, which
/// costs more than it saves at d 640, n 16384 (BENCHMARKS.md).
const TOPK_CHUNK: usize = 4096;

/// What one step measured (on the batch, before the update).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub fvu: f32,
    /// Mean active features per token.
    pub l0: f32,
    /// Auxiliary loss (AuxK or aux_zipf; 0 when nothing was dead or under-used), or for ReLU and
    /// JumpReLU the sparsity penalty (L1 or L0).
    pub aux_loss: f32,
    /// Multi-TopK FVU at 4k (0 when off).
    pub multi_fvu: f32,
    /// Fraction of features that have not fired for `dead_tokens` tokens.
    pub dead_fraction: f32,
}

/// The loss of one batch, by term.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    pub fvu: f64,
    pub multi: f64,
    pub aux: f64,
    /// ReLU's L1 or JumpReLU's L0 penalty.
    pub sparsity: f64,
}

impl Loss {
    /// The optimised total: FVU + Multi-TopK FVU / 8 + auxiliary + sparsity penalty.
    pub fn total(&self) -> f64 {
        self.fvu + self.multi / 8.0 + self.aux + self.sparsity
    }
}

/// Dense loss gradients (for checks on small SAEs; training never builds them).
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// JumpReLU: the straight-through pseudo-gradient of each threshold θ_f (empty otherwise).
    pub threshold: Vec<f32>,
    /// A skip transcoder's W_skip `[d_out, d_in]` (empty otherwise).
    pub w_skip: Vec<f32>,
}

/// What a batch's selection tells the inference thresholds.
pub(super) enum Observed {
    None,
    Min(f32),
    Picked(Vec<feature_choice::Picked>, Vec<u32>),
}

/// Adam moments of one parameter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub(super) fn zeros(len: usize) -> Moments {
        Moments { m: vec![0.0; len], v: vec![0.0; len] }
    }
}

/// Everything a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    pub step: u64,
    pub tokens: u64,
    pub w_enc: Moments,
    pub b_enc: Moments,
    pub w_dec: Moments,
    pub b_dec: Moments,
    /// Training tokens since each feature last fired.
    pub since_fired: Vec<u64>,
    /// Moving average of each feature's firing frequency per token.
    pub density: Vec<f32>,
    /// JumpReLU: moments of the log-thresholds (empty for the other variants).
    pub threshold: Moments,
}

/// A TopK-family SAE being trained, with its optimiser state and scratch buffers.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub sae: Sae,
    pub state: TrainerState,
    /// A skip transcoder's W_skip and its Adam moments.
    pub skip: Option<Skip>,
    pub(super) scratch: Scratch,
    /// TopK selects on AMX ([`amx`]); on by default where available.
    amx: bool,
}

#[derive(Default)]
pub(super) struct Scratch {
    /// The encoder's input: `x − b_dec` (SAE) or `x` (transcoder).
    pub(super) xc: Vec<f32>,
    /// A skip transcoder's target for the sparse part, `y − W_skip x`.
    want: Vec<f32>,
    pre: Vec<f32>,
    amx: topk::AmxScratch,
    proj: Vec<f32>,
    xhat: Vec<f32>,
    /// Per-part buffers of the feature-major decode.
    partials: Vec<f32>,
    /// Per source: codes, upstream gradient `[tokens, d]`, dz per pair.
    pub(super) sources: Vec<Source>,
    /// JumpReLU: the pairs within ε/2 of their threshold.
    pub(super) band: Codes,
    /// JumpReLU: ∂loss/∂H of the L0 term for each token's pairs.
    pub(super) l0_weight: Vec<f32>,
}

#[derive(Default)]
pub(super) struct Source {
    pub(super) codes: Codes,
    pub(super) dx: Vec<f32>,
    /// Whether the reconstruction includes b_dec (main and multi do; aux does not).
    pub(super) with_bias: bool,
    /// Whether pairs count as firing (main only).
    pub(super) fires: bool,
    pub(super) active: bool,
    /// Added to every pair's dz (ReLU's L1 penalty: λ / Σ‖x − x̄‖²).
    pub(super) dz_extra: f32,
}

impl Trainer {
    pub fn new(cfg: TrainConfig) -> Result<Trainer> {
        cfg.validate()?;
        let spec = SaeSpec { variant: cfg.variant, d_in: cfg.d_in, n_features: cfg.n_features, k: cfg.k };
        let mut sae = Sae::init(spec, cfg.seed);
        sae.threshold_relative = cfg.relative_thresholds();
        let (n, d) = (cfg.n_features, cfg.d_in);
        let jump = cfg.variant == Variant::Jumprelu;
        if jump {
            sae.threshold = Some(vec![cfg.jumprelu_init_threshold; n]);
        }
        let state = TrainerState {
            step: 0,
            tokens: 0,
            w_enc: Moments::zeros(n * d),
            b_enc: Moments::zeros(n),
            w_dec: Moments::zeros(n * d),
            b_dec: Moments::zeros(d),
            since_fired: vec![0; n],
            density: vec![0.0; n],
            threshold: Moments::zeros(if jump { n } else { 0 }),
        };
        let skip = cfg.skip.then(|| Skip::zeros(d, d));
        Ok(Trainer { cfg, sae, state, skip, scratch: Scratch::default(), amx: amx::available() })
    }

    /// A trainer continuing from saved weights and state.
    pub fn resume(cfg: TrainConfig, sae: Sae, state: TrainerState) -> Result<Trainer> {
        cfg.validate()?;
        sae.validate()?;
        let (n, d) = (cfg.n_features, cfg.d_in);
        if sae.spec.n_features != n
            || sae.spec.d_in != d
            || sae.spec.variant != cfg.variant
            || sae.threshold_relative != cfg.relative_thresholds()
        {
            bail!("checkpoint holds a different SAE than the configuration asks for");
        }
        let lens = [state.w_enc.m.len(), state.w_dec.v.len(), state.b_enc.m.len(), state.b_dec.v.len()];
        let theta_len = if cfg.variant == Variant::Jumprelu { n } else { 0 };
        if lens != [n * d, n * d, n, d]
            || state.since_fired.len() != n
            || state.density.len() != n
            || state.threshold.m.len() != theta_len
        {
            bail!("checkpoint state does not match the SAE's shape");
        }
        // A skip transcoder's W_skip is set by the caller ([`super::transcode::load_skip`]).
        let skip = cfg.skip.then(|| Skip::zeros(d, d));
        Ok(Trainer { cfg, sae, state, skip, scratch: Scratch::default(), amx: amx::available() })
    }

    /// Turns TopK's AMX selection off (or back on where [`amx::available`]): the f32 GEMM path,
    /// as on CPUs without AMX.
    pub fn set_amx(&mut self, on: bool) {
        self.amx = on && amx::available();
    }

    /// One step on `x` (`[tokens, d_in]`), with `second` (same shape): `∂L/∂x` for g-SAE, the
    /// target `y` for a transcoder.
    pub fn step(&mut self, x: &[f32], second: Option<&[f32]>) -> Result<StepStats> {
        let grad = second;
        if self.state.step == 0 {
            self.check_batch(x, grad)?;
            let y = if self.cfg.transcoder { grad.unwrap_or(x) } else { x };
            self.sae.b_dec = geometric_median(y, self.cfg.d_in);
        }
        let (stats, _, observed) = self.forward(x, grad, None)?;
        self.observe_thresholds(observed);
        self.update(x.len() / self.cfg.d_in, None);
        self.state.step += 1;
        self.state.tokens += (x.len() / self.cfg.d_in) as u64;
        Ok(stats)
    }

    /// The loss gradients of one batch without changing anything (for gradient checks): the
    /// same selection and backward as [`Trainer::step`], returned densely. `aux_target` fixes the
    /// auxiliary loss's (detached) residual; `None` uses this batch's. `grad` is
    /// [`Trainer::step`]'s `second`.
    pub fn gradients(
        &mut self,
        x: &[f32],
        grad: Option<&[f32]>,
        aux_target: Option<&[f32]>,
    ) -> Result<(Loss, Gradients)> {
        let (_, loss, _) = self.forward(x, grad, aux_target)?;
        let (n, d) = (self.cfg.n_features, self.cfg.d_in);
        let mut grads = Gradients {
            w_enc: vec![0.0; n * d],
            b_enc: vec![0.0; n],
            w_dec: vec![0.0; n * d],
            b_dec: vec![0.0; d],
            threshold: vec![0.0; if self.cfg.variant == Variant::Jumprelu { n } else { 0 }],
            w_skip: vec![0.0; if self.skip.is_some() { d * d } else { 0 }],
        };
        self.update(x.len() / d, Some(&mut grads));
        Ok((loss, grads))
    }

    /// The main codes of the last forward pass.
    pub fn last_codes(&self) -> &Codes {
        &self.scratch.sources[0].codes
    }

    /// The residual `x − x̂` of the main reconstruction of the last forward pass (a transcoder:
    /// its target `y` in place of `x`, less the skip connection's output).
    pub fn last_residual(&self, x: &[f32]) -> Vec<f32> {
        let want = if self.skip.is_some() { &self.scratch.want[..] } else { x };
        want.iter().zip(&self.scratch.xhat).map(|(a, b)| a - b).collect()
    }

    fn check_batch(&self, x: &[f32], grad: Option<&[f32]>) -> Result<()> {
        let d = self.cfg.d_in;
        if x.is_empty() || !x.len().is_multiple_of(d) {
            bail!("batch is not [tokens, {d}]");
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            bail!("batch holds a non-finite activation ({}) at token {} of the batch", x[i], i / d);
        }
        if self.cfg.transcoder {
            let Some(y) = grad.filter(|y| y.len() == x.len()) else {
                bail!("a transcoder needs its target: the output hook's rows, [tokens, {d}]")
            };
            if let Some(i) = y.iter().position(|v| !v.is_finite()) {
                bail!("batch holds a non-finite target ({}) at token {} of the batch", y[i], i / d);
            }
            return Ok(());
        }
        match (self.cfg.variant, grad) {
            (Variant::Gsae, Some(g)) if g.len() == x.len() => {
                if let Some(i) = g.iter().position(|v| !v.is_finite()) {
                    bail!("batch holds a non-finite gradient ({}) at token {} of the batch", g[i], i / d);
                }
            }
            (Variant::Gsae, _) => {
                bail!("g-SAE needs the loss gradient of every token (the store's grad column)")
            }
            _ => {}
        }
        Ok(())
    }

    /// Encoder GEMM, selection, reconstructions and upstream gradients into the scratch buffers.
    fn forward(
        &mut self,
        x: &[f32],
        grad: Option<&[f32]>,
        aux_target: Option<&[f32]>,
    ) -> Result<(StepStats, Loss, Observed)> {
        self.check_batch(x, grad)?;
        let (n, d) = (self.cfg.n_features, self.cfg.d_in);
        let tokens = x.len() / d;
        let s = &mut self.scratch;
        if s.sources.is_empty() {
            s.sources = (0..3).map(|_| Source::default()).collect();
        }
        s.xc.clear();
        s.xc.extend_from_slice(x);
        // What the reconstruction aims at: `x`, or a transcoder's target (less the skip output).
        let (y, grad) = if self.cfg.transcoder { (grad.expect("checked"), None) } else { (x, grad) };
        if !self.cfg.transcoder {
            let b_dec = &self.sae.b_dec;
            s.xc.par_chunks_mut(d).for_each(|row| row.iter_mut().zip(b_dec).for_each(|(v, b)| *v -= b));
        }
        let denom = total_variance(y, d).max(f64::MIN_POSITIVE);
        if let Some(skip) = &self.skip {
            super::transcode::skip_target(&skip.w, x, y, d, &mut s.want);
        }
        let want: &[f32] = if self.skip.is_some() { &s.want } else { y };
        let feature_major = self.cfg.variant == Variant::FeatureChoice;
        let [main, multi, aux] = &mut s.sources[..] else { unreachable!() };
        main.codes.clear();
        multi.codes.clear();
        aux.codes.clear();

        // Which features the auxiliary loss may use: dead ones (AuxK) or under-used ones (aux_zipf).
        let budget = self.cfg.k * tokens;
        let caps = match self.cfg.variant {
            Variant::FeatureChoice => {
                feature_choice::capacities(&self.state.density, budget, tokens, self.cfg.zipf_exponent)
            }
            _ => Vec::new(),
        };
        let dead: Vec<u32> =
            (0..n as u32).filter(|&f| self.state.since_fired[f as usize] >= self.cfg.dead_tokens).collect();
        let dead_fraction = dead.len() as f32 / n as f32;
        let aux_set = match self.cfg.variant {
            Variant::FeatureChoice => feature_choice::underused(&self.state.density, &caps, tokens),
            _ => dead,
        };
        let penalised = matches!(self.cfg.variant, Variant::Jumprelu | Variant::Relu);
        let use_aux = self.cfg.auxk_alpha > 0.0 && !aux_set.is_empty() && !penalised;
        s.band.clear();

        // Encoder GEMM and selection. TopK, JumpReLU and ReLU select per token, so they run in
        // chunks of tokens; the others need the whole batch's pre-activations.
        let observed = if self.cfg.variant == Variant::Topk && self.amx {
            // bf16 candidates on AMX, exact f32 values (amx.rs); no dense pre-activations.
            let multi = self.cfg.multi_topk.then(|| (4 * self.cfg.k, &mut multi.codes));
            let aux = use_aux.then(|| (&aux_set[..], self.cfg.k_aux, &mut aux.codes));
            topk::select_amx(&self.sae, &s.xc, self.cfg.k, multi, &mut main.codes, aux, &mut s.amx);
            Observed::None
        } else if matches!(self.cfg.variant, Variant::Topk | Variant::Jumprelu | Variant::Relu) {
            let chunk = TOPK_CHUNK.min(tokens);
            s.pre.resize(chunk * n, 0.0);
            for c0 in (0..tokens).step_by(chunk) {
                let rows = chunk.min(tokens - c0);
                let pre = &mut s.pre[..rows * n];
                kernels::matmul_nt(&s.xc[c0 * d..(c0 + rows) * d], &self.sae.w_enc, pre, rows, n, d, false);
                if penalised {
                    let th = self.sae.threshold.as_deref().map(|t| (t, self.cfg.jumprelu_bandwidth));
                    jumprelu::select(pre, &self.sae.b_enc, th, &mut main.codes, &mut s.band);
                    continue;
                }
                let m = self.cfg.multi_topk.then(|| (4 * self.cfg.k, &mut multi.codes));
                topk::select(pre, &self.sae.b_enc, self.cfg.k, m, &mut main.codes);
                if use_aux {
                    let b = Some(&self.sae.b_enc[..]);
                    select_among(pre, b, 0.0, n, rows, false, &aux_set, self.cfg.k_aux, &mut aux.codes);
                }
            }
            Observed::None
        } else {
            s.pre.resize(tokens * n, 0.0);
            kernels::matmul_nt(&s.xc, &self.sae.w_enc, &mut s.pre, tokens, n, d, feature_major);
            // Scale-free ranking: keys pre / ‖x − b_dec‖.
            let scale: Option<Vec<f32>> = self.cfg.relative_thresholds().then(|| {
                s.xc.par_chunks(d)
                    .map(|row| 1.0 / kernels::dot(row, row).sqrt().max(f32::MIN_POSITIVE))
                    .collect()
            });
            let scale = scale.as_deref();
            let observed = match self.cfg.variant {
                Variant::Topk | Variant::Jumprelu | Variant::Relu => unreachable!("not trained here"),
                Variant::Gsae => {
                    let g = grad.expect("checked by check_batch");
                    let (k, beta) = (self.cfg.k, self.cfg.gsae_beta);
                    let (b_enc, w_dec) = (&self.sae.b_enc, &self.sae.w_dec);
                    gsae::select(&s.pre, b_enc, g, w_dec, d, k, beta, &mut s.proj, &mut main.codes);
                    Observed::None
                }
                Variant::MutualChoice => {
                    let b_enc = &self.sae.b_enc;
                    Observed::Min(mutual_choice::select(&mut s.pre, b_enc, scale, budget, &mut main.codes))
                }
                Variant::FeatureChoice => {
                    let picked = feature_choice::select(
                        &mut s.pre,
                        &self.sae.b_enc,
                        scale,
                        tokens,
                        &caps,
                        &mut main.codes,
                    );
                    Observed::Picked(picked, caps.clone())
                }
            };
            if use_aux {
                // Mutual and Feature Choice have added b_enc to `pre` in place.
                let bias = (self.cfg.variant == Variant::Gsae).then_some(&self.sae.b_enc[..]);
                // AuxK uses ReLU'd pre-activations (as its papers); aux_zipf uses raw ones, so even
                // a feature that is never positive gets a gradient (see feature_choice.rs).
                let floor = if feature_major { f32::NEG_INFINITY } else { 0.0 };
                let (k_aux, out) = (self.cfg.k_aux, &mut aux.codes);
                select_among(&s.pre, bias, floor, n, tokens, feature_major, &aux_set, k_aux, out);
            }
            observed
        };
        (main.with_bias, main.fires, main.active) = (true, true, true);
        (multi.with_bias, multi.fires) = (true, false);
        multi.active = self.cfg.variant == Variant::Topk && self.cfg.multi_topk;
        (aux.with_bias, aux.fires, aux.active) = (false, false, false);
        (main.dz_extra, multi.dz_extra, aux.dz_extra) = (0.0, 0.0, 0.0);

        // Main reconstruction and its gradient.
        s.xhat.resize(tokens * d, 0.0);
        let (starts, order) = main.codes.by_feature(n);
        let entry_tokens = main.codes.entry_tokens();
        main.codes.decode_by_feature(
            &starts,
            &order,
            &entry_tokens,
            &self.sae.w_dec,
            d,
            &self.sae.b_dec,
            &mut s.xhat,
            DECODE_PARTS,
            &mut s.partials,
        );
        let mut loss = Loss { fvu: sq_dist(&s.xhat, want) / denom, multi: 0.0, aux: 0.0, sparsity: 0.0 };
        upstream(&s.xhat, want, 2.0 / denom as f32, &mut main.dx);
        let mut stats = StepStats {
            fvu: loss.fvu as f32,
            l0: main.codes.nnz() as f32 / tokens as f32,
            ..StepStats::default()
        };
        // ReLU's L1 and JumpReLU's L0 penalties.
        let lambda = self.cfg.sparsity_coefficient as f64 / denom;
        s.l0_weight.clear();
        match self.cfg.variant {
            Variant::Relu => {
                loss.sparsity = lambda * main.codes.value.iter().map(|v| *v as f64).sum::<f64>();
                main.dz_extra = lambda as f32;
            }
            Variant::Jumprelu => {
                let (l0_loss, weights) =
                    jumprelu::l0_penalty(&main.codes, self.cfg.jumprelu_sparsity, self.cfg.k);
                loss.sparsity = lambda * l0_loss;
                s.l0_weight = weights.into_iter().map(|w| (lambda * w) as f32).collect();
            }
            _ => {}
        }
        stats.aux_loss = loss.sparsity as f32;

        if multi.active {
            let mut xhat4 = vec![0.0; tokens * d];
            multi.codes.decode_into(&self.sae.w_dec, d, Some(&self.sae.b_dec), &mut xhat4);
            loss.multi = sq_dist(&xhat4, want) / denom;
            stats.multi_fvu = loss.multi as f32;
            upstream(&xhat4, want, 2.0 / 8.0 / denom as f32, &mut multi.dx);
        }

        // Auxiliary loss on the pairs selected above.
        stats.dead_fraction = dead_fraction;
        if use_aux && aux.codes.nnz() > 0 {
            // Target: the main residual x − x̂ (detached); ê has no bias.
            let residual: Vec<f32> = match aux_target {
                Some(r) => r.to_vec(),
                None => want.iter().zip(&s.xhat).map(|(a, b)| a - b).collect(),
            };
            let mut ehat = vec![0.0; tokens * d];
            aux.codes.decode_into(&self.sae.w_dec, d, None, &mut ehat);
            let alpha = self.cfg.auxk_alpha;
            loss.aux = alpha as f64 * sq_dist(&ehat, &residual) / denom;
            stats.aux_loss = loss.aux as f32;
            upstream(&ehat, &residual, alpha * 2.0 / denom as f32, &mut aux.dx);
            aux.active = true;
        }
        Ok((stats, loss, observed))
    }

    /// Move the inference thresholds towards what this batch selected.
    fn observe_thresholds(&mut self, observed: Observed) {
        let decay = self.cfg.threshold_decay;
        let ema =
            |old: f32, seen: f32| if old.is_finite() { decay * old + (1.0 - decay) * seen } else { seen };
        let Some(th) = self.sae.threshold.as_mut() else { return };
        match observed {
            Observed::None => {}
            Observed::Min(min) => {
                if min.is_finite() {
                    let new = ema(th[0], min);
                    th.fill(new);
                }
            }
            Observed::Picked(picked, caps) => {
                for ((t, p), &cap) in th.iter_mut().zip(&picked).zip(&caps) {
                    if p.count > 0 {
                        *t = ema(*t, if p.count >= cap { p.min } else { 0.0 });
                    }
                }
            }
        }
    }
}
