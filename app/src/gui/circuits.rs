//! The Circuits view: the store's circuits of one task drawn as a graph of heads and MLPs by layer
//! (layers as columns, a layer's heads then its MLP; colour and size by the chosen method's score,
//! edges above a threshold as curves whose width and opacity follow |score|; scroll to zoom, drag
//! to pan), a panel for the selected node (its score under every method of the task, its strongest
//! edges, pin, open in the Heads view), and the task's evaluation (each method against the patching
//! ground truth: AUCs, CPR, CMD, times, the faithfulness curves). Every node is an accessible
//! button labelled `node L.H` / `node L.mlp`. What it reads and computes is `circuits_data.rs`;
//! the evaluation panel is `circuits_eval.rs`.

use std::collections::BTreeSet;

use egui::accesskit::Role;
use egui::{Color32, Pos2, Rect, RichText, Sense, Stroke, Ui, vec2};

use super::circuits_data::{self, Camera, CircuitsData, Graph, Layout, TaskCircuits};
use super::circuits_eval;
use super::jobs::error_ui;
use super::navigation::Item;
use super::view::{View, ViewContext};

/// Room for the slot labels (left) and layer labels (top) of the canvas.
const LEFT_MARGIN: f32 = 44.0;
const TOP_MARGIN: f32 = 22.0;
/// Length of the straight pieces an edge's curve is drawn with (pixels).
const CURVE_PIECE: f32 = 30.0;
/// Edges listed per direction in the node panel.
const NODE_EDGES: usize = 6;
const POSITIVE: Color32 = Color32::from_rgb(255, 140, 0);
const NEGATIVE: Color32 = Color32::from_rgb(60, 110, 220);
const PIN: Color32 = Color32::from_rgb(230, 200, 40);

#[derive(Default)]
pub struct CircuitsView {
    /// Every circuit and evaluation, read on first draw (small tables).
    data: Option<Result<CircuitsData, String>>,
    /// The task shown and its circuit (the method) shown, indices into `data`.
    pub task: usize,
    pub circuit: usize,
    /// The evaluation of the task shown.
    eval: usize,
    /// The edge threshold on |score| (None: the circuit's default).
    threshold: Option<f32>,
    /// The selected node (`L.H` / `L.mlp`) and the pinned ones (by name: they stay across methods).
    selected: Option<String>,
    pinned: BTreeSet<String>,
    camera: Camera,
    /// The navigation item last followed (a later change of method is not undone by it).
    synced: Option<Item>,
    /// The circuit to show at start (`loupe gui --circuit`).
    start: Option<String>,
}

impl CircuitsView {
    /// A view that shows circuit `name` first.
    pub fn starting_at(name: Option<String>) -> CircuitsView {
        CircuitsView { start: name, ..CircuitsView::default() }
    }

    /// The name of the circuit shown, once read.
    pub fn circuit_name(&self) -> Option<&str> {
        Some(self.graph()?.name())
    }

    /// The pinned nodes.
    pub fn pinned(&self) -> &BTreeSet<String> {
        &self.pinned
    }

    fn tasks(&self) -> Option<&TaskCircuits> {
        self.data.as_ref()?.as_ref().ok()?.tasks.get(self.task)
    }

    fn graph(&self) -> Option<&Graph> {
        self.tasks()?.circuits.get(self.circuit)
    }

    /// Show circuit `circuit` of task `task` (its default threshold, the whole graph in view).
    fn choose(&mut self, task: usize, circuit: usize) {
        if (task, circuit) != (self.task, self.circuit) {
            if task != self.task {
                self.eval = 0;
                self.camera = Camera::default();
            }
            self.task = task;
            self.circuit = circuit;
            self.threshold = None;
        }
    }

    /// Follow `--circuit` and the navigation's circuit node, when new.
    fn follow(&mut self, cx: &ViewContext) {
        let Some(Ok(data)) = &self.data else { return };
        if let Some(name) = self.start.take()
            && let Some((t, c)) = data.find(&name)
        {
            self.choose(t, c);
        }
        let Some(Ok(data)) = &self.data else { return };
        if let Some(item @ Item::CircuitNode { circuit, node }) = cx.current
            && self.synced.as_ref() != Some(item)
        {
            if let Some((t, c)) = data.find(circuit) {
                self.choose(t, c);
            }
            self.selected = Some(node.clone());
            self.synced = Some(item.clone());
        }
    }
}

