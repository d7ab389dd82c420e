//! Writes the seed corpora of the fuzz targets (`corpus/<target>/seed-*`) from files the
//! project's own writers make: a synthetic store with activations and an analysis, small SAEs
//! and a Monet layer in every dictionary layout, a tiny Gemma 3 GGUF with its tokenizer, and
//! configs and corpora as the README shows them. No model weights. Run by scripts/fuzz.sh
//! with `--seeds`; its output is committed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use loupe_fuzz::analysis::{self, DICT, N_FEATURES, TABLES};
use loupe_fuzz::join2;
use loupe_store::{DType, HookSpec};
use loupe_dict::io::{SaeMeta, save_sae, save_state};
use loupe_dict::monet::{Decomposition, Monet, MonetSpec};
use loupe_dict::sae::SaeSpec;
use loupe_dict::train::{Moments, TrainerState};
use loupe_dict::{Sae, TrainConfig, Variant};

// Built with the targets' coverage flags, so it links libFuzzer for the coverage callbacks;
// libFuzzer then wants the entry point a target defines (never called here).
use libfuzzer_sys as _;
#[unsafe(no_mangle)]
#[allow(improper_ctypes_definitions)]
pub extern "C" fn rust_fuzzer_test_input(_: &[u8]) -> i32 {
    0
}

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let tmp = std::env::temp_dir().join(format!("loupe-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    store_seeds(&out, &tmp)?;
    dictionary_seeds(&out, &tmp)?;
    gguf_seeds(&out, &tmp)?;
    text_seeds(&out)?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

fn seed(out: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let dir = out.join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("seed-{name}")), bytes).with_context(|| format!("seed {target}/{name}"))
}

/// Manifests, shards and feature tables of a synthetic store.
fn store_seeds(out: &Path, tmp: &Path) -> Result<()> {
    let root = tmp.join("store");
    let store = analysis::write(&root)?;
    for (i, table) in TABLES.iter().enumerate() {
        let listed = store.features(DICT).and_then(|e| e.find(table).cloned()).context("table listed")?;
        let bytes = std::fs::read(root.join(&listed.file))?;
        let mut input = vec![i as u8, N_FEATURES as u8];
        input.extend(bytes);
        seed(out, "features", table, &input)?;
    }
    seed(out, "manifest", "empty", loupe_store::Manifest::default().to_json().as_bytes())?;
    seed(out, "manifest", "analysis", &std::fs::read(root.join("manifest.json"))?)?;

    // Two hooks: f16 without grad (d 4), f32 with grad (d 3); two shards of 5 rows each.
    for (hook, d, dtype, grad) in [
        ("blocks.0.hook_resid_post", 4u32, DType::F16, false),
        ("blocks.1.hook_mlp_out", 3, DType::F32, true),
    ] {
        let mut w = store.activation_writer(hook, HookSpec { d, dtype, grad })?.with_shard_rows(5);
        let rows = 10u32;
        let doc: Vec<u32> = (0..rows).map(|r| r / 4).collect();
        let pos: Vec<u32> = (0..rows).map(|r| r % 4).collect();
        let token: Vec<u32> = (0..rows).map(|r| 100 + r).collect();
        let act: Vec<f32> = (0..rows * d).map(|i| i as f32 * 0.25 - 1.0).collect();
        let g = grad.then(|| act.iter().map(|v| v * 0.5).collect::<Vec<f32>>());
        if dtype == DType::F16 {
            let act: Vec<half::f16> = act.iter().map(|&v| half::f16::from_f32(v)).collect();
            w.append(&doc, &pos, &token, &act, None)?;
        } else {
            w.append(&doc, &pos, &token, &act, g.as_deref())?;
        }
        w.finish()?;
        let entry = store.manifest().hooks[hook].clone();
        for (s, shard) in entry.shards.iter().enumerate() {
            let bytes = std::fs::read(root.join("activations").join(hook).join(&shard.file))?;
            let flags = u8::from(dtype == DType::F32) | (u8::from(grad) << 1);
            let mut input = vec![d as u8, flags];
            input.extend((shard.rows as u16).to_le_bytes());
            input.extend(bytes);
            seed(out, "shard", &format!("{hook}-{s}"), &input)?;
        }
    }
    seed(out, "manifest", "store", &std::fs::read(root.join("manifest.json"))?)?;
    Ok(())
}

fn small_sae(variant: Variant, d: usize, n: usize, k: usize) -> Sae {
    let w =
        |len: usize, scale: f32| (0..len).map(|i| ((i * 7 % 11) as f32 - 5.0) * scale).collect::<Vec<f32>>();
    Sae {
        spec: SaeSpec { variant, d_in: d, n_features: n, k },
        w_enc: w(n * d, 0.1),
        b_enc: w(n, 0.01),
        w_dec: w(n * d, 0.2),
        b_dec: w(d, 0.05),
        threshold: variant.uses_threshold().then(|| vec![0.1; n]),
        threshold_relative: false,
    }
}

