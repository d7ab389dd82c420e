//! `train-clt` over a store: every covered layer's MLP input and output read together, training,
//! held-out evaluation, all-layer splicing, files and listing.
//!
//! The store must hold, for every layer L covered, `blocks.L.ln2.hook_normalized` and
//! `blocks.L.hook_mlp_out`, captured together (same rows): 2 × layers × d_model values per token
//! (f16: 46 KB per token for Gemma 3 270M's 18 layers × 640). One seeded sampler per hook draws
//! the same rows (checked batch by batch). The last `eval_tokens` rows are held out; the rest are
//! drawn epoch after epoch until `tokens` training tokens have been seen. With `normalize`, each
//! hook is scaled to mean norm √d on the first batch while training; the final files read raw
//! activations.
//!
//! There are no checkpoints: a run that stops leaves nothing listed (its partial files are
//! removed by the next run of the same name), and a listed CLT is finished.
//!
//! Manifest entry: kind `clt`, variant `topk`, `hook` the first covered layer's
//! `ln2.hook_normalized`, `output_hook` the last covered layer's `hook_mlp_out`, `d_in` d_model,
//! `n_features` the features of all layers together.
//!
//! `eval.json`: per layer (held-out rows) FVU, L0, dead fraction, and the JumpReLU threshold written
//! for circuit-tracer; their means; and the all-layer splice (CE-loss recovered and KL with every
//! covered MLP replaced at once, [`crate::splice_all`]) — measured only when the CLT covers every
//! layer of the model.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use loupe_model::Session;
use loupe_store::dictionaries::{TrainLogRow, write_train_log};
use loupe_store::{Activations, DictEntry, Progress, Sampler, SamplerConfig, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::files::{self, hooks};
use super::train::{CltConfig, CltTrainer};
use super::{Clt, codes_topk};
use crate::io::SaeMeta;
use crate::kernels::kth_largest;
use crate::splice::{SpliceStats, contexts_from_rows};

/// Rows evaluated at a time.
const EVAL_CHUNK: usize = 4096;

/// Everything a `train-clt` run needs; `train`'s scales are set by the job.
#[derive(Clone, Debug)]
pub struct CltJob {
    pub store: PathBuf,
    pub name: String,
    pub train: CltConfig,
    pub tokens: u64,
    pub eval_tokens: u64,
    pub eval_contexts: usize,
    pub normalize: bool,
}

/// One layer's held-out measurements.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerEval {
    pub layer: usize,
    pub fvu: f64,
    pub l0: f64,
    pub dead_fraction: f64,
    /// The JumpReLU threshold written for circuit-tracer: the (k · rows)-th largest
    /// pre-activation of the first held-out chunk.
    pub threshold: f32,
}

/// The held-out evaluation of a CLT.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CltEval {
    pub tokens: u64,
    pub layers: Vec<LayerEval>,
    pub mean_fvu: f64,
    pub mean_l0: f64,
    pub dead_fraction: f64,
}

/// How a run ended.
#[derive(Debug)]
pub struct CltOutcome {
    pub dir: PathBuf,
    pub steps: u64,
    pub tokens: u64,
    pub eval: CltEval,
    pub splice: std::result::Result<SpliceStats, String>,
}

/// The covered layers' input and output activations, checked: present, width d, same rows.
struct Hooks {
    inputs: Vec<Activations>,
    outputs: Vec<Activations>,
    rows: u64,
}

fn open_hooks(store: &Store, cfg: &CltConfig) -> Result<Hooks> {
    let manifest = store.manifest();
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    let mut rows = None;
    for i in 0..cfg.n_layers {
        let (input, output) = hooks(cfg.first_layer, i);
        for name in [&input, &output] {
            let Some(entry) = manifest.hooks.get(name) else {
                bail!(
                    "store {} has no activations for hook {name}: a CLT over layers {}..={} needs every \
                     layer's ln2.hook_normalized and hook_mlp_out, captured together",
                    store.root().display(),
                    cfg.first_layer,
                    cfg.first_layer + cfg.n_layers - 1
                );
            };
            if entry.spec.d as usize != cfg.d {
                bail!("hook {name} has width {}, the CLT's is {}", entry.spec.d, cfg.d);
            }
            match rows {
                None => rows = Some(entry.rows()),
                Some(r) if r != entry.rows() => bail!(
                    "hook {name} holds {} rows, blocks.{}.ln2.hook_normalized holds {r}: the hooks were not \
                     captured together",
                    entry.rows(),
                    cfg.first_layer
                ),
                Some(_) => {}
            }
        }
        inputs.push(store.activations(&input)?);
        outputs.push(store.activations(&output)?);
    }
    Ok(Hooks { inputs, outputs, rows: rows.unwrap_or(0) })
}

