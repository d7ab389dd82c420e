//! The Graph view's side panel and node texts: the selected node (what it is, its explanation,
//! activation and influence, its strongest edges, a link to its feature page), the subgraph of
//! pinned nodes (listed with the edges among them), and the supernodes — pinned nodes grouped by
//! hand under a name, saved in the store (`Store::write_supernodes`, the store opened read-write
//! for that one write only) and drawn as a box around their members.

use std::collections::BTreeSet;

use anyhow::Result;
use egui::{Pos2, Rect, RichText, Stroke, Ui, Vec2, vec2};
use loupe_store::Store;
use loupe_store::graphs::SupernodeRow;

use super::graph::{GraphView, PIN};
use super::graph_data::{EMBEDDING, FEATURE, GraphData, LOGIT};
use super::navigation::Item;
use super::view::ViewContext;

/// Edges listed per direction for the selected node, and edges listed among pinned nodes.
const NODE_EDGES: usize = 6;
const PINNED_EDGES: usize = 30;

/// A supernode: its name and its members' `node_id`s.
#[derive(Clone, Debug, PartialEq)]
pub struct Supernode {
    pub name: String,
    pub members: Vec<String>,
}

/// The supernodes of a table's rows, in first-seen order.
pub fn group(rows: &[SupernodeRow]) -> Vec<Supernode> {
    let mut out: Vec<Supernode> = Vec::new();
    for r in rows {
        match out.iter_mut().find(|s| s.name == r.supernode) {
            Some(s) => s.members.push(r.node_id.clone()),
            None => out.push(Supernode { name: r.supernode.clone(), members: vec![r.node_id.clone()] }),
        }
    }
    out
}

/// Save `supernodes` as graph `graph`'s, opening the store read-write for this write only (an
/// error when another process holds the writer lock).
fn save(store: &Store, graph: &str, supernodes: &[Supernode]) -> Result<()> {
    let rows: Vec<SupernodeRow> = supernodes
        .iter()
        .flat_map(|s| {
            s.members.iter().map(|m| SupernodeRow { supernode: s.name.clone(), node_id: m.clone() })
        })
        .collect();
    Store::open_rw(store.root())?.write_supernodes(graph, &rows)
}

/// The feature page of feature node `i`, when its dictionary is analysed.
pub fn feature_item(view: &GraphView, cx: &ViewContext, i: u32) -> Option<Item> {
    let (dict, feature) = view.graph()?.dictionary_of(i)?;
    cx.store
        .manifest()
        .features
        .contains_key(dict)
        .then(|| Item::Feature { dictionary: dict.to_string(), feature })
}

/// What node `i` is, line by line (the hover text): what and where, a feature's explanation,
/// activation and influence (a logit's probability).
pub fn node_lines(view: &mut GraphView, cx: &ViewContext, i: u32) -> Vec<String> {
    let Some(g) = view.data.as_ref().and_then(|d| d.as_ref().ok()) else { return Vec::new() };
    let row = &g.table.nodes[i as usize];
    let mut lines = vec![format!("{} · {}", row.node_id, g.describe(i))];
    if let Some((dict, feature)) = g.dictionary_of(i) {
        let text = match view.explanations.get(cx.store, dict, feature) {
            Ok(Some(e)) => format!("{dict} #{feature}: {e}"),
            Ok(None) => format!("{dict} #{feature}: no explanation"),
            Err(e) => format!("{dict} #{feature}: explanations unreadable: {e}"),
        };
        lines.push(text);
    }
    let mut numbers = format!("influence {:.4}", row.influence);
    match g.kind[i as usize] {
        FEATURE => numbers = format!("activation {:.4} · {numbers}", row.activation),
        LOGIT => numbers = format!("probability {:.4} · {numbers}", row.probability.unwrap_or(f32::NAN)),
        EMBEDDING => {}
        _ => {}
    }
    lines.push(numbers);
    lines
}

