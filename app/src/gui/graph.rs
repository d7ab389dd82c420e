//! The Graph view: one of the store's attribution graphs (`loupe graph`) drawn as token positions
//! × layers — x the position (its token under the axis), y the embeddings at the bottom, then
//! layers 0…L−1 (features and that layer's error), the logits at the top — nodes coloured by kind
//! and sized by influence, edges with |weight| above a threshold (orange positive, blue negative);
//! scroll to zoom, drag to pan. Hover a node for what it is (a feature's explanation, activation
//! and influence); click selects it (a navigation item), double-click a feature opens its page;
//! shift-click pins it into the subgraph panel, where pinned nodes group into named supernodes
//! saved in the store (`graph_panel.rs`).
//!
//! Large graphs (100,000 nodes, 1,000,000 edges) stay fast by level of detail: only the cells in
//! view are visited; when more than [`NODE_BUDGET`] nodes are in view their density is drawn per
//! screen bin instead; at most [`EDGE_BUDGET`] edges are drawn, the strongest in view; nodes are
//! accessible buttons (`node 3_1024_5`) only when at most [`WIDGET_BUDGET`] are drawn, and found
//! under the pointer from their cell otherwise. What it reads and computes is `graph_data.rs`.

use std::collections::{BTreeSet, HashMap};

use egui::accesskit::Role;
use egui::epaint::Mesh;
use egui::{Color32, Pos2, Rect, RichText, Sense, Stroke, Ui, pos2, vec2};

use super::graph_data::{
    self, Camera, EMBEDDING, ERROR, ExplanationCache, FEATURE, GraphData, LOGIT, MAX_CELL,
};
use super::graph_panel::{self, Supernode};
use super::jobs::error_ui;
use super::navigation::Item;
use super::view::{View, ViewContext};

/// Room for the row labels (left) and the tokens under the axis (bottom).
const LEFT_MARGIN: f32 = 44.0;
const BOTTOM_MARGIN: f32 = 22.0;
/// At most this many nodes drawn one by one (more in view: their density per bin).
pub const NODE_BUDGET: usize = 6000;
/// At most this many nodes drawn as accessible buttons (more: found from their cell).
pub const WIDGET_BUDGET: usize = 1500;
/// At most this many edges drawn a frame, the strongest in view.
pub const EDGE_BUDGET: usize = 2000;
/// Width of a density bin, in points.
const BIN: f32 = 6.0;
pub const POSITIVE: Color32 = Color32::from_rgb(255, 140, 0);
pub const NEGATIVE: Color32 = Color32::from_rgb(60, 110, 220);
pub const PIN: Color32 = Color32::from_rgb(230, 200, 40);

/// A node kind's colour.
pub fn kind_colour(kind: u8) -> Color32 {
    match kind {
        EMBEDDING => Color32::from_rgb(110, 170, 110),
        FEATURE => Color32::from_rgb(40, 170, 170),
        LOGIT => Color32::from_rgb(200, 110, 200),
        _ => Color32::from_rgb(150, 150, 150),
    }
}

/// A node's strongest edges: `(node, [in, out])`, each as `(other node, weight)`.
pub(super) type NodeEdges = (u32, [Vec<(u32, f32)>; 2]);

#[derive(Default)]
pub struct GraphView {
    /// The store's graph names, read on first draw.
    names: Option<Vec<String>>,
    /// The graph shown and its data (read when chosen; `Err`: the message shown).
    shown: Option<String>,
    pub(super) data: Option<Result<GraphData, String>>,
    /// The edge threshold on |weight| (None: the graph's default).
    threshold: Option<f32>,
    pub(super) selected: Option<u32>,
    pub(super) pinned: BTreeSet<u32>,
    /// Each graph's supernodes, read from the store when first shown, then as last saved.
    pub(super) supernodes: HashMap<String, Vec<Supernode>>,
    /// The name typed for a new supernode, and the last save's error.
    pub(super) supernode_name: String,
    pub(super) save_error: Option<String>,
    pub(super) explanations: ExplanationCache,
    /// The selected node's strongest edges in and out, and the edges among the pinned nodes
    /// (each a scan of every edge, done when the selection or the pins change).
    pub(super) node_edges: Option<NodeEdges>,
    pub(super) among: Option<(BTreeSet<u32>, Vec<graph_data::Edge>)>,
    camera: Camera,
    /// The navigation item last followed.
    synced: Option<Item>,
    /// The graph to show at start (`loupe gui --graph`).
    start: Option<String>,
    /// What the last frame drew (for tests and the benchmark): nodes one by one, density bins,
    /// edges.
    pub drawn: Drawn,
}

