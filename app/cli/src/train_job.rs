//! What `train-sae` and `train-monet` share: settings from flags over a TOML file, and running a
//! training job with a progress bar and a report of its evaluation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use loupe_dict::job::{self, Fit, Job};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::dict_args::DictArgs;
use crate::progress::Bar;

/// The settings of every training job, as flags (flattened into each command's) or TOML keys.
#[derive(clap::Args, Serialize, serde::Deserialize, Default, Debug, Clone)]
pub struct JobFlags {
    /// TOML file with any of these settings (keys as the flags, with '_' for '-').
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The store holding the activations (the dictionary is written into it) and the name of
    /// the dictionary (`--name`, the key `name`: its old spelling).
    #[command(flatten)]
    #[serde(flatten)]
    pub target: DictArgs,
    /// The hook the dictionary reconstructs and is spliced at (e.g. blocks.6.hook_resid_post).
    #[arg(long)]
    pub hook: Option<String>,
    /// Training tokens (default: one pass over the training rows).
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Tokens per step (default 4096).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of the initialisation and the shuffle (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between checkpoints (default 50; 0: only the final files).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Rows at the end of the hook held out for evaluation (default 16384, at most a tenth).
    #[arg(long)]
    pub eval_tokens: Option<u64>,
    /// Held-out contexts run through the model with the dictionary spliced in, for CE-loss
    /// recovered and KL (default 8; 0 skips it).
    #[arg(long)]
    pub eval_contexts: Option<usize>,
    /// Train on raw activations instead of ones scaled to mean norm √d (the final files read raw
    /// activations either way).
    #[arg(long)]
    #[serde(default)]
    pub no_normalize: bool,
}

impl JobFlags {
    pub fn store(&self) -> Result<PathBuf> {
        self.target.store.clone().context("no --store given (flag or config)")
    }

    pub fn hook(&self) -> Result<String> {
        self.hook.clone().context("no --hook given (flag or config)")
    }

    /// Width and rows of `hook` in the store.
    pub fn shape_of(&self, hook: &str) -> Result<(usize, u64)> {
        let path = self.store()?;
        let store = loupe_store::Store::open(&path)?;
        let manifest = store.manifest();
        let Some(entry) = manifest.hooks.get(hook) else {
            let known: Vec<&str> = manifest.hooks.keys().map(String::as_str).collect();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            bail!("store {} has no activations for hook {hook} (it has: {known})", path.display());
        };
        Ok((entry.spec.d as usize, entry.rows()))
    }

    /// Training and held-out tokens for a hook of `rows` rows.
    pub fn split(&self, rows: u64) -> (u64, u64) {
        let eval_tokens = self.eval_tokens.unwrap_or((rows / 10).min(16384));
        (self.tokens.unwrap_or(rows.saturating_sub(eval_tokens)), eval_tokens)
    }

