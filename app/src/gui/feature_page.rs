//! The feature page: everything the analysis and auto-interp stored about one feature — stats and
//! density, explanations with their scores and provenance, top and quantile examples coloured by
//! activation, the activation histogram and logit effects (egui_plot), neighbours and co-occurring
//! features to click through. The page's content is read once when it opens (memory-mapped
//! tables, microseconds) and kept until another feature opens. A feature of an attention-output
//! SAE (`blocks.L.attn.hook_z`) also shows its head attribution (a bar per head `L.H`) and, on the
//! prompt, its direct feature attribution per head and per source token (a background job).

use std::sync::Arc;

use egui::{RichText, Ui};
use egui_plot::{Bar, BarChart, Plot};
use loupe_store::features::hist_bin_edge;
use loupe_store::{Example, Explanation, FeatureRow, Score};

use super::data::DictData;
use super::heads_data::{self, Attribution, hook_z_layer};
use super::jobs::{Loading, error_ui};
use super::navigation::Item;
use super::tokens::{tokens_ui, visible};
use super::view::{View, ViewContext};

/// Examples shown per section.
const TOP_SHOWN: usize = 12;

/// One example as the page draws it: token strings and activations.
struct Shown {
    activation: f32,
    label: String,
    tokens: Vec<String>,
    values: Vec<f32>,
    center: usize,
}

/// What the page shows, read when it opened.
struct Content {
    dict: String,
    feature: u32,
    stats: FeatureRow,
    tokens_analysed: u64,
    /// Every explanation of the feature with its scores (looked up once: a scan of all rows).
    explanations: Vec<(Explanation, Vec<Score>)>,
    /// Whether the explanations were loaded when this was read (else it is read again later).
    with_notes: bool,
    top: Vec<Shown>,
    quantile: Vec<Shown>,
    promoted: Vec<(String, f32)>,
    suppressed: Vec<(String, f32)>,
    neighbours: Vec<(u32, f32)>,
    cooccurring: Vec<(u32, f32)>,
}

#[derive(Default)]
pub struct FeaturePage {
    content: Option<Result<Content, String>>,
    /// Direct feature attribution of the open feature on the prompt (attention-output SAEs).
    dfa: Loading<Arc<Attribution>>,
    /// The position whose attribution is shown (None: the largest pre-activation).
    dfa_position: Option<usize>,
    /// The head whose per-source attribution colours the tokens.
    dfa_head: usize,
}

fn shown(data: &DictData, e: &Example, label: String) -> Shown {
    Shown {
        activation: e.activation,
        label,
        tokens: e.tokens.iter().map(|&t| data.tables.token_string(t)).collect(),
        values: e.activations.clone(),
        center: e.center as usize,
    }
}

fn load(data: &DictData, f: u32) -> anyhow::Result<Content> {
    let t = &data.tables;
    let stats = t.stats(f)?;
    let top = t
        .top_examples(f)?
        .iter()
        .take(TOP_SHOWN)
        .map(|e| shown(data, e, format!("doc {} pos {}", e.doc, e.pos)))
        .collect();
    let quantile = t
        .quantile_examples(f)?
        .iter()
        .filter(|e| e.rank < 2)
        .map(|e| {
            let b = e.bucket.expect("quantile examples have buckets");
            shown(data, e, format!("bucket {} [{:.3}, {:.3})", b.index, b.lo, b.hi))
        })
        .collect();
    let logits = t.logits(f)?;
    let side = |up: bool| {
        logits.iter().filter(|l| (l.rank > 0) == up).map(|l| (t.token_string(l.token), l.value)).collect()
    };
    Ok(Content {
        dict: data.name.clone(),
        feature: f,
        tokens_analysed: t.entry().tokens,
        with_notes: data.notes().is_some(),
        explanations: data
            .explanations_of(f)
            .into_iter()
            .map(|(e, scores)| (e.clone(), scores.into_iter().cloned().collect()))
            .collect(),
        promoted: side(true),
        suppressed: side(false),
        neighbours: t.neighbours(f)?.iter().map(|n| (n.neighbour, n.cosine)).collect(),
        cooccurring: t.cooccurrence(f)?.iter().map(|c| (c.other, c.jaccard)).collect(),
        stats,
        top,
        quantile,
    })
}

impl View for FeaturePage {
    fn title(&self) -> &str {
        "Feature"
    }

    /// The open feature's page (nothing open: a hint; its dictionary still loading: that).
    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        if cx.current.is_none() && cx.dict.is_none() {
            // The list beside says what the store lacks.
            ui.label(RichText::new("No feature open.").weak());
            return;
        }
        let Some(data) = cx.dictionary(ui) else { return };
        let Some(f) = cx.current_feature() else {
            ui.label("Select a feature in the list to open its page.");
            return;
        };
        if let Some(item) = self.draw(ui, data, f, cx) {
            cx.open(item);
        }
    }
}