/// What one frame of the canvas drew.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Drawn {
    pub nodes: usize,
    pub bins: usize,
    pub edges: usize,
}

impl GraphView {
    /// A view that shows graph `name` first.
    pub fn starting_at(name: Option<String>) -> GraphView {
        GraphView { start: name, ..GraphView::default() }
    }

    /// The name of the graph shown, once read.
    pub fn graph_name(&self) -> Option<&str> {
        Some(self.graph()?.name())
    }

    /// The pinned nodes' ids.
    pub fn pinned(&self) -> Vec<String> {
        let Some(g) = self.graph() else { return Vec::new() };
        self.pinned.iter().map(|&i| g.table.nodes[i as usize].node_id.clone()).collect()
    }

    /// The camera's zoom and pan.
    pub fn zoom(&self) -> f32 {
        self.camera.zoom
    }

    pub fn pan(&self) -> egui::Vec2 {
        self.camera.pan
    }

    pub(super) fn graph(&self) -> Option<&GraphData> {
        self.data.as_ref()?.as_ref().ok()
    }

    /// Show graph `name`: read it (and its supernodes), the whole graph in view.
    fn choose(&mut self, cx: &ViewContext, name: &str) {
        if self.shown.as_deref() == Some(name) {
            return;
        }
        let read = cx.store.read_graph(name).map_err(|e| format!("{e:#}"));
        self.data = Some(match read {
            Ok(Some(table)) => Ok(GraphData::new(table)),
            Ok(None) => Err(format!("no attribution graph named {name:?}")),
            Err(e) => Err(e),
        });
        if !self.supernodes.contains_key(name) {
            let rows = cx.store.read_supernodes(name).unwrap_or_default();
            self.supernodes.insert(name.to_string(), graph_panel::group(&rows));
        }
        self.shown = Some(name.to_string());
        self.selected = None;
        self.pinned.clear();
        self.node_edges = None;
        self.among = None;
        self.threshold = None;
        self.camera = Camera::default();
        self.save_error = None;
    }

    /// Follow `--graph` and the navigation's graph node, when new.
    fn follow(&mut self, cx: &ViewContext) {
        let names = self.names.get_or_insert_with(|| cx.store.graph_names()).clone();
        if let Some(name) = self.start.take().filter(|n| names.contains(n)) {
            self.choose(cx, &name);
        }
        if self.shown.is_none()
            && let Some(first) = names.first()
        {
            self.choose(cx, first);
        }
        if let Some(item @ Item::GraphNode { graph, node }) = cx.current
            && self.synced.as_ref() != Some(item)
        {
            self.choose(cx, graph);
            self.selected = self.graph().and_then(|g| g.index(node));
            self.synced = Some(item.clone());
        }
    }

    /// Select node `i` (a navigation item: back returns to the previous selection).
    pub(super) fn select(&mut self, cx: &mut ViewContext, i: u32) {
        let Some(g) = self.graph() else { return };
        let item =
            Item::GraphNode { graph: g.name().to_string(), node: g.table.nodes[i as usize].node_id.clone() };
        self.synced = Some(item.clone());
        cx.open(item);
        self.selected = Some(i);
    }

    pub(super) fn toggle_pin(&mut self, i: u32) {
        if !self.pinned.remove(&i) {
            self.pinned.insert(i);
        }
    }
}

