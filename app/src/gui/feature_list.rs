//! The feature list: every feature of the chosen dictionary, filtered (dead, dense, score range,
//! text in the explanation or a feature id), sorted by a column, or ranked by semantic search over
//! the explanations (MiniLM + the store's hnsw index). Virtualised: only the visible rows are laid
//! out, so a million features scroll as smoothly as ten.

use std::path::PathBuf;
use std::sync::Arc;

use egui::{Align, Layout, RichText, Ui, vec2};
use loupe_autointerp::score::embedding::Embedder;
use loupe_autointerp::search::Searcher;
use loupe_store::Store;

use super::data::DictData;
use super::jobs::{Loading, error_ui};
use super::navigation::Item;
use super::view::{View, ViewContext};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sort {
    Feature,
    Density,
    MaxActivation,
    Score,
}

/// The list's state: what is typed and ticked, and the order it produced.
pub struct FeatureList {
    pub query: String,
    /// Rank by meaning (semantic search) instead of filtering by text.
    pub semantic: bool,
    pub sort: Sort,
    pub descending: bool,
    pub show_dead: bool,
    pub show_dense: bool,
    pub score_filter: bool,
    pub score_range: (f32, f32),
    /// The visible features, in order.
    order: Vec<u32>,
    /// Similarity of each feature in a semantic ranking (same order as `order`).
    similarity: Vec<f32>,
    dirty: bool,
    search: Loading<Hits>,
    embedder: Option<Arc<Embedder>>,
    /// The search index of `for_dict`, once a search opened it.
    searcher: Option<Arc<Searcher>>,
    embedder_dir: Option<PathBuf>,
    /// The dictionary the order was computed for.
    for_dict: String,
    /// The query of the semantic search whose ranking is shown.
    searched: String,
    /// Whether the order was computed with the explanations loaded.
    notes_seen: bool,
}

const ROW: f32 = 20.0;
/// Width of the explainer column, the last one.
const EXPLAINER: f32 = 56.0;

/// A semantic search's answer: the embedder and index it loaded (kept for the next query) and
/// the `(feature, similarity)` hits, best first.
type Hits = (Arc<Embedder>, Arc<Searcher>, Vec<(u32, f32)>);

impl FeatureList {
    pub fn new(embedder_dir: Option<PathBuf>) -> FeatureList {
        FeatureList {
            query: String::new(),
            semantic: false,
            sort: Sort::Density,
            descending: true,
            show_dead: false,
            show_dense: true,
            score_filter: false,
            score_range: (0.5, 1.0),
            order: Vec::new(),
            similarity: Vec::new(),
            dirty: true,
            search: Loading::Idle,
            embedder: None,
            searcher: None,
            embedder_dir,
            for_dict: String::new(),
            searched: String::new(),
            notes_seen: false,
        }
    }

