//! `loupe heads`: make the sequences, score every head `L.H`, write one table in the store.
//!
//! Repeated sequences come from [`detectors::repeated_sequences`] with the seed. Natural text is
//! a `--text` file's tokens, or by default the store's captured tokens (any captured hook's
//! `doc`, `pos`, `token` columns: the rows of one capture are the same at every hook), cut into
//! the capture's contexts; either way each sequence is BOS + up to `text_len − 1` tokens.
//! Everything is checked before the model runs; the table and its settings are written in one
//! manifest commit ([`Store::write_heads`]), replacing the entry of that name.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use loupe_model::Session;
use loupe_store::{HeadRow, HeadsEntry, HeadsSettings, Progress, Store};

use super::HeadsConfig;
use super::ablation::{Ablations, ablations};
use super::detectors::{DetectorScores, detector_scores, repeated_sequences};

/// What a run wrote.
#[derive(Clone, Debug)]
pub struct HeadsReport {
    pub name: String,
    pub n_layers: usize,
    pub n_heads: usize,
    /// One row per head, by layer then head (as written).
    pub rows: Vec<HeadRow>,
    pub settings: HeadsSettings,
}

/// Check what can be checked before a model is loaded: the entry name and the sizes.
pub fn check_settings(name: &str, config: &HeadsConfig) -> Result<()> {
    loupe_store::dictionaries::check_dictionary_name(name).map_err(|_| {
        anyhow::anyhow!("invalid heads name {name:?} (use letters, digits, '_', '-' and '.')")
    })?;
    if config.sequences == 0 {
        bail!("--sequences must be at least 1");
    }
    if config.repeat_len == 0 {
        bail!("--repeat-len must be at least 1");
    }
    if config.text_sequences == 0 {
        bail!("the natural-text set needs at least 1 sequence");
    }
    if config.text_len < 2 {
        bail!("natural-text sequences need at least 2 tokens");
    }
    Ok(())
}

/// Score every head of `session`'s model and write the table `name` into `store` (open for
/// writing). `text`: a file whose text replaces the store's captured tokens as natural text.
pub fn run(
    store: &Store,
    session: &Session,
    name: &str,
    config: &HeadsConfig,
    text: Option<&Path>,
    progress: &dyn Progress,
) -> Result<HeadsReport> {
    check_settings(name, config)?;
    let model = session.model();
    let c = model.config().clone();
    if !c.causal || model.unembedding().is_none() {
        bail!("{} is not a causal language model: its heads have no next-token loss", session.name());
    }
    let len = 2 * config.repeat_len + 1;
    if len > c.max_context {
        bail!(
            "--repeat-len {} makes sequences of {len} tokens; the model takes at most {} (use --repeat-len {} or less)",
            config.repeat_len,
            c.max_context,
            (c.max_context - 1) / 2
        );
    }
    let bos = bos_id(session)?;
    let text_len = config.text_len.min(c.max_context);
    let (text_seqs, text_source) = match text {
        Some(path) => {
            (file_text(session, path, bos, config.text_sequences, text_len)?, path.display().to_string())
        }
        None => captured_text(store, bos, config.text_sequences, text_len)?,
    };
    if let Some(t) = text_seqs.iter().flatten().find(|&&t| t as usize >= c.vocab_size) {
        bail!(
            "token {t} of the natural text is outside the model's vocabulary of {} (were the tokens captured with another model?)",
            c.vocab_size
        );
    }
    let repeated = repeated_sequences(config.seed, config.sequences, config.repeat_len, c.vocab_size, bos);

    let scores = detector_scores(model, &repeated, config.repeat_len, &text_seqs, progress)?;
    let abl = ablations(model, &repeated, config.repeat_len, config.mean_ablation, progress)?;
    let rows = head_rows(c.n_layers, c.n_heads, &scores, &abl);

    let manifest = store.manifest();
    let (model_name, sha256) = match &manifest.model {
        Some(info) if Path::new(&info.path) == session.path() => (info.name.clone(), info.sha256.clone()),
        _ => (session.name(), loupe_model::capture::sha256_of_model(session.path())?),
    };
    let settings = HeadsSettings {
        seed: config.seed,
        sequences: config.sequences as u32,
        repeat_len: config.repeat_len as u32,
        text_sequences: text_seqs.len() as u32,
        text_len: text_seqs.iter().map(Vec::len).max().unwrap_or(0) as u32,
        text_source,
        mean_ablation: config.mean_ablation,
        clean_loss: abl.clean_loss,
        model: model_name,
        model_sha256: sha256,
    };
    let entry = HeadsEntry {
        n_layers: c.n_layers as u32,
        n_heads: c.n_heads as u32,
        settings: settings.clone(),
        files: Vec::new(),
    };
    progress.stage("writing");
    store.write_heads(name, &rows, entry)?;
    Ok(HeadsReport { name: name.to_string(), n_layers: c.n_layers, n_heads: c.n_heads, rows, settings })
}