impl View for CircuitsView {
    fn title(&self) -> &str {
        "Circuits"
    }

    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        if self.data.is_none() {
            self.data = Some(circuits_data::load(cx.store).map_err(|e| format!("{e:#}")));
        }
        self.follow(cx);
        match &self.data {
            Some(Err(e)) => {
                let e = e.clone();
                egui::CentralPanel::default().show(ui, |ui| error_ui(ui, &e));
                return;
            }
            Some(Ok(d)) if d.is_empty() => {
                egui::CentralPanel::default().show(ui, |ui| empty_ui(ui, cx));
                return;
            }
            _ => {}
        }
        egui::Panel::top("circuit controls").show(ui, |ui| self.controls_ui(ui));
        egui::Panel::bottom("circuit evaluation").resizable(true).default_size(250.0).show(ui, |ui| {
            ui.take_available_height();
            if let Some(Ok(data)) = &self.data {
                circuits_eval::eval_ui(ui, &data.tasks[self.task], &mut self.eval, cx.store_root);
            }
        });
        egui::Panel::right("circuit node").resizable(true).default_size(330.0).show(ui, |ui| {
            ui.take_available_width();
            egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| self.node_ui(ui, cx));
        });
        egui::CentralPanel::default().show(ui, |ui| self.canvas_ui(ui, cx));
    }
}

/// The store has no circuit: what to run.
fn empty_ui(ui: &mut Ui, cx: &ViewContext) {
    ui.heading("Circuits");
    let s = cx.store_root;
    ui.label(
        RichText::new(format!(
            "no circuits in this store: run `loupe circuit --store {s} --task assets/tasks/ioi.jsonl --method patching`"
        ))
        .color(ui.visuals().warn_fg_color),
    );
    ui.label(
        RichText::new(format!(
            "then `--method attribution` and `--method discrete-sae` on the same task, and \
             `loupe circuit eval --store {s} --task assets/tasks/ioi.jsonl` to compare them with the \
             patching ground truth"
        ))
        .weak(),
    );
}

/// Colour of a score `value` against the largest |score| `max`: orange up from zero, blue below
/// (unsigned scores: orange), from the background.
fn score_colour(value: f32, max: f32, background: Color32) -> Color32 {
    if !value.is_finite() {
        return Color32::from_gray(128);
    }
    let t = if max > 0.0 { (value.abs() / max).clamp(0.0, 1.0) } else { 0.0 };
    let target = if value >= 0.0 { POSITIVE } else { NEGATIVE };
    let mix = |x: u8, y: u8| (x as f32 + (y as f32 - x as f32) * (0.15 + 0.85 * t)).round() as u8;
    Color32::from_rgb(
        mix(background.r(), target.r()),
        mix(background.g(), target.g()),
        mix(background.b(), target.b()),
    )
}