    /// The number of features the list shows now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn keep(&self, data: &DictData, f: u32) -> bool {
        if (!self.show_dead && data.is_dead(f)) || (!self.show_dense && data.is_dense(f)) {
            return false;
        }
        if self.score_filter {
            let v = data.score(f);
            if !(v >= self.score_range.0 && v <= self.score_range.1) {
                return false;
            }
        }
        true
    }

    /// Recompute the order after a change of query, sort, filter or dictionary.
    fn recompute(&mut self, data: &DictData) {
        self.dirty = false;
        self.for_dict = data.name.clone();
        self.similarity.clear();
        if let (true, Some((_, _, hits))) = (self.semantic, self.search.ready()) {
            let hits: Vec<(u32, f32)> = hits.iter().copied().filter(|&(f, _)| self.keep(data, f)).collect();
            self.order = hits.iter().map(|h| h.0).collect();
            self.similarity = hits.iter().map(|h| h.1).collect();
            return;
        }
        let query = self.query.trim().to_string();
        let id: Option<u32> = query.strip_prefix('#').unwrap_or(&query).parse().ok();
        let n = data.n_features() as u32;
        let mut order: Vec<u32> = (0..n)
            .filter(|&f| {
                let text_ok = query.is_empty()
                    || self.semantic
                    || id == Some(f)
                    || data.explanation(f).is_some_and(|e| contains_ignoring_ascii_case(e, &query));
                text_ok && self.keep(data, f)
            })
            .collect();
        let key: &[f32] = match self.sort {
            Sort::Feature => &[],
            Sort::Density => data.tables.densities(),
            Sort::MaxActivation => data.tables.max_activations(),
            Sort::Score => data.scores(),
        };
        if !key.is_empty() {
            order = sorted(order, key, self.descending);
        } else if self.descending {
            order.reverse();
        }
        self.order = order;
    }

    fn start_search(&mut self, ctx: &egui::Context, store: &Arc<Store>, data: &DictData) {
        let (store, dict, query) = (store.clone(), data.name.clone(), self.query.clone());
        self.searched = query.clone();
        let (cached, dir, searcher) =
            (self.embedder.clone(), self.embedder_dir.clone(), self.searcher.clone());
        self.search = Loading::start(ctx, "semantic search", move |p| {
            let embedder = match cached {
                Some(e) => e,
                None => {
                    p.stage("loading the MiniLM embedder");
                    let dir = dir.ok_or_else(|| {
                        anyhow::anyhow!("no embedder: run `loupe fetch` or pass --embedder")
                    })?;
                    Arc::new(Embedder::load(&dir)?)
                }
            };
            let searcher = match searcher {
                Some(s) => s,
                None => {
                    p.stage("opening the search index");
                    Arc::new(Searcher::open(&store, &dict)?)
                }
            };
            p.stage("searching the explanations");
            let hits = searcher.search(&embedder, &query, 200)?;
            Ok((embedder, searcher, hits.into_iter().map(|(e, sim)| (e.feature_id, sim)).collect()))
        });
    }

    /// Draw the list of `data`; returns the feature clicked, if any.
    fn draw(
        &mut self,
        ui: &mut Ui,
        store: &Arc<Store>,
        data: &DictData,
        selected: Option<u32>,
    ) -> Option<u32> {
        if self.for_dict != data.name {
            self.dirty = true;
            self.search = Loading::Idle;
            self.searcher = None;
            self.notes_seen = false;
        }
        // The explanations arrive after the list first shows: filter and sort again then.
        if data.notes().is_some() != self.notes_seen {
            self.notes_seen = !self.notes_seen;
            self.dirty = true;
        }
        if self.search.poll() {
            if let Some((embedder, searcher, _)) = self.search.ready() {
                self.embedder = Some(embedder.clone());
                self.searcher = Some(searcher.clone());
            }
            self.dirty = true;
        }
        self.controls(ui, store, data);
        if self.dirty {
            self.recompute(data);
        }
        self.search.status_ui(ui);
        match data.notes() {
            None => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("reading the explanations");
                });
            }
            Some(Err(e)) => error_ui(ui, &format!("cannot read the explanations: {e}")),
            Some(Ok(_)) => {}
        }
        if data.stale {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                "stale explanations: made from an earlier analysis (re-run `loupe explain --redo`)",
            );
        }
        ui.horizontal(|ui| {
            ui.label(format!("{} of {} features", self.order.len(), data.n_features()));
            if !self.similarity.is_empty() {
                ui.label(RichText::new(format!("ranked by similarity to {:?}", self.searched)).weak());
            }
        });
        ui.separator();
        self.header(ui);
        let mut clicked = None;
        let semantic = !self.similarity.is_empty();
        let text_height = ui.text_style_height(&egui::TextStyle::Body).max(ROW);
        egui::ScrollArea::vertical().auto_shrink(false).show_rows(
            ui,
            text_height,
            self.order.len(),
            |ui, rows| {
                for i in rows {
                    let f = self.order[i];
                    let extra = semantic.then(|| self.similarity[i]);
                    if row(ui, data, f, selected == Some(f), extra) {
                        clicked = Some(f);
                    }
                }
            },
        );
        clicked
    }

    fn controls(&mut self, ui: &mut Ui, store: &Arc<Store>, data: &DictData) {
        ui.horizontal(|ui| {
            let label = ui.label("Search");
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.query)
                    .hint_text(if self.semantic { "describe a feature" } else { "explanation text or #id" })
                    .desired_width(200.0),
            );
            let edit = edit.labelled_by(label.id);
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if edit.changed() && !self.semantic {
                self.dirty = true;
            }
            let can_semantic = data.has_index && self.embedder_dir.is_some();
            let toggle = ui
                .add_enabled(can_semantic, egui::Checkbox::new(&mut self.semantic, "Semantic"))
                .on_disabled_hover_text(
                    "needs the store's search index (`loupe explain`) and MiniLM (`loupe fetch`)",
                );
            if toggle.changed() {
                self.search = Loading::Idle;
                self.dirty = true;
            }
            if self.semantic {
                let go = ui.add_enabled(!self.search.is_running(), egui::Button::new("Find"));
                if (go.clicked() || enter) && !self.query.trim().is_empty() {
                    self.start_search(ui.ctx(), store, data);
                }
            }
        });
        ui.horizontal(|ui| {
            let mut changed = ui.checkbox(&mut self.show_dead, "dead").changed();
            changed |= ui.checkbox(&mut self.show_dense, "dense").changed();
            changed |= ui.checkbox(&mut self.score_filter, "score").changed();
            ui.add_enabled_ui(self.score_filter, |ui| {
                for (name, value) in [("from", &mut self.score_range.0), ("to", &mut self.score_range.1)] {
                    let label = ui.label(name);
                    changed |=
                        ui.add(egui::DragValue::new(value).speed(0.01)).labelled_by(label.id).changed();
                }
            });
            self.dirty |= changed;
        });
    }

    /// Column headers; clicking one sorts by it (again: reverses).
    fn header(&mut self, ui: &mut Ui) {
        // Monospace: the default proportional font has no arrows.
        ui.horizontal(|ui| {
            for (sort, name, width) in [
                (Sort::Feature, "Feature", 110.0),
                (Sort::Density, "Density", 80.0),
                (Sort::MaxActivation, "Max act", 70.0),
                (Sort::Score, "Score", 50.0),
            ] {
                let arrow = match (self.sort == sort, self.descending) {
                    (true, true) => " ↓",
                    (true, false) => " ↑",
                    _ => "",
                };
                let button = egui::Button::new(RichText::new(format!("{name}{arrow}")).monospace().strong())
                    .frame(false);
                if ui
                    .add_sized([width, ROW], button)
                    .on_hover_text(format!("sort by {}", name.to_lowercase()))
                    .clicked()
                {
                    self.descending =
                        if self.sort == sort { !self.descending } else { sort != Sort::Feature };
                    self.sort = sort;
                    self.dirty = true;
                }
            }
            cell(ui, text_width(ui), |ui| {
                ui.label(RichText::new("Explanation").strong());
            });
            cell(ui, EXPLAINER, |ui| {
                ui.label(RichText::new("Explainer").strong().small());
            });
        });
    }
}

