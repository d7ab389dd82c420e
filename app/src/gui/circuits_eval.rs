//! The Circuits view's evaluation panel: each fast method against the patching ground truth on
//! the loaded task (node and edge ROC AUC under both definitions of a positive, CPR, CMD, wall
//! time, speed-up) and the faithfulness curves, as `loupe circuit eval` stored them; or, without
//! an evaluation, the command that makes one.

use egui::{Color32, RichText, Ui};
use egui_plot::{Legend, Line, Plot, Points};
use loupe_store::circuits::CircuitEvalTable;

use super::circuits_data::TaskCircuits;

/// Colours of the faithfulness curves, one per method.
const CURVES: [Color32; 4] = [
    Color32::from_rgb(255, 140, 0),
    Color32::from_rgb(70, 170, 230),
    Color32::from_rgb(120, 200, 120),
    Color32::from_rgb(200, 120, 220),
];

/// Task `t`'s evaluation (the `chosen`-th when it has several): the methods' table and
/// faithfulness curves, or what to run.
pub fn eval_ui(ui: &mut Ui, t: &TaskCircuits, chosen: &mut usize, store_root: &str) {
    ui.label(RichText::new(format!("Evaluation on {}", t.task.file)).strong());
    if t.evals.is_empty() {
        let has_truth = t.circuits.iter().any(|g| g.method() == "patching");
        let first = if has_truth {
            String::new()
        } else {
            format!(
                "`loupe circuit --store {} --task assets/tasks/{} --method patching` (the ground truth), then ",
                store_root, t.task.file
            )
        };
        ui.label(
            RichText::new(format!(
                "no evaluation of this task: run {first}`loupe circuit eval --store {} --task assets/tasks/{}`",
                store_root, t.task.file
            ))
            .color(ui.visuals().warn_fg_color),
        );
        return;
    }
    let mut choice = (*chosen).min(t.evals.len() - 1);
    if t.evals.len() > 1 {
        ui.horizontal(|ui| {
            let label = ui.label("Evaluation");
            egui::ComboBox::from_id_salt("circuit evaluation")
                .selected_text(&t.evals[choice].name)
                .show_ui(ui, |ui| {
                    for (i, e) in t.evals.iter().enumerate() {
                        ui.selectable_value(&mut choice, i, &e.name);
                    }
                })
                .response
                .labelled_by(label.id);
        });
    }
    let eval = &t.evals[choice];
    let truth = eval.entry.circuits.get("patching").map_or("?", String::as_str);
    ui.label(
        RichText::new(format!(
            "{}: each method against the patching circuit {truth}; positives: the top 10 % of nodes by \
             |effect|, or |effect| ≥ 0.05; CPR: area under the faithfulness curve (higher is better), \
             CMD: area under |1 − f| (lower)",
            eval.name
        ))
        .weak(),
    );
    ui.horizontal_top(|ui| {
        ui.vertical(|ui| {
            egui::Grid::new("evaluation table").striped(true).show(ui, |ui| {
                for h in [
                    "method",
                    "node AUC (top 10 %)",
                    "node AUC (|effect| ≥ 0.05)",
                    "edge AUC (top 10 %)",
                    "edge AUC (|effect| ≥ 0.05)",
                    "CPR",
                    "CMD",
                    "wall time",
                    "speed-up",
                ] {
                    ui.label(RichText::new(h).weak());
                }
                ui.end_row();
                let edge = |v: Option<f32>| v.map_or("—".to_string(), |v| format!("{v:.3}"));
                for r in &eval.rows {
                    ui.label(&r.method);
                    ui.label(format!("{:.3}", r.node_auc_top10));
                    ui.label(format!("{:.3}", r.node_auc_abs));
                    ui.label(edge(r.edge_auc_top10));
                    ui.label(edge(r.edge_auc_abs));
                    ui.label(format!("{:.3}", r.cpr));
                    ui.label(format!("{:.3}", r.cmd));
                    ui.label(format!("{:.2} s", r.wall_s));
                    ui.label(format!("{:.1}×", r.speedup));
                    ui.end_row();
                }
            });
        });
        ui.separator();
        faithfulness_plot(ui, eval);
    });
    *chosen = choice;
}

/// f against k (log scale), one line per method, f = 1 for reference.
fn faithfulness_plot(ui: &mut Ui, eval: &CircuitEvalTable) {
    let mut methods: Vec<&str> = Vec::new();
    for r in &eval.faithfulness {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    let weak = ui.visuals().weak_text_color();
    ui.vertical(|ui| {
        ui.add(egui::Label::new(RichText::new("Faithfulness f against k (% of nodes kept)").weak()).extend());
        let (width, height) = (ui.available_width().max(280.0), ui.available_height().max(120.0));
        Plot::new("faithfulness")
            .width(width)
            .height(height)
            .legend(Legend::default())
            .allow_scroll(false)
            .x_axis_formatter(|m, _| {
                format!("{:.3}", 10f64.powf(m.value)).trim_end_matches('0').trim_end_matches('.').to_string()
            })
            .x_axis_label("k (%)")
            .y_axis_label("f")
            .show(ui, |p| {
                p.hline(egui_plot::HLine::new("f = 1", 1.0).color(weak));
                for (i, m) in methods.into_iter().enumerate() {
                    let colour = CURVES[i % CURVES.len()];
                    let points: Vec<[f64; 2]> = eval
                        .faithfulness
                        .iter()
                        .filter(|r| r.method == m && r.k > 0.0)
                        .map(|r| [(r.k as f64).log10(), r.f as f64])
                        .collect();
                    p.line(Line::new(m, points.clone()).color(colour));
                    p.points(Points::new(m, points).radius(3.0).color(colour));
                }
            });
    });
}
