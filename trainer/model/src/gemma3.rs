//! Gemma 3 (text, causal) with hook points, from a GGUF file (llama.cpp layout, dequantized to f32)
//! or an HF safetensors directory.
//!
//! Per block: RMSNorm → attention (QK-norm, RoPE, grouped KV heads, sliding window on local layers)
//! → post-attention RMSNorm → residual; RMSNorm → GeGLU MLP (tanh GELU) → post-MLP RMSNorm →
//! residual. Embeddings are scaled by √d_model; the unembedding is tied to them. Norm scales are
//! held as the factor the activations are multiplied by: HF stores `w` and uses `1 + w`, llama.cpp's
//! converter stores `1 + w` already.
//!
//! Hooks: [`HOOKS`], each with where it sits.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::gguf::Gguf;
use super::hooks::{self, HookList, HookPoint, Shape, names::*};
use super::kernels;
use super::ops::{causal_mask, geglu, linear, rms_norm, rope, rope_tables, softmax};
use super::{HookedModel, Hooks, ModelConfig, residual};

/// Gemma 3's hook points (TransformerLens names), in forward order.
pub static HOOKS: HookList = HookList {
    // Scaled by √d_model.
    first: &[HookPoint { name: EMBED, shape: Shape::Model }],
    block: &[
        HookPoint { name: RESID_PRE, shape: Shape::Model },
        HookPoint { name: LN1, shape: Shape::Model },
        // After QK-norm, before RoPE.
        HookPoint { name: Q, shape: Shape::Heads },
        HookPoint { name: K, shape: Shape::KvHeads },
        HookPoint { name: V, shape: Shape::KvHeads },
        // After RoPE.
        HookPoint { name: ROT_Q, shape: Shape::Heads },
        HookPoint { name: ROT_K, shape: Shape::KvHeads },
        HookPoint { name: PATTERN, shape: Shape::Pattern },
        HookPoint { name: Z, shape: Shape::Heads },
        // Per-head output, before the post-attention norm.
        HookPoint { name: RESULT, shape: Shape::HeadResults },
        // After the post-attention norm, as added to the residual.
        HookPoint { name: ATTN_OUT, shape: Shape::Model },
        HookPoint { name: RESID_MID, shape: Shape::Model },
        HookPoint { name: LN2, shape: Shape::Model },
        // The gate's pre-activation.
        HookPoint { name: MLP_PRE, shape: Shape::Mlp },
        // The up projection.
        HookPoint { name: MLP_PRE_LINEAR, shape: Shape::Mlp },
        HookPoint { name: MLP_POST, shape: Shape::Mlp },
        // After the post-MLP norm, as added to the residual.
        HookPoint { name: MLP_OUT, shape: Shape::Model },
        HookPoint { name: RESID_POST, shape: Shape::Model },
    ],
    last: &[HookPoint { name: LN_FINAL, shape: Shape::Model }],
};

/// Gemma 3 hyper-parameters beyond [`ModelConfig`].
#[derive(Clone, Debug)]
pub struct Gemma3Config {
    pub base: ModelConfig,
    pub rms_eps: f64,
    pub rope_global: f64,
    pub rope_local: f64,
    pub sliding_window: usize,
    /// Per layer: true for sliding-window (local) attention.
    pub sliding: Vec<bool>,
    /// Attention scores are multiplied by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
}

struct Block {
    attn_norm: Tensor,
    /// W_Q, W_K and W_V stacked `[(n_heads + 2·n_kv_heads)·d_head, d_model]`: one GEMM.
    qkv: Tensor,
    o: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    /// The gate and up projections stacked `[2·d_mlp, d_model]`: one GEMM.
    gate_up: Tensor,
    down: Tensor,
    post_ffn_norm: Tensor,
}

