//! Tokenizers for Loupe's models: a thin wrapper over Hugging Face's `tokenizers` crate that can be
//! built from an HF `tokenizer.json` or from the SentencePiece-style vocabulary in a GGUF file.
//!
//! A GGUF file carries no `tokenizer.json`, only llama.cpp's metadata (`tokenizer.ggml.tokens`,
//! `.scores`, `.token_type`, special ids, flags). For `tokenizer.ggml.model = "llama"` (SentencePiece
//! BPE; Gemma writes its vocabulary this way too) we rebuild the tokenizer the way transformers does
//! when it loads a GGUF (`integrations/gguf/gguf_tokenizer_mapping.py`), so that ids match it exactly
//! (tested against `tests/fixtures/gemma3/tokenizer_reference.json`):
//!
//! - model: BPE with byte fallback (`<0xNN>` pieces) over the file's vocabulary. The file lists no
//!   merges, so they are derived from the vocabulary: every way of cutting a token into two pieces
//!   that are both tokens is a merge, ranked by the token's score (best first), then longer left
//!   piece first. For Gemma the rank is the token's position in the file instead of its score: the
//!   vocabulary is stored in merge order, and its scores are not (every whitespace run scores -1000).
//! - Gemma stores runs of spaces as real spaces (`"  "`); they are respelled `"▁▁"` first, the form
//!   the normalized text takes. Gemma: normalizer `" "` → `"▁"` (no prefix space), split on `" "`
//!   (a no-op after that normalizer, kept to mirror the reference). Other llama-style vocabularies:
//!   a `Metaspace` pre-tokenizer that prepends `"▁"` when `tokenizer.ggml.add_space_prefix` says so.
//! - decoder: `"▁"` → `" "`, byte fallback, fuse.
//! - control tokens (type 3: `<bos>`, `<start_of_turn>`, `<unused0>`, …) become special added tokens
//!   and user-defined ones (type 4: `"\n\n"`, `"\t"`, `<table>`, …) plain added tokens, so both are
//!   matched whole in the raw text (as transformers and llama.cpp do).
//! - BOS: a `<bos> $A` post-processor when `tokenizer.ggml.add_bos_token` is true (absent: true, as
//!   llama.cpp assumes for SentencePiece vocabularies); `encode(text, add_bos)` applies it on request.
//!
//! An HF `tokenizer.json` is used as it is, with its own post-processor (BOS/EOS, `[CLS]`/`[SEP]`),
//! except that padding and truncation are switched off: callers decide about context length.
//! Building the Gemma 3 tokenizer (262,144 tokens, 514,906 derived merges) takes well under a second
//! in release.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

use crate::gguf::Gguf;

