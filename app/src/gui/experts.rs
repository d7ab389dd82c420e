//! The Experts view: one of the store's experts entries (`loupe experts`) — a menu of the entries;
//! the usage bars (every expert, sorted by id, usage or specialization; a virtualised list, so
//! 65,536 experts lay out only the rows in view; each row an accessible button `expert 12`); the
//! co-activation heatmap P(column | row) among the most used experts (one texture, made when the
//! entry loads; the pair under the pointer on hover, a click selects the row's expert); the
//! routing-entropy histogram; and the selected expert's panel — usage, mean gate, top tokens,
//! domains with their specialization, most likely partners and, when the experts are dictionary
//! units (Monet, MoE-X), links to their features' pages. Selecting an expert is a navigation item
//! ([`Item::Expert`]). What it reads and computes is `experts_data.rs`.

use egui::accesskit::Role;
use egui::{Color32, ColorImage, Pos2, Rect, RichText, Sense, TextureHandle, TextureOptions, Ui, vec2};
use egui_plot::{Bar, BarChart, Plot};

use super::experts_data::{Experts, Sort, features_of};
use super::jobs::Loading;
use super::navigation::Item;
use super::view::{View, ViewContext};

/// Rows of the bar list, in points.
const ROW: f32 = 18.0;
/// Partners and features listed in the expert's panel.
const PARTNERS: usize = 12;
const FEATURES_LISTED: u32 = 64;
/// Side of the heatmap, at most (points).
const HEATMAP_PX: f32 = 480.0;
const HOT: Color32 = Color32::from_rgb(255, 140, 0);

#[derive(Default)]
pub struct ExpertsView {
    /// The store's experts entries, read on first draw.
    names: Option<Vec<String>>,
    /// The entry shown (or being read) and its data.
    shown: Option<String>,
    data: Loading<Experts>,
    pub sort: Option<Sort>,
    /// The heatmap's texture, made from the entry's matrix once it loaded.
    texture: Option<(String, TextureHandle)>,
    /// The navigation item last followed.
    synced: Option<Item>,
    /// The entry to show at start (`loupe gui --experts`).
    start: Option<String>,
    /// Bar rows drawn by the last frame, and where the heatmap was (for tests and the benchmark).
    pub rows_drawn: usize,
    pub heatmap_rect: Option<Rect>,
}

impl ExpertsView {
    /// A view that shows entry `name` first.
    pub fn starting_at(name: Option<String>) -> ExpertsView {
        ExpertsView { start: name, ..ExpertsView::default() }
    }

    /// The entry shown, once loaded.
    pub fn experts(&self) -> Option<&Experts> {
        self.data.ready().filter(|e| Some(e.name()) == self.shown.as_deref())
    }

    /// Whether the entry is still being read.
    pub fn is_loading(&self) -> bool {
        self.data.is_running()
    }

    /// Show entry `name` (read in the background).
    fn choose(&mut self, ctx: &egui::Context, cx: &ViewContext, name: &str) {
        if self.shown.as_deref() == Some(name) {
            return;
        }
        let (store, owned) = (cx.store.clone(), name.to_string());
        self.data = Loading::start(ctx, &format!("reading the expert tables {name}"), move |_| {
            Experts::load(&store, &owned)
        });
        self.shown = Some(name.to_string());
        self.texture = None;
    }

    /// Follow `--experts` and the navigation's expert, when new.
    fn follow(&mut self, ctx: &egui::Context, cx: &ViewContext) {
        let names = self.names.get_or_insert_with(|| cx.store.experts_names()).clone();
        if let Some(name) = self.start.take().filter(|n| names.contains(n)) {
            self.choose(ctx, cx, &name);
        }
        if let Some(item @ Item::Expert { source, .. }) = cx.current
            && self.synced.as_ref() != Some(item)
        {
            if names.contains(source) {
                self.choose(ctx, cx, source);
            }
            self.synced = Some(item.clone());
        }
        if self.shown.is_none()
            && let Some(first) = names.first()
        {
            self.choose(ctx, cx, first);
        }
    }

    /// The expert selected in the entry shown.
    fn selected(&self, cx: &ViewContext) -> Option<u32> {
        match cx.current {
            Some(Item::Expert { source, expert }) if Some(source.as_str()) == self.shown.as_deref() => {
                Some(*expert)
            }
            _ => None,
        }
    }
}