impl Block {
    fn q(&self, c: &ModelConfig) -> candle_core::Result<Tensor> {
        self.qkv.narrow(0, 0, c.n_heads * c.d_head)
    }
    fn k(&self, c: &ModelConfig) -> candle_core::Result<Tensor> {
        self.qkv.narrow(0, c.n_heads * c.d_head, c.n_kv_heads * c.d_head)
    }
    fn v(&self, c: &ModelConfig) -> candle_core::Result<Tensor> {
        self.qkv.narrow(0, (c.n_heads + c.n_kv_heads) * c.d_head, c.n_kv_heads * c.d_head)
    }
    fn gate(&self, c: &ModelConfig) -> candle_core::Result<Tensor> {
        self.gate_up.narrow(0, 0, c.d_mlp)
    }
    fn up(&self, c: &ModelConfig) -> candle_core::Result<Tensor> {
        self.gate_up.narrow(0, c.d_mlp, c.d_mlp)
    }
}

pub struct Gemma3 {
    cfg: Gemma3Config,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    device: Device,
}

impl Gemma3 {
    pub fn config_full(&self) -> &Gemma3Config {
        &self.cfg
    }

    /// Load from a llama.cpp GGUF (norm weights there already hold `1 + w`).
    pub fn from_gguf(file: &mut Gguf) -> Result<Gemma3> {
        let device = Device::Cpu;
        let n_layers = file.u32("gemma3.block_count")? as usize;
        let d_model = file.u32("gemma3.embedding_length")? as usize;
        let n_heads = file.u32("gemma3.attention.head_count")? as usize;
        // Checked before anything is sized from them: every layer has tensors of its own.
        if n_layers == 0 || n_layers > file.tensor_names().len() || n_heads == 0 {
            bail!(
                "{}: gemma3.block_count {n_layers} or attention.head_count {n_heads} does not fit a file of {} tensors",
                file.path().display(),
                file.tensor_names().len()
            );
        }
        let d_head = if file.has("gemma3.attention.key_length") {
            file.u32("gemma3.attention.key_length")? as usize
        } else {
            d_model / n_heads
        };
        let embed = file.tensor("token_embd.weight", &device)?;
        let vocab_size = embed.dim(0)?;
        let sliding_window = file.u32("gemma3.attention.sliding_window").unwrap_or(512) as usize;
        let cfg = Gemma3Config {
            base: ModelConfig {
                architecture: "gemma3".into(),
                n_layers,
                d_model,
                n_heads,
                n_kv_heads: file.u32("gemma3.attention.head_count_kv")? as usize,
                d_head,
                d_mlp: file.u32("gemma3.feed_forward_length")? as usize,
                vocab_size,
                max_context: file.u32("gemma3.context_length")? as usize,
                causal: true,
                n_experts: 0,
                experts_per_token: 0,
            },
            rms_eps: file.f32("gemma3.attention.layer_norm_rms_epsilon")? as f64,
            rope_global: file.f32("gemma3.rope.freq_base").unwrap_or(1e6) as f64,
            // llama.cpp and transformers both use 10,000 for the local layers of Gemma 3.
            rope_local: 10_000.0,
            sliding_window,
            // Every sixth layer attends globally (Gemma 3's 5:1 pattern).
            sliding: (0..n_layers).map(|i| (i + 1) % 6 != 0).collect(),
            query_pre_attn_scalar: d_head as f64,
        };
        let mut get = |name: String| file.tensor(&name, &device);
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            blocks.push(Block {
                attn_norm: get(p("attn_norm"))?,
                qkv: Tensor::cat(&[get(p("attn_q"))?, get(p("attn_k"))?, get(p("attn_v"))?], 0)?,
                o: get(p("attn_output"))?,
                q_norm: get(p("attn_q_norm"))?,
                k_norm: get(p("attn_k_norm"))?,
                post_attn_norm: get(p("post_attention_norm"))?,
                ffn_norm: get(p("ffn_norm"))?,
                gate_up: Tensor::cat(&[get(p("ffn_gate"))?, get(p("ffn_up"))?], 0)?,
                down: get(p("ffn_down"))?,
                post_ffn_norm: get(p("post_ffw_norm"))?,
            });
        }
        let final_norm = get("output_norm.weight".into())?;
        let model = Gemma3 { cfg, embed, blocks, final_norm, device };
        model
            .check_shapes()
            .with_context(|| format!("{}: unexpected Gemma 3 weights", file.path().display()))?;
        Ok(model)
    }

    /// Load from an HF directory (`config.json` + `model.safetensors`); norms there hold `w`.
    pub fn from_hf_dir(dir: &Path, config: &serde_json::Value) -> Result<Gemma3> {
        let device = Device::Cpu;
        let num = |k: &str| config.get(k).and_then(|v| v.as_f64());
        let need = |k: &str| num(k).with_context(|| format!("{}: config.json has no {k}", dir.display()));
        let n_layers = need("num_hidden_layers")? as usize;
        let d_model = need("hidden_size")? as usize;
        let n_heads = need("num_attention_heads")? as usize;
        let d_head = num("head_dim").unwrap_or((d_model / n_heads) as f64) as usize;
        let sliding: Vec<bool> = match config.get("layer_types").and_then(|v| v.as_array()) {
            Some(types) => types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect(),
            None => {
                let pattern = num("sliding_window_pattern").unwrap_or(6.0) as usize;
                (0..n_layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &device)
            .with_context(|| format!("cannot read {} (truncated or not safetensors?)", path.display()))?;
        let get = |name: &str| -> Result<Tensor> {
            let t = tensors.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let norm = |name: &str| -> Result<Tensor> { Ok((get(name)? + 1.0)?) };
        let embed = get("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            blocks.push(Block {
                attn_norm: norm(&p("input_layernorm"))?,
                qkv: Tensor::cat(
                    &[
                        get(&p("self_attn.q_proj"))?,
                        get(&p("self_attn.k_proj"))?,
                        get(&p("self_attn.v_proj"))?,
                    ],
                    0,
                )?,
                o: get(&p("self_attn.o_proj"))?,
                q_norm: norm(&p("self_attn.q_norm"))?,
                k_norm: norm(&p("self_attn.k_norm"))?,
                post_attn_norm: norm(&p("post_attention_layernorm"))?,
                ffn_norm: norm(&p("pre_feedforward_layernorm"))?,
                gate_up: Tensor::cat(&[get(&p("mlp.gate_proj"))?, get(&p("mlp.up_proj"))?], 0)?,
                down: get(&p("mlp.down_proj"))?,
                post_ffn_norm: norm(&p("post_feedforward_layernorm"))?,
            });
        }
        let cfg = Gemma3Config {
            base: ModelConfig {
                architecture: "gemma3".into(),
                n_layers,
                d_model,
                n_heads,
                n_kv_heads: need("num_key_value_heads")? as usize,
                d_head,
                d_mlp: need("intermediate_size")? as usize,
                vocab_size: embed.dim(0)?,
                max_context: num("max_position_embeddings").unwrap_or(32768.0) as usize,
                causal: true,
                n_experts: 0,
                experts_per_token: 0,
            },
            rms_eps: num("rms_norm_eps").unwrap_or(1e-6),
            // transformers 4 writes rope_theta / rope_local_base_freq, transformers 5 rope_parameters.
            rope_global: rope_param(config, "full_attention").or(num("rope_theta")).unwrap_or(1e6),
            rope_local: rope_param(config, "sliding_attention")
                .or(num("rope_local_base_freq"))
                .unwrap_or(10_000.0),
            sliding_window: num("sliding_window").unwrap_or(512.0) as usize,
            sliding,
            query_pre_attn_scalar: num("query_pre_attn_scalar").unwrap_or(d_head as f64),
        };
        let final_norm = norm("model.norm.weight")?;
        let model = Gemma3 { cfg, embed, blocks, final_norm, device };
        model.check_shapes().with_context(|| format!("{}: unexpected Gemma 3 weights", dir.display()))?;
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
        expect(&self.embed, &[c.vocab_size, c.d_model], "embedding")?;
        if self.cfg.sliding.len() != c.n_layers {
            bail!("layer_types lists {} layers, the model has {}", self.cfg.sliding.len(), c.n_layers);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let w = |s: &str| format!("block {i} {s}");
            expect(&b.qkv, &[(c.n_heads + 2 * c.n_kv_heads) * c.d_head, c.d_model], &w("q, k, v"))?;
            expect(&b.o, &[c.d_model, c.n_heads * c.d_head], &w("o"))?;
            expect(&b.gate_up, &[2 * c.d_mlp, c.d_model], &w("gate, up"))?;
            expect(&b.down, &[c.d_model, c.d_mlp], &w("down"))?;
            expect(&b.q_norm, &[c.d_head], &w("q_norm"))?;
        }
        Ok(())
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
        let (batch, seq, _) = x.dims3()?;
        let name = |s: &str| hooks::in_block(i, s);
        let scale = self.cfg.query_pre_attn_scalar.powf(-0.5);
        let inner = [Q, K, V, ROT_Q, ROT_K, PATTERN];
        let fusable = x.dtype() == DType::F32 && x.device().is_cpu();
        if !diff && fusable && !inner.iter().any(|h| hooks.is_active(&name(h))) {
            // Fused path: one projection GEMM, then QK-norm + RoPE and the attention in two kernels.
            let qkv = linear(x, &b.qkv, None)?;
            let (cos, sin) = rope_t;
            let qkv = kernels::qkv_norm_rope(
                &qkv,
                c.n_heads,
                c.n_kv_heads,
                &b.q_norm,
                &b.k_norm,
                self.cfg.rms_eps as f32,
                cos,
                sin,
            )?;
            let window = self.cfg.sliding[i].then_some(self.cfg.sliding_window);
            let z = kernels::causal_attention(&qkv, c.n_heads, c.n_kv_heads, scale as f32, window)?;
            return self.attention_out(i, z, hooks);
        }
        let heads = |t: Tensor, n: usize| t.reshape((batch, seq, n, c.d_head));
        let q = rms_norm(&heads(linear(x, &b.q(c)?, None)?, c.n_heads)?, &b.q_norm, self.cfg.rms_eps, diff)?;
        let k =
            rms_norm(&heads(linear(x, &b.k(c)?, None)?, c.n_kv_heads)?, &b.k_norm, self.cfg.rms_eps, diff)?;
        let v = heads(linear(x, &b.v(c)?, None)?, c.n_kv_heads)?;
        let q = hooks.apply(&name(Q), q)?;
        let k = hooks.apply(&name(K), k)?;
        let v = hooks.apply(&name(V), v)?;
        // [b, s, h, d] -> [b, h, s, d] for RoPE and the score matmuls.
        let (cos, sin) = rope_t;
        let q = rope(&q.transpose(1, 2)?.contiguous()?, cos, sin, diff)?;
        let k = rope(&k.transpose(1, 2)?.contiguous()?, cos, sin, diff)?;
        let q = hooks.apply(&name(ROT_Q), q.transpose(1, 2)?)?.transpose(1, 2)?;
        let k = hooks.apply(&name(ROT_K), k.transpose(1, 2)?)?.transpose(1, 2)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        // Grouped KV heads: query head h reads KV head h / (n_heads / n_kv_heads).
        let group = c.n_heads / c.n_kv_heads;
        let q = q.contiguous()?.reshape((batch, c.n_kv_heads, group * seq, c.d_head))?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let scores = scores.reshape((batch, c.n_heads, seq, seq))?.broadcast_add(mask)?;
        let pattern = softmax(&scores, diff)?;
        let pattern = hooks.apply(&name(PATTERN), pattern)?;
        let z = pattern.reshape((batch, c.n_kv_heads, group * seq, seq))?.matmul(&v)?;
        let z = z.reshape((batch, c.n_heads, seq, c.d_head))?.transpose(1, 2)?.contiguous()?;
        self.attention_out(i, z, hooks)
    }

    /// The attention output from `z` `[batch, pos, head, d_head]`, through `hook_z` and
    /// `hook_result`.
    fn attention_out(&self, i: usize, z: Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let c = &self.cfg.base;
        let b = &self.blocks[i];
        let (batch, seq, _, _) = z.dims4()?;
        let name = |s: &str| hooks::in_block(i, s);
        let z = hooks.apply(&name(Z), z)?;
        if hooks.is_active(&name(RESULT)) {
            // Per-head output z_h @ W_O[:, h] -> [b, s, h, d_model].
            let wo = b.o.reshape((c.d_model, c.n_heads, c.d_head))?.transpose(0, 1)?.contiguous()?;
            let zh = z.transpose(1, 2)?.contiguous()?; // [b, h, s, d_head]
            let result = zh.broadcast_matmul(&wo.transpose(1, 2)?.unsqueeze(0)?)?; // [b, h, s, d_model]
            hooks.apply(&name(RESULT), result.transpose(1, 2)?.contiguous()?)?;
        }
        linear(&z.reshape((batch, seq, c.n_heads * c.d_head))?, &b.o, None)
    }
}

