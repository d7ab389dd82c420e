//! BERT (encoder, post-LayerNorm) with hook points, from an HF directory (`config.json` +
//! `model.safetensors`, tensor names with or without the `bert.` prefix), e.g. all-MiniLM-L6-v2.
//! Also the sentence embedding of sentence-transformers' mean-pooling models.
//!
//! Embeddings: LayerNorm(word + position + token type 0) (token type ids are all zero). Per block:
//! attention (biased Q/K/V, scores scaled by d_head^-0.5, padded keys masked) → output dense → add
//! to the block input → LayerNorm; MLP (intermediate dense, exact erf GELU, output dense) → add →
//! LayerNorm. The forward pass returns the last hidden state `[batch, seq, d_model]`.
//!
//! Hooks: [`HOOKS`], each with where it sits. The residual stream is post-norm, so each residual
//! hook holds a LayerNorm output and there are no `ln*.hook_normalized` hooks.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};

use super::hooks::{self, HookList, HookPoint, Shape, names::*};
use super::ops::{Activation, Attention, LayerNorm, linear};
use super::{HookedModel, Hooks, ModelConfig};

/// BERT's hook points (TransformerLens names), in forward order.
pub static HOOKS: HookList = HookList {
    first: &[
        // Word embeddings.
        HookPoint { name: EMBED, shape: Shape::Model },
        // Position embeddings.
        HookPoint { name: POS_EMBED, shape: Shape::Model },
    ],
    block: &[
        // The block's input (for block 0, the normalized embedding sum).
        HookPoint { name: RESID_PRE, shape: Shape::Model },
        // With biases.
        HookPoint { name: Q, shape: Shape::Heads },
        HookPoint { name: K, shape: Shape::Heads },
        HookPoint { name: V, shape: Shape::Heads },
        HookPoint { name: PATTERN, shape: Shape::Pattern },
        HookPoint { name: Z, shape: Shape::Heads },
        // Per-head output, before the output bias.
        HookPoint { name: RESULT, shape: Shape::HeadResults },
        // The attention output dense with its bias, before the residual add.
        HookPoint { name: ATTN_OUT, shape: Shape::Model },
        // LayerNorm(resid_pre + attn_out).
        HookPoint { name: RESID_MID, shape: Shape::Model },
        // The intermediate dense.
        HookPoint { name: MLP_PRE, shape: Shape::Mlp },
        // After GELU.
        HookPoint { name: MLP_POST, shape: Shape::Mlp },
        // The output dense with its bias, before the residual add.
        HookPoint { name: MLP_OUT, shape: Shape::Model },
        // LayerNorm(resid_mid + mlp_out), the block's output.
        HookPoint { name: RESID_POST, shape: Shape::Model },
    ],
    last: &[],
};

/// Sequences per forward pass in [`Bert::mean_pooled_embedding`].
const EMBED_BATCH: usize = 32;

/// BERT hyper-parameters beyond [`ModelConfig`].
#[derive(Clone, Debug)]
pub struct BertConfig {
    pub base: ModelConfig,
    pub ln_eps: f64,
    pub activation: Activation,
}

struct Block {
    attn: Attention,
    attn_ln: LayerNorm,
    fc: Tensor,
    fc_bias: Tensor,
    proj: Tensor,
    proj_bias: Tensor,
    mlp_ln: LayerNorm,
}

pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    /// Token type 0's embedding `[d_model]`.
    token_type: Tensor,
    embed_ln: LayerNorm,
    blocks: Vec<Block>,
}

impl Bert {
    pub fn config_full(&self) -> &BertConfig {
        &self.cfg
    }

