//! Capture: corpus → tokens → contexts → activations (and loss gradients) at hook points → store.
//!
//! Each document is tokenized on its own and cut into contexts of `context` tokens (a BOS token
//! first when `bos`), advancing `stride` tokens at a time; when contexts overlap, only the tokens a
//! context adds are stored. Rows are `doc` (document id), `pos` (token position in the document,
//! BOS not counted) and `token`. The BOS position is never stored: its activations are outliers
//! (|x| reaches 6.6e4 in Gemma 3's residual stream) that SAE training must not see.
//!
//! With `grads`, each row also holds ∂L/∂x where L is the context's summed next-token
//! cross-entropy (a sum, so the value does not depend on the batch size), computed by
//! [`crate::loss_gradients`] without materialising the batch's logits.
//!
//! Resume: the settings and the position reached (next document and context) are stored in the
//! manifest's `capture` field ([`loupe_store::CaptureState`], the one struct every reader of the
//! settings uses), committed atomically with the shards of every hook. Restarted with
//! the same settings, a capture continues after the last commit and ends with the same store as an
//! uninterrupted run (batches and shard boundaries fall at the same contexts). The corpus is part
//! of the key by its contents (xxh3-128, [`Corpus::xxh3`]), so an edit that keeps every size is
//! still noticed; a store written before the hash was recorded resumes on the other settings.
//!
//! With `max_tokens`, a document is read only up to [`doc_byte_cap`] bytes (far more than the
//! run can use), so one huge document costs memory in proportion to what is captured from it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use loupe_store::{
    CaptureSettings, CaptureState, DType, HookSpec, ModelInfo, Progress, Store, TokenizerInfo,
};
use sha2::{Digest, Sha256};

use crate::corpus::{Corpus, Skipped};
use crate::tokenizer::Tokenizer;
use crate::{HookedModel, Hooks, loss_gradients};

/// What to capture. Every field except `store` is part of the resume key.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub model: PathBuf,
    pub corpus: PathBuf,
    pub store: PathBuf,
    pub hooks: Vec<String>,
    /// Tokens per context, BOS included.
    pub context: usize,
    /// Tokens between context starts (default: no overlap).
    pub stride: Option<usize>,
    pub bos: bool,
    pub dtype: DType,
    pub grads: bool,
    /// Contexts per forward pass.
    pub batch: usize,
    /// Rows per shard (default: ~128 MiB shards).
    pub shard_rows: Option<usize>,
    /// Stop after about this many stored tokens (at a batch boundary).
    pub max_tokens: Option<u64>,
}

/// What a capture did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub tokens: u64,
    pub contexts: u64,
    /// Tokens already in the store when this run started (resumed), if any.
    pub resumed_at: Option<u64>,
    pub already_complete: bool,
    pub skipped: Skipped,
    pub seconds: f64,
}

/// One context: its tokens (BOS first when asked) and which of them to store.
struct Ctx {
    doc: u32,
    index: u32,
    tokens: Vec<u32>,
    /// Document position of `tokens[offset]` (the first non-BOS token).
    start: u32,
    /// First index into `tokens` whose row is stored.
    first_new: usize,
}

