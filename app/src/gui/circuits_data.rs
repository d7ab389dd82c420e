//! What the Circuits view computes, no UI: the store's circuits and evaluations grouped by task
//! (the task file's sha256: one task, whatever its circuits are named), each circuit's nodes
//! placed on the layer × slot layout (a layer's heads, then its MLP) with its edges resolved and
//! sorted by |score|, and the camera (zoom and pan) that maps the layout onto the canvas.

use std::collections::BTreeSet;

use anyhow::Result;
use egui::{Pos2, Rect, Vec2, vec2};
use loupe_analysis::circuits::Node;
use loupe_store::Store;
use loupe_store::circuits::{CIRCUIT_METHODS, CircuitEvalTable, CircuitTable, TaskInfo};

/// Edges shown at first: the threshold starts at the |score| of the strongest this many.
pub const DEFAULT_EDGES: usize = 40;
/// Zoom limits of the canvas.
pub const MIN_ZOOM: f32 = 0.25;
pub const MAX_ZOOM: f32 = 20.0;

/// Every circuit and evaluation of the store, by task.
pub struct CircuitsData {
    pub tasks: Vec<TaskCircuits>,
}

/// The circuits (one per method run, the ground truth first) and evaluations of one task.
pub struct TaskCircuits {
    pub task: TaskInfo,
    /// What the task menu shows (the file, its pairs and metric; its hash when two tasks share a
    /// file name).
    pub label: String,
    pub circuits: Vec<Graph>,
    pub evals: Vec<CircuitEvalTable>,
}

/// One circuit ready to draw.
pub struct Graph {
    pub table: CircuitTable,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Each node row's place `(layer, slot)`: slot `h` for head `L.h`, `n_heads` for `L.mlp`
    /// (None for a name that is neither).
    pub places: Vec<Option<(usize, usize)>>,
    /// Edges as `(source, target, score)`, indices into the node rows, strongest |score| first
    /// (edges naming a node the table lacks are left out).
    pub edges: Vec<(usize, usize, f32)>,
    /// Largest |score| of the nodes and of the edges (0 when none).
    pub max_node: f32,
    pub max_edge: f32,
    /// Whether scores have a sign (patching and attribution effects); discrete-SAE counts do not.
    pub signed: bool,
}

impl Graph {
    pub fn new(table: CircuitTable) -> Graph {
        let (n_layers, n_heads) = (table.entry.n_layers as usize, table.entry.n_heads as usize);
        let places = table
            .nodes
            .iter()
            .map(|r| {
                let node = Node::parse(&r.node, n_layers, n_heads).ok()?;
                Some((node.layer, node.head.unwrap_or(n_heads)))
            })
            .collect();
        let mut edges: Vec<(usize, usize, f32)> = table
            .edges
            .iter()
            .filter_map(|e| {
                Some((table.nodes.iter().position(|n| n.node == e.source)?, e.target.as_str(), e.score))
            })
            .filter_map(|(s, t, score)| Some((s, table.nodes.iter().position(|n| n.node == t)?, score)))
            .collect();
        edges.sort_by(|a, b| b.2.abs().total_cmp(&a.2.abs()));
        let max_abs = |v: &mut dyn Iterator<Item = f32>| {
            v.filter(|x| x.is_finite()).fold(0.0f32, |m, x| m.max(x.abs()))
        };
        let max_node = max_abs(&mut table.nodes.iter().map(|r| r.score));
        let max_edge = max_abs(&mut edges.iter().map(|e| e.2));
        let signed = table.entry.method != "discrete-sae"
            || table.nodes.iter().any(|r| r.score < 0.0)
            || edges.iter().any(|e| e.2 < 0.0);
        Graph { table, n_layers, n_heads, places, edges, max_node, max_edge, signed }
    }

    pub fn name(&self) -> &str {
        &self.table.name
    }

    pub fn method(&self) -> &str {
        &self.table.entry.method
    }

