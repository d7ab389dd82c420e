//! The decoder-only sparse-MoE transformer that OLMoE ([`super::olmoe`]) and Qwen3-MoE
//! ([`super::qwen3_moe`]) share, with hook points, and the HF safetensors reader they load it with.
//!
//! Per block: RMSNorm → attention (QK-norm as the model does it, RoPE in the rotate-half
//! convention, grouped KV heads, scores scaled by `d_head^-0.5`) → residual; RMSNorm → sparse MoE
//! MLP ([`super::moe`]) → residual. Final RMSNorm, then the unembedding (`lm_head`, or the
//! embedding when tied). No biases, no post-norms, no embedding scale.
//!
//! Hooks: [`HOOKS`], each with where it sits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::hooks::{self, HookList, HookPoint, Shape, names::*};
use super::kernels;
use super::moe::SparseMoe;
use super::ops::{causal_mask, linear, rms_norm, rope, rope_tables, softmax};
use super::{HookedModel, Hooks, ModelConfig, residual};

/// The hook points of OLMoE and Qwen3-MoE (TransformerLens names), in forward order.
pub static HOOKS: HookList = HookList {
    first: &[HookPoint { name: EMBED, shape: Shape::Model }],
    block: &[
        HookPoint { name: RESID_PRE, shape: Shape::Model },
        HookPoint { name: LN1, shape: Shape::Model },
        // After QK-norm (and OLMoE's clip_qkv), before RoPE.
        HookPoint { name: Q, shape: Shape::Heads },
        HookPoint { name: K, shape: Shape::KvHeads },
        HookPoint { name: V, shape: Shape::KvHeads },
        HookPoint { name: ROT_Q, shape: Shape::Heads },
        HookPoint { name: ROT_K, shape: Shape::KvHeads },
        HookPoint { name: PATTERN, shape: Shape::Pattern },
        HookPoint { name: Z, shape: Shape::Heads },
        HookPoint { name: RESULT, shape: Shape::HeadResults },
        HookPoint { name: ATTN_OUT, shape: Shape::Model },
        HookPoint { name: RESID_MID, shape: Shape::Model },
        HookPoint { name: LN2, shape: Shape::Model },
        HookPoint { name: ROUTER_LOGITS, shape: Shape::Experts },
        HookPoint { name: ROUTER_PROBS, shape: Shape::Experts },
        HookPoint { name: EXPERT_WEIGHTS, shape: Shape::Experts },
        HookPoint { name: EXPERT_INDICES, shape: Shape::ChosenExperts },
        HookPoint { name: EXPERT_OUT, shape: Shape::ExpertOutputs },
        HookPoint { name: MLP_OUT, shape: Shape::Model },
        HookPoint { name: RESID_POST, shape: Shape::Model },
    ],
    last: &[HookPoint { name: LN_FINAL, shape: Shape::Model }],
};

/// Where the attention RMS-normalizes queries and keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    /// Over the whole projection (`n_heads·d_head` for q, `n_kv_heads·d_head` for k): OLMoE.
    Projection,
    /// Over each head's `d_head`: Qwen3-MoE.
    Head,
}

/// Hyper-parameters beyond [`ModelConfig`].
#[derive(Clone, Debug)]
pub struct MoeLmConfig {
    pub base: ModelConfig,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub qk_norm: QkNorm,
    /// OLMoE's `clip_qkv`: q, k and v clamped to `[-c, c]` after the projections and QK-norm.
    pub clip_qkv: Option<f64>,
}

