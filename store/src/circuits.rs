//! Task-circuit tables, written by `loupe circuit` and `loupe circuit eval`, read by the app's
//! Circuits view, each listed in the manifest (a [`Listing`]):
//!
//! - `circuits/<name>/<generation>/{nodes,edges}.arrow`: one method's scores of every node (a head
//!   `L.H`, an MLP `L.mlp`) and edge of a model on one task ([`NodeRow`], [`EdgeRow`]), with the
//!   method, its settings and the task's hash in the manifest's `circuits` map ([`CircuitEntry`]);
//! - `circuits/evals/<name>/<generation>/{eval,faithfulness}.arrow`: each fast method against the
//!   patching ground truth on one task ([`EvalRow`], [`FaithfulnessRow`]), in the manifest's
//!   `circuit_evals` map ([`CircuitEvalEntry`]).
//!
//! `evals`, `graphs` and `supernodes` (attribution graphs: `circuits/graphs/<name>/`, their
//! supernodes: `circuits/supernodes/<graph>/`, [`crate::graphs`]) are therefore not circuit names.
//!
//! [`Listing`]: crate::listing::Listing

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;
use crate::listing::Listed;
use crate::manifest::Manifest;
use crate::store::Store;
use crate::table::{self, Columns, table};

/// Folder of the circuit tables, inside the store.
pub const CIRCUITS_DIR: &str = "circuits";
/// Folder of the evaluations of the methods on a task.
pub const EVALS_DIR: &str = "circuits/evals";
pub const NODES_TABLE: &str = "nodes.arrow";
pub const EDGES_TABLE: &str = "edges.arrow";
pub const EVAL_TABLE: &str = "eval.arrow";
pub const FAITHFULNESS_TABLE: &str = "faithfulness.arrow";
/// Circuit names that are folders of other tables under `circuits/`.
pub const RESERVED_CIRCUIT_NAMES: [&str; 3] = ["evals", "graphs", "supernodes"];

/// The methods of `loupe circuit --method`, the ground truth first.
pub const CIRCUIT_METHODS: [&str; 3] = ["patching", "attribution", "discrete-sae"];

table! {
    /// One node's score (a row of `nodes.arrow`; rows ordered by layer, the heads before the MLP).
    ///
    /// Patching and attribution: the normalised effect (m_patched − m_clean) / (m_corrupt −
    /// m_clean), exact or first-order; discrete-sae: |codes_pos(node) \ codes_neg(node)|.
    #[derive(Clone, Debug, PartialEq)]
    pub struct NodeRow, view NodeColumns {
        /// `L.H` for a head, `L.mlp` for an MLP.
        pub node: String,
        pub layer: u16,
        pub score: f32,
    }
}

table! {
    /// One edge's score (a row of `edges.arrow`): from a node to a later node it reads from the
    /// residual stream (an earlier layer, or a head to the MLP of its own layer).
    #[derive(Clone, Debug, PartialEq)]
    pub struct EdgeRow, view EdgeColumns {
        pub source: String,
        pub target: String,
        pub score: f32,
    }
}

table! {
    /// One method against the patching ground truth on a task (a row of `eval.arrow`).
    #[derive(Clone, Debug, PartialEq)]
    pub struct EvalRow, view EvalColumns {
        pub method: String,
        /// Node ROC AUC of |score| with the top 10 % of nodes by |ground-truth effect| positive.
        pub node_auc_top10: f32,
        /// The same with |effect| ≥ 0.05 positive.
        pub node_auc_abs: f32,
        /// Edge ROC AUCs, the two definitions (null where the method scores no edges).
        pub edge_auc_top10: Option<f32>,
        pub edge_auc_abs: Option<f32>,
        /// Area under the faithfulness curve (higher is better), and under |1 − f| (lower).
        pub cpr: f32,
        pub cmd: f32,
        /// The method's wall time (seconds), and the patching ground truth's over it.
        pub wall_s: f32,
        pub speedup: f32,
    }
}

table! {
    /// One point of a method's faithfulness curve (a row of `faithfulness.arrow`): the top `k`
    /// percent of nodes by the method's |score| kept, the rest patched from the corrupt run,
    /// f = (m(C) − m(∅)) / (m(N) − m(∅)).
    #[derive(Clone, Debug, PartialEq)]
    pub struct FaithfulnessRow, view FaithfulnessColumns {
        pub method: String,
        pub k: f32,
        pub f: f32,
    }
}

/// The task a circuit was found on, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task file's name (e.g. `ioi.jsonl`).
    pub file: String,
    /// sha256 of the task file's bytes.
    pub sha256: String,
    pub pairs: u32,
    /// `logit_diff` (answer − wrong at the last position) or `prob_diff` (answer sets).
    pub metric: String,
    /// The metric averaged over the pairs on the clean and on the corrupt prompts.
    pub metric_clean: f32,
    pub metric_corrupt: f32,
    /// Share of pairs whose clean prompt scores the answer above the wrong token(s).
    pub accuracy: f32,
}