    /// What a node's score is, in words.
    pub fn score_word(&self) -> &'static str {
        match self.method() {
            "patching" => "effect",
            "attribution" => "first-order effect",
            "discrete-sae" => "codes only in positives",
            _ => "score",
        }
    }

    /// The row index of node `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.table.nodes.iter().position(|r| r.node == name)
    }

    /// Node `i`'s rank by |score| (1 = strongest).
    pub fn rank(&self, i: usize) -> usize {
        let s = self.table.nodes[i].score.abs();
        1 + self.table.nodes.iter().filter(|r| r.score.abs() > s).count()
    }

    /// The |score| of the strongest [`DEFAULT_EDGES`] edges' weakest (0 when there are fewer).
    pub fn default_threshold(&self) -> f32 {
        self.edges.get(DEFAULT_EDGES - 1).map_or(0.0, |e| e.2.abs())
    }

    /// How many edges have |score| ≥ `threshold`.
    pub fn count_above(&self, threshold: f32) -> usize {
        self.edges.partition_point(|e| e.2.abs() >= threshold)
    }

    /// The edges to draw, weakest first (so the strong are drawn on top): those with |score| ≥
    /// `threshold`, and every edge of a node in `always` (the pinned ones).
    pub fn edges_shown(&self, threshold: f32, always: &BTreeSet<usize>) -> Vec<(usize, usize, f32)> {
        let above = self.count_above(threshold);
        let mut shown: Vec<_> = self
            .edges
            .iter()
            .enumerate()
            .filter(|(i, e)| *i < above || always.contains(&e.0) || always.contains(&e.1))
            .map(|(_, e)| *e)
            .collect();
        shown.reverse();
        shown
    }

    /// Node `i`'s strongest incoming (`into`) or outgoing edges, at most `n`, as `(other node,
    /// score)`.
    pub fn edges_of(&self, i: usize, into: bool, n: usize) -> Vec<(usize, f32)> {
        let ends = |e: &&(usize, usize, f32)| if into { (e.1, e.0) } else { (e.0, e.1) };
        self.edges.iter().filter(|e| ends(e).0 == i).take(n).map(|e| (ends(&e).1, e.2)).collect()
    }
}

/// One method's view of a node, for the selected node's panel.
pub struct NodeScore<'a> {
    pub method: &'a str,
    pub circuit: &'a str,
    /// None where that circuit has no such node.
    pub score: Option<f32>,
    pub rank: usize,
    pub of: usize,
}

impl TaskCircuits {
    /// Node `node`'s score under every circuit of the task.
    pub fn scores_of(&self, node: &str) -> Vec<NodeScore<'_>> {
        self.circuits
            .iter()
            .map(|g| {
                let i = g.index(node);
                NodeScore {
                    method: g.method(),
                    circuit: g.name(),
                    score: i.map(|i| g.table.nodes[i].score),
                    rank: i.map_or(0, |i| g.rank(i)),
                    of: g.table.nodes.len(),
                }
            })
            .collect()
    }
}

impl CircuitsData {
    /// `(task, circuit)` of the circuit named `name`.
    pub fn find(&self, name: &str) -> Option<(usize, usize)> {
        self.tasks
            .iter()
            .enumerate()
            .find_map(|(t, task)| Some((t, task.circuits.iter().position(|g| g.name() == name)?)))
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// Read every listed circuit and evaluation and group them by task (in the order of the first
/// circuit of each task by name; evaluations of a task without circuits after).
pub fn load(store: &Store) -> Result<CircuitsData> {
    let mut tasks: Vec<TaskCircuits> = Vec::new();
    let group = |tasks: &mut Vec<TaskCircuits>, task: &TaskInfo| -> usize {
        match tasks.iter().position(|t| t.task.sha256 == task.sha256) {
            Some(i) => i,
            None => {
                tasks.push(TaskCircuits {
                    task: task.clone(),
                    label: String::new(),
                    circuits: Vec::new(),
                    evals: Vec::new(),
                });
                tasks.len() - 1
            }
        }
    };
    for name in store.circuit_names() {
        if let Some(table) = store.read_circuit(&name)? {
            let t = group(&mut tasks, &table.entry.task);
            tasks[t].circuits.push(Graph::new(table));
        }
    }
    for name in store.circuit_eval_names() {
        if let Some(eval) = store.read_circuit_eval(&name)? {
            let t = group(&mut tasks, &eval.entry.task);
            tasks[t].evals.push(eval);
        }
    }
    let method_rank = |m: &str| CIRCUIT_METHODS.iter().position(|x| *x == m).unwrap_or(CIRCUIT_METHODS.len());
    for t in &mut tasks {
        t.circuits
            .sort_by(|a, b| (method_rank(a.method()), a.name()).cmp(&(method_rank(b.method()), b.name())));
    }
    let labels: Vec<String> = tasks
        .iter()
        .map(|t| {
            let shared = tasks.iter().filter(|o| o.task.file == t.task.file).count() > 1;
            let hash = if shared {
                format!(" · sha256 {}", &t.task.sha256[..t.task.sha256.len().min(8)])
            } else {
                String::new()
            };
            format!("{} · {} pairs · {}{hash}", t.task.file, t.task.pairs, t.task.metric)
        })
        .collect();
    for (t, label) in tasks.iter_mut().zip(labels) {
        t.label = label;
    }
    Ok(CircuitsData { tasks })
}

/// Where each `(layer, slot)` sits at zoom 1: layers as columns left to right, slots (a layer's
/// heads, then its MLP) as rows top to bottom, filling `rect`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub rect: Rect,
    /// One column's width and one row's height.
    pub step: Vec2,
}

impl Layout {
    pub fn fit(rect: Rect, n_layers: usize, n_slots: usize) -> Layout {
        let step = vec2(rect.width() / n_layers.max(1) as f32, rect.height() / n_slots.max(1) as f32);
        Layout { rect, step }
    }

