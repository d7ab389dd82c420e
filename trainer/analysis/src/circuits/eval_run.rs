//! `loupe circuit eval`: every method on one task, compared, written as the store's
//! `circuits/evals/<name>/`.
//!
//! The task is loaded and both runs made once. Each method's scores come from the store's circuit
//! entry made from this task — the same method, task sha256, model sha256 and model shape; the
//! default name ([`default_name`]) is looked at first, then any other — or, where there is none,
//! are computed ([`compute`]) and written under the default name (replacing an entry of that name
//! made from another version of the task). Then [`evaluate`] and one manifest commit of the
//! evaluation. The names are checked before the model runs.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow};
use loupe_model::Session;
use loupe_store::circuits::{
    CircuitEvalEntry, CircuitTable, EdgeRow, EvalRow, FaithfulnessRow, NodeRow, TaskInfo, check_circuit_name,
};
use loupe_store::{Progress, Store};

use super::discrete_sae::DiscreteSaeConfig;
use super::eval::{Compared, K_PERCENT, evaluate, positives_abs, positives_top, roc_auc};
use super::patch::{Runs, mean};
use super::run::{Method, circuit_entry, compute, default_name, model_identity};
use super::{Node, Scores, Task, nodes};

/// The methods compared, the ground truth first.
pub const METHODS: [Method; 3] = [Method::Patching, Method::Attribution, Method::DiscreteSae];

/// What an evaluation wrote.
#[derive(Clone, Debug)]
pub struct EvalReport {
    pub name: String,
    pub task: TaskInfo,
    /// Each method's circuit entry, and whether it was computed now (in [`METHODS`] order).
    pub circuits: Vec<(Method, String, bool)>,
    pub rows: Vec<EvalRow>,
    pub faithfulness: Vec<FaithfulnessRow>,
    /// Each method's node ROC AUC over the heads alone, both definitions of a positive (the
    /// discrete-SAE paper scores heads only); printed, not stored.
    pub heads_auc: Vec<(String, f32, f32)>,
}