/// Each supernode as a box around its members (those in the graph), its name on top.
pub fn supernode_boxes(
    view: &GraphView,
    painter: &egui::Painter,
    to_screen: &dyn Fn(Pos2) -> Pos2,
    cell: Vec2,
) {
    let (Some(g), Some(name)) = (view.graph(), view.graph_name()) else { return };
    let Some(list) = view.supernodes.get(name) else { return };
    for s in list {
        let mut bounds = Rect::NOTHING;
        for m in &s.members {
            if let Some(i) = g.index(m) {
                let r = (g.radius(i) * cell.x.min(cell.y)).max(3.0) + 5.0;
                bounds = bounds
                    .union(Rect::from_center_size(to_screen(g.centre[i as usize]), vec2(2.0 * r, 2.0 * r)));
            }
        }
        if !bounds.is_positive() || !bounds.intersects(painter.clip_rect()) {
            continue;
        }
        painter.rect_stroke(bounds, 4.0, Stroke::new(2.0, PIN), egui::StrokeKind::Outside);
        painter.text(
            bounds.left_top() - vec2(0.0, 2.0),
            egui::Align2::LEFT_BOTTOM,
            &s.name,
            egui::FontId::proportional(12.0),
            PIN,
        );
    }
}

/// The side panel: the selected node, then the subgraph of pinned nodes and the supernodes.
pub fn panel_ui(view: &mut GraphView, ui: &mut Ui, cx: &mut ViewContext) {
    node_ui(view, ui, cx);
    ui.separator();
    subgraph_ui(view, ui, cx);
    ui.separator();
    supernodes_ui(view, ui, cx);
}

fn node_link(ui: &mut Ui, g: &GraphData, i: u32) -> bool {
    ui.link(&g.table.nodes[i as usize].node_id).on_hover_text(g.describe(i)).clicked()
}

fn node_ui(view: &mut GraphView, ui: &mut Ui, cx: &mut ViewContext) {
    let Some(i) = view.selected else {
        ui.label(
            "Click a node for what it is and its strongest edges; double-click a feature for its page; \
             shift-click nodes to pin them into the subgraph below, where they group into supernodes.",
        );
        return;
    };
    let lines = node_lines(view, cx, i);
    let Some(g) = view.graph() else { return };
    ui.heading(format!("Node {}", g.table.nodes[i as usize].node_id));
    for line in lines.iter().skip(1) {
        ui.label(line);
    }
    ui.label(RichText::new(g.describe(i)).weak());
    let mut pinned = view.pinned.contains(&i);
    let pin_changed = ui.checkbox(&mut pinned, "Pin").on_hover_text("add it to the subgraph").changed();
    let mut open = None;
    if let Some((dict, feature)) = g.dictionary_of(i) {
        match feature_item(view, cx, i) {
            Some(item) => {
                if ui.button(format!("Open feature {feature} of {dict}")).clicked() {
                    open = Some(item);
                }
            }
            None => {
                ui.label(
                    RichText::new(format!(
                        "{dict} has no analysis for a feature page: run `loupe analyze --store {} --dictionary {dict}`",
                        cx.store_root
                    ))
                    .weak(),
                );
            }
        }
    }
    let mut select = None;
    // A scan of every edge: once per selected node, not per frame.
    if view.node_edges.as_ref().is_none_or(|(n, _)| *n != i) {
        let of = |into: bool| -> Vec<(u32, f32)> {
            g.edges
                .iter()
                .filter(|e| if into { e.target == i } else { e.source == i })
                .take(NODE_EDGES)
                .map(|e| (if into { e.source } else { e.target }, e.weight))
                .collect()
        };
        view.node_edges = Some((i, [of(true), of(false)]));
    }
    let Some((_, lists)) = &view.node_edges else { return };
    let Some(g) = view.graph() else { return };
    for (k, title) in ["Strongest edges in", "Strongest edges out"].into_iter().enumerate() {
        ui.label(RichText::new(title).strong());
        let list = &lists[k];
        if list.is_empty() {
            ui.label(RichText::new("none").weak());
        }
        egui::Grid::new(title).show(ui, |ui| {
            for &(other, w) in list {
                if node_link(ui, g, other) {
                    select = Some(other);
                }
                ui.label(format!("{w:.4}"));
                ui.end_row();
            }
        });
    }
    if pin_changed {
        view.toggle_pin(i);
    }
    if let Some(item) = open {
        cx.open(item);
    }
    if let Some(other) = select {
        view.select(cx, other);
    }
}

