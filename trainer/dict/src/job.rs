//! `train-sae` and `train-monet` as resumable batch jobs over a store: the loop, held-out split,
//! checkpoints, resume, evaluation and listing are shared; what trains is a [`Fit`] (the SAE
//! [`super::train::Trainer`], in `sae_fit.rs`, or [`super::monet::train::MonetTrainer`]).
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
//!
//! A transcoder (`input_hook`) reads one hook and reconstructs another (`hook`): both were captured
//! together, so two samplers with the same seed draw the same rows (checked batch by batch).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use loupe_store::dictionaries::{TrainLogRow, write_train_log};
use loupe_store::{DictEntry, Progress, SamplerConfig, Store};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use loupe_model::Session;

use super::Dictionary;
use super::checkpoints::{is_run_file, remove_old_checkpoints};
use super::eval::{EvalStats, eval_reconstruction};
use super::io::SaeMeta;
use super::splice::{SpliceStats, contexts_from_rows, eval_splice};
use super::train::StepStats;

/// What a job needs to know of a configuration to feed it.
pub struct Needs {
    pub d_in: usize,
    pub d_out: usize,
    pub batch: usize,
    pub seed: u64,
    /// Whether steps read the store's loss gradients (g-SAE).
    pub grad: bool,
}

/// A dictionary being trained, as a job drives it.
pub trait Fit: Sized {
    /// Every hyper-parameter (recorded in checkpoints; a resume must match it).
    type Config: Clone + PartialEq + Serialize + DeserializeOwned;
    /// Files of a checkpoint folder (besides `train_log.arrow`).
    const CHECKPOINT_FILES: &'static [&'static str];
    /// Files of the final dictionary (besides `train_log.arrow` and `eval.json`).
    const FINAL_FILES: &'static [&'static str];
    /// What [`StepStats::l0`] counts, as progress and reports name it ("L0", "experts/token").
    const ACTIVE: &'static str;
    fn needs(cfg: &Self::Config) -> Needs;
    /// `cfg` for activations multiplied by `input` and targets by `output` while training.
    fn with_scales(cfg: Self::Config, input: f32, output: f32) -> Self::Config;
    fn validate(cfg: &Self::Config) -> Result<()>;
    fn start(cfg: Self::Config) -> Result<Self>;
    fn config(&self) -> &Self::Config;
    /// One step on `x`; `second` is the gradient (g-SAE) or the target (transcoders).
    fn step(&mut self, x: &[f32], second: Option<&[f32]>) -> Result<StepStats>;
    fn steps(&self) -> u64;
    fn tokens(&self) -> u64;
    fn save_checkpoint(&self, dir: &Path, meta: &SaeMeta, resume: &Value) -> Result<()>;
    /// The trainer and the `resume` value saved with it.
    fn load_checkpoint(dir: &Path) -> Result<(Self, Value)>;
    /// Write the final files (reading raw activations) into `dir` and return that dictionary.
    fn finish(&self, meta: &SaeMeta, dir: &Path) -> Result<Arc<dyn Dictionary>>;
    /// The manifest's `kind` and `variant`, and the number of features.
    fn listing(&self) -> (&'static str, String, usize);
    /// The checkpoint files this run writes (a subset of [`Fit::CHECKPOINT_FILES`]).
    fn checkpoint_files(&self) -> Vec<&'static str> {
        Self::CHECKPOINT_FILES.to_vec()
    }
    /// The final files this run writes (a subset of [`Fit::FINAL_FILES`]).
    fn final_files(&self) -> Vec<&'static str> {
        Self::FINAL_FILES.to_vec()
    }
}

