//! GPT-2 (causal, pre-LayerNorm) with hook points, from an HF directory (`config.json` +
//! `model.safetensors`, tensor names with or without the `transformer.` prefix).
//!
//! Per block: LayerNorm → attention (biased Q/K/V from the fused `c_attn`, causal mask, scores
//! scaled by d_head^-0.5) → residual; LayerNorm → MLP (`c_fc`, GELU, `c_proj`) → residual. Learned
//! position embeddings are added to the token embeddings; a final LayerNorm precedes the
//! unembedding, which is tied to the token embeddings unless the file has `lm_head.weight`. HF
//! stores GPT-2's linear layers as `Conv1D` with weights `[in, out]`; they are transposed at load to
//! the `[out, in]` layout of [`linear`].
//!
//! Hooks: [`HOOKS`], each with where it sits.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::hooks::{self, HookList, HookPoint, Shape, names::*};
use super::ops::{Activation, Attention, LayerNorm, causal_mask, linear};
use super::{HookedModel, Hooks, ModelConfig, residual};

/// GPT-2's hook points (TransformerLens names), in forward order.
pub static HOOKS: HookList = HookList {
    first: &[
        HookPoint { name: EMBED, shape: Shape::Model },
        HookPoint { name: POS_EMBED, shape: Shape::Model },
    ],
    block: &[
        HookPoint { name: RESID_PRE, shape: Shape::Model },
        // After the affine.
        HookPoint { name: LN1, shape: Shape::Model },
        // With biases.
        HookPoint { name: Q, shape: Shape::Heads },
        HookPoint { name: K, shape: Shape::Heads },
        HookPoint { name: V, shape: Shape::Heads },
        HookPoint { name: PATTERN, shape: Shape::Pattern },
        HookPoint { name: Z, shape: Shape::Heads },
        // Per-head output, before the output bias.
        HookPoint { name: RESULT, shape: Shape::HeadResults },
        // With the output bias.
        HookPoint { name: ATTN_OUT, shape: Shape::Model },
        HookPoint { name: RESID_MID, shape: Shape::Model },
        HookPoint { name: LN2, shape: Shape::Model },
        HookPoint { name: MLP_PRE, shape: Shape::Mlp },
        HookPoint { name: MLP_POST, shape: Shape::Mlp },
        HookPoint { name: MLP_OUT, shape: Shape::Model },
        HookPoint { name: RESID_POST, shape: Shape::Model },
    ],
    last: &[HookPoint { name: LN_FINAL, shape: Shape::Model }],
};

/// GPT-2 hyper-parameters beyond [`ModelConfig`].
#[derive(Clone, Debug)]
pub struct Gpt2Config {
    pub base: ModelConfig,
    pub ln_eps: f64,
    pub activation: Activation,
    /// Scores are divided by √d_head (`scale_attn_weights`, true for every released GPT-2).
    pub scale_attn_weights: bool,
    /// Scores of block `L` are also divided by `L + 1` (`scale_attn_by_inverse_layer_idx`).
    pub scale_attn_by_inverse_layer_idx: bool,
}

struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc: Tensor,
    fc_bias: Tensor,
    proj: Tensor,
    proj_bias: Tensor,
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    unembed: Tensor,
    device: Device,
}

