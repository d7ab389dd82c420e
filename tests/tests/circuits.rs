//! `loupe circuit` on a store captured with the tiny GPT-2 fixture and a small character-level
//! task: the entry and its tables (the stored effects equal the library's slow patched runs), a
//! rerun replacing it, and bad input leaving the store byte-identical; on Gemma 3 270M, patching
//! against full forwards and attribution against finite differences for a few nodes.

use std::path::{Path, PathBuf};

use loupe_analysis::circuits::attribution::attribution;
use loupe_analysis::circuits::patch::{Runs, mean, metrics};
use loupe_analysis::circuits::patching::{normaliser, patching};
use loupe_analysis::circuits::{Node, Task, nodes};
use loupe_model::hooks::{in_block, names};
use loupe_model::{Hooks, Intervention, Session};
use loupe_store::Store;
use loupe_tests::{HOOK, gemma_gguf, loupe, snapshot, stderr, tiny_model};

/// Six pairs of the tiny model's character-level tokenizer: the corrupt prompt changes one
/// character; the answer and wrong token are single characters.
const TASK: &str = r#"{"clean": "xAyBzB>", "corrupt": "xAyBzA>", "answer": "A", "wrong": "B"}
{"clean": "pq pq p", "corrupt": "pq rs p", "answer": "q", "wrong": "s"}
{"clean": "abcabc", "corrupt": "abcxyz", "answer": "a", "wrong": "x"}

{"clean": "Tom met Ann; Ann", "corrupt": "Tom met Ann; Tom", "answer": "T", "wrong": "A"}
{"clean": "1 2 3 4", "corrupt": "1 2 3 3", "answer": "5", "wrong": "4"}
{"clean": "mnop", "corrupt": "mnoq", "answer": "q", "wrong": "r"}
"#;

/// A store captured with the tiny model (whose tokenizer gets a BOS, NUL, for the task files),
/// and a task file `t.jsonl` beside it.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = tiny_model(&dir.join("model"));
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, "Call me Ishmael. Some years ago - never mind how long precisely. ".repeat(4))
        .unwrap();
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
    let task = dir.join("t.jsonl");
    std::fs::write(&task, TASK).unwrap();
    (store, task)
}

fn circuit(store: &Path, task: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["circuit", "--store", store.to_str().unwrap(), "--task", task.to_str().unwrap()];
    args.extend(extra);
    loupe(&args)
}