impl View for GraphView {
    fn title(&self) -> &str {
        "Graph"
    }

    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        self.follow(cx);
        if self.names.as_ref().is_some_and(Vec::is_empty) {
            egui::CentralPanel::default().show(ui, |ui| empty_ui(ui, cx));
            return;
        }
        egui::Panel::top("graph controls").show(ui, |ui| self.controls_ui(ui, cx));
        if let Some(Err(e)) = &self.data {
            let e = e.clone();
            egui::CentralPanel::default().show(ui, |ui| error_ui(ui, &e));
            return;
        }
        egui::Panel::right("graph node").resizable(true).default_size(340.0).show(ui, |ui| {
            ui.take_available_width();
            egui::ScrollArea::vertical()
                .auto_shrink(false)
                .show(ui, |ui| graph_panel::panel_ui(self, ui, cx));
        });
        egui::CentralPanel::default().show(ui, |ui| self.canvas_ui(ui, cx));
    }
}

/// The store has no graph: what to run.
fn empty_ui(ui: &mut Ui, cx: &ViewContext) {
    ui.heading("Graph");
    ui.label(
        RichText::new(format!(
            "no attribution graphs in this store: run `loupe graph --store {} --transcoders NAMES --prompt TEXT`",
            cx.store_root
        ))
        .color(ui.visuals().warn_fg_color),
    );
    ui.label(
        RichText::new(
            "(per-layer transcoders from `loupe train-sae --input-hook`, or a CLT from `loupe train-clt`)",
        )
        .weak(),
    );
}

