//! The sparse-MoE runtime (OLMoE, Qwen3-MoE) against transformers on tiny random checkpoints
//! (tests/fixtures/{olmoe,qwen3moe}-tiny, made by tests/fixtures/moe_ref.py): logits, router logits
//! and probabilities, the chosen experts and their weights (with and without `norm_topk_prob`),
//! interventions at the router hooks, `loupe capture` of them, and refused or broken checkpoints.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use loupe_model::{self as model, Hooks, Intervention};
use loupe_store::Store;
use loupe_tests::{fixture, loupe, stderr};

const LAYERS: usize = 2;

fn reference(dir: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(&format!("{dir}/moe_reference.safetensors")), &Device::Cpu)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn ids(reference: &HashMap<String, Tensor>, p: usize) -> Tensor {
    reference[&format!("p{p}.ids")].to_dtype(DType::U32).unwrap()
}

/// Every prompt of `dir`'s reference: logits ≤ 1e-4, router probabilities and expert weights
/// ≤ 1e-5, router logits and the residual stream ≤ 1e-4, identical expert choices; prompts 0 and 1
/// through the fused attention kernel, prompt 2 through the explicit path.
fn matches_transformers(dir: &str, arch: &str, norm_topk_prob: bool) {
    let model = model::load(&fixture(dir)).unwrap();
    let c = model.config();
    assert_eq!((c.architecture.as_str(), c.n_experts, c.experts_per_token), (arch, 8, 2));
    let reference = reference(dir);
    let per_layer = ["hook_router_logits", "hook_router_probs", "hook_expert_weights", "hook_expert_indices"];
    for p in 0..3 {
        let mut hooks = Hooks::new();
        for l in 0..LAYERS {
            for h in per_layer {
                hooks = hooks.capture(format!("blocks.{l}.mlp.{h}"));
            }
            hooks = hooks.capture(format!("blocks.{l}.hook_resid_post"));
            if p == 2 {
                // The explicit attention path (the pattern computed) rather than the fused kernel.
                hooks = hooks.capture(format!("blocks.{l}.attn.hook_pattern"));
            }
        }
        let logits = model.forward(&ids(&reference, p), &mut hooks).unwrap().unwrap();
        let diff = max_diff(&logits, &reference[&format!("p{p}.logits")]);
        println!("{arch} p{p}: logits max abs diff {diff:e}");
        assert!(diff <= 1e-4, "{arch} p{p}: logits differ by {diff}");
        for l in 0..LAYERS {
            let ours = |h: &str| hooks.get(&format!("blocks.{l}.{h}")).unwrap().squeeze(0).unwrap();
            let theirs = |k: &str| reference[&format!("p{p}.blocks.{l}.{k}")].clone();
            for (hook, key, tol) in [
                ("mlp.hook_router_logits", "router_logits", 1e-4),
                ("mlp.hook_router_probs", "router_probs", 1e-5),
                ("mlp.hook_expert_weights", "expert_weights", 1e-5),
            ] {
                let diff = max_diff(&ours(hook), &theirs(key));
                println!("{arch} p{p} layer {l} {key}: max abs diff {diff:e}");
                assert!(diff <= tol, "{arch} p{p} layer {l}: {key} differ by {diff}");
            }
            let resid = hooks.get(&format!("blocks.{l}.hook_resid_post")).unwrap();
            let diff = max_diff(resid, &theirs("hook_resid_post"));
            assert!(diff <= 1e-4, "{arch} p{p} layer {l}: hook_resid_post differs by {diff}");
            let chosen: Vec<Vec<u32>> =
                ours("mlp.hook_expert_indices").to_dtype(DType::U32).unwrap().to_vec2().unwrap();
            let want: Vec<Vec<u32>> =
                theirs("expert_indices").to_dtype(DType::U32).unwrap().to_vec2().unwrap();
            assert_eq!(chosen, want, "{arch} p{p} layer {l}: chosen experts");
            // The weights of the chosen experts sum to 1 exactly when the model renormalises.
            let sums: Vec<f32> = ours("mlp.hook_expert_weights").sum(D::Minus1).unwrap().to_vec1().unwrap();
            for s in sums {
                assert_eq!((s - 1.0).abs() < 1e-5, norm_topk_prob, "{arch}: weights sum to {s}");
            }
        }
    }
}