    /// The job, with `train` and the dictionary name `default_name` unless --dictionary was given.
    pub fn job<C>(
        &self,
        train: C,
        rows: u64,
        input_hook: Option<String>,
        default_name: String,
    ) -> Result<Job<C>> {
        let (tokens, eval_tokens) = self.split(rows);
        // (job::run refuses a split that leaves no training rows.)
        if self.tokens == Some(0) {
            bail!("--tokens 0 would train nothing; give at least 1 (or leave it out for one pass)");
        }
        Ok(Job {
            store: self.store()?,
            hook: self.hook()?,
            input_hook,
            name: self.target.dictionary.clone().unwrap_or(default_name),
            train,
            tokens,
            checkpoint_every: self.checkpoint_every.unwrap_or(50),
            eval_tokens,
            eval_contexts: self.eval_contexts.unwrap_or(8),
            normalize: !self.no_normalize,
        })
    }
}

/// Keys of a config read under a newer name: (old, new).
const RENAMED_KEYS: [(&str, &str); 1] = [("name", "dictionary")];

/// `flags` over the settings of the TOML file `config` (when given): a flag that was given (not
/// absent, not a `false` switch) wins. `A`'s fields are the flags, with the same snake_case keys
/// as the file (or their old names, [`RENAMED_KEYS`]); a key that is not one of them is an error.
/// Every error names the file, the line and the key.
pub fn merged<A: Serialize + DeserializeOwned + Clone + Default>(
    flags: &A,
    config: Option<&Path>,
) -> Result<A> {
    let Some(path) = config else { return Ok(flags.clone()) };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    let line_at = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let malformed = |e: toml::de::Error| {
        let at = e.span().map(|s| format!(" at line {}", line_at(s.start))).unwrap_or_default();
        anyhow::anyhow!("config {} is malformed{at}: {}", path.display(), plain_reason(e.message()))
    };
    let spans = toml::de::DeTable::parse(&text).map_err(malformed)?;
    let lines: Vec<(String, usize)> =
        spans.get_ref().iter().map(|(k, _)| (k.get_ref().to_string(), line_at(k.span().start))).collect();
    let line_of = |key: &str| lines.iter().find(|(k, _)| k == key).map_or(0, |(_, l)| *l);
    // (serde's deny_unknown_fields does not work with the flattened JobFlags, so check here.)
    let Value::Object(known) = serde_json::to_value(A::default())? else {
        unreachable!("flags are a struct")
    };
    let written: toml::Table = toml::from_str(&text).map_err(malformed)?;
    let mut table = toml::Table::new();
    for (key, value) in &written {
        let line = line_of(key);
        let name = RENAMED_KEYS.iter().find(|(old, _)| old == key).map_or(key.as_str(), |(_, new)| new);
        if name != key && written.contains_key(name) {
            bail!(
                "config {}, line {line}: `{key}` is the old name of `{name}`; give one of them",
                path.display()
            );
        }
        if !known.contains_key(name) {
            let mut names: Vec<&str> = known.keys().map(String::as_str).collect();
            names.sort();
            bail!(
                "config {}, line {line}: unknown field `{key}` (known: {})",
                path.display(),
                names.join(", ")
            );
        }
        // One key at a time, so that a type error names its key.
        let one = toml::Table::from_iter([(name.to_string(), value.clone())]);
        if let Err(e) = toml::Value::Table(one).try_into::<A>() {
            bail!("config {}, line {line}, key `{key}`: {}", path.display(), plain_reason(e.message()));
        }
        table.insert(name.to_string(), value.clone());
    }
    let file: A = toml::Value::Table(table)
        .try_into()
        .map_err(|e| anyhow::anyhow!("config {}: {}", path.display(), plain_reason(e.message())))?;
    let mut out = serde_json::to_value(file)?;
    if let (Value::Object(out), Value::Object(given)) = (&mut out, serde_json::to_value(flags)?) {
        for (key, value) in given {
            if !matches!(value, Value::Null | Value::Bool(false)) {
                out.insert(key, value);
            }
        }
    }
    Ok(serde_json::from_value(out)?)
}

/// A deserializer's reason on one line, with Rust's type names said in words.
fn plain_reason(message: &str) -> String {
    let mut out = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    for (rust, words) in [
        ("expected usize", "expected a whole number ≥ 0"),
        ("expected u64", "expected a whole number ≥ 0"),
        ("expected u32", "expected a whole number ≥ 0"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        out = out.replace(rust, words);
    }
    out
}

/// Run `job` with a progress bar; print `banner` once the first step is done (so that a refused
/// job prints only its error line), then the outcome.
pub fn run<F: Fit>(job: &Job<F::Config>, banner: String) -> Result<()> {
    let bar = Bar::new("{bar:30} {pos}/{len} tokens {per_sec} ETA {eta} {msg}").with_banner(banner);
    let outcome = job::run::<F>(job, &bar)?;
    bar.indicatif().finish();
    if let Some(step) = outcome.resumed_from {
        eprintln!("resumed from the checkpoint at step {step}");
    }
    let e = &outcome.eval;
    eprintln!(
        "done: {} steps, {} tokens → {}\nheld-out ({} tokens): FVU {:.4}, {} {:.2}, dead {:.2}%, dense {:.2}%",
        outcome.steps,
        outcome.tokens,
        outcome.dir.display(),
        e.tokens,
        e.fvu,
        F::ACTIVE,
        e.l0,
        100.0 * e.dead_fraction,
        100.0 * e.dense_fraction
    );
    match &outcome.splice {
        Ok(s) => eprintln!(
            "spliced into the model ({} contexts, {} predictions): CE clean {:.4}, spliced {:.4}, zero-ablated {:.4} \
             → CE-loss recovered {:.4}, KL {:.4}",
            s.contexts, s.tokens, s.ce_clean, s.ce_spliced, s.ce_zero_ablation, s.ce_loss_recovered, s.kl
        ),
        Err(why) => eprintln!("CE-loss recovered: not measured: {why}"),
    }
    Ok(())
}