impl GraphView {
    fn controls_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let names = self.names.clone().unwrap_or_default();
        let mut chosen = None;
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("Attribution graph");
            egui::ComboBox::from_id_salt("graph name")
                .selected_text(self.shown.clone().unwrap_or_else(|| "none".into()))
                .show_ui(ui, |ui| {
                    for n in &names {
                        if ui.selectable_label(self.shown.as_ref() == Some(n), n).clicked() {
                            chosen = Some(n.clone());
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            if let Some(g) = self.graph() {
                let label = ui.label("Edge threshold");
                let mut threshold = self.threshold.unwrap_or_else(|| g.default_threshold());
                let slider = egui::Slider::new(&mut threshold, 0.0..=g.max_edge.max(f32::MIN_POSITIVE))
                    .logarithmic(true)
                    .custom_formatter(|v, _| format!("{v:.4}"));
                let changed = ui.add_enabled(!g.edges.is_empty(), slider).labelled_by(label.id).changed();
                let text = format!(
                    "{} of {} edges with |weight| ≥ {threshold:.4} (the strongest {EDGE_BUDGET} in view drawn)",
                    g.count_above(threshold),
                    g.edges.len()
                );
                ui.label(RichText::new(text).weak());
                if changed {
                    self.threshold = Some(threshold);
                }
            }
            if ui.button("Reset view").on_hover_text("zoom 1, the whole graph in view").clicked() {
                self.camera = Camera::default();
            }
        });
        if let Some(name) = chosen {
            self.choose(cx, &name);
        }
        let Some(g) = self.graph() else { return };
        let e = &g.table.entry;
        ui.label(
            RichText::new(format!(
                "{} · {} · {} layers · {} tokens · {} {} · {} nodes, {} edges · replacement {:.3}, completeness {:.3} \
                 (unpruned {:.3}, {:.3}) · {:.1} s",
                g.name(),
                e.model,
                e.n_layers,
                e.tokens.len(),
                e.transcoder_kind,
                short_list(&e.transcoders),
                g.table.nodes.len(),
                g.edges.len(),
                e.replacement_score,
                e.completeness_score,
                e.replacement_score_unpruned,
                e.completeness_score_unpruned,
                e.wall_s
            ))
            .weak(),
        );
        ui.horizontal_wrapped(|ui| {
            ui.label(RichText::new(format!("prompt: {:?} ·", e.prompt)).weak());
            for (kind, name) in [(EMBEDDING, "embedding"), (FEATURE, "feature"), (ERROR, "error"), (LOGIT, "logit")] {
                ui.label(RichText::new(name).color(kind_colour(kind)));
            }
            ui.label(
                RichText::new(
                    "· size: influence · edges: orange +, blue - · hover for what a node is, click to select, \
                     double-click a feature for its page, shift-click to pin · scroll to zoom, drag to pan",
                )
                .weak(),
            );
        });
    }

    /// The canvas: the cells in view, their nodes (or density), the strongest edges in view, the
    /// supernodes' boxes; zoom, pan, hover, click.
    fn canvas_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let Some(Ok(g)) = &self.data else { return };
        let (rect, response) = ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
        response.widget_info(|| egui::WidgetInfo::labeled(Role::Canvas, true, "attribution graph"));
        let area = Rect::from_min_max(rect.min + vec2(LEFT_MARGIN, 0.0), rect.max - vec2(0.0, BOTTOM_MARGIN));
        let origin = area.min;
        let scale = vec2(area.width() / g.n_positions as f32, area.height() / g.n_rows as f32);
        let max_zoom = (MAX_CELL / scale.x.min(scale.y)).max(1.0);
        if response.dragged() {
            self.camera.pan += response.drag_delta();
        }
        let pointer = ui.input(|i| i.pointer.hover_pos()).filter(|p| rect.contains(*p));
        if let Some(p) = pointer {
            let factor = ui.input(|i| i.zoom_delta() * (i.smooth_scroll_delta().y / 200.0).exp());
            if factor != 1.0 {
                self.camera.zoom_at(origin, p, factor, max_zoom);
            }
        }
        let camera = self.camera;
        let to_screen = |p: Pos2| camera.to_screen(origin, scale, p);
        let view = Rect::from_min_max(
            camera.to_world(origin, scale, area.min),
            camera.to_world(origin, scale, area.max),
        );
        let (positions, rows) = g.cells_in(view);
        let cell = scale * camera.zoom;
        let painter = ui.painter_at(area);
        axes(ui, rect, area, g, &positions, &rows, cell, &to_screen);

        // Edges: the strongest in view above the threshold, weakest drawn first; a pinned node's all.
        let threshold = self.threshold.unwrap_or_else(|| g.default_threshold());
        let shown = g.visible_edges(view, threshold, EDGE_BUDGET, &self.pinned);
        let mut mesh = Mesh::default();
        for &e in shown.iter().rev() {
            let (a, b) = g.edge_ends(e);
            let w = g.edges[e as usize].weight;
            let t = if g.max_edge > 0.0 { (w.abs() / g.max_edge).clamp(0.0, 1.0) } else { 0.0 };
            let colour = if w >= 0.0 { POSITIVE } else { NEGATIVE };
            segment(
                &mut mesh,
                to_screen(a),
                to_screen(b),
                0.6 + 2.4 * t,
                colour.gamma_multiply(0.15 + 0.8 * t),
            );
        }
        painter.add(mesh);
        let mut drawn = Drawn { edges: shown.len(), ..Drawn::default() };

        // Nodes: one by one when few enough are in view, else their density per bin.
        let in_view = g.count_in(&positions, &rows);
        let mut hovered = None;
        let mut clicked: Option<(u32, bool, bool)> = None;
        if in_view > NODE_BUDGET {
            let per_bin = ((BIN / cell.x).ceil() as usize).max(1);
            let mut mesh = Mesh::default();
            let max_count =
                (g.table.nodes.len() as f32 / (g.n_rows * g.n_positions) as f32 * per_bin as f32).max(1.0);
            for row in rows.clone() {
                let colour = kind_colour(match row {
                    0 => LOGIT,
                    r if r == g.n_rows - 1 => EMBEDDING,
                    _ => FEATURE,
                });
                let mut p = positions.start - positions.start % per_bin;
                while p < positions.end {
                    let end = (p + per_bin).min(g.n_positions);
                    let n = g.count_in(&(p..end), &(row..row + 1));
                    if n > 0 {
                        let t = ((n as f32).ln_1p() / (4.0 * max_count).ln_1p()).clamp(0.15, 1.0);
                        let r = Rect::from_min_max(
                            to_screen(pos2(p as f32, row as f32 + 0.1)),
                            to_screen(pos2(end as f32, row as f32 + 0.9)),
                        );
                        mesh.add_colored_rect(r, colour.gamma_multiply(t));
                        drawn.bins += 1;
                    }
                    p = end;
                }
            }
            painter.add(mesh);
            if let Some(p) = pointer.filter(|p| area.contains(*p)) {
                hovered = g.node_at(camera.to_world(origin, scale, p), 2.0 / cell.x.min(cell.y));
            }
        } else {
            let widgets = in_view <= WIDGET_BUDGET;
            let background = ui.visuals().extreme_bg_color;
            let strong = ui.visuals().strong_text_color();
            let mut small = Mesh::default();
            for row in rows.clone() {
                for position in positions.clone() {
                    for &i in g.cell(row, position) {
                        let centre = to_screen(g.centre[i as usize]);
                        let r = (g.radius(i) * cell.x.min(cell.y)).max(1.0);
                        let node_rect =
                            Rect::from_center_size(centre, vec2(2.0 * r, 2.0 * r).max(vec2(6.0, 6.0)));
                        if !node_rect.intersects(area) {
                            continue;
                        }
                        drawn.nodes += 1;
                        let fill = kind_colour(g.kind[i as usize]);
                        let (selected, pinned) = (self.selected == Some(i), self.pinned.contains(&i));
                        if !selected && !pinned {
                            disc(&mut small, centre, r, fill, g.kind[i as usize] == ERROR);
                        } else {
                            if pinned {
                                painter.circle_stroke(centre, r + 3.0, Stroke::new(2.5, PIN));
                            }
                            let outline = if selected {
                                Stroke::new(2.5, strong)
                            } else {
                                Stroke::new(1.0, background)
                            };
                            if g.kind[i as usize] == ERROR {
                                let square = Rect::from_center_size(centre, vec2(1.7 * r, 1.7 * r));
                                painter.rect_filled(square, 2.0, fill);
                                painter.rect_stroke(square, 2.0, outline, egui::StrokeKind::Outside);
                            } else {
                                painter.circle_filled(centre, r, fill);
                                painter.circle_stroke(centre, r, outline);
                            }
                        }
                        if !widgets {
                            continue;
                        }
                        let node_id = &g.table.nodes[i as usize].node_id;
                        let id = ui.make_persistent_id(("graph node", node_id));
                        let node = ui.interact(node_rect.intersect(area), id, Sense::click());
                        node.widget_info(|| {
                            egui::WidgetInfo::labeled(Role::Button, true, format!("node {node_id}"))
                        });
                        if node.hovered() {
                            hovered = Some(i);
                        }
                        if node.clicked() || node.double_clicked() {
                            let shift = ui.input(|i| i.modifiers.shift || i.modifiers.command);
                            clicked = Some((i, shift, node.double_clicked()));
                        }
                    }
                }
            }
            painter.add(small);
            if !widgets && let Some(p) = pointer.filter(|p| area.contains(*p)) {
                hovered = g.node_at(camera.to_world(origin, scale, p), 2.0 / cell.x.min(cell.y));
            }
        }
        // Found from the cell (no widgets): the canvas' click is the node's.
        if clicked.is_none()
            && (response.clicked() || response.double_clicked())
            && let Some(i) = hovered
        {
            let shift = ui.input(|i| i.modifiers.shift || i.modifiers.command);
            clicked = Some((i, shift, response.double_clicked()));
        }
        self.drawn = drawn;
        graph_panel::supernode_boxes(self, &painter, &to_screen, cell);
        if let Some(i) = hovered {
            let text = graph_panel::node_lines(self, cx, i);
            egui::Tooltip::always_open(
                ui.ctx().clone(),
                ui.layer_id(),
                response.id.with("graph hover"),
                pointer_anchor(pointer),
            )
            .gap(12.0)
            .show(|ui| {
                for line in text {
                    ui.label(line);
                }
            });
        }
        if let Some((i, shift, double)) = clicked {
            if shift {
                self.toggle_pin(i);
            } else if double && let Some(item) = graph_panel::feature_item(self, cx, i) {
                cx.open(item);
            } else {
                self.select(cx, i);
            }
        }
    }
}

