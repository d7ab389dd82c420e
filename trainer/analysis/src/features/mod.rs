//! Feature analysis (`loupe analyze`): what each feature of a dictionary responds to, from one
//! streaming pass of its sparse codes over held-out activations, written as the tables of
//! [`loupe_store::features`].
//!
//! - [`pass`]: the pass — rows in storage order, encoded once, fed to the accumulators
//!   ([`accumulate`]: stats, histograms, top examples, quantile samples) while the codes spill to
//!   a temporary file ([`codes_file`]);
//! - [`examples`]: token windows around the chosen activations, read from the spilled codes;
//! - [`cooccur`]: features that fire on the same tokens (exact Jaccard from the spilled codes);
//! - [`similar`]: each feature's neighbours by direction (the hnsw index over the directions is
//!   [`loupe_store::index`]'s);
//! - [`logits`]: the output tokens each direction promotes and suppresses.
//!
//! Which rows: by default the dictionary's held-out rows (`held_out_rows` of its `eval.json`),
//! or every row of the hook when it has none. When the store holds no activations for the
//! dictionary's hook, they are captured on the fly from the corpus into a temporary store that is
//! deleted afterwards.

pub mod accumulate;
pub mod codes_file;
pub mod cooccur;
pub mod examples;
pub mod logits;
pub mod pass;
pub mod similar;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use loupe_store::features::hist_bin_edge;
use loupe_store::{Bucket, DType, Example, FeatureRow, FeaturesEntry, Progress, Store};
use serde::Serialize;

use loupe_dict::Dictionary;
use loupe_dict::eval::DENSE_FREQUENCY;
use loupe_model::Session;

/// Which rows of the hook to analyse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rows {
    /// The dictionary's held-out rows, or all rows when it records none.
    HeldOut,
    All,
    Range(u64, u64),
}

impl std::str::FromStr for Rows {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Rows> {
        Ok(match s {
            "held-out" | "held_out" => Rows::HeldOut,
            "all" => Rows::All,
            _ => {
                let bad = || anyhow::anyhow!("bad --rows {s:?} (expected held-out, all, or START..END)");
                let (a, b) = s.split_once("..").ok_or_else(bad)?;
                let (a, b) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a >= b {
                    return Err(bad());
                }
                Rows::Range(a, b)
            }
        })
    }
}

/// What `loupe analyze` does.
#[derive(Clone, Debug)]
pub struct AnalyzeConfig {
    pub store: PathBuf,
    pub dictionary: String,
    pub rows: Rows,
    /// Analyse at most this many rows (the first of the chosen range).
    pub max_tokens: Option<u64>,
    /// Top-activating examples per feature.
    pub top: usize,
    /// Quantile buckets per feature, and examples per bucket.
    pub quantiles: usize,
    pub per_quantile: usize,
    /// Tokens per example window.
    pub window: usize,
    /// Neighbours (0: none, and no index), co-occurring features and logit tokens (each way)
    /// per feature.
    pub neighbours: usize,
    pub cooccurring: usize,
    pub logit_tokens: usize,
    /// Rows per encoding chunk.
    pub chunk: usize,
    /// The model (default: the store's), for logit effects, token strings and on-the-fly capture.
    pub model: Option<PathBuf>,
    /// The corpus for on-the-fly capture (default: the store's capture corpus).
    pub corpus: Option<PathBuf>,
    /// Tokens to capture on the fly when the store has no activations for the hook.
    pub capture_tokens: u64,
    pub index: loupe_store::index::IndexParams,
    /// Build and dump the hnsw index (the slow part for big dictionaries; the neighbour table
    /// does not need it).
    pub build_index: bool,
    /// Pair updates co-occurrence may spend (rows × active²).
    pub cooccurrence_work: f64,
}

impl AnalyzeConfig {
    pub fn new(store: PathBuf, dictionary: String) -> AnalyzeConfig {
        AnalyzeConfig {
            store,
            dictionary,
            rows: Rows::HeldOut,
            max_tokens: None,
            top: 20,
            quantiles: 10,
            per_quantile: 5,
            window: 32,
            neighbours: 10,
            cooccurring: 10,
            logit_tokens: 10,
            chunk: 4096,
            model: None,
            corpus: None,
            capture_tokens: 65_536,
            index: loupe_store::index::IndexParams::default(),
            build_index: true,
            cooccurrence_work: 2e9,
        }
    }
}