impl View for ExpertsView {
    fn title(&self) -> &str {
        "Experts"
    }

    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        self.follow(ui.ctx(), cx);
        self.data.poll();
        if self.names.as_ref().is_some_and(Vec::is_empty) {
            egui::CentralPanel::default().show(ui, |ui| empty_ui(ui, cx));
            return;
        }
        egui::Panel::top("experts controls").show(ui, |ui| self.controls_ui(ui, cx));
        if self.experts().is_none() {
            egui::CentralPanel::default().show(ui, |ui| self.data.status_ui(ui));
            return;
        }
        egui::Panel::left("expert usage").resizable(true).default_size(380.0).show(ui, |ui| {
            ui.take_available_width();
            self.bars_ui(ui, cx);
        });
        egui::Panel::right("expert panel").resizable(true).default_size(400.0).show(ui, |ui| {
            ui.take_available_width();
            egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| self.expert_ui(ui, cx));
        });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| {
                self.heatmap_ui(ui, cx);
                ui.separator();
                let e = self.experts().expect("loaded");
                entropy_ui(ui, e);
            });
        });
    }
}

/// The store has no expert tables: what to run.
fn empty_ui(ui: &mut Ui, cx: &ViewContext) {
    ui.heading("Experts");
    ui.label(
        RichText::new(format!(
            "no expert tables in this store: run `loupe experts --store {} --dictionary NAME` (a Monet or \
             MoE-X dictionary) or `--hook blocks.L.mlp.hook_expert_weights` (a captured MoE router)",
            cx.store_root
        ))
        .color(ui.visuals().warn_fg_color),
    );
}