/// Where the hover tooltip goes: at the pointer.
fn pointer_anchor(pointer: Option<Pos2>) -> egui::PopupAnchor {
    egui::PopupAnchor::Position(pointer.unwrap_or_default())
}

/// The row labels left of the canvas and the tokens (or positions) under it.
#[allow(clippy::too_many_arguments)]
fn axes(
    ui: &Ui,
    rect: Rect,
    area: Rect,
    g: &GraphData,
    positions: &std::ops::Range<usize>,
    rows: &std::ops::Range<usize>,
    cell: egui::Vec2,
    to_screen: &dyn Fn(Pos2) -> Pos2,
) {
    let painter = ui.painter_at(rect);
    let weak = ui.visuals().weak_text_color();
    let font = egui::FontId::proportional(11.0);
    let every_row = ((14.0 / cell.y).ceil() as usize).max(1);
    for row in rows.clone().filter(|r| r % every_row == 0) {
        let y = to_screen(pos2(0.0, row as f32 + 0.5)).y;
        if (area.top()..=area.bottom()).contains(&y) {
            painter.text(
                pos2(rect.left() + 4.0, y),
                egui::Align2::LEFT_CENTER,
                g.row_label(row),
                font.clone(),
                weak,
            );
        }
    }
    // Tokens where a cell is wide enough for a few characters; else every k-th position number.
    let tokens = &g.table.entry.token_strs;
    let every = if cell.x >= 28.0 { 1 } else { ((40.0 / cell.x).ceil() as usize).max(1) };
    for p in positions.clone().filter(|p| p % every == 0) {
        let x = to_screen(pos2(p as f32 + 0.5, 0.0)).x;
        if !(area.left()..=area.right()).contains(&x) {
            continue;
        }
        let text = match tokens.get(p).filter(|_| every == 1) {
            Some(t) => {
                let chars = ((cell.x / 6.5) as usize).max(3);
                let t: String = t.chars().take(chars).collect();
                t.replace('\n', "⏎")
            }
            None => p.to_string(),
        };
        painter.text(pos2(x, area.bottom() + 4.0), egui::Align2::CENTER_TOP, text, font.clone(), weak);
    }
}

