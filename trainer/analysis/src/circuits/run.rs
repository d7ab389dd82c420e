//! `loupe circuit`: one method on a store's model and a task file, timed, written as a circuit
//! entry; `loupe circuit eval`: every fast method against the ground truth, written as an
//! evaluation entry.
//!
//! A method's wall time includes the clean and corrupt runs ([`Runs::new`]) it needs: each method
//! run alone pays for them. Everything that can be checked is checked before the model runs
//! (the circuit's name, then the task file); the tables and the entry are written in one manifest
//! commit ([`Store::write_circuit`]), replacing the circuit of that name.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Result, bail};
use loupe_model::{HookedModel, ModelConfig, Session};
use loupe_store::circuits::{CircuitEntry, EdgeRow, NodeRow, TaskInfo, check_circuit_name};
use loupe_store::{Progress, Store};

use super::attribution::attribution;
use super::discrete_sae::{DiscreteSaeConfig, discrete_sae};
use super::eval_run::{circuit_rows, task_info};
use super::patch::Runs;
use super::patching::patching;
use super::{Scores, Task};

/// A method of `loupe circuit --method` (names as in [`loupe_store::circuits::CIRCUIT_METHODS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Patching,
    Attribution,
    DiscreteSae,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Patching => "patching",
            Method::Attribution => "attribution",
            Method::DiscreteSae => "discrete-sae",
        }
    }
}

impl FromStr for Method {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "patching" => Ok(Method::Patching),
            "attribution" => Ok(Method::Attribution),
            "discrete-sae" => Ok(Method::DiscreteSae),
            _ => bail!("unknown method {s:?}; the methods are patching, attribution, discrete-sae"),
        }
    }
}

/// The name a circuit gets without `--name`: the task file's stem and the method
/// (`ioi-patching`).
pub fn default_name(task_file: &str, method: Method) -> String {
    let stem = task_file.strip_suffix(".jsonl").unwrap_or(task_file);
    format!("{stem}-{}", method.name())
}

/// Run `method` on `task` (its runs already made) and return its scores with its wall time in
/// seconds (the shared clean/corrupt runs included: each method needs them, so they are made
/// again inside the timing, and dropped; the scores come from `runs`).
pub fn compute(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    method: Method,
    discrete: &DiscreteSaeConfig,
    progress: &dyn Progress,
) -> Result<(Scores, f64)> {
    let start = Instant::now();
    progress.stage("clean and corrupt runs");
    drop(Runs::new(model, task)?);
    let scores = scores(model, task, runs, method, discrete, progress)?;
    Ok((scores, start.elapsed().as_secs_f64()))
}

/// `method`'s scores on `runs`.
fn scores(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    method: Method,
    discrete: &DiscreteSaeConfig,
    progress: &dyn Progress,
) -> Result<Scores> {
    match method {
        Method::Patching => Ok(Scores {
            nodes: super::nodes(model.config()),
            node_scores: patching(model, task, runs, progress)?,
            edges: Vec::new(),
        }),
        Method::Attribution => attribution(model, task, runs, progress),
        Method::DiscreteSae => discrete_sae(model, task, runs, discrete, progress),
    }
}

/// What `loupe circuit` wrote.
#[derive(Clone, Debug)]
pub struct CircuitReport {
    pub name: String,
    pub entry: CircuitEntry,
    /// One row per node (heads before the MLP of each layer) and per scored edge, as written.
    pub nodes: Vec<NodeRow>,
    pub edges: Vec<EdgeRow>,
}

/// Run `method` on the task file `task_path` with `session`'s model and write the circuit `name`
/// into `store` (open for writing).
pub fn run(
    store: &Store,
    session: &Session,
    task_path: &Path,
    method: Method,
    name: &str,
    progress: &dyn Progress,
) -> Result<CircuitReport> {
    check_circuit_name(name)?;
    let task = Task::load(task_path, session.tokenizer()?)?;
    let model = session.model();
    let c = model.config().clone();
    let discrete = DiscreteSaeConfig::default();
    let start = Instant::now();
    progress.stage("clean and corrupt runs");
    let runs = Runs::new(model, &task)?;
    let scores = scores(model, &task, &runs, method, &discrete, progress)?;
    let wall_s = start.elapsed().as_secs_f64();

    let entry = circuit_entry(
        method,
        task_info(&task, &runs),
        &c,
        &discrete,
        wall_s,
        model_identity(store, session)?,
    );
    let (nodes, edges) = circuit_rows(&scores);
    progress.stage("writing");
    store.write_circuit(name, &nodes, &edges, entry.clone())?;
    Ok(CircuitReport { name: name.to_string(), entry, nodes, edges })
}

/// The model's name and sha256 as the store's manifest records them, or of `--model`'s file
/// when it names another.
pub fn model_identity(store: &Store, session: &Session) -> Result<(String, String)> {
    Ok(match &store.manifest().model {
        Some(info) if Path::new(&info.path) == session.path() => (info.name.clone(), info.sha256.clone()),
        _ => (session.name(), loupe_model::capture::sha256_of_model(session.path())?),
    })
}

/// The manifest entry of `method`'s circuit (files listed when written).
pub fn circuit_entry(
    method: Method,
    task: TaskInfo,
    c: &ModelConfig,
    discrete: &DiscreteSaeConfig,
    wall_s: f64,
    (model, model_sha256): (String, String),
) -> CircuitEntry {
    let settings = if method == Method::DiscreteSae { discrete.settings() } else { BTreeMap::new() };
    CircuitEntry {
        method: method.name().to_string(),
        task,
        n_layers: c.n_layers as u32,
        n_heads: c.n_heads as u32,
        settings,
        wall_s,
        model,
        model_sha256,
        files: Vec::new(),
    }
}

/// The share of pairs whose clean prompt scores the answer above the wrong token(s): a metric
/// above 0 (logit or probability difference).
pub fn accuracy(metric_clean: &[f32]) -> f32 {
    metric_clean.iter().filter(|&&m| m > 0.0).count() as f32 / metric_clean.len().max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuits::Metric;
    use crate::circuits::patching::tests::{task, tiny};

    /// `compute` gives each method's own scores, timed.
    #[test]
    fn compute_runs_the_method_and_times_it() {
        let model = tiny();
        let task = task(Metric::LogitDiff);
        let runs = Runs::new(model.as_ref(), &task).unwrap();
        let d = DiscreteSaeConfig::default();
        let (p, wall) = compute(model.as_ref(), &task, &runs, Method::Patching, &d, &()).unwrap();
        assert!(wall > 0.0 && p.edges.is_empty());
        assert_eq!(p.node_scores, patching(model.as_ref(), &task, &runs, &()).unwrap());
        assert_eq!(p.nodes, crate::circuits::nodes(model.config()));
        let (a, _) = compute(model.as_ref(), &task, &runs, Method::Attribution, &d, &()).unwrap();
        assert_eq!(a, attribution(model.as_ref(), &task, &runs, &()).unwrap());
        assert_eq!(accuracy(&[1.0, -0.5, 0.0, 2.0]), 0.5);
        assert_eq!(default_name("ioi.jsonl", Method::DiscreteSae), "ioi-discrete-sae");
        assert!("probing".parse::<Method>().is_err());
    }
}