    /// Load from an HF directory whose `config.json` (already parsed) has model_type `bert`.
    pub fn from_hf_dir(dir: &Path, config: &serde_json::Value) -> Result<Bert> {
        let device = Device::Cpu;
        let num = |k: &str| config.get(k).and_then(|v| v.as_f64());
        let need = |k: &str| num(k).with_context(|| format!("{}: config.json has no {k}", dir.display()));
        let n_layers = need("num_hidden_layers")? as usize;
        let d_model = need("hidden_size")? as usize;
        let n_heads = need("num_attention_heads")? as usize;
        if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
            bail!(
                "{}: hidden_size {d_model} is not a multiple of num_attention_heads {n_heads}",
                dir.display()
            );
        }
        let act = config.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("gelu");
        let activation = Activation::from_hf(act).with_context(|| format!("{}", dir.display()))?;
        let pos_type = config.get("position_embedding_type").and_then(|v| v.as_str()).unwrap_or("absolute");
        if pos_type != "absolute" {
            bail!(
                "{}: position_embedding_type {pos_type:?} is not supported (only \"absolute\")",
                dir.display()
            );
        }

        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &device)
            .with_context(|| format!("cannot read {} (truncated or not safetensors?)", path.display()))?;
        let prefix =
            if tensors.contains_key("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let get = |name: &str| -> Result<Tensor> {
            let full = format!("{prefix}{name}");
            let t = tensors.get(&full).with_context(|| format!("{}: no tensor {full}", path.display()))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let ln_eps = num("layer_norm_eps").unwrap_or(1e-12);
        // Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
        let ln = |name: &str| -> Result<LayerNorm> {
            let has = |s: &str| tensors.contains_key(&format!("{prefix}{name}.{s}"));
            let (w, b) = if !has("weight") && has("gamma") { ("gamma", "beta") } else { ("weight", "bias") };
            Ok(LayerNorm {
                weight: get(&format!("{name}.{w}"))?,
                bias: get(&format!("{name}.{b}"))?,
                eps: ln_eps,
            })
        };
        let word = get("embeddings.word_embeddings.weight")?;
        let position = get("embeddings.position_embeddings.weight")?;
        let token_type = get("embeddings.token_type_embeddings.weight")?.get(0)?;
        let embed_ln = ln("embeddings.LayerNorm")?;
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = |s: &str| format!("encoder.layer.{i}.{s}");
            blocks.push(Block {
                attn: Attention {
                    q: get(&p("attention.self.query.weight"))?,
                    q_bias: get(&p("attention.self.query.bias"))?,
                    k: get(&p("attention.self.key.weight"))?,
                    k_bias: get(&p("attention.self.key.bias"))?,
                    v: get(&p("attention.self.value.weight"))?,
                    v_bias: get(&p("attention.self.value.bias"))?,
                    o: get(&p("attention.output.dense.weight"))?,
                    o_bias: get(&p("attention.output.dense.bias"))?,
                },
                attn_ln: ln(&p("attention.output.LayerNorm"))?,
                fc: get(&p("intermediate.dense.weight"))?,
                fc_bias: get(&p("intermediate.dense.bias"))?,
                proj: get(&p("output.dense.weight"))?,
                proj_bias: get(&p("output.dense.bias"))?,
                mlp_ln: ln(&p("output.LayerNorm"))?,
            });
        }
        let cfg = BertConfig {
            base: ModelConfig {
                architecture: "bert".into(),
                n_layers,
                d_model,
                n_heads,
                n_kv_heads: n_heads,
                d_head: d_model / n_heads,
                d_mlp: need("intermediate_size")? as usize,
                vocab_size: word.dim(0)?,
                max_context: position.dim(0)?,
                causal: false,
                n_experts: 0,
                experts_per_token: 0,
            },
            ln_eps,
            activation,
        };
        let model = Bert { cfg, word, position, token_type, embed_ln, blocks };
        model.check_shapes().with_context(|| format!("{}: unexpected BERT weights", dir.display()))?;
        Ok(model)
    }

    fn check_shapes(&self) -> Result<()> {
        let c = &self.cfg.base;
        let expect = |t: &Tensor, shape: &[usize], what: &str| -> Result<()> {
            if t.dims() != shape {
                bail!("{what} has shape {:?}, expected {shape:?}", t.dims());
            }
            Ok(())
        };
        expect(&self.word, &[c.vocab_size, c.d_model], "word embeddings")?;
        expect(&self.position, &[c.max_context, c.d_model], "position embeddings")?;
        expect(&self.token_type, &[c.d_model], "token type embeddings")?;
        expect(&self.embed_ln.weight, &[c.d_model], "embeddings LayerNorm")?;
        for (i, b) in self.blocks.iter().enumerate() {
            let w = |s: &str| format!("block {i} {s}");
            for (t, s) in
                [(&b.attn.q, "query"), (&b.attn.k, "key"), (&b.attn.v, "value"), (&b.attn.o, "output")]
            {
                expect(t, &[c.d_model, c.d_model], &w(s))?;
            }
            expect(&b.fc, &[c.d_mlp, c.d_model], &w("intermediate.dense"))?;
            expect(&b.fc_bias, &[c.d_mlp], &w("intermediate.dense bias"))?;
            expect(&b.proj, &[c.d_model, c.d_mlp], &w("output.dense"))?;
            expect(&b.attn_ln.weight, &[c.d_model], &w("attention LayerNorm"))?;
            expect(&b.mlp_ln.weight, &[c.d_model], &w("output LayerNorm"))?;
        }
        Ok(())
    }

    /// [`HookedModel::forward`] for a padded batch: `mask` `[batch, seq]` is 1 at real tokens and 0
    /// at padding, which no position attends to (padded positions still get outputs; ignore them).
    pub fn forward_masked(
        &self,
        tokens: &Tensor,
        mask: &Tensor,
        hooks: &mut Hooks,
    ) -> Result<Option<Tensor>> {
        if mask.dims() != tokens.dims() {
            bail!("attention mask has shape {:?}, the tokens have {:?}", mask.dims(), tokens.dims());
        }
        // As transformers does: add the most negative f32 to the scores of padded keys.
        let (batch, seq) = tokens.dims2()?;
        let additive =
            ((mask.to_dtype(DType::F32)? - 1.0)? * f32::MAX as f64)?.reshape((batch, 1, 1, seq))?;
        self.run(tokens, &additive, hooks)
    }

    /// Sentence embeddings as sentence-transformers computes them for mean-pooling models such as
    /// all-MiniLM-L6-v2: the last hidden state averaged over each sequence's tokens, then
    /// L2-normalized. `ids` are complete token sequences (`[CLS] … [SEP]`, already truncated to the
    /// model's limit); they are batched by length, padded and masked.
    pub fn mean_pooled_embedding(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if let Some(i) = ids.iter().position(|s| s.is_empty()) {
            bail!("sequence {i} has no tokens");
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        let device = Device::Cpu;
        for chunk in order.chunks(EMBED_BATCH) {
            let seq = chunk.iter().map(|&i| ids[i].len()).max().unwrap_or(0);
            let mut flat = Vec::with_capacity(chunk.len() * seq);
            let mut keep = Vec::with_capacity(chunk.len() * seq);
            for &i in chunk {
                let n = ids[i].len();
                flat.extend_from_slice(&ids[i]);
                flat.extend(std::iter::repeat_n(0u32, seq - n));
                keep.extend((0..seq).map(|p| if p < n { 1f32 } else { 0.0 }));
            }
            let tokens = Tensor::from_vec(flat, (chunk.len(), seq), &device)?;
            let mask = Tensor::from_vec(keep, (chunk.len(), seq), &device)?;
            let hidden =
                self.forward_masked(&tokens, &mask, &mut Hooks::new())?.context("forward stopped early")?;
            let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
            let pooled = summed.broadcast_div(&mask.sum_keepdim(1)?)?;
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
            let rows: Vec<Vec<f32>> = pooled.broadcast_div(&norm)?.to_vec2()?;
            for (&i, row) in chunk.iter().zip(rows) {
                out[i] = row;
            }
        }
        Ok(out)
    }

    /// The forward pass with an additive attention mask (broadcast to `[batch, head, query, key]`).
    fn run(&self, tokens: &Tensor, mask: &Tensor, hooks: &mut Hooks) -> Result<Option<Tensor>> {
        let c = &self.cfg.base;
        let (batch, seq) = tokens.dims2()?;
        if seq > c.max_context {
            bail!("context of {seq} tokens exceeds the model's limit of {}", c.max_context);
        }
        hooks.validate(&self.hook_names())?;
        if hooks.start(c.n_layers, batch, seq)?.is_some() {
            bail!("BERT runs every pass from the embedding (Hooks::start_at is for causal models)");
        }
        let ids = tokens.flatten_all()?;
        let embed = self.word.index_select(&ids, 0)?.reshape((batch, seq, c.d_model))?;
        let embed = hooks.apply(EMBED, embed)?;
        let pos = self.position.narrow(0, 0, seq)?.unsqueeze(0)?.broadcast_as((batch, seq, c.d_model))?;
        let pos = hooks.apply(POS_EMBED, pos.contiguous()?)?;
        let mut x = self.embed_ln.forward(&(embed + pos)?.broadcast_add(&self.token_type)?)?;
        let scale = (c.d_head as f64).powf(-0.5);
        for (i, b) in self.blocks.iter().enumerate() {
            let name = |s: &str| hooks::in_block(i, s);
            x = hooks.apply(&name(RESID_PRE), x)?;
            let attn = b.attn.forward(i, &x, c.n_heads, scale, mask, hooks)?;
            let attn = hooks.apply(&name(ATTN_OUT), attn)?;
            x = hooks.apply(&name(RESID_MID), b.attn_ln.forward(&(x + attn)?)?)?;
            let pre = hooks.apply(&name(MLP_PRE), linear(&x, &b.fc, Some(&b.fc_bias))?)?;
            let post = hooks.apply(&name(MLP_POST), self.cfg.activation.apply(&pre)?)?;
            let mlp = hooks.apply(&name(MLP_OUT), linear(&post, &b.proj, Some(&b.proj_bias))?)?;
            x = hooks.apply(&name(RESID_POST), b.mlp_ln.forward(&(x + mlp)?)?)?;
            if hooks.stop_layer() == Some(i) {
                return Ok(None);
            }
        }
        Ok(Some(x))
    }
}

impl HookedModel for Bert {
    fn config(&self) -> &ModelConfig {
        &self.cfg.base
    }

    fn hook_list(&self) -> &'static HookList {
        &HOOKS
    }

    /// Every token is real (no padding); see [`Bert::forward_masked`] for padded batches.
    fn forward(&self, tokens: &Tensor, hooks: &mut Hooks) -> Result<Option<Tensor>> {
        let seq = tokens.dim(1)?;
        let mask = Tensor::zeros((1, 1, 1, seq), DType::F32, &Device::Cpu)?;
        self.run(tokens, &mask, hooks)
    }
}
