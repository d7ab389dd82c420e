//! Every hook point an architecture lists (`HookedModel::hook_list`) fires on a forward pass with
//! all of them cached, with the shape the list documents: GPT-2 (the tiny fixture), BERT
//! (all-MiniLM-L6-v2), Gemma 3 (a tiny random one: 2 query heads sharing 1 key/value head,
//! head_dim unlike d_model / heads) and the sparse-MoE OLMoE and Qwen3-MoE (their tiny fixtures,
//! router and expert hooks included), each on a batch of two short sequences.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use loupe_model::{self as model, HookedModel, Hooks};
use loupe_tests::{fixture, minilm_dir};

fn assert_listed_hooks_fire(model: &dyn HookedModel, ids: [[u32; 5]; 2]) {
    let c = model.config();
    let arch = &c.architecture;
    let points = model.hook_list().points(c.n_layers);
    let names: BTreeSet<&str> = points.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.len(), points.len(), "{arch}: a hook is listed twice");
    assert_eq!(model.hook_names(), points.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>());
    let mut hooks = points.iter().fold(Hooks::new(), |h, (name, _)| h.capture(name.as_str()));
    let tokens = Tensor::new(&ids, &Device::Cpu).unwrap();
    model.forward(&tokens, &mut hooks).unwrap();
    let fired: BTreeSet<&str> = hooks.cache().keys().map(String::as_str).collect();
    let silent: Vec<&&str> = names.difference(&fired).collect();
    assert!(silent.is_empty(), "{arch}: listed hooks that did not fire: {silent:?}");
    for (name, shape) in &points {
        let got = hooks.get(name).unwrap().dims().to_vec();
        assert_eq!(got, shape.dims(c, 2, 5), "{arch} {name} ({shape:?})");
    }
}

#[test]
fn gpt2_hooks_fire_with_their_shapes() {
    let model = model::load(&fixture("gpt2-tiny")).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[1, 2, 3, 4, 5], [50, 60, 70, 80, 90]]);
}

#[test]
fn bert_hooks_fire_with_their_shapes() {
    let model = model::load(&minilm_dir()).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[101, 7592, 2088, 999, 102], [101, 1037, 2158, 2003, 102]]);
}

/// A random Gemma 3 in HF layout: 2 layers (one sliding, one full), d_model 16, 2 query heads and
/// 1 key/value head of 12, MLP 24, vocabulary 40.
fn tiny_gemma3(dir: &Path) {
    let (d, heads, d_head, mlp, vocab) = (16, 2, 12, 24, 40);
    let config = serde_json::json!({
        "model_type": "gemma3_text", "num_hidden_layers": 2, "hidden_size": d,
        "num_attention_heads": heads, "num_key_value_heads": 1, "head_dim": d_head,
        "intermediate_size": mlp, "vocab_size": vocab, "max_position_embeddings": 64,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let random = |shape: &[usize]| Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
    let mut tensors = HashMap::from([
        ("model.embed_tokens.weight".to_string(), random(&[vocab, d])),
        ("model.norm.weight".to_string(), random(&[d])),
    ]);
    for l in 0..2 {
        for (name, shape) in [
            ("input_layernorm", vec![d]),
            ("self_attn.q_proj", vec![heads * d_head, d]),
            ("self_attn.k_proj", vec![d_head, d]),
            ("self_attn.v_proj", vec![d_head, d]),
            ("self_attn.o_proj", vec![d, heads * d_head]),
            ("self_attn.q_norm", vec![d_head]),
            ("self_attn.k_norm", vec![d_head]),
            ("post_attention_layernorm", vec![d]),
            ("pre_feedforward_layernorm", vec![d]),
            ("mlp.gate_proj", vec![mlp, d]),
            ("mlp.up_proj", vec![mlp, d]),
            ("mlp.down_proj", vec![d, mlp]),
            ("post_feedforward_layernorm", vec![d]),
        ] {
            tensors.insert(format!("model.layers.{l}.{name}.weight"), random(&shape));
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

#[test]
fn gemma3_hooks_fire_with_their_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_gemma3(tmp.path());
    let model = model::load(tmp.path()).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[2, 5, 9, 13, 17], [2, 30, 31, 32, 39]]);
}

#[test]
fn olmoe_hooks_fire_with_their_shapes() {
    let model = model::load(&fixture("olmoe-tiny")).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[40, 72, 69, 4, 87], [35, 65, 76, 76, 4]]);
}

#[test]
fn qwen3_moe_hooks_fire_with_their_shapes() {
    let model = model::load(&fixture("qwen3moe-tiny")).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[40, 72, 69, 4, 87], [35, 65, 76, 76, 4]]);
}
