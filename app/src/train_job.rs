//! What `train-sae` and `train-monet` share: settings from flags over a TOML file, and running a
//! training job with a progress bar and a report of its evaluation.

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loupe_trainer::dict::job::{self, Fit, Job};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// `flags` over the settings of the TOML file `config` (when given): a flag that was given (not
/// absent, not a `false` switch) wins. `A`'s fields are the flags, with the same snake_case keys
/// as the file.
pub fn merged<A: Serialize + DeserializeOwned + Clone>(flags: &A, config: Option<&Path>) -> Result<A> {
    let Some(path) = config else { return Ok(flags.clone()) };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    let file: A = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config {} is malformed: {}", path.display(), e.message()))?;
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

/// Run `job` with a progress bar; print `banner` once the first step is done (so that a refused
/// job prints only its error line), then the outcome.
pub fn run<F: Fit>(job: &Job<F::Config>, banner: String, active: &str) -> Result<()> {
    let bar = ProgressBar::new(job.tokens);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tokens {per_sec} ETA {eta} {msg}")
            .expect("valid template"),
    );
    let mut banner = Some(banner);
    let outcome = job::run::<F>(job, |p| {
        if let Some(b) = banner.take() {
            if bar.is_hidden() { eprintln!("{b}") } else { bar.println(b) }
        }
        bar.set_position(p.tokens.min(p.target));
        let saved = if p.checkpointed { " (checkpoint)" } else { "" };
        bar.set_message(format!(
            "step {} FVU {:.4} {active} {:.1} dead {:.1}%{saved}",
            p.step,
            p.stats.fvu,
            p.stats.l0,
            100.0 * p.stats.dead_fraction
        ));
    })?;
    bar.finish();
    if let Some(step) = outcome.resumed_from {
        eprintln!("resumed from the checkpoint at step {step}");
    }
    let e = &outcome.eval;
    eprintln!(
        "done: {} steps, {} tokens → {}\nheld-out ({} tokens): FVU {:.4}, {active} {:.2}, dead {:.2}%, dense {:.2}%",
        outcome.steps,
        outcome.tokens,
        outcome.dir.display(),
        e.tokens,
        e.fvu,
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
