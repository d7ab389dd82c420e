//! The prompt lab's model work, no UI: load the store's model ([`Session`]) and a dictionary once,
//! run a prompt (each token's top features, the next-token distribution), and steer (add a
//! feature's decoder direction at its hook with [`loupe_dict::steer`] and compare next-token
//! distributions). Runs inside background jobs; the loaded model is shared behind a mutex so one
//! prompt runs at a time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use candle_core::{D, Device, IndexOp, Tensor};
use loupe_dict::steer::Steering;
use loupe_dict::{self as dict, Dictionary};
use loupe_model::Session;
use loupe_model::hooks::{Hooks, Shape};
use loupe_store::Store;

use super::jobs::Progress;

/// Features listed per token.
pub const TOP_FEATURES: usize = 8;
/// Next tokens listed.
pub const TOP_TOKENS: usize = 10;
/// Longest prompt the lab runs (tokens).
pub const MAX_PROMPT_TOKENS: usize = 512;

struct LoadedDict {
    name: String,
    hook: String,
    dictionary: Box<dyn Dictionary>,
}

struct Loaded {
    session: Session,
    dict: Option<LoadedDict>,
}

/// The model and dictionary, loaded on first use and kept for later prompts.
#[derive(Clone, Default)]
pub struct Lab {
    loaded: Arc<Mutex<Option<Loaded>>>,
}

/// One prompt's run.
pub struct Run {
    pub dict: String,
    pub ids: Vec<u32>,
    /// Per token: its top features `(feature, activation)`, largest first.
    pub top: Vec<Vec<(u32, f32)>>,
    /// Per token: every active feature (for colouring by one feature).
    pub active: Vec<Vec<(u32, f32)>>,
    /// The most likely next tokens after the prompt `(token id, probability)`.
    pub next: Vec<(u32, f32)>,
    /// The whole next-token distribution (what steering compares with).
    probs: Vec<f32>,
    /// Mean L2 norm of the activation at the hook over the prompt's tokens (the unit of steering
    /// strength).
    pub norm: f32,
}

/// One steering of the last prompt.
pub struct Steer {
    pub feature: u32,
    pub strength: f32,
    /// The coefficient added along the unit decoder direction (strength × norm).
    pub coefficient: f32,
    /// `(token id, probability before, probability after)`, by the largest after.
    pub next: Vec<(u32, f32, f32)>,
}

fn probs_last(logits: &Tensor) -> Result<Vec<f32>> {
    let seq = logits.dim(1)?;
    Ok(candle_nn::ops::softmax(&logits.i((0, seq - 1))?, D::Minus1)?.to_vec1()?)
}

fn top_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| values[b as usize].total_cmp(&values[a as usize]));
    order.truncate(k);
    order.sort_by(|&a, &b| values[b as usize].total_cmp(&values[a as usize]));
    order
}

