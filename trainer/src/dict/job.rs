//! `train-sae` as a resumable batch job over a store.
//!
//! The hook's rows are split in storage order: the last `eval_tokens` are held out, the rest are
//! drawn by the store's shuffled sampler (seeded, full batches only), epoch after epoch, until
//! `tokens` training tokens have been seen. Every `checkpoint_every` steps the weights (SAELens
//! layout), the trainer state, the sampler position and the training log are written to
//! `dictionaries/<name>/checkpoints/step-N/` and listed in the manifest (status `training`).
//! Restarted with the same settings, the job loads the listed checkpoint, replays the sampler to
//! the same position and continues: it ends with the same weights as an uninterrupted run (every
//! kernel sums in a fixed order).
//!
//! With `normalize` (the default), activations are multiplied by a constant that makes their mean
//! norm √d (from the first training batch) before training, so that the learning rate and the
//! biases work at the scale the papers assume (Gemma 3's residual stream has norms in the
//! thousands). Checkpoints hold the weights in that scaled space (`loupe.train.input_scale` in
//! their cfg.json); the final files are folded back ([`super::sae::Sae::folded`]) and read raw
//! activations. At the end the final files are written at the top of the folder,
//! evaluated on the held-out rows (`eval.json`), and listed with status `done`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use loupe_store::dictionaries::{TrainLogRow, write_train_log};
use loupe_store::{DictEntry, SamplerConfig, Store};
use serde_json::{Value, json};

use super::eval::{EvalStats, eval_reconstruction};
use super::io::{SaeMeta, load_sae, load_state, save_sae_with, save_state};
use super::splice::{SpliceStats, contexts_from_rows, eval_splice};
use super::train::{StepStats, TrainConfig, Trainer};
use super::{Dictionary, Variant};

/// Everything `train-sae` needs.
#[derive(Clone, Debug)]
pub struct Job {
    pub store: PathBuf,
    pub hook: String,
    pub name: String,
    pub train: TrainConfig,
    /// Training tokens to see in total.
    pub tokens: u64,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_every: u64,
    /// Rows at the end of the hook held out for evaluation.
    pub eval_tokens: u64,
    /// Held-out contexts run through the model with the dictionary spliced in (0: skip).
    pub eval_contexts: usize,
    /// Scale activations so that their mean norm is √d while training (the final files are
    /// folded back to raw activations).
    pub normalize: bool,
}

/// Reported after every step.
pub struct Progress<'a> {
    pub step: u64,
    pub tokens: u64,
    pub target: u64,
    pub stats: &'a StepStats,
    /// Set when this step wrote a checkpoint.
    pub checkpointed: bool,
}

/// How a job ended.
#[derive(Debug)]
pub struct Outcome {
    pub dir: PathBuf,
    pub steps: u64,
    pub tokens: u64,
    /// The step a resumed run continued from.
    pub resumed_from: Option<u64>,
    pub eval: EvalStats,
    /// CE-loss recovered and KL, or why they were not measured.
    pub splice: std::result::Result<SpliceStats, String>,
}

/// Where the sampler stands: batches already drawn from epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Position {
    epoch: u64,
    batch: u64,
}

