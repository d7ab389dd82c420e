//! Detection and fuzzing (delphi): the LLM sees batches of examples, activating and not, and
//! answers a list of 0/1. Detection shows plain text and asks whether the feature fires in each;
//! fuzzing marks tokens — the truly activating ones of activating examples, random ones of the
//! others — and asks whether each marking fits the explanation. Examples are shuffled with a
//! fixed seed. A batch whose answer cannot be read is left out; when no batch can be read the
//! score fails with the first reason.

use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::{DETECTION, Measured, metrics};
use crate::client::TokenLogprob;
use crate::examples::{Sets, Window, activating_tokens, highlight};
use crate::explain::snippet;
use crate::llm::Llm;

/// Examples per request.
pub const BATCH: usize = 10;

fn system(scorer: &str, explanation: &str) -> String {
    let task = if scorer == DETECTION {
        "For each text, answer 1 if the feature would activate on some token of it, else 0."
    } else {
        "In each text some tokens are marked between << and >>. For each text, answer 1 if the marked tokens \
         are ones the feature activates on, else 0."
    };
    format!(
        "You are checking an explanation of a feature of a language model.\nExplanation: {explanation}\n\
         You will see numbered texts. {task}\nAnswer with the list only: one number per text, in order, \
         between square brackets and separated by commas."
    )
}

/// The text shown for `w` (fuzzing marks as many random tokens of a non-activating window as
/// the activating windows have on average).
fn shown(scorer: &str, w: &Window, activating: bool, marks: usize, rng: &mut impl rand::Rng) -> String {
    if scorer == DETECTION {
        return w.text();
    }
    let marked = if activating {
        activating_tokens(w)
    } else {
        let mut m = vec![false; w.tokens.len()];
        let start = rng.random_range(0..w.tokens.len().max(1));
        for x in m.iter_mut().skip(start).take(marks.max(1)) {
            *x = true;
        }
        m
    };
    highlight(&w.tokens, &marked)
}

/// The last `[...]` list of `n` zeros and ones in `answer`.
pub fn parse_labels(answer: &str, n: usize) -> Result<Vec<bool>, String> {
    let open = answer.rfind('[').ok_or_else(|| format!("no [list] in the answer: {:?}", snippet(answer)))?;
    let close = answer[open..]
        .find(']')
        .ok_or_else(|| format!("unclosed list in the answer: {:?}", snippet(answer)))?;
    let labels: Result<Vec<bool>, String> = answer[open + 1..open + close]
        .split(',')
        .map(|x| match x.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            other => Err(format!("{other:?} is not 0 or 1 in {:?}", snippet(answer))),
        })
        .collect();
    let labels = labels?;
    if labels.len() != n {
        return Err(format!("{} labels for {n} texts: {:?}", labels.len(), snippet(answer)));
    }
    Ok(labels)
}

/// P("1") of each label, from the log-probabilities of the last `n` tokens that are "0" or "1".
pub fn label_probabilities(logprobs: &[TokenLogprob], n: usize) -> Option<Vec<f32>> {
    let digits: Vec<&TokenLogprob> =
        logprobs.iter().filter(|t| matches!(t.token.trim(), "0" | "1")).collect();
    if digits.len() < n {
        return None;
    }
    let p = |t: &TokenLogprob, d: &str| -> f32 {
        if t.token.trim() == d {
            return t.logprob.exp();
        }
        t.top.iter().filter(|(tok, _)| tok.trim() == d).map(|(_, lp)| lp.exp()).fold(0.0, f32::max)
    };
    Some(
        digits[digits.len() - n..]
            .iter()
            .map(|t| {
                let (one, zero) = (p(t, "1"), p(t, "0"));
                if one + zero > 0.0 { one / (one + zero) } else { 0.5 }
            })
            .collect(),
    )
}

