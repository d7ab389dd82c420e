//! Gemma 3 from an HF safetensors directory gives the same logits as from the GGUF: the test
//! writes the dequantized GGUF weights under HF names (norms as HF stores them, `w` for a `1 + w`
//! scale) with the transformers config from the fixtures, and loads that directory.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use loupe_model::{self as model, Hooks, gguf::Gguf};
use loupe_tests::{fixture, gemma_gguf};

fn hf_name(gguf: &str) -> (String, bool) {
    if gguf == "token_embd.weight" {
        return ("model.embed_tokens.weight".into(), false);
    }
    if gguf == "output_norm.weight" {
        return ("model.norm.weight".into(), true);
    }
    let rest = gguf.strip_prefix("blk.").expect("block tensor");
    let (layer, name) = rest.split_once('.').unwrap();
    let (hf, norm) = match name.strip_suffix(".weight").unwrap() {
        "attn_norm" => ("input_layernorm", true),
        "attn_q" => ("self_attn.q_proj", false),
        "attn_k" => ("self_attn.k_proj", false),
        "attn_v" => ("self_attn.v_proj", false),
        "attn_output" => ("self_attn.o_proj", false),
        "attn_q_norm" => ("self_attn.q_norm", true),
        "attn_k_norm" => ("self_attn.k_norm", true),
        "post_attention_norm" => ("post_attention_layernorm", true),
        "ffn_norm" => ("pre_feedforward_layernorm", true),
        "ffn_gate" => ("mlp.gate_proj", false),
        "ffn_up" => ("mlp.up_proj", false),
        "ffn_down" => ("mlp.down_proj", false),
        "post_ffw_norm" => ("post_feedforward_layernorm", true),
        other => panic!("unexpected tensor {other}"),
    };
    (format!("model.layers.{layer}.{hf}.weight"), norm)
}

#[test]
fn hf_directory_matches_gguf() {
    let path = gemma_gguf();
    let dir = tempfile::tempdir().unwrap();
    let mut gguf = Gguf::open(&path).unwrap();
    let mut tensors = HashMap::new();
    for name in gguf.tensor_names().into_iter().map(String::from).collect::<Vec<_>>() {
        let t = gguf.tensor(&name, &Device::Cpu).unwrap();
        let (hf, norm) = hf_name(&name);
        tensors.insert(hf, if norm { (t - 1.0).unwrap() } else { t });
    }
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    drop(tensors);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("gemma3/config.json")).unwrap()).unwrap();
    std::fs::write(dir.path().join("config.json"), config["transformers_config"].to_string()).unwrap();

    let tokens = Tensor::new(&[[2u32, 818, 5279, 529, 7001, 563]], &Device::Cpu).unwrap();
    let from_gguf = model::load(&path).unwrap().forward(&tokens, &mut Hooks::new()).unwrap().unwrap();
    let hf = model::load(dir.path()).unwrap();
    assert_eq!(hf.config(), model::load(&path).unwrap().config());
    let from_hf = hf.forward(&tokens, &mut Hooks::new()).unwrap().unwrap();
    let diff = (from_gguf - from_hf).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "logits differ by {diff}");
}
