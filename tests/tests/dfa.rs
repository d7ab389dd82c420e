//! Attention-output SAEs and direct feature attribution: DFA is exact (Σ_h DFA_i(h) + bias = the
//! SAE's pre-activation, Σ_s DFA_i(h, s) = DFA_i(h)) at `hook_z` and in the residual stream, on the
//! tiny GPT-2 and on Gemma 3 270M; the residual components sum to the stream; a `hook_z`
//! dictionary trains, splices and analyses (head attribution against a brute-force recomputation);
//! `loupe dfa` end to end, with its bad inputs.

use candle_core::{DType, Device, IndexOp, Tensor};
use loupe_analysis::heads::dfa::{Dfa, DfaKind, dfa};
use loupe_dict::sae::{Sae, SaeSpec};
use loupe_dict::{Dictionary, Variant};
use loupe_model::{self as model, HookedModel, Hooks};
use loupe_store::{FeatureTables, Store};
use loupe_tests::{assert_one_error, gemma_gguf, loupe, stderr, tiny_model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A random SAE with non-zero biases (so that the b_dec and b_enc terms are exercised).
fn random_sae(d: usize, n: usize, k: usize, seed: u64) -> Sae {
    let mut sae = Sae::init(SaeSpec { variant: Variant::Topk, d_in: d, n_features: n, k }, seed);
    let mut rng = StdRng::seed_from_u64(seed);
    sae.w_enc.iter_mut().for_each(|w| *w += rng.random_range(-0.1..0.1f32));
    sae.b_enc.iter_mut().for_each(|b| *b = rng.random_range(-0.5..0.5f32));
    sae.b_dec.iter_mut().for_each(|b| *b = rng.random_range(-0.5..0.5f32));
    sae
}

/// Σ contributions + bias against the pre-activation, relative to the pre-activation's scale
/// (the largest |pre| and |contribution| over the prompt); and per source against per head.
fn check_exact(d: &Dfa, tolerance: f32) {
    let scale = d
        .pre_activation
        .iter()
        .chain(d.contributions.iter().flatten())
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(1e-6);
    for (p, row) in d.contributions.iter().enumerate() {
        assert_eq!(row.len(), d.components.len());
        let sum: f64 = row.iter().map(|&v| v as f64).sum::<f64>() + d.bias as f64;
        let err = (sum - d.pre_activation[p] as f64).abs() as f32 / scale;
        assert!(
            err <= tolerance,
            "position {p}: Σ + bias = {sum}, pre-activation {} (rel {err})",
            d.pre_activation[p]
        );
    }
    if let Some(per_source) = &d.per_source {
        for (p, heads) in per_source.iter().enumerate() {
            for (h, sources) in heads.iter().enumerate() {
                assert_eq!(sources.len(), p + 1);
                let sum: f64 = sources.iter().map(|&v| v as f64).sum();
                let err = (sum - d.contributions[p][h] as f64).abs() as f32 / scale;
                assert!(
                    err <= tolerance,
                    "position {p} head {h}: Σ_s = {sum}, DFA {}",
                    d.contributions[p][h]
                );
            }
        }
    }
}

/// The SAE's own inference agrees with the pre-activations DFA reports: every code the SAE
/// selects at a position equals that position's pre-activation of the feature.
/// (The forward pass here may take the fused attention kernel, DFA's the unfused one: `tolerance`.)
fn check_codes(model: &dyn HookedModel, sae: &Sae, hook: &str, tokens: &[u32], d: &Dfa, tolerance: f32) {
    let input = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap();
    let mut hooks = Hooks::new().capture(hook);
    model.forward(&input, &mut hooks).unwrap();
    let x: Vec<f32> = hooks.get(hook).unwrap().i(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let codes = sae.encode(&x);
    for p in 0..tokens.len() {
        let (a, b) = (codes.offsets[p] as usize, codes.offsets[p + 1] as usize);
        for j in a..b {
            if codes.feature[j] == d.feature {
                let (v, pre) = (codes.value[j], d.pre_activation[p]);
                assert!(
                    (v - pre).abs() <= tolerance * pre.abs().max(1.0),
                    "position {p}: code {v}, pre {pre}"
                );
            }
        }
    }
}

/// Row-wise max |a − b| / max |b| (the BOS row of Gemma is far larger than the others).
fn worst_relative(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) =
        (a.to_dtype(DType::F32).unwrap().i(0).unwrap(), b.to_dtype(DType::F32).unwrap().i(0).unwrap());
    (0..b.dim(0).unwrap())
        .map(|r| {
            let (ar, br) = (a.i(r).unwrap(), b.i(r).unwrap());
            let diff = (ar - &br).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            diff / br.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6)
        })
        .fold(0.0, f32::max)
}

