//! MoE-X end to end on the tiny GPT-2 fixture: capture an MLP's input and output and a residual,
//! `train-moex` as an autoencoder and as a transcoder (eval.json with CE-loss recovered), `loupe
//! analyze` on it, `open_in_store` giving the expert layout and the routing, and bad input (one
//! error line, store unchanged).

use std::path::Path;

use loupe_dict::{ExpertLayout, open_in_store};
use loupe_store::{FeatureTables, Store};
use loupe_tests::{assert_one_error, loupe, stderr, tiny_model};

const INPUT: &str = "blocks.0.ln2.hook_normalized";
const OUTPUT: &str = "blocks.0.hook_mlp_out";
const RESID: &str = "blocks.0.hook_resid_post";

fn run(args: &[&str]) -> String {
    let out = loupe(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stderr(&out)
}

fn captured(dir: &Path) -> std::path::PathBuf {
    let model = tiny_model(&dir.join("model"));
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
    let corpus = dir.join("corpus.txt");
    let text: String = (0..400).map(|i| format!("the cat {} sat on the mat {}. ", i % 7, i % 13)).collect();
    std::fs::write(&corpus, text).unwrap();
    let store = dir.join("store");
    let mut args = vec!["capture", "--model", model.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()];
    args.extend(["--store", store.to_str().unwrap(), "--context", "32", "--max-tokens", "6000"]);
    for hook in [INPUT, OUTPUT, RESID] {
        args.extend(["--hook", hook]);
    }
    run(&args);
    store
}

fn held_out_rows(store: &Store, hook: &str, rows: usize) -> Vec<f32> {
    let acts = store.activations(hook).unwrap();
    let shard = acts.open_shard(0).unwrap();
    let d = acts.spec().d as usize;
    let mut x = Vec::new();
    shard.act().rows(0..rows, d).to_f32_into(&mut x);
    x
}

#[test]
fn moex_trains_as_autoencoder_and_transcoder_and_is_analysed() {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = captured(tmp.path());
    let s = store_path.to_str().unwrap();
    let common =
        ["--experts", "8", "--expert-width", "16", "--top-k", "2", "--tokens", "8000", "--batch", "256"];
    let report = run(&[
        &["train-moex", "--store", s, "--hook", OUTPUT, "--input-hook", INPUT, "--dictionary", "tc"][..],
        &common,
        &["--lr", "0.003", "--eval-contexts", "4"],
    ]
    .concat());
    assert!(report.contains("transcoder blocks.0.ln2.hook_normalized → blocks.0.hook_mlp_out"), "{report}");
    run(&[
        &["train-moex", "--store", s, "--hook", RESID, "--dictionary", "ae"][..],
        &common,
        &["--lr", "0.003"],
    ]
    .concat());

    let store = Store::open(&store_path).unwrap();
    let manifest = store.manifest();
    for (name, reads, writes) in [("tc", INPUT, Some(OUTPUT)), ("ae", RESID, None)] {
        let entry = &manifest.dictionaries[name];
        assert_eq!(entry.kind, "moex");
        assert_eq!(entry.hook, reads);
        assert_eq!(entry.output_hook.as_deref(), writes);
        assert_eq!(entry.n_features, 128);
        let dir = store.dictionary_dir(name);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cfg.json")).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], "moex");
        assert_eq!(cfg["spec"]["experts"], 8);
        assert!(dir.join("sae_weights.safetensors").exists());
        let eval: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("eval.json")).unwrap()).unwrap();
        let fvu = eval["held_out"]["fvu"].as_f64().unwrap();
        assert!(fvu.is_finite() && fvu < 0.9, "{name}: held-out FVU {fvu}");
        let l0 = eval["held_out"]["l0"].as_f64().unwrap();
        assert!(l0 > 0.0 && l0 <= 32.0, "{name}: L0 {l0} (at most k·m = 32)");
        assert!(eval["held_out"]["dead_fraction"].as_f64().is_some());
        if name == "tc" {
            for key in ["ce_loss_recovered", "kl", "ce_spliced"] {
                assert!(eval["splice"][key].as_f64().is_some_and(f64::is_finite), "{name} {key}: {eval}");
            }
        }
        // Loaded through the store: the expert layout, the routing, and codes inside the routes.
        let (_, dict) = open_in_store(&store, name).unwrap();
        assert_eq!(dict.experts(), Some(ExpertLayout { n_experts: 8, features_per_expert: 16 }));
        assert_eq!(dict.decoder_directions().map(<[f32]>::len), Some(128 * 64));
        let x = held_out_rows(&store, reads, 50);
        let route = dict.route(&x).unwrap();
        let codes = dict.encode(&x);
        assert_eq!(route.tokens(), 50);
        for t in 0..50 {
            let (experts, gates) = route.row(t);
            assert_eq!(experts.len(), 2, "token {t}: {experts:?}");
            assert!((gates.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            let (features, _) = codes.row(t);
            assert!(features.iter().all(|f| experts.contains(&(f / 16))), "token {t}");
        }
    }

    // Analysis: the features of a MoE-X have fixed decoder directions, like an SAE's.
    let out = loupe(&["analyze", "--store", s, "--dictionary", "ae", "--top", "3", "--no-index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = Store::open(&store_path).unwrap();
    let tables = FeatureTables::open(&store, "ae").unwrap();
    let live = (0..128u32).filter(|&f| !tables.stats(f).unwrap().dead).count();
    assert!(live > 0, "no live feature after analysis");
}

#[test]
fn bad_moex_settings_get_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let store = captured(tmp.path());
    let s = store.to_str().unwrap();
    let base = ["train-moex", "--store", s, "--hook", OUTPUT, "--dictionary", "bad", "--batch", "100"];
    let one_error =
        |extra: &[&str], needle: &str| assert_one_error(&store, &[&base[..], extra].concat(), needle);
    one_error(&["--experts", "4", "--top-k", "4"], "--top-k 4 must be between 1 and experts − 1 = 3");
    one_error(&["--experts", "1", "--top-k", "1"], "at least 2 experts");
    one_error(&["--expert-width", "0"], "expert width");
    one_error(&["--input-hook", "blocks.9.nope"], "no activations for hook");
    one_error(&["--lr", "0"], "learning rate");
}
