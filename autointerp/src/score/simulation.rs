//! Simulation (Bills et al. 2023, as in delphi): the LLM reads the explanation and one window
//! token by token and predicts each token's activation on a 0-10 scale; the score is the
//! Pearson r of predicted against true activations over all tokens of all scored windows
//! (activating and not). Answers are read as `index<TAB>value` lines; a window whose answer
//! covers fewer than 80% of its tokens is left out (missing tokens of the others count as 0).

use super::{Measured, metrics};
use crate::examples::Sets;
use crate::llm::Llm;

fn system(explanation: &str) -> String {
    format!(
        "You are predicting where a feature of a language model activates.\nExplanation of the feature: \
         {explanation}\nYou will see a text split into numbered tokens, one per line as <index><TAB><token>. For \
         every token, predict the feature's activation from 0 (none) to 10 (strongest). Answer one line per \
         token, <index><TAB><activation>, for every index in order, and nothing else."
    )
}

/// Predicted activations by token index from an answer; None for tokens it did not give.
pub fn parse_predictions(answer: &str, n: usize) -> Vec<Option<f32>> {
    let mut out = vec![None; n];
    for line in answer.lines() {
        let mut parts = line.split(['\t', ':', ' ']).filter(|p| !p.is_empty());
        let (Some(i), Some(v)) = (parts.next(), parts.next()) else { continue };
        let (Ok(i), Ok(v)) = (i.trim().parse::<usize>(), v.trim().parse::<f32>()) else { continue };
        if (1..=n).contains(&i) && v.is_finite() {
            out[i - 1] = Some(v.clamp(0.0, 10.0));
        }
    }
    out
}

/// Score with up to `windows` test windows, half activating (`what` names the feature in
/// messages).
pub async fn score(llm: &Llm, explanation: &str, sets: &Sets, windows: usize, what: &str) -> Measured {
    let half = windows.div_ceil(2);
    let chosen = sets.test_activating.iter().take(half).chain(sets.test_other.iter().take(windows / 2));
    let mut m = Measured::default();
    let (mut pred, mut truth) = (Vec::new(), Vec::new());
    let mut first_failure = None;
    for w in chosen {
        let user: String = w
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}\t{}\n", i + 1, t.replace(['\n', '\t'], " ")))
            .collect();
        let max_tokens = 6 * w.tokens.len() as u32 + 16;
        let req = llm.request(system(explanation), user, max_tokens, None);
        let answer = match m.ask(llm, &req, &mut first_failure, what).await {
            Ok(Some(answer)) => answer,
            Ok(None) => continue,
            Err(why) => return m.failed(why),
        };
        let p = parse_predictions(&answer.text, w.tokens.len());
        let given = p.iter().filter(|x| x.is_some()).count();
        if (given as f32) < 0.8 * w.tokens.len() as f32 {
            first_failure.get_or_insert_with(|| {
                format!(
                    "the answer predicts {given} of {} tokens: {:?}",
                    w.tokens.len(),
                    crate::explain::snippet(&answer.text)
                )
            });
            continue;
        }
        pred.extend(p.into_iter().map(|x| x.unwrap_or(0.0)));
        truth.extend(&w.activations);
        m.example_rows.push(w.row);
    }
    if pred.is_empty() {
        let why = first_failure.unwrap_or_else(|| "no test examples".to_string());
        return m.failed(why);
    }
    m.pearson = metrics::pearson(&pred, &truth);
    if m.pearson.is_none() {
        return m
            .failed("the predicted (or true) activations are constant, so Pearson r is undefined".into());
    }
    m.score = m.pearson;
    m.n_examples = pred.len() as u32;
    m
}