#[test]
fn olmoe_matches_transformers_without_renormalised_weights() {
    matches_transformers("olmoe-tiny", "olmoe", false);
}

#[test]
fn qwen3_moe_matches_transformers_with_renormalised_weights() {
    matches_transformers("qwen3moe-tiny", "qwen3_moe", true);
}

/// A batch of two prompts gives each prompt's logits (routing is per token).
#[test]
fn a_batch_routes_each_prompt_as_alone() {
    let model = model::load(&fixture("qwen3moe-tiny")).unwrap();
    let reference = reference("qwen3moe-tiny");
    let (a, b) = (ids(&reference, 0), ids(&reference, 1));
    let n = a.dim(1).unwrap().min(b.dim(1).unwrap());
    let batch = Tensor::cat(&[a.narrow(1, 0, n).unwrap(), b.narrow(1, 0, n).unwrap()], 0).unwrap();
    let logits = model.forward(&batch, &mut Hooks::new()).unwrap().unwrap();
    for (i, p) in [0, 1].into_iter().enumerate() {
        let want = reference[&format!("p{p}.logits")].narrow(1, 0, n).unwrap();
        let diff = max_diff(&logits.narrow(0, i, 1).unwrap(), &want);
        assert!(diff <= 1e-4, "prompt {p} in a batch differs by {diff}");
    }
}