/// SentencePiece's stand-in for a space.
const SPACE: char = '▁';

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// A model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    kind: &'static str,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl Tokenizer {
    /// The tokenizer of a model path: a `.gguf` file (any file that is not `.json`) is read as GGUF,
    /// a `.json` file as an HF `tokenizer.json`, a directory through its `tokenizer.json`.
    pub fn load(model_path: &Path) -> Result<Tokenizer> {
        if !model_path.exists() {
            bail!("model path {} does not exist", model_path.display());
        }
        if model_path.is_dir() {
            let file = model_path.join("tokenizer.json");
            if !file.is_file() {
                bail!("{} has no tokenizer.json (Loupe reads HF tokenizers from it)", model_path.display());
            }
            return Tokenizer::from_hf_file(&file);
        }
        if model_path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
            return Tokenizer::from_hf_file(model_path);
        }
        crate::gguf::check_magic(model_path)?;
        Tokenizer::from_gguf(&Gguf::open(model_path)?)
    }

    /// An HF `tokenizer.json`. BOS/EOS are what its post-processor adds around a text (e.g.
    /// `[CLS]`/`[SEP]` for BERT), else the `bos_token`/`eos_token` of a `tokenizer_config.json`
    /// next to it.
    pub fn from_hf_file(path: &Path) -> Result<Tokenizer> {
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{} is not a readable tokenizer.json: {e}", path.display()))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let (mut bos_id, mut eos_id) = added_around(&inner)?;
        let config = path.with_file_name("tokenizer_config.json");
        if (bos_id.is_none() || eos_id.is_none()) && config.is_file() {
            let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&config)?)
                .with_context(|| format!("{} is not valid JSON", config.display()))?;
            let id_of = |key: &str| {
                let v = json.get(key)?;
                let content = v.as_str().or_else(|| v.get("content")?.as_str())?;
                inner.token_to_id(content)
            };
            bos_id = bos_id.or_else(|| id_of("bos_token"));
            eos_id = eos_id.or_else(|| id_of("eos_token"));
        }
        Ok(Tokenizer { inner, kind: "hf", bos_id, eos_id })
    }

    /// The tokenizer described by a GGUF file's metadata (see the module docs).
    pub fn from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
        let path = gguf.path().display();
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "llama" {
            bail!(
                "{path}: tokenizer.ggml.model is {model:?}; Loupe rebuilds only SentencePiece-style \
                 (\"llama\") GGUF tokenizers (use the model's HF directory with tokenizer.json instead)"
            );
        }
        let gemma = gguf.architecture()?.starts_with("gemma");
        let mut tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let types = gguf.i32s("tokenizer.ggml.token_type")?;
        let scores = if gemma { None } else { Some(gguf.f32s("tokenizer.ggml.scores")?) };
        if types.len() != tokens.len() || scores.as_ref().is_some_and(|s| s.len() != tokens.len()) {
            bail!("{path}: tokenizer.ggml.tokens, .scores and .token_type differ in length");
        }
        let mut respelled = vec![false; tokens.len()];
        if gemma {
            for (t, r) in tokens.iter_mut().zip(&mut respelled) {
                if !t.is_empty() && t.chars().all(|c| c == ' ') {
                    *t = SPACE.to_string().repeat(t.len());
                    *r = true;
                }
            }
        }
        let id = |key: &str| -> Result<Option<u32>> {
            if !gguf.has(key) {
                return Ok(None);
            }
            let id = gguf.u32(key)?;
            if id as usize >= tokens.len() {
                bail!("{path}: {key} = {id} is outside the vocabulary ({} tokens)", tokens.len());
            }
            Ok(Some(id))
        };
        let (bos_id, eos_id, unk_id) = (
            id("tokenizer.ggml.bos_token_id")?,
            id("tokenizer.ggml.eos_token_id")?,
            id("tokenizer.ggml.unknown_token_id")?,
        );
        let add_bos = gguf_bool(gguf, "tokenizer.ggml.add_bos_token")?.unwrap_or(true);
        let add_space_prefix = gguf_bool(gguf, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);

        // The BPE model, with merges derived from the vocabulary.
        let rank: Vec<f64> = match &scores {
            Some(scores) => scores.iter().map(|&s| f64::from(s)).collect(),
            None => (0..tokens.len()).map(|i| -(i as f64)).collect(),
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = derive_merges(&tokens, &vocab, &rank);
        let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
        if let Some(unk) = unk_id {
            bpe = bpe.unk_token(tokens[unk as usize].clone());
        }
        let bpe = bpe.build().map_err(|e| anyhow!("{path}: cannot build the BPE model: {e}"))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        if gemma {
            inner
                .with_normalizer(Some(Replace::new(" ", SPACE.to_string()).map_err(|e| anyhow!("{e}"))?))
                .map_err(|e| anyhow!("{e}"))?;
            inner.with_pre_tokenizer(Some(
                Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
                    .map_err(|e| anyhow!("{e}"))?,
            ));
        } else {
            let scheme = if add_space_prefix { PrependScheme::First } else { PrependScheme::Never };
            inner.with_pre_tokenizer(Some(Metaspace::new(SPACE, scheme, false)));
        }
        let mut decoders = vec![
            DecoderWrapper::Replace(Replace::new(SPACE.to_string(), " ").map_err(|e| anyhow!("{e}"))?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ];
        if !gemma && add_space_prefix {
            decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        inner.with_decoder(Some(DecoderSequence::new(decoders)));

        // Control tokens are special; user-defined ones plain, both matched whole in the raw text.
        // A user-defined token the respelling renamed (Gemma's space runs) is no longer in the
        // vocabulary under its own name and is left to the normalizer and merges, as in transformers.
        let control = (0..tokens.len())
            .filter(|&i| types[i] == TYPE_CONTROL)
            .map(|i| AddedToken::from(tokens[i].clone(), true).normalized(false));
        inner.add_special_tokens(control.collect::<Vec<_>>()).map_err(|e| anyhow!("{path}: {e}"))?;
        let user = (0..tokens.len())
            .filter(|&i| types[i] == TYPE_USER_DEFINED && !respelled[i])
            .map(|i| AddedToken::from(tokens[i].clone(), false).normalized(false));
        inner.add_tokens(user.collect::<Vec<_>>()).map_err(|e| anyhow!("{path}: {e}"))?;

        if add_bos && let Some(bos) = bos_id {
            let bos_token = &tokens[bos as usize];
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos_token} $A"))
                .and_then(|b| b.try_pair(format!("{bos_token} $A {bos_token}:1 $B:1")))
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![(bos_token.clone(), bos)])
                .build()
                .map_err(|e| anyhow!("{path}: cannot build the BOS post-processor: {e}"))?;
            inner.with_post_processor(Some(post));
        }
        Ok(Tokenizer { inner, kind: "gguf", bos_id, eos_id })
    }

    /// Token ids of `text`; with `add_bos`, the special tokens the model adds around a text (BOS
    /// for Gemma when its GGUF asks for it; the tokenizer.json post-processor for HF).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_bos).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The vocabulary's spelling of each id (e.g. `▁the`, `<0x0A>`, `<bos>`).
    pub fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| self.inner.id_to_token(id).unwrap_or_else(|| format!("<invalid id {id}>")))
            .collect()
    }

    /// Every token's text as a reader would see it, row i = token i: the token decoded alone
    /// (`" the"`, `"\n"`), or its vocabulary spelling when alone it is no valid text (a byte of a
    /// multi-byte character) or decodes to nothing.
    pub fn vocab_strings(&self) -> Vec<String> {
        (0..self.vocab_size() as u32)
            .map(|id| match self.inner.decode(&[id], false) {
                Ok(text) if !text.is_empty() && !text.contains('\u{FFFD}') => text,
                _ => self.inner.id_to_token(id).unwrap_or_default(),
            })
            .collect()
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("cannot decode: {e}"))
    }

    /// The id of the token that starts a text (`<bos>`, `[CLS]`), if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The id of the token that ends a text (`<eos>`, `[SEP]`), if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Number of ids, added tokens included (262,144 for Gemma 3).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Where it came from: `"gguf"` (rebuilt from GGUF metadata) or `"hf"` (a tokenizer.json).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A boolean metadata value, `None` when the key is absent.