/// Everything a training job needs; `train` is the [`Fit`]'s configuration.
#[derive(Clone, Debug)]
pub struct Job<C> {
    pub store: PathBuf,
    /// The hook the dictionary reconstructs (and is spliced at).
    pub hook: String,
    /// A transcoder's input hook (None: the dictionary reads `hook`).
    pub input_hook: Option<String>,
    pub name: String,
    pub train: C,
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

/// Run `job`. `progress` follows the tokens trained on (stage "training"); after every step its
/// message says the step, FVU, [`Fit::ACTIVE`], the dead fraction and whether it checkpointed.
pub fn run<F: Fit>(job: &Job<F::Config>, progress: &dyn Progress) -> Result<Outcome> {
    // The name becomes a folder: check it before anything touches the disk.
    loupe_store::dictionaries::check_dictionary_name(&job.name)?;
    let store = Store::open_rw(&job.store)?;
    let manifest = store.manifest();
    let needs = F::needs(&job.train);
    let find = |name: &str| {
        manifest.hooks.get(name).with_context(|| {
            let known: Vec<&String> = manifest.hooks.keys().collect();
            format!("store {} has no activations for hook {name} (it has: {known:?})", job.store.display())
        })
    };
    let hook = find(&job.hook)?;
    let input = match &job.input_hook {
        Some(name) => find(name)?,
        None => hook,
    };
    let input_name = job.input_hook.as_deref().unwrap_or(&job.hook);
    let (d, d_out) = (input.spec.d as usize, hook.spec.d as usize);
    if needs.d_in != d {
        bail!("hook {input_name} has width {d}, the configuration says d_in {}", needs.d_in);
    }
    if needs.d_out != d_out {
        bail!("hook {} has width {d_out}, the configuration says d_out {}", job.hook, needs.d_out);
    }
    if needs.grad && !hook.spec.grad {
        bail!("g-SAE needs loss gradients: capture {} with --with-grads first", job.hook);
    }
    if job.input_hook.is_some() && input.rows() != hook.rows() {
        bail!("hooks {input_name} and {} hold different rows: capture them together", job.hook);
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
    if train_rows < needs.batch as u64 {
        bail!("hook {} has {train_rows} training rows, fewer than one batch of {}", job.hook, needs.batch);
    }
    let meta = meta_of(&manifest, &job.hook, job.input_hook.as_deref())?;
    let dir = store.dictionary_dir(&job.name);
    let config = SamplerConfig {
        seed: needs.seed,
        grad: needs.grad,
        drop_last: true,
        row_limit: Some(train_rows),
        ..SamplerConfig::new(needs.batch)
    };
    let acts = store.activations(&job.hook)?;
    let input_acts = match &job.input_hook {
        Some(name) => Some(store.activations(name)?),
        None => None,
    };
    let sampler = loupe_store::Sampler::new(input_acts.as_ref().unwrap_or(&acts), config)?;
    // A transcoder's targets: the same rows of the output hook, drawn in the same order.
    let target_sampler = match &input_acts {
        Some(_) => Some(loupe_store::Sampler::new(&acts, config)?),
        None => None,
    };
    let train = if job.normalize {
        let s_in = input_scale(&sampler, d)?;
        let s_out = match &target_sampler {
            Some(t) => input_scale(t, d_out)?,
            None => s_in,
        };
        F::with_scales(job.train.clone(), s_in, s_out)
    } else {
        F::with_scales(job.train.clone(), 1.0, 1.0)
    };
    F::validate(&train)?;

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
            store.check_listed_files(&dir, &entry.files.iter().collect::<Vec<_>>())?;
            let (trainer, resume) = F::load_checkpoint(&ckpt)?;
            let (reads, writes) = hooks_of(job);
            if *trainer.config() != train || entry.hook != reads || entry.output_hook != writes {
                bail!(
                    "dictionary {} was started with other settings (hook {}, {}); use the same settings to \
                     resume, or another --name",
                    job.name,
                    entry.hook,
                    serde_json::to_string(trainer.config())?
                );
            }
            let log = loupe_store::dictionaries::read_train_log(&ckpt.join("train_log.arrow"))?;
            let pos = Position {
                epoch: resume["epoch"].as_u64().context("state.json has no resume.epoch")?,
                batch: resume["batch"].as_u64().context("state.json has no resume.batch")?,
            };
            let step = trainer.steps();
            (trainer, log, pos, Some(step))
        }
        None => {
            // Files of a run that never reached its first checkpoint are not part of the store:
            // remove them, but only if each is a file such a run writes.
            loupe_store::fsutil::clear_leftovers(&dir, |file| is_run_file::<F>(file))?;
            (F::start(train.clone())?, Vec::new(), Position::default(), None)
        }
    };