impl MoeLmConfig {
    /// The facts of an HF `config.json` both models name alike; `d_expert_key` names each
    /// expert's width. Refuses what this runtime does not implement (biases, another activation,
    /// scaled RoPE, sliding windows) before any weight is read.
    pub fn from_hf(
        dir: &Path,
        config: &serde_json::Value,
        arch: &str,
        d_expert_key: &str,
        qk_norm: QkNorm,
    ) -> Result<MoeLmConfig> {
        let num = |k: &str| config.get(k).and_then(|v| v.as_f64());
        let need = |k: &str| -> Result<usize> {
            let v = num(k).with_context(|| format!("{}: config.json has no {k}", dir.display()))?;
            if v < 1.0 || v.fract() != 0.0 {
                bail!("{}: config.json {k} is {v}, expected a positive integer", dir.display());
            }
            Ok(v as usize)
        };
        let refuse = |what: &str| {
            anyhow::anyhow!("{}: {arch} with {what} is not supported by Loupe's runtime", dir.display())
        };
        let act = config.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu");
        if act != "silu" {
            return Err(refuse(&format!("hidden_act {act:?} (only silu)")));
        }
        if config.get("attention_bias").and_then(|v| v.as_bool()) == Some(true) {
            return Err(refuse("attention_bias true"));
        }
        if config.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            return Err(refuse("use_sliding_window true"));
        }
        // transformers 4 writes rope_theta and rope_scaling, transformers 5 rope_parameters.
        let rope = config.get("rope_parameters");
        let rope_type = rope
            .and_then(|r| r.get("rope_type"))
            .or_else(|| config.get("rope_scaling").and_then(|r| r.get("rope_type").or(r.get("type"))))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(refuse(&format!("rope_type {rope_type:?} (only default RoPE)")));
        }
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(num("rope_theta"))
            .unwrap_or(10_000.0);
        let n_layers = need("num_hidden_layers")?;
        let d_model = need("hidden_size")?;
        let n_heads = need("num_attention_heads")?;
        let n_kv_heads =
            if num("num_key_value_heads").is_some() { need("num_key_value_heads")? } else { n_heads };
        let d_head = if num("head_dim").is_some() { need("head_dim")? } else { d_model / n_heads };
        if n_heads % n_kv_heads != 0 || d_head % 2 != 0 {
            bail!(
                "{}: {n_heads} attention heads, {n_kv_heads} key/value heads of {d_head}: heads must share KV heads evenly and head_dim be even",
                dir.display()
            );
        }
        // Qwen3-MoE's config.json says num_experts (transformers 4) or num_local_experts (5).
        let n_experts =
            if num("num_experts").is_some() { need("num_experts")? } else { need("num_local_experts")? };
        let experts_per_token = need("num_experts_per_tok")?;
        if experts_per_token > n_experts {
            bail!(
                "{}: num_experts_per_tok {experts_per_token} exceeds the {n_experts} experts",
                dir.display()
            );
        }
        Ok(MoeLmConfig {
            base: ModelConfig {
                architecture: arch.into(),
                n_layers,
                d_model,
                n_heads,
                n_kv_heads,
                d_head,
                d_mlp: need(d_expert_key)?,
                vocab_size: need("vocab_size")?,
                max_context: num("max_position_embeddings").unwrap_or(4096.0) as usize,
                causal: true,
                n_experts,
                experts_per_token,
            },
            rms_eps: num("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            qk_norm,
            clip_qkv: num("clip_qkv"),
        })
    }
}

pub struct Block {
    pub attn_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    pub mlp_norm: Tensor,
    pub moe: SparseMoe,
}

pub struct MoeLm {
    pub cfg: MoeLmConfig,
    pub embed: Tensor,
    /// `[vocab, d_model]`: `lm_head.weight`, or the embedding when tied.
    pub unembed: Tensor,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    pub device: Device,
}

/// The safetensors of an HF directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names. Tensors are read one at a time, as f32.
pub struct HfWeights {
    dir: PathBuf,
    files: MmapedSafetensors,
    names: BTreeSet<String>,
}

