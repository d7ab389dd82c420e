//! The Heads view: the store's heads table as a layer × head grid coloured by a chosen score
//! (values on hover; each cell, labelled `L.H`, opens its head), and the open head's page — its
//! scores, its attention pattern on the prompt lab's prompt (computed in a background job, drawn
//! as one texture so that a 1,000-token prompt stays usable; token labels where they fit, weights
//! on hover) and, when the loaded dictionary is an attention-output SAE at the head's layer, the
//! features most attributed to the head (links to their pages).

use std::sync::Arc;

use egui::{Color32, ColorImage, Pos2, Rect, RichText, Sense, TextureHandle, TextureOptions, Ui, vec2};
use loupe_store::heads::{HEAD_SCORES, HeadsTable};

use super::data::DictData;
use super::heads_data::{self, Pattern, hook_z_layer};
use super::jobs::{Loading, error_ui};
use super::navigation::Item;
use super::tokens::visible;
use super::view::{View, ViewContext};

/// Features listed as most attributed to a head.
const TOP_ATTRIBUTED: usize = 12;
/// Largest cell of the heatmap (pixels per token).
const MAX_CELL: f32 = 28.0;
/// Height a token label needs (pixels); labels are drawn every ⌈this / cell⌉ tokens.
const LABEL_PX: f32 = 12.0;
/// Side of the whole heatmap at zoom 1 (pixels, at most).
const FIT_PX: f32 = 640.0;
/// Widest margin for token labels (pixels).
const MAX_MARGIN: f32 = 100.0;

pub struct HeadsView {
    /// The heads table, read on first draw (one small table).
    table: Option<Result<Option<HeadsTable>, String>>,
    /// The column of [`HEAD_SCORES`] the grid is coloured by.
    pub score: usize,
    pattern: Loading<Arc<Pattern>>,
    /// The (head, prompt) the last pattern job was started for.
    requested: Option<(usize, usize, String)>,
    /// The texture of the ready pattern, and which pattern it shows.
    texture: Option<(usize, usize, String, TextureHandle)>,
    zoom: f32,
}

impl Default for HeadsView {
    fn default() -> HeadsView {
        HeadsView { table: None, score: 0, pattern: Loading::Idle, requested: None, texture: None, zoom: 1.0 }
    }
}

impl View for HeadsView {
    fn title(&self) -> &str {
        "Heads"
    }

    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        if self.table.is_none() {
            self.table = Some(heads_data::load_heads(cx.store).map_err(|e| format!("{e:#}")));
        }
        egui::Panel::left("heads grid").resizable(true).default_size(420.0).show(ui, |ui| {
            ui.take_available_width();
            self.grid_ui(ui, cx);
        });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| self.head_ui(ui, cx));
        });
    }
}

/// A cell's colour for `value` on the column's range: orange up from zero, blue below it.
fn cell_colour(value: f32, (lo, hi): (f32, f32), background: Color32) -> Color32 {
    if !value.is_finite() {
        return Color32::from_gray(128);
    }
    let scale = hi.abs().max(lo.abs());
    let t = if scale > 0.0 { (value.abs() / scale).clamp(0.0, 1.0) } else { 0.0 };
    let target = if value >= 0.0 { Color32::from_rgb(255, 140, 0) } else { Color32::from_rgb(60, 110, 220) };
    lerp(background, target, t)
}

fn lerp(a: Color32, b: Color32, t: f32) -> Color32 {
    let mix = |x: u8, y: u8| (x as f32 + (y as f32 - x as f32) * t).round() as u8;
    Color32::from_rgb(mix(a.r(), b.r()), mix(a.g(), b.g()), mix(a.b(), b.b()))
}