/// What an analysis did (also written as `features/<dict>/analysis.json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub dictionary: String,
    pub hook: String,
    /// Analysed rows of the hook (storage order), or of the on-the-fly capture.
    pub rows: Range<u64>,
    pub captured_on_the_fly: bool,
    pub tokens: u64,
    pub dead: usize,
    pub dense: usize,
    pub pass_seconds: f64,
    pub pass_tokens_per_second: f64,
    pub cooccurrence_rows: u64,
    /// What the tables lack or how they were made, when it is not the usual (e.g. no
    /// unembedding: no logit effects).
    pub notes: Vec<String>,
    /// Seconds spent in each phase after the pass.
    pub phase_seconds: Vec<(String, f64)>,
    pub seconds: f64,
}

/// Run an analysis and list its tables in the store. `progress` follows the stages: "encoding"
/// (rows), then "expert outputs" (Monet), "examples", "co-occurrence", "logit effects", "similarity
/// index" and "writing".
pub fn analyze(cfg: &AnalyzeConfig, progress: &dyn Progress) -> Result<Report> {
    let started = Instant::now();
    if cfg.window == 0 || cfg.window > u16::MAX as usize || cfg.chunk == 0 {
        bail!("--window must be 1..65535 and --chunk at least 1");
    }
    if cfg.neighbours > 255 || cfg.cooccurring > 255 || cfg.logit_tokens > 127 || cfg.quantiles > 255 {
        bail!("--neighbours and --cooccurring must be at most 255, --logit-tokens 127, --quantiles 255");
    }
    if cfg.top > u16::MAX as usize || cfg.per_quantile > u16::MAX as usize {
        bail!("--top and --per-quantile must be at most 65535");
    }
    let store = Store::open_rw(&cfg.store)?;
    let (entry, dict) = loupe_dict::open_in_store(&store, &cfg.dictionary)?;
    let hook = entry.hook.clone();
    let manifest = store.manifest();
    // Fail before the pass, not after it.
    let model_path = Session::locate(&manifest, cfg.model.as_deref(), Some("pass --model"))?;

    // The rows: the store's, or a temporary capture.
    let mut temp: Option<tempfile::TempDir> = None;
    let (acts, rows, captured) = match manifest.hooks.get(&hook) {
        Some(h) => {
            if h.spec.d as usize != dict.d_in() {
                bail!(
                    "dictionary {} reads d = {} but the store's {hook} has d = {} (trained on another model or hook?)",
                    cfg.dictionary,
                    dict.d_in(),
                    h.spec.d
                );
            }
            let acts = store.activations(&hook)?;
            let rows = choose_rows(&store, &cfg.dictionary, &cfg.rows, acts.rows())?;
            (acts, rows, false)
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("analyze-capture-")
                .tempdir_in(store.root())
                .context("cannot create a temporary capture folder in the store")?;
            capture_on_the_fly(cfg, &manifest, model_path.as_deref(), &hook, dir.path())?;
            let tmp_store = Store::open(dir.path())?;
            let acts = tmp_store.activations(&hook)?;
            if acts.spec().d as usize != dict.d_in() {
                bail!(
                    "dictionary {} reads d = {} but the model's {hook} has d = {}",
                    cfg.dictionary,
                    dict.d_in(),
                    acts.spec().d
                );
            }
            let n = acts.rows();
            temp = Some(dir);
            (acts, 0..n, true)
        }
    };
    let rows = match cfg.max_tokens {
        Some(m) => rows.start..rows.end.min(rows.start + m),
        None => rows,
    };
    if rows.is_empty() {
        bail!("no rows to analyse in {hook}");
    }

    let writer = store.features_writer(&cfg.dictionary)?;
    let codes_path = writer.dir().join(format!("codes{}", loupe_store::fsutil::TMP_SUFFIX));
    let total = rows.end - rows.start;
    let pass_cfg = pass::PassConfig { chunk: cfg.chunk, top: cfg.top, per_quantile: cfg.per_quantile };
    progress.stage("encoding");
    let out = pass::run(&acts, rows.clone(), dict.as_ref(), pass_cfg, &codes_path, |done| {
        progress.set(done, total)
    })?;
    // Each feature's direction: an SAE's decoder row, or a Monet expert's mean output on its top
    // examples (read back from the rows while they are still at hand).
    let mut notes = Vec::new();
    let directions: Option<std::borrow::Cow<[f32]>> = match dict.decoder_directions() {
        Some(dirs) => Some(dirs.into()),
        None => {
            progress.stage("expert outputs");
            progress.set(0, dict.n_features() as u64);
            let inputs = top_example_inputs(&acts, rows.start, &out.top)?;
            let dirs = dict.mean_feature_outputs(&inputs);
            if dirs.is_some() {
                notes
                    .push("feature directions are each expert's mean output on its top examples".to_string());
            }
            dirs.map(Into::into)
        }
    };
    drop(temp); // the rows' tokens are in `out.info`; the temporary capture can go

    let mut report = Report {
        dictionary: cfg.dictionary.clone(),
        hook: hook.clone(),
        rows: rows.clone(),
        captured_on_the_fly: captured,
        tokens: out.stats.tokens,
        pass_seconds: out.seconds,
        pass_tokens_per_second: out.stats.tokens as f64 / out.seconds.max(1e-9),
        notes,
        ..Report::default()
    };
    let mut clock = Instant::now();
    let mut lap = |report: &mut Report, phase: &str| {
        report.phase_seconds.push((phase.to_string(), clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    let tables = build_tables(cfg, dict.as_ref(), &out, &mut report, progress)?;
    lap(&mut report, "examples and co-occurrence");

    // Model-dependent parts: token strings and logit effects.
    let session = match &model_path {
        Some(p) => Some(Session::load(p)?),
        None => {
            report.notes.push("no model recorded in the store: no token strings or logit effects".into());
            None
        }
    };
    let vocab = match &session {
        Some(s) => s.tokenizer()?.vocab_strings(),
        None => Vec::new(),
    };
    lap(&mut report, "model and vocabulary");
    progress.stage("logit effects");
    progress.set(0, dict.n_features() as u64);
    let logit_rows = match (session.as_ref().map(Session::model), directions.as_deref()) {
        (Some(m), Some(dirs)) if dict.d_out() == m.config().d_model => {
            // Unit directions, so that values compare across features and dictionaries (an SAE's
            // decoder rows already are; a Monet expert's mean output is in activation units).
            let unit: Vec<f32> = similar::normalised(dirs, dict.d_out()).concat();
            Some(logits::logit_effects(m, &unit, dict.d_out(), cfg.logit_tokens)?)
        }
        (Some(_), Some(_)) => {
            report.notes.push(format!(
                "directions of width {} are not in the residual stream: no logit effects",
                dict.d_out()
            ));
            None
        }
        (_, None) => {
            report.notes.push(
                "the dictionary gives its features no direction: no logit effects or neighbours".into(),
            );
            None
        }
        (None, _) => None,
    };

    lap(&mut report, "logit effects");
    // Similar features.
    progress.stage("similarity index");
    progress.set(0, dict.n_features() as u64);
    let mut writer = writer;
    let neighbour_rows = match directions.as_deref() {
        Some(_) if cfg.neighbours == 0 => None,
        Some(dirs) => {
            let vectors = similar::normalised(dirs, dict.d_out());
            if cfg.build_index {
                let index = loupe_store::index::Index::build(&vectors, cfg.index);
                for file in index.dump(writer.index_dir(), loupe_store::index::DECODER_INDEX)? {
                    writer.add_index_file(&file);
                }
            } else {
                report.notes.push("no similarity index built (--no-index)".into());
            }
            Some(similar::exact_neighbours(&vectors, cfg.neighbours))
        }
        None => None,
    };

    lap(&mut report, "similarity index");
    let head_rows =
        head_attribution(&hook, session.as_ref(), directions.as_deref(), dict.as_ref(), &mut report)?;
    progress.stage("writing");
    progress.set(0, 1);
    writer.features(&tables.features)?;
    writer.examples(&tables.top, false)?;
    writer.examples(&tables.quantile, true)?;
    writer.cooccurrence(&tables.cooccurrence)?;
    writer.vocab(&vocab)?;
    if let Some(rows) = &logit_rows {
        writer.logits(rows)?;
    }
    if let Some(rows) = &neighbour_rows {
        writer.neighbours(rows)?;
    }
    if let Some(rows) = &head_rows {
        writer.head_attribution(rows)?;
    }
    lap(&mut report, "writing");
    report.seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&report)? + "\n";
    writer.json("analysis.json", &json)?;
    store.commit_features(
        writer,
        FeaturesEntry {
            hook,
            n_features: dict.n_features() as u32,
            tokens: report.tokens,
            files: Vec::new(),
        },
    )?;
    Ok(report)
}

/// For a dictionary at `blocks.L.attn.hook_z`: each feature's weight-based head attribution
/// (from its direction: an SAE's decoder row, a Monet expert's mean output); `None` for other
/// hooks, or with a note when the model (for the head count) or the directions are missing.
fn head_attribution(
    hook: &str,
    session: Option<&Session>,
    directions: Option<&[f32]>,
    dict: &dyn Dictionary,
    report: &mut Report,
) -> Result<Option<Vec<loupe_store::HeadAttribution>>> {
    if crate::heads::dfa::hook_z_layer(hook).is_none() {
        return Ok(None);
    }
    let (Some(session), Some(dirs)) = (session, directions) else {
        report.notes.push("no model or no feature directions: no head attribution".into());
        return Ok(None);
    };
    let c = session.model().config();
    if dict.d_out() != c.n_heads * c.d_head {
        report.notes.push(format!(
            "directions of width {} are not {} heads × {}: no head attribution",
            dict.d_out(),
            c.n_heads,
            c.d_head
        ));
        return Ok(None);
    }
    if dict.decoder_directions().is_none() {
        report.notes.push("head attribution is from each expert's mean output on its top examples".into());
    }
    let weights = crate::heads::dfa::head_attribution_of(dirs, dict.d_out(), c.n_heads)?;
    Ok(Some(
        weights
            .into_iter()
            .zip(0..)
            .map(|(weights, feature_id)| loupe_store::HeadAttribution { feature_id, weights })
            .collect(),
    ))
}

/// The input rows of every feature's top examples (`top[f]` rows are relative to `first`), as
/// `[examples, d]` per feature.
fn top_example_inputs(
    acts: &loupe_store::Activations,
    first: u64,
    top: &[Vec<(f32, u64)>],
) -> Result<Vec<Vec<f32>>> {
    let d = acts.spec().d as usize;
    let mut ends = Vec::new();
    let mut end = 0u64;
    for entry in acts.shard_entries() {
        end += entry.rows;
        ends.push(end);
    }
    let mut shards: Vec<Option<loupe_store::Shard>> = vec![None; ends.len()];
    let mut inputs = Vec::with_capacity(top.len());
    for examples in top {
        let mut x = Vec::with_capacity(examples.len() * d);
        for &(_, row) in examples {
            let global = first + row;
            let i = ends.partition_point(|&e| e <= global);
            let start = if i == 0 { 0 } else { ends[i - 1] };
            if shards[i].is_none() {
                shards[i] = Some(acts.open_shard(i)?);
            }
            let shard = shards[i].as_ref().expect("opened");
            x.extend(shard.act().row((global - start) as usize, d).to_f32());
        }
        inputs.push(x);
    }
    Ok(inputs)
}

/// The rows `choice` names, within a hook of `n` rows.
fn choose_rows(store: &Store, dict: &str, choice: &Rows, n: u64) -> Result<Range<u64>> {
    Ok(match choice {
        Rows::All => 0..n,
        Rows::Range(a, b) => {
            if *b > n {
                bail!("--rows {a}..{b} is beyond the hook's {n} rows");
            }
            *a..*b
        }
        Rows::HeldOut => {
            let path = store.dictionary_dir(dict).join("eval.json");
            let held = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| {
                    let r = v.get("held_out_rows")?.as_array()?.clone();
                    Some((r.first()?.as_u64()?, r.get(1)?.as_u64()?))
                });
            match held {
                Some((a, b)) if a < b && b <= n => a..b,
                _ => 0..n,
            }
        }
    })
}

/// Tokens per context of an on-the-fly capture when the store records no capture settings.
const ON_THE_FLY_CONTEXT: usize = 256;

/// Capture `cfg.capture_tokens` tokens of `hook` into a new store at `dir`, with the context
/// length of the store's own capture.
fn capture_on_the_fly(
    cfg: &AnalyzeConfig,
    manifest: &loupe_store::Manifest,
    model: Option<&Path>,
    hook: &str,
    dir: &Path,
) -> Result<()> {
    let settings = manifest.capture_settings()?;
    let model = model.context(format!(
        "the store has no activations for {hook} and records no model to capture them with (pass --model)"
    ))?;
    let corpus =
        cfg.corpus.clone().or_else(|| settings.as_ref().map(|s| PathBuf::from(&s.corpus))).context(
            format!("the store has no activations for {hook} and records no corpus (pass --corpus)"),
        )?;
    // A store that records no capture (its activations were written some other way) says no
    // context length: the on-the-fly capture then uses its own default.
    let context = settings.map_or(ON_THE_FLY_CONTEXT, |s| s.context);
    let capture = loupe_model::capture::CaptureConfig {
        model: model.to_path_buf(),
        corpus,
        store: dir.to_path_buf(),
        hooks: vec![hook.to_string()],
        context,
        stride: None,
        bos: true,
        dtype: DType::F32,
        grads: false,
        batch: 8,
        shard_rows: None,
        max_tokens: Some(cfg.capture_tokens),
    };
    loupe_model::capture::capture(&capture, &()).context("on-the-fly capture failed")?;
    Ok(())
}

/// The tables built from the pass alone.
struct Tables {
    features: Vec<FeatureRow>,
    top: Vec<Example>,
    quantile: Vec<Example>,
    cooccurrence: Vec<loupe_store::Cooccurrence>,
}

fn build_tables(
    cfg: &AnalyzeConfig,
    dict: &dyn Dictionary,
    out: &pass::PassOutput,
    report: &mut Report,
    progress: &dyn Progress,
) -> Result<Tables> {
    let n = dict.n_features();
    let stats = &out.stats;
    let bins = loupe_store::features::HIST_BINS;
    let features: Vec<FeatureRow> = (0..n)
        .map(|f| {
            let hist = &stats.hist[f * bins..(f + 1) * bins];
            let first = hist.iter().position(|&c| c > 0).unwrap_or(0);
            let last = hist.iter().rposition(|&c| c > 0).map_or(0, |l| l + 1);
            let density = stats.density(f);
            FeatureRow {
                feature_id: f as u32,
                count: stats.count[f],
                density: density as f32,
                mean_activation: stats.mean(f) as f32,
                max_activation: stats.max[f],
                dead: stats.count[f] == 0,
                dense: density > DENSE_FREQUENCY,
                hist_first_bin: first as u16,
                hist: hist[first..last.max(first)].to_vec(),
            }
        })
        .collect();
    report.dead = features.iter().filter(|r| r.dead).count();
    report.dense = features.iter().filter(|r| r.dense).count();

    progress.stage("examples");
    progress.set(0, n as u64);
    let windows = examples::Windows { info: &out.info, codes: &out.codes, window: cfg.window };
    let mut top = Vec::new();
    let mut quantile = Vec::new();
    for f in 0..n {
        for (rank, &(value, row)) in out.top[f].iter().enumerate() {
            top.push(windows.example(f as u32, rank as u16, value, row, None));
        }
        let hist = &stats.hist[f * bins..(f + 1) * bins];
        for (index, b) in out.quantiles.buckets(f, hist, cfg.quantiles).iter().enumerate() {
            let bucket = Bucket {
                index: index as u8,
                lo: if b.bins.start == 0 { 0.0 } else { hist_bin_edge(b.bins.start) },
                hi: if b.bins.end == bins { f32::INFINITY } else { hist_bin_edge(b.bins.end) },
                tokens: b.tokens,
            };
            for (rank, s) in b.sample.iter().enumerate() {
                quantile.push(windows.example(f as u32, rank as u16, s.value, s.row, Some(bucket)));
            }
        }
    }

    progress.stage("co-occurrence");
    progress.set(0, n as u64);
    let used = cooccur::rows_used(&out.codes, cfg.cooccurrence_work);
    report.cooccurrence_rows = used as u64;
    let cooccurrence = cooccur::cooccurrence(&out.codes, n, used, cfg.cooccurring);
    Ok(Tables { features, top, quantile, cooccurrence })
}
