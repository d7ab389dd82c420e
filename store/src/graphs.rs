//! Attribution-graph tables, written by `loupe graph`, read by `loupe graph export` and the app's
//! Graph view, each listed in the manifest (a [`Listing`]):
//!
//! - `circuits/graphs/<name>/<generation>/{nodes,edges}.arrow`: the pruned attribution graph of
//!   one prompt through a set of transcoders, as circuit-tracer defines it ([`GraphNodeRow`],
//!   [`GraphEdgeRow`]), with the prompt, the transcoders, the settings and the scores in the
//!   manifest's `graphs` map ([`GraphEntry`]);
//! - `circuits/supernodes/<graph>/<generation>/supernodes.arrow`: nodes of a graph grouped by hand
//!   in the app ([`SupernodeRow`]), in the manifest's `graph_supernodes` map
//!   ([`SupernodesEntry`]), kept apart from the graph so that saving a grouping never rewrites it.
//!
//! A graph's tables are written a batch at a time ([`GraphWriter`]): a 2,048-token graph is never
//! held as one document.
//!
//! [`Listing`]: crate::listing::Listing

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;
use crate::listing::{Listed, Listing};
use crate::manifest::Manifest;
use crate::store::Store;
use crate::table::{self, Columns, table};

/// Folder of the attribution graphs, inside the store.
pub const GRAPHS_DIR: &str = "circuits/graphs";
/// Folder of the hand-made supernodes of each graph.
pub const SUPERNODES_DIR: &str = "circuits/supernodes";
pub const GRAPH_NODES_TABLE: &str = "nodes.arrow";
pub const GRAPH_EDGES_TABLE: &str = "edges.arrow";
pub const SUPERNODES_TABLE: &str = "supernodes.arrow";

/// The kinds of graph node, as the `kind` column spells them.
pub const NODE_KINDS: [&str; 4] = ["embedding", "feature", "error", "logit"];

table! {
    /// One node of an attribution graph (a row of `nodes.arrow`; `node` is the row's index, which
    /// edges refer to). Rows are ordered embeddings, features (by layer, position, feature), errors
    /// (by layer, position), logits (by probability, highest first).
    #[derive(Clone, Debug, PartialEq)]
    pub struct GraphNodeRow, view GraphNodeColumns {
        pub node: u32,
        /// circuit-tracer's `node_id` (e.g. `3_1024_5` for feature 1024 of layer 3 at position 5).
        pub node_id: String,
        /// One of [`NODE_KINDS`].
        pub kind: String,
        /// The model layer of a feature or error (a CLT feature: the layer it reads); 0 for an
        /// embedding; the number of layers for a logit.
        pub layer: u16,
        /// The token position (circuit-tracer's `ctx_idx`).
        pub position: u32,
        /// The feature's index in its layer's transcoder; the token id of an embedding or logit;
        /// 0 for an error.
        pub feature: u32,
        /// A feature's activation; 0 for the other kinds.
        pub activation: f32,
        /// A logit's probability; null for the other kinds.
        pub probability: Option<f32>,
        /// Influence on the logits (circuit-tracer's pruning score; a logit's: its probability).
        pub influence: f32,
    }
}

table! {
    /// One edge (a row of `edges.arrow`): the direct effect of `source` on `target` in the frozen
    /// replacement model (a source's activation times its effect on the target's pre-activation,
    /// or logit). Rows are grouped by target.
    #[derive(Clone, Debug, PartialEq)]
    pub struct GraphEdgeRow, view GraphEdgeColumns {
        pub source: u32,
        pub target: u32,
        pub weight: f32,
    }
}

table! {
    /// One member of a supernode (a row of `supernodes.arrow`): nodes grouped by hand, by
    /// `node_id` so that a grouping outlives a rebuilt graph as far as its nodes do.
    #[derive(Clone, Debug, PartialEq)]
    pub struct SupernodeRow, view SupernodeColumns {
        pub supernode: String,
        pub node_id: String,
    }
}

/// How a graph was pruned and how much of it was computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphSettings {
    /// At most this many logits, the most probable, until their probability sums to
    /// `logit_probability`.
    pub max_logits: u32,
    pub logit_probability: f32,
    /// Feature nodes whose edges are computed (the most influential first).
    pub max_feature_nodes: u32,
    /// Keep nodes until this share of the total influence (circuit-tracer: 0.8).
    pub node_threshold: f32,
    /// Keep edges until this share of the total edge influence (circuit-tracer: 0.98).
    pub edge_threshold: f32,
    /// Targets per backward batch.
    pub batch: u32,
}

impl Default for GraphSettings {
    fn default() -> Self {
        GraphSettings {
            max_logits: 10,
            logit_probability: 0.95,
            max_feature_nodes: 7500,
            node_threshold: 0.8,
            edge_threshold: 0.98,
            batch: 256,
        }
    }
}

