//! `loupe gui`: the egui desktop app over a store, opened read-only.
//!
//! Like rerun's viewer, the views read immutable store tables; heavy work (loading a dictionary's
//! tables and explanations, semantic search, the model in the prompt lab) runs on background
//! threads ([`jobs`]); lists lay out only their visible rows. One struct per view, each with a
//! `ui` method that returns what the user asked to open; [`LoupeApp`] owns the navigation
//! (views, dictionary, back/forward history) and is what both eframe and the egui_kittest tests
//! drive.
//!
//! Views: Features (list + page), Prompt lab. Heads and Circuits have their place in the
//! navigation and are not built yet (they say so).

pub mod data;
pub mod feature_list;
pub mod feature_page;
pub mod jobs;
pub mod lab;
pub mod prompt_lab;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use egui::{RichText, Ui};
use loupe_store::Store;

use data::DictData;
use feature_list::FeatureList;
use feature_page::FeaturePage;
use jobs::{Loading, error_ui};
use prompt_lab::PromptLab;

/// What `loupe gui` was asked to open.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub store: PathBuf,
    /// The dictionary to show first (default: the first analysed one).
    pub dictionary: Option<String>,
    /// A feature to open at start.
    pub feature: Option<u32>,
    /// The model for the prompt lab (default: the one the store records).
    pub model: Option<PathBuf>,
    /// The MiniLM folder for semantic search (None: no semantic search).
    pub embedder: Option<PathBuf>,
    /// The view to show first.
    pub view: Option<View>,
    /// A prompt to put in the prompt lab and run as soon as the dictionary is loaded.
    pub prompt: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum View {
    Features,
    PromptLab,
    Heads,
    Circuits,
}

/// Back/forward over the features opened in the current dictionary.
#[derive(Default)]
struct History {
    back: Vec<u32>,
    current: Option<u32>,
    forward: Vec<u32>,
}

impl History {
    fn open(&mut self, f: u32) {
        if self.current == Some(f) {
            return;
        }
        self.back.extend(self.current);
        self.current = Some(f);
        self.forward.clear();
    }
    fn back(&mut self) {
        if let Some(f) = self.back.pop() {
            self.forward.extend(self.current);
            self.current = Some(f);
        }
    }
    fn forward(&mut self) {
        if let Some(f) = self.forward.pop() {
            self.back.extend(self.current);
            self.current = Some(f);
        }
    }
}

/// The whole app.
pub struct LoupeApp {
    store: Result<Arc<Store>, String>,
    root: String,
    dicts: Vec<String>,
    dict: Option<String>,
    data: Loading<Arc<DictData>>,
    pub view: View,
    list: FeatureList,
    page: FeaturePage,
    lab: PromptLab,
    history: History,
    /// The dictionary to load at the first frame.
    pending: Option<String>,
    open_at_start: Option<u32>,
    run_at_start: bool,
}

impl LoupeApp {
    /// Open the store read-only (an error is shown in the window, not raised); the first frame
    /// starts loading the first dictionary.
    pub fn new(options: Options) -> LoupeApp {
        let store = Store::open(&options.store).map(Arc::new).map_err(|e| format!("{e:#}"));
        let dicts = store.as_ref().map(|s| data::analysed(s)).unwrap_or_default();
        let dict = options.dictionary.clone().or_else(|| dicts.first().cloned());
        let mut app = LoupeApp {
            pending: dict,
            root: options.store.display().to_string(),
            dicts,
            dict: None,
            data: Loading::Idle,
            view: View::Features,
            list: FeatureList::new(options.embedder.clone()),
            page: FeaturePage::default(),
            lab: PromptLab::new(options.model.clone()),
            history: History::default(),
            open_at_start: options.feature,
            run_at_start: options.prompt.is_some(),
            store,
        };
        if let Some(p) = options.prompt {
            app.lab.text = p;
        }
        app.view = options.view.unwrap_or(View::Features);
        app
    }