/// Run (or resume) a capture. `progress` follows the corpus bytes read (stage "capturing"), with
/// the tokens stored and their rate as its message.
pub fn capture(cfg: &CaptureConfig, progress: &dyn Progress) -> Result<Report> {
    let started = Instant::now();
    if cfg.hooks.is_empty() {
        bail!("capture: name at least one hook");
    }
    if cfg.batch == 0 {
        bail!("capture: --batch must be at least 1");
    }
    if cfg.max_tokens == Some(0) {
        bail!("capture: --max-tokens 0 would capture nothing; give at least 1 (or leave it out)");
    }
    if cfg.shard_rows == Some(0) {
        bail!("capture: --shard-rows must be at least 1");
    }
    let corpus = Corpus::open(&cfg.corpus)?;
    let model = crate::load(&cfg.model)?;
    let tokenizer = Tokenizer::load(&cfg.model)?;
    let mc = model.config().clone();
    if cfg.context > mc.max_context {
        bail!("context length {} exceeds the model's limit of {} tokens", cfg.context, mc.max_context);
    }
    let offset = usize::from(cfg.bos);
    if cfg.context < 2 + offset {
        bail!("context length {} is too short (at least {} with BOS)", cfg.context, 2 + offset);
    }
    let window = cfg.context - offset;
    let stride = cfg.stride.unwrap_or(window);
    if stride == 0 || stride > window {
        bail!("stride {stride} must be between 1 and {window} (the tokens of a context after BOS)");
    }
    if cfg.grads && !mc.causal {
        bail!("--with-grads needs a causal language model; {} has no next-token loss", mc.architecture);
    }
    let bos_id = if cfg.bos {
        Some(tokenizer.bos_id().context("the tokenizer has no BOS token; capture with bos off")?)
    } else {
        None
    };
    Hooks::new().validate(&model.hook_names())?;
    for hook in &cfg.hooks {
        Hooks::new().capture(hook.as_str()).validate(&model.hook_names())?;
        if hook.ends_with("hook_pattern") {
            bail!("{hook} holds one value per pair of tokens; capture stores per-token activations");
        }
    }
    let widths = hook_widths(model.as_ref(), &cfg.hooks, bos_id.unwrap_or(0))?;
    let row_bytes =
        widths.iter().max().copied().unwrap_or(1) * cfg.dtype.size() * if cfg.grads { 2 } else { 1 };
    let shard_rows = cfg.shard_rows.unwrap_or((loupe_store::writer::DEFAULT_SHARD_BYTES / row_bytes).max(1));
    let doc_cap = cfg.max_tokens.map(|m| doc_byte_cap(m, cfg.batch, cfg.context));
    check_has_text(&corpus, &cfg.corpus, &tokenizer)?;

    let model_sha256 = sha256_of_model(&cfg.model)?;
    let settings = CaptureSettings {
        model_sha256: model_sha256.clone(),
        corpus: cfg.corpus.display().to_string(),
        corpus_files: corpus.files().len(),
        corpus_bytes: corpus.bytes(),
        corpus_xxh3: Some(corpus.xxh3()?),
        hooks: cfg.hooks.clone(),
        context: cfg.context,
        stride,
        bos: cfg.bos,
        dtype: cfg.dtype,
        grads: cfg.grads,
        batch: cfg.batch,
        shard_rows,
        max_tokens: cfg.max_tokens,
    };

    let store = Store::create(&cfg.store)?;
    let manifest = store.manifest();
    let mut state = match manifest.capture_state()? {
        Some(old) => {
            if let (Some(stored), Some(now)) = (&old.settings.corpus_xxh3, &settings.corpus_xxh3)
                && stored != now
            {
                bail!(
                    "store {} holds a capture of other corpus contents: {} changed since it began \
                     (xxh3 {stored}, now {now}); resuming would mix two corpora, so use a new store",
                    cfg.store.display(),
                    cfg.corpus.display()
                );
            }
            // A store from before the hash was recorded resumes as it did then.
            let settings = CaptureSettings { corpus_xxh3: old.settings.corpus_xxh3.clone(), ..settings };
            if old.settings != settings {
                bail!(
                    "store {} holds a capture with other settings ({}); use a new store or the same arguments",
                    cfg.store.display(),
                    settings_diff(&old.settings, &settings)
                );
            }
            if old.complete {
                return Ok(Report {
                    tokens: old.tokens,
                    contexts: old.contexts,
                    already_complete: true,
                    ..Report::default()
                });
            }
            old
        }
        None => {
            if let Some(hook) = cfg.hooks.iter().find(|h| manifest.hooks.contains_key(*h)) {
                bail!(
                    "store {} already holds activations for {hook} from another capture",
                    cfg.store.display()
                );
            }
            CaptureState { settings, next_doc: 0, next_context: 0, contexts: 0, tokens: 0, complete: false }
        }
    };
    let resumed_at = (state.tokens > 0).then_some(state.tokens);
    store.set_model(
        ModelInfo {
            name: model_name(&cfg.model),
            architecture: mc.architecture.clone(),
            path: cfg.model.display().to_string(),
            sha256: model_sha256,
        },
        Some(TokenizerInfo {
            kind: tokenizer.kind().to_string(),
            vocab_size: tokenizer.vocab_size() as u32,
            bos: tokenizer.bos_id(),
            eos: tokenizer.eos_id(),
        }),
    )?;
    let mut writers = Vec::new();
    for (hook, &d) in cfg.hooks.iter().zip(&widths) {
        let spec = HookSpec { d: d as u32, dtype: cfg.dtype, grad: cfg.grads };
        writers.push(store.activation_writer(hook, spec)?.with_shard_rows(usize::MAX));
    }

    let mut run = Runner {
        model: model.as_ref(),
        cfg,
        writers,
        batch: Vec::new(),
        tokens: state.tokens,
        contexts: state.contexts,
        started: Instant::now(),
        tokens_at_start: state.tokens,
    };
    let total_bytes = corpus.bytes();
    let (first_doc, first_context) = (state.next_doc, state.next_context);
    let mut bytes_done = 0;
    progress.stage("capturing");
    let skipped = corpus.for_each(first_doc, doc_cap, |doc, bytes| {
        bytes_done = bytes;
        let ids =
            tokenizer.encode(&doc.text, false).with_context(|| format!("cannot tokenize {}", doc.source))?;
        let mut index = 0u32;
        let mut start = 0usize;
        while start < ids.len() {
            let end = (start + window).min(ids.len());
            if !(doc.id == first_doc && index < first_context) {
                let mut tokens = Vec::with_capacity(end - start + offset);
                tokens.extend(bos_id);
                tokens.extend_from_slice(&ids[start..end]);
                let first_new = if index == 0 { offset } else { offset + (window - stride) };
                let ctx = Ctx { doc: doc.id, index, tokens, start: start as u32, first_new };
                if ctx.tokens.len() < cfg.context {
                    run.flush_batch()?; // keep row order: short contexts run alone
                    run.batch.push(ctx);
                    run.flush_batch()?;
                } else {
                    run.batch.push(ctx);
                    if run.batch.len() == cfg.batch {
                        run.flush_batch()?;
                    }
                }
                if run.batch.is_empty() {
                    // A batch ended exactly here: the next context is the resume point.
                    let (next_doc, next_context) =
                        if end == ids.len() { (doc.id + 1, 0) } else { (doc.id, index + 1) };
                    if run.writers[0].pending_rows() >= shard_rows {
                        run.commit(&store, &mut state, next_doc, next_context, false)?;
                    }
                    let done = cfg.max_tokens.is_some_and(|m| run.tokens >= m);
                    progress.set(bytes_done, total_bytes.max(1));
                    progress.message(&format!("{} tokens, {:.0} tokens/s", run.tokens, run.rate()));
                    if done {
                        state.next_doc = next_doc;
                        state.next_context = next_context;
                        return Ok(false);
                    }
                }
            }
            if end == ids.len() {
                break;
            }
            start += stride;
            index += 1;
        }
        Ok(true)
    })?;
    run.flush_batch()?;
    let (next_doc, next_context) = (state.next_doc, state.next_context);
    run.commit(&store, &mut state, next_doc, next_context, true)?;
    Ok(Report {
        tokens: run.tokens,
        contexts: run.contexts,
        resumed_at,
        already_complete: false,
        skipped,
        seconds: started.elapsed().as_secs_f64(),
    })
}