fn gguf_bool(gguf: &Gguf, key: &str) -> Result<Option<bool>> {
    if !gguf.has(key) {
        return Ok(None);
    }
    match gguf.value(key)? {
        Value::Bool(b) => Ok(Some(*b)),
        v => v.to_u8().map(|x| Some(x != 0)).map_err(|e| anyhow!("{}: {key}: {e}", gguf.path().display())),
    }
}

/// BPE merges implied by a SentencePiece vocabulary, as transformers derives them
/// (`generate_merges`): for every token, each cut into two pieces that are both tokens; ordered by
/// the token's `rank` (higher first), then longer left piece, then longer right piece (lengths in
/// characters), ties kept in vocabulary order.
fn derive_merges(tokens: &[String], vocab: &Vocab, rank: &[f64]) -> Vec<(String, String)> {
    // (token, left piece length in chars, cut in bytes)
    let mut cuts: Vec<(u32, u32, u32)> = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        for (n_left, (cut, _)) in token.char_indices().enumerate().skip(1) {
            if vocab.contains_key(&token[..cut]) && vocab.contains_key(&token[cut..]) {
                cuts.push((i as u32, n_left as u32, cut as u32));
            }
        }
    }
    let chars: Vec<u32> = tokens.iter().map(|t| t.chars().count() as u32).collect();
    // Stable: ties keep vocabulary order. For Gemma the ranks are distinct, so this only orders
    // each token's cuts by left length.
    cuts.sort_by(|a, b| {
        let (ra, rb) = (rank[a.0 as usize], rank[b.0 as usize]);
        rb.total_cmp(&ra)
            .then(b.1.cmp(&a.1))
            .then((chars[b.0 as usize] - b.1).cmp(&(chars[a.0 as usize] - a.1)))
    });
    cuts.into_iter()
        .map(|(i, _, cut)| {
            let t = &tokens[i as usize];
            (t[..cut as usize].to_string(), t[cut as usize..].to_string())
        })
        .collect()
}

/// The first id added before and the last added after a probe text by `inner`'s post-processor.
fn added_around(inner: &tokenizers::Tokenizer) -> Result<(Option<u32>, Option<u32>)> {
    let probe = "a";
    let plain = inner.encode(probe, false).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
    let full = inner.encode(probe, true).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
    let (plain, full) = (plain.get_ids(), full.get_ids());
    if plain.is_empty() || full.len() <= plain.len() {
        return Ok((None, None));
    }
    let Some(at) = full.windows(plain.len()).position(|w| w == plain) else { return Ok((None, None)) };
    Ok((full[..at].first().copied(), full[at + plain.len()..].last().copied()))
}