    let mut epochs = Epochs::new(&sampler, target_sampler.as_ref(), pos)?;
    let (mut x, mut g) = (Vec::new(), Vec::new());
    progress.stage("training");
    while trainer.tokens() < job.tokens {
        let (batch, target) = epochs.next(train_rows)?;
        // The trainer scales inputs and targets itself (`with_scales`).
        batch.act.as_ref().to_f32_into(&mut x);
        let second = match (&batch.grad, target) {
            (_, Some(t)) => {
                if t.doc != batch.doc || t.pos != batch.pos {
                    bail!("the two hooks' samplers drew different rows: were they captured together?");
                }
                t.act.as_ref().to_f32_into(&mut g);
                Some(&g[..])
            }
            (Some(values), None) => {
                values.as_ref().to_f32_into(&mut g);
                Some(&g[..])
            }
            (None, None) => None,
        };
        let stats = trainer.step(&x, second).with_context(|| format!("step {}", trainer.steps() + 1))?;
        pos = epochs.pos;
        log.push(TrainLogRow {
            step: trainer.steps(),
            tokens: trainer.tokens(),
            fvu: stats.fvu,
            l0: stats.l0,
            aux_loss: stats.aux_loss,
            dead_fraction: stats.dead_fraction,
        });
        if !stats.fvu.is_finite() {
            bail!("training diverged at step {} (FVU {}); try a lower --lr", trainer.steps(), stats.fvu);
        }
        let done = trainer.tokens() >= job.tokens;
        let checkpointed = !done && job.checkpoint_every > 0 && trainer.steps() % job.checkpoint_every == 0;
        if checkpointed {
            checkpoint(&store, job, &trainer, &meta, &log, pos)?;
        }
        progress.set(trainer.tokens().min(job.tokens), job.tokens);
        let saved = if checkpointed { " (checkpoint)" } else { "" };
        progress.message(&format!(
            "step {} FVU {:.4} {} {:.1} dead {:.1}%{saved}",
            trainer.steps(),
            stats.fvu,
            F::ACTIVE,
            stats.l0,
            100.0 * stats.dead_fraction
        ));
    }

    // Final files (raw-activation space), evaluation, listing.
    let dict = trainer.finish(&meta, &dir)?;
    let eval = match &input_acts {
        Some(input) => eval_reconstruction(dict.as_ref(), input, Some(&acts), train_rows..rows)?,
        None => eval_reconstruction(dict.as_ref(), &acts, None, train_rows..rows)?,
    };
    let splice = if job.eval_contexts == 0 {
        Err("skipped (--eval-contexts 0)".to_string())
    } else {
        let spliced = Spliced { hook: &job.hook, input: job.input_hook.as_deref(), dict };
        splice_held_out(&store, &acts, spliced, train_rows..rows, job.eval_contexts)
    };
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
    let files: Vec<&str> =
        trainer.final_files().into_iter().chain(["train_log.arrow", "eval.json"]).collect();
    store.commit_dictionary(&job.name, entry, &files)?;
    remove_old_checkpoints::<F>(&dir, None)?;
    Ok(Outcome { dir, steps: trainer.steps(), tokens: trainer.tokens(), resumed_from, eval, splice })
}

/// The sampler's epochs, continued across their ends, with a transcoder's target sampler in step.
struct Epochs<'a> {
    sampler: &'a loupe_store::Sampler,
    target: Option<&'a loupe_store::Sampler>,
    epoch: loupe_store::Epoch<'a>,
    target_epoch: Option<loupe_store::Epoch<'a>>,
    batch: loupe_store::Batch,
    target_batch: loupe_store::Batch,
    pos: Position,
}

impl<'a> Epochs<'a> {
    /// Positioned after `pos.batch` batches of epoch `pos.epoch` (a resumed run replays them).
    fn new(
        sampler: &'a loupe_store::Sampler,
        target: Option<&'a loupe_store::Sampler>,
        pos: Position,
    ) -> Result<Epochs<'a>> {
        let mut e = Epochs {
            sampler,
            target,
            epoch: sampler.epoch(pos.epoch),
            target_epoch: target.map(|t| t.epoch(pos.epoch)),
            batch: sampler.empty_batch(),
            target_batch: target.unwrap_or(sampler).empty_batch(),
            pos,
        };
        for _ in 0..pos.batch {
            if !e.draw() {
                bail!(
                    "the checkpoint's sampler position is past the end of its epoch (was the store changed?)"
                );
            }
        }
        Ok(e)
    }

    fn draw(&mut self) -> bool {
        let got = self.epoch.next_into(&mut self.batch);
        if let Some(t) = self.target_epoch.as_mut() {
            t.next_into(&mut self.target_batch);
        }
        got
    }

    /// The next batch (and target batch), starting a new epoch when one ends.
    fn next(&mut self, train_rows: u64) -> Result<(&loupe_store::Batch, Option<&loupe_store::Batch>)> {
        if !self.draw() {
            self.pos = Position { epoch: self.pos.epoch + 1, batch: 0 };
            self.epoch = self.sampler.epoch(self.pos.epoch);
            self.target_epoch = self.target.map(|t| t.epoch(self.pos.epoch));
            if !self.draw() {
                bail!("the sampler delivered no batch (store has {train_rows} training rows)");
            }
        }
        self.pos.batch += 1;
        Ok((&self.batch, self.target.map(|_| &self.target_batch)))
    }
}