/// A circuit entry of the manifest: one method's scores on one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CircuitEntry {
    /// One of [`CIRCUIT_METHODS`].
    pub method: String,
    pub task: TaskInfo,
    pub n_layers: u32,
    pub n_heads: u32,
    /// The method's own settings (e.g. the discrete SAE's features, L1, learning rate, seed).
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Wall time of the method (seconds).
    pub wall_s: f64,
    /// The model the scores are of (name and sha256 as the manifest recorded them).
    pub model: String,
    pub model_sha256: String,
    /// Files relative to the store root (`circuits/<name>/<generation>/…`).
    pub files: Vec<FileEntry>,
}

impl Listed for CircuitEntry {
    const WHAT: &'static str = "circuit";
    const FOLDERS: &'static [&'static str] = &[CIRCUITS_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.circuits
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

/// A circuit evaluation entry of the manifest: the methods on one task against patching.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CircuitEvalEntry {
    pub task: TaskInfo,
    /// The circuit entries compared, by method (the ground truth under `patching`).
    pub circuits: BTreeMap<String, String>,
    /// The faithfulness curve's k (percent of nodes kept).
    pub k: Vec<f32>,
    pub model: String,
    pub model_sha256: String,
    pub files: Vec<FileEntry>,
}

impl Listed for CircuitEvalEntry {
    const WHAT: &'static str = "circuit evaluation";
    const FOLDERS: &'static [&'static str] = &[EVALS_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.circuit_evals
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

/// A listed circuit, read whole (a model has at most a few thousand edges between heads and MLPs).
#[derive(Clone, Debug)]
pub struct CircuitTable {
    pub name: String,
    pub entry: CircuitEntry,
    pub nodes: Vec<NodeRow>,
    pub edges: Vec<EdgeRow>,
}

impl CircuitTable {
    /// The row of node `node` (`L.H` or `L.mlp`).
    pub fn node(&self, node: &str) -> Option<&NodeRow> {
        self.nodes.iter().find(|r| r.node == node)
    }
}

/// A listed evaluation, read whole.
#[derive(Clone, Debug)]
pub struct CircuitEvalTable {
    pub name: String,
    pub entry: CircuitEvalEntry,
    pub rows: Vec<EvalRow>,
    pub faithfulness: Vec<FaithfulnessRow>,
}

/// Refuse a circuit name that is another table's folder (the usual name checks come after).
pub fn check_circuit_name(name: &str) -> Result<()> {
    if RESERVED_CIRCUIT_NAMES.contains(&name) {
        bail!(
            "{name:?} cannot name a circuit: circuits/{name}/ holds other tables (reserved: {})",
            RESERVED_CIRCUIT_NAMES.join(", ")
        );
    }
    crate::dictionaries::check_dictionary_name(name)
}

impl Store {
    /// Write a circuit as the entry `name`, replacing the previous one in one manifest commit.
    pub fn write_circuit(
        &self,
        name: &str,
        nodes: &[NodeRow],
        edges: &[EdgeRow],
        entry: CircuitEntry,
    ) -> Result<()> {
        check_circuit_name(name)?;
        let mut listing = self.start_listing::<CircuitEntry>(name)?;
        listing.write_table(CIRCUITS_DIR, NODES_TABLE, &table::batch(nodes)?)?;
        listing.write_table(CIRCUITS_DIR, EDGES_TABLE, &table::batch(edges)?)?;
        self.commit_listing(listing, entry)
    }

    /// The names of the listed circuits.
    pub fn circuit_names(&self) -> Vec<String> {
        self.manifest().circuits.keys().cloned().collect()
    }

    /// The circuit `name`, read and checked against its listing; `None` when not listed.
    pub fn read_circuit(&self, name: &str) -> Result<Option<CircuitTable>> {
        let Some(entry) = self.manifest().circuits.get(name).cloned() else {
            return Ok(None);
        };
        let what = format!("the circuit {name}");
        let nodes = self.read_rows::<NodeRow>(&entry.files, &what, NODES_TABLE)?;
        let edges = self.read_rows::<EdgeRow>(&entry.files, &what, EDGES_TABLE)?;
        Ok(Some(CircuitTable { name: name.to_string(), entry, nodes, edges }))
    }

    /// Write an evaluation as the entry `name`, replacing the previous one in one manifest commit.
    pub fn write_circuit_eval(
        &self,
        name: &str,
        rows: &[EvalRow],
        faithfulness: &[FaithfulnessRow],
        entry: CircuitEvalEntry,
    ) -> Result<()> {
        let mut listing = self.start_listing::<CircuitEvalEntry>(name)?;
        listing.write_table(EVALS_DIR, EVAL_TABLE, &table::batch(rows)?)?;
        listing.write_table(EVALS_DIR, FAITHFULNESS_TABLE, &table::batch(faithfulness)?)?;
        self.commit_listing(listing, entry)
    }

    /// The names of the listed evaluations.
    pub fn circuit_eval_names(&self) -> Vec<String> {
        self.manifest().circuit_evals.keys().cloned().collect()
    }

    /// The evaluation `name`, read and checked against its listing; `None` when not listed.
    pub fn read_circuit_eval(&self, name: &str) -> Result<Option<CircuitEvalTable>> {
        let Some(entry) = self.manifest().circuit_evals.get(name).cloned() else {
            return Ok(None);
        };
        let what = format!("the circuit evaluation {name}");
        let rows = self.read_rows::<EvalRow>(&entry.files, &what, EVAL_TABLE)?;
        let faithfulness = self.read_rows::<FaithfulnessRow>(&entry.files, &what, FAITHFULNESS_TABLE)?;
        Ok(Some(CircuitEvalTable { name: name.to_string(), entry, rows, faithfulness }))
    }

    /// Every row of the listed table `file` of an entry.
    fn read_rows<R: Columns>(&self, files: &[FileEntry], what: &str, file: &str) -> Result<Vec<R>> {
        let batch = self.read_listed_table(files, what, file, &table::schema::<R>())?;
        let view = table::view::<R>(&batch).with_context(|| format!("{what}: {file}"))?;
        Ok((0..batch.num_rows()).map(|i| R::get(&view, i)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskInfo {
        TaskInfo {
            file: "ioi.jsonl".into(),
            sha256: "00".into(),
            pairs: 2,
            metric: "logit_diff".into(),
            metric_clean: 3.0,
            metric_corrupt: -0.5,
            accuracy: 1.0,
        }
    }

    fn entry(method: &str) -> CircuitEntry {
        CircuitEntry {
            method: method.into(),
            task: task(),
            n_layers: 2,
            n_heads: 2,
            settings: BTreeMap::new(),
            wall_s: 1.5,
            model: "m".into(),
            model_sha256: "00".into(),
            files: Vec::new(),
        }
    }

    #[test]
    fn circuits_and_evals_round_trip_and_replace_the_previous_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        assert!(store.read_circuit("ioi-patching").unwrap().is_none());
        let nodes = vec![
            NodeRow { node: "0.0".into(), layer: 0, score: 0.5 },
            NodeRow { node: "0.mlp".into(), layer: 0, score: -0.1 },
        ];
        let edges = vec![EdgeRow { source: "0.0".into(), target: "0.mlp".into(), score: 0.2 }];
        store.write_circuit("ioi-patching", &nodes, &edges, entry("patching")).unwrap();
        let first = store.manifest().circuits["ioi-patching"].files.clone();
        let read = store.read_circuit("ioi-patching").unwrap().unwrap();
        assert_eq!((read.nodes.as_slice(), read.edges.as_slice()), (nodes.as_slice(), edges.as_slice()));
        assert_eq!(read.node("0.mlp").unwrap().score, -0.1);
        store.write_circuit("ioi-patching", &nodes[..1], &[], entry("patching")).unwrap();
        assert_eq!(store.read_circuit("ioi-patching").unwrap().unwrap().nodes.len(), 1);
        assert!(!store.root().join(&first[0].file).exists(), "the previous table is removed");

        let rows = vec![EvalRow {
            method: "attribution".into(),
            node_auc_top10: 0.9,
            node_auc_abs: 0.8,
            edge_auc_top10: None,
            edge_auc_abs: Some(0.7),
            cpr: 0.6,
            cmd: 0.3,
            wall_s: 0.5,
            speedup: 20.0,
        }];
        let faith = vec![FaithfulnessRow { method: "attribution".into(), k: 10.0, f: 0.4 }];
        let eval = CircuitEvalEntry {
            task: task(),
            circuits: BTreeMap::from([("patching".into(), "ioi-patching".into())]),
            k: vec![10.0],
            model: "m".into(),
            model_sha256: "00".into(),
            files: Vec::new(),
        };
        store.write_circuit_eval("ioi", &rows, &faith, eval).unwrap();
        let read = store.read_circuit_eval("ioi").unwrap().unwrap();
        assert_eq!((read.rows, read.faithfulness), (rows, faith));
        assert_eq!(store.circuit_names(), ["ioi-patching"]);
        assert_eq!(store.circuit_eval_names(), ["ioi"]);
        // A circuit sweep does not touch the evaluations below circuits/.
        store.write_circuit("ioi-patching", &nodes, &edges, entry("patching")).unwrap();
        assert!(store.read_circuit_eval("ioi").unwrap().is_some());
        assert!(store.verify(&()).problems.is_empty());
        for name in RESERVED_CIRCUIT_NAMES {
            assert!(store.write_circuit(name, &nodes, &edges, entry("patching")).is_err(), "{name}");
        }
    }
}