impl Gpt2 {
    pub fn config_full(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// Load from an HF directory whose `config.json` (already parsed) has model_type `gpt2`.
    pub fn from_hf_dir(dir: &Path, config: &serde_json::Value) -> Result<Gpt2> {
        let device = Device::Cpu;
        let num = |k: &str| config.get(k).and_then(|v| v.as_f64());
        let flag = |k: &str, default: bool| config.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        let need = |k: &str| num(k).with_context(|| format!("{}: config.json has no {k}", dir.display()));
        let n_layers = need("n_layer")? as usize;
        let d_model = need("n_embd")? as usize;
        let n_heads = need("n_head")? as usize;
        if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
            bail!("{}: n_embd {d_model} is not a multiple of n_head {n_heads}", dir.display());
        }
        let act = config.get("activation_function").and_then(|v| v.as_str()).unwrap_or("gelu_new");
        let activation = Activation::from_hf(act).with_context(|| format!("{}", dir.display()))?;

        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &device)
            .with_context(|| format!("cannot read {} (truncated or not safetensors?)", path.display()))?;
        let prefix = if tensors.contains_key("transformer.wte.weight") { "transformer." } else { "" };
        let get = |name: &str| -> Result<Tensor> {
            let full = format!("{prefix}{name}");
            let t = tensors.get(&full).with_context(|| format!("{}: no tensor {full}", path.display()))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        // Conv1D weights are [in, out]; `linear` wants [out, in].
        let conv = |name: &str| -> Result<Tensor> { Ok(get(name)?.t()?.contiguous()?) };
        let ln = |name: &str, eps: f64| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(&format!("{name}.weight"))?,
                bias: get(&format!("{name}.bias"))?,
                eps,
            })
        };
        let ln_eps = num("layer_norm_epsilon").unwrap_or(1e-5);
        let wte = get("wte.weight")?;
        let wpe = get("wpe.weight")?;
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = |s: &str| format!("h.{i}.{s}");
            let qkv = conv(&p("attn.c_attn.weight"))?;
            let qkv_bias = get(&p("attn.c_attn.bias"))?;
            if qkv.dims() != [3 * d_model, d_model] || qkv_bias.dims() != [3 * d_model] {
                bail!(
                    "{}: block {i} c_attn has shape {:?}, expected [{d_model}, {}]",
                    path.display(),
                    qkv.t()?.dims(),
                    3 * d_model
                );
            }
            let part = |t: &Tensor, j: usize| t.narrow(0, j * d_model, d_model)?.contiguous();
            blocks.push(Block {
                ln1: ln(&p("ln_1"), ln_eps)?,
                attn: Attention {
                    q: part(&qkv, 0)?,
                    q_bias: part(&qkv_bias, 0)?,
                    k: part(&qkv, 1)?,
                    k_bias: part(&qkv_bias, 1)?,
                    v: part(&qkv, 2)?,
                    v_bias: part(&qkv_bias, 2)?,
                    o: conv(&p("attn.c_proj.weight"))?,
                    o_bias: get(&p("attn.c_proj.bias"))?,
                },
                ln2: ln(&p("ln_2"), ln_eps)?,
                fc: conv(&p("mlp.c_fc.weight"))?,
                fc_bias: get(&p("mlp.c_fc.bias"))?,
                proj: conv(&p("mlp.c_proj.weight"))?,
                proj_bias: get(&p("mlp.c_proj.bias"))?,
            });
        }
        let ln_f = ln("ln_f", ln_eps)?;
        let unembed = match tensors.get("lm_head.weight") {
            Some(t) => t.to_dtype(DType::F32)?,
            None => wte.clone(),
        };
        let d_mlp = match config.get("n_inner").and_then(|v| v.as_f64()) {
            Some(n) => n as usize,
            None => 4 * d_model,
        };
        let cfg = Gpt2Config {
            base: ModelConfig {
                architecture: "gpt2".into(),
                n_layers,
                d_model,
                n_heads,
                n_kv_heads: n_heads,
                d_head: d_model / n_heads,
                d_mlp,
                vocab_size: unembed.dim(0)?,
                max_context: wpe.dim(0)?,
                causal: true,
                n_experts: 0,
                experts_per_token: 0,
            },
            ln_eps,
            activation,
            scale_attn_weights: flag("scale_attn_weights", true),
            scale_attn_by_inverse_layer_idx: flag("scale_attn_by_inverse_layer_idx", false),
        };
        let model = Gpt2 { cfg, wte, wpe, blocks, ln_f, unembed, device };
        model.check_shapes().with_context(|| format!("{}: unexpected GPT-2 weights", dir.display()))?;
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
        expect(&self.wte, &[c.vocab_size, c.d_model], "wte")?;
        expect(&self.wpe, &[c.max_context, c.d_model], "wpe")?;
        expect(&self.ln_f.weight, &[c.d_model], "ln_f")?;
        for (i, b) in self.blocks.iter().enumerate() {
            let w = |s: &str| format!("block {i} {s}");
            expect(&b.attn.o, &[c.d_model, c.d_model], &w("attn.c_proj"))?;
            expect(&b.fc, &[c.d_mlp, c.d_model], &w("mlp.c_fc (transposed)"))?;
            expect(&b.fc_bias, &[c.d_mlp], &w("mlp.c_fc bias"))?;
            expect(&b.proj, &[c.d_model, c.d_mlp], &w("mlp.c_proj (transposed)"))?;
            expect(&b.ln1.weight, &[c.d_model], &w("ln_1"))?;
            expect(&b.ln2.weight, &[c.d_model], &w("ln_2"))?;
        }
        Ok(())
    }
}