fn rope_param(config: &serde_json::Value, kind: &str) -> Option<f64> {
    config.get("rope_parameters")?.get(kind)?.get("rope_theta")?.as_f64()
}

impl HookedModel for Gemma3 {
    fn unembedding(&self) -> Option<&Tensor> {
        Some(&self.embed)
    }

    fn residual_components(&self, tokens: &Tensor, hook: &str) -> Result<Vec<(String, Tensor)>> {
        self.components(tokens, hook)
    }

    fn direction_logits(&self, directions: &Tensor) -> Result<Tensor> {
        Ok(directions.broadcast_mul(&self.final_norm)?.matmul(&self.embed.t()?)?)
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg.base
    }

    fn freeze(&self, tokens: &[u32]) -> Result<crate::frozen::Frozen> {
        self.frozen(tokens)
    }

    fn hook_list(&self) -> &'static HookList {
        &HOOKS
    }

    fn forward(&self, tokens: &Tensor, hooks: &mut Hooks) -> Result<Option<Tensor>> {
        let c = &self.cfg.base;
        let (_, seq) = tokens.dims2()?;
        if seq > c.max_context {
            bail!("context of {seq} tokens exceeds the model's limit of {}", c.max_context);
        }
        hooks.validate(&self.hook_names())?;
        let diff = hooks.wants_grad();
        let eps = self.cfg.rms_eps;
        let (batch, _) = tokens.dims2()?;
        let (first, mut x) = match hooks.start(c.n_layers, batch, seq)? {
            Some(start) => start,
            None => {
                let ids = tokens.flatten_all()?;
                let x = self.embed.index_select(&ids, 0)?.reshape((batch, seq, c.d_model))?;
                (0, hooks.apply(EMBED, (x * (c.d_model as f64).sqrt())?)?)
            }
        };
        let global = rope_tables(seq, c.d_head, self.cfg.rope_global, &self.device)?;
        let local = rope_tables(seq, c.d_head, self.cfg.rope_local, &self.device)?;
        let full_mask = causal_mask(seq, None, &self.device)?;
        let window_mask = causal_mask(seq, Some(self.cfg.sliding_window), &self.device)?;
        for (i, b) in self.blocks.iter().enumerate().skip(first) {
            let name = |s: &str| hooks::in_block(i, s);
            let diff = hooks.diff_at(i);
            x = hooks.apply(&name(RESID_PRE), x)?;
            let h = hooks.apply(&name(LN1), rms_norm(&x, &b.attn_norm, eps, diff)?)?;
            let (rope_t, mask) =
                if self.cfg.sliding[i] { (&local, &window_mask) } else { (&global, &full_mask) };
            let attn = self.attention(i, &h, rope_t, mask, hooks)?;
            let attn = hooks.apply(&name(ATTN_OUT), rms_norm(&attn, &b.post_attn_norm, eps, diff)?)?;
            x = hooks.apply(&name(RESID_MID), (x + attn)?)?;
            let h = hooks.apply(&name(LN2), rms_norm(&x, &b.ffn_norm, eps, diff)?)?;
            let act = if diff || hooks.is_active(&name(MLP_PRE)) || hooks.is_active(&name(MLP_PRE_LINEAR)) {
                let gate = hooks.apply(&name(MLP_PRE), linear(&h, &b.gate(c)?, None)?)?;
                let up = hooks.apply(&name(MLP_PRE_LINEAR), linear(&h, &b.up(c)?, None)?)?;
                geglu(&gate, &up, diff)?
            } else {
                kernels::geglu_fused(&linear(&h, &b.gate_up, None)?)?
            };
            let act = hooks.apply(&name(MLP_POST), act)?;
            let mlp = rms_norm(&linear(&act, &b.down, None)?, &b.post_ffn_norm, eps, diff)?;
            let mlp = hooks.apply(&name(MLP_OUT), mlp)?;
            x = hooks.apply(&name(RESID_POST), (x + mlp)?)?;
            if hooks.stop_layer() == Some(i) {
                return Ok(None);
            }
        }
        let x = hooks.apply(LN_FINAL, rms_norm(&x, &self.final_norm, eps, diff)?)?;
        if hooks.skips_unembed() {
            return Ok(Some(x));
        }
        Ok(Some(linear(&x, &self.embed, None)?))
    }
}