/// `hook_mlp_out` is the weighted sum of `hook_expert_out` over the chosen experts; zeroing the
/// expert weights zeroes the MLP; a large router logit for one expert makes every token choose
/// it; doubling one chosen expert's weight adds its output once more.
#[test]
fn interventions_at_the_router_hooks_change_the_routing() {
    let model = model::load(&fixture("olmoe-tiny")).unwrap();
    let tokens = ids(&reference("olmoe-tiny"), 0);
    let seq = tokens.dim(1).unwrap();
    let h = |s: &str| format!("blocks.1.{s}");
    let names = ["mlp.hook_expert_weights", "mlp.hook_expert_indices", "mlp.hook_expert_out", "hook_mlp_out"];
    let mut clean = names.iter().fold(Hooks::new(), |hk, n| hk.capture(h(n)));
    let clean_logits = model.forward(&tokens, &mut clean).unwrap().unwrap();
    let get = |hk: &Hooks, n: &str| hk.get(&h(n)).unwrap().clone();
    let (weights, out) = (get(&clean, names[0]), get(&clean, names[2]));
    let idx = get(&clean, names[1]).to_dtype(DType::U32).unwrap().contiguous().unwrap();
    let slot_weights = weights.gather(&idx, D::Minus1).unwrap();
    let sum = out.broadcast_mul(&slot_weights.unsqueeze(D::Minus1).unwrap()).unwrap().sum(2).unwrap();
    assert!(max_diff(&sum, &get(&clean, names[3])) <= 1e-6);

    let mut zero = Hooks::new().capture(h(names[3])).intervene(h(names[0]), Intervention::Zero);
    let logits = model.forward(&tokens, &mut zero).unwrap().unwrap();
    assert_eq!(get(&zero, names[3]).abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    assert!(
        max_diff(&logits, &clean_logits) > 1e-3,
        "zeroing the expert weights left the logits as they were"
    );

    let mut bias = vec![0f32; 8];
    bias[5] = 100.0;
    let add = Intervention::Add(Tensor::new(bias, &Device::Cpu).unwrap());
    let mut steered = Hooks::new().capture(h(names[1])).intervene(h("mlp.hook_router_logits"), add);
    model.forward(&tokens, &mut steered).unwrap();
    let first: Vec<f32> =
        get(&steered, names[1]).narrow(D::Minus1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(first, vec![5.0; seq], "a +100 router logit did not make expert 5 every token's first choice");

    // Double the first chosen expert's weight: the MLP output gains that expert's weighted output.
    let first_slot = out.narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
    let first_weight = slot_weights.narrow(D::Minus1, 0, 1).unwrap().contiguous().unwrap();
    let doubled = weights.clone();
    let mask = idx.narrow(D::Minus1, 0, 1).unwrap().contiguous().unwrap();
    let extra = Tensor::zeros_like(&weights).unwrap().scatter_add(&mask, &first_weight, D::Minus1).unwrap();
    let mut twice = Hooks::new()
        .capture(h(names[3]))
        .intervene(h(names[0]), Intervention::Replace((doubled + extra).unwrap()));
    model.forward(&tokens, &mut twice).unwrap();
    let want = (get(&clean, names[3]) + first_slot.broadcast_mul(&first_weight).unwrap()).unwrap();
    assert!(max_diff(&get(&twice, names[3]), &want) <= 1e-5);
}

/// A checkpoint in shards (`model.safetensors.index.json`) with transformers 5's stacked expert
/// tensors (`mlp.experts.gate_up_proj` `[experts, 2·d_expert, d_model]`, `mlp.experts.down_proj`)
/// and a transformers 4 config (`num_experts`, `rope_theta`) gives the same logits as the fixture.
#[test]
fn sharded_checkpoints_with_stacked_experts_load_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("stacked");
    std::fs::create_dir_all(&dir).unwrap();
    // The config as transformers 4 wrote it (the released checkpoints' spelling).
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen3moe-tiny/config.json")).unwrap())
            .unwrap();
    let obj = config.as_object_mut().unwrap();
    let n = obj.remove("num_local_experts").unwrap();
    obj.insert("num_experts".into(), n);
    let theta = obj.remove("rope_parameters").unwrap()["rope_theta"].clone();
    obj.insert("rope_theta".into(), theta);
    obj.insert("rope_scaling".into(), serde_json::Value::Null);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(fixture("qwen3moe-tiny/model.safetensors"), &Device::Cpu).unwrap();
    for l in 0..LAYERS {
        let mut take = |e: usize, w: &str| {
            tensors.remove(&format!("model.layers.{l}.mlp.experts.{e}.{w}.weight")).unwrap()
        };
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..8 {
            gate_up.push(Tensor::cat(&[take(e, "gate_proj"), take(e, "up_proj")], 0).unwrap());
            down.push(take(e, "down_proj"));
        }
        let p = format!("model.layers.{l}.mlp.experts");
        tensors.insert(format!("{p}.gate_up_proj"), Tensor::stack(&gate_up, 0).unwrap());
        tensors.insert(format!("{p}.down_proj"), Tensor::stack(&down, 0).unwrap());
    }
    let mut weight_map = serde_json::Map::new();
    let (mut first, mut second) = (HashMap::new(), HashMap::new());
    for (name, t) in tensors {
        let file = if name.contains("layers.1.") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        weight_map.insert(name.clone(), file.into());
        if file.starts_with("model-00001") {
            first.insert(name, t)
        } else {
            second.insert(name, t)
        };
    }
    candle_core::safetensors::save(&first, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&second, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let tokens = ids(&reference("qwen3moe-tiny"), 0);
    let logits = |d: &Path| model::load(d).unwrap().forward(&tokens, &mut Hooks::new()).unwrap().unwrap();
    let diff = max_diff(&logits(&dir), &logits(&fixture("qwen3moe-tiny")));
    assert_eq!(diff, 0.0, "the stacked, sharded checkpoint gives other logits");
}

/// Gradients reach the router through the expert weights.
#[test]
fn the_loss_gradient_reaches_the_router_logits() {
    let model = model::load(&fixture("qwen3moe-tiny")).unwrap();
    let tokens = ids(&reference("qwen3moe-tiny"), 1);
    let hook = "blocks.0.mlp.hook_router_logits";
    let mut hooks = Hooks::new().grad(hook);
    let logits = model.forward(&tokens, &mut hooks).unwrap().unwrap();
    let loss = loupe_model::next_token_loss(&logits, &tokens).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads.get(hooks.var(hook).unwrap().as_tensor()).expect("a gradient at the router logits");
    assert!(grad.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

/// `loupe capture` of the expert weights and router probabilities stores one row of n_experts
/// values per token, equal to the model's.
#[test]
fn capture_stores_the_expert_weights_per_token() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(corpus.join("a.txt"), "The whale swam past the ship. Call me Ishmael. ".repeat(4))
        .unwrap();
    let store = tmp.path().join("store");
    let hooks = [
        "blocks.0.mlp.hook_expert_weights",
        "blocks.1.mlp.hook_router_probs",
        "blocks.1.mlp.hook_router_logits",
    ];
    let model_dir = fixture("olmoe-tiny");
    let mut args =
        vec!["capture", "--model", model_dir.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()];
    args.extend(["--store", store.to_str().unwrap(), "--context", "32", "--dtype", "f32", "--no-bos"]);
    for h in hooks {
        args.extend(["--hook", h]);
    }
    let out = loupe(&args);
    assert!(out.status.success(), "capture failed: {}", stderr(&out));
    let store = Store::open(&store).unwrap();
    for hook in hooks {
        let acts = store.activations(hook).unwrap();
        assert_eq!(acts.spec().d, 8, "{hook}");
        let shard = acts.open_shard(0).unwrap();
        let mut rows = Vec::new();
        shard.act().rows(0..shard.rows(), 8).to_f32_into(&mut rows);
        assert!(!rows.is_empty());
        if hook.ends_with("hook_expert_weights") {
            for row in rows.chunks(8) {
                assert_eq!(row.iter().filter(|&&w| w != 0.0).count(), 2, "{row:?}");
            }
        }
        if hook.ends_with("hook_router_probs") {
            for row in rows.chunks(8) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
            }
        }
    }
}

/// Write a checkpoint directory with `config` and no weights.
fn config_only(dir: &Path, config: serde_json::Value) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_str().unwrap().to_string()
}

fn one_error_line(model_dir: &str, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, "some text").unwrap();
    let store = tmp.path().join("store");
    let out = loupe(&[
        "capture",
        "--model",
        model_dir,
        "--corpus",
        corpus.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--hook",
        "blocks.0.hook_resid_post",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{err:?} does not mention {needle:?}");
    }
    assert!(!store.join("manifest.json").exists(), "a failed capture created a store");
}

/// MoE checkpoints whose router Loupe does not run are refused from their config alone (no
/// weights in the directory), naming what they are and what is supported.
#[test]
fn unsupported_routers_are_refused_before_any_weight_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mixtral = config_only(
        &tmp.path().join("mixtral"),
        serde_json::json!({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 2}),
    );
    one_error_line(&mixtral, &["\"mixtral\"", "Mixtral", "supported MoE: olmoe, qwen3_moe"]);
    let deepseek = config_only(
        &tmp.path().join("deepseek"),
        serde_json::json!({"model_type": "deepseek_v3", "n_routed_experts": 256, "n_shared_experts": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}),
    );
    one_error_line(
        &deepseek,
        &["\"deepseek_v3\"", "sigmoid", "grouped top-k", "shared experts", "supported MoE: olmoe"],
    );
    let qwen2 = config_only(
        &tmp.path().join("qwen2"),
        serde_json::json!({"model_type": "qwen2_moe", "num_experts": 60}),
    );
    one_error_line(&qwen2, &["\"qwen2_moe\"", "shared expert", "olmoe, qwen3_moe"]);
    let unknown = config_only(
        &tmp.path().join("unknown"),
        serde_json::json!({"model_type": "my_moe", "num_experts": 4}),
    );
    one_error_line(&unknown, &["\"my_moe\"", "a router Loupe does not know", "qwen3_moe"]);
    // Qwen3-MoE with dense layers.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen3moe-tiny/config.json")).unwrap())
            .unwrap();
    config["mlp_only_layers"] = serde_json::json!([1]);
    let dense = config_only(&tmp.path().join("dense"), config);
    one_error_line(&dense, &["dense MLP layers", "mlp_only_layers [1]"]);
}

/// A checkpoint missing a tensor, or holding one of the wrong shape, is refused naming it; a
/// truncated file is refused as such.
#[test]
fn missing_or_misshapen_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors =
        candle_core::safetensors::load(fixture("olmoe-tiny/model.safetensors"), &Device::Cpu).unwrap();
    let copy = |name: &str, edit: &dyn Fn(&mut HashMap<String, Tensor>)| -> String {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(fixture(&format!("olmoe-tiny/{f}")), dir.join(f)).unwrap();
        }
        let mut t = tensors.clone();
        edit(&mut t);
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
        dir.to_str().unwrap().to_string()
    };
    let missing = copy("missing", &|t| {
        t.remove("model.layers.1.mlp.experts.3.up_proj.weight");
    });
    one_error_line(&missing, &["no tensor model.layers.1.mlp.experts.3.up_proj.weight"]);
    let misshapen = copy("misshapen", &|t| {
        t.insert(
            "model.layers.0.mlp.gate.weight".into(),
            Tensor::zeros((7, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    one_error_line(
        &misshapen,
        &["tensor model.layers.0.mlp.gate.weight has shape [7, 32], expected [8, 32]"],
    );
}
