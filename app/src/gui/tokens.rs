//! Text shown token by token, each token's background coloured by an activation, its value on
//! hover: the one widget the feature page's examples and the prompt lab share.

use egui::{Color32, RichText, Sense, Ui};

/// The background for `value` on a scale whose top is `max` (orange, transparent at zero; a
/// negative value, such as an attribution that takes away, in blue).
pub fn heat(value: f32, max: f32) -> Color32 {
    if !(value != 0.0 && value.is_finite() && max > 0.0) {
        return Color32::TRANSPARENT;
    }
    let alpha = (40.0 + 200.0 * (value.abs() / max).clamp(0.0, 1.0)) as u8;
    if value > 0.0 {
        Color32::from_rgba_unmultiplied(255, 140, 0, alpha)
    } else {
        Color32::from_rgba_unmultiplied(60, 110, 220, alpha)
    }
}

/// A token's text made visible: newlines as `↵`, tabs as `\t`, spaces kept (tokens are drawn in
/// the monospace font, which has `↵`).
pub fn visible(token: &str) -> String {
    token.replace('\n', "↵").replace('\t', "\\t")
}

/// Draw `tokens` with backgrounds from `values` (scaled to `max`), wrapping; `marked` is
/// underlined (an example's centre token). Returns the index of a clicked token.
pub fn tokens_ui(
    ui: &mut Ui,
    tokens: &[String],
    values: &[f32],
    max: f32,
    marked: Option<usize>,
) -> Option<usize> {
    let mut clicked = None;
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing = egui::vec2(0.0, 2.0);
        for (i, (t, &v)) in tokens.iter().zip(values).enumerate() {
            let mut text = RichText::new(visible(t)).monospace().background_color(heat(v, max));
            if marked == Some(i) {
                text = text.underline().strong();
            }
            let r = ui.add(egui::Label::new(text).sense(Sense::click()));
            if v != 0.0 {
                r.clone().on_hover_text(format!("{:?}: {v:.4}", t));
            }
            if r.clicked() {
                clicked = Some(i);
            }
        }
    });
    clicked
}