/// A graph entry of the manifest: the attribution graph of one prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphEntry {
    pub prompt: String,
    /// The prompt's tokens (BOS first) and their text, for display.
    pub tokens: Vec<u32>,
    pub token_strs: Vec<String>,
    /// The dictionaries that replaced the MLPs: one per layer (per-layer transcoders), or one
    /// cross-layer transcoder.
    pub transcoders: Vec<String>,
    /// `plt` (per-layer transcoders, skip or not) or `clt`.
    pub transcoder_kind: String,
    pub n_layers: u32,
    pub settings: GraphSettings,
    /// Active features before pruning, and the nodes and edges kept.
    pub active_features: u64,
    pub n_nodes: u64,
    pub n_edges: u64,
    /// circuit-tracer's scores of the pruned graph: replacement (influence from tokens over
    /// tokens + errors) and completeness (the error-free share of each node's inputs, weighted).
    pub replacement_score: f32,
    pub completeness_score: f32,
    /// The same two scores before pruning.
    pub replacement_score_unpruned: f32,
    pub completeness_score_unpruned: f32,
    pub wall_s: f64,
    /// The model the graph is of (name and sha256 as the manifest recorded them).
    pub model: String,
    pub model_sha256: String,
    /// Files relative to the store root (`circuits/graphs/<name>/<generation>/…`).
    pub files: Vec<FileEntry>,
}

impl Listed for GraphEntry {
    const WHAT: &'static str = "attribution graph";
    const FOLDERS: &'static [&'static str] = &[GRAPHS_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.graphs
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

/// The supernodes of one graph (keyed by the graph's name in the manifest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SupernodesEntry {
    pub files: Vec<FileEntry>,
}

impl Listed for SupernodesEntry {
    const WHAT: &'static str = "supernodes";
    const FOLDERS: &'static [&'static str] = &[SUPERNODES_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.graph_supernodes
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

/// A graph's tables being written: nodes and edges appended a batch at a time (each batch one
/// record batch of the IPC file), listed in one commit by [`GraphWriter::commit`].
pub struct GraphWriter<'s> {
    store: &'s Store,
    listing: Listing<GraphEntry>,
    nodes: table::StreamWriter,
    edges: table::StreamWriter,
}

impl Store {
    /// Start writing the graph `name` (checked as a circuit name).
    pub fn start_graph(&self, name: &str) -> Result<GraphWriter<'_>> {
        crate::circuits::check_circuit_name(name)?;
        let listing = self.start_listing::<GraphEntry>(name)?;
        let nodes = table::StreamWriter::create(
            &listing.dir(GRAPHS_DIR).join(GRAPH_NODES_TABLE),
            table::schema::<GraphNodeRow>(),
        )?;
        let edges = table::StreamWriter::create(
            &listing.dir(GRAPHS_DIR).join(GRAPH_EDGES_TABLE),
            table::schema::<GraphEdgeRow>(),
        )?;
        Ok(GraphWriter { store: self, listing, nodes, edges })
    }

    /// The names of the listed graphs.
    pub fn graph_names(&self) -> Vec<String> {
        self.manifest().graphs.keys().cloned().collect()
    }

    /// The graph `name`, read and checked against its listing; `None` when not listed.
    pub fn read_graph(&self, name: &str) -> Result<Option<GraphTable>> {
        let Some(entry) = self.manifest().graphs.get(name).cloned() else {
            return Ok(None);
        };
        let what = format!("the attribution graph {name}");
        let nodes = self.read_all_rows::<GraphNodeRow>(&entry.files, &what, GRAPH_NODES_TABLE)?;
        let edges = self.read_all_rows::<GraphEdgeRow>(&entry.files, &what, GRAPH_EDGES_TABLE)?;
        Ok(Some(GraphTable { name: name.to_string(), entry, nodes, edges }))
    }

    /// Replace the supernodes of graph `graph` (which must be listed) in one manifest commit.
    pub fn write_supernodes(&self, graph: &str, rows: &[SupernodeRow]) -> Result<()> {
        if !self.manifest().graphs.contains_key(graph) {
            anyhow::bail!("store {} has no attribution graph named {graph:?}", self.root().display());
        }
        let mut listing = self.start_listing::<SupernodesEntry>(graph)?;
        listing.write_table(SUPERNODES_DIR, SUPERNODES_TABLE, &table::batch(rows)?)?;
        self.commit_listing(listing, SupernodesEntry { files: Vec::new() })
    }

    /// The supernodes of graph `graph` (none saved: empty).
    pub fn read_supernodes(&self, graph: &str) -> Result<Vec<SupernodeRow>> {
        let Some(entry) = self.manifest().graph_supernodes.get(graph).cloned() else {
            return Ok(Vec::new());
        };
        self.read_all_rows::<SupernodeRow>(
            &entry.files,
            &format!("the supernodes of {graph}"),
            SUPERNODES_TABLE,
        )
    }

    /// Every row of the listed table `file` (any number of record batches) of an entry.
    fn read_all_rows<R: Columns>(&self, files: &[FileEntry], what: &str, file: &str) -> Result<Vec<R>> {
        let batches = self.read_listed_batches(files, what, file, &table::schema::<R>())?;
        let mut rows = Vec::new();
        for batch in &batches {
            let view = table::view::<R>(batch).with_context(|| format!("{what}: {file}"))?;
            rows.extend((0..batch.num_rows()).map(|i| R::get(&view, i)));
        }
        Ok(rows)
    }
}

