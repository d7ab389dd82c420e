//! Task files: JSONL, one clean/corrupt pair per line.
//!
//! ```text
//! {"clean": "When Mary and John went to the store, John gave a drink to",
//!  "corrupt": "When Mary and John went to the store, Tom gave a drink to",
//!  "answer": " Mary", "wrong": " John"}
//! ```
//!
//! `answer` and `wrong` are single tokens as the model's tokenizer writes them (leading space
//! included); the metric is then the logit difference answer − wrong at the last position. A task
//! may instead give answer sets, `"answers": […], "wrongs": […]` (single tokens each; e.g. for
//! greater-than the digits that continue to a later year, and the others), and the metric is the
//! probability difference P(answers) − P(wrongs) at the last position. Every line of a file uses
//! the same metric. Prompts are tokenized with the model's BOS first; clean and corrupt must have
//! the same number of tokens (pairs may differ in length from each other). Blank lines are
//! skipped; anything else that is wrong stops the load with the line number.

use std::path::Path;

use anyhow::{Context, Result, bail};
use loupe_model::tokenizer::Tokenizer;
use serde::Deserialize;

/// How a pair's last-position logits become one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// logit(answer) − logit(wrong).
    LogitDiff,
    /// Σ softmax(answers) − Σ softmax(wrongs).
    ProbDiff,
}

impl Metric {
    /// The name recorded in the store (`logit_diff`, `prob_diff`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::LogitDiff => "logit_diff",
            Metric::ProbDiff => "prob_diff",
        }
    }
}

/// One tokenized pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    /// BOS + the clean prompt's tokens.
    pub clean: Vec<u32>,
    /// BOS + the corrupt prompt's tokens (as many as `clean`).
    pub corrupt: Vec<u32>,
    /// The answer token(s) and the wrong one(s): one each for [`Metric::LogitDiff`].
    pub answers: Vec<u32>,
    pub wrongs: Vec<u32>,
}

/// A loaded task.
#[derive(Clone, Debug)]
pub struct Task {
    /// The file's name (e.g. `ioi.jsonl`).
    pub file: String,
    /// sha256 of the file's bytes, hex.
    pub sha256: String,
    pub metric: Metric,
    pub pairs: Vec<Pair>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    clean: String,
    corrupt: String,
    answer: Option<String>,
    wrong: Option<String>,
    answers: Option<Vec<String>>,
    wrongs: Option<Vec<String>>,
}

impl Metric {
    /// The metric of each pair from its last-position logits (`[vocab]` each).
    pub fn of(self, pair: &Pair, logits: &[f32]) -> f32 {
        match self {
            Metric::LogitDiff => logits[pair.answers[0] as usize] - logits[pair.wrongs[0] as usize],
            Metric::ProbDiff => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
                let p = |ids: &[u32]| {
                    ids.iter().map(|&i| f64::from(logits[i as usize] - max).exp()).sum::<f64>() / z
                };
                (p(&pair.answers) - p(&pair.wrongs)) as f32
            }
        }
    }
}

impl Task {
    /// Load and check a task file with `tokenizer` (see the module doc).
    pub fn load(path: &Path, tokenizer: &Tokenizer) -> Result<Task> {
        let (text, sha256) = read(path)?;
        let file =
            path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned());
        let bos = tokenizer.bos_id().context("the model's tokenizer has no BOS token")?;
        let mut pairs = Vec::new();
        let mut metric = None;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            let line: Line = serde_json::from_str(line).with_context(|| format!("{at}: not a task pair"))?;
            let (m, answers, wrongs) = match (line.answer, line.wrong, line.answers, line.wrongs) {
                (Some(a), Some(w), None, None) => (Metric::LogitDiff, vec![a], vec![w]),
                (None, None, Some(a), Some(w)) if !a.is_empty() && !w.is_empty() => (Metric::ProbDiff, a, w),
                _ => bail!(
                    "{at}: give \"answer\" and \"wrong\" (one token each), or non-empty \"answers\" and \"wrongs\""
                ),
            };
            if *metric.get_or_insert(m) != m {
                bail!("{at}: every line of a task uses the same metric (answer/wrong or answers/wrongs)");
            }
            let one = |t: &str| -> Result<u32> {
                let ids = tokenizer.encode(t, false)?;
                match ids.as_slice() {
                    [id] => Ok(*id),
                    _ => bail!(
                        "{at}: the answer {t:?} is {} tokens, not one ({:?})",
                        ids.len(),
                        tokenizer.token_strings(&ids)
                    ),
                }
            };
            let answers = answers.iter().map(|t| one(t)).collect::<Result<Vec<_>>>()?;
            let wrongs = wrongs.iter().map(|t| one(t)).collect::<Result<Vec<_>>>()?;
            if let Some(t) = answers.iter().find(|t| wrongs.contains(t)) {
                bail!(
                    "{at}: token {:?} is both an answer and a wrong one",
                    tokenizer.token_strings(&[*t])[0]
                );
            }
            let encode = |t: &str| -> Result<Vec<u32>> {
                let mut ids = vec![bos];
                ids.extend(tokenizer.encode(t, false)?);
                Ok(ids)
            };
            let (clean, corrupt) = (encode(&line.clean)?, encode(&line.corrupt)?);
            if clean.len() == 1 {
                bail!("{at}: the clean prompt is empty");
            }
            if clean.len() != corrupt.len() {
                bail!(
                    "{at}: clean and corrupt prompts have different token lengths ({} and {} tokens with BOS)",
                    clean.len(),
                    corrupt.len()
                );
            }
            pairs.push(Pair { clean, corrupt, answers, wrongs });
        }
        let Some(metric) = metric else {
            bail!("task file {} holds no pairs", path.display());
        };
        Ok(Task { file, sha256, metric, pairs })
    }

    /// The longest pair, in tokens.
    pub fn max_len(&self) -> usize {
        self.pairs.iter().map(|p| p.clean.len()).max().unwrap_or(0)
    }
}

/// Read a task's bytes and their hash (the load and the hash see the same bytes).
fn read(path: &Path) -> Result<(String, String)> {
    use sha2::Digest;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read task file {}", path.display()))?;
    let sha = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let text =
        String::from_utf8(bytes).with_context(|| format!("task file {} is not UTF-8", path.display()))?;
    Ok((text, sha))
}
