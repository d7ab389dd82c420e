//! The SAE trainer ([`Trainer`]; with `cfg.transcoder`, the transcoder trainer) as a [`Fit`]: what
//! `train-sae` jobs ([`super::job::run`]) checkpoint, resume and write as final files.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use serde_json::Value;

use super::Dictionary;
use super::io::{SaeMeta, load_sae, load_state, save_sae_with, save_state};
use super::job::{Fit, Needs};
use super::train::{StepStats, TrainConfig, Trainer};
use super::transcode::{self, SaeTranscoder};

/// The SAE trainer (and, with `cfg.transcoder`, the transcoder trainer) as a job drives it.
impl Fit for Trainer {
    type Config = TrainConfig;
    const CHECKPOINT_FILES: &'static [&'static str] =
        &["cfg.json", "sae_weights.safetensors", "state.safetensors", "state.json", "skip_state.safetensors"];
    const FINAL_FILES: &'static [&'static str] =
        &["cfg.json", "sae_weights.safetensors", "circuit_tracer.safetensors"];
    const ACTIVE: &'static str = "L0";

    fn needs(cfg: &TrainConfig) -> Needs {
        let grad = cfg.variant == super::Variant::Gsae && !cfg.transcoder;
        Needs { d_in: cfg.d_in, d_out: cfg.d_in, batch: cfg.batch, seed: cfg.seed, grad }
    }

    fn with_scales(mut cfg: TrainConfig, input: f32, output: f32) -> TrainConfig {
        cfg.input_scale = input;
        if cfg.transcoder {
            cfg.output_scale = output;
        }
        cfg
    }

    fn validate(cfg: &TrainConfig) -> Result<()> {
        cfg.validate()
    }

    fn start(cfg: TrainConfig) -> Result<Trainer> {
        Trainer::new(cfg)
    }

    fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    fn step(&mut self, x: &[f32], second: Option<&[f32]>) -> Result<StepStats> {
        let (s_in, s_out) = (self.cfg.input_scale, self.cfg.output_scale);
        if self.cfg.transcoder {
            let Some(y) = second else { bail!("a transcoder step needs its target rows") };
            let x: Vec<f32> = x.iter().map(|v| v * s_in).collect();
            let y: Vec<f32> = y.iter().map(|v| v * s_out).collect();
            return Trainer::step(self, &x, Some(&y));
        }
        if s_in == 1.0 {
            return Trainer::step(self, x, second);
        }
        let scaled: Vec<f32> = x.iter().map(|v| v * s_in).collect();
        Trainer::step(self, &scaled, second)
    }

    fn steps(&self) -> u64 {
        self.state.step
    }

    fn tokens(&self) -> u64 {
        self.state.tokens
    }

    fn save_checkpoint(&self, dir: &Path, meta: &SaeMeta, resume: &Value) -> Result<()> {
        if self.cfg.transcoder {
            let tc = SaeTranscoder { sae: self.sae.clone(), w_skip: self.skip.as_ref().map(|s| s.w.clone()) };
            transcode::save(&tc, meta, Some(&self.cfg), dir, false)?;
            if let Some(skip) = &self.skip {
                transcode::save_skip_state(skip, self.cfg.d_in, dir)?;
            }
        } else {
            save_sae_with(&self.sae, meta, Some(&self.cfg), dir)?;
        }
        save_state(&self.cfg, &self.state, resume, dir)
    }

    fn load_checkpoint(dir: &Path) -> Result<(Trainer, Value)> {
        let (cfg, state, resume) = load_state(dir)?;
        if !cfg.transcoder {
            let (sae, _) = load_sae(dir)?;
            return Ok((Trainer::resume(cfg, sae, state)?, resume));
        }
        let (tc, _) = transcode::load(dir)?;
        let d = cfg.d_in;
        let mut trainer = Trainer::resume(cfg, tc.sae, state)?;
        trainer.skip = match (tc.w_skip, trainer.cfg.skip) {
            (Some(w), true) => Some(transcode::load_skip_state(w, d, dir)?),
            (None, false) => None,
            _ => bail!("the checkpoint's skip connection does not match its configuration"),
        };
        Ok((trainer, resume))
    }

    fn finish(&self, meta: &SaeMeta, dir: &Path) -> Result<Arc<dyn Dictionary>> {
        if self.cfg.transcoder {
            let tc = SaeTranscoder { sae: self.sae.clone(), w_skip: self.skip.as_ref().map(|s| s.w.clone()) };
            let raw = tc.folded(self.cfg.input_scale, self.cfg.output_scale);
            transcode::save(&raw, meta, Some(&self.cfg), dir, true)?;
            return Ok(Arc::new(raw));
        }
        let raw = self.sae.folded(self.cfg.input_scale);
        save_sae_with(&raw, meta, Some(&self.cfg), dir)?;
        Ok(Arc::new(raw))
    }

    fn listing(&self) -> (&'static str, String, usize) {
        ("sae", self.cfg.variant.name().to_string(), self.sae.spec.n_features)
    }

    fn checkpoint_files(&self) -> Vec<&'static str> {
        let n = if self.skip.is_some() { 5 } else { 4 };
        Self::CHECKPOINT_FILES[..n].to_vec()
    }

    fn final_files(&self) -> Vec<&'static str> {
        let n = if self.cfg.transcoder { 3 } else { 2 };
        Self::FINAL_FILES[..n].to_vec()
    }
}