pub fn run(job: &Job, mut progress: impl FnMut(&Progress)) -> Result<Outcome> {
    let store = Store::open_rw(&job.store)?;
    let manifest = store.manifest();
    let Some(hook) = manifest.hooks.get(&job.hook) else {
        let known: Vec<&String> = manifest.hooks.keys().collect();
        bail!("store {} has no activations for hook {} (it has: {known:?})", job.store.display(), job.hook);
    };
    let d = hook.spec.d as usize;
    if job.train.d_in != d {
        bail!("hook {} has width {d}, the configuration says d_in {}", job.hook, job.train.d_in);
    }
    if job.train.variant == Variant::Gsae && !hook.spec.grad {
        bail!("g-SAE needs loss gradients: capture {} with --with-grads first", job.hook);
    }
    let rows = hook.rows();
    if job.eval_tokens >= rows {
        bail!(
            "hook {} has {rows} rows; --eval-tokens {} leaves nothing to train on",
            job.hook,
            job.eval_tokens
        );
    }
    let train_rows = rows - job.eval_tokens;
    if train_rows < job.train.batch as u64 {
        bail!(
            "hook {} has {train_rows} training rows, fewer than one batch of {}",
            job.hook,
            job.train.batch
        );
    }
    job.train.validate()?;
    let meta = meta_of(&manifest, &job.hook);
    let dir = store.dictionary_dir(&job.name);
    let config = SamplerConfig {
        seed: job.train.seed,
        grad: job.train.variant == Variant::Gsae,
        drop_last: true,
        row_limit: Some(train_rows),
        ..SamplerConfig::new(job.train.batch)
    };
    let acts = store.activations(&job.hook)?;
    let sampler = loupe_store::Sampler::new(&acts, config)?;
    let mut train = job.train.clone();
    if job.normalize {
        train.input_scale = input_scale(&sampler, d)?;
    }

    // Fresh start or resume.
    let (mut trainer, mut log, mut pos, resumed_from) = match store.dictionary(&job.name) {
        Some(entry) if entry.is_done() => bail!(
            "dictionary {} is already trained in {} (choose another --name, or remove it)",
            job.name,
            job.store.display()
        ),
        Some(entry) => {
            let ckpt = entry
                .files
                .iter()
                .find_map(|f| f.file.strip_suffix("/state.json"))
                .context("the listed checkpoint has no state.json")?;
            let ckpt = dir.join(ckpt);
            let (cfg, state, resume) = load_state(&ckpt)?;
            if cfg != train || entry.hook != job.hook {
                bail!(
                    "dictionary {} was started with other settings (hook {}, {}); use the same settings to \
                     resume, or another --name",
                    job.name,
                    entry.hook,
                    serde_json::to_string(&cfg)?
                );
            }
            let (sae, _) = load_sae(&ckpt)?;
            let log = loupe_store::dictionaries::read_train_log(&ckpt.join("train_log.arrow"))?;
            let pos = Position {
                epoch: resume["epoch"].as_u64().context("state.json has no resume.epoch")?,
                batch: resume["batch"].as_u64().context("state.json has no resume.batch")?,
            };
            let step = state.step;
            (Trainer::resume(cfg, sae, state)?, log, pos, Some(step))
        }
        None => {
            if dir.exists() {
                // Files of a run that never reached its first checkpoint: not part of the store.
                std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
            }
            (Trainer::new(train.clone())?, Vec::new(), Position::default(), None)
        }
    };

    let scale = train.input_scale;
    let mut epoch = sampler.epoch(pos.epoch);
    let mut batch = sampler.empty_batch();
    for _ in 0..pos.batch {
        if !epoch.next_into(&mut batch) {
            bail!("the checkpoint's sampler position is past the end of its epoch (was the store changed?)");
        }
    }
    let (mut x, mut g) = (Vec::new(), Vec::new());
    while trainer.state.tokens < job.tokens {
        if !epoch.next_into(&mut batch) {
            pos = Position { epoch: pos.epoch + 1, batch: 0 };
            epoch = sampler.epoch(pos.epoch);
            if !epoch.next_into(&mut batch) {
                bail!("the sampler delivered no batch (store has {train_rows} training rows)");
            }
        }
        pos.batch += 1;
        batch.act.as_ref().to_f32_into(&mut x);
        if scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let grad = match &batch.grad {
            Some(values) => {
                values.as_ref().to_f32_into(&mut g);
                Some(&g[..])
            }
            None => None,
        };
        let stats = trainer.step(&x, grad).with_context(|| format!("step {}", trainer.state.step + 1))?;
        log.push(TrainLogRow {
            step: trainer.state.step,
            tokens: trainer.state.tokens,
            fvu: stats.fvu,
            l0: stats.l0,
            aux_loss: stats.aux_loss,
            dead_fraction: stats.dead_fraction,
        });
        if !stats.fvu.is_finite() {
            bail!("training diverged at step {} (FVU {}); try a lower --lr", trainer.state.step, stats.fvu);
        }
        let done = trainer.state.tokens >= job.tokens;
        let checkpointed =
            !done && job.checkpoint_every > 0 && trainer.state.step % job.checkpoint_every == 0;
        if checkpointed {
            checkpoint(&store, job, &trainer, &meta, &log, pos)?;
        }
        progress(&Progress {
            step: trainer.state.step,
            tokens: trainer.state.tokens,
            target: job.tokens,
            stats: &stats,
            checkpointed,
        });
    }

    // Final files (raw-activation space), evaluation, listing.
    let raw = trainer.sae.folded(scale);
    let eval = eval_reconstruction(&raw, &acts, None, train_rows..rows)?;
    let splice = if job.eval_contexts == 0 {
        Err("skipped (--eval-contexts 0)".to_string())
    } else {
        let sae: Arc<dyn Dictionary> = Arc::new(raw.clone());
        splice_held_out(&store, &acts, &job.hook, sae, train_rows..rows, job.eval_contexts)
    };
    save_sae_with(&raw, &meta, Some(&trainer.cfg), &dir)?;
    write_train_log(&dir.join("train_log.arrow"), &log)?;
    let splice_json = match &splice {
        Ok(s) => json!(s),
        Err(why) => json!({ "skipped": why }),
    };
    let eval_json = serde_json::to_string_pretty(
        &json!({ "held_out": eval, "held_out_rows": [train_rows, rows], "splice": splice_json }),
    )?;
    loupe_store::fsutil::write_atomic(&dir.join("eval.json"), (eval_json + "\n").as_bytes())?;
    let entry = entry(job, &trainer, "done");
    store.commit_dictionary(
        &job.name,
        entry,
        &["cfg.json", "sae_weights.safetensors", "train_log.arrow", "eval.json"],
    )?;
    let checkpoints = dir.join("checkpoints");
    if checkpoints.exists() {
        std::fs::remove_dir_all(&checkpoints)
            .with_context(|| format!("cannot remove {}", checkpoints.display()))?;
    }
    Ok(Outcome { dir, steps: trainer.state.step, tokens: trainer.state.tokens, resumed_from, eval, splice })
}