impl HookedModel for Gpt2 {
    fn unembedding(&self) -> Option<&Tensor> {
        Some(&self.unembed)
    }

    fn residual_components(&self, tokens: &Tensor, hook: &str) -> Result<Vec<(String, Tensor)>> {
        self.components(tokens, hook)
    }

    fn direction_logits(&self, directions: &Tensor) -> Result<Tensor> {
        let centred = directions.broadcast_sub(&directions.mean_keepdim(candle_core::D::Minus1)?)?;
        Ok(centred.broadcast_mul(&self.ln_f.weight)?.matmul(&self.unembed.t()?)?)
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
        let (batch, seq) = tokens.dims2()?;
        if seq > c.max_context {
            bail!("context of {seq} tokens exceeds the model's limit of {}", c.max_context);
        }
        hooks.validate(&self.hook_names())?;
        let (first, mut x) = match hooks.start(c.n_layers, batch, seq)? {
            Some(start) => start,
            None => {
                let ids = tokens.flatten_all()?;
                let embed = self.wte.index_select(&ids, 0)?.reshape((batch, seq, c.d_model))?;
                let embed = hooks.apply(EMBED, embed)?;
                let pos = self.wpe.narrow(0, 0, seq)?.unsqueeze(0)?.broadcast_as((batch, seq, c.d_model))?;
                let pos = hooks.apply(POS_EMBED, pos.contiguous()?)?;
                (0, (embed + pos)?)
            }
        };
        let mask = causal_mask(seq, None, &self.device)?;
        for (i, b) in self.blocks.iter().enumerate().skip(first) {
            let name = |s: &str| hooks::in_block(i, s);
            x = hooks.apply(&name(RESID_PRE), x)?;
            let h = hooks.apply(&name(LN1), b.ln1.forward(&x)?)?;
            let mut scale = if self.cfg.scale_attn_weights { (c.d_head as f64).powf(-0.5) } else { 1.0 };
            if self.cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            let attn = b.attn.forward(i, &h, c.n_heads, scale, &mask, hooks)?;
            let attn = hooks.apply(&name(ATTN_OUT), attn)?;
            x = hooks.apply(&name(RESID_MID), (x + attn)?)?;
            let h = hooks.apply(&name(LN2), b.ln2.forward(&x)?)?;
            let pre = hooks.apply(&name(MLP_PRE), linear(&h, &b.fc, Some(&b.fc_bias))?)?;
            let post = hooks.apply(&name(MLP_POST), self.cfg.activation.apply(&pre)?)?;
            let mlp = hooks.apply(&name(MLP_OUT), linear(&post, &b.proj, Some(&b.proj_bias))?)?;
            x = hooks.apply(&name(RESID_POST), (x + mlp)?)?;
            if hooks.stop_layer() == Some(i) {
                return Ok(None);
            }
        }
        let x = hooks.apply(LN_FINAL, self.ln_f.forward(&x)?)?;
        if hooks.skips_unembed() {
            return Ok(Some(x));
        }
        Ok(Some(linear(&x, &self.unembed, None)?))
    }
}