/// Run `job`. `progress` follows the training tokens (stage "training").
pub fn run(job: &CltJob, progress: &dyn Progress) -> Result<CltOutcome> {
    loupe_store::dictionaries::check_dictionary_name(&job.name)?;
    job.train.validate()?;
    let store = Store::open_rw(&job.store)?;
    let cfg = &job.train;
    let h = open_hooks(&store, cfg)?;
    if job.eval_tokens >= h.rows {
        bail!("the hooks have {} rows; --eval-tokens {} leaves nothing to train on", h.rows, job.eval_tokens);
    }
    let train_rows = h.rows - job.eval_tokens;
    if train_rows < cfg.batch as u64 {
        bail!("the hooks have {train_rows} training rows, fewer than one batch of {}", cfg.batch);
    }
    if let Some(entry) = store.dictionary(&job.name) {
        bail!(
            "dictionary {} already exists in {} ({} {}, {}); train-clt has no checkpoints to resume from: \
             choose another --dictionary, or remove it",
            job.name,
            job.store.display(),
            entry.kind,
            entry.variant,
            entry.status
        );
    }
    let dir = store.dictionary_dir(&job.name);
    let ours = files::file_names(cfg.n_layers);
    loupe_store::fsutil::clear_leftovers(&dir, |f| {
        ours.iter().any(|o| o == f) || f == "eval.json" || f == "train_log.arrow" || f.ends_with(".tmp")
    })?;
    let sampler_cfg = SamplerConfig {
        seed: cfg.seed,
        drop_last: true,
        row_limit: Some(train_rows),
        ..SamplerConfig::new(cfg.batch)
    };
    let samplers: Vec<Sampler> =
        h.inputs.iter().chain(&h.outputs).map(|a| Sampler::new(a, sampler_cfg)).collect::<Result<_>>()?;
    let mut train = cfg.clone();
    let scales: Vec<f32> = if job.normalize {
        samplers.iter().map(|s| mean_norm_scale(s, cfg.d)).collect::<Result<_>>()?
    } else {
        vec![1.0; 2 * cfg.n_layers]
    };
    let l = cfg.n_layers;
    train.input_scale = scales[..l].to_vec();
    train.output_scale = scales[l..].to_vec();
    let mut trainer = CltTrainer::new(train)?;

    let mut log = Vec::new();
    let mut epoch = 0u64;
    let mut epochs: Vec<loupe_store::Epoch> = samplers.iter().map(|s| s.epoch(epoch)).collect();
    let mut batches: Vec<loupe_store::Batch> = samplers.iter().map(Sampler::empty_batch).collect();
    let mut values: Vec<Vec<f32>> = vec![Vec::new(); 2 * l];
    progress.stage("training");
    while trainer.tokens < job.tokens {
        let mut got: Vec<bool> = epochs.iter_mut().zip(&mut batches).map(|(e, b)| e.next_into(b)).collect();
        if !got[0] {
            epoch += 1;
            epochs = samplers.iter().map(|s| s.epoch(epoch)).collect();
            got = epochs.iter_mut().zip(&mut batches).map(|(e, b)| e.next_into(b)).collect();
            if !got[0] {
                bail!("the sampler delivered no batch ({train_rows} training rows)");
            }
        }
        for (b, ok) in batches.iter().zip(&got) {
            if !ok || b.doc != batches[0].doc || b.pos != batches[0].pos {
                bail!("the hooks' samplers drew different rows: were they captured together?");
            }
        }
        for (b, v) in batches.iter().zip(&mut values) {
            b.act.as_ref().to_f32_into(v);
        }
        let xs: Vec<&[f32]> = values[..l].iter().map(Vec::as_slice).collect();
        let ys: Vec<&[f32]> = values[l..].iter().map(Vec::as_slice).collect();
        let stats = trainer.step(&xs, &ys).with_context(|| format!("step {}", trainer.step + 1))?;
        let fvu = stats.mean_fvu();
        if !fvu.is_finite() {
            bail!("training diverged at step {} (FVU {fvu}); try a lower --lr", trainer.step);
        }
        log.push(TrainLogRow {
            step: trainer.step,
            tokens: trainer.tokens,
            fvu,
            l0: stats.l0,
            aux_loss: stats.aux_loss,
            dead_fraction: stats.dead_fraction,
        });
        progress.set(trainer.tokens.min(job.tokens), job.tokens);
        progress.message(&format!(
            "step {} mean FVU {fvu:.4} L0/layer {:.1} dead {:.1}%",
            trainer.step,
            stats.l0,
            100.0 * stats.dead_fraction
        ));
    }
    let (steps, tokens) = (trainer.step, trainer.tokens);
    let config = trainer.cfg.clone();
    let mut clt = trainer.folded();
    drop(trainer);

    progress.stage("evaluating");
    let eval = evaluate(&clt, &h, train_rows..h.rows)?;
    for (t, e) in clt.threshold.iter_mut().zip(&eval.layers) {
        t.fill(e.threshold);
    }
    let manifest = store.manifest();
    let settings = manifest.capture_settings()?;
    let meta = SaeMeta {
        model_name: manifest.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        hook_name: hooks(clt.first_layer, 0).0,
        input_hook: None,
        context_size: settings.as_ref().map(|s| s.context),
        prepend_bos: settings.as_ref().map(|s| s.bos),
        dataset_path: settings.map(|s| s.corpus),
    };
    files::save(&clt, &meta, Some(&config), &dir)?;
    let splice = if job.eval_contexts == 0 {
        Err("skipped (--eval-contexts 0)".to_string())
    } else {
        progress.stage("splicing");
        splice_held_out(&store, &clt, &job.name, &h.inputs[0], train_rows..h.rows, job.eval_contexts)
    };
    write_train_log(&dir.join("train_log.arrow"), &log)?;
    let splice_json = match &splice {
        Ok(s) => json!(s),
        Err(why) => json!({ "skipped": why }),
    };
    let eval_json = serde_json::to_string_pretty(&json!({
        "held_out": eval,
        "held_out_rows": [train_rows, h.rows],
        "splice_all_layers": splice_json,
    }))?;
    loupe_store::fsutil::write_atomic(&dir.join("eval.json"), (eval_json + "\n").as_bytes())?;
    let entry = DictEntry {
        hook: hooks(clt.first_layer, 0).0,
        output_hook: Some(hooks(clt.first_layer, clt.n_layers - 1).1),
        kind: "clt".into(),
        variant: "topk".into(),
        d_in: clt.d as u32,
        n_features: (clt.n_features * clt.n_layers) as u32,
        status: "done".into(),
        step: steps,
        tokens,
        files: Vec::new(),
    };
    let mut listed: Vec<&str> = ours.iter().map(String::as_str).collect();
    listed.extend(["train_log.arrow", "eval.json"]);
    store.commit_dictionary(&job.name, entry, &listed)?;
    Ok(CltOutcome { dir, steps, tokens, eval, splice })
}