/// CE-loss recovered and KL on the first `max` held-out contexts, with the store's model; an
/// `Err` says why it could not be measured (the model file is gone, changed, or unreadable).
fn splice_held_out(
    store: &Store,
    acts: &loupe_store::Activations,
    hook: &str,
    dict: Arc<dyn Dictionary>,
    rows: std::ops::Range<u64>,
    max: usize,
) -> std::result::Result<SpliceStats, String> {
    let manifest = store.manifest();
    let model_info = manifest.model.as_ref().ok_or("the store records no model")?;
    let path = std::path::Path::new(&model_info.path);
    if !path.exists() {
        return Err(format!("the store's model {} is not on this machine", path.display()));
    }
    let bos = manifest.tokenizer.as_ref().and_then(|t| t.bos).ok_or("the store records no BOS token")?;
    let context =
        manifest.capture.as_ref().and_then(|c| c["settings"]["context"].as_u64()).unwrap_or(256) as usize;
    let (mut doc, mut pos, mut token) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0u64;
    for i in 0..acts.num_shards() {
        let shard = acts.open_shard(i).map_err(|e| format!("{e:#}"))?;
        let n = shard.rows() as u64;
        let (lo, hi) = (rows.start.max(offset), rows.end.min(offset + n));
        if lo < hi {
            let r = (lo - offset) as usize..(hi - offset) as usize;
            doc.extend_from_slice(&shard.doc()[r.clone()]);
            pos.extend_from_slice(&shard.pos()[r.clone()]);
            token.extend_from_slice(&shard.token()[r]);
        }
        offset += n;
    }
    let contexts = contexts_from_rows(&doc, &pos, &token, bos, context, max);
    let model = crate::model::load(path).map_err(|e| format!("cannot load the store's model: {e:#}"))?;
    eval_splice(model.as_ref(), dict, hook, None, &contexts).map_err(|e| format!("splicing failed: {e:#}"))
}

/// √d over the mean norm of the first training batch (of epoch 0: the same on every run).
fn input_scale(sampler: &loupe_store::Sampler, d: usize) -> Result<f32> {
    let mut batch = sampler.empty_batch();
    if !sampler.epoch(0).next_into(&mut batch) {
        bail!("the sampler delivered no batch");
    }
    let x = batch.act.as_ref().to_f32();
    let mean = x.chunks(d).map(|r| r.iter().map(|v| (v * v) as f64).sum::<f64>().sqrt()).sum::<f64>()
        / (x.len() / d).max(1) as f64;
    if !(mean.is_finite() && mean > 0.0) {
        bail!("cannot normalise: the activations' mean norm is {mean}");
    }
    Ok(((d as f64).sqrt() / mean) as f32)
}

fn entry(job: &Job, trainer: &Trainer, status: &str) -> DictEntry {
    DictEntry {
        hook: job.hook.clone(),
        kind: "sae".to_string(),
        variant: trainer.cfg.variant.name().to_string(),
        d_in: trainer.cfg.d_in as u32,
        n_features: trainer.sae.n_features() as u32,
        status: status.to_string(),
        step: trainer.state.step,
        tokens: trainer.state.tokens,
        files: Vec::new(),
    }
}

/// Write checkpoint `step-N`, list it, then remove older checkpoint folders.
fn checkpoint(
    store: &Store,
    job: &Job,
    trainer: &Trainer,
    meta: &SaeMeta,
    log: &[TrainLogRow],
    pos: Position,
) -> Result<()> {
    let rel = format!("checkpoints/step-{:08}", trainer.state.step);
    let root = store.dictionary_dir(&job.name);
    let dir = root.join(&rel);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    save_sae_with(&trainer.sae, meta, Some(&trainer.cfg), &dir)?;
    save_state(&trainer.cfg, &trainer.state, &json!({ "epoch": pos.epoch, "batch": pos.batch }), &dir)?;
    write_train_log(&dir.join("train_log.arrow"), log)?;
    let files: Vec<String> =
        ["cfg.json", "sae_weights.safetensors", "state.safetensors", "state.json", "train_log.arrow"]
            .iter()
            .map(|f| format!("{rel}/{f}"))
            .collect();
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    store.commit_dictionary(&job.name, entry(job, trainer, "training"), &files)?;
    for old in std::fs::read_dir(root.join("checkpoints"))?.flatten() {
        if old.path() != dir {
            std::fs::remove_dir_all(old.path())
                .with_context(|| format!("cannot remove {}", old.path().display()))?;
        }
    }
    Ok(())
}

/// SAELens metadata from the store: model name, hook, and the capture's context settings.
fn meta_of(manifest: &loupe_store::Manifest, hook: &str) -> SaeMeta {
    let settings = manifest.capture.as_ref().map(|c| &c["settings"]).cloned().unwrap_or(Value::Null);
    SaeMeta {
        model_name: manifest.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        hook_name: hook.to_string(),
        context_size: settings["context"].as_u64().map(|v| v as usize),
        prepend_bos: settings["bos"].as_bool(),
        dataset_path: settings["corpus"].as_str().map(str::to_string),
    }
}