/// A cell of exactly `width` (the panel takes the width its rows use: a row narrower than the
/// panel would shrink it frame by frame), its contents from the left.
fn cell(ui: &mut Ui, width: f32, add_contents: impl FnOnce(&mut Ui)) {
    ui.allocate_ui_with_layout(vec2(width, ROW), Layout::left_to_right(Align::Center), |ui| {
        ui.set_width(width);
        add_contents(ui);
    });
}

/// The explanation column's width: what is left of the row but the explainer column.
fn text_width(ui: &Ui) -> f32 {
    (ui.available_width() - EXPLAINER - ui.spacing().item_spacing.x).max(0.0)
}

impl View for FeatureList {
    fn title(&self) -> &str {
        "Features"
    }

    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        let Some(data) = cx.dictionary(ui) else { return };
        if let Some(feature) = self.draw(ui, cx.store, data, cx.current_feature()) {
            cx.open(Item::Feature { dictionary: data.name.clone(), feature });
        }
    }
}

/// Whether `text` contains `query`, ASCII letters compared case-blind (other letters exactly):
/// no allocation per explanation, so a keystroke filters a million of them in a few ms.
fn contains_ignoring_ascii_case(text: &str, query: &str) -> bool {
    let (t, q) = (text.as_bytes(), query.as_bytes());
    q.is_empty() || t.windows(q.len()).any(|w| w.eq_ignore_ascii_case(q))
}

