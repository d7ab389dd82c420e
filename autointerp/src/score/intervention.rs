//! The intervention scorer: does the explanation predict what the feature *does*?
//!
//! Method (Paulo et al. §3.3.5 describe the idea; this is Loupe's version, which needs no LLM):
//! 1. Prompts: 4 windows of 24 tokens from the analysis' examples of random features (the same
//!    for every feature of a run).
//! 2. Steering: the model runs on each prompt with `scale × max_activation × direction` added at
//!    the dictionary's hook on every position (the feature's decoder row, through
//!    [`loupe_dict::steer`]), and once without.
//! 3. Effect: the 10 output tokens whose log-probability at the last position rises most,
//!    averaged over the prompts, written as text.
//! 4. Score: the MiniLM cosine between the explanation and its own feature's effect, against the
//!    cosines between the explanation and the other scored features' effects: the AUROC of one
//!    positive among those negatives (1: the explanation matches its own effect better than any
//!    other; 0.5: chance). So a run must score at least two features.
//!
//! Dictionaries without a fixed decoder direction (Monet experts) cannot be steered this way;
//! their intervention scores fail with that reason (loupe-dict's refusal).

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use candle_core::{D, Device, IndexOp, Tensor};
use loupe_dict::Dictionary;
use loupe_model::Session;
use loupe_model::hooks::Hooks;
use loupe_store::{FeatureTables, Store};
use rand::SeedableRng;
use rand::seq::IndexedRandom;

use super::embedding::{Embedder, cosine};
use super::{Measured, metrics};

const PROMPTS: usize = 4;
const PROMPT_TOKENS: usize = 24;
const EFFECT_TOKENS: usize = 10;

/// The model, the dictionary and the prompts of one run.
pub struct Steering {
    session: Session,
    dict: String,
    hook: String,
    dictionary: Box<dyn Dictionary>,
    prompts: Tensor,
    prompt_rows: Vec<u64>,
    baseline: Tensor,
    pub scale: f32,
    pub model_name: String,
}

fn last_log_probs(logits: &Tensor) -> Result<Tensor> {
    let seq = logits.dim(1)?;
    Ok(candle_nn::ops::log_softmax(&logits.i((.., seq - 1, ..))?, D::Minus1)?)
}

impl Steering {
    /// Load the store's model (or `model_path`) and the dictionary `dict`, and draw the prompts.
    pub fn load(
        store: &Store,
        dict: &str,
        tables: &FeatureTables,
        model_path: Option<&Path>,
        scale: f32,
        seed: u64,
    ) -> Result<Steering> {
        let remedy = format!("pass --model to steer with the {dict} features");
        let session = Session::open(&store.manifest(), model_path, Some(&remedy))?;
        let (entry, dictionary) = loupe_dict::open_in_store(store, dict)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
        let (mut ids, mut rows) = (Vec::new(), Vec::new());
        let n = tables.n_features() as u32;
        for _ in 0..n.min(10_000) {
            if rows.len() == PROMPTS {
                break;
            }
            let f = rand::Rng::random_range(&mut rng, 0..n);
            let examples = tables.top_examples(f)?;
            let Some(e) = examples.choose(&mut rng) else { continue };
            if e.tokens.len() >= PROMPT_TOKENS && !rows.contains(&e.row) {
                ids.extend_from_slice(&e.tokens[..PROMPT_TOKENS]);
                rows.push(e.row);
            }
        }
        if rows.len() < PROMPTS {
            bail!("the analysis of {dict} has too few examples of {PROMPT_TOKENS} tokens to steer on");
        }
        let prompts = Tensor::from_vec(ids, (PROMPTS, PROMPT_TOKENS), &Device::Cpu)?;
        let logits = session
            .model()
            .forward(&prompts, &mut Hooks::new())?
            .ok_or_else(|| anyhow!("the model gave no logits"))?;
        let baseline = last_log_probs(&logits)?;
        let model_name = session.name();
        Ok(Steering {
            session,
            dict: dict.to_string(),
            hook: entry.hook,
            dictionary,
            prompts,
            prompt_rows: rows,
            baseline,
            scale,
            model_name,
        })
    }

    /// The tokens feature `f` promotes most when added at `strength` (token ids, best first).
    pub fn effect(&self, f: u32, strength: f32) -> Result<Vec<u32>> {
        let steer = loupe_dict::steer::Steering {
            dictionary: self.dictionary.as_ref(),
            name: &self.dict,
            hook: &self.hook,
        };
        let logits = steer.logits(self.session.model(), &self.prompts, f, strength)?;
        let rise: Vec<f32> = (last_log_probs(&logits)? - &self.baseline)?.mean(0)?.to_vec1()?;
        let mut order: Vec<u32> = (0..rise.len() as u32).collect();
        let k = EFFECT_TOKENS.min(order.len());
        order.select_nth_unstable_by(k - 1, |&a, &b| rise[b as usize].total_cmp(&rise[a as usize]));
        order.truncate(k);
        order.sort_by(|&a, &b| rise[b as usize].total_cmp(&rise[a as usize]));
        Ok(order)
    }

    pub fn prompt_rows(&self) -> &[u64] {
        &self.prompt_rows
    }
}

/// Score each `(feature, explanation, effect text)` against the others' effects.
pub fn score_all(embedder: &Embedder, items: &[(u32, String, String)]) -> Result<Vec<Measured>> {
    if items.len() < 2 {
        bail!("the intervention scorer compares features with each other: score at least two");
    }
    let texts: Vec<String> = items.iter().flat_map(|(_, e, eff)| [e.clone(), eff.clone()]).collect();
    let v = embedder.embed(&texts)?;
    let (expl, eff): (Vec<&Vec<f32>>, Vec<&Vec<f32>>) =
        (v.iter().step_by(2).collect(), v.iter().skip(1).step_by(2).collect());
    Ok((0..items.len())
        .map(|i| {
            let sims: Vec<f32> = eff.iter().map(|e| cosine(expl[i], e)).collect();
            let truth: Vec<bool> = (0..items.len()).map(|j| j == i).collect();
            let auroc = metrics::auroc(&sims, &truth);
            Measured { score: auroc, auroc, n_examples: items.len() as u32, ..Measured::default() }
        })
        .collect())
}
