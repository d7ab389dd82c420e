//! `loupe graph` and `loupe graph export` on a store captured with the tiny GPT-2 fixture and
//! per-layer transcoders trained on it (`train-sae --input-hook`): the stored graph is the
//! library's pruned attribution graph, the export is circuit-tracer's JSON of it; bad input is
//! one error line and leaves the store byte-identical.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use loupe_analysis::graphs::{attribute::attribute, prune::prune, run::node_id};
use loupe_dict::transcoder::TranscoderSet;
use loupe_model::Session;
use loupe_store::Store;
use loupe_tests::{loupe, snapshot, stderr, tiny_model};

const PROMPT: &str = "Tom met Ann; Ann gave it to";

/// A store captured with the tiny model (two layers; its tokenizer gets a BOS, NUL) at every
/// layer's MLP input and output, and a per-layer transcoder `tc-L` trained for each layer.
fn setup(dir: &Path) -> PathBuf {
    let model = tiny_model(&dir.join("model"));
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, "Call me Ishmael. Some years ago - never mind how long precisely. ".repeat(40))
        .unwrap();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let mut args = vec!["capture", "--model", model.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()];
    args.extend(["--store", s, "--context", "32"]);
    let hooks: Vec<String> = (0..2)
        .flat_map(|l| [format!("blocks.{l}.ln2.hook_normalized"), format!("blocks.{l}.hook_mlp_out")])
        .collect();
    for hook in &hooks {
        args.extend(["--hook", hook]);
    }
    let out = loupe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    for l in 0..2 {
        let (input, output, name) = (
            format!("blocks.{l}.ln2.hook_normalized"),
            format!("blocks.{l}.hook_mlp_out"),
            format!("tc-{l}"),
        );
        let out = loupe(&[
            "train-sae",
            "--store",
            s,
            "--dictionary",
            &name,
            "--input-hook",
            &input,
            "--hook",
            &output,
            "--variant",
            "relu",
            "--n-features",
            "64",
            "--tokens",
            "3000",
            "--batch",
            "128",
            "--eval-contexts",
            "4",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    store
}

fn graph(store: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["graph", "--store", store.to_str().unwrap(), "--transcoders", "tc-0,tc-1"];
    args.extend(["--prompt", PROMPT]);
    args.extend(extra);
    loupe(&args)
}

#[test]
fn graph_is_the_pruned_attribution_graph_and_exports_as_circuit_tracer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = setup(tmp.path());
    let out = graph(&store_dir, &["--name", "g", "--max-feature-nodes", "40"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "graph g: 28 tokens, ",
        " active features, ",
        "replacement score ",
        "completeness score ",
        "top logit: ",
        "wall time ",
        "wrote circuits/graphs/g",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from {stdout}");
    }

    // The stored graph is the library's attribution graph, pruned.
    let store = Store::open(&store_dir).unwrap();
    let stored = store.read_graph("g").unwrap().unwrap();
    let e = &stored.entry;
    let session = Session::open(&store.manifest(), None, None).unwrap();
    let tokenizer = session.tokenizer().unwrap();
    let mut tokens = vec![tokenizer.bos_id().unwrap()];
    tokens.extend(tokenizer.encode(PROMPT, false).unwrap());
    assert_eq!(e.tokens, tokens);
    assert_eq!(e.token_strs.len(), tokens.len());
    assert_eq!((e.transcoder_kind.as_str(), e.n_layers), ("plt", 2));
    assert_eq!(e.settings.max_feature_nodes, 40);
    let names = vec!["tc-0".to_string(), "tc-1".to_string()];
    let set = TranscoderSet::from_store(&store, &names, 2).unwrap();
    let settings = e.settings.clone();
    let raw = attribute(session.model(), &set, &tokens, &settings, &()).unwrap();
    let pruned = prune(&raw, &settings).unwrap();
    assert_eq!(e.active_features, raw.active_features);
    assert_eq!((e.n_nodes, e.n_edges), (stored.nodes.len() as u64, stored.edges.len() as u64));
    assert_eq!(stored.nodes.len(), pruned.nodes.len());
    assert_eq!(stored.edges.len(), pruned.edges.len());
    for (row, &i) in stored.nodes.iter().zip(&pruned.nodes) {
        let node = &raw.nodes[i as usize];
        assert_eq!(row.node_id, node_id(node, 2));
        assert_eq!((row.kind.as_str(), row.position as usize), (node.kind.name(), node.position));
        assert_eq!(row.probability.is_some(), row.kind == "logit");
        assert!(
            (row.influence - pruned.influence[i as usize]).abs() <= 1e-5 * pruned.influence[i as usize].abs()
        );
    }
    let rows: HashMap<u32, u32> = pruned.nodes.iter().enumerate().map(|(r, &i)| (i, r as u32)).collect();
    for (edge, &(s, t, w)) in stored.edges.iter().zip(&pruned.edges) {
        assert_eq!((edge.source, edge.target), (rows[&s], rows[&t]));
        assert!((edge.weight - w).abs() <= 1e-4 * w.abs().max(1e-3));
    }
    for (ours, theirs) in [
        (e.replacement_score, pruned.replacement_score),
        (e.completeness_score, pruned.completeness_score),
        (e.replacement_score_unpruned, pruned.replacement_score_unpruned),
        (e.completeness_score_unpruned, pruned.completeness_score_unpruned),
    ] {
        assert!((0.0..=1.0).contains(&ours) && (ours - theirs).abs() < 1e-4, "{ours} vs {theirs}");
    }
    assert!(stored.nodes.iter().filter(|n| n.kind == "embedding").count() == tokens.len());
    assert!(stored.nodes.iter().any(|n| n.kind == "feature"), "no feature kept");

    // The export: circuit-tracer's JSON of the same nodes and links.
    let json_path = tmp.path().join("g.json");
    let out = loupe(
        &["graph", "export", "--store", store_dir.to_str().unwrap(), "--name", "g", "--out"]
            .into_iter()
            .chain([json_path.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(json["metadata"]["slug"], "g");
    assert_eq!(json["metadata"]["prompt"], PROMPT);
    assert_eq!(json["metadata"]["transcoder_list"], serde_json::json!(["tc-0", "tc-1"]));
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), stored.nodes.len());
    for (n, row) in nodes.iter().zip(&stored.nodes) {
        assert_eq!(n["node_id"], row.node_id.as_str());
    }
    assert_eq!(json["links"].as_array().unwrap().len(), stored.edges.len());

    // A rerun under the same name needs --overwrite.
    let out = graph(&store_dir, &["--name", "g", "--max-feature-nodes", "20", "--overwrite"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = Store::open(&store_dir).unwrap().read_graph("g").unwrap().unwrap();
    assert_eq!(again.entry.settings.max_feature_nodes, 20);
}

#[test]
fn bad_input_is_one_error_line_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = setup(tmp.path());
    let out = graph(&store_dir, &["--name", "kept", "--max-feature-nodes", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = store_dir.to_str().unwrap();

    // Transcoders of another model: tc-0's recorded model renamed (a SAELens transcoder trained
    // elsewhere keeps its model's name on import).
    let other_dir = tmp.path().join("other");
    let status = std::process::Command::new("cp").args(["-r", s, other_dir.to_str().unwrap()]).status();
    assert!(status.unwrap().success());
    let cfg_path = other_dir.join("dictionaries/tc-0/cfg.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["metadata"]["model_name"] = "google/gemma-3-270m".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let long = "ab ".repeat(40);
    let cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (&store_dir, vec!["--transcoders", "tc-0"], "no transcoder for layer 1"),
        (&other_dir, vec![], "transcoder tc-0 was trained on model \"google/gemma-3-270m\""),
        (&store_dir, vec!["--prompt", &long], "longer than the model's context of 64 tokens"),
        (&store_dir, vec!["--name", "kept"], "pass --overwrite"),
        (&store_dir, vec!["--transcoders", "tc-0,tc-9"], "no dictionary named \"tc-9\""),
        (&store_dir, vec!["--name", "a/b"], "a/b"),
        (&store_dir, vec!["--name", "evals"], "\"evals\" cannot name a circuit"),
    ];
    for (store, extra, needle) in cases {
        let before = snapshot(store);
        // Later flags win: the case's --transcoders / --prompt replace the defaults.
        let mut args = vec!["graph", "--store", store.to_str().unwrap()];
        let has = |flag: &str| extra.contains(&flag);
        if !has("--transcoders") {
            args.extend(["--transcoders", "tc-0,tc-1"]);
        }
        if !has("--prompt") {
            args.extend(["--prompt", PROMPT]);
        }
        args.extend(&extra);
        let out = loupe(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{extra:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{extra:?}: {err} lacks {needle:?}");
        assert!(before == snapshot(store), "{extra:?} changed the store");
    }

    let before = snapshot(&store_dir);
    let out_file = tmp.path().join("nope.json");
    let out =
        loupe(&["graph", "export", "--store", s, "--name", "nope", "--out", out_file.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no attribution graph named \"nope\" (it has: kept)"), "{err}");
    assert!(!out_file.exists());
    assert!(before == snapshot(&store_dir));
}