/// One row per head, by layer then head.
fn head_rows(n_layers: usize, n_heads: usize, scores: &[DetectorScores], abl: &Ablations) -> Vec<HeadRow> {
    (0..n_layers * n_heads)
        .map(|i| {
            let s = scores[i];
            HeadRow {
                layer: (i / n_heads) as u16,
                head: (i % n_heads) as u16,
                induction: s.induction,
                induction_mul: s.induction_mul,
                previous_token: s.previous_token,
                duplicate_token: s.duplicate_token,
                previous_token_text: s.previous_token_text,
                duplicate_token_text: s.duplicate_token_text,
                ablation_zero: abl.zero[i],
                ablation_mean: abl.mean.as_ref().map(|m| m[i]),
            }
        })
        .collect()
}

/// The token a sequence starts with: the tokenizer's BOS, else an HF directory's
/// `config.json` `bos_token_id`.
fn bos_id(session: &Session) -> Result<u32> {
    if let Some(bos) = session.tokenizer().ok().and_then(|t| t.bos_id()) {
        return Ok(bos);
    }
    let config = session.path().join("config.json");
    let from_config = std::fs::read_to_string(&config)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v.get("bos_token_id")?.as_u64());
    match from_config {
        Some(bos) if bos < session.model().config().vocab_size as u64 => Ok(bos as u32),
        _ => {
            bail!("{} has no BOS token (neither its tokenizer nor its config.json names one)", session.name())
        }
    }
}

/// BOS + each `len − 1` tokens of `tokens`, at most `n` sequences (the last may be shorter, if
/// it has a token).
fn cut(tokens: &[u32], bos: u32, n: usize, len: usize) -> Vec<Vec<u32>> {
    tokens
        .chunks(len - 1)
        .take(n)
        .map(|piece| std::iter::once(bos).chain(piece.iter().copied()).collect())
        .collect()
}

/// The natural text of a file, tokenized.
fn file_text(session: &Session, path: &Path, bos: u32, n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read --text {}", path.display()))?;
    let tokenizer = session.tokenizer().context("--text needs the model's tokenizer")?;
    let tokens = tokenizer.encode(&text, false)?;
    if tokens.is_empty() {
        bail!("--text {} has no tokens", path.display());
    }
    Ok(cut(&tokens, bos, n, len))
}

/// The first `n` contexts of the store's captured tokens (BOS + at most `len − 1` tokens each),
/// and where they came from.
fn captured_text(store: &Store, bos: u32, n: usize, len: usize) -> Result<(Vec<Vec<u32>>, String)> {
    let manifest = store.manifest();
    let no_tokens = || {
        anyhow::anyhow!(
            "the store has no captured tokens for the natural-text scores; run `loupe capture` first, or pass --text FILE"
        )
    };
    let hook =
        manifest.hooks.iter().find(|(_, e)| e.rows() > 0).map(|(h, _)| h.clone()).ok_or_else(no_tokens)?;
    // Tokens per context after BOS, and between context starts (the capture's, else `len − 1`).
    let (per_context, stride) = match manifest.capture_settings()? {
        Some(s) => {
            let per = s.context.saturating_sub(usize::from(s.bos)).max(1);
            (per, s.stride.max(1))
        }
        None => (len - 1, len - 1),
    };
    // Enough rows for `n` contexts (rows come in document order).
    let want = n * per_context.max(stride) + per_context;
    let acts = store.activations(&hook)?;
    let mut docs: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    let mut read = 0;
    for i in 0..acts.num_shards() {
        if read >= want {
            break;
        }
        let shard = acts.open_shard(i)?;
        for ((&doc, &pos), &token) in shard.doc().iter().zip(shard.pos()).zip(shard.token()) {
            docs.entry(doc).or_default().insert(pos, token);
            read += 1;
        }
    }
    let mut out = Vec::new();
    'docs: for positions in docs.values() {
        // The document's tokens from position 0 on, up to the first gap.
        let tokens: Vec<u32> = positions
            .iter()
            .enumerate()
            .take_while(|(i, (p, _))| **p as usize == *i)
            .map(|(_, (_, t))| *t)
            .collect();
        for start in (0..tokens.len()).step_by(stride) {
            let end = (start + per_context).min(tokens.len()).min(start + len - 1);
            out.push(std::iter::once(bos).chain(tokens[start..end].iter().copied()).collect());
            if out.len() == n {
                break 'docs;
            }
        }
    }
    if out.is_empty() {
        return Err(no_tokens());
    }
    Ok((out, format!("captured tokens of {hook}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_after_bos() {
        assert_eq!(cut(&[1, 2, 3, 4, 5], 0, 10, 3), [vec![0, 1, 2], vec![0, 3, 4], vec![0, 5]]);
        assert_eq!(cut(&[1, 2, 3, 4, 5], 0, 1, 3), [vec![0, 1, 2]]);
    }

    #[test]
    fn bad_settings_are_refused_before_the_model_runs() {
        let ok = HeadsConfig::default();
        assert!(check_settings("default", &ok).is_ok());
        let msg = |name: &str, c: HeadsConfig| check_settings(name, &c).unwrap_err().to_string();
        assert!(msg("a/b", ok.clone()).starts_with("invalid heads name \"a/b\""));
        assert_eq!(msg("x", HeadsConfig { sequences: 0, ..ok.clone() }), "--sequences must be at least 1");
        assert_eq!(msg("x", HeadsConfig { repeat_len: 0, ..ok }), "--repeat-len must be at least 1");
    }
}