impl HfWeights {
    pub fn open(dir: &Path) -> Result<HfWeights> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{} has no weight_map", index.display()))?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for p in &paths {
            if !p.is_file() {
                bail!("{}: no weights file {}", dir.display(), p.display());
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader (candle's, the
        // safetensors crate's), this assumes no one truncates them while the model loads.
        let files = unsafe { MmapedSafetensors::multi(&paths) }
            .with_context(|| format!("cannot read the safetensors of {} (truncated?)", dir.display()))?;
        let names = files.tensors().into_iter().map(|(name, _)| name).collect();
        Ok(HfWeights { dir: dir.to_path_buf(), files, names })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Tensor `name` as f32 with shape `shape`; errors name the tensor.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.contains(name) {
            bail!("{}: no tensor {name} in the checkpoint", self.dir.display());
        }
        let t = self.files.load(name, &Device::Cpu).with_context(|| format!("cannot read tensor {name}"))?;
        if t.dims() != shape {
            bail!("{}: tensor {name} has shape {:?}, expected {shape:?}", self.dir.display(), t.dims());
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

impl MoeLm {
    /// Load the weights of an HF checkpoint with the Llama-style names both models use
    /// (`model.layers.L.self_attn.*`, `mlp.gate`, experts per expert or stacked) for `cfg`.
    pub fn from_weights(cfg: MoeLmConfig, w: &HfWeights, norm_topk_prob: bool, tied: bool) -> Result<MoeLm> {
        let c = &cfg.base;
        let (d, dh, e, f) = (c.d_model, c.d_head, c.n_experts, c.d_mlp);
        let (q_norm, k_norm) = match cfg.qk_norm {
            QkNorm::Projection => (c.n_heads * dh, c.n_kv_heads * dh),
            QkNorm::Head => (dh, dh),
        };
        let embed = w.get("model.embed_tokens.weight", &[c.vocab_size, d])?;
        let unembed = if tied && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.get("lm_head.weight", &[c.vocab_size, d])?
        };
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let (gate_up, down) = if w.contains(&p("mlp.experts.gate_up_proj")) {
                // transformers 5's stacked layout: [experts, 2·d_expert, d_model] (gate, then up).
                let gu = w.get(&p("mlp.experts.gate_up_proj"), &[e, 2 * f, d])?;
                let dn = w.get(&p("mlp.experts.down_proj"), &[e, d, f])?;
                (
                    (0..e).map(|x| gu.get(x)).collect::<candle_core::Result<_>>()?,
                    (0..e).map(|x| dn.get(x)).collect::<candle_core::Result<_>>()?,
                )
            } else {
                let mut gate_up = Vec::with_capacity(e);
                let mut down = Vec::with_capacity(e);
                for x in 0..e {
                    let ex = |s: &str| p(&format!("mlp.experts.{x}.{s}.weight"));
                    gate_up.push(Tensor::cat(
                        &[w.get(&ex("gate_proj"), &[f, d])?, w.get(&ex("up_proj"), &[f, d])?],
                        0,
                    )?);
                    down.push(w.get(&ex("down_proj"), &[d, f])?);
                }
                (gate_up, down)
            };
            blocks.push(Block {
                attn_norm: w.get(&p("input_layernorm.weight"), &[d])?,
                q: w.get(&p("self_attn.q_proj.weight"), &[c.n_heads * dh, d])?,
                k: w.get(&p("self_attn.k_proj.weight"), &[c.n_kv_heads * dh, d])?,
                v: w.get(&p("self_attn.v_proj.weight"), &[c.n_kv_heads * dh, d])?,
                o: w.get(&p("self_attn.o_proj.weight"), &[d, c.n_heads * dh])?,
                q_norm: w.get(&p("self_attn.q_norm.weight"), &[q_norm])?,
                k_norm: w.get(&p("self_attn.k_norm.weight"), &[k_norm])?,
                mlp_norm: w.get(&p("post_attention_layernorm.weight"), &[d])?,
                moe: SparseMoe {
                    router: w.get(&p("mlp.gate.weight"), &[e, d])?,
                    gate_up,
                    down,
                    top_k: c.experts_per_token,
                    norm_topk_prob,
                },
            });
        }
        let final_norm = w.get("model.norm.weight", &[d])?;
        Ok(MoeLm { cfg, embed, unembed, blocks, final_norm, device: Device::Cpu })
    }

    fn attention(
        &self,
        i: usize,
        x: &Tensor,
        rope_t: &(Tensor, Tensor),
        mask: &Tensor,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let c = &self.cfg.base;
        let b = &self.blocks[i];
        let diff = hooks.diff_at(i);
        let eps = self.cfg.rms_eps;
        let (batch, seq, _) = x.dims3()?;
        let name = |s: &str| hooks::in_block(i, s);
        let heads = |t: Tensor, n: usize| t.reshape((batch, seq, n, c.d_head));
        let (q, k) = match self.cfg.qk_norm {
            QkNorm::Projection => (
                heads(rms_norm(&linear(x, &b.q, None)?, &b.q_norm, eps, diff)?, c.n_heads)?,
                heads(rms_norm(&linear(x, &b.k, None)?, &b.k_norm, eps, diff)?, c.n_kv_heads)?,
            ),
            QkNorm::Head => (
                rms_norm(&heads(linear(x, &b.q, None)?, c.n_heads)?, &b.q_norm, eps, diff)?,
                rms_norm(&heads(linear(x, &b.k, None)?, c.n_kv_heads)?, &b.k_norm, eps, diff)?,
            ),
        };
        let mut v = heads(linear(x, &b.v, None)?, c.n_kv_heads)?;
        let (mut q, mut k) = (q, k);
        if let Some(clip) = self.cfg.clip_qkv {
            (q, k, v) = (q.clamp(-clip, clip)?, k.clamp(-clip, clip)?, v.clamp(-clip, clip)?);
        }
        let q = hooks.apply(&name(Q), q)?;
        let k = hooks.apply(&name(K), k)?;
        let v = hooks.apply(&name(V), v)?;
        // [b, s, h, d] -> [b, h, s, d] for RoPE, and back for the hooks.
        let (cos, sin) = rope_t;
        let q = rope(&q.transpose(1, 2)?.contiguous()?, cos, sin, diff)?;
        let k = rope(&k.transpose(1, 2)?.contiguous()?, cos, sin, diff)?;
        let q = hooks.apply(&name(ROT_Q), q.transpose(1, 2)?)?;
        let k = hooks.apply(&name(ROT_K), k.transpose(1, 2)?)?;
        let scale = (c.d_head as f64).powf(-0.5);
        let fusable = x.dtype() == DType::F32 && x.device().is_cpu();
        let z = if !diff && fusable && !hooks.is_active(&name(PATTERN)) {
            // The no-gradient kernel: queries, keys and values side by side [b, s, h + 2·kv, d].
            let qkv = Tensor::cat(&[&q, &k, &v], 2)?.contiguous()?;
            kernels::causal_attention(&qkv, c.n_heads, c.n_kv_heads, scale as f32, None)?
        } else {
            // Grouped KV heads: query head h reads KV head h / (n_heads / n_kv_heads).
            let group = c.n_heads / c.n_kv_heads;
            let q = q.transpose(1, 2)?.contiguous()?.reshape((batch, c.n_kv_heads, group * seq, c.d_head))?;
            let k = k.transpose(1, 2)?.contiguous()?;
            let v = v.transpose(1, 2)?.contiguous()?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
            let scores = scores.reshape((batch, c.n_heads, seq, seq))?.broadcast_add(mask)?;
            let pattern = hooks.apply(&name(PATTERN), softmax(&scores, diff)?)?;
            let z = pattern.reshape((batch, c.n_kv_heads, group * seq, seq))?.matmul(&v)?;
            z.reshape((batch, c.n_heads, seq, c.d_head))?.transpose(1, 2)?.contiguous()?
        };
        let z = hooks.apply(&name(Z), z)?;
        if hooks.is_active(&name(RESULT)) {
            hooks.apply(&name(RESULT), super::ops::per_head_result(&z, &b.o)?)?;
        }
        linear(&z.reshape((batch, seq, c.n_heads * c.d_head))?, &b.o, None)
    }

    /// [`HookedModel::residual_components`]: the embedding, each head's `hook_result` and each
    /// block's `hook_mlp_out` (nothing is normalized after it is computed, so the terms add up).
    fn components(&self, tokens: &Tensor, hook: &str) -> Result<Vec<(String, Tensor)>> {
        let point = residual::residual_point(hook, self.cfg.base.n_layers)
            .ok_or_else(|| residual::not_residual(hook))?;
        let mut hooks = Hooks::new().capture(EMBED);
        for l in 0..point.attn_layers {
            hooks = hooks.capture(hooks::in_block(l, RESULT)).capture(hooks::in_block(l, MLP_OUT));
        }
        let mut hooks = hooks.stop_after_layer(point.last_block().unwrap_or(0));
        self.forward(tokens, &mut hooks)?;
        let mut out = vec![("embed".to_string(), hooks.get(EMBED)?.clone())];
        for l in 0..point.attn_layers {
            out.extend(residual::split_heads(l, hooks.get(&hooks::in_block(l, RESULT))?, None)?);
            if l < point.mlp_layers {
                out.push((format!("{l}.mlp"), hooks.get(&hooks::in_block(l, MLP_OUT))?.clone()));
            }
        }
        Ok(out)
    }
}

impl HookedModel for MoeLm {
    fn config(&self) -> &ModelConfig {
        &self.cfg.base
    }

    fn unembedding(&self) -> Option<&Tensor> {
        Some(&self.unembed)
    }

    fn direction_logits(&self, directions: &Tensor) -> Result<Tensor> {
        Ok(directions.broadcast_mul(&self.final_norm)?.matmul(&self.unembed.t()?)?)
    }

    fn residual_components(&self, tokens: &Tensor, hook: &str) -> Result<Vec<(String, Tensor)>> {
        self.components(tokens, hook)
    }

    fn freeze(&self, tokens: &[u32]) -> Result<crate::frozen::Frozen> {
        let _ = tokens;
        bail!(
            "{} has no frozen linear model: attribution graphs through a sparse MoE's routing are not implemented (gemma3 and gpt2 have them)",
            self.cfg.base.architecture
        )
    }

    fn hook_list(&self) -> &'static HookList {
        &HOOKS
    }

    fn forward(&self, tokens: &Tensor, hooks: &mut Hooks) -> Result<Option<Tensor>> {
        let c = &self.cfg.base;
        let (batch, seq) = tokens.dims2()?;
        if seq > c.max_context {
            bail!("context of {seq} tokens exceeds the model's limit of {}", c.max_context);
        }
        hooks.validate(&self.hook_names())?;
        let eps = self.cfg.rms_eps;
        let (first, mut x) = match hooks.start(c.n_layers, batch, seq)? {
            Some(start) => start,
            None => {
                let ids = tokens.flatten_all()?;
                let x = self.embed.index_select(&ids, 0)?.reshape((batch, seq, c.d_model))?;
                (0, hooks.apply(EMBED, x)?)
            }
        };
        let rope_t = rope_tables(seq, c.d_head, self.cfg.rope_theta, &self.device)?;
        let mask = causal_mask(seq, None, &self.device)?;
        for (i, b) in self.blocks.iter().enumerate().skip(first) {
            let name = |s: &str| hooks::in_block(i, s);
            let diff = hooks.diff_at(i);
            x = hooks.apply(&name(RESID_PRE), x)?;
            let h = hooks.apply(&name(LN1), rms_norm(&x, &b.attn_norm, eps, diff)?)?;
            let attn = self.attention(i, &h, &rope_t, &mask, hooks)?;
            let attn = hooks.apply(&name(ATTN_OUT), attn)?;
            x = hooks.apply(&name(RESID_MID), (x + attn)?)?;
            let h = hooks.apply(&name(LN2), rms_norm(&x, &b.mlp_norm, eps, diff)?)?;
            let mlp = b.moe.forward(i, &h, hooks, diff)?;
            let mlp = hooks.apply(&name(MLP_OUT), mlp)?;
            x = hooks.apply(&name(RESID_POST), (x + mlp)?)?;
            if hooks.stop_layer() == Some(i) {
                return Ok(None);
            }
        }
        let diff = hooks.wants_grad();
        let x = hooks.apply(LN_FINAL, rms_norm(&x, &self.final_norm, eps, diff)?)?;
        if hooks.skips_unembed() {
            return Ok(Some(x));
        }
        Ok(Some(linear(&x, &self.unembed, None)?))
    }
}
