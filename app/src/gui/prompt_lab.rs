//! The prompt lab view: type a prompt, run it on the store's model in the background, see each
//! token's top features for the chosen dictionary (click one to open its page), the next-token
//! distribution, and steer with a feature (its decoder direction added at the hook, strength in
//! units of the prompt's mean activation norm there) to see how that distribution changes.

use std::sync::Arc;

use egui::{RichText, Ui};
use loupe_store::Store;

use super::data::DictData;
use super::jobs::Loading;
use super::lab::{Run, Steer};
use super::navigation::Item;
use super::tokens::{tokens_ui, visible};
use super::view::{LiveModel, View, ViewContext};

/// The prompt the app starts with.
pub const DEFAULT_PROMPT: &str = "When Mary and John went to the store, John gave a drink to";

/// The prompt lab's state; its prompt is the app's ([`ViewContext::prompt`]).
pub struct PromptLab {
    run: Loading<Arc<Run>>,
    steer: Loading<Steer>,
    /// The token whose features are listed.
    token: Option<usize>,
    /// The feature the tokens are coloured by and steering uses.
    pub feature: Option<u32>,
    pub strength: f32,
}

impl Default for PromptLab {
    fn default() -> PromptLab {
        PromptLab { run: Loading::Idle, steer: Loading::Idle, token: None, feature: None, strength: 0.5 }
    }
}

impl View for PromptLab {
    fn title(&self) -> &str {
        "Prompt lab"
    }

    fn ui(&mut self, ui: &mut Ui, cx: &mut ViewContext) {
        ui.heading("Prompt lab");
        let Some(data) = cx.dictionary(ui) else { return };
        if let Some(feature) = self.draw(ui, cx.store, cx.model, cx.prompt, data) {
            cx.open(Item::Feature { dictionary: data.name.clone(), feature });
        }
    }
}

impl PromptLab {
    /// Run `text` on `model` with dictionary `dict`, in the background.
    pub fn start_run(
        &mut self,
        ctx: &egui::Context,
        store: &Arc<Store>,
        model: &LiveModel,
        dict: &str,
        text: &str,
    ) {
        let (model, store, dict, text) = (model.clone(), store.clone(), dict.to_string(), text.to_string());
        self.run = Loading::start(ctx, "starting", move |p| {
            Ok(Arc::new(model.lab.run(&store, model.path.as_ref(), &dict, &text, p)?))
        });
        self.steer = Loading::Idle;
        self.token = None;
    }

    fn start_steer(
        &mut self,
        ctx: &egui::Context,
        store: &Arc<Store>,
        model: &LiveModel,
        run: Arc<Run>,
        f: u32,
    ) {
        let (model, store, strength) = (model.clone(), store.clone(), self.strength);
        self.steer = Loading::start(ctx, "starting", move |p| {
            model.lab.steer(&store, model.path.as_ref(), &run, f, strength, p)
        });
    }

    /// Draw the lab over `data`; returns a feature to open.
    fn draw(
        &mut self,
        ui: &mut Ui,
        store: &Arc<Store>,
        model: &LiveModel,
        text: &mut String,
        data: &DictData,
    ) -> Option<u32> {
        if self.run.poll()
            && let Some(run) = self.run.ready()
        {
            // List the last token's features (what the next token is predicted from), and colour
            // by its strongest feature until the user picks one.
            self.token = run.ids.len().checked_sub(1);
            if self.feature.is_none() {
                self.feature = run.top.last().and_then(|t| t.first()).map(|x| x.0);
            }
        }
        self.steer.poll();
        let mut open = None;
        ui.label(
            RichText::new(format!(
                "dictionary {} at {} · the model runs in the background",
                data.name, data.hook
            ))
            .weak(),
        );
        let label = ui.label("Prompt");
        ui.add(egui::TextEdit::multiline(text).desired_rows(3).desired_width(f32::INFINITY))
            .labelled_by(label.id);
        ui.horizontal(|ui| {
            let running = self.run.is_running();
            if ui.add_enabled(!running, egui::Button::new("Run")).clicked() {
                self.start_run(ui.ctx(), store, model, &data.name, text);
            }
            self.run.status_ui(ui);
        });
        let run = self.run.ready().cloned()?;
        if run.dict != data.name {
            ui.label(RichText::new("the dictionary changed: run the prompt again").weak());
            return None;
        }
        ui.separator();
        // Tokens, coloured by the chosen feature.
        let strings: Vec<String> = run.ids.iter().map(|&t| data.tables.token_string(t)).collect();
        let values: Vec<f32> = match self.feature {
            Some(f) => run.active.iter().map(|a| a.iter().find(|x| x.0 == f).map_or(0.0, |x| x.1)).collect(),
            None => vec![0.0; strings.len()],
        };
        let max = values.iter().copied().fold(0.0f32, f32::max);
        ui.label(match self.feature {
            Some(f) => {
                format!("tokens coloured by feature {f} (max {max:.3}); click a token to list its features")
            }
            None => "click a token to list its features".into(),
        });
        if let Some(i) = tokens_ui(ui, &strings, &values, max, self.token) {
            self.token = Some(i);
        }
        open = open.or(self.every_token(ui, &run, data, &strings));
        ui.separator();
        ui.columns(2, |cols| {
            open = self.token_features(&mut cols[0], &run, data, &strings);
            next_tokens(&mut cols[1], &run, data);
        });
        ui.separator();
        self.steering(ui, store, model, run, data);
        open
    }

