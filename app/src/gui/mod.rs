//! `loupe gui`: the egui desktop app over a store, opened read-only.
//!
//! Like rerun's viewer, the views read immutable store tables; heavy work (loading a dictionary's
//! tables and explanations, semantic search, the model in the prompt lab) runs on background
//! threads ([`jobs`]); lists lay out only their visible rows. Every view is a struct behind the
//! [`view::View`] trait, drawn with a [`view::ViewContext`] (store, dictionary, live model, open
//! item) into which it puts what the user asked to open, a [`navigation::Item`]; [`LoupeApp`]
//! owns the tabs, the dictionary and the back/forward [`navigation::History`], and is what both
//! eframe and the egui_kittest tests drive. Compute stays out of the views: `data.rs` and `lab.rs`
//! hold no UI.
//!
//! Tabs: Features (list + page), Prompt lab, Heads (grid + head page), Circuits (graph of a task's
//! heads and MLPs, the selected node, the methods' evaluation), Graph (an attribution graph of
//! transcoder features by position and layer, pinned subgraph, supernodes), Experts (usage bars,
//! co-activation heatmap and the selected expert of an experts entry). The prompt is the app's: the
//! prompt lab, the Heads view and the feature page's attributions run on the same text.

pub mod circuits;
pub mod circuits_data;
pub mod circuits_eval;
pub mod data;
pub mod experts;
pub mod experts_data;
pub mod experts_synthetic;
pub mod feature_list;
pub mod feature_page;
pub mod graph;
pub mod graph_data;
pub mod graph_panel;
pub mod heads;
pub mod heads_data;
pub mod jobs;
pub mod lab;
pub mod navigation;
pub mod prompt_lab;
pub mod tokens;
pub mod view;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use egui::{RichText, Ui};
use loupe_store::Store;

use circuits::CircuitsView;
use data::DictData;
use experts::ExpertsView;
use feature_list::FeatureList;
use feature_page::FeaturePage;
use graph::GraphView;
use heads::HeadsView;
use jobs::{Loading, error_ui};
use navigation::{History, Item};
use prompt_lab::{DEFAULT_PROMPT, PromptLab};
use view::{LiveModel, View, ViewContext};

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
    /// The tab to show first.
    pub view: Option<Tab>,
    /// A prompt to put in the prompt lab and run as soon as the dictionary is loaded.
    pub prompt: Option<String>,
    /// A head `(layer, head)` to open at start (in the Heads view).
    pub head: Option<(usize, usize)>,
    /// A circuit to show at start (in the Circuits view).
    pub circuit: Option<String>,
    /// An attribution graph to show at start (in the Graph view).
    pub graph: Option<String>,
    /// An experts entry to show at start (in the Experts view).
    pub experts: Option<String>,
}

/// The tabs of the navigation bar (`loupe gui --view`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Tab {
    Features,
    PromptLab,
    Heads,
    Circuits,
    Graph,
    Experts,
}