impl ExpertsView {
    fn controls_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let names = self.names.clone().unwrap_or_default();
        let mut chosen = None;
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("Expert tables");
            egui::ComboBox::from_id_salt("experts name")
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
            let Some(e) = self.experts() else { return };
            let entry = e.entry();
            let per = match e.dictionary() {
                Some((_, m)) if m > 1 => format!(" ({m} features each)"),
                _ => String::new(),
            };
            ui.label(
                RichText::new(format!(
                    "{} · {} · {} experts{per} · {} tokens · {:.2} experts per token · routing entropy {:.3} nats",
                    e.name(),
                    e.source(),
                    entry.n_experts,
                    entry.settings.tokens,
                    entry.mean_active,
                    entry.mean_entropy
                ))
                .weak(),
            );
        });
        if let Some(name) = chosen {
            self.choose(ui.ctx(), cx, &name);
        }
        if let Some(e) = self.experts() {
            let entry = e.entry();
            let domains = if entry.has_domains() {
                let each: Vec<String> = entry
                    .domains
                    .iter()
                    .zip(&entry.domain_tokens)
                    .map(|(d, n)| format!("{d} ({n})"))
                    .collect();
                format!("domains: {}", each.join(", "))
            } else {
                format!(
                    "one domain ({}): domain specialization is undefined",
                    entry.domains.first().map_or("none", String::as_str)
                )
            };
            ui.label(RichText::new(domains).weak());
        }
    }

    /// The usage bars: every expert, in the chosen order, only the rows in view laid out.
    fn bars_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let selected = self.selected(cx);
        let Some(e) = self.data.ready() else { return };
        let sort = *self.sort.get_or_insert(Sort::Usage);
        ui.heading("Usage");
        ui.horizontal(|ui| {
            let label = ui.label("Sort by");
            egui::ComboBox::from_id_salt("experts sort")
                .selected_text(sort.name())
                .show_ui(ui, |ui| {
                    for s in Sort::ALL {
                        ui.selectable_value(&mut self.sort, Some(s), s.name());
                    }
                })
                .response
                .labelled_by(label.id);
        });
        ui.label(
            RichText::new(format!(
                "{} experts · share of tokens routed to each · click for its panel{}",
                e.len(),
                if e.dictionary().is_some() { ", double-click for its feature" } else { "" }
            ))
            .weak(),
        );
        let order = e.order(sort);
        let (mut clicked, mut drawn) = (None, 0);
        let max = e.max_usage.max(f32::MIN_POSITIVE);
        egui::ScrollArea::vertical().auto_shrink(false).show_rows(ui, ROW, order.len(), |ui, rows| {
            for i in rows {
                let id = order[i];
                let Some(row) = e.expert(id) else { continue };
                drawn += 1;
                let (rect, response) =
                    ui.allocate_exact_size(vec2(ui.available_width(), ROW), Sense::click());
                let name = format!("expert {id}");
                response.widget_info(|| egui::WidgetInfo::labeled(Role::Button, true, name.clone()));
                let painter = ui.painter_at(rect);
                let visuals = ui.visuals();
                if selected == Some(id) {
                    painter.rect_filled(rect, 2.0, visuals.selection.bg_fill);
                } else if response.hovered() {
                    painter.rect_filled(rect, 2.0, visuals.widgets.hovered.weak_bg_fill);
                }
                let text = visuals.text_color();
                let font = egui::FontId::monospace(12.0);
                painter.text(
                    rect.left_center() + vec2(4.0, 0.0),
                    egui::Align2::LEFT_CENTER,
                    &name,
                    font,
                    text,
                );
                let bar_left = rect.left() + 110.0;
                let bar_width = (rect.width() - 110.0 - 70.0).max(10.0);
                let full =
                    Rect::from_min_size(Pos2::new(bar_left, rect.top() + 3.0), vec2(bar_width, ROW - 6.0));
                painter.rect_filled(full, 1.0, visuals.faint_bg_color);
                let t = (row.usage / max).clamp(0.0, 1.0);
                painter.rect_filled(
                    Rect::from_min_size(full.min, vec2(bar_width * t, full.height())),
                    1.0,
                    HOT,
                );
                let value = match sort {
                    Sort::Domain => row.top_domain_specialization.map_or("—".into(), |s| format!("{s:.3}")),
                    Sort::Token => format!("{:.3}", row.top_token_share),
                    Sort::Id | Sort::Usage => format!("{:.2}%", 100.0 * row.usage),
                };
                painter.text(
                    rect.right_center() - vec2(4.0, 0.0),
                    egui::Align2::RIGHT_CENTER,
                    value,
                    egui::FontId::proportional(12.0),
                    text,
                );
                let hover = format!(
                    "expert {id}: usage {:.4} ({} tokens) · mean gate {:.4} · top token share {:.3}",
                    row.usage, row.tokens, row.mean_gate, row.top_token_share
                );
                let response = response.on_hover_text(hover);
                if response.double_clicked() {
                    clicked = Some((id, true));
                } else if response.clicked() {
                    clicked = Some((id, false));
                }
            }
        });
        self.rows_drawn = drawn;
        if let Some((id, double)) = clicked {
            let name = e.name().to_string();
            match e.dictionary().filter(|_| double) {
                Some((dict, m)) if m == 1 && cx.store.manifest().features.contains_key(dict) => {
                    cx.open(Item::Feature { dictionary: dict.to_string(), feature: id });
                }
                _ => cx.open(Item::Expert { source: name, expert: id }),
            }
        }
    }

    /// The co-activation heatmap (one texture), the pair under the pointer on hover.
    fn heatmap_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let Some(e) = self.data.ready() else { return };
        let h = &e.heatmap;
        ui.heading("Co-activation");
        if h.is_empty() {
            ui.label(RichText::new("no expert has a row").weak());
            return;
        }
        let k = h.len();
        ui.label(
            RichText::new(format!(
                "P(column | row) among the {k} most used experts (of {}), most used first · colour by √P · \
                 hover for a pair, click to select the row's expert",
                e.len()
            ))
            .weak(),
        );
        if self.texture.as_ref().is_none_or(|t| t.0 != e.name()) {
            let background = ui.visuals().extreme_bg_color;
            let missing = ui.visuals().faint_bg_color;
            let pixels = (0..k * k)
                .map(|c| {
                    let (i, j) = (c / k, c % k);
                    let p = h.get(i, j);
                    if i == j {
                        Color32::from_gray(120)
                    } else if p.is_nan() {
                        missing
                    } else {
                        lerp(background, HOT, p.clamp(0.0, 1.0).sqrt())
                    }
                })
                .collect();
            let texture = ui.ctx().load_texture(
                "co-activation",
                ColorImage::new([k, k], pixels),
                TextureOptions::NEAREST,
            );
            self.texture = Some((e.name().to_string(), texture));
        }
        let texture = self.texture.as_ref().expect("made above").1.id();
        let side = ui.available_width().clamp(64.0, HEATMAP_PX);
        let cell = side / k as f32;
        let (rect, response) = ui.allocate_exact_size(vec2(side, side), Sense::click());
        self.heatmap_rect = Some(rect);
        response.widget_info(|| egui::WidgetInfo::labeled(Role::Image, true, "co-activation heatmap"));
        let painter = ui.painter_at(rect);
        let uv = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));
        painter.image(texture, rect, uv, Color32::WHITE);
        let Some(pos) = response.hover_pos().filter(|p| rect.contains(*p)) else { return };
        let i = (((pos.y - rect.top()) / cell) as usize).min(k - 1);
        let j = (((pos.x - rect.left()) / cell) as usize).min(k - 1);
        let at = Rect::from_min_size(rect.min + vec2(j as f32 * cell, i as f32 * cell), vec2(cell, cell));
        let stroke = egui::Stroke::new(1.0, ui.visuals().strong_text_color());
        painter.rect_stroke(at.expand(1.0), 0.0, stroke, egui::StrokeKind::Outside);
        let (a, b) = (h.experts[i], h.experts[j]);
        let p = h.get(i, j);
        let value = if p.is_nan() { "no row in the table".to_string() } else { format!("{p:.4}") };
        let clicked = response.clicked();
        response.on_hover_text_at_pointer(format!("expert {a} → expert {b}: P({b} | {a}) = {value}"));
        if clicked {
            cx.open(Item::Expert { source: e.name().to_string(), expert: a });
        }
    }

    /// The selected expert: its numbers, tokens, domains, partners and features.
    fn expert_ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let Some(e) = self.data.ready() else { return };
        let Some(id) = self.selected(cx) else {
            ui.label("Click an expert (a bar or a heatmap row) for its tokens, domains and partners.");
            return;
        };
        ui.heading(format!("Expert {id}"));
        let Some(row) = e.expert(id) else {
            ui.label(RichText::new(format!("{} has no expert {id}", e.name())).weak());
            return;
        };
        egui::Grid::new("expert numbers").striped(true).show(ui, |ui| {
            for (name, value) in [
                ("usage", format!("{:.4} ({} tokens)", row.usage, row.tokens)),
                ("mean gate", format!("{:.4}", row.mean_gate)),
                ("top token share", format!("{:.3}", row.top_token_share)),
            ] {
                ui.label(name);
                ui.label(value);
                ui.end_row();
            }
        });
        let mut open = None;
        features_ui(ui, cx, e, id, &mut open);

        ui.separator();
        ui.label(RichText::new("Top tokens").strong());
        let tokens = e.tokens(id);
        match &e.vocabulary {
            Some(v) => {
                ui.label(RichText::new(format!("spelled by the vocabulary of {}", v.dictionary)).weak())
            }
            None => ui.label(
                RichText::new("token ids (no analysed dictionary in this store to spell them)").weak(),
            ),
        };
        if tokens.is_empty() {
            ui.label(RichText::new("none").weak());
        }
        egui::Grid::new("expert tokens").striped(true).show(ui, |ui| {
            if !tokens.is_empty() {
                for h in ["token", "count", "of its tokens", "of the token's"] {
                    ui.label(RichText::new(h).weak());
                }
                ui.end_row();
            }
            for t in &tokens {
                ui.label(RichText::new(e.token(t.token)).monospace());
                ui.label(t.count.to_string());
                ui.label(format!("{:.1}%", 100.0 * t.share_of_expert));
                ui.label(format!("{:.1}%", 100.0 * t.share_of_token));
                ui.end_row();
            }
        });

        ui.separator();
        ui.label(RichText::new("Domains").strong());
        let domains = e.domains(id);
        if domains.is_empty() {
            ui.label(RichText::new("none").weak());
        }
        egui::Grid::new("expert domains").striped(true).show(ui, |ui| {
            if !domains.is_empty() {
                for h in ["domain", "tokens", "of its tokens", "specialization"] {
                    ui.label(RichText::new(h).weak());
                }
                ui.end_row();
            }
            for d in &domains {
                ui.label(e.domain_name(d.domain));
                ui.label(d.count.to_string());
                ui.label(format!("{:.1}%", 100.0 * d.share_of_expert));
                ui.label(match d.specialization {
                    Some(s) => format!("{s:.3}"),
                    None => "undefined (one domain)".into(),
                });
                ui.end_row();
            }
        });

        ui.separator();
        ui.label(RichText::new("Top partners: P(partner | this expert)").strong());
        let partners = e.partners(id, PARTNERS);
        if partners.is_empty() {
            ui.label(RichText::new("none kept").weak());
        }
        egui::Grid::new("expert partners").striped(true).show(ui, |ui| {
            for p in &partners {
                if ui.link(format!("expert {}", p.expert_j)).clicked() {
                    open = Some(Item::Expert { source: e.name().to_string(), expert: p.expert_j });
                }
                let bar = egui::ProgressBar::new(p.p_j_given_i.clamp(0.0, 1.0))
                    .desired_width(140.0)
                    .text(format!("{:.3}", p.p_j_given_i));
                ui.add(bar);
                ui.label(RichText::new(format!("{} tokens", p.both)).weak());
                ui.end_row();
            }
        });
        if let Some(item) = open {
            cx.open(item);
        }
    }
}

