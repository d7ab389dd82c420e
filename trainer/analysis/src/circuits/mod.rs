//! Task circuits (`loupe circuit`, `loupe circuit eval`, the app's Circuits view): which heads
//! `L.H` and MLPs `L.mlp` of a model carry a task given as clean/corrupt prompt pairs, written as
//! the tables of [`loupe_store::circuits`].
//!
//! - [`task`]: task files (JSONL pairs), their checks and the metric (logit or probability
//!   difference at the last position);
//! - [`patch`]: the batched clean and corrupt runs and the metric with any set of nodes patched
//!   from the corrupt run into the clean one (what every method and the evaluation share);
//! - [`patching`]: the ground truth — each node patched alone;
//! - [`attribution`]: attribution patching of nodes and edges (EAP), two forwards and one backward;
//! - [`discrete_sae`]: O'Neill & Bui's discrete-SAE circuit discovery;
//! - [`eval`]: each method against the ground truth (ROC AUC, faithfulness, CPR, CMD);
//! - [`eval_run`]: `loupe circuit eval`: the methods from the store or computed, compared, written;
//! - [`run`]: a method on a store's model, timed, into the store.
//!
//! A node's output is what it adds to the residual stream: a head's slice of `attn.hook_z` (the
//! input of the output projection; patching it patches the head's whole contribution), an MLP's
//! `hook_mlp_out`.

pub mod attribution;
pub mod discrete_sae;
pub mod eval;
pub mod eval_run;
pub mod patch;
pub mod patching;
pub mod run;
pub mod task;

use std::fmt;

use anyhow::{Result, bail};
use loupe_model::ModelConfig;

pub use task::{Metric, Pair, Task};

/// A node of a circuit: a head `L.H` or the MLP `L.mlp` of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    pub layer: usize,
    /// The head; `None` for the layer's MLP.
    pub head: Option<usize>,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.head {
            Some(h) => write!(f, "{}.{h}", self.layer),
            None => write!(f, "{}.mlp", self.layer),
        }
    }
}

impl Node {
    /// Parse `L.H` or `L.mlp`, checked against a model of `n_layers` × `n_heads`.
    pub fn parse(text: &str, n_layers: usize, n_heads: usize) -> Result<Node> {
        if let Some(layer) = text.strip_suffix(".mlp") {
            match layer.parse::<usize>() {
                Ok(l) if l < n_layers => return Ok(Node { layer: l, head: None }),
                Ok(_) => bail!("node {text} does not exist: the model has {n_layers} layers"),
                Err(_) => {
                    bail!("bad node {text:?}: write a head as LAYER.HEAD (5.1), an MLP as LAYER.mlp (5.mlp)")
                }
            }
        }
        let (layer, head) = crate::heads::parse_head(text, n_layers, n_heads)?;
        Ok(Node { layer, head: Some(head) })
    }

    /// Whether `self` can write to what `later` reads: an earlier layer, or a head of the same
    /// layer to its MLP.
    pub fn precedes(&self, later: &Node) -> bool {
        self.layer < later.layer || (self.layer == later.layer && self.head.is_some() && later.head.is_none())
    }
}

/// Every node of a model, by layer, each layer's heads before its MLP.
pub fn nodes(c: &ModelConfig) -> Vec<Node> {
    (0..c.n_layers)
        .flat_map(|l| {
            (0..c.n_heads)
                .map(move |h| Node { layer: l, head: Some(h) })
                .chain([Node { layer: l, head: None }])
        })
        .collect()
}

/// Every edge `(source, target)` as indices into [`nodes`]: each pair where the source precedes
/// the target, ordered by source, then target.
pub fn edges(nodes: &[Node]) -> Vec<(usize, usize)> {
    (0..nodes.len())
        .flat_map(|u| (0..nodes.len()).filter(move |&v| nodes[u].precedes(&nodes[v])).map(move |v| (u, v)))
        .collect()
}

/// A method's scores: one per node of [`nodes`], and per edge of [`edges`] where it scores them.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub nodes: Vec<Node>,
    pub node_scores: Vec<f32>,
    /// `(source, target, score)`, indices into `nodes`; empty for a method without edges.
    pub edges: Vec<(usize, usize, f32)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_and_edges_follow_the_residual_stream() {
        let c = ModelConfig {
            architecture: "t".into(),
            n_layers: 2,
            d_model: 4,
            n_heads: 2,
            n_kv_heads: 2,
            d_head: 2,
            d_mlp: 8,
            vocab_size: 10,
            max_context: 16,
            causal: true,
            n_experts: 0,
            experts_per_token: 0,
        };
        let n = nodes(&c);
        let names: Vec<String> = n.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["0.0", "0.1", "0.mlp", "1.0", "1.1", "1.mlp"]);
        for (i, node) in n.iter().enumerate() {
            assert_eq!(Node::parse(&names[i], 2, 2).unwrap(), *node);
        }
        assert!(Node::parse("2.mlp", 2, 2).is_err() && Node::parse("1.2", 2, 2).is_err());
        let e = edges(&n);
        // 0.0 and 0.1 → 0.mlp and layer 1 (4 each); 0.mlp → layer 1 (3); 1.0, 1.1 → 1.mlp.
        assert_eq!(e.len(), 4 + 4 + 3 + 1 + 1);
        assert!(e.contains(&(0, 2)) && !e.contains(&(0, 1)) && !e.contains(&(2, 0)));
    }
}