impl HeadsView {
    fn grid_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        ui.heading("Heads");
        let table = match self.table.as_ref().expect("read in ui") {
            Err(e) => return error_ui(ui, e),
            Ok(None) => {
                ui.label(
                    RichText::new(format!(
                        "no head scores in this store: run `loupe heads --store {}`",
                        cx.store_root
                    ))
                    .color(ui.visuals().warn_fg_color),
                );
                ui.label(
                    RichText::new(format!(
                        "(a head's pattern still opens: `loupe gui {} --head L.H`)",
                        cx.store_root
                    ))
                    .weak(),
                );
                return;
            }
            Ok(Some(t)) => t,
        };
        let s = &table.entry.settings;
        ui.label(
            RichText::new(format!(
                "{} · {} layers × {} heads · {} sequences [BOS]+R+R, |R| = {}, seed {} · clean loss {:.3}",
                table.name,
                table.entry.n_layers,
                table.entry.n_heads,
                s.sequences,
                s.repeat_len,
                s.seed,
                s.clean_loss
            ))
            .weak(),
        );
        ui.horizontal(|ui| {
            let label = ui.label("Score");
            egui::ComboBox::from_id_salt("head score")
                .selected_text(HEAD_SCORES[self.score].1)
                .show_ui(ui, |ui| {
                    for (i, (_, name)) in HEAD_SCORES.iter().enumerate() {
                        ui.selectable_value(&mut self.score, i, *name);
                    }
                })
                .response
                .labelled_by(label.id);
        });
        let column = HEAD_SCORES[self.score].0;
        let values: Vec<f32> = table.rows.iter().map(|r| r.score(column)).filter(|v| v.is_finite()).collect();
        let range =
            values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if values.is_empty() {
            ui.label(
                RichText::new(format!("{} was not computed for this table", HEAD_SCORES[self.score].1))
                    .weak(),
            );
        } else {
            ui.label(
                RichText::new(format!("range {:.4} to {:.4}; hover a head for its value", range.0, range.1))
                    .weak(),
            );
        }
        let open = match cx.current {
            Some(Item::Head { layer, head }) => Some((*layer, *head)),
            _ => None,
        };
        let (n_layers, n_heads) = (table.entry.n_layers as usize, table.entry.n_heads as usize);
        let cell = vec2(if n_heads <= 8 { 52.0 } else { 34.0 }, 20.0);
        let background = ui.visuals().extreme_bg_color;
        let mut clicked = None;
        egui::ScrollArea::both().auto_shrink([false, true]).show(ui, |ui| {
            ui.spacing_mut().item_spacing = vec2(2.0, 2.0);
            ui.horizontal(|ui| {
                ui.add_sized([40.0, 16.0], egui::Label::new(RichText::new("L \\ H").small().weak()));
                for h in 0..n_heads {
                    ui.add_sized([cell.x, 16.0], egui::Label::new(RichText::new(h.to_string()).small()));
                }
            });
            for l in 0..n_layers {
                ui.horizontal(|ui| {
                    ui.add_sized([40.0, cell.y], egui::Label::new(RichText::new(l.to_string()).small()));
                    for h in 0..n_heads {
                        let value = table.get(l, h).map_or(f32::NAN, |r| r.score(column));
                        let (rect, response) = ui.allocate_exact_size(cell, Sense::click());
                        let name = format!("{l}.{h}");
                        response.widget_info(|| {
                            egui::WidgetInfo::labeled(egui::Role::Button, true, name.clone())
                        });
                        let fill = cell_colour(value, range, background);
                        let painter = ui.painter();
                        painter.rect_filled(rect, 2.0, fill);
                        if open == Some((l, h)) {
                            let stroke = egui::Stroke::new(2.0, ui.visuals().strong_text_color());
                            painter.rect_stroke(rect, 2.0, stroke, egui::StrokeKind::Inside);
                        }
                        if cell.x >= 50.0 && value.is_finite() {
                            let dark = fill.r() as u32 + fill.g() as u32 + fill.b() as u32 > 380;
                            let colour = if dark { Color32::BLACK } else { Color32::WHITE };
                            painter.text(
                                rect.center(),
                                egui::Align2::CENTER_CENTER,
                                format!("{value:.2}"),
                                egui::FontId::proportional(11.0),
                                colour,
                            );
                        }
                        let shown =
                            if value.is_finite() { format!("{value:.4}") } else { "not computed".into() };
                        if response.on_hover_text(format!("{name}: {shown}")).clicked() {
                            clicked = Some((l, h));
                        }
                    }
                });
            }
        });
        if let Some((layer, head)) = clicked {
            cx.open(Item::Head { layer, head });
        }
    }

    fn head_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        self.pattern.poll();
        let Some(&Item::Head { layer, head }) = cx.current else {
            ui.label(
                "Click a head in the grid to open it: its scores, its attention pattern on the prompt \
                 lab's prompt, and the attention-output SAE features most attributed to it.",
            );
            return;
        };
        ui.heading(format!("Head {layer}.{head}"));
        if let Some(Ok(Some(table))) = &self.table {
            match table.get(layer, head) {
                Some(row) => {
                    egui::Grid::new("head scores").striped(true).show(ui, |ui| {
                        for (column, name) in HEAD_SCORES {
                            let v = row.score(column);
                            ui.label(name);
                            ui.label(if v.is_finite() { format!("{v:.4}") } else { "not computed".into() });
                            ui.end_row();
                        }
                    });
                }
                None => {
                    ui.label(
                        RichText::new(format!("the heads table {} has no head {layer}.{head}", table.name))
                            .weak(),
                    );
                }
            }
        }
        ui.separator();
        ui.label(RichText::new("Attention pattern").strong());
        ui.horizontal(|ui| {
            let label = ui.label("Prompt");
            ui.add(egui::TextEdit::singleline(cx.prompt).desired_width(ui.available_width() - 60.0))
                .labelled_by(label.id)
                .on_hover_text("the prompt lab's prompt (the same text)");
            if ui.add_enabled(!self.pattern.is_running(), egui::Button::new("Run")).clicked() {
                self.start(ui.ctx(), cx, layer, head);
            }
        });
        // A newly opened head runs on the prompt at once.
        let same_head = self.requested.as_ref().is_some_and(|r| (r.0, r.1) == (layer, head));
        if !same_head && !self.pattern.is_running() {
            self.start(ui.ctx(), cx, layer, head);
        }
        self.pattern.status_ui(ui);
        if let Some(p) = self.pattern.ready().cloned().filter(|p| (p.layer, p.head) == (layer, head)) {
            self.heatmap(ui, &p);
        }
        ui.separator();
        attributed(ui, cx, layer, head);
    }

    fn start(&mut self, ctx: &egui::Context, cx: &ViewContext, layer: usize, head: usize) {
        let (store, model, prompt) = (cx.store.clone(), cx.model.clone(), cx.prompt.clone());
        self.requested = Some((layer, head, prompt.clone()));
        self.pattern = Loading::start(ctx, "starting", move |p| {
            Ok(Arc::new(heads_data::pattern(&store, &model, &prompt, layer, head, p)?))
        });
    }

    /// The pattern as one texture (a pixel per query × key), token labels every few tokens, the
    /// weight under the pointer on hover.
    fn heatmap(&mut self, ui: &mut Ui, p: &Pattern) {
        let n = p.n();
        let fresh = self.texture.as_ref().is_some_and(|t| (t.0, t.1, &t.2) == (p.layer, p.head, &p.prompt));
        if !fresh {
            let background = ui.visuals().extreme_bg_color;
            let above = ui.visuals().faint_bg_color;
            let mut pixels = Vec::with_capacity(n * n);
            for q in 0..n {
                for k in 0..n {
                    pixels.push(if k > q {
                        above
                    } else {
                        lerp(
                            background,
                            Color32::from_rgb(255, 140, 0),
                            p.weight(q, k).clamp(0.0, 1.0).sqrt(),
                        )
                    });
                }
            }
            let image = ColorImage::new([n, n], pixels);
            let texture = ui.ctx().load_texture("attention pattern", image, TextureOptions::NEAREST);
            self.texture = Some((p.layer, p.head, p.prompt.clone(), texture));
        }
        let texture = self.texture.as_ref().expect("made above").3.clone();
        ui.label(format!(
            "head {}.{} on {n} tokens · rows: queries, columns: keys · colour by √weight · hover for a weight",
            p.layer, p.head
        ));
        ui.horizontal(|ui| {
            let label = ui.label("Zoom");
            ui.add(egui::Slider::new(&mut self.zoom, 1.0..=16.0).logarithmic(true)).labelled_by(label.id);
        });
        // At zoom 1 the whole pattern fits the width, and a height that leaves the rest in view.
        let room = (ui.available_width() - MAX_MARGIN - 16.0).min(FIT_PX);
        let fit = (room / n as f32).clamp(0.5, MAX_CELL);
        let cell = (fit * self.zoom).min(MAX_CELL.max(fit));
        let side = cell * n as f32;
        // Token labels every `stride` tokens (where they fit), in a margin as wide as the longest.
        let stride = (LABEL_PX / cell).ceil().max(1.0) as usize;
        let font = egui::FontId::monospace((cell.min(LABEL_PX) - 1.0).max(7.0));
        let colour = ui.visuals().text_color();
        let labels: Vec<(usize, std::sync::Arc<egui::Galley>)> = (0..n)
            .step_by(stride)
            .map(|i| {
                let text: String = visible(&p.tokens[i]).chars().take(12).collect();
                (i, ui.painter().layout_no_wrap(text, font.clone(), colour))
            })
            .collect();
        let widest = labels.iter().map(|(_, g)| g.size().x).fold(0.0f32, f32::max);
        let margin = (widest + 8.0).min(MAX_MARGIN);
        egui::ScrollArea::both().max_height(760.0).auto_shrink([false, true]).show(ui, |ui| {
            let (rect, response) = ui.allocate_exact_size(vec2(margin + side, margin + side), Sense::hover());
            response.widget_info(|| {
                egui::WidgetInfo::labeled(egui::Role::Image, true, "attention pattern heatmap")
            });
            let image = Rect::from_min_size(rect.min + vec2(margin, margin), vec2(side, side));
            let painter = ui.painter_at(rect);
            let uv = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));
            painter.image(texture.id(), image, uv, Color32::WHITE);
            for (i, galley) in labels {
                let y = image.top() + (i as f32 + 0.5) * cell;
                let size = galley.size();
                painter.galley(
                    Pos2::new(image.left() - 4.0 - size.x, y - size.y / 2.0),
                    galley.clone(),
                    colour,
                );
                // Keys: the same label turned a quarter left, reading upwards, above its column.
                let x = image.left() + (i as f32 + 0.5) * cell;
                let pos = Pos2::new(x - size.y / 2.0, image.top() - 4.0);
                let turned = egui::epaint::TextShape::new(pos, galley, colour);
                painter.add(turned.with_angle(-std::f32::consts::FRAC_PI_2));
            }
            if let Some(pos) = response.hover_pos().filter(|pos| image.contains(*pos)) {
                let q = (((pos.y - image.top()) / cell) as usize).min(n - 1);
                let k = (((pos.x - image.left()) / cell) as usize).min(n - 1);
                let at =
                    Rect::from_min_size(image.min + vec2(k as f32 * cell, q as f32 * cell), vec2(cell, cell));
                painter.rect_stroke(
                    at.expand(1.0),
                    0.0,
                    egui::Stroke::new(1.0, colour),
                    egui::StrokeKind::Outside,
                );
                let text = format!(
                    "{q} {:?} → {k} {:?}: {:.4}",
                    visible(&p.tokens[q]),
                    visible(&p.tokens[k]),
                    p.weight(q, k)
                );
                response.on_hover_text_at_pointer(text);
            }
        });
    }
}

