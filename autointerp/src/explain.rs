//! Explainers. `delphi`: an LLM reads highlighted examples and answers a line
//! `[EXPLANATION]: …` (the method of Paulo et al. and EleutherAI's delphi; the prompt wording is
//! ours). `offline`: no LLM — a description built from the feature's activating tokens, what
//! precedes them and the tokens it promotes, so the demo is whole without an endpoint.

use std::collections::HashMap;

use loupe_store::FeatureTables;

use crate::client::ChatRequest;
use crate::examples::{Window, activating_tokens, highlight};
use crate::llm::{Llm, message};

pub const DELPHI: &str = "delphi";
pub const OFFLINE: &str = "offline";

/// Completion tokens allowed for an explanation.
pub const EXPLANATION_MAX_TOKENS: u32 = 200;
/// The longest explanation kept (characters): a phrase, or a few sentences at most. A longer one
/// (an endpoint that ignores `max_tokens`) is recorded as a failure instead.
pub const MAX_EXPLANATION_CHARS: usize = 2000;

const SYSTEM: &str = "You are an interpretability researcher studying a feature of a language model: a unit that \
activates on some tokens of some texts. You will read texts on which the feature activates. In each text the \
tokens where it activates most are marked between << and >> (consecutive marked tokens share one pair of \
markers). Some texts are followed by the activating tokens with their strength from 0 to 10.

Find what the marked tokens have in common — the words themselves, their meaning, or the context around them — \
and describe it in one short phrase. Do not list examples one by one and do not mention the markers. \
You may think first, but the last line of your answer must be:
[EXPLANATION]: <your explanation>";

const FEW_SHOT_USER: &str = "Example 1: and the<< whale>> rose from the sea
Example 2: hunting<< whales>> in the Pacific
Example 3: the great white<< Whale>> had been seen";
const FEW_SHOT_ASSISTANT: &str = "All marked tokens are the word whale, in any form.
[EXPLANATION]: the word \"whale\" (singular or plural, any case)";

/// The delphi-style request for a feature's train examples.
pub fn delphi_request(llm: &Llm, train: &[Window], feature_max: f32, activation_lines: bool) -> ChatRequest {
    let mut user = String::new();
    for (i, w) in train.iter().enumerate() {
        let marked = activating_tokens(w);
        user.push_str(&format!("Example {}: {}\n", i + 1, highlight(&w.tokens, &marked).replace('\n', " ")));
        if activation_lines {
            let pairs: Vec<String> = w
                .tokens
                .iter()
                .zip(&w.activations)
                .zip(&marked)
                .filter(|(_, m)| **m)
                .map(|((t, a), _)| format!("({:?}, {})", t.trim(), scale(*a, feature_max)))
                .collect();
            user.push_str(&format!("Activations: {}\n", pairs.join(", ")));
        }
    }
    let messages = vec![
        message("system", SYSTEM),
        message("user", FEW_SHOT_USER),
        message("assistant", FEW_SHOT_ASSISTANT),
        message("user", &user),
    ];
    llm.request_messages(messages, EXPLANATION_MAX_TOKENS, None)
}

/// An activation on the 0-10 scale of the feature's maximum.
pub fn scale(a: f32, max: f32) -> u32 {
    if max <= 0.0 { 0 } else { (10.0 * a / max).round().clamp(0.0, 10.0) as u32 }
}

/// The explanation in an answer: what follows the last `[EXPLANATION]:` (to the end of its line),
/// without highlight markers. `truncated` says the answer hit `max_tokens`: then a marker line
/// that ends the answer may be cut off, and is refused.
pub fn parse_explanation(answer: &str, truncated: bool) -> Result<String, String> {
    let marker = "[EXPLANATION]:";
    let Some(at) = answer.rfind(marker) else {
        let cut = if truncated { " (it hit max_tokens)" } else { "" };
        return Err(format!("the answer has no {marker} line{cut}: {:?}", snippet(answer)));
    };
    let rest = &answer[at + marker.len()..];
    if truncated && !rest.trim_end_matches([' ', '\t']).contains('\n') {
        return Err(format!("the answer hit max_tokens inside its {marker} line: {:?}", snippet(rest)));
    }
    let text = rest.lines().next().unwrap_or("").replace("<<", "").replace(">>", "");
    let text = text.trim().trim_matches(|c| c == '"' || c == '*').trim();
    if text.is_empty() {
        return Err(format!("the {marker} line is empty: {:?}", snippet(answer)));
    }
    if text.starts_with('<') && text.ends_with('>') {
        return Err(format!("the {marker} line repeats the prompt's placeholder: {:?}", snippet(text)));
    }
    let n = text.chars().count();
    if n > MAX_EXPLANATION_CHARS {
        return Err(format!(
            "the explanation is {n} characters long, more than the {MAX_EXPLANATION_CHARS} kept: {:?}",
            snippet(text)
        ));
    }
    Ok(text.to_string())
}