    /// Every token with its three strongest features, folded away by default.
    fn every_token(&mut self, ui: &mut Ui, run: &Run, data: &DictData, strings: &[String]) -> Option<u32> {
        let mut open = None;
        egui::CollapsingHeader::new("Top features of every token").default_open(false).show(ui, |ui| {
            egui::Grid::new("every token").striped(true).show(ui, |ui| {
                for (i, (s, top)) in strings.iter().zip(&run.top).enumerate() {
                    let token = RichText::new(format!("{i:>3} {}", visible(s))).monospace();
                    if ui.selectable_label(self.token == Some(i), token).clicked() {
                        self.token = Some(i);
                    }
                    for &(f, v) in top.iter().take(3) {
                        let link =
                            ui.link(format!("feature {f}")).on_hover_text(data.explanation(f).unwrap_or(""));
                        if link.clicked() {
                            open = Some(f);
                        }
                        ui.label(format!("{v:.3}"));
                    }
                    ui.end_row();
                }
            });
        });
        open
    }

    fn token_features(&mut self, ui: &mut Ui, run: &Run, data: &DictData, strings: &[String]) -> Option<u32> {
        let mut open = None;
        let Some(i) = self.token.filter(|&i| i < run.top.len()) else {
            ui.label(RichText::new("no token selected").weak());
            return None;
        };
        ui.label(RichText::new(format!("Top features at token {i} {:?}", strings[i])).strong());
        if run.top[i].is_empty() {
            ui.label(RichText::new("no feature is active here").weak());
        }
        egui::Grid::new("token features").striped(true).show(ui, |ui| {
            for &(f, v) in &run.top[i] {
                if ui.link(format!("feature {f}")).clicked() {
                    open = Some(f);
                }
                ui.label(format!("{v:.3}"));
                if ui
                    .small_button("colour")
                    .on_hover_text("colour the tokens by this feature and steer with it")
                    .clicked()
                {
                    self.feature = Some(f);
                }
                let text = data.explanation(f).unwrap_or("");
                ui.scope(|ui| {
                    ui.set_width(ui.available_width().max(360.0));
                    ui.add(egui::Label::new(text).truncate()).on_hover_text(text);
                });
                ui.end_row();
            }
        });
        open
    }

    fn steering(
        &mut self,
        ui: &mut Ui,
        store: &Arc<Store>,
        model: &LiveModel,
        run: Arc<Run>,
        data: &DictData,
    ) {
        ui.label(RichText::new("Steering").strong());
        if !data.steerable {
            ui.label(
                RichText::new(format!(
                    "{} ({}) has no fixed decoder directions to add",
                    data.name, data.kind
                ))
                .weak(),
            );
            return;
        }
        ui.horizontal(|ui| {
            let mut f = self.feature.unwrap_or(0);
            let label = ui.label("Feature");
            let max = data.n_features().saturating_sub(1) as u32;
            if ui.add(egui::DragValue::new(&mut f).range(0..=max)).labelled_by(label.id).changed() {
                self.feature = Some(f);
            }
            let label = ui.label("Strength");
            ui.add(egui::Slider::new(&mut self.strength, -2.0..=2.0).text("× activation norm"))
                .labelled_by(label.id);
            let go = ui.add_enabled(!self.steer.is_running(), egui::Button::new("Steer"));
            if go.clicked() {
                self.feature = Some(f);
                self.start_steer(ui.ctx(), store, model, run.clone(), f);
            }
        });
        self.steer.status_ui(ui);
        if let Some(s) = self.steer.ready() {
            ui.label(format!(
                "feature {} added with coefficient {:.1} (strength {:.2} × norm {:.1}) at every position",
                s.feature, s.coefficient, s.strength, run.norm
            ));
            egui::Grid::new("steered").striped(true).show(ui, |ui| {
                for h in ["next token", "before", "after", "change"] {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for &(t, before, after) in &s.next {
                    ui.label(RichText::new(format!("{:?}", data.tables.token_string(t))).monospace());
                    ui.label(format!("{before:.4}"));
                    ui.label(format!("{after:.4}"));
                    let change = after - before;
                    let colour = if change >= 0.0 {
                        egui::Color32::from_rgb(60, 160, 90)
                    } else {
                        egui::Color32::from_rgb(200, 70, 60)
                    };
                    ui.colored_label(colour, format!("{change:+.4}"));
                    ui.end_row();
                }
            });
        }
    }
}

fn next_tokens(ui: &mut Ui, run: &Run, data: &DictData) {
    ui.label(RichText::new("Next token").strong());
    egui::Grid::new("next tokens").striped(true).show(ui, |ui| {
        for &(t, p) in &run.next {
            ui.label(RichText::new(format!("{:?}", data.tables.token_string(t))).monospace());
            ui.add(egui::ProgressBar::new(p).desired_width(120.0).text(format!("{p:.3}")));
            ui.end_row();
        }
    });
}