/// Score `explanation` with `scorer` (`detection` or `fuzzing`) on the test examples; a failure
/// (the budget, or no readable answer) is in `failure`. `what` names the feature in messages.
pub async fn score(
    llm: &Llm,
    scorer: &str,
    explanation: &str,
    sets: &Sets,
    seed: u64,
    what: &str,
) -> Measured {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut items: Vec<(&Window, bool)> = sets
        .test_activating
        .iter()
        .map(|w| (w, true))
        .chain(sets.test_other.iter().map(|w| (w, false)))
        .collect();
    items.shuffle(&mut rng);
    let marks = {
        let counts: Vec<usize> = sets
            .test_activating
            .iter()
            .map(|w| activating_tokens(w).iter().filter(|m| **m).count())
            .collect();
        counts.iter().sum::<usize>() / counts.len().max(1)
    };
    let mut m = Measured::default();
    let (mut pred, mut truth, mut probs, mut all_probs) = (Vec::new(), Vec::new(), Vec::new(), true);
    let mut first_failure = None;
    for batch in items.chunks(BATCH) {
        let user: String = batch
            .iter()
            .enumerate()
            .map(|(i, (w, act))| {
                format!("Text {}: {}\n", i + 1, shown(scorer, w, *act, marks, &mut rng).replace('\n', " "))
            })
            .collect();
        let max_tokens = 8 + 4 * batch.len() as u32;
        let req = llm.request(system(scorer, explanation), user, max_tokens, Some(5));
        let answer = match m.ask(llm, &req, &mut first_failure, what).await {
            Ok(Some(answer)) => answer,
            Ok(None) => continue,
            Err(why) => return m.failed(why),
        };
        match parse_labels(&answer.text, batch.len()) {
            Ok(labels) => {
                match answer.logprobs.as_deref().and_then(|lp| label_probabilities(lp, batch.len())) {
                    Some(p) => probs.extend(p),
                    None => all_probs = false,
                }
                pred.extend(labels);
                truth.extend(batch.iter().map(|(_, act)| *act));
                m.example_rows.extend(batch.iter().map(|(w, _)| w.row));
            }
            Err(why) => {
                first_failure.get_or_insert(why);
            }
        }
    }
    if pred.is_empty() {
        let why = first_failure.unwrap_or_else(|| "no test examples".to_string());
        return m.failed(why);
    }
    m.balanced_accuracy = metrics::balanced_accuracy(&pred, &truth);
    m.f1 = metrics::f1(&pred, &truth);
    m.auroc = if all_probs { metrics::auroc(&probs, &truth) } else { None };
    m.score = m.balanced_accuracy;
    m.n_examples = pred.len() as u32;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_their_probabilities() {
        assert_eq!(parse_labels("sure: [1, 0,1]", 3).unwrap(), vec![true, false, true]);
        assert!(parse_labels("[1, 0]", 3).unwrap_err().contains("2 labels for 3 texts"));
        assert!(parse_labels("[1, 0, maybe]", 3).unwrap_err().contains("not 0 or 1"));
        assert!(parse_labels("no list", 1).is_err());
        let t = |token: &str, lp: f32, top: &[(&str, f32)]| TokenLogprob {
            token: token.into(),
            logprob: lp,
            top: top.iter().map(|(a, b)| (a.to_string(), *b)).collect(),
        };
        let lps = [
            t("[", 0.0, &[]),
            t("1", (0.8f32).ln(), &[("1", (0.8f32).ln()), ("0", (0.2f32).ln())]),
            t(",", 0.0, &[]),
            t(" 0", (0.6f32).ln(), &[(" 0", (0.6f32).ln()), (" 1", (0.1f32).ln())]),
            t("]", 0.0, &[]),
        ];
        let p = label_probabilities(&lps, 2).unwrap();
        assert!((p[0] - 0.8).abs() < 1e-5 && (p[1] - 0.1 / 0.7).abs() < 1e-5, "{p:?}");
        assert!(label_probabilities(&lps, 3).is_none());
    }
}