/// The features of the loaded attention-output SAE most attributed to head `layer.head` (links),
/// or what to load to see them.
fn attributed(ui: &mut Ui, cx: &mut ViewContext, layer: usize, head: usize) {
    let hook = format!("blocks.{layer}.attn.hook_z");
    ui.label(
        RichText::new(format!("Attention-output SAE features most attributed to {layer}.{head}")).strong(),
    );
    let manifest = cx.store.manifest();
    let at_hook: Vec<&str> = manifest
        .features
        .keys()
        .filter(|d| manifest.dictionaries.get(*d).is_some_and(|e| e.hook == hook))
        .map(String::as_str)
        .collect();
    let choose = if at_hook.is_empty() {
        format!(
            "no analysed dictionary in this store reads {hook}: train one there (`loupe capture --hook {hook}`, `loupe train-sae`, `loupe analyze`)"
        )
    } else {
        format!("analysed at {hook}: {}; choose one in the Dictionary menu above", at_hook.join(", "))
    };
    let data: &DictData = match cx.dict {
        Some(d) if hook_z_layer(&d.hook) == Some(layer) => d,
        Some(d) => {
            ui.label(
                RichText::new(format!(
                    "the loaded dictionary {} reads {}, not {hook}; {choose}",
                    d.name, d.hook
                ))
                .weak(),
            );
            return;
        }
        None => {
            ui.label(RichText::new(format!("no dictionary loaded; {choose}")).weak());
            return;
        }
    };
    let top = data.tables.top_features_for_head(head, TOP_ATTRIBUTED);
    if top.is_empty() {
        ui.label(
            RichText::new(format!(
                "the analysis of {} has no head attribution: run `loupe analyze --store {} --dictionary {}` again",
                data.name, cx.store_root, data.name
            ))
            .weak(),
        );
        return;
    }
    ui.label(
        RichText::new(format!(
            "{}: w_f({layer}.{head}), the share of the feature's decoder norm in this head",
            data.name
        ))
        .weak(),
    );
    let mut open = None;
    egui::Grid::new("attributed features").striped(true).show(ui, |ui| {
        for &(f, w) in &top {
            if ui.link(format!("feature {f}")).clicked() {
                open = Some(f);
            }
            ui.add(egui::ProgressBar::new(w.clamp(0.0, 1.0)).desired_width(140.0).text(format!("{w:.3}")));
            let text = data.explanation(f).unwrap_or("");
            ui.add(egui::Label::new(text).truncate()).on_hover_text(text);
            ui.end_row();
        }
    });
    if let Some(feature) = open {
        cx.open(Item::Feature { dictionary: data.name.clone(), feature });
    }
}