#[test]
fn circuit_writes_each_method_and_a_rerun_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, task) = setup(tmp.path());
    let out = circuit(&store, &task, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "patching on t.jsonl (6 pairs, logit_diff)",
        "10 nodes, 0 edges",
        "metric clean ",
        "accuracy ",
        "top nodes by |score|: ",
        "wall time ",
        "wrote circuits/t-patching",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from {stdout}");
    }
    assert!(!stdout.contains("top edges"), "{stdout}");

    let s = Store::open(&store).unwrap();
    let table = s.read_circuit("t-patching").unwrap().expect("listed");
    let e = &table.entry;
    assert_eq!((e.method.as_str(), e.n_layers, e.n_heads, e.task.pairs), ("patching", 2, 4, 6));
    assert_eq!((e.task.file.as_str(), e.task.metric.as_str()), ("t.jsonl", "logit_diff"));
    assert_eq!(e.task.sha256.len(), 64);
    assert!(e.wall_s > 0.0 && (0.0..=1.0).contains(&e.task.accuracy));
    let names: Vec<&str> = table.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["0.0", "0.1", "0.2", "0.3", "0.mlp", "1.0", "1.1", "1.2", "1.3", "1.mlp"]);
    assert!(table.edges.is_empty());

    // The stored effects are the library's slow full-forward patching of each node.
    let session = Session::load(&tmp.path().join("model")).unwrap();
    let model = session.model();
    let t = Task::load(&task, session.tokenizer().unwrap()).unwrap();
    let runs = Runs::new(model, &t).unwrap();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (clean, corrupt) = (mean(&runs.metric_clean), mean(&runs.metric_corrupt));
    assert!((e.task.metric_clean - clean).abs() < 1e-4 && (e.task.metric_corrupt - corrupt).abs() < 1e-4);
    for row in &table.nodes {
        let node = Node::parse(&row.node, 2, 4).unwrap();
        let slow = (runs.patched_metric(model, &t, &[node]).unwrap() - clean) / (corrupt - clean);
        assert!(
            (row.score - slow).abs() < 1e-3 * slow.abs().max(1.0),
            "{}: {} vs {slow}",
            row.node,
            row.score
        );
    }

    let out = circuit(&store, &task, &["--method", "attribution"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("10 nodes, 33 edges") && stdout.contains("top edges by |score|: "), "{stdout}");
    let s = Store::open(&store).unwrap();
    let attr = s.read_circuit("t-attribution").unwrap().expect("listed");
    assert_eq!(attr.edges.len(), 33);
    assert!(attr.edges.iter().any(|e| e.source == "0.mlp" && e.target == "1.2"));

    // A rerun under the same name replaces the entry: one listing, the new method's tables.
    let out = circuit(&store, &task, &["--method", "attribution", "--name", "t-patching"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = Store::open(&store).unwrap();
    assert_eq!(s.circuit_names(), ["t-attribution", "t-patching"]);
    let replaced = s.read_circuit("t-patching").unwrap().expect("listed");
    assert_eq!((replaced.entry.method.as_str(), replaced.edges.len()), ("attribution", 33));
    let verify = loupe(&["store", "verify", store.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

#[test]
fn bad_input_is_one_error_line_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, task) = setup(tmp.path());
    let out = circuit(&store, &task, &["--name", "kept"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let file = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let lengths = file(
        "lengths.jsonl",
        "{\"clean\": \"ab\", \"corrupt\": \"cd\", \"answer\": \"a\", \"wrong\": \"b\"}\n\
         {\"clean\": \"abc\", \"corrupt\": \"abcd\", \"answer\": \"a\", \"wrong\": \"b\"}\n",
    );
    let long_answer = file(
        "answer.jsonl",
        "{\"clean\": \"ab\", \"corrupt\": \"cd\", \"answer\": \" Mary\", \"wrong\": \"b\"}\n",
    );
    let empty = file("empty.jsonl", "");
    let cases: Vec<(PathBuf, Vec<&str>, String)> = vec![
        (
            lengths.clone(),
            vec![],
            format!(
                "{}:2: clean and corrupt prompts have different token lengths (4 and 5 tokens",
                lengths.display()
            ),
        ),
        (long_answer, vec![], "the answer \" Mary\" is 5 tokens, not one".into()),
        (empty, vec![], "holds no pairs".into()),
        (task.clone(), vec!["--method", "probing"], "unknown method \"probing\"".into()),
        (task.clone(), vec!["--name", "evals"], "\"evals\" cannot name a circuit".into()),
        (task.clone(), vec!["--name", "a/b"], "a/b".into()),
        (PathBuf::from("/nonexistent/task.jsonl"), vec![], "cannot read task file".into()),
    ];
    for (task, extra, needle) in cases {
        let before = snapshot(&store);
        let out = circuit(&store, &task, &extra);
        let err = stderr(&out);
        assert!(!out.status.success(), "{extra:?} {task:?} should fail");
        assert_eq!(err.lines().count(), 1, "{extra:?} {task:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(&needle), "{extra:?}: {err} lacks {needle:?}");
        assert!(before == snapshot(&store), "{extra:?} {task:?} changed the store");
    }
}

/// Gemma 3 (fused kernels in the patching passes, differentiable ops in attribution's): the
/// batched patching equals full forwards, and attribution's node scores the derivative along
/// the node's output, for nodes across the layers.
#[test]
fn gemma_patching_equals_full_forwards_and_attribution_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let task = tmp.path().join("ioi.jsonl");
    std::fs::write(
        &task,
        r#"{"clean": "When Mary and John went to the store, John gave a drink to", "corrupt": "When Mary and John went to the store, Tom gave a drink to", "answer": " Mary", "wrong": " John"}
{"clean": "After Anne and Paul went to the park, Paul gave a ball to", "corrupt": "After Anne and Paul went to the park, Kate gave a ball to", "answer": " Anne", "wrong": " Paul"}
{"clean": "Then, David and Lisa had a long argument, and afterwards Lisa said to", "corrupt": "Then, David and Lisa had a long argument, and afterwards Mark said to", "answer": " David", "wrong": " Lisa"}
"#,
    )
    .unwrap();
    let session = Session::load(&gemma_gguf()).unwrap();
    let model = session.model();
    let t = Task::load(&task, session.tokenizer().unwrap()).unwrap();
    let runs = Runs::new(model, &t).unwrap();
    let (clean, denom) = normaliser(&runs).unwrap();
    let all = nodes(model.config());
    let effects = patching(model, &t, &runs, &()).unwrap();
    let scores = attribution(model, &t, &runs, &()).unwrap();
    let picked = ["0.0", "3.mlp", "5.2", "11.3", "15.1", "17.mlp"];
    for name in picked {
        let i = all.iter().position(|n| n.to_string() == name).unwrap();
        let slow = (runs.patched_metric(model, &t, &[all[i]]).unwrap() - clean) / denom;
        assert!((effects[i] - slow).abs() <= 1e-3 * slow.abs().max(1.0), "{name}: {} vs {slow}", effects[i]);

        // m with the node's output at clean + e · (corrupt − clean), central differences.
        let moved = |e: f64| {
            let l = all[i].layer;
            let hooks = match all[i].head {
                Some(h) => {
                    let heads = model.config().n_heads;
                    let m: Vec<f32> = (0..heads).map(|k| f32::from(u8::from(k == h))).collect();
                    let m = candle_core::Tensor::from_vec(m, (1, 1, heads, 1), &candle_core::Device::Cpu)
                        .unwrap();
                    let dz = (&runs.corrupt_z[l] - &runs.clean_z[l]).unwrap().broadcast_mul(&m).unwrap();
                    Hooks::new().intervene(in_block(l, names::Z), Intervention::Add((dz * e).unwrap()))
                }
                None => {
                    let dm = (&runs.corrupt_mlp[l] - &runs.clean_mlp[l]).unwrap();
                    Hooks::new().intervene(in_block(l, names::MLP_OUT), Intervention::Add((dm * e).unwrap()))
                }
            };
            let mut hooks = hooks.skip_unembed();
            let hidden = model.forward(&runs.clean, &mut hooks).unwrap().unwrap();
            f64::from(mean(&metrics(model, &t, &hidden, &runs.last).unwrap()))
        };
        let d = |e: f64| (moved(e) - moved(-e)) / (2.0 * e);
        let fd = (4.0 * d(0.05) - d(0.1)) / 3.0 / f64::from(denom);
        let score = f64::from(scores.node_scores[i]);
        assert!(
            (score - fd).abs() <= 1e-2 * fd.abs().max(0.05),
            "{name}: attribution {score}, finite differences {fd}"
        );
    }
}