impl FeaturePage {
    /// Draw feature `f` of `data`; returns an item to open (a click on a neighbour, a
    /// co-occurring feature or a head).
    fn draw(&mut self, ui: &mut Ui, data: &DictData, f: u32, cx: &mut ViewContext) -> Option<Item> {
        let stale = match &self.content {
            Some(Ok(c)) => c.dict != data.name || c.feature != f || c.with_notes != data.notes().is_some(),
            _ => true,
        };
        if stale {
            self.content = Some(load(data, f).map_err(|e| format!("{e:#}")));
        }
        let content = match self.content.as_ref().expect("loaded above") {
            Ok(c) => c,
            Err(e) => {
                error_ui(ui, e);
                return None;
            }
        };
        let mut open = None;
        let mut head = None;
        let (dfa, position, dfa_head) = (&mut self.dfa, &mut self.dfa_position, &mut self.dfa_head);
        egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| {
            header(ui, data, content, cx.store_root);
            if let Some(layer) = hook_z_layer(&data.hook) {
                head = heads_section(ui, cx, data, f, layer, dfa, position, dfa_head);
            }
            explanations(ui, &content.explanations);
            ui.add_space(6.0);
            egui::CollapsingHeader::new(format!("Top examples ({})", content.top.len()))
                .default_open(true)
                .show(ui, |ui| {
                    examples_ui(ui, &content.top, content.stats.max_activation);
                });
            egui::CollapsingHeader::new("Quantile examples").default_open(false).show(ui, |ui| {
                examples_ui(ui, &content.quantile, content.stats.max_activation);
            });
            ui.columns(2, |cols| {
                cols[0].label(RichText::new("Activation histogram").strong());
                histogram(&mut cols[0], &content.stats);
                cols[1].label(RichText::new("Logit effects").strong());
                logit_bars(&mut cols[1], content);
            });
            ui.add_space(6.0);
            open = open.or(links(ui, "Neighbours (decoder cosine)", &content.neighbours));
            open = open.or(links(ui, "Co-occurring features (Jaccard)", &content.cooccurring));
        });
        let feature = open.map(|feature| Item::Feature { dictionary: data.name.clone(), feature });
        head.or(feature)
    }
}

fn header(ui: &mut Ui, data: &DictData, c: &Content, store_root: &str) {
    let s = &c.stats;
    ui.horizontal(|ui| {
        ui.heading(format!("Feature {} of {}", c.feature, c.dict));
        if s.dead {
            ui.label(RichText::new("dead").color(ui.visuals().warn_fg_color));
        }
        if s.dense {
            ui.label(RichText::new("dense").color(ui.visuals().warn_fg_color));
        }
        if ui.button("Copy id").on_hover_text("copy dictionary/feature").clicked() {
            ui.ctx().copy_text(format!("{}/{}", c.dict, c.feature));
        }
        if ui.button("Copy link").on_hover_text("copy a command that opens this page").clicked() {
            ui.ctx()
                .copy_text(format!("loupe gui {store_root} --dictionary {} --feature {}", c.dict, c.feature));
        }
    });
    ui.label(format!(
        "{} · {} · fired on {} of {} tokens (density {:.3e}) · mean {:.4} · max {:.4}",
        data.kind, data.hook, s.count, c.tokens_analysed, s.density, s.mean_activation, s.max_activation
    ));
}

fn explanations(ui: &mut Ui, all: &[(Explanation, Vec<Score>)]) {
    ui.add_space(4.0);
    ui.label(RichText::new(format!("Explanations ({})", all.len())).strong());
    if all.is_empty() {
        ui.label(RichText::new("none yet: run `loupe explain`").weak());
        return;
    }
    for (e, scores) in all {
        ui.group(|ui| {
            match (&e.explanation, &e.failure) {
                (Some(text), _) => ui.label(RichText::new(text).size(15.0)),
                (None, failure) => ui.colored_label(
                    ui.visuals().warn_fg_color,
                    format!("failed: {}", failure.as_deref().unwrap_or("no reason recorded")),
                ),
            };
            // By characters: a store written by another tool may hold any text here.
            let hash: String = e.provenance.prompt_hash.chars().take(12).collect();
            ui.label(
                RichText::new(format!(
                    "explainer {} · model {} · temperature {} · prompt {hash}… · {} example rows",
                    e.explainer,
                    e.provenance.model,
                    e.provenance.temperature,
                    e.provenance.example_rows.len()
                ))
                .weak(),
            );
            ui.horizontal_wrapped(|ui| {
                for s in scores {
                    let text = match (s.score, &s.failure) {
                        (Some(v), _) => {
                            format!("{} {v:.3} ({} examples, {})", s.scorer, s.n_examples, s.provenance.model)
                        }
                        (None, f) => format!("{} failed: {}", s.scorer, f.as_deref().unwrap_or("?")),
                    };
                    ui.label(RichText::new(text).monospace());
                    ui.separator();
                }
            });
        });
    }
}