impl CircuitsView {
    fn controls_ui(&mut self, ui: &mut Ui) {
        let Some(Ok(data)) = &self.data else { return };
        let (mut task, mut circuit) = (self.task, self.circuit);
        let t = &data.tasks[self.task];
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("Task");
            egui::ComboBox::from_id_salt("circuit task")
                .selected_text(&t.label)
                .show_ui(ui, |ui| {
                    for (i, other) in data.tasks.iter().enumerate() {
                        ui.selectable_value(&mut task, i, &other.label);
                    }
                })
                .response
                .labelled_by(label.id);
            let label = ui.label("Method");
            let shown = t.circuits.get(circuit).map_or("none".to_string(), method_label);
            egui::ComboBox::from_id_salt("circuit method")
                .selected_text(shown)
                .show_ui(ui, |ui| {
                    for (i, g) in t.circuits.iter().enumerate() {
                        ui.selectable_value(&mut circuit, i, method_label(g));
                    }
                })
                .response
                .labelled_by(label.id);
            if let Some(g) = t.circuits.get(self.circuit) {
                let label = ui.label("Edge threshold");
                let mut threshold = self.threshold.unwrap_or_else(|| g.default_threshold());
                let slider = egui::Slider::new(&mut threshold, 0.0..=g.max_edge.max(f32::MIN_POSITIVE))
                    .logarithmic(true)
                    .custom_formatter(|v, _| format!("{v:.4}"));
                let changed = ui.add_enabled(!g.edges.is_empty(), slider).labelled_by(label.id).changed();
                if changed {
                    self.threshold = Some(threshold);
                }
                let text = if g.edges.is_empty() {
                    format!("{} scores no edges", g.method())
                } else {
                    format!(
                        "{} of {} edges with |score| ≥ {threshold:.4}",
                        g.count_above(threshold),
                        g.edges.len()
                    )
                };
                ui.label(RichText::new(text).weak());
            }
            if ui.button("Reset view").on_hover_text("zoom 1, the whole graph in view").clicked() {
                self.camera = Camera::default();
            }
        });
        if task != self.task {
            self.choose(task, 0);
        } else if circuit != self.circuit {
            self.choose(task, circuit);
        }
        let Some(Ok(data)) = &self.data else { return };
        let t = &data.tasks[self.task];
        let task_line = format!(
            "{} pairs · {}: clean {:.3}, corrupt {:.3} · accuracy {:.0} %",
            t.task.pairs,
            t.task.metric,
            t.task.metric_clean,
            t.task.metric_corrupt,
            100.0 * t.task.accuracy
        );
        match t.circuits.get(self.circuit) {
            Some(g) => {
                let e = &g.table.entry;
                ui.label(
                    RichText::new(format!(
                        "{} · {} · {} layers × {} heads · {task_line} · {:.2} s",
                        g.name(),
                        e.model,
                        e.n_layers,
                        e.n_heads,
                        e.wall_s
                    ))
                    .weak(),
                );
                let sign = if g.signed { " (orange +, blue −)" } else { "" };
                let mut legend = format!(
                    "colour: {}{sign}, size: its magnitude · click a node for its scores, shift-click to pin · \
                     scroll to zoom, drag to pan",
                    g.score_word()
                );
                if !self.pinned.is_empty() {
                    let names: Vec<&str> = self.pinned.iter().map(String::as_str).collect();
                    legend = format!("pinned: {} · {legend}", names.join(", "));
                }
                ui.label(RichText::new(legend).weak());
            }
            None => {
                ui.label(RichText::new(task_line).weak());
            }
        }
    }

    /// The graph: nodes by layer, edges above the threshold (and every pinned node's), zoom and pan.
    fn canvas_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let Some(Ok(data)) = &self.data else { return };
        let t = &data.tasks[self.task];
        let Some(g) = t.circuits.get(self.circuit) else {
            let names: Vec<&str> = t.evals.iter().map(|e| e.name.as_str()).collect();
            ui.label(
                RichText::new(format!(
                    "no circuit of {} in this store (only the evaluation {}): run `loupe circuit --store {} \
                     --task assets/tasks/{} --method patching`",
                    t.task.file,
                    names.join(", "),
                    cx.store_root,
                    t.task.file
                ))
                .color(ui.visuals().warn_fg_color),
            );
            return;
        };
        let (rect, response) = ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
        response.widget_info(|| egui::WidgetInfo::labeled(Role::Canvas, true, "circuit graph"));
        let area = Rect::from_min_max(rect.min + vec2(LEFT_MARGIN, TOP_MARGIN), rect.max);
        let layout = Layout::fit(area, g.n_layers, g.n_heads + 1);
        let origin = area.min;
        if response.dragged() {
            self.camera.pan += response.drag_delta();
        }
        if let Some(pointer) = ui.input(|i| i.pointer.hover_pos()).filter(|p| rect.contains(*p)) {
            let factor = ui.input(|i| i.zoom_delta() * (i.smooth_scroll_delta().y / 200.0).exp());
            if factor != 1.0 {
                self.camera.zoom_at(origin, pointer, factor);
            }
        }
        let camera = self.camera;
        let at = |layer: usize, slot: usize| camera.to_screen(origin, layout.place(layer, slot));
        let painter = ui.painter_at(rect);
        let weak = ui.visuals().weak_text_color();
        let font = egui::FontId::proportional(11.0);
        for l in 0..g.n_layers {
            let x = at(l, 0).x;
            if (rect.left() + LEFT_MARGIN..=rect.right()).contains(&x) {
                painter.text(
                    Pos2::new(x, rect.top() + 2.0),
                    egui::Align2::CENTER_TOP,
                    format!("L{l}"),
                    font.clone(),
                    weak,
                );
            }
        }
        for s in 0..=g.n_heads {
            let y = at(0, s).y;
            if (rect.top() + TOP_MARGIN..=rect.bottom()).contains(&y) {
                let text = if s == g.n_heads { "MLP".to_string() } else { format!("H{s}") };
                painter.text(
                    Pos2::new(rect.left() + 4.0, y),
                    egui::Align2::LEFT_CENTER,
                    text,
                    font.clone(),
                    weak,
                );
            }
        }
        let area_painter = ui.painter_at(area);
        // Edges: the pinned nodes' always, the rest above the threshold, weakest first.
        let pinned: BTreeSet<usize> = self.pinned.iter().filter_map(|n| g.index(n)).collect();
        let threshold = self.threshold.unwrap_or_else(|| g.default_threshold());
        for (s, d, score) in g.edges_shown(threshold, &pinned) {
            let (Some(a), Some(b)) = (g.places[s], g.places[d]) else { continue };
            let (p0, p3) = (at(a.0, a.1), at(b.0, b.1));
            // Across layers: a curve leaving and arriving level; within a layer (a head to its
            // MLP): a bow to the right, clear of the other heads.
            let bend = if a.0 == b.0 { layout.step.x * camera.zoom * 0.4 } else { (p3.x - p0.x) / 2.0 };
            let (p1, p2) = if a.0 == b.0 {
                (p0 + vec2(bend, 0.0), p3 + vec2(bend, 0.0))
            } else {
                (p0 + vec2(bend, 0.0), p3 - vec2(bend, 0.0))
            };
            let bounds = Rect::from_points(&[p0, p1, p2, p3]);
            if !bounds.intersects(area) {
                continue;
            }
            let w = if g.max_edge > 0.0 { (score.abs() / g.max_edge).clamp(0.0, 1.0) } else { 0.0 };
            let colour = if score >= 0.0 { POSITIVE } else { NEGATIVE };
            let stroke = Stroke::new(0.6 + 3.4 * w, colour.gamma_multiply(0.2 + 0.75 * w));
            // Straight pieces of about CURVE_PIECE px: thousands of edges stay cheap to tessellate.
            let around = (p1 - p0).length() + (p2 - p1).length() + (p3 - p2).length();
            let pieces = (around / CURVE_PIECE).ceil().clamp(4.0, 24.0) as usize;
            let curve = (0..=pieces).map(|k| {
                let u = k as f32 / pieces as f32;
                let v = 1.0 - u;
                let mix = |a: f32, b: f32, c: f32, d: f32| {
                    v * v * v * a + 3.0 * v * v * u * b + 3.0 * v * u * u * c + u * u * u * d
                };
                Pos2::new(mix(p0.x, p1.x, p2.x, p3.x), mix(p0.y, p1.y, p2.y, p3.y))
            });
            area_painter.add(egui::Shape::line(curve.collect(), stroke));
        }
        // Nodes: an accessible button each, where visible.
        let background = ui.visuals().extreme_bg_color;
        let strong = ui.visuals().strong_text_color();
        let mut clicked = None;
        for (i, row) in g.table.nodes.iter().enumerate() {
            let Some((layer, slot)) = g.places[i] else { continue };
            let centre = at(layer, slot);
            let t = if g.max_node > 0.0 { row.score.abs() / g.max_node } else { 0.0 };
            let r = layout.radius(t) * camera.zoom;
            let node_rect = Rect::from_center_size(centre, vec2(2.0 * r, 2.0 * r).max(vec2(8.0, 8.0)));
            if !node_rect.intersects(area) {
                continue;
            }
            let fill = score_colour(row.score, g.max_node, background);
            let (selected, pinned) =
                (self.selected.as_ref() == Some(&row.node), self.pinned.contains(&row.node));
            let outline = if selected { Stroke::new(2.5, strong) } else { Stroke::new(1.0, weak) };
            if pinned {
                area_painter.circle_stroke(centre, r + 4.0, Stroke::new(3.0, PIN));
            }
            if slot == g.n_heads {
                let square = Rect::from_center_size(centre, vec2(1.8 * r, 1.8 * r));
                area_painter.rect_filled(square, 3.0, fill);
                area_painter.rect_stroke(square, 3.0, outline, egui::StrokeKind::Outside);
            } else {
                area_painter.circle_filled(centre, r, fill);
                area_painter.circle_stroke(centre, r, outline);
            }
            if r >= 13.0 {
                let dark = fill.r() as u32 + fill.g() as u32 + fill.b() as u32 > 380;
                let text = if dark { Color32::BLACK } else { Color32::WHITE };
                area_painter.text(centre, egui::Align2::CENTER_CENTER, &row.node, font.clone(), text);
            }
            let id = ui.make_persistent_id(("circuit node", &row.node));
            let node = ui.interact(node_rect.intersect(area), id, Sense::click());
            node.widget_info(|| egui::WidgetInfo::labeled(Role::Button, true, format!("node {}", row.node)));
            let node = node.on_hover_ui(|ui| {
                ui.label(format!(
                    "{} · {} {:.4} (#{} of {})",
                    row.node,
                    g.score_word(),
                    row.score,
                    g.rank(i),
                    g.table.nodes.len()
                ));
            });
            if node.double_clicked() && slot < g.n_heads {
                cx.open(Item::Head { layer, head: slot });
            } else if node.clicked() {
                let pin = ui.input(|i| i.modifiers.shift || i.modifiers.command);
                clicked = Some((row.node.clone(), pin));
            }
        }
        if let Some((node, pin)) = clicked {
            if pin {
                if !self.pinned.remove(&node) {
                    self.pinned.insert(node);
                }
            } else {
                self.select(cx, node);
            }
        }
    }

    /// Select `node` (a navigation item: back returns to the previous selection).
    fn select(&mut self, cx: &mut ViewContext, node: String) {
        if let Some(name) = self.circuit_name() {
            cx.open(Item::CircuitNode { circuit: name.to_string(), node: node.clone() });
        }
        self.selected = Some(node);
    }

    /// The selected node: its scores under every method of the task, its strongest edges, pin,
    /// and a head's link to the Heads view.
    fn node_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let Some(Ok(data)) = &self.data else { return };
        let t = &data.tasks[self.task];
        let Some(node) = self.selected.clone() else {
            ui.label(
                "Click a node for its score under every method of this task and its strongest edges; \
                 shift-click a node (or tick Pin here) to pin it: a pinned node stays highlighted with \
                 all its edges drawn. Double-click a head to open it in the Heads view.",
            );
            return;
        };
        ui.heading(format!("Node {node}"));
        let parsed = loupe_analysis::circuits::Node::parse(&node, usize::MAX, usize::MAX).ok();
        match parsed {
            Some(n) => match n.head {
                Some(h) => ui.label(format!("head {h} of layer {}", n.layer)),
                None => ui.label(format!("the MLP of layer {}", n.layer)),
            },
            None => ui.label(RichText::new("not a node name").weak()),
        };
        let mut pinned = self.pinned.contains(&node);
        if ui
            .checkbox(&mut pinned, "Pin")
            .on_hover_text("keep it highlighted, with all its edges drawn")
            .changed()
        {
            if pinned {
                self.pinned.insert(node.clone());
            } else {
                self.pinned.remove(&node);
            }
        }
        if let Some(n) = parsed
            && let Some(head) = n.head
            && ui.button(format!("Open {node} in the Heads view")).clicked()
        {
            cx.open(Item::Head { layer: n.layer, head });
        }
        ui.separator();
        ui.label(RichText::new("Scores under every method of the task").strong());
        egui::Grid::new("node scores").striped(true).show(ui, |ui| {
            for h in ["method", "circuit", "score", "rank by |score|"] {
                ui.label(RichText::new(h).weak());
            }
            ui.end_row();
            for (i, s) in t.scores_of(&node).iter().enumerate() {
                let text =
                    |x: String| if i == self.circuit { RichText::new(x).strong() } else { RichText::new(x) };
                ui.label(text(s.method.to_string()));
                ui.label(text(s.circuit.to_string()));
                match s.score {
                    Some(v) => {
                        ui.label(text(format!("{v:.4}")));
                        ui.label(text(format!("{} of {}", s.rank, s.of)));
                    }
                    None => {
                        ui.label(RichText::new("not scored").weak());
                        ui.label("");
                    }
                }
                ui.end_row();
            }
        });
        let Some(g) = t.circuits.get(self.circuit) else { return };
        let Some(i) = g.index(&node) else { return };
        ui.separator();
        if g.edges.is_empty() {
            ui.label(RichText::new(format!("{} scores no edges", g.method())).weak());
            return;
        }
        let mut open = None;
        for (title, into) in [("Strongest edges in", true), ("Strongest edges out", false)] {
            let list = g.edges_of(i, into, NODE_EDGES);
            ui.label(RichText::new(format!("{title} ({})", g.method())).strong());
            if list.is_empty() {
                ui.label(RichText::new("none").weak());
            }
            egui::Grid::new(title).show(ui, |ui| {
                for (other, score) in list {
                    let name = &g.table.nodes[other].node;
                    if ui.link(name).clicked() {
                        open = Some(name.clone());
                    }
                    ui.label(format!("{score:.4}"));
                    ui.end_row();
                }
            });
        }
        if let Some(other) = open {
            self.select(cx, other);
        }
    }
}

/// A method's entry in the Method menu.
fn method_label(g: &Graph) -> String {
    format!("{} · {}", g.method(), g.name())
}