/// √d over the mean norm of the sampler's first batch of epoch 0.
fn mean_norm_scale(sampler: &Sampler, d: usize) -> Result<f32> {
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

/// Rows `lo..hi` (storage order, across shards) of `acts`, as f32.
fn read_rows(acts: &Activations, lo: u64, hi: u64, d: usize) -> Result<Vec<f32>> {
    let (mut out, mut buf) = (Vec::with_capacity((hi - lo) as usize * d), Vec::new());
    let mut offset = 0u64;
    for s in 0..acts.num_shards() {
        let shard = acts.open_shard(s)?;
        let n = shard.rows() as u64;
        let (a, b) = (lo.max(offset), hi.min(offset + n));
        if a < b {
            shard.act().rows((a - offset) as usize..(b - offset) as usize, d).to_f32_into(&mut buf);
            out.extend_from_slice(&buf);
        }
        offset += n;
    }
    Ok(out)
}

/// Per-layer FVU (Σ‖y − ŷ‖² / Σ‖y − ȳ‖²), L0 and dead fraction of `clt` on `rows`, and each
/// layer's JumpReLU threshold for circuit-tracer (from the first chunk).
fn evaluate(clt: &Clt, h: &Hooks, rows: std::ops::Range<u64>) -> Result<CltEval> {
    let (l, n, d) = (clt.n_layers, clt.n_features, clt.d);
    let mut err = vec![0f64; l];
    let mut sum_sq = vec![0f64; l];
    let mut sum = vec![vec![0f64; d]; l];
    let mut nnz = vec![0u64; l];
    let mut fires = vec![vec![false; n]; l];
    let mut threshold = vec![0f32; l];
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + EVAL_CHUNK as u64).min(rows.end);
        let xs: Vec<Vec<f32>> =
            h.inputs.iter().map(|a| read_rows(a, start, end, d)).collect::<Result<_>>()?;
        let mut codes = Vec::with_capacity(l);
        for (i, x) in xs.iter().enumerate() {
            let pre = clt.pre_activations(i, x);
            if start == rows.start {
                threshold[i] = kth_largest(&pre, clt.k * (end - start) as usize);
            }
            codes.push(codes_topk(&pre, n, clt.k));
        }
        let out = clt.decode(&codes);
        for i in 0..l {
            let y = read_rows(&h.outputs[i], start, end, d)?;
            for (row, rec) in y.chunks(d).zip(out[i].chunks(d)) {
                for ((v, r), s) in row.iter().zip(rec).zip(sum[i].iter_mut()) {
                    err[i] += ((v - r) as f64).powi(2);
                    sum_sq[i] += (*v as f64).powi(2);
                    *s += *v as f64;
                }
            }
            nnz[i] += codes[i].nnz() as u64;
            for &f in &codes[i].feature {
                fires[i][f as usize] = true;
            }
        }
        start = end;
    }
    let tokens = rows.end - rows.start;
    let layers: Vec<LayerEval> = (0..l)
        .map(|i| {
            let mean_sq: f64 = sum[i].iter().map(|s| s * s).sum::<f64>() / tokens as f64;
            let variance = (sum_sq[i] - mean_sq).max(f64::MIN_POSITIVE);
            LayerEval {
                layer: clt.first_layer + i,
                fvu: err[i] / variance,
                l0: nnz[i] as f64 / tokens as f64,
                dead_fraction: fires[i].iter().filter(|f| !**f).count() as f64 / n as f64,
                threshold: threshold[i],
            }
        })
        .collect();
    let mean = |f: fn(&LayerEval) -> f64| layers.iter().map(f).sum::<f64>() / l as f64;
    Ok(CltEval {
        tokens,
        mean_fvu: mean(|e| e.fvu),
        mean_l0: mean(|e| e.l0),
        dead_fraction: mean(|e| e.dead_fraction),
        layers,
    })
}