impl GraphWriter<'_> {
    /// Append nodes (their `node` numbers continue the previous batches').
    pub fn write_nodes(&mut self, rows: &[GraphNodeRow]) -> Result<()> {
        self.nodes.write(&table::batch(rows)?)
    }

    /// Append edges.
    pub fn write_edges(&mut self, rows: &[GraphEdgeRow]) -> Result<()> {
        self.edges.write(&table::batch(rows)?)
    }

    /// Close both files and list them with `entry` in one manifest commit (replacing the graph of
    /// the same name).
    pub fn commit(self, entry: GraphEntry) -> Result<()> {
        let GraphWriter { store, mut listing, nodes, edges } = self;
        for (writer, file) in [(nodes, GRAPH_NODES_TABLE), (edges, GRAPH_EDGES_TABLE)] {
            writer.finish()?;
            listing.add(listing.path_in(GRAPHS_DIR, file));
        }
        store.commit_listing(listing, entry)
    }
}

/// A listed graph, read whole (100,000 nodes and 1,000,000 edges take ~20 MB).
#[derive(Clone, Debug)]
pub struct GraphTable {
    pub name: String,
    pub entry: GraphEntry,
    pub nodes: Vec<GraphNodeRow>,
    pub edges: Vec<GraphEdgeRow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> GraphEntry {
        GraphEntry {
            prompt: "a b".into(),
            tokens: vec![2, 5, 6],
            token_strs: vec!["<bos>".into(), "a".into(), " b".into()],
            transcoders: vec!["t0".into()],
            transcoder_kind: "plt".into(),
            n_layers: 1,
            settings: GraphSettings::default(),
            active_features: 3,
            n_nodes: 3,
            n_edges: 2,
            replacement_score: 0.5,
            completeness_score: 0.75,
            replacement_score_unpruned: 0.4,
            completeness_score_unpruned: 0.7,
            wall_s: 0.1,
            model: "m".into(),
            model_sha256: "00".into(),
            files: Vec::new(),
        }
    }

    fn node(node: u32, kind: &str) -> GraphNodeRow {
        GraphNodeRow {
            node,
            node_id: format!("n{node}"),
            kind: kind.into(),
            layer: 0,
            position: node,
            feature: 7,
            activation: 1.5,
            probability: (kind == "logit").then_some(0.9),
            influence: 0.25,
        }
    }

    #[test]
    fn graphs_stream_in_batches_and_supernodes_are_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        assert!(store.start_graph("evals").is_err(), "a reserved name is refused");
        let mut writer = store.start_graph("g").unwrap();
        writer.write_nodes(&[node(0, "embedding"), node(1, "feature")]).unwrap();
        writer.write_nodes(&[node(2, "logit")]).unwrap();
        let edges = [
            GraphEdgeRow { source: 0, target: 1, weight: 0.5 },
            GraphEdgeRow { source: 1, target: 2, weight: -2.0 },
        ];
        writer.write_edges(&edges[..1]).unwrap();
        writer.write_edges(&edges[1..]).unwrap();
        assert!(store.read_graph("g").unwrap().is_none(), "nothing is listed before the commit");
        writer.commit(entry()).unwrap();
        let graph = store.read_graph("g").unwrap().unwrap();
        assert_eq!(graph.nodes, vec![node(0, "embedding"), node(1, "feature"), node(2, "logit")]);
        assert_eq!(graph.edges, edges.to_vec());
        assert_eq!(graph.entry.tokens, vec![2, 5, 6]);

        assert!(store.read_supernodes("g").unwrap().is_empty());
        let rows = vec![SupernodeRow { supernode: "say Mary".into(), node_id: "n1".into() }];
        store.write_supernodes("g", &rows).unwrap();
        assert_eq!(store.read_supernodes("g").unwrap(), rows);
        assert!(store.write_supernodes("nope", &rows).is_err());
        assert!(store.verify(&()).problems.is_empty());
    }
}