struct Runner<'a, 's> {
    model: &'a dyn HookedModel,
    cfg: &'a CaptureConfig,
    writers: Vec<loupe_store::ActivationWriter<'s>>,
    batch: Vec<Ctx>,
    tokens: u64,
    contexts: u64,
    started: Instant,
    tokens_at_start: u64,
}

impl Runner<'_, '_> {
    fn rate(&self) -> f64 {
        (self.tokens - self.tokens_at_start) as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Run the model on the buffered contexts (all of one length) and append their rows.
    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let (b, len) = (self.batch.len(), self.batch[0].tokens.len());
        let flat: Vec<u32> = self.batch.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let tokens = Tensor::from_vec(flat, (b, len), &Device::Cpu)?;
        let mut hooks = Hooks::new();
        for hook in &self.cfg.hooks {
            hooks = if self.cfg.grads { hooks.grad(hook.as_str()) } else { hooks.capture(hook.as_str()) };
        }
        let grads = if self.cfg.grads {
            Some(loss_gradients(self.model, &tokens, &mut hooks)?.1)
        } else {
            if let Some(layer) = last_layer(&self.cfg.hooks) {
                hooks = hooks.stop_after_layer(layer);
            }
            self.model.forward(&tokens, &mut hooks)?;
            None
        };
        for (w, hook) in self.cfg.hooks.iter().enumerate() {
            let act = hooks.get(hook)?;
            let d = self.writers[w].spec().d as usize;
            let act: Vec<f32> = act.reshape((b * len * d,))?.to_vec1()?;
            let grad: Option<Vec<f32>> = match &grads {
                Some(g) => {
                    let var = hooks.var(hook).context("gradient target missing")?;
                    let g =
                        g.get(var.as_tensor()).map(|t| t.reshape((b * len * d,))?.to_vec1()).transpose()?;
                    Some(g.unwrap_or_else(|| vec![0.0; b * len * d]))
                }
                None => None,
            };
            for (i, ctx) in self.batch.iter().enumerate() {
                let rows = ctx.first_new..len;
                let offset = usize::from(self.cfg.bos);
                let pos: Vec<u32> = rows.clone().map(|j| ctx.start + (j - offset) as u32).collect();
                let doc = vec![ctx.doc; rows.len()];
                let range = (i * len + rows.start) * d..(i * len + rows.end) * d;
                let g = grad.as_ref().map(|g| &g[range.clone()]);
                self.writers[w]
                    .append(&doc, &pos, &ctx.tokens[rows.clone()], &act[range], g)
                    .with_context(|| format!("document {} context {}", ctx.doc, ctx.index))?;
            }
        }
        self.tokens += self.batch.iter().map(|c| (c.tokens.len() - c.first_new) as u64).sum::<u64>();
        self.contexts += b as u64;
        self.batch.clear();
        Ok(())
    }