impl Gpt2 {
    /// [`HookedModel::residual_components`]: the token and position embeddings, each head's
    /// `hook_result`, each block's attention output bias b_O (`L.attn_bias`) and `hook_mlp_out`.
    fn components(&self, tokens: &Tensor, hook: &str) -> Result<Vec<(String, Tensor)>> {
        let point = residual::residual_point(hook, self.cfg.base.n_layers)
            .ok_or_else(|| residual::not_residual(hook))?;
        let mut hooks = Hooks::new().capture(EMBED).capture(POS_EMBED);
        for l in 0..point.attn_layers {
            hooks = hooks.capture(hooks::in_block(l, RESULT)).capture(hooks::in_block(l, MLP_OUT));
        }
        let mut hooks = hooks.stop_after_layer(point.last_block().unwrap_or(0));
        self.forward(tokens, &mut hooks)?;
        let embed = hooks.get(EMBED)?.clone();
        let shape = embed.dims().to_vec();
        let mut out = vec![("embed".to_string(), embed)];
        if point.embed_only {
            return Ok(out);
        }
        out.push(("pos_embed".into(), hooks.get(POS_EMBED)?.clone()));
        for l in 0..point.attn_layers {
            out.extend(residual::split_heads(l, hooks.get(&hooks::in_block(l, RESULT))?, None)?);
            let bias = self.blocks[l].attn.o_bias.broadcast_as(shape.as_slice())?.contiguous()?;
            out.push((format!("{l}.attn_bias"), bias));
            if l < point.mlp_layers {
                out.push((format!("{l}.mlp"), hooks.get(&hooks::in_block(l, MLP_OUT))?.clone()));
            }
        }
        Ok(out)
    }
}

impl Gpt2 {
    /// [`HookedModel::freeze`]: LayerNorms ln1, ln2 and ln_f frozen at their 1/std on the prompt
    /// (centring stays, it is linear); b_V, b_O, β and the position embeddings are constants.
    fn frozen(&self, tokens: &[u32]) -> Result<crate::frozen::Frozen> {
        use crate::frozen::{Frozen, FrozenLayer, Norm};
        let c = &self.cfg.base;
        let n = c.n_layers;
        let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &self.device)?;
        let mut hooks =
            Hooks::new().capture(EMBED).capture(POS_EMBED).capture(hooks::in_block(n - 1, RESID_POST));
        for l in 0..n {
            for h in [RESID_PRE, PATTERN, RESID_MID, LN2, MLP_OUT] {
                hooks = hooks.capture(hooks::in_block(l, h));
            }
        }
        let logits = self.forward(&ids, &mut hooks)?.context("the forward stopped early")?;
        let get = |l: usize, h: &str| -> Result<Tensor> { Ok(hooks.get(&hooks::in_block(l, h))?.get(0)?) };
        let norm = |x: &Tensor, ln: &super::ops::LayerNorm| {
            Norm::freeze(x, false, &ln.weight, Some(&ln.bias), ln.eps)
        };
        let mut layers = Vec::with_capacity(n);
        for (l, b) in self.blocks.iter().enumerate() {
            let pattern = get(l, PATTERN)?;
            layers.push(FrozenLayer {
                ln1: norm(&get(l, RESID_PRE)?, &b.ln1)?,
                pattern_t: pattern.transpose(1, 2)?.contiguous()?,
                pattern,
                window: None,
                w_v: b.attn.v.clone(),
                b_v: Some(b.attn.v_bias.clone()),
                w_o: b.attn.o.clone(),
                b_o: Some(b.attn.o_bias.clone()),
                attn_norm: None,
                ln2: norm(&get(l, RESID_MID)?, &b.ln2)?,
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
            embed_const: Some(hooks.get(POS_EMBED)?.get(0)?),
            layers,
            ln_final: norm(&get(n - 1, RESID_POST)?, &self.ln_f)?,
            unembed: self.unembed.clone(),
            mlp_in: (0..n).map(|l| get(l, LN2)).collect::<Result<_>>()?,
            mlp_out: (0..n).map(|l| get(l, MLP_OUT)).collect::<Result<_>>()?,
            logits: logits.get(0)?.get(seq - 1)?,
        })
    }
}