pub fn snippet(text: &str) -> String {
    let s: String = text.chars().take(160).collect();
    if s.len() < text.len() { format!("{s}…") } else { s }
}

/// The offline explanation of feature `f`: the most common activating tokens (weighted by
/// activation) in its train examples, the token most often right before them, and its top
/// promoted output tokens when the analysis has logit effects.
pub fn offline(tables: &FeatureTables, f: u32, train: &[Window]) -> String {
    let mut on: HashMap<String, f32> = HashMap::new();
    let mut before: HashMap<String, f32> = HashMap::new();
    let mut total = 0.0;
    for w in train {
        for (i, m) in activating_tokens(w).into_iter().enumerate() {
            if !m {
                continue;
            }
            let a = w.activations[i];
            total += a;
            *on.entry(w.tokens[i].clone()).or_default() += a;
            if i > 0 {
                *before.entry(w.tokens[i - 1].clone()).or_default() += a;
            }
        }
    }
    let top = |map: HashMap<String, f32>, n: usize| -> Vec<(String, f32)> {
        let mut v: Vec<(String, f32)> = map.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    };
    let share = |a: f32| if total > 0.0 { 100.0 * a / total } else { 0.0 };
    let mut parts = Vec::new();
    let tokens = top(on, 4);
    if tokens.is_empty() {
        return "offline explainer (token statistics): no activating examples".to_string();
    }
    let list: Vec<String> = tokens.iter().map(|(t, a)| format!("{t:?} ({:.0}%)", share(*a))).collect();
    parts.push(format!("fires on {}", list.join(", ")));
    if let Some((t, a)) = top(before, 1).into_iter().next()
        && share(a) >= 20.0
    {
        parts.push(format!("often right after {t:?} ({:.0}%)", share(a)));
    }
    if let Ok(logits) = tables.logits(f) {
        let promoted: Vec<String> = logits
            .iter()
            .filter(|l| l.rank > 0)
            .take(4)
            .map(|l| format!("{:?}", tables.token_string(l.token)))
            .collect();
        if !promoted.is_empty() {
            parts.push(format!("promotes {}", promoted.join(", ")));
        }
    }
    format!("offline explainer (token statistics): {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::parse_explanation;

    #[test]
    fn explanations_are_read_from_the_last_marker_line() {
        let ok = |a: &str, cut: bool| parse_explanation(a, cut).unwrap();
        let err = |a: &str, cut: bool| parse_explanation(a, cut).unwrap_err();
        assert_eq!(
            ok("thinking\n[EXPLANATION]: x\n[EXPLANATION]: \"the word <<whale>>\"\n", false),
            "the word whale"
        );
        assert_eq!(ok("[EXPLANATION]: commas in lists\nmore text", true), "commas in lists");
        assert!(err("[EXPLANATION]: The great white", true).contains("hit max_tokens inside"));
        assert!(err("no marker here", true).contains("no [EXPLANATION]: line (it hit max_tokens)"));
        assert!(err("[EXPLANATION]: <your explanation>", false).contains("placeholder"));
        assert!(err("[EXPLANATION]:   \n", false).contains("empty"));
        let long = format!("[EXPLANATION]: {}", "word ".repeat(1000));
        let why = err(&long, false);
        assert!(why.contains("4999 characters long") && why.len() < 300, "{why}");
        assert_eq!(ok(&format!("[EXPLANATION]: {}", "x".repeat(2000)), false).len(), 2000);
    }
}