/// The components of the residual stream sum to it at every residual hook listed.
fn check_components(model: &dyn HookedModel, tokens: &[u32], hooks_at: &[&str], tolerance: f32) {
    let input = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap();
    for &hook in hooks_at {
        let parts = model.residual_components(&input, hook).unwrap();
        let mut sum = parts[0].1.zeros_like().unwrap();
        for (_, t) in &parts {
            sum = (sum + t).unwrap();
        }
        let mut hooks = Hooks::new().capture(hook);
        model.forward(&input, &mut hooks).unwrap();
        let err = worst_relative(&sum, hooks.get(hook).unwrap());
        assert!(err <= tolerance, "{hook}: components sum to the stream within {err}");
    }
}

fn names(d: &Dfa) -> Vec<&str> {
    d.components.iter().map(String::as_str).collect()
}

#[test]
fn dfa_is_exact_on_the_tiny_gpt2() {
    let model = model::load(&loupe_tests::fixture("gpt2-tiny")).unwrap();
    let c = model.config().clone();
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % c.vocab_size as u32).collect();

    // Attention output: 4 heads × 16.
    let hook = "blocks.1.attn.hook_z";
    let sae = random_sae(c.n_heads * c.d_head, 32, 4, 1);
    for f in [0, 7, 31] {
        let d = dfa(model.as_ref(), &sae, hook, f, &tokens).unwrap();
        assert_eq!(d.kind, DfaKind::Heads { layer: 1 });
        assert_eq!(names(&d), ["1.0", "1.1", "1.2", "1.3"]);
        check_exact(&d, 1e-4);
        check_codes(model.as_ref(), &sae, hook, &tokens, &d, 1e-4);
        assert!(d.contributions.iter().flatten().any(|v| v.abs() > 1e-3), "all contributions vanish");
    }

    // Residual stream, middle of the 2 layers, and the other residual hooks.
    let sae = random_sae(c.d_model, 32, 4, 2);
    for hook in
        ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.0.hook_resid_post", "hook_embed"]
    {
        let d = dfa(model.as_ref(), &sae, hook, 3, &tokens).unwrap();
        assert_eq!(d.kind, DfaKind::Residual { hook: hook.into() });
        check_exact(&d, 1e-4);
        check_codes(model.as_ref(), &sae, hook, &tokens, &d, 1e-4);
    }
    let d = dfa(model.as_ref(), &sae, "blocks.1.hook_resid_pre", 3, &tokens).unwrap();
    assert_eq!(names(&d), ["embed", "pos_embed", "0.0", "0.1", "0.2", "0.3", "0.attn_bias", "0.mlp"]);
    check_components(
        model.as_ref(),
        &tokens,
        &[
            "hook_embed",
            "blocks.0.hook_resid_pre",
            "blocks.1.hook_resid_pre",
            "blocks.1.hook_resid_mid",
            "blocks.1.hook_resid_post",
        ],
        1e-5,
    );

    // Refusals: another hook, a feature out of range, no tokens, a width that is not the hook's.
    let err = dfa(model.as_ref(), &sae, "blocks.0.hook_mlp_out", 0, &tokens).unwrap_err().to_string();
    assert!(
        err.contains("blocks.L.attn.hook_z")
            && err.contains("hook_resid_pre")
            && err.contains("blocks.0.hook_mlp_out"),
        "{err}"
    );
    let err = dfa(model.as_ref(), &sae, "blocks.1.hook_resid_pre", 32, &tokens).unwrap_err().to_string();
    assert_eq!(err, "feature 32 does not exist (the dictionary has 32 features)");
    assert!(dfa(model.as_ref(), &sae, "blocks.1.hook_resid_pre", 0, &[]).is_err());
    let narrow = random_sae(16, 8, 2, 3);
    assert!(
        dfa(model.as_ref(), &narrow, "blocks.1.attn.hook_z", 0, &tokens)
            .unwrap_err()
            .to_string()
            .contains("width 16")
    );
}