/// Evaluate the methods on the task at `task_path` with `session`'s model, writing missing
/// circuits and the evaluation `name` (default: the task file's stem) into `store`.
pub fn eval(
    store: &Store,
    session: &Session,
    task_path: &Path,
    name: Option<&str>,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let task = Task::load(task_path, session.tokenizer()?)?;
    let name = match name {
        Some(n) => n.to_string(),
        None => task.file.strip_suffix(".jsonl").unwrap_or(&task.file).to_string(),
    };
    loupe_store::dictionaries::check_dictionary_name(&name).map_err(|_| {
        anyhow!("invalid evaluation name {name:?} (use letters, digits, '_', '-' and '.'; or pass --name)")
    })?;
    for method in METHODS {
        check_circuit_name(&default_name(&task.file, method))?;
    }
    let model = session.model();
    let c = model.config().clone();
    let (model_name, model_sha256) = model_identity(store, session)?;

    progress.stage("clean and corrupt runs");
    let runs = Runs::new(model, &task)?;
    let info = task_info(&task, &runs);
    let discrete = DiscreteSaeConfig::default();
    let mut found: Vec<(Method, Scores, f64)> = Vec::new();
    let mut circuits = Vec::new();
    for method in METHODS {
        let default = default_name(&task.file, method);
        // The default name first, then any other; only matching entries are read.
        let listed = store.manifest().circuits;
        let mut names = vec![default.clone()];
        names.extend(listed.keys().filter(|n| **n != default).cloned());
        let stored = names.into_iter().find_map(|n| {
            let e = listed.get(&n)?;
            let same = e.method == method.name()
                && e.task.sha256 == task.sha256
                && e.model_sha256 == model_sha256
                && (e.n_layers as usize, e.n_heads as usize) == (c.n_layers, c.n_heads);
            if !same {
                return None;
            }
            let table = store.read_circuit(&n).ok()??;
            Some((n, scores_of(&table, &nodes(&c))?, table.entry.wall_s))
        });
        match stored {
            Some((n, scores, wall_s)) => {
                circuits.push((method, n, false));
                found.push((method, scores, wall_s));
            }
            None => {
                let (scores, wall_s) = compute(model, &task, &runs, method, &discrete, progress)?;
                let (node_rows, edge_rows) = circuit_rows(&scores);
                let identity = (model_name.clone(), model_sha256.clone());
                let entry = circuit_entry(method, info.clone(), &c, &discrete, wall_s, identity);
                store.write_circuit(&default, &node_rows, &edge_rows, entry)?;
                circuits.push((method, default, true));
                found.push((method, scores, wall_s));
            }
        }
    }

    let (_, truth, truth_wall_s) = &found[0];
    let compared: Vec<Compared> =
        found[1..].iter().map(|(m, s, w)| Compared { method: m.name(), scores: s, wall_s: *w }).collect();
    let (rows, faithfulness) =
        evaluate(model, &task, &runs, &truth.node_scores, *truth_wall_s, &compared, progress)?;
    let entry = CircuitEvalEntry {
        task: info.clone(),
        circuits: circuits.iter().map(|(m, n, _)| (m.name().to_string(), n.clone())).collect(),
        k: K_PERCENT.to_vec(),
        model: model_name,
        model_sha256,
        files: Vec::new(),
    };
    progress.stage("writing");
    store.write_circuit_eval(&name, &rows, &faithfulness, entry)?;
    let heads: Vec<usize> =
        nodes(&c).iter().enumerate().filter(|(_, n)| n.head.is_some()).map(|(i, _)| i).collect();
    let pick = |s: &[f32]| heads.iter().map(|&i| s[i].abs()).collect::<Vec<f32>>();
    let truth_heads = pick(&truth.node_scores);
    let (top, abs) = (positives_top(&truth_heads), positives_abs(&truth_heads));
    let heads_auc = found
        .iter()
        .map(|(m, s, _)| {
            let s = pick(&s.node_scores);
            let auc = |p: &[bool]| roc_auc(&s, p).unwrap_or(f32::NAN);
            (m.name().to_string(), auc(&top), auc(&abs))
        })
        .collect();
    Ok(EvalReport { name, task: info, circuits, rows, faithfulness, heads_auc })
}

/// The task as a circuit entry records it, with the runs' metrics.
pub fn task_info(task: &Task, runs: &Runs) -> TaskInfo {
    TaskInfo {
        file: task.file.clone(),
        sha256: task.sha256.clone(),
        pairs: task.pairs.len() as u32,
        metric: task.metric.name().to_string(),
        metric_clean: mean(&runs.metric_clean),
        metric_corrupt: mean(&runs.metric_corrupt),
        accuracy: super::run::accuracy(&runs.metric_clean),
    }
}

/// A circuit's node and edge rows from its scores.
pub fn circuit_rows(scores: &Scores) -> (Vec<NodeRow>, Vec<EdgeRow>) {
    let nodes = scores
        .nodes
        .iter()
        .zip(&scores.node_scores)
        .map(|(n, &score)| NodeRow { node: n.to_string(), layer: n.layer as u16, score })
        .collect();
    let edges = scores
        .edges
        .iter()
        .map(|&(u, v, score)| EdgeRow {
            source: scores.nodes[u].to_string(),
            target: scores.nodes[v].to_string(),
            score,
        })
        .collect();
    (nodes, edges)
}

/// A stored circuit's scores over `nodes`; `None` when its rows are of other nodes.
pub fn scores_of(table: &CircuitTable, nodes: &[Node]) -> Option<Scores> {
    let names: Vec<String> = nodes.iter().map(ToString::to_string).collect();
    if table.nodes.iter().map(|r| &r.node).ne(names.iter()) {
        return None;
    }
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let edges = table
        .edges
        .iter()
        .map(|e| Some((*index.get(e.source.as_str())?, *index.get(e.target.as_str())?, e.score)))
        .collect::<Option<Vec<_>>>()?;
    Some(Scores { nodes: nodes.to_vec(), node_scores: table.nodes.iter().map(|r| r.score).collect(), edges })
}
