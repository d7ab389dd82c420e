//! The view protocol: every view is a struct behind the [`View`] trait (as in rerun's viewer and
//! the egui demo), drawn each frame with a [`ViewContext`] that holds what the views share — the
//! store, the chosen dictionary once loaded, the live model and its prompt, the open item — and
//! takes back what
//! the user asked to open. A view that lacks what it needs says so in the window, with the
//! command that makes it ([`ViewContext::dictionary`]).

use std::path::PathBuf;
use std::sync::Arc;

use egui::{RichText, Ui};
use loupe_store::Store;

use super::data::DictData;
use super::jobs::Loading;
use super::lab::Lab;
use super::navigation::Item;

/// One view of the app.
pub trait View {
    /// The view's name (its tab in the navigation bar).
    fn title(&self) -> &str;
    /// Draw the view; put what the user asked to open in `cx.open`.
    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext);
}

/// The model the views run (the prompt lab's prompts and steering): `--model`, else the one the
/// store records; loaded by the first job that needs it and kept for the next, whichever view
/// started it.
#[derive(Clone, Default)]
pub struct LiveModel {
    pub lab: Lab,
    /// `--model` (None: the store's own).
    pub path: Option<PathBuf>,
}

/// What a view reads and writes besides its own state, for one frame.
pub struct ViewContext<'a> {
    /// The store, open read-only.
    pub store: &'a Arc<Store>,
    /// The store's folder as the user gave it (for the commands the views offer to copy).
    pub store_root: &'a str,
    /// The chosen dictionary's analysis, once loaded (see [`ViewContext::dictionary`]).
    pub dict: Option<&'a DictData>,
    /// How loading the chosen dictionary goes (what the views say while `dict` is None).
    pub dict_loading: &'a Loading<Arc<DictData>>,
    pub model: &'a LiveModel,
    /// The prompt: the prompt lab's, which the Heads view's patterns and the feature page's
    /// attributions run on too (one text, edited in any of them).
    pub prompt: &'a mut String,
    /// The item open now, if any.
    pub current: Option<&'a Item>,
    /// What to open after this frame (the first view to ask wins).
    pub open: Option<Item>,
}

impl<'a> ViewContext<'a> {
    /// Ask for `item` to open after this frame.
    pub fn open(&mut self, item: Item) {
        self.open.get_or_insert(item);
    }

    /// The feature of the loaded dictionary that is open, if any.
    pub fn current_feature(&self) -> Option<u32> {
        match (self.current, self.dict) {
            (Some(Item::Feature { dictionary, feature }), Some(d)) if *dictionary == d.name => Some(*feature),
            _ => None,
        }
    }

    /// The loaded dictionary, or None after saying in `ui` why there is none and how to get one
    /// (no activations, no dictionary, no analysis: the command to run; still loading: its
    /// progress; failed: the error).
    pub fn dictionary(&self, ui: &mut Ui) -> Option<&'a DictData> {
        if self.dict.is_some() {
            return self.dict;
        }
        if !matches!(self.dict_loading, Loading::Idle) {
            self.dict_loading.status_ui(ui);
            return None;
        }
        let manifest = self.store.manifest();
        let lacking = if !manifest.features.is_empty() {
            "no dictionary chosen: choose one in the Dictionary menu above".to_string()
        } else if !manifest.dictionaries.is_empty() {
            let names: Vec<&str> = manifest.dictionaries.keys().map(String::as_str).collect();
            let all = if names.len() > 1 {
                format!(" (dictionaries: {})", names.join(", "))
            } else {
                String::new()
            };
            format!(
                "no analysed dictionary in this store: run `loupe analyze --dictionary {}`{all}",
                names[0]
            )
        } else if !manifest.hooks.is_empty() {
            "no dictionary in this store: run `loupe train-sae` (or `loupe train-monet`), then `loupe analyze`"
                .to_string()
        } else {
            "no activations in this store: run `loupe capture`, then `loupe train-sae` and `loupe analyze` \
             (or `loupe demo` for all of it)"
                .to_string()
        };
        ui.label(RichText::new(lacking).color(ui.visuals().warn_fg_color));
        None
    }
}