/// `features` ordered by `key[f]` (ties by id), NaN (unscored) last either way. Sorts packed
/// `(rank, id)` integers: a million features in ~30 ms, a few times faster than comparing floats
/// through a closure.
fn sorted(features: Vec<u32>, key: &[f32], descending: bool) -> Vec<u32> {
    let rank = |v: f32| -> u64 {
        if v.is_nan() {
            return u64::from(u32::MAX);
        }
        // The IEEE bits made to sort as unsigned integers in the floats' order.
        let b = v.to_bits();
        let ascending = if b >> 31 == 1 { !b } else { b | 1 << 31 };
        u64::from(if descending { !ascending } else { ascending })
    };
    let mut packed: Vec<u64> = features.iter().map(|&f| rank(key[f as usize]) << 32 | u64::from(f)).collect();
    packed.sort_unstable();
    packed.into_iter().map(|p| p as u32).collect()
}

/// One row; returns true when its feature was clicked.
fn row(ui: &mut Ui, data: &DictData, f: u32, selected: bool, similarity: Option<f32>) -> bool {
    let density = data.tables.densities()[f as usize];
    let max = data.tables.max_activations()[f as usize];
    let score = data.score(f);
    ui.horizontal(|ui| {
        let open = ui.add_sized([110.0, ROW], egui::Button::selectable(selected, format!("feature {f}")));
        ui.add_sized([80.0, ROW], egui::Label::new(format!("{density:.2e}")));
        ui.add_sized([70.0, ROW], egui::Label::new(format!("{max:.3}")));
        let score = if score.is_nan() { "–".into() } else { format!("{score:.2}") };
        ui.add_sized([50.0, ROW], egui::Label::new(score));
        // The text first, then who wrote it.
        cell(ui, text_width(ui), |ui| {
            if let Some(sim) = similarity {
                ui.label(RichText::new(format!("{sim:.2}")).weak());
            }
            let text = data.explanation(f).unwrap_or("");
            ui.add(egui::Label::new(text).truncate());
        });
        cell(ui, EXPLAINER, |ui| {
            let explainer = data.explainer(f).unwrap_or("");
            ui.add(egui::Label::new(RichText::new(explainer).small().weak()).truncate());
        });
        open.clicked()
    })
    .inner
}

#[cfg(test)]
mod tests {
    use super::{contains_ignoring_ascii_case, sorted};

    #[test]
    fn text_search_ignores_ascii_case_only() {
        assert!(contains_ignoring_ascii_case("Fires on \" Whale\"", "whale"));
        assert!(contains_ignoring_ascii_case("anything", ""));
        assert!(!contains_ignoring_ascii_case("wha", "whale"));
        assert!(!contains_ignoring_ascii_case("ÉTÉ", "été"));
    }

    #[test]
    fn sorted_orders_by_key_with_nan_last_and_ties_by_id() {
        let key = [0.5, f32::NAN, -1.0, 2.0, 0.5, 0.0, -0.0];
        assert_eq!(sorted((0..7).collect(), &key, true), [3, 0, 4, 5, 6, 2, 1]);
        assert_eq!(sorted((0..7).collect(), &key, false), [2, 6, 5, 0, 4, 3, 1]); // -0 before 0: IEEE total order
    }
}