/// Links to the features of expert `id` when the experts are dictionary units (or the command
/// that makes their pages).
fn features_ui(ui: &mut Ui, cx: &ViewContext, e: &Experts, id: u32, open: &mut Option<Item>) {
    let Some((dict, m)) = e.dictionary() else {
        ui.label(RichText::new("an expert of a model's router: no dictionary features").weak());
        return;
    };
    let features = features_of(id, m);
    if !cx.store.manifest().features.contains_key(dict) {
        ui.label(
            RichText::new(format!(
                "{dict} has no analysis for its feature pages: run `loupe analyze --store {} --dictionary {dict}`",
                cx.store_root
            ))
            .weak(),
        );
        return;
    }
    ui.horizontal_wrapped(|ui| {
        ui.label(if m == 1 { format!("{dict}:") } else { format!("{dict}, features {features:?}:") });
        for f in features.clone().take(FEATURES_LISTED as usize) {
            if ui.link(format!("feature {f}")).on_hover_text(format!("Open feature {f} of {dict}")).clicked()
            {
                *open = Some(Item::Feature { dictionary: dict.to_string(), feature: f });
            }
        }
        if m > FEATURES_LISTED {
            ui.label(RichText::new(format!("… ({m} in all)")).weak());
        }
    });
}

/// The routing-entropy histogram.
fn entropy_ui(ui: &mut Ui, e: &Experts) {
    let bins = &e.data.tables.entropy;
    let max = (e.entry().n_experts.max(1) as f32).ln();
    ui.heading("Routing entropy");
    ui.label(
        RichText::new(format!(
            "per token, nats (0: one expert; ln {} = {max:.2}: all equally) · mean {:.3}",
            e.entry().n_experts,
            e.entry().mean_entropy
        ))
        .weak(),
    );
    if bins.is_empty() {
        ui.label(RichText::new("no histogram in the tables").weak());
        return;
    }
    let bars: Vec<Bar> = bins
        .iter()
        .map(|b| {
            let (lo, hi) = (b.lo as f64, b.hi as f64);
            Bar::new((lo + hi) / 2.0, b.tokens as f64).width(hi - lo).name(format!("[{lo:.3}, {hi:.3})"))
        })
        .collect();
    Plot::new("routing entropy")
        .height(160.0)
        .allow_zoom(false)
        .allow_drag(false)
        .allow_scroll(false)
        .x_axis_label("entropy (nats)")
        .y_axis_label("tokens")
        .show(ui, |p| p.bar_chart(BarChart::new("tokens", bars)));
}

fn lerp(a: Color32, b: Color32, t: f32) -> Color32 {
    let mix = |x: u8, y: u8| (x as f32 + (y as f32 - x as f32) * t).round() as u8;
    Color32::from_rgb(mix(a.r(), b.r()), mix(a.g(), b.g()), mix(a.b(), b.b()))
}
