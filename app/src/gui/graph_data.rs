//! What the Graph view computes, no UI: an attribution graph read once and prepared for drawing at
//! any size — every node's place on the positions × layers layout (x: the token position; y: the
//! embeddings at the bottom, then layers 0…L−1 with their features and error, the logits at the
//! top), nodes grouped by cell `(row, position)` so that the visible ones are found from the view
//! rectangle alone, per-cell counts for the aggregated density drawn when zoomed far out, and the
//! edges sorted by |weight| with their ends' places alongside (one sequential scan a frame finds
//! the strongest visible ones). Also the camera and the explanations of the graph's dictionaries.
//!
//! Layout units ("world"): a cell is 1 × 1, position `p` spans x ∈ [p, p+1), row `r` (0 = the
//! logits, at the top) spans y ∈ [r, r+1); a cell's nodes sit on a small grid inside it.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use egui::{Pos2, Rect, Vec2, pos2, vec2};
use loupe_store::Store;
use loupe_store::graphs::{GraphNodeRow, GraphTable};

/// Node kinds, as indices into [`loupe_store::graphs::NODE_KINDS`].
pub const EMBEDDING: u8 = 0;
pub const FEATURE: u8 = 1;
pub const ERROR: u8 = 2;
pub const LOGIT: u8 = 3;
/// Edges shown at first: the threshold starts at the |weight| of the strongest this many.
pub const DEFAULT_EDGES: usize = 200;
/// The share of a cell its nodes' grid fills (the rest is the gap between cells).
const FILL: f32 = 0.8;

/// One edge, indices into the node rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Edge {
    pub source: u32,
    pub target: u32,
    pub weight: f32,
}

/// A graph ready to draw.
pub struct GraphData {
    pub table: GraphTable,
    pub n_layers: usize,
    pub n_positions: usize,
    /// Rows: logits (0), layers L−1…0, embeddings (L+1).
    pub n_rows: usize,
    /// Per node: its kind, its centre (world units), its radius (world units) at full influence
    /// and its size from 0 to 1 (√(|influence| / max |influence|)).
    pub kind: Vec<u8>,
    pub centre: Vec<Pos2>,
    pub slot: Vec<f32>,
    pub size: Vec<f32>,
    pub max_influence: f32,
    /// Node rows ordered by cell (`row · n_positions + position`); cell `c` holds
    /// `by_cell[cell_start[c]..cell_start[c + 1]]`.
    by_cell: Vec<u32>,
    cell_start: Vec<u32>,
    /// Edges strongest |weight| first, and each one's ends `[x0, y0, x1, y1]` (world units).
    pub edges: Vec<Edge>,
    ends: Vec<[f32; 4]>,
    pub max_edge: f32,
    /// Node row of each `node_id`.
    ids: HashMap<String, u32>,
}

/// The kind index of a node row (an unknown kind draws as an error).
pub fn kind_of(row: &GraphNodeRow) -> u8 {
    match row.kind.as_str() {
        "embedding" => EMBEDDING,
        "feature" => FEATURE,
        "logit" => LOGIT,
        _ => ERROR,
    }
}