#[test]
fn dfa_is_exact_on_gemma3() {
    let model = model::load(&gemma_gguf()).unwrap();
    let c = model.config().clone();
    // A BOS, then ordinary token ids.
    let tokens: Vec<u32> = std::iter::once(2).chain((0..30).map(|i| 1000 + i * 97)).collect();
    let hook = "blocks.5.attn.hook_z";
    let sae = random_sae(c.n_heads * c.d_head, 64, 8, 4);
    for f in [0, 33] {
        let d = dfa(model.as_ref(), &sae, hook, f, &tokens).unwrap();
        assert_eq!(names(&d), ["5.0", "5.1", "5.2", "5.3"]);
        check_exact(&d, 1e-4);
        check_codes(model.as_ref(), &sae, hook, &tokens, &d, 1e-3);
    }
    let sae = random_sae(c.d_model, 64, 8, 5);
    for hook in ["blocks.6.hook_resid_pre", "blocks.6.hook_resid_mid"] {
        let d = dfa(model.as_ref(), &sae, hook, 9, &tokens).unwrap();
        check_exact(&d, 1e-4);
        check_codes(model.as_ref(), &sae, hook, &tokens, &d, 1e-3);
        assert_eq!(d.components[0], "embed");
        assert!(d.components.iter().any(|n| n == "5.3") && d.components.iter().any(|n| n == "5.mlp"));
    }
    check_components(
        model.as_ref(),
        &tokens,
        &["hook_embed", "blocks.3.hook_resid_mid", "blocks.6.hook_resid_pre"],
        1e-4,
    );
}

/// The tiny model with a BOS token (NUL), so that capture prepends it and splicing can run.
fn tiny_model_with_bos(dir: &std::path::Path) -> std::path::PathBuf {
    let model = tiny_model(dir);
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
    model
}

