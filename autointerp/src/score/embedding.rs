//! The embedding scorer, and the embedder behind semantic search: all-MiniLM-L6-v2 run by
//! Loupe's own BERT runtime (mean-pooled, L2-normalised, as sentence-transformers does). The
//! score is the AUROC of the cosine between the explanation and each test window, activating
//! against non-activating windows. No LLM is involved.

use std::path::Path;

use anyhow::{Result, bail};
use loupe_model::bert::Bert;
use loupe_model::tokenizer::Tokenizer;

use super::{Measured, metrics};
use crate::examples::Sets;

/// MiniLM's position limit.
const MAX_TOKENS: usize = 256;

/// A sentence-embedding model.
pub struct Embedder {
    bert: Bert,
    tokenizer: Tokenizer,
    /// The model folder's name, recorded with what it embedded.
    pub name: String,
}

impl Embedder {
    /// Load a sentence-transformers BERT folder (config.json, model.safetensors, tokenizer.json).
    pub fn load(dir: &Path) -> Result<Embedder> {
        let text = std::fs::read_to_string(dir.join("config.json")).map_err(|_| {
            anyhow::anyhow!("{} is not a sentence-embedding model folder (no config.json)", dir.display())
        })?;
        let config: serde_json::Value = serde_json::from_str(&text)?;
        if config.get("model_type").and_then(|v| v.as_str()) != Some("bert") {
            bail!("{}: the embedder must be a BERT model such as all-MiniLM-L6-v2", dir.display());
        }
        let name = dir.file_name().map_or("embedder".into(), |n| n.to_string_lossy().into_owned());
        Ok(Embedder { bert: Bert::from_hf_dir(dir, &config)?, tokenizer: Tokenizer::load(dir)?, name })
    }

    /// Unit-norm embeddings of `texts` (each truncated to the model's 256 positions).
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| {
                let mut ids = self.tokenizer.encode(t, true)?;
                if ids.len() > MAX_TOKENS {
                    let last = *ids.last().expect("non-empty");
                    ids.truncate(MAX_TOKENS - 1);
                    ids.push(last);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        self.bert.mean_pooled_embedding(&ids)
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Score `explanation` on the test windows.
pub fn score(embedder: &Embedder, explanation: &str, sets: &Sets) -> Result<Measured, String> {
    let windows: Vec<_> = sets.test_activating.iter().chain(&sets.test_other).collect();
    if sets.test_activating.is_empty() || sets.test_other.is_empty() {
        return Err("needs activating and non-activating test examples".to_string());
    }
    let mut texts = vec![explanation.to_string()];
    texts.extend(windows.iter().map(|w| w.text()));
    let e = embedder.embed(&texts).map_err(|e| format!("cannot embed: {e:#}"))?;
    let sims: Vec<f32> = e[1..].iter().map(|v| cosine(&e[0], v)).collect();
    let truth: Vec<bool> = (0..windows.len()).map(|i| i < sets.test_activating.len()).collect();
    let auroc = metrics::auroc(&sims, &truth);
    Ok(Measured {
        score: auroc,
        auroc,
        n_examples: windows.len() as u32,
        example_rows: windows.iter().map(|w| w.row).collect(),
        ..Measured::default()
    })
}