    /// The store could not be opened, or a dictionary failed to load: the message shown.
    pub fn error(&self) -> Option<&str> {
        match (&self.store, &self.data) {
            (Err(e), _) => Some(e),
            (_, Loading::Failed(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether the chosen dictionary is loaded.
    pub fn is_loaded(&self) -> bool {
        self.data.ready().is_some()
    }

    /// Whether the chosen dictionary's explanations and scores are loaded too (they come after
    /// the list shows).
    pub fn notes_loaded(&self) -> bool {
        self.data.ready().is_some_and(|d| d.notes().is_some())
    }

    /// The feature whose page is open.
    pub fn current_feature(&self) -> Option<u32> {
        self.history.current
    }

    pub fn prompt_lab(&mut self) -> &mut PromptLab {
        &mut self.lab
    }

    fn select(&mut self, ctx: &egui::Context, dict: String) {
        let Ok(store) = &self.store else { return };
        if self.dict.as_ref() == Some(&dict) {
            return;
        }
        let (store, name, repaint) = (store.clone(), dict.clone(), ctx.clone());
        self.data = Loading::start(ctx, "loading", move |p| {
            data::load_in_stages(store, &name, p, move || repaint.request_repaint())
        });
        self.dict = Some(dict);
        self.history = History::default();
    }

    /// Open feature `f`'s page (and the Features view).
    pub fn open(&mut self, f: u32) {
        self.history.open(f);
        self.view = View::Features;
    }

    /// Draw one frame.
    pub fn show(&mut self, ui: &mut Ui) {
        if let Some(d) = self.pending.take() {
            self.select(ui.ctx(), d);
        }
        if self.data.poll() {
            if let (Some(f), Some(data)) = (self.open_at_start.take(), self.data.ready())
                && (f as usize) < data.n_features()
            {
                self.history.open(f);
            }
            if let (true, Ok(store), Some(data)) =
                (std::mem::take(&mut self.run_at_start), &self.store, self.data.ready())
            {
                self.lab.start_run(ui.ctx(), store, &data.name);
            }
        }
        egui::Panel::top("navigation").show(ui, |ui| self.navigation(ui));
        let store = match &self.store {
            Ok(s) => s.clone(),
            Err(e) => {
                egui::CentralPanel::default().show(ui, |ui| {
                    error_ui(ui, e);
                    ui.label("Start it with the path of a store: `loupe gui <store>`.");
                });
                return;
            }
        };
        let Some(data) = self.data.ready().cloned() else {
            egui::CentralPanel::default().show(ui, |ui| {
                if self.dicts.is_empty() {
                    ui.label(
                        "This store has no analysed dictionary yet: run `loupe analyze` (or `loupe demo`).",
                    );
                }
                self.data.status_ui(ui);
            });
            return;
        };
        match self.view {
            View::Features => {
                let mut open = None;
                egui::Panel::left("feature list").resizable(true).default_size(560.0).show(ui, |ui| {
                    open = self.list.ui(ui, &store, &data, self.history.current);
                });
                egui::CentralPanel::default().show(ui, |ui| match self.history.current {
                    Some(f) => open = open.or(self.page.ui(ui, &data, f, &self.root)),
                    None => {
                        ui.label("Select a feature in the list to open its page.");
                    }
                });
                if let Some(f) = open {
                    self.open(f);
                }
            }
            View::PromptLab => {
                let mut open = None;
                egui::CentralPanel::default().show(ui, |ui| {
                    egui::ScrollArea::vertical().show(ui, |ui| open = self.lab.ui(ui, &store, &data));
                });
                if let Some(f) = open {
                    self.open(f);
                }
            }
            View::Heads | View::Circuits => {
                egui::CentralPanel::default().show(ui, |ui| {
                    ui.label("Not built yet: the heads and circuits views come with a later part of Loupe.");
                });
            }
        }
    }

    fn navigation(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let back = ui.add_enabled(!self.history.back.is_empty(), egui::Button::new("« Back"));
            if back.clicked() || ui.input(|i| i.modifiers.alt && i.key_pressed(egui::Key::ArrowLeft)) {
                self.history.back();
                self.view = View::Features;
            }
            let forward = ui.add_enabled(!self.history.forward.is_empty(), egui::Button::new("Forward »"));
            if forward.clicked() || ui.input(|i| i.modifiers.alt && i.key_pressed(egui::Key::ArrowRight)) {
                self.history.forward();
                self.view = View::Features;
            }
            ui.separator();
            for (view, name) in [(View::Features, "Features"), (View::PromptLab, "Prompt lab")] {
                ui.selectable_value(&mut self.view, view, name);
            }
            for (view, name) in [(View::Heads, "Heads"), (View::Circuits, "Circuits")] {
                ui.add_enabled_ui(false, |ui| ui.selectable_value(&mut self.view, view, name))
                    .response
                    .on_disabled_hover_text("not built yet");
            }
            ui.separator();
            let label = ui.label("Dictionary");
            let mut chosen = None;
            egui::ComboBox::from_id_salt("dictionary")
                .selected_text(self.dict.clone().unwrap_or_else(|| "none".into()))
                .show_ui(ui, |ui| {
                    for d in &self.dicts {
                        if ui.selectable_label(self.dict.as_ref() == Some(d), d).clicked() {
                            chosen = Some(d.clone());
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            if let Some(d) = chosen {
                self.select(ui.ctx(), d);
            }
            if let Some(data) = self.data.ready() {
                ui.label(RichText::new(format!("{} · {} features", data.kind, data.n_features())).weak());
            }
            let folder =
                std::path::Path::new(&self.root).file_name().map(|n| n.to_string_lossy().into_owned());
            ui.label(RichText::new(folder.unwrap_or_default()).weak().small()).on_hover_text(&self.root);
        });
    }
}

impl eframe::App for LoupeApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

/// Open the window (blocks until it closes).
pub fn run(options: Options) -> Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("Loupe").with_inner_size([1400.0, 900.0]),
        ..Default::default()
    };
    eframe::run_native("Loupe", native, Box::new(|_| Ok(Box::new(LoupeApp::new(options)))))
        .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}

#[cfg(test)]
mod tests {
    use super::History;

    #[test]
    fn history_goes_back_and_forward_and_a_new_page_drops_the_forward_list() {
        let mut h = History::default();
        for f in [1, 2, 2, 3] {
            h.open(f);
        }
        assert_eq!(
            (h.back.clone(), h.current),
            (vec![1, 2], Some(3)),
            "reopening the current page adds nothing"
        );
        h.back();
        h.back();
        assert_eq!(h.current, Some(1));
        h.back();
        assert_eq!(h.current, Some(1), "nothing before the first page");
        h.forward();
        assert_eq!(h.current, Some(2));
        h.open(5);
        assert!(h.forward.is_empty());
        h.back();
        assert_eq!(h.current, Some(2));
    }
}