impl Lab {
    /// Make sure the store's model (or `model_path`) is loaded, loading it when it is not.
    fn session<'a>(
        slot: &'a mut Option<Loaded>,
        store: &Store,
        model_path: Option<&PathBuf>,
        progress: &Progress,
    ) -> Result<&'a mut Loaded> {
        let remedy = Some("start the app with --model to run prompts");
        let path = Session::require(&store.manifest(), model_path.map(PathBuf::as_path), remedy)?;
        if slot.as_ref().is_none_or(|l| l.session.path() != path) {
            progress.stage(format!("loading the model {}", path.display()));
            let session = Session::load(&path)?;
            session.tokenizer()?;
            *slot = Some(Loaded { session, dict: None });
        }
        Ok(slot.as_mut().expect("loaded above"))
    }

    /// Make sure `dict`'s model and dictionary are loaded, loading what is missing.
    fn ensure<'a>(
        slot: &'a mut Option<Loaded>,
        store: &Store,
        model_path: Option<&PathBuf>,
        dict: &str,
        progress: &Progress,
    ) -> Result<(&'a Session, &'a LoadedDict)> {
        let l = Self::session(slot, store, model_path, progress)?;
        if l.dict.as_ref().is_none_or(|d| d.name != dict) {
            progress.stage(format!("loading the dictionary {dict}"));
            let (entry, dictionary) = dict::open_in_store(store, dict)?;
            l.dict = Some(LoadedDict { name: dict.into(), hook: entry.hook, dictionary });
        }
        let (session, d) = (&l.session, l.dict.as_ref().expect("loaded above"));
        let model = session.model();
        let shape = model.hook_list().points(model.config().n_layers).into_iter().find(|p| p.0 == d.hook);
        // The width of one position's activation at the hook (per-head hooks: heads concatenated).
        let width: usize = match shape {
            Some((_, shape)) => shape.dims(model.config(), 1, 1)[2..].iter().product(),
            None => bail!("dictionary {dict} reads {}, which the model does not have", d.hook),
        };
        if d.dictionary.d_in() != width {
            let what = if matches!(shape, Some((_, Shape::Model))) {
                "residual stream".to_string()
            } else {
                d.hook.clone()
            };
            bail!(
                "dictionary {dict} reads width {} but the model's {what} is {width} wide",
                d.dictionary.d_in()
            );
        }
        Ok((session, d))
    }

    /// Run `f` with the store's model (or `model_path`), loading it first if needed (the prompt
    /// lab's model, kept for both).
    pub fn with_session<T>(
        &self,
        store: &Store,
        model_path: Option<&PathBuf>,
        p: &Progress,
        f: impl FnOnce(&Session) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let l = Self::session(&mut guard, store, model_path, p)?;
        f(&l.session)
    }

    /// Run `text` through the model with dictionary `dict` reading its hook.
    pub fn run(
        &self,
        store: &Store,
        model_path: Option<&PathBuf>,
        dict: &str,
        text: &str,
        p: &Progress,
    ) -> Result<Run> {
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let (session, l) = Self::ensure(&mut guard, store, model_path, dict, p)?;
        p.stage("running the prompt");
        let ids = session.tokenizer()?.encode(text, true)?;
        if ids.is_empty() {
            bail!("the prompt is empty");
        }
        let limit = MAX_PROMPT_TOKENS.min(session.model().config().max_context);
        if ids.len() > limit {
            bail!("the prompt has {} tokens; the lab runs at most {limit}", ids.len());
        }
        let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu)?;
        let mut hooks = Hooks::new().capture(l.hook.clone());
        let logits = session
            .model()
            .forward(&input, &mut hooks)?
            .ok_or_else(|| anyhow!("the model gave no logits"))?;
        // Per-head hooks (`attn.hook_z`) are read with their heads concatenated, as captured.
        let acts = hooks.get(&l.hook)?.i(0)?.flatten_from(1)?.to_dtype(candle_core::DType::F32)?;
        let rows: Vec<Vec<f32>> = acts.to_vec2()?;
        let norm =
            rows.iter().map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).sum::<f32>() / rows.len() as f32;
        let flat: Vec<f32> = rows.concat();
        let codes = l.dictionary.encode(&flat);
        let mut active = Vec::with_capacity(ids.len());
        for t in 0..codes.tokens() {
            let (a, b) = (codes.offsets[t] as usize, codes.offsets[t + 1] as usize);
            let mut list: Vec<(u32, f32)> = codes.feature[a..b]
                .iter()
                .copied()
                .zip(codes.value[a..b].iter().copied())
                .filter(|x| x.1 != 0.0)
                .collect();
            list.sort_by(|x, y| y.1.total_cmp(&x.1));
            active.push(list);
        }
        let top = active.iter().map(|l| l.iter().take(TOP_FEATURES).copied().collect()).collect();
        let probs = probs_last(&logits)?;
        let next = top_indices(&probs, TOP_TOKENS).into_iter().map(|t| (t, probs[t as usize])).collect();
        Ok(Run { dict: dict.into(), ids, top, active, next, probs, norm })
    }

    /// Steer `run`'s prompt with feature `f`'s decoder direction × `strength` × the prompt's norm
    /// at the hook, added at every position.
    pub fn steer(
        &self,
        store: &Store,
        model_path: Option<&PathBuf>,
        run: &Run,
        f: u32,
        strength: f32,
        p: &Progress,
    ) -> Result<Steer> {
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let (session, l) = Self::ensure(&mut guard, store, model_path, &run.dict, p)?;
        p.stage(format!("steering with feature {f}"));
        let steering = Steering { dictionary: l.dictionary.as_ref(), name: &run.dict, hook: &l.hook };
        let coefficient = strength * run.norm;
        let input = Tensor::from_slice(&run.ids, (1, run.ids.len()), &Device::Cpu)?;
        let logits = steering.logits(session.model(), &input, f, coefficient)?;
        let after = probs_last(&logits)?;
        let mut tokens = top_indices(&after, TOP_TOKENS);
        tokens.extend(run.next.iter().map(|n| n.0).filter(|t| !tokens.contains(t)).collect::<Vec<_>>());
        let next = tokens.into_iter().map(|t| (t, run.probs[t as usize], after[t as usize])).collect();
        Ok(Steer { feature: f, strength, coefficient, next })
    }
}