fn subgraph_ui(view: &mut GraphView, ui: &mut Ui, cx: &mut ViewContext) {
    let Some(g) = view.graph() else { return };
    ui.label(RichText::new(format!("Subgraph: {} pinned", view.pinned.len())).strong());
    if view.pinned.is_empty() {
        ui.label(RichText::new("shift-click nodes (or tick Pin) to add them").weak());
        return;
    }
    let (mut select, mut unpin) = (None, None);
    egui::Grid::new("pinned nodes").show(ui, |ui| {
        for &i in &view.pinned {
            if node_link(ui, g, i) {
                select = Some(i);
            }
            ui.label(RichText::new(g.describe(i)).weak());
            if ui.small_button("unpin").on_hover_text("remove it from the subgraph").clicked() {
                unpin = Some(i);
            }
            ui.end_row();
        }
    });
    // A scan of every edge: once per change of the pinned set, not per frame.
    if view.among.as_ref().is_none_or(|(set, _)| *set != view.pinned) {
        view.among = Some((view.pinned.clone(), g.edges_among(&view.pinned)));
    }
    let Some((_, among)) = &view.among else { return };
    let Some(g) = view.graph() else { return };
    ui.label(RichText::new(format!("edges among them: {}", among.len())).weak());
    egui::Grid::new("pinned edges").show(ui, |ui| {
        for e in among.iter().take(PINNED_EDGES) {
            let id = |n: u32| g.table.nodes[n as usize].node_id.as_str();
            ui.label(format!("{} -> {}", id(e.source), id(e.target)));
            ui.label(format!("{:.4}", e.weight));
            ui.end_row();
        }
    });
    if let Some(i) = unpin {
        view.pinned.remove(&i);
    }
    if let Some(i) = select {
        view.select(cx, i);
    }
}

fn supernodes_ui(view: &mut GraphView, ui: &mut Ui, cx: &mut ViewContext) {
    let Some(name) = view.graph_name().map(str::to_string) else { return };
    ui.label(RichText::new("Supernodes").strong());
    let pinned_ids: BTreeSet<String> = view.pinned().into_iter().collect();
    let mut list = view.supernodes.get(&name).cloned().unwrap_or_default();
    let mut changed = false;
    ui.horizontal(|ui| {
        let label = ui.label("Supernode name");
        ui.add(egui::TextEdit::singleline(&mut view.supernode_name).desired_width(140.0))
            .labelled_by(label.id);
        let name_ok = !view.supernode_name.trim().is_empty();
        let group = ui
            .add_enabled(name_ok && !pinned_ids.is_empty(), egui::Button::new("Group pinned"))
            .on_hover_text("group the pinned nodes under this name, saved in the store");
        if group.clicked() {
            let new = Supernode {
                name: view.supernode_name.trim().to_string(),
                members: pinned_ids.iter().cloned().collect(),
            };
            list.retain(|s| s.name != new.name);
            list.push(new);
            changed = true;
        }
    });
    if list.is_empty() {
        ui.label(RichText::new("none saved: pin nodes, name them, Group pinned").weak());
    }
    let mut remove = None;
    for (k, s) in list.iter().enumerate() {
        ui.horizontal_wrapped(|ui| {
            ui.label(RichText::new(&s.name).color(PIN));
            ui.label(RichText::new(s.members.join(", ")).weak());
            if ui.small_button(format!("Remove {}", s.name)).clicked() {
                remove = Some(k);
            }
        });
    }
    if let Some(k) = remove {
        list.remove(k);
        changed = true;
    }
    if changed {
        match save(cx.store, &name, &list) {
            Ok(()) => {
                view.supernodes.insert(name, list);
                view.supernode_name.clear();
                view.save_error = None;
            }
            Err(e) => view.save_error = Some(format!("cannot save the supernodes: {e:#}")),
        }
    }
    if let Some(e) = &view.save_error {
        ui.colored_label(ui.visuals().error_fg_color, format!("Error: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_group_into_supernodes_in_order() {
        let row = |s: &str, n: &str| SupernodeRow { supernode: s.into(), node_id: n.into() };
        let got = group(&[row("say Mary", "1_2_3"), row("names", "0_1_1"), row("say Mary", "2_5_3")]);
        assert_eq!(
            got,
            [
                Supernode { name: "say Mary".into(), members: vec!["1_2_3".into(), "2_5_3".into()] },
                Supernode { name: "names".into(), members: vec!["0_1_1".into()] },
            ]
        );
    }
}