    /// Write every hook's pending rows and list them, with the resume point, in one commit.
    fn commit(
        &mut self,
        store: &Store,
        state: &mut CaptureState,
        next_doc: u32,
        next_context: u32,
        complete: bool,
    ) -> Result<()> {
        let mut shards = Vec::new();
        for w in &mut self.writers {
            shards.extend(w.write_pending()?);
        }
        state.next_doc = next_doc;
        state.next_context = next_context;
        state.tokens = self.tokens;
        state.contexts = self.contexts;
        state.complete = complete;
        let value = serde_json::to_value(&*state)?;
        store.commit_shards(shards, |m| {
            m.capture = Some(value);
            Ok(())
        })
    }
}

/// Bytes of a document read when a run stores at most `max_tokens` (plus one batch): 32 bytes for
/// each token the run could need from one document (Gemma's tokenizer averages about 4 bytes a
/// token on prose). Fixed by the settings, so a resumed run reads the same text.
fn doc_byte_cap(max_tokens: u64, batch: usize, context: usize) -> u64 {
    max_tokens.saturating_add(((batch + 1) * context) as u64).saturating_mul(32)
}

/// Refuse a corpus with no document that has a token: empty, or nothing but files that are not
/// UTF-8 text (named). Reads up to the first document with text (its first 64 KiB at most; a
/// text with a visible character has a token, only whitespace is tokenized to see).
fn check_has_text(corpus: &Corpus, path: &Path, tokenizer: &Tokenizer) -> Result<()> {
    let mut found = false;
    let mut documents = 0u64;
    let skipped = corpus.for_each(0, Some(1 << 16), |doc, _| {
        documents += 1;
        found = doc.text.chars().any(|c| !c.is_whitespace())
            || !tokenizer
                .encode(&doc.text, false)
                .with_context(|| format!("cannot tokenize {}", doc.source))?
                .is_empty();
        Ok(!found)
    })?;
    if found {
        return Ok(());
    }
    match skipped.first {
        Some(first) if documents == 0 => {
            let more = match skipped.invalid_utf8 {
                1 => String::new(),
                n => format!(" (and {} more like it)", n - 1),
            };
            bail!("corpus {} holds no text to capture: {first} is not UTF-8 text{more}", path.display())
        }
        _ => bail!("corpus {} is empty: none of its documents holds any text", path.display()),
    }
}

/// The highest block any hook needs (None when a hook is after the last block).
fn last_layer(hooks: &[String]) -> Option<usize> {
    let mut last = 0;
    for hook in hooks {
        let layer = hook.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok()?;
        last = last.max(layer);
    }
    Some(last)
}

/// Width of one row at each hook (product of the dims after [batch, pos]), from a 2-token run.
fn hook_widths(model: &dyn HookedModel, hooks: &[String], token: u32) -> Result<Vec<usize>> {
    let tokens = Tensor::from_vec(vec![token, token], (1, 2), &Device::Cpu)?;
    let mut h = hooks.iter().fold(Hooks::new(), |h, name| h.capture(name.as_str()));
    if let Some(layer) = last_layer(hooks) {
        h = h.stop_after_layer(layer);
    }
    model.forward(&tokens, &mut h)?;
    hooks.iter().map(|name| Ok(h.get(name)?.dims()[2..].iter().product())).collect()
}

/// sha256 of the weights file (the GGUF, or an HF directory's model.safetensors).
pub fn sha256_of_model(path: &Path) -> Result<String> {
    let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
    let mut f = std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn model_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

fn settings_diff(old: &CaptureSettings, new: &CaptureSettings) -> String {
    let (a, b) =
        (serde_json::to_value(old).unwrap_or_default(), serde_json::to_value(new).unwrap_or_default());
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, va) in a {
            if b.get(k) != Some(va) {
                out.push(format!("{k}: stored {va}, asked {}", b.get(k).cloned().unwrap_or_default()));
            }
        }
    }
    out.join("; ")
}