/// What is spliced where.
struct Spliced<'a> {
    hook: &'a str,
    input: Option<&'a str>,
    dict: Arc<dyn Dictionary>,
}

/// CE-loss recovered and KL on the first `max` held-out contexts, with the store's model; an
/// `Err` says why it could not be measured (the model file is gone, changed, or unreadable).
fn splice_held_out(
    store: &Store,
    acts: &loupe_store::Activations,
    spliced: Spliced,
    rows: std::ops::Range<u64>,
    max: usize,
) -> std::result::Result<SpliceStats, String> {
    let manifest = store.manifest();
    let path = Session::require(&manifest, None, None).map_err(|e| format!("{e:#}"))?;
    let bos = manifest.tokenizer.as_ref().and_then(|t| t.bos).ok_or("the store records no BOS token")?;
    let context = manifest
        .capture_settings()
        .map_err(|e| format!("{e:#}"))?
        .ok_or("the store records no capture settings, so the contexts' length is unknown")?
        .context;
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
    let session = Session::load(&path).map_err(|e| format!("cannot load the store's model: {e:#}"))?;
    eval_splice(session.model(), spliced.dict, spliced.hook, spliced.input, &contexts)
        .map_err(|e| format!("splicing failed: {e:#}"))
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

/// The manifest's `hook` (what the dictionary reads) and `output_hook` (a transcoder's output).
fn hooks_of<C>(job: &Job<C>) -> (String, Option<String>) {
    match &job.input_hook {
        Some(input) => (input.clone(), Some(job.hook.clone())),
        None => (job.hook.clone(), None),
    }
}

fn entry<F: Fit>(job: &Job<F::Config>, trainer: &F, status: &str) -> DictEntry {
    let (kind, variant, n_features) = trainer.listing();
    let (hook, output_hook) = hooks_of(job);
    DictEntry {
        hook,
        output_hook,
        kind: kind.to_string(),
        variant,
        d_in: F::needs(trainer.config()).d_in as u32,
        n_features: n_features as u32,
        status: status.to_string(),
        step: trainer.steps(),
        tokens: trainer.tokens(),
        files: Vec::new(),
    }
}

/// Write checkpoint `step-N`, list it, then remove older checkpoint folders.
fn checkpoint<F: Fit>(
    store: &Store,
    job: &Job<F::Config>,
    trainer: &F,
    meta: &SaeMeta,
    log: &[TrainLogRow],
    pos: Position,
) -> Result<()> {
    let rel = format!("checkpoints/step-{:08}", trainer.steps());
    let root = store.dictionary_dir(&job.name);
    let dir = root.join(&rel);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    trainer.save_checkpoint(&dir, meta, &json!({ "epoch": pos.epoch, "batch": pos.batch }))?;
    write_train_log(&dir.join("train_log.arrow"), log)?;
    let files: Vec<String> =
        trainer.checkpoint_files().iter().chain(&["train_log.arrow"]).map(|f| format!("{rel}/{f}")).collect();
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    store.commit_dictionary(&job.name, entry(job, trainer, "training"), &files)?;
    remove_old_checkpoints::<F>(&root, Some(&rel))
}

/// SAELens metadata from the store: model name, hook (and a transcoder's input hook), and the
/// capture's context settings (none when the store records no capture; an error when its record
/// is malformed).
fn meta_of(manifest: &loupe_store::Manifest, hook: &str, input_hook: Option<&str>) -> Result<SaeMeta> {
    let settings = manifest.capture_settings()?;
    Ok(SaeMeta {
        model_name: manifest.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        hook_name: hook.to_string(),
        input_hook: input_hook.map(str::to_string),
        context_size: settings.as_ref().map(|s| s.context),
        prepend_bos: settings.as_ref().map(|s| s.bos),
        dataset_path: settings.map(|s| s.corpus),
    })
}