    /// The centre of `(layer, slot)` at zoom 1.
    pub fn place(&self, layer: usize, slot: usize) -> Pos2 {
        self.rect.min + vec2((layer as f32 + 0.5) * self.step.x, (slot as f32 + 0.5) * self.step.y)
    }

    /// A node's radius at zoom 1 for |score| / max |score| = `t` (0 to 1).
    pub fn radius(&self, t: f32) -> f32 {
        let full = 0.3 * self.step.x.min(self.step.y);
        full * (0.35 + 0.65 * t.clamp(0.0, 1.0).sqrt())
    }
}

/// Zoom and pan of the canvas: a point `p` of the layout is drawn at
/// `origin + pan + (p − origin) · zoom`, `origin` the canvas' top left corner.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Camera {
    pub zoom: f32,
    pub pan: Vec2,
}

impl Default for Camera {
    fn default() -> Camera {
        Camera { zoom: 1.0, pan: Vec2::ZERO }
    }
}

impl Camera {
    pub fn to_screen(&self, origin: Pos2, p: Pos2) -> Pos2 {
        origin + self.pan + (p - origin) * self.zoom
    }

    /// Zoom by `factor` keeping the point under `pointer` where it is.
    pub fn zoom_at(&mut self, origin: Pos2, pointer: Pos2, factor: f32) {
        let zoom = (self.zoom * factor).clamp(MIN_ZOOM, MAX_ZOOM);
        let from = pointer - origin - self.pan;
        self.pan = pointer - origin - from * (zoom / self.zoom);
        self.zoom = zoom;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use loupe_store::circuits::{CircuitEntry, EdgeRow, NodeRow};

    use super::*;

    fn table(method: &str, scores: &[(&str, f32)], edges: &[(&str, &str, f32)]) -> CircuitTable {
        let nodes = scores
            .iter()
            .map(|&(node, score)| NodeRow { node: node.into(), layer: node[..1].parse().unwrap(), score })
            .collect();
        let edges = edges
            .iter()
            .map(|&(s, t, score)| EdgeRow { source: s.into(), target: t.into(), score })
            .collect();
        let task = TaskInfo {
            file: "ioi.jsonl".into(),
            sha256: "ab".into(),
            pairs: 4,
            metric: "logit_diff".into(),
            metric_clean: 2.0,
            metric_corrupt: 0.0,
            accuracy: 1.0,
        };
        let entry = CircuitEntry {
            method: method.into(),
            task,
            n_layers: 2,
            n_heads: 2,
            settings: BTreeMap::new(),
            wall_s: 1.0,
            model: "m".into(),
            model_sha256: "00".into(),
            files: Vec::new(),
        };
        CircuitTable { name: format!("ioi-{method}"), entry, nodes, edges }
    }

    #[test]
    fn a_graph_places_nodes_and_sorts_edges_by_strength() {
        let nodes =
            [("0.0", 0.1), ("0.1", -0.6), ("0.mlp", 0.3), ("1.0", 0.0), ("1.1", 0.2), ("1.mlp", -0.05)];
        let edges =
            [("0.0", "1.0", 0.1), ("0.1", "0.mlp", -0.5), ("0.mlp", "1.mlp", 0.3), ("0.0", "9.9", 1.0)];
        let g = Graph::new(table("attribution", &nodes, &edges));
        assert_eq!(
            g.places,
            [Some((0, 0)), Some((0, 1)), Some((0, 2)), Some((1, 0)), Some((1, 1)), Some((1, 2))]
        );
        assert_eq!(
            g.edges,
            [(1, 2, -0.5), (2, 5, 0.3), (0, 3, 0.1)],
            "an edge to a node not in the table is left out"
        );
        assert_eq!((g.max_node, g.max_edge, g.signed), (0.6, 0.5, true));
        assert_eq!((g.rank(1), g.rank(2), g.rank(3)), (1, 2, 6));
        assert_eq!((g.count_above(0.3), g.count_above(0.31), g.count_above(0.0)), (2, 1, 3));
        assert_eq!(g.default_threshold(), 0.0, "fewer edges than the default count: all shown");
        // Weakest first; a pinned node's edges whatever their score.
        assert_eq!(g.edges_shown(0.3, &BTreeSet::new()), [(2, 5, 0.3), (1, 2, -0.5)]);
        assert_eq!(g.edges_shown(0.4, &BTreeSet::from([3])), [(0, 3, 0.1), (1, 2, -0.5)]);
        assert_eq!((g.edges_of(2, true, 5), g.edges_of(2, false, 5)), (vec![(1, -0.5)], vec![(5, 0.3)]));
        let sae = Graph::new(table("discrete-sae", &[("0.0", 3.0), ("0.1", 0.0)], &[]));
        assert!(!sae.signed);
        assert_eq!((sae.max_edge, sae.count_above(0.0)), (0.0, 0));
    }

    #[test]
    fn circuits_of_a_task_list_a_nodes_scores_under_every_method() {
        let patching = Graph::new(table("patching", &[("0.0", 0.5), ("0.mlp", -0.7)], &[]));
        let sae = Graph::new(table("discrete-sae", &[("0.0", 2.0)], &[]));
        let t = TaskCircuits {
            task: patching.table.entry.task.clone(),
            label: String::new(),
            circuits: vec![patching, sae],
            evals: Vec::new(),
        };
        let s = t.scores_of("0.mlp");
        assert_eq!((s[0].method, s[0].score, s[0].rank, s[0].of), ("patching", Some(-0.7), 1, 2));
        assert_eq!((s[1].method, s[1].score), ("discrete-sae", None));
        let data = CircuitsData { tasks: vec![t] };
        assert_eq!(data.find("ioi-discrete-sae"), Some((0, 1)));
        assert_eq!(data.find("nope"), None);
    }

    #[test]
    fn the_camera_zooms_about_the_pointer() {
        let layout = Layout::fit(Rect::from_min_size(Pos2::new(10.0, 20.0), vec2(200.0, 100.0)), 4, 5);
        assert_eq!(layout.step, vec2(50.0, 20.0));
        assert_eq!(layout.place(1, 2), Pos2::new(10.0 + 75.0, 20.0 + 50.0));
        let origin = Pos2::new(10.0, 20.0);
        let mut c = Camera::default();
        let p = layout.place(3, 4);
        assert_eq!(c.to_screen(origin, p), p);
        let pointer = Pos2::new(100.0, 60.0);
        let under = Pos2::new(100.0, 60.0);
        c.zoom_at(origin, pointer, 2.0);
        assert_eq!(c.zoom, 2.0);
        assert!((c.to_screen(origin, under) - pointer).length() < 1e-4, "the point under the pointer stays");
        c.zoom_at(origin, pointer, 1e6);
        assert_eq!(c.zoom, MAX_ZOOM);
        assert!(layout.radius(1.0) > layout.radius(0.1) && layout.radius(0.0) > 0.0);
    }
}
