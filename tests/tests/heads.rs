//! `loupe heads` on a store captured with the tiny GPT-2 fixture: the table, its settings, a rerun
//! replacing it, bad input leaving the store byte-identical; ablations from cached residuals
//! (`Hooks::start_at`, one batch per layer) against plain full forward passes.

use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};
use loupe_analysis::heads::ablation::ablations;
use loupe_analysis::heads::detectors::repeated_sequences;
use loupe_model::hooks::{in_block, names};
use loupe_model::{self as model, HookedModel, Hooks, Intervention};
use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{HOOK, fixture, gemma_gguf, loupe, snapshot, stderr, tiny_model, write_synthetic};

/// A store captured from a short text with the tiny model (context 32, no BOS), and the model.
fn captured(dir: &Path) -> (PathBuf, PathBuf) {
    let model = tiny_model(&dir.join("model"));
    let corpus = dir.join("corpus.txt");
    let text = "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money \
                in my purse, and nothing particular to interest me on shore, I thought I would sail about a \
                little and see the watery part of the world. ";
    std::fs::write(&corpus, text.repeat(8)).unwrap();
    let store = dir.join("store");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = loupe(&[
        "capture",
        "--model",
        &s(&model),
        "--corpus",
        &s(&corpus),
        "--store",
        &s(&store),
        "--hook",
        HOOK,
        "--no-bos",
        "--context",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    (store, model)
}

fn heads(store: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["heads", "--store", store.to_str().unwrap(), "--repeat-len", "20"];
    args.extend(extra);
    loupe(&args)
}

#[test]
fn heads_writes_one_row_per_head_with_its_settings_and_a_rerun_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = captured(tmp.path());
    let out = heads(&store, &["--mean-ablation"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "scored 8 heads (2 layers × 4)",
        "clean loss on the repeated half",
        "top induction: ",
        "wrote heads/default",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from {stdout}");
    }

    let s = Store::open(&store).unwrap();
    let table = s.read_heads("default").unwrap().expect("listed");
    assert_eq!((table.entry.n_layers, table.entry.n_heads), (2, 4));
    let order: Vec<(u16, u16)> = table.rows.iter().map(|r| (r.layer, r.head)).collect();
    assert_eq!(order, (0..2).flat_map(|l| (0..4).map(move |h| (l, h))).collect::<Vec<_>>());
    for r in &table.rows {
        for score in [
            r.induction,
            r.induction_mul,
            r.previous_token,
            r.duplicate_token,
            r.previous_token_text,
            r.duplicate_token_text,
        ] {
            assert!((0.0..=1.0).contains(&score), "{r:?}");
        }
        assert!(r.ablation_zero.is_finite() && r.ablation_mean.is_some_and(f32::is_finite), "{r:?}");
    }
    // The text repeats, so some head attends to earlier copies of a character.
    assert!(table.rows.iter().any(|r| r.duplicate_token_text > 0.0));
    let settings = &table.entry.settings;
    assert_eq!((settings.seed, settings.sequences, settings.repeat_len), (0, 16, 20));
    // Contexts of 32 captured tokens after BOS.
    assert_eq!((settings.text_sequences, settings.text_len), (16, 33));
    assert_eq!(settings.text_source, format!("captured tokens of {HOOK}"));
    assert!(settings.mean_ablation && settings.clean_loss.is_finite() && settings.clean_loss > 0.0);
    let recorded = s.manifest().model.unwrap();
    assert_eq!((&settings.model, &settings.model_sha256), (&recorded.name, &recorded.sha256));
    let first = table.entry.files.clone();

    // A rerun with another seed and no mean ablation replaces the entry and its file.
    let out = heads(&store, &["--seed", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = Store::open(&store).unwrap();
    let again = s.read_heads("default").unwrap().unwrap();
    assert_eq!(again.entry.settings.seed, 3);
    assert!(!again.entry.settings.mean_ablation && again.rows.iter().all(|r| r.ablation_mean.is_none()));
    assert_ne!(again.rows[0].induction, table.rows[0].induction);
    assert!(!store.join(&first[0].file).exists(), "the previous table is removed");
    assert_eq!(s.heads_names(), ["default"]);
    let verify = loupe(&["store", "verify", store.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", stderr(&verify));

    // Natural text from a file, under another name.
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "abcabcabc ".repeat(20)).unwrap();
    let out = heads(&store, &["--text", text.to_str().unwrap(), "--name", "from-file", "--text-len", "40"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let from_file = Store::open(&store).unwrap().read_heads("from-file").unwrap().unwrap();
    assert_eq!(from_file.entry.settings.text_source, text.display().to_string());
    // 200 characters in pieces of 39 after BOS: 6 sequences, the longest 40 tokens.
    assert_eq!((from_file.entry.settings.text_sequences, from_file.entry.settings.text_len), (6, 40));
}

#[test]
fn bad_input_is_one_error_line_and_leaves_the_store_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, model) = captured(tmp.path());
    let bare = tmp.path().join("bare");
    let spec = HookSpec { d: 8, dtype: DType::F32, grad: false };
    write_synthetic(&Store::create(&bare).unwrap(), HOOK, spec, 2, 20, 100, 1);
    let empty = tmp.path().join("empty");
    Store::create(&empty).unwrap();
    let m = model.to_str().unwrap();
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, "not a model").unwrap();
    let cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (&bare, vec![], "the store records no model; pass --model"),
        (&store, vec!["--name", "a/b"], "invalid heads name \"a/b\""),
        (&store, vec!["--sequences", "0"], "--sequences must be at least 1"),
        (&store, vec!["--repeat-len", "40"], "the model takes at most 64 (use --repeat-len 31 or less)"),
        (&store, vec!["--model", "/nonexistent/model"], "model not found"),
        (&store, vec!["--model", junk.to_str().unwrap()], "is not a GGUF file"),
        (&store, vec!["--text-len", "1"], "natural-text sequences need at least 2 tokens"),
        (&store, vec!["--text", "/nonexistent/text.txt"], "cannot read --text"),
        (&empty, vec!["--model", m], "no captured tokens"),
        // The synthetic store's token ids do not fit the model's vocabulary of 512.
        (&bare, vec!["--model", m], "outside the model's vocabulary"),
    ];
    for (dir, extra, needle) in cases {
        let before = snapshot(dir);
        let mut args = vec!["heads", "--store", dir.to_str().unwrap()];
        if !extra.contains(&"--repeat-len") {
            args.extend(["--repeat-len", "20"]);
        }
        args.extend(&extra);
        let out = loupe(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: {err}");
        assert!(before == snapshot(dir), "{args:?} changed the store");
    }
}

/// The mean next-token loss of rows |R| ..= 2|R| − 1 from full logits.
fn half_loss(logits: &Tensor, tokens: &Tensor, r: usize) -> f64 {
    let lp = candle_nn::ops::log_softmax(&logits.narrow(1, r, r).unwrap(), D::Minus1).unwrap();
    let targets = tokens.narrow(1, r + 1, r).unwrap().unsqueeze(2).unwrap();
    let picked = lp.gather(&targets.contiguous().unwrap(), 2).unwrap();
    -f64::from(picked.mean_all().unwrap().to_scalar::<f32>().unwrap())
}

#[test]
fn ablations_equal_plain_forward_passes_with_the_head_removed() {
    let model = model::load(&fixture("gpt2-tiny")).unwrap();
    let c = model.config().clone();
    let r = 12;
    let seqs = repeated_sequences(5, 3, r, c.vocab_size, 511);
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    let tokens = Tensor::from_vec(flat, (3, 2 * r + 1), &Device::Cpu).unwrap();
    let got = ablations(model.as_ref(), &seqs, r, true, &()).unwrap();

    let run = |hooks: &mut Hooks| half_loss(&model.forward(&tokens, hooks).unwrap().unwrap(), &tokens, r);
    let clean = run(&mut Hooks::new());
    assert!((f64::from(got.clean_loss) - clean).abs() < 1e-5, "{} vs {clean}", got.clean_loss);
    let mut z = Hooks::new();
    for l in 0..c.n_layers {
        z = z.capture(in_block(l, names::Z));
    }
    model.forward(&tokens, &mut z).unwrap();
    for l in 0..c.n_layers {
        let hook = in_block(l, names::Z);
        // [head, d_head]: the mean over sequences and positions.
        let mean = z.get(&hook).unwrap().mean(0).unwrap().mean(0).unwrap();
        for h in 0..c.n_heads {
            let zero = run(&mut Hooks::new().intervene(&hook, Intervention::ZeroHeads(vec![h]))) - clean;
            let i = l * c.n_heads + h;
            assert!((f64::from(got.zero[i]) - zero).abs() < 1e-5, "{l}.{h} zero: {} vs {zero}", got.zero[i]);
            let keep: Vec<f32> = (0..c.n_heads).map(|k| if k == h { 1.0 } else { 0.0 }).collect();
            let only_h =
                mean.broadcast_mul(&Tensor::new(keep, &Device::Cpu).unwrap().unsqueeze(1).unwrap()).unwrap();
            let mean_ablated = run(&mut Hooks::new()
                .intervene(&hook, Intervention::ZeroHeads(vec![h]))
                .intervene(&hook, Intervention::Add(only_h)))
                - clean;
            let m = got.mean.as_ref().unwrap()[i];
            assert!((f64::from(m) - mean_ablated).abs() < 1e-5, "{l}.{h} mean: {m} vs {mean_ablated}");
        }
    }
    // Heads of a random model change the loss.
    assert!(got.zero.iter().any(|d| d.abs() > 1e-3));
}

/// A pass started at block L from a cached `hook_resid_pre` gives the full pass' logits.
fn start_at_matches(model: &dyn HookedModel, tokens: &Tensor, layers: &[usize], tol: f32) {
    let mut full = Hooks::new();
    for &l in layers {
        full = full.capture(in_block(l, names::RESID_PRE));
    }
    let logits = model.forward(tokens, &mut full).unwrap().unwrap();
    for &l in layers {
        let resid = full.get(&in_block(l, names::RESID_PRE)).unwrap().clone();
        let started = model.forward(tokens, &mut Hooks::new().start_at(l, resid)).unwrap().unwrap();
        let diff =
            (&started - &logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= tol, "start at {l}: max |Δlogit| {diff}");
    }
    let resid = full.get(&in_block(layers[0], names::RESID_PRE)).unwrap().clone();
    let n = model.config().n_layers;
    let err = model.forward(tokens, &mut Hooks::new().start_at(n, resid.clone())).unwrap_err();
    assert!(err.to_string().contains("cannot start at block"), "{err}");
    let short = tokens.narrow(1, 0, 2).unwrap();
    assert!(model.forward(&short, &mut Hooks::new().start_at(0, resid)).is_err());
}

#[test]
fn starting_at_a_block_from_its_cached_input_gives_the_full_pass() {
    let gpt2 = model::load(&fixture("gpt2-tiny")).unwrap();
    let tokens = Tensor::from_vec((0..40u32).map(|i| i * 37 % 512).collect(), (2, 20), &Device::Cpu).unwrap();
    start_at_matches(gpt2.as_ref(), &tokens, &[0, 1], 0.0);
    let gemma = model::load(&gemma_gguf()).unwrap();
    let tokens =
        Tensor::from_vec(vec![2u32, 651, 6037, 529, 9201, 236761, 2, 651], (1, 8), &Device::Cpu).unwrap();
    start_at_matches(gemma.as_ref(), &tokens, &[0, 5, 17], 0.0);
}