impl GraphData {
    pub fn new(table: GraphTable) -> GraphData {
        let n_layers = table.entry.n_layers as usize;
        let n_positions = table
            .entry
            .tokens
            .len()
            .max(table.nodes.iter().map(|n| n.position as usize + 1).max().unwrap_or(0))
            .max(1);
        let n_rows = n_layers + 2;
        let kind: Vec<u8> = table.nodes.iter().map(kind_of).collect();
        let row_of = |i: usize| -> usize {
            match kind[i] {
                LOGIT => 0,
                EMBEDDING => n_rows - 1,
                _ => n_layers.saturating_sub(table.nodes[i].layer as usize).clamp(1, n_rows - 2),
            }
        };
        let cell_of = |i: usize| row_of(i) * n_positions + table.nodes[i].position as usize;
        let n_cells = n_rows * n_positions;
        let max_influence =
            table.nodes.iter().map(|n| n.influence.abs()).filter(|x| x.is_finite()).fold(0.0, f32::max);
        let size: Vec<f32> =
            table
                .nodes
                .iter()
                .map(|n| {
                    if max_influence > 0.0 {
                        (n.influence.abs() / max_influence).sqrt().min(1.0)
                    } else {
                        0.0
                    }
                })
                .map(|s| if s.is_finite() { s } else { 0.0 })
                .collect();
        // Nodes by cell; inside a cell, features before the error, the most influential first.
        let mut by_cell: Vec<u32> = (0..table.nodes.len() as u32).collect();
        by_cell.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            (cell_of(a), kind[a] == ERROR, -size[a])
                .partial_cmp(&(cell_of(b), kind[b] == ERROR, -size[b]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut cell_start = vec![0u32; n_cells + 1];
        for &i in &by_cell {
            cell_start[cell_of(i as usize) + 1] += 1;
        }
        for c in 0..n_cells {
            cell_start[c + 1] += cell_start[c];
        }
        let (mut centre, mut slot) = (vec![Pos2::ZERO; kind.len()], vec![0.0; kind.len()]);
        for c in 0..n_cells {
            let members = &by_cell[cell_start[c] as usize..cell_start[c + 1] as usize];
            let k = members.len();
            if k == 0 {
                continue;
            }
            let cols = (k as f32).sqrt().ceil() as usize;
            let rows = k.div_ceil(cols);
            let (x0, y0) = ((c % n_positions) as f32, (c / n_positions) as f32);
            let margin = (1.0 - FILL) / 2.0;
            for (j, &i) in members.iter().enumerate() {
                let (gx, gy) = (j % cols, j / cols);
                centre[i as usize] = pos2(
                    x0 + margin + FILL * (gx as f32 + 0.5) / cols as f32,
                    y0 + margin + FILL * (gy as f32 + 0.5) / rows as f32,
                );
                slot[i as usize] = 0.45 * FILL / cols.max(rows) as f32;
            }
        }
        let n = table.nodes.len() as u32;
        let mut edges: Vec<Edge> = table
            .edges
            .iter()
            .filter(|e| e.source < n && e.target < n && e.weight.is_finite())
            .map(|e| Edge { source: e.source, target: e.target, weight: e.weight })
            .collect();
        edges.sort_unstable_by(|a, b| b.weight.abs().total_cmp(&a.weight.abs()));
        let ends = edges
            .iter()
            .map(|e| {
                let (a, b) = (centre[e.source as usize], centre[e.target as usize]);
                [a.x, a.y, b.x, b.y]
            })
            .collect();
        let max_edge = edges.first().map_or(0.0, |e| e.weight.abs());
        let ids = table.nodes.iter().enumerate().map(|(i, r)| (r.node_id.clone(), i as u32)).collect();
        GraphData {
            table,
            n_layers,
            n_positions,
            n_rows,
            kind,
            centre,
            slot,
            size,
            max_influence,
            by_cell,
            cell_start,
            edges,
            ends,
            max_edge,
            ids,
        }
    }

    pub fn name(&self) -> &str {
        &self.table.name
    }

    /// The node row of `node_id`.
    pub fn index(&self, node_id: &str) -> Option<u32> {
        self.ids.get(node_id).copied()
    }

    /// A node's radius in world units (grows with its influence).
    pub fn radius(&self, i: u32) -> f32 {
        self.slot[i as usize] * (0.35 + 0.65 * self.size[i as usize])
    }

    /// The label of row `row` (`emb`, `L3`, `logit`).
    pub fn row_label(&self, row: usize) -> String {
        match row {
            0 => "logit".into(),
            r if r == self.n_rows - 1 => "emb".into(),
            r => format!("L{}", self.n_layers - r),
        }
    }

    /// The |weight| of the strongest [`DEFAULT_EDGES`] edges' weakest (0 when there are fewer).
    pub fn default_threshold(&self) -> f32 {
        self.edges.get(DEFAULT_EDGES - 1).map_or(0.0, |e| e.weight.abs())
    }

    /// How many edges have |weight| ≥ `threshold`.
    pub fn count_above(&self, threshold: f32) -> usize {
        self.edges.partition_point(|e| e.weight.abs() >= threshold)
    }

    /// The cells that `view` (world units) touches: positions and rows.
    pub fn cells_in(&self, view: Rect) -> (Range<usize>, Range<usize>) {
        let clamp = |v: f32, n: usize| (v.max(0.0) as usize).min(n);
        let positions =
            clamp(view.left().floor(), self.n_positions)..clamp(view.right().ceil(), self.n_positions);
        let rows = clamp(view.top().floor(), self.n_rows)..clamp(view.bottom().ceil(), self.n_rows);
        (positions, rows)
    }

    /// The nodes of cell `(row, position)`.
    pub fn cell(&self, row: usize, position: usize) -> &[u32] {
        let c = row * self.n_positions + position;
        &self.by_cell[self.cell_start[c] as usize..self.cell_start[c + 1] as usize]
    }

    /// How many nodes the cells in `positions` × `rows` hold.
    pub fn count_in(&self, positions: &Range<usize>, rows: &Range<usize>) -> usize {
        rows.clone()
            .map(|r| {
                let c = r * self.n_positions;
                (self.cell_start[c + positions.end] - self.cell_start[c + positions.start]) as usize
            })
            .sum()
    }

    /// The node at world point `p` (within its radius, or `slack` world units more), if any.
    pub fn node_at(&self, p: Pos2, slack: f32) -> Option<u32> {
        if p.x < 0.0 || p.y < 0.0 {
            return None;
        }
        let (position, row) = (p.x as usize, p.y as usize);
        if position >= self.n_positions || row >= self.n_rows {
            return None;
        }
        self.cell(row, position)
            .iter()
            .map(|&i| (i, (self.centre[i as usize] - p).length()))
            .filter(|&(i, d)| d <= self.radius(i) + slack)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    }

    /// Up to `budget` edges to draw, strongest first: |weight| ≥ `threshold` and crossing `view`
    /// (world units; their bounding box meets it), plus every edge of a node in `always` (the
    /// pinned ones) whatever its weight. Returns edge indices.
    pub fn visible_edges(
        &self,
        view: Rect,
        threshold: f32,
        budget: usize,
        always: &BTreeSet<u32>,
    ) -> Vec<u32> {
        let above = self.count_above(threshold);
        let mut shown = Vec::new();
        for (i, e) in self.ends[..above].iter().enumerate() {
            if shown.len() >= budget {
                break;
            }
            let (x0, x1) = if e[0] < e[2] { (e[0], e[2]) } else { (e[2], e[0]) };
            let (y0, y1) = if e[1] < e[3] { (e[1], e[3]) } else { (e[3], e[1]) };
            if x1 >= view.left() && x0 <= view.right() && y1 >= view.top() && y0 <= view.bottom() {
                shown.push(i as u32);
            }
        }
        if !always.is_empty() {
            for (i, e) in self.edges.iter().enumerate().skip(above) {
                if always.contains(&e.source) || always.contains(&e.target) {
                    shown.push(i as u32);
                }
            }
        }
        shown
    }

    /// The ends of edge `i` (world units).
    pub fn edge_ends(&self, i: u32) -> (Pos2, Pos2) {
        let e = self.ends[i as usize];
        (pos2(e[0], e[1]), pos2(e[2], e[3]))
    }

    /// The edges among `nodes`, strongest first.
    pub fn edges_among(&self, nodes: &BTreeSet<u32>) -> Vec<Edge> {
        if nodes.len() < 2 {
            return Vec::new();
        }
        self.edges
            .iter()
            .filter(|e| nodes.contains(&e.source) && nodes.contains(&e.target))
            .copied()
            .collect()
    }

    /// The dictionary and feature index of a feature node: `entry.transcoders[layer]` for
    /// per-layer transcoders, the one CLT otherwise (the node's `feature`, as its layer numbers
    /// it). None for other kinds, or a layer with no dictionary listed.
    pub fn dictionary_of(&self, i: u32) -> Option<(&str, u32)> {
        let row = &self.table.nodes[i as usize];
        if self.kind[i as usize] != FEATURE {
            return None;
        }
        let names = &self.table.entry.transcoders;
        let name = if self.table.entry.transcoder_kind == "clt" || names.len() == 1 {
            names.first()?
        } else {
            names.get(row.layer as usize)?
        };
        Some((name.as_str(), row.feature))
    }

    /// What a node is, in words: `feature 1024 of layer 3 at position 5 (" Mary")`.
    pub fn describe(&self, i: u32) -> String {
        let row = &self.table.nodes[i as usize];
        let token = self
            .table
            .entry
            .token_strs
            .get(row.position as usize)
            .map_or(String::new(), |t| format!(" ({t:?})"));
        let at = format!("position {}{token}", row.position);
        match self.kind[i as usize] {
            EMBEDDING => format!("embedding of token {} at {at}", row.feature),
            FEATURE => format!("feature {} of layer {} at {at}", row.feature, row.layer),
            LOGIT => format!("logit of token {} at {at}", row.feature),
            _ => format!("error of layer {} at {at}", row.layer),
        }
    }
}

/// Each dictionary's explanations, read the first time one of its features is hovered (the
/// first successful explanation of a feature; offline ones only when no other).
#[derive(Default)]
pub struct ExplanationCache {
    by_dict: HashMap<String, Result<HashMap<u32, String>, String>>,
}

impl ExplanationCache {
    /// Feature `feature`'s explanation in `dict`: Ok(None) when it has none.
    pub fn get(&mut self, store: &Store, dict: &str, feature: u32) -> Result<Option<&str>, &str> {
        let loaded = self.by_dict.entry(dict.to_string()).or_insert_with(|| {
            let all = store.explanations(dict).map_err(|e| format!("{e:#}"))?;
            let mut map: HashMap<u32, (String, bool)> = HashMap::new();
            for e in all.explanations {
                let Some(text) = e.explanation else { continue };
                let offline = e.explainer == "offline";
                match map.get(&e.feature_id) {
                    // Keep the first, unless it is offline and this one is not.
                    Some((_, was_offline)) if !*was_offline || offline => {}
                    _ => {
                        map.insert(e.feature_id, (text, offline));
                    }
                }
            }
            Ok(map.into_iter().map(|(f, (t, _))| (f, t)).collect())
        });
        match loaded {
            Ok(map) => Ok(map.get(&feature).map(String::as_str)),
            Err(e) => Err(e.as_str()),
        }
    }
}

/// Zoom and pan of the canvas: world point `p` is drawn at `origin + pan + p · scale · zoom`,
/// `origin` the canvas' top left corner, `scale` what fits the whole graph at zoom 1.
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

/// The zoom limits: out to half the fitted size, in until a cell is `MAX_CELL` points wide.
pub const MIN_ZOOM: f32 = 0.5;
pub const MAX_CELL: f32 = 400.0;

impl Camera {
    pub fn to_screen(&self, origin: Pos2, scale: Vec2, p: Pos2) -> Pos2 {
        origin + self.pan + vec2(p.x * scale.x, p.y * scale.y) * self.zoom
    }

    pub fn to_world(&self, origin: Pos2, scale: Vec2, s: Pos2) -> Pos2 {
        let v = (s - origin - self.pan) / self.zoom;
        pos2(v.x / scale.x, v.y / scale.y)
    }

    /// Zoom by `factor` (within `MIN_ZOOM..=max`) keeping the point under `pointer` where it is.
    pub fn zoom_at(&mut self, origin: Pos2, pointer: Pos2, factor: f32, max: f32) {
        let zoom = (self.zoom * factor).clamp(MIN_ZOOM, max.max(MIN_ZOOM));
        let from = pointer - origin - self.pan;
        self.pan = pointer - origin - from * (zoom / self.zoom);
        self.zoom = zoom;
    }
}

#[cfg(test)]
mod tests {
    use loupe_store::graphs::{GraphEdgeRow, GraphEntry, GraphSettings};

    use super::*;

    pub(crate) fn node(node: u32, kind: &str, layer: u16, position: u32, influence: f32) -> GraphNodeRow {
        GraphNodeRow {
            node,
            node_id: format!("{kind}{node}"),
            kind: kind.into(),
            layer,
            position,
            feature: 10 + node,
            activation: 1.0,
            probability: None,
            influence,
        }
    }

    fn graph() -> GraphData {
        let nodes = vec![
            node(0, "embedding", 0, 0, 0.1),
            node(1, "embedding", 0, 1, 0.1),
            node(2, "feature", 0, 1, 0.9),
            node(3, "feature", 0, 1, 0.4),
            node(4, "error", 0, 1, 0.2),
            node(5, "feature", 1, 1, 0.3),
            node(6, "logit", 2, 1, 0.7),
        ];
        let w = |source, target, weight| GraphEdgeRow { source, target, weight };
        let edges = vec![w(0, 2, 0.1), w(2, 5, -0.8), w(5, 6, 0.5), w(3, 6, 0.05), w(1, 9, 3.0)];
        let entry = GraphEntry {
            prompt: "a b".into(),
            tokens: vec![1, 2],
            token_strs: vec!["<bos>".into(), " b".into()],
            transcoders: vec!["t0".into(), "t1".into()],
            transcoder_kind: "plt".into(),
            n_layers: 2,
            settings: GraphSettings::default(),
            active_features: 3,
            n_nodes: 7,
            n_edges: 4,
            replacement_score: 0.5,
            completeness_score: 0.5,
            replacement_score_unpruned: 0.5,
            completeness_score_unpruned: 0.5,
            wall_s: 0.1,
            model: "m".into(),
            model_sha256: "0".into(),
            files: Vec::new(),
        };
        GraphData::new(GraphTable { name: "g".into(), entry, nodes, edges })
    }

    #[test]
    fn nodes_are_placed_by_row_and_position_and_edges_sorted() {
        let g = graph();
        assert_eq!((g.n_positions, g.n_rows), (2, 4));
        let cell = |i: usize| (g.centre[i].x as usize, g.centre[i].y as usize);
        // Embeddings at the bottom (row 3), layer 0 (row 2), layer 1 (row 1), logits on top.
        assert_eq!(
            [cell(0), cell(1), cell(2), cell(4), cell(5), cell(6)],
            [(0, 3), (1, 3), (1, 2), (1, 2), (1, 1), (1, 0)]
        );
        assert_eq!(g.cell(2, 1), [2, 3, 4], "features by influence, then the error");
        assert_eq!(g.count_in(&(0..2), &(0..4)), 7);
        assert_eq!(g.count_in(&(1..2), &(2..3)), 3);
        assert_eq!(g.edges.len(), 4, "an edge to a node not in the table is left out");
        assert_eq!(g.edges[0], Edge { source: 2, target: 5, weight: -0.8 });
        assert_eq!((g.max_edge, g.count_above(0.5), g.count_above(0.0)), (0.8, 2, 4));
        assert!(g.radius(2) > g.radius(3), "size follows influence");
        assert_eq!(g.node_at(g.centre[5], 0.0), Some(5));
        assert_eq!(g.node_at(pos2(0.5, 0.5), 0.0), None);
        assert_eq!(g.index("feature5"), Some(5));
        assert_eq!(g.dictionary_of(5), Some(("t1", 15)));
        assert_eq!(g.dictionary_of(4), None);
        assert_eq!(g.describe(6), "logit of token 16 at position 1 (\" b\")");
        assert_eq!(
            (g.row_label(0), g.row_label(1), g.row_label(3)),
            ("logit".into(), "L1".into(), "emb".into())
        );
    }

    #[test]
    fn visible_edges_are_the_strongest_in_view_within_budget() {
        let g = graph();
        let all = Rect::from_min_max(pos2(0.0, 0.0), pos2(2.0, 4.0));
        assert_eq!(g.visible_edges(all, 0.0, 10, &BTreeSet::new()), [0, 1, 2, 3]);
        assert_eq!(g.visible_edges(all, 0.0, 2, &BTreeSet::new()), [0, 1], "the budget keeps the strongest");
        assert_eq!(g.visible_edges(all, 0.5, 10, &BTreeSet::new()), [0, 1]);
        assert_eq!(g.visible_edges(all, 0.5, 10, &BTreeSet::from([3])), [0, 1, 3], "a pinned node's edges");
        // Only the embeddings' row of position 0: no edge crosses it.
        let corner = Rect::from_min_max(pos2(0.0, 3.0), pos2(0.3, 4.0));
        assert!(g.visible_edges(corner, 0.0, 10, &BTreeSet::new()).is_empty());
        assert_eq!(g.edges_among(&BTreeSet::from([2, 5, 6])).len(), 2);
    }

    #[test]
    fn the_camera_zooms_about_the_pointer_and_maps_back() {
        let (origin, scale) = (pos2(10.0, 20.0), vec2(50.0, 20.0));
        let mut c = Camera::default();
        let p = pos2(1.5, 2.5);
        assert_eq!(c.to_screen(origin, scale, p), pos2(85.0, 70.0));
        let pointer = pos2(100.0, 60.0);
        let under = c.to_world(origin, scale, pointer);
        c.zoom_at(origin, pointer, 3.0, 100.0);
        assert_eq!(c.zoom, 3.0);
        assert!((c.to_screen(origin, scale, under) - pointer).length() < 1e-3);
        assert!((c.to_world(origin, scale, c.to_screen(origin, scale, p)) - p).length() < 1e-4);
        c.zoom_at(origin, pointer, 1e6, 100.0);
        assert_eq!(c.zoom, 100.0);
    }
}