/// The contexts (BOS + tokens) of held-out rows `rows`, at most `max`, as capture made them.
pub fn held_out_contexts(
    store: &Store,
    acts: &Activations,
    rows: std::ops::Range<u64>,
    max: usize,
) -> Result<Vec<Vec<u32>>> {
    let manifest = store.manifest();
    let bos = manifest.tokenizer.as_ref().and_then(|t| t.bos).context("the store records no BOS token")?;
    let context = manifest
        .capture_settings()?
        .context("the store records no capture settings, so the contexts' length is unknown")?
        .context;
    let (mut doc, mut pos, mut token) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0u64;
    for i in 0..acts.num_shards() {
        let shard = acts.open_shard(i)?;
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
    Ok(contexts_from_rows(&doc, &pos, &token, bos, context, max))
}

/// All-layer CE-loss recovered and KL on the first `max` held-out contexts, with the store's
/// model; an `Err` says why it could not be measured.
fn splice_held_out(
    store: &Store,
    clt: &Clt,
    name: &str,
    acts: &Activations,
    rows: std::ops::Range<u64>,
    max: usize,
) -> std::result::Result<SpliceStats, String> {
    let manifest = store.manifest();
    let path = Session::require(&manifest, None, None).map_err(|e| format!("{e:#}"))?;
    let contexts = held_out_contexts(store, acts, rows, max).map_err(|e| format!("{e:#}"))?;
    let session = Session::load(&path).map_err(|e| format!("cannot load the store's model: {e:#}"))?;
    let set = clt.to_set(name, session.model().config().n_layers).map_err(|e| format!("{e:#}"))?;
    crate::splice_all::eval_splice_all(session.model(), &set, &contexts)
        .map_err(|e| format!("splicing failed: {e:#}"))
}
