//! What the Heads view and an attention-SAE feature's page compute, no UI: the store's heads
//! table, one head's attention pattern on the prompt ([`loupe_analysis::heads::pattern`]) and a
//! feature's direct feature attribution ([`loupe_analysis::heads::dfa`]), both run in background
//! jobs with the prompt lab's model ([`super::lab::Lab::with_session`]).

use anyhow::{Result, bail};
use loupe_analysis::heads::dfa::{Dfa, dfa};
use loupe_analysis::heads::pattern::attention_pattern;
use loupe_model::Session;
use loupe_store::Store;
use loupe_store::heads::{DEFAULT_HEADS_NAME, HeadsTable};

use super::jobs::Progress;
use super::view::LiveModel;

/// Longest prompt whose pattern the view draws (tokens; also capped by the model's context).
pub const MAX_PATTERN_TOKENS: usize = 2048;

/// The heads entry to show: `default` when listed, else the first; `Ok(None)` when the store has
/// none.
pub fn load_heads(store: &Store) -> Result<Option<HeadsTable>> {
    let names = store.heads_names();
    let Some(name) = names.iter().find(|n| *n == DEFAULT_HEADS_NAME).or(names.first()) else {
        return Ok(None);
    };
    store.read_heads(name)
}

/// The layer of an attention-output dictionary's hook `blocks.L.attn.hook_z`.
pub fn hook_z_layer(hook: &str) -> Option<usize> {
    hook.strip_prefix("blocks.")?.strip_suffix(".attn.hook_z")?.parse().ok()
}

/// One head's attention pattern on a prompt.
pub struct Pattern {
    pub layer: usize,
    pub head: usize,
    /// The prompt it was computed on.
    pub prompt: String,
    /// Token strings (as the tokenizer decodes each id).
    pub tokens: Vec<String>,
    /// `[query][key]` row-major, `tokens.len()²`.
    pub weights: Vec<f32>,
}

impl Pattern {
    pub fn n(&self) -> usize {
        self.tokens.len()
    }

    pub fn weight(&self, query: usize, key: usize) -> f32 {
        self.weights[query * self.n() + key]
    }
}

/// The prompt's token ids and strings (BOS as the tokenizer adds it), at most `limit` tokens.
fn tokenize(session: &Session, text: &str, limit: usize) -> Result<(Vec<u32>, Vec<String>)> {
    let tokenizer = session.tokenizer()?;
    let ids = tokenizer.encode(text, true)?;
    if ids.is_empty() || text.trim().is_empty() {
        bail!("the prompt is empty: type one in the prompt lab (or here)");
    }
    let limit = limit.min(session.model().config().max_context);
    if ids.len() > limit {
        bail!("the prompt has {} tokens; at most {limit} here", ids.len());
    }
    // As a reader sees each token (decoded alone), else its vocabulary spelling (BOS, a byte).
    let spelled = tokenizer.token_strings(&ids);
    let strings = ids
        .iter()
        .zip(spelled)
        .map(|(&t, s)| match tokenizer.decode(&[t]) {
            Ok(d) if !d.is_empty() && !d.contains('\u{FFFD}') => d,
            _ => s,
        })
        .collect();
    Ok((ids, strings))
}

/// Head `layer.head`'s pattern on `prompt`, with the live model.
pub fn pattern(
    store: &Store,
    model: &LiveModel,
    prompt: &str,
    layer: usize,
    head: usize,
    p: &Progress,
) -> Result<Pattern> {
    model.lab.with_session(store, model.path.as_ref(), p, |session| {
        let (ids, tokens) = tokenize(session, prompt, MAX_PATTERN_TOKENS)?;
        p.stage(format!("running the model to layer {layer} on {} tokens", ids.len()));
        let weights = attention_pattern(session.model(), &ids, layer, head)?;
        Ok(Pattern { layer, head, prompt: prompt.to_string(), tokens, weights })
    })
}

/// A feature's DFA on a prompt, with the prompt's token strings.
pub struct Attribution {
    pub dict: String,
    pub prompt: String,
    pub tokens: Vec<String>,
    pub dfa: Dfa,
}

/// Feature `feature` of the SAE `dict` attributed to heads (and source tokens) on `prompt`.
pub fn attribution(
    store: &Store,
    model: &LiveModel,
    dict: &str,
    feature: u32,
    prompt: &str,
    p: &Progress,
) -> Result<Attribution> {
    let Some(entry) = store.manifest().dictionaries.get(dict).cloned() else {
        bail!("the store has no dictionary {dict}");
    };
    if entry.kind != "sae" {
        bail!("direct feature attribution needs an SAE; {dict} is a {}", entry.kind);
    }
    model.lab.with_session(store, model.path.as_ref(), p, |session| {
        let (ids, tokens) = tokenize(session, prompt, crate::gui::lab::MAX_PROMPT_TOKENS)?;
        p.stage(format!("loading the dictionary {dict}"));
        let dir = store.dictionary_dir(dict);
        store.check_listed_files(&dir, &entry.files.iter().collect::<Vec<_>>())?;
        let (sae, _) = loupe_dict::io::load_sae(&dir)?;
        p.stage(format!("attributing feature {feature} on {} tokens", ids.len()));
        let dfa = dfa(session.model(), &sae, &entry.hook, feature, &ids)?;
        Ok(Attribution { dict: dict.to_string(), prompt: prompt.to_string(), tokens, dfa })
    })
}

#[cfg(test)]
mod tests {
    use super::hook_z_layer;

    #[test]
    fn attention_output_hooks_name_their_layer() {
        assert_eq!(hook_z_layer("blocks.3.attn.hook_z"), Some(3));
        assert_eq!(hook_z_layer("blocks.3.hook_resid_post"), None);
        assert_eq!(hook_z_layer("blocks.x.attn.hook_z"), None);
    }
}