/// `(layout byte, JSON file, weights file)` of `dir` as the safetensors target reads them.
fn dict_input(layout: u8, dir: &Path, json: &str, weights: &str) -> Result<Vec<u8>> {
    let mut input = vec![layout];
    input.extend(join2(&std::fs::read(dir.join(json))?, &std::fs::read(dir.join(weights))?));
    Ok(input)
}

/// Dictionary folders in each layout the loaders read.
fn dictionary_seeds(out: &Path, tmp: &Path) -> Result<()> {
    let meta = SaeMeta {
        model_name: "gemma-3-270m".into(),
        hook_name: "blocks.0.hook_resid_post".into(),
        context_size: Some(64),
        ..SaeMeta::default()
    };
    for (variant, name) in [(Variant::Topk, "topk"), (Variant::Jumprelu, "jumprelu"), (Variant::Relu, "relu")]
    {
        let dir = tmp.join(name);
        let sae = small_sae(variant, 4, 6, 2);
        save_sae(&sae, &meta, &dir)?;
        seed(
            out,
            "safetensors",
            &format!("saelens-{name}"),
            &dict_input(0, &dir, "cfg.json", "sae_weights.safetensors")?,
        )?;
    }

    // sparsify: encoder.weight [n, d], encoder.bias, W_dec [n, d], b_dec.
    let (d, n) = (4usize, 6usize);
    let tensor = |shape: Vec<usize>| {
        let len: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..len).flat_map(|i| (i as f32 * 0.1).to_le_bytes()).collect();
        (shape, bytes)
    };
    let parts = [
        ("encoder.weight", tensor(vec![n, d])),
        ("encoder.bias", tensor(vec![n])),
        ("W_dec", tensor(vec![n, d])),
        ("b_dec", tensor(vec![d])),
    ];
    let views: Vec<(&str, safetensors::tensor::TensorView)> = parts
        .iter()
        .map(|(name, (shape, bytes))| {
            Ok((*name, safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)?))
        })
        .collect::<Result<_>>()?;
    let weights = safetensors::serialize(views, None)?;
    let mut input = vec![1u8];
    input.extend(join2(br#"{"k": 2, "expansion_factor": 1.5}"#, &weights));
    seed(out, "safetensors", "sparsify", &input)?;

    // A trainer checkpoint.
    let dir = tmp.join("state");
    std::fs::create_dir_all(&dir)?;
    let cfg = TrainConfig::new(Variant::Topk, d, n, 2, 8);
    let moments = |len: usize| Moments { m: vec![0.01; len], v: vec![0.001; len] };
    let state = TrainerState {
        step: 3,
        tokens: 24,
        w_enc: moments(n * d),
        b_enc: moments(n),
        w_dec: moments(n * d),
        b_dec: moments(d),
        since_fired: vec![2; n],
        density: vec![0.5; n],
        threshold: Moments::default(),
    };
    save_state(&cfg, &state, &serde_json::json!({"epoch": 0, "row": 24}), &dir)?;
    seed(out, "safetensors", "state", &dict_input(2, &dir, "state.json", "state.safetensors")?)?;

    // A Monet layer, each decomposition.
    for (decomposition, name) in [(Decomposition::Horizontal, "hd"), (Decomposition::Vertical, "vd")] {
        let dir = tmp.join(format!("monet-{name}"));
        let spec = MonetSpec { decomposition, d_in: 4, d_out: 4, experts: 3, heads: 2, topk: 1, dim: 2 };
        let monet = Monet::init(spec, 0)?;
        loupe_dict::monet::io::save(&monet, &meta, None, &dir)?;
        seed(
            out,
            "safetensors",
            &format!("monet-{name}"),
            &dict_input(3, &dir, "cfg.json", "monet_weights.safetensors")?,
        )?;
    }
    Ok(())
}

/// A one-layer Gemma 3 with a SentencePiece-style vocabulary, in F32 and in F16.
fn gguf_seeds(out: &Path, tmp: &Path) -> Result<()> {
    use gguf_file::Value as V;
    let (d, heads, kv, d_head, d_mlp) = (8usize, 2usize, 1usize, 4usize, 16usize);
    let tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "▁a", "b", "▁ab", "  "];
    for (dtype, name) in [(GgmlDType::F32, "gemma3-f32"), (GgmlDType::F16, "gemma3-f16")] {
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: &str, shape: &[usize]| -> Result<()> {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = (0..len).map(|i| ((i % 13) as f32 - 6.0) * 0.05).collect();
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
            let dt = if shape.len() == 1 { GgmlDType::F32 } else { dtype };
            tensors.push((name.to_string(), QTensor::quantize(&t, dt)?));
            Ok(())
        };
        add("token_embd.weight", &[tokens.len(), d])?;
        let p = |s: &str| format!("blk.0.{s}.weight");
        add(&p("attn_norm"), &[d])?;
        add(&p("attn_q"), &[heads * d_head, d])?;
        add(&p("attn_k"), &[kv * d_head, d])?;
        add(&p("attn_v"), &[kv * d_head, d])?;
        add(&p("attn_output"), &[d, heads * d_head])?;
        add(&p("attn_q_norm"), &[d_head])?;
        add(&p("attn_k_norm"), &[d_head])?;
        add(&p("post_attention_norm"), &[d])?;
        add(&p("ffn_norm"), &[d])?;
        add(&p("ffn_gate"), &[d_mlp, d])?;
        add(&p("ffn_up"), &[d_mlp, d])?;
        add(&p("ffn_down"), &[d, d_mlp])?;
        add(&p("post_ffw_norm"), &[d])?;
        add("output_norm.weight", &[d])?;
        let metadata: Vec<(&str, V)> = vec![
            ("general.architecture", V::String("gemma3".into())),
            ("gemma3.block_count", V::U32(1)),
            ("gemma3.embedding_length", V::U32(d as u32)),
            ("gemma3.attention.head_count", V::U32(heads as u32)),
            ("gemma3.attention.head_count_kv", V::U32(kv as u32)),
            ("gemma3.attention.key_length", V::U32(d_head as u32)),
            ("gemma3.feed_forward_length", V::U32(d_mlp as u32)),
            ("gemma3.context_length", V::U32(32)),
            ("gemma3.attention.sliding_window", V::U32(4)),
            ("gemma3.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
            ("gemma3.rope.freq_base", V::F32(1e6)),
            ("tokenizer.ggml.model", V::String("llama".into())),
            ("tokenizer.ggml.tokens", V::Array(tokens.iter().map(|t| V::String(t.to_string())).collect())),
            ("tokenizer.ggml.token_type", V::Array(vec![V::I32(1); tokens.len()])),
            ("tokenizer.ggml.scores", V::Array((0..tokens.len()).map(|i| V::F32(-(i as f32))).collect())),
            ("tokenizer.ggml.bos_token_id", V::U32(2)),
            ("tokenizer.ggml.eos_token_id", V::U32(1)),
            ("tokenizer.ggml.unknown_token_id", V::U32(3)),
            ("tokenizer.ggml.add_bos_token", V::Bool(true)),
        ];
        let path = tmp.join(format!("{name}.gguf"));
        let mut f = std::fs::File::create(&path)?;
        let meta_refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        drop(f);
        // The seed must load: it is the path into the model and tokenizer code.
        loupe_model::load(&path).with_context(|| format!("seed {name} does not load"))?;
        loupe_model::tokenizer::Tokenizer::load(&path)
            .with_context(|| format!("seed {name}'s tokenizer"))?;
        seed(out, "gguf", name, &std::fs::read(&path)?)?;
    }
    Ok(())
}

/// Configs and corpora, as the README and the tests write them.
fn text_seeds(out: &Path) -> Result<()> {
    seed(
        out,
        "llm_toml",
        "full",
        br#"base_url = "http://127.0.0.1:8080/v1"
model = "gemma-3-270m"
api_key_env = "OPENAI_API_KEY"
concurrency = 8
timeout_seconds = 30.0
max_retries = 3
backoff_seconds = 0.5
backoff_max_seconds = 8.0
temperature = 0.0
logprobs = true
system_as_user = false
cost_per_1m_prompt = 0.15
cost_per_1m_completion = 0.60
"#,
    )?;
    seed(out, "llm_toml", "minimal", b"base_url = \"https://api.example.com/v1\"\nmodel = \"m\"\n")?;
    seed(
        out,
        "train_toml",
        "sae",
        br#"store = "run/store"
hook = "blocks.6.hook_resid_post"
variant = "topk"
n_features = 16384
k = 32
lr = 2e-4
tokens = 1_000_000
batch = 4096
seed = 0
checkpoint_every = 50
eval_tokens = 16384
multi_topk = false
auxk_alpha = 0.03125
jumprelu_sparsity = "quadratic"
"#,
    )?;
    seed(
        out,
        "train_toml",
        "monet",
        br#"store = "run/store"
hook = "blocks.6.hook_resid_post"
name = "monet-l6"
decomposition = "horizontal"
experts = 64
heads = 8
topk = 8
dim = 12
no_normalize = true
"#,
    )?;
    seed(out, "corpus", "jsonl", b"\x00{\"text\": \"The cat sat.\"}\n\n{\"text\": \"caf\\u00e9 \\n two\", \"id\": 2}\n{\"text\": \"\"}\n")?;
    seed(out, "corpus", "text", b"\x01One document of plain text.\nSecond line \xc3\xa9.\n")?;
    Ok(())
}
