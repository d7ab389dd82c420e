//! Attribution graphs (`loupe graph`), as circuit-tracer defines them: the MLPs of the model are
//! replaced by transcoders ([`loupe_dict::transcoder::TranscoderSet`]), attention patterns and
//! norm scales are frozen at their values on the prompt, and what is left is linear; a node is an
//! active transcoder feature at a (layer, position), an error term (the MLP output the
//! transcoders miss) at a (layer, position), a token embedding, or one of the top logits; an edge
//! is the direct effect of one node on another through that linear model.
//!
//! - `replacement.rs`: the frozen replacement model of one prompt (activations, errors, the
//!   frozen attention and norms; `HookedModel` architectures supply them);
//! - `attribute.rs`: edge weights, a batch of targets per backward through the frozen model;
//! - `prune.rs`: influence, pruning to the node and edge thresholds, replacement and completeness
//!   scores;
//! - `run.rs`: `loupe graph` — checks before the model runs, then the graph streamed into
//!   `circuits/graphs/<name>/`;
//! - `export.rs`: `loupe graph export` — circuit-tracer's JSON, written as it is read;
//! - `paths.rs`: the strongest path from the tokens into a node of a stored graph.

pub mod attribute;
pub mod export;
pub mod paths;
pub mod prune;
pub mod replacement;
pub mod run;

/// What a graph node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A token's embedding at its position.
    Embedding,
    /// An active transcoder feature at a (layer, position).
    Feature,
    /// What the transcoders miss of an MLP's output at a (layer, position).
    Error,
    /// One of the top logits at the last position.
    Logit,
}

impl NodeKind {
    /// The store's spelling (`loupe_store::graphs::NODE_KINDS`).
    pub fn name(self) -> &'static str {
        match self {
            NodeKind::Embedding => "embedding",
            NodeKind::Feature => "feature",
            NodeKind::Error => "error",
            NodeKind::Logit => "logit",
        }
    }
}

/// A node of the unpruned graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    /// A feature's or error's layer; 0 for an embedding; the number of layers for a logit.
    pub layer: usize,
    pub position: usize,
    /// The feature's index in its layer; the token id of an embedding or a logit; 0 for an error.
    pub feature: u32,
    /// A feature's activation (0 for the other kinds).
    pub activation: f32,
    /// A logit's probability.
    pub probability: Option<f32>,
}

/// The graph before pruning, as [`attribute::attribute`] computes it. Nodes are ordered
/// embeddings (by position), the selected features (by layer, position, feature), errors (by
/// layer, position), logits (most probable first). Only the targets' incoming edges are computed
/// (the selected features' and the logits'); embeddings and errors have none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawGraph {
    pub nodes: Vec<Node>,
    /// The nodes whose incoming edges were computed, by index in `nodes`.
    pub targets: Vec<u32>,
    /// `[targets.len(), nodes.len()]` row-major: row t, column s is the direct effect of node s
    /// on target `targets[t]` (the source's activation, or embedding or error vector, times its
    /// effect on the target's pre-activation, or demeaned logit, in the frozen replacement model).
    pub adjacency: Vec<f32>,
    /// Each target's constant term (biases through the frozen model), so that its row sums plus
    /// this equal its pre-activation (a logit: its demeaned logit) — the exactness check.
    pub bias: Vec<f32>,
    /// Each target's pre-activation (a logit: its demeaned logit) in the real model.
    pub pre_activation: Vec<f32>,
    /// Active features on the prompt, before the selection of `max_feature_nodes`.
    pub active_features: u64,
}

impl RawGraph {
    /// Row `t` of the adjacency (the incoming edges of `targets[t]`).
    pub fn row(&self, t: usize) -> &[f32] {
        let n = self.nodes.len();
        &self.adjacency[t * n..(t + 1) * n]
    }
}