fn examples_ui(ui: &mut Ui, examples: &[Shown], max: f32) {
    if examples.is_empty() {
        ui.label(RichText::new("no examples (the feature never fired on the analysed tokens)").weak());
    }
    for e in examples {
        ui.horizontal_top(|ui| {
            ui.add_sized(
                [150.0, 16.0],
                egui::Label::new(RichText::new(format!("{:.3} · {}", e.activation, e.label)).small()),
            );
            ui.vertical(|ui| tokens_ui(ui, &e.tokens, &e.values, max, Some(e.center)));
        });
    }
}

fn histogram(ui: &mut Ui, s: &FeatureRow) {
    // Bins are log-spaced; the x axis is log10(activation).
    let bars: Vec<Bar> = s
        .hist
        .iter()
        .enumerate()
        .filter(|&(_, &n)| n > 0)
        .map(|(i, &n)| {
            let b = s.hist_first_bin as usize + i;
            let (lo, hi) = (hist_bin_edge(b).log10() as f64, hist_bin_edge(b + 1).log10() as f64);
            Bar::new((lo + hi) / 2.0, n as f64).width(hi - lo).name(format!(
                "[{:.3e}, {:.3e})",
                10f64.powf(lo),
                10f64.powf(hi)
            ))
        })
        .collect();
    Plot::new("histogram")
        .height(140.0)
        .allow_zoom(false)
        .allow_drag(false)
        .allow_scroll(false)
        .x_axis_formatter(|m, _| format!("{:.2e}", 10f64.powf(m.value)))
        .y_axis_label("tokens")
        .show(ui, |p| p.bar_chart(BarChart::new("activations", bars)));
}