/// The whole app.
pub struct LoupeApp {
    store: Result<Arc<Store>, String>,
    root: String,
    dicts: Vec<String>,
    dict: Option<String>,
    data: Loading<Arc<DictData>>,
    pub tab: Tab,
    list: FeatureList,
    page: FeaturePage,
    lab: PromptLab,
    heads: HeadsView,
    circuits: CircuitsView,
    graph: GraphView,
    experts: ExpertsView,
    /// The prompt the prompt lab, the Heads view and the feature page share.
    prompt: String,
    model: LiveModel,
    history: History<Item>,
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
        let mut history = History::default();
        if let Some((layer, head)) = options.head {
            history.open(Item::Head { layer, head });
        }
        let tab = match (options.view, options.head, &options.circuit, &options.graph, &options.experts) {
            (Some(tab), ..) => tab,
            (None, Some(_), ..) => Tab::Heads,
            (None, None, Some(_), ..) => Tab::Circuits,
            (None, None, None, Some(_), _) => Tab::Graph,
            (None, None, None, None, Some(_)) => Tab::Experts,
            (None, None, None, None, None) => Tab::Features,
        };
        LoupeApp {
            pending: dict,
            root: options.store.display().to_string(),
            dicts,
            dict: None,
            data: Loading::Idle,
            tab,
            list: FeatureList::new(options.embedder.clone()),
            page: FeaturePage::default(),
            lab: PromptLab::default(),
            heads: HeadsView::default(),
            circuits: CircuitsView::starting_at(options.circuit.clone()),
            graph: GraphView::starting_at(options.graph.clone()),
            experts: ExpertsView::starting_at(options.experts.clone()),
            prompt: options.prompt.clone().unwrap_or_else(|| DEFAULT_PROMPT.to_string()),
            model: LiveModel { path: options.model.clone(), ..LiveModel::default() },
            history,
            open_at_start: options.feature,
            run_at_start: options.prompt.is_some(),
            store,
        }
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
        match self.history.current()? {
            Item::Feature { feature, .. } => Some(*feature),
            _ => None,
        }
    }

    /// The head whose page is open.
    pub fn current_head(&self) -> Option<(usize, usize)> {
        match self.history.current()? {
            Item::Head { layer, head } => Some((*layer, *head)),
            _ => None,
        }
    }

    /// The circuit node selected, as `(circuit, node)`.
    pub fn current_circuit_node(&self) -> Option<(&str, &str)> {
        match self.history.current()? {
            Item::CircuitNode { circuit, node } => Some((circuit, node)),
            _ => None,
        }
    }

    /// The attribution-graph node selected, as `(graph, node_id)`.
    pub fn current_graph_node(&self) -> Option<(&str, &str)> {
        match self.history.current()? {
            Item::GraphNode { graph, node } => Some((graph, node)),
            _ => None,
        }
    }

    /// The expert selected, as `(experts entry, expert)`.
    pub fn current_expert(&self) -> Option<(&str, u32)> {
        match self.history.current()? {
            Item::Expert { source, expert } => Some((source, *expert)),
            _ => None,
        }
    }

    /// The Experts view (what it shows: the entry, its sort, what the last frame drew).
    pub fn experts_view(&self) -> &ExpertsView {
        &self.experts
    }

    /// The Circuits view (what it shows: the circuit, the pinned nodes).
    pub fn circuits_view(&self) -> &CircuitsView {
        &self.circuits
    }

    /// The Graph view (what it shows: the graph, the pinned nodes, what the last frame drew).
    pub fn graph_view(&self) -> &GraphView {
        &self.graph
    }

    /// The prompt the views share.
    pub fn prompt(&mut self) -> &mut String {
        &mut self.prompt
    }

    pub fn prompt_lab(&mut self) -> &mut PromptLab {
        &mut self.lab
    }

    /// Start loading `dict` (nothing when it is the chosen one already).
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
    }

    /// Open feature `f` of the chosen dictionary (and the Features tab).
    pub fn open(&mut self, f: u32) {
        if let Some(dictionary) = self.dict.clone() {
            self.open_item(Item::Feature { dictionary, feature: f });
        }
    }

    /// Open `item` (and the tab that shows it; its dictionary loads at the next frame).
    pub fn open_item(&mut self, item: Item) {
        self.tab = tab_of(&item);
        self.history.open(item);
    }

    /// After back or forward: the tab of the item shown (none: stay).
    fn show_current_tab(&mut self) {
        if let Some(item) = self.history.current() {
            self.tab = tab_of(item);
        }
    }

    /// Draw one frame.
    pub fn show(&mut self, ui: &mut Ui) {
        if let Some(d) = self.pending.take() {
            self.select(ui.ctx(), d);
        }
        if self.data.poll()
            && let Some(data) = self.data.ready().cloned()
        {
            if let Some(f) = self.open_at_start.take().filter(|&f| (f as usize) < data.n_features()) {
                self.history.open(Item::Feature { dictionary: data.name.clone(), feature: f });
            }
            if let (true, Ok(store)) = (std::mem::take(&mut self.run_at_start), &self.store) {
                self.lab.start_run(ui.ctx(), store, &self.model, &data.name, &self.prompt);
            }
        }
        egui::Panel::top("navigation").show(ui, |ui| self.navigation(ui));
        // The open item may belong to another dictionary (back/forward across a switch).
        if let Some(d) = self.history.current().and_then(|i| i.dictionary()).map(str::to_string) {
            self.select(ui.ctx(), d);
        }
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
        let data = self.data.ready().cloned();
        let mut cx = ViewContext {
            store: &store,
            store_root: &self.root,
            dict: data.as_deref(),
            dict_loading: &self.data,
            model: &self.model,
            prompt: &mut self.prompt,
            current: self.history.current(),
            open: None,
        };
        match self.tab {
            Tab::Features => {
                let (list, page) = (&mut self.list, &mut self.page);
                egui::Panel::left("feature list").resizable(true).default_size(560.0).show(ui, |ui| {
                    // Keep the panel's width while the list has little to show (loading).
                    ui.take_available_width();
                    list.ui(ui, &mut cx);
                });
                egui::CentralPanel::default().show(ui, |ui| page.ui(ui, &mut cx));
            }
            Tab::PromptLab => {
                let lab = &mut self.lab;
                egui::CentralPanel::default()
                    .show(ui, |ui| egui::ScrollArea::vertical().show(ui, |ui| lab.ui(ui, &mut cx)));
            }
            Tab::Heads => self.heads.ui(ui, &mut cx),
            Tab::Circuits => self.circuits.ui(ui, &mut cx),
            Tab::Graph => self.graph.ui(ui, &mut cx),
            Tab::Experts => self.experts.ui(ui, &mut cx),
        }
        if let Some(item) = cx.open {
            self.open_item(item);
        }
    }

    fn navigation(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let back = ui.add_enabled(self.history.can_go_back(), egui::Button::new("« Back"));
            if back.clicked() || ui.input(|i| i.modifiers.alt && i.key_pressed(egui::Key::ArrowLeft)) {
                self.history.back();
                self.show_current_tab();
            }
            let forward = ui.add_enabled(self.history.can_go_forward(), egui::Button::new("Forward »"));
            if forward.clicked() || ui.input(|i| i.modifiers.alt && i.key_pressed(egui::Key::ArrowRight)) {
                self.history.forward();
                self.show_current_tab();
            }
            ui.separator();
            for (tab, title) in [
                (Tab::Features, self.list.title()),
                (Tab::PromptLab, self.lab.title()),
                (Tab::Heads, self.heads.title()),
                (Tab::Circuits, self.circuits.title()),
                (Tab::Graph, self.graph.title()),
                (Tab::Experts, self.experts.title()),
            ] {
                ui.selectable_value(&mut self.tab, tab, title);
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
            // Another dictionary closes the page (Back opens it again, in its dictionary).
            if let Some(d) = chosen.filter(|d| self.dict.as_ref() != Some(d)) {
                self.history.close();
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

/// The tab that shows `item`.
fn tab_of(item: &Item) -> Tab {
    match item {
        Item::Feature { .. } => Tab::Features,
        Item::Head { .. } => Tab::Heads,
        Item::CircuitNode { .. } => Tab::Circuits,
        Item::GraphNode { .. } => Tab::Graph,
        Item::Expert { .. } => Tab::Experts,
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