/// A straight line from `a` to `b`, `width` points wide, as two triangles of `mesh` (thousands of
/// edges stay one mesh, not thousands of shapes to tessellate).
fn segment(mesh: &mut Mesh, a: Pos2, b: Pos2, width: f32, colour: Color32) {
    let d = b - a;
    let len = d.length();
    if len < 0.01 {
        return;
    }
    let n = vec2(-d.y, d.x) * (width / 2.0 / len);
    let base = mesh.vertices.len() as u32;
    for p in [a + n, a - n, b - n, b + n] {
        mesh.colored_vertex(p, colour);
    }
    mesh.add_triangle(base, base + 1, base + 2);
    mesh.add_triangle(base, base + 2, base + 3);
}

/// A node as triangles of `mesh`: a square (an error node) or a polygon of 6 to 32 sides by its
/// radius (thousands of nodes stay one mesh; egui's circles would each be tessellated).
fn disc(mesh: &mut Mesh, centre: Pos2, r: f32, colour: Color32, square: bool) {
    if square || r < 2.0 {
        let side = if square { 1.7 * r } else { 2.0 * r };
        mesh.add_colored_rect(Rect::from_center_size(centre, vec2(side, side)), colour);
        return;
    }
    let sides = (r * 1.2).clamp(6.0, 32.0) as u32;
    let base = mesh.vertices.len() as u32;
    mesh.colored_vertex(centre, colour);
    for k in 0..sides {
        let a = std::f32::consts::TAU * k as f32 / sides as f32;
        mesh.colored_vertex(centre + r * vec2(a.cos(), a.sin()), colour);
    }
    for k in 0..sides {
        mesh.add_triangle(base, base + 1 + k, base + 1 + (k + 1) % sides);
    }
}

/// `a, b, c` or `a, b, … (18)` for a long list.
fn short_list(names: &[String]) -> String {
    match names.len() {
        0..=3 => names.join(", "),
        n => format!("{}, {}, … ({n})", names[0], names[1]),
    }
}

/// The graph's data is `graph_data`'s: re-exported for the tests' node rows.
pub use graph_data::DEFAULT_EDGES;