#[test]
fn a_hook_z_dictionary_trains_splices_analyses_and_answers_dfa() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_with_bos(&tmp.path().join("model"));
    let corpus = tmp.path().join("corpus.txt");
    let text: String = (0..400).map(|i| format!("the cat {} sat on the mat {}. ", i % 7, i % 13)).collect();
    std::fs::write(&corpus, text).unwrap();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    let hook = "blocks.1.attn.hook_z";
    let run = |args: &[&str]| {
        let out = loupe(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[
        "capture",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--store",
        s,
        "--hook",
        hook,
        "--context",
        "32",
        "--max-tokens",
        "6000",
    ]);
    // Capture flattens [batch, pos, head, d_head] into rows of head · d_head.
    assert_eq!(Store::open(&store).unwrap().manifest().hooks[hook].spec.d, 64);
    run(&[
        "train-sae",
        "--store",
        s,
        "--dictionary",
        "z",
        "--hook",
        hook,
        "--n-features",
        "32",
        "--k",
        "4",
        "--tokens",
        "4000",
        "--batch",
        "256",
        "--eval-contexts",
        "8",
    ]);
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("dictionaries/z/eval.json")).unwrap()).unwrap();
    let splice = &eval["splice"];
    assert!(splice.get("skipped").is_none(), "splicing at hook_z was skipped: {splice}");
    for key in ["ce_loss_recovered", "kl", "ce_spliced"] {
        assert!(splice[key].as_f64().is_some_and(f64::is_finite), "{key}: {splice}");
    }
    assert!(splice["kl"].as_f64().unwrap() >= 0.0);
    run(&["analyze", "--store", s, "--dictionary", "z", "--no-index"]);

    // Head attribution: one row per feature, 4 heads summing to 1, equal to a recomputation
    // from the saved decoder.
    let opened = Store::open(&store).unwrap();
    let tables = FeatureTables::open(&opened, "z").unwrap();
    let (sae, _) = loupe_dict::io::load_sae(&opened.dictionary_dir("z")).unwrap();
    for f in 0..32u32 {
        let w = tables.head_attribution(f).expect("head attribution");
        assert_eq!(w.len(), 4);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5, "feature {f}: {w:?}");
        let row = &sae.w_dec[f as usize * 64..(f as usize + 1) * 64];
        let norms: Vec<f64> =
            row.chunks(16).map(|b| b.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()).collect();
        let total: f64 = norms.iter().sum();
        for h in 0..4 {
            assert!((w[h] as f64 - norms[h] / total).abs() < 1e-6, "feature {f} head {h}");
        }
    }
    let top = tables.top_features_for_head(2, 5);
    assert!(!top.is_empty() && top.len() <= 5);
    assert!(top.windows(2).all(|p| p[0].1 >= p[1].1), "{top:?}");
    for &(f, w) in &top {
        assert_eq!(w, tables.head_attribution(f).unwrap()[2]);
        assert!(!tables.stats(f).unwrap().dead);
    }
    let best_alive = (0..32u32)
        .filter(|&f| !tables.stats(f).unwrap().dead)
        .map(|f| tables.head_attribution(f).unwrap()[2])
        .fold(0.0f32, f32::max);
    assert_eq!(top[0].1, best_alive);
    assert!(tables.top_features_for_head(9, 5).is_empty());
    assert!(tables.head_attribution(32).is_none());
    drop((tables, opened));

    // `loupe dfa`, text and JSON.
    let base = ["dfa", "--store", s, "--dictionary", "z"];
    let text = run(&[&base[..], &["--feature", "3", "--prompt", "the cat sat on the mat"]].concat());
    assert!(text.contains("feature 3 of z at blocks.1.attn.hook_z"), "{text}");
    assert!(text.contains("top source tokens of head 1."), "{text}");
    let json = run(&[
        &base[..],
        &["--feature", "3", "--prompt", "the cat sat on the mat", "--position", "4", "--json"],
    ]
    .concat());
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kind"]["kind"], "heads");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 22);
    let per_source = v["per_source"].as_array().unwrap();
    assert_eq!(per_source.len(), 22);
    let bias = v["bias"].as_f64().unwrap();
    for (p, row) in v["contributions"].as_array().unwrap().iter().enumerate() {
        let sum: f64 = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum::<f64>() + bias;
        let pre = v["pre_activation"][p].as_f64().unwrap();
        assert!((sum - pre).abs() <= 1e-4 * pre.abs().max(1.0), "position {p}: {sum} vs {pre}");
    }

    // Bad input: one error line each, the store untouched (every file as it was).
    let other = Sae::init(SaeSpec { variant: Variant::Topk, d_in: 256, n_features: 8, k: 2 }, 1);
    loupe_tests::planted::commit_sae(
        &Store::open_rw(&store).unwrap(),
        "mlp",
        &other,
        "blocks.0.mlp.hook_post",
    );
    let before = loupe_tests::snapshot(&store);
    let bad = |args: &[&str], needle: &str| assert_one_error(&store, &[&base[..], args].concat(), needle);
    bad(&["--feature", "32", "--prompt", "x"], "feature 32 does not exist (z has 32 features)");
    bad(&["--feature", "0", "--prompt", ""], "the prompt is empty");
    bad(
        &["--feature", "0", "--prompt", "abc", "--position", "3"],
        "--position 3 is beyond the prompt's 3 tokens",
    );
    let named = |dict: &str| {
        ["dfa", "--store", s, "--dictionary", dict, "--feature", "0", "--prompt", "x"].map(String::from)
    };
    let args = named("nope");
    assert_one_error(
        &store,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "no dictionary named \"nope\"",
    );
    // A dictionary at another hook.
    let args = named("mlp");
    assert_one_error(
        &store,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "this dictionary reads blocks.0.mlp.hook_post",
    );
    assert!(before == loupe_tests::snapshot(&store), "a refused dfa changed the store");

    // A store that records no model.
    let planted = tmp.path().join("planted");
    drop(loupe_tests::planted::planted_store(&planted, &loupe_tests::planted::planted_values()));
    let p = planted.to_str().unwrap();
    assert_one_error(
        &planted,
        &["dfa", "--store", p, "--dictionary", "sae", "--feature", "0", "--prompt", "x"],
        "the store records no model",
    );
}