impl Gemma3 {
    /// [`HookedModel::residual_components`]: the scaled embedding, each head's `hook_result`
    /// through the post-attention norm with that position's norm of the heads' sum frozen
    /// (w ⊙ result_h / rms(Σ_h′ result_h′)), and each block's `hook_mlp_out` (already normed).
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
            let result = hooks.get(&hooks::in_block(l, RESULT))?;
            let sum = result.sum(2)?;
            let rms = (sum.sqr()?.mean_keepdim(candle_core::D::Minus1)? + self.cfg.rms_eps)?.sqrt()?;
            let scale = self.blocks[l].post_attn_norm.broadcast_div(&rms)?;
            out.extend(residual::split_heads(l, result, Some(&scale))?);
            if l < point.mlp_layers {
                out.push((format!("{l}.mlp"), hooks.get(&hooks::in_block(l, MLP_OUT))?.clone()));
            }
        }
        Ok(out)
    }
}

impl Gemma3 {
    /// [`HookedModel::freeze`]: RMSNorms input_layernorm, post_attention_layernorm (of the heads'
    /// summed output), pre_feedforward_layernorm and the final norm frozen at their 1/rms on the
    /// prompt; post_feedforward_layernorm is inside `hook_mlp_out`, which the caller replaces.
    fn frozen(&self, tokens: &[u32]) -> Result<crate::frozen::Frozen> {
        use crate::frozen::{Frozen, FrozenLayer, Norm};
        let c = &self.cfg.base;
        let n = c.n_layers;
        let eps = self.cfg.rms_eps;
        let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &self.device)?;
        let mut hooks = Hooks::new().capture(EMBED).capture(hooks::in_block(n - 1, RESID_POST));
        for l in 0..n {
            for h in [RESID_PRE, PATTERN, RESULT, RESID_MID, LN2, MLP_OUT] {
                hooks = hooks.capture(hooks::in_block(l, h));
            }
        }
        let logits = self.forward(&ids, &mut hooks)?.context("the forward stopped early")?;
        let get = |l: usize, h: &str| -> Result<Tensor> { Ok(hooks.get(&hooks::in_block(l, h))?.get(0)?) };
        let mut layers = Vec::with_capacity(n);
        for (l, b) in self.blocks.iter().enumerate() {
            let pattern = get(l, PATTERN)?;
            let attn_sum = get(l, RESULT)?.sum(1)?;
            layers.push(FrozenLayer {
                ln1: Norm::freeze(&get(l, RESID_PRE)?, true, &b.attn_norm, None, eps)?,
                pattern_t: pattern.transpose(1, 2)?.contiguous()?,
                pattern,
                window: self.cfg.sliding[l].then_some(self.cfg.sliding_window),
                w_v: b.v(c)?.contiguous()?,
                b_v: None,
                w_o: b.o.clone(),
                b_o: None,
                attn_norm: Some(Norm::freeze(&attn_sum, true, &b.post_attn_norm, None, eps)?),
                ln2: Norm::freeze(&get(l, RESID_MID)?, true, &b.ffn_norm, None, eps)?,
            });
        }
        let seq = tokens.len();
        Ok(Frozen {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            d_head: c.d_head,
            d_model: c.d_model,
            seq,
            embed: hooks.get(EMBED)?.get(0)?,
            embed_const: None,
            layers,
            ln_final: Norm::freeze(&get(n - 1, RESID_POST)?, true, &self.final_norm, None, eps)?,
            unembed: self.embed.clone(),
            mlp_in: (0..n).map(|l| get(l, LN2)).collect::<Result<_>>()?,
            mlp_out: (0..n).map(|l| get(l, MLP_OUT)).collect::<Result<_>>()?,
            logits: logits.get(0)?.get(seq - 1)?,
        })
    }
}
