//! `loupe circuit eval` on the tiny GPT-2 fixture: circuits made from the task are taken from the
//! store (planted ones, so the table is known), missing ones computed and written, the evaluation
//! written and read back; bad input leaves the store byte-identical.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use loupe_analysis::circuits::eval_run::circuit_rows;
use loupe_analysis::circuits::{Scores, Task, edges, nodes};
use loupe_model::tokenizer::Tokenizer;
use loupe_store::Store;
use loupe_store::circuits::{CircuitEntry, TaskInfo};
use loupe_tests::{assert_one_error, loupe, snapshot, stderr, tiny_model};

/// The tiny model with `\n` as its BOS, a task file of four character-level pairs, an empty store.
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let model = tiny_model(&dir.join("model"));
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\n"}"#).unwrap();
    let task = dir.join("t.jsonl");
    let lines = [
        r#"{"clean": "abcabc", "corrupt": "abdabd", "answer": "a", "wrong": "b"}"#,
        r#"{"clean": "xyzxy", "corrupt": "xyqxy", "answer": "z", "wrong": "q"}"#,
        r#"{"clean": "hello hel", "corrupt": "jello hel", "answer": "l", "wrong": "m"}"#,
        r#"{"clean": "ab ab", "corrupt": "cd ab", "answer": " ", "wrong": "c"}"#,
    ];
    std::fs::write(&task, lines.join("\n") + "\n").unwrap();
    let store = dir.join("store");
    Store::create(&store).unwrap();
    (model, task, store)
}