fn logit_bars(ui: &mut Ui, c: &Content) {
    if c.promoted.is_empty() && c.suppressed.is_empty() {
        ui.label(RichText::new("none (the model has no unembedding, or the analysis skipped them)").weak());
        return;
    }
    let names: Vec<String> =
        c.promoted.iter().chain(c.suppressed.iter().rev()).map(|(t, _)| format!("{t:?}")).collect();
    let bar = |i: usize, (t, v): &(String, f32)| {
        Bar::new(-(i as f64), *v as f64).name(format!("{t:?}")).fill(if *v >= 0.0 {
            egui::Color32::from_rgb(60, 160, 90)
        } else {
            egui::Color32::from_rgb(200, 70, 60)
        })
    };
    let bars: Vec<Bar> = c
        .promoted
        .iter()
        .chain(c.suppressed.iter().rev())
        .enumerate()
        .map(|(i, x)| bar(i, x).horizontal())
        .collect();
    let n = names.len();
    Plot::new("logits")
        .height((14.0 * n as f32).max(140.0))
        .allow_zoom(false)
        .allow_drag(false)
        .allow_scroll(false)
        .y_axis_formatter(move |m, _| {
            let i = (-m.value).round();
            if (m.value + i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .show(ui, |p| p.bar_chart(BarChart::new("logit effect", bars).horizontal()));
}

/// Clickable features with a number each; returns the one clicked.
fn links(ui: &mut Ui, title: &str, items: &[(u32, f32)]) -> Option<u32> {
    let mut open = None;
    ui.label(RichText::new(title).strong());
    ui.horizontal_wrapped(|ui| {
        if items.is_empty() {
            ui.label(RichText::new("none").weak());
        }
        for &(f, v) in items {
            if ui.link(format!("feature {f}")).on_hover_text(format!("{v:.3}")).clicked() {
                open = Some(f);
            }
            ui.label(RichText::new(format!("{v:.2}")).weak());
        }
    });
    open
}

/// An attention-output SAE feature's heads: its weight-based attribution per head (bars; each
/// head a link), and its direct feature attribution on the prompt, run on request: per head at a
/// chosen position, and per source token for a chosen head. Returns a head to open.
#[allow(clippy::too_many_arguments)]
fn heads_section(
    ui: &mut Ui,
    cx: &mut ViewContext,
    data: &DictData,
    f: u32,
    layer: usize,
    dfa: &mut Loading<Arc<Attribution>>,
    position: &mut Option<usize>,
    head: &mut usize,
) -> Option<Item> {
    let mut open = None;
    ui.add_space(4.0);
    ui.label(RichText::new(format!("Heads of layer {layer} (attention-output SAE)")).strong());
    match data.tables.head_attribution(f) {
        None => {
            ui.label(
                RichText::new(format!(
                    "no head attribution in this analysis: run `loupe analyze --store {} --dictionary {}` again",
                    cx.store_root, data.name
                ))
                .weak(),
            );
        }
        Some(weights) => {
            ui.label(RichText::new("w_f(h): the share of the feature's decoder norm in each head").weak());
            let bars: Vec<Bar> = weights
                .iter()
                .enumerate()
                .map(|(h, &w)| Bar::new(h as f64, w as f64).name(format!("{layer}.{h}")).width(0.7))
                .collect();
            Plot::new("head attribution")
                .height(120.0)
                .allow_zoom(false)
                .allow_drag(false)
                .allow_scroll(false)
                .x_axis_formatter(move |m, _| format!("{layer}.{}", m.value.round()))
                .show(ui, |p| p.bar_chart(BarChart::new("w_f(h)", bars)));
            ui.horizontal_wrapped(|ui| {
                ui.label("Open a head:");
                for (h, w) in weights.iter().enumerate() {
                    if ui.link(format!("{layer}.{h}")).on_hover_text(format!("w = {w:.3}")).clicked() {
                        open = Some(Item::Head { layer, head: h });
                    }
                }
            });
        }
    }
    ui.label(RichText::new("Direct feature attribution on the prompt").strong());
    dfa.poll();
    ui.horizontal(|ui| {
        let label = ui.label("Prompt");
        ui.add(egui::TextEdit::singleline(cx.prompt).desired_width(ui.available_width() - 90.0))
            .labelled_by(label.id)
            .on_hover_text("the prompt lab's prompt (the same text)");
        if ui.add_enabled(!dfa.is_running(), egui::Button::new("Attribute")).clicked() {
            let (store, model, prompt, dict) =
                (cx.store.clone(), cx.model.clone(), cx.prompt.clone(), data.name.clone());
            *dfa = Loading::start(ui.ctx(), "starting", move |p| {
                Ok(Arc::new(heads_data::attribution(&store, &model, &dict, f, &prompt, p)?))
            });
            *position = None;
        }
    });
    dfa.status_ui(ui);
    let Some(a) = dfa.ready().filter(|a| a.dict == data.name && a.dfa.feature == f) else {
        return open;
    };
    let d = &a.dfa;
    let n = a.tokens.len().min(d.pre_activation.len());
    if n == 0 {
        return open;
    }
    let best = (0..n).max_by(|&i, &j| d.pre_activation[i].total_cmp(&d.pre_activation[j])).unwrap_or(0);
    let mut pos = position.unwrap_or(best).min(n - 1);
    ui.horizontal(|ui| {
        let label = ui.label("Position");
        if ui.add(egui::DragValue::new(&mut pos).range(0..=n - 1)).labelled_by(label.id).changed() {
            *position = Some(pos);
        }
        ui.label(format!(
            "{:?}: pre-activation {:.4} = Σ heads {:.4} + bias {:.4}",
            visible(&a.tokens[pos]),
            d.pre_activation[pos],
            d.contributions[pos].iter().sum::<f32>(),
            d.bias
        ));
    });
    let bars: Vec<Bar> = d.contributions[pos]
        .iter()
        .zip(&d.components)
        .enumerate()
        .map(|(i, (&v, name))| Bar::new(i as f64, v as f64).name(name).width(0.7))
        .collect();
    let names = d.components.clone();
    Plot::new("dfa per head")
        .height(120.0)
        .allow_zoom(false)
        .allow_drag(false)
        .allow_scroll(false)
        .x_axis_formatter(move |m, _| {
            let i = m.value.round();
            if (m.value - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .show(ui, |p| p.bar_chart(BarChart::new("DFA", bars)));
    if let Some(per_source) = &d.per_source {
        ui.horizontal_wrapped(|ui| {
            ui.label("Source tokens for head");
            for (h, name) in d.components.iter().enumerate().take(per_source[pos].len()) {
                ui.selectable_value(head, h, name);
            }
        });
        if let Some(values) = per_source[pos].get(*head) {
            let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            ui.label(
                RichText::new(format!(
                    "DFA({}, s) at position {pos}: orange adds to the feature, blue takes away (max |·| {max:.4})",
                    d.components[*head]
                ))
                .weak(),
            );
            // Sources after the position have no attribution (zeros): every token is shown.
            let mut shown = values[..n.min(values.len())].to_vec();
            shown.resize(n, 0.0);
            tokens_ui(ui, &a.tokens[..n], &shown, max, Some(pos));
        }
    }
    open
}