fn eval(store: &Path, model: &Path, task: &Path, extra: &[&str]) -> std::process::Output {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut args = vec!["circuit".to_string(), "eval".into(), "--store".into(), s(store)];
    args.extend(["--model".into(), s(model), "--task".into(), s(task)]);
    args.extend(extra.iter().map(|a| a.to_string()));
    loupe(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A circuit entry of `method` made from `task` with `model` (as `loupe circuit` writes one).
fn plant(store: &Store, name: &str, method: &str, scores: &Scores, task: &Task, model: &Path, wall_s: f64) {
    let (node_rows, edge_rows) = circuit_rows(scores);
    let entry = CircuitEntry {
        method: method.into(),
        task: TaskInfo {
            file: task.file.clone(),
            sha256: task.sha256.clone(),
            pairs: task.pairs.len() as u32,
            metric: task.metric.name().into(),
            metric_clean: 0.0,
            metric_corrupt: 0.0,
            accuracy: 0.0,
        },
        n_layers: 2,
        n_heads: 4,
        settings: BTreeMap::new(),
        wall_s,
        model: "model".into(),
        model_sha256: loupe_model::capture::sha256_of_model(model).unwrap(),
        files: Vec::new(),
    };
    store.write_circuit(name, &node_rows, &edge_rows, entry).unwrap();
}

/// Every method's circuit planted in the store: the evaluation computes none, and its table
/// follows from the planted scores (this test needs no method implementation).
#[test]
fn eval_takes_the_circuits_made_from_the_task_from_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, task_path, store_dir) = setup(tmp.path());
    let task = Task::load(&task_path, &Tokenizer::load(&model).unwrap()).unwrap();
    let config = loupe_model::load(&model).unwrap().config().clone();
    let all = nodes(&config);
    let n = all.len();
    // Ground truth: node i has effect (−1)^i · i / 10 (|effects| distinct, 0.mlp = 0.2 …).
    let truth: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 0.1 } else { -0.1 } * i as f32).collect();
    let same_order = Scores {
        nodes: all.clone(),
        node_scores: truth.iter().map(|t| 2.0 * t).collect(),
        edges: edges(&all).into_iter().map(|(u, v)| (u, v, truth[u] * truth[v])).collect(),
    };
    let reversed = Scores {
        nodes: all.clone(),
        node_scores: (0..n).map(|i| (n - i) as f32).collect(),
        edges: Vec::new(),
    };
    let store = Store::open_rw(&store_dir).unwrap();
    let truth_scores = Scores { nodes: all.clone(), node_scores: truth.clone(), edges: Vec::new() };
    plant(&store, "t-patching", "patching", &truth_scores, &task, &model, 10.0);
    plant(&store, "t-attribution", "attribution", &same_order, &task, &model, 0.5);
    // Under another name than the default: found by method, task and model.
    plant(&store, "mine", "discrete-sae", &reversed, &task, &model, 2.0);
    drop(store);

    let out = eval(&store_dir, &model, &task_path, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "task t.jsonl: 4 pairs, logit_diff",
        "patching: circuits/t-patching (from the store)",
        "attribution: circuits/t-attribution (from the store)",
        "discrete-sae: circuits/mine (from the store)",
        "faithfulness f(k)",
        "wrote circuits/evals/t",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from {stdout}");
    }
    let store = Store::open(&store_dir).unwrap();
    assert_eq!(store.circuit_names(), ["mine", "t-attribution", "t-patching"], "nothing computed");
    let read = store.read_circuit_eval("t").unwrap().expect("listed");
    let methods: Vec<&str> = read.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["patching", "attribution", "discrete-sae"]);
    let (p, a, d) = (&read.rows[0], &read.rows[1], &read.rows[2]);
    assert_eq!((p.node_auc_top10, p.node_auc_abs, p.speedup, p.edge_auc_top10), (1.0, 1.0, 1.0, None));
    // Attribution ranks the nodes as the truth does: the same AUCs and curve. Its edges: under
    // |effect| ≥ 0.05 every node but 0.0 is positive, and only edges from 0.0 score 0, so they
    // rank perfectly; the top 10 % is one node (1.mlp), so no edge is positive: no AUC.
    assert_eq!((a.node_auc_top10, a.cpr, a.cmd, a.speedup), (1.0, p.cpr, p.cmd, 20.0));
    assert_eq!(a.edge_auc_abs, Some(1.0));
    assert!(a.edge_auc_top10.unwrap().is_nan());
    // Discrete-SAE ranks 0.0 first: the reverse of |truth|, AUC 0.
    assert_eq!((d.node_auc_top10, d.edge_auc_top10, d.speedup), (0.0, None, 5.0));
    assert_eq!((p.wall_s, a.wall_s, d.wall_s), (10.0, 0.5, 2.0));
    assert_eq!(read.faithfulness.len(), 3 * 7);
    assert!(read.faithfulness.iter().filter(|f| f.k == 100.0).all(|f| f.f == 1.0));
    let e = &read.entry;
    assert_eq!(e.circuits["discrete-sae"], "mine");
    assert_eq!((e.task.sha256.as_str(), e.task.pairs, e.k.len()), (task.sha256.as_str(), 4, 7));
    assert!(e.task.metric_clean != e.task.metric_corrupt);
    assert!(store.verify(&()).problems.is_empty());

    // `--name`, and a rerun replaces nothing but the evaluation.
    let out = eval(&store_dir, &model, &task_path, &["--name", "again"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = Store::open(&store_dir).unwrap();
    assert_eq!(store.circuit_eval_names(), ["again", "t"]);
    // (Debug text: the NaN edge AUC is not equal to itself.)
    let again = store.read_circuit_eval("again").unwrap().unwrap().rows;
    assert_eq!(format!("{again:?}"), format!("{:?}", read.rows));
}

/// Bad input: one `error:` line, the store byte-identical.
#[test]
fn eval_refuses_bad_input_without_touching_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, task_path, store_dir) = setup(tmp.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (store, model, task) = (s(&store_dir), s(&model), s(&task_path));
    let before = snapshot(&store_dir);
    let args = |extra: &[&'static str]| {
        let mut a: Vec<String> = ["circuit", "eval", "--store", &store, "--model", &model, "--task", &task]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |extra: &[&'static str], needle: &str| {
        let a = args(extra);
        assert_one_error(&store_dir, &a.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    };
    run(&["--name", "no/slash"], "invalid evaluation name");
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let e = s(&empty);
    assert_one_error(
        &store_dir,
        &["circuit", "eval", "--store", &store, "--model", &model, "--task", &e],
        "holds no pairs",
    );
    let long = tmp.path().join("long.jsonl");
    std::fs::write(&long, r#"{"clean": "abc", "corrupt": "abcd", "answer": "a", "wrong": "b"}"#).unwrap();
    let l = s(&long);
    assert_one_error(
        &store_dir,
        &["circuit", "eval", "--store", &store, "--model", &model, "--task", &l],
        "different token lengths",
    );
    assert!(before == snapshot(&store_dir), "the store changed");
}

/// Nothing planted: every method computed and written as a circuit of its default name, then a
/// rerun takes them all from the store. Needs the methods themselves (`circuits::run::compute`:
/// patching, attribution — helper core's branch — and discrete-sae).
#[test]
fn eval_computes_and_writes_the_missing_circuits() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, task_path, store_dir) = setup(tmp.path());
    let out = eval(&store_dir, &model, &task_path, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("(computed now)").count(), 3, "{stdout}");
    let store = Store::open(&store_dir).unwrap();
    assert_eq!(store.circuit_names(), ["t-attribution", "t-discrete-sae", "t-patching"]);
    let sae = store.read_circuit("t-discrete-sae").unwrap().unwrap();
    assert_eq!(sae.entry.settings["features"], 200);
    assert_eq!(sae.nodes.len(), 10);
    assert_eq!(sae.edges.len(), 16, "layer-0 heads to layer-1 heads");
    let read = store.read_circuit_eval("t").unwrap().unwrap();
    for row in &read.rows {
        for v in [row.node_auc_top10, row.cpr, row.cmd, row.wall_s, row.speedup] {
            assert!(v.is_finite(), "{row:?}");
        }
    }
    assert!(read.rows[1].edge_auc_top10.is_some(), "attribution scores edges");
    let out = eval(&store_dir, &model, &task_path, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("(from the store)").count(), 3);
    let again = Store::open(&store_dir).unwrap().read_circuit_eval("t").unwrap().unwrap().rows;
    assert_eq!(format!("{again:?}"), format!("{:?}", read.rows));
}
