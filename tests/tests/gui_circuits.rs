//! The app's Circuits view, driven through egui_kittest by its accessible labels, on a store
//! holding planted circuits of a 2-layer × 4-head model (written through the store API: patching,
//! attribution with edges and discrete-SAE on one task, patching alone on a second) and the
//! evaluation of the first task; the tiny GPT-2 fixture is the model that a head opened in the
//! Heads view runs on. The harness helpers and snapshot comparison are `gui.rs'`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use egui::accesskit::Role;
use egui::{Event, Modifiers, PointerButton, vec2};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use loupe_app::gui::{LoupeApp, Options, Tab};
use loupe_store::Store;
use loupe_store::circuits::{
    CircuitEntry, CircuitEvalEntry, EdgeRow, EvalRow, FaithfulnessRow, NodeRow, TaskInfo,
};

use crate::gui::{harness, has_label, snapshot, wait_for};

const N_LAYERS: usize = 2;
const N_HEADS: usize = 4;
const K: [f32; 7] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0];

fn task(file: &str, sha: char) -> TaskInfo {
    TaskInfo {
        file: file.into(),
        sha256: sha.to_string().repeat(64),
        pairs: 12,
        metric: "logit_diff".into(),
        metric_clean: 2.5,
        metric_corrupt: -0.5,
        accuracy: 0.75,
    }
}

/// Every node `L.H` / `L.mlp` of the model, by layer, heads before the MLP.
fn node_names() -> Vec<String> {
    nodes_of(N_LAYERS, N_HEADS)
}

fn nodes_of(n_layers: usize, n_heads: usize) -> Vec<String> {
    (0..n_layers)
        .flat_map(|l| (0..n_heads).map(move |h| format!("{l}.{h}")).chain([format!("{l}.mlp")]))
        .collect()
}

/// A node's planted score under `method`: a few strong nodes (1.2 the strongest), the rest small.
fn score(method: &str, node: &str) -> f32 {
    let planted: &[(&str, f32)] = match method {
        "patching" => &[("1.2", 0.62), ("1.0", -0.35), ("0.mlp", 0.28), ("0.3", 0.12)],
        "attribution" => &[("1.2", 0.55), ("1.0", -0.41), ("0.mlp", 0.2), ("0.3", 0.15)],
        _ => &[("1.2", 5.0), ("0.3", 3.0), ("1.0", 1.0)],
    };
    let small = node.bytes().map(u32::from).sum::<u32>() % 7;
    planted.iter().find(|(n, _)| *n == node).map_or(0.01 * small as f32, |(_, s)| *s)
}

/// Every edge (an earlier node to a later one, or a head to its layer's MLP) with a planted score:
/// 0.3 → 1.2 the strongest, 0.1 → 1.0 negative.
fn edges(method: &str) -> Vec<EdgeRow> {
    let names = node_names();
    let layer = |n: &str| n[..1].parse::<usize>().unwrap();
    let mut rows = Vec::new();
    for s in &names {
        for t in &names {
            let precedes =
                layer(s) < layer(t) || (layer(s) == layer(t) && !s.ends_with("mlp") && t.ends_with("mlp"));
            if !precedes {
                continue;
            }
            let planted = match (s.as_str(), t.as_str()) {
                ("0.3", "1.2") => 0.4,
                ("0.mlp", "1.2") => 0.25,
                ("0.1", "1.0") => -0.3,
                _ => 0.002 * (rows.len() % 9) as f32,
            };
            let score = if method == "discrete-sae" { (planted * 10.0f32).abs().round() } else { planted };
            rows.push(EdgeRow { source: s.clone(), target: t.clone(), score });
        }
    }
    rows
}

fn write_circuit(store: &Store, name: &str, method: &str, task: &TaskInfo) {
    let nodes: Vec<NodeRow> = node_names()
        .iter()
        .map(|n| NodeRow { node: n.clone(), layer: n[..1].parse().unwrap(), score: score(method, n) })
        .collect();
    let edges = if method == "patching" { Vec::new() } else { edges(method) };
    let entry = CircuitEntry {
        method: method.into(),
        task: task.clone(),
        n_layers: N_LAYERS as u32,
        n_heads: N_HEADS as u32,
        settings: BTreeMap::new(),
        wall_s: if method == "patching" { 12.0 } else { 0.5 },
        model: "gpt2-tiny".into(),
        model_sha256: "0".repeat(64),
        files: Vec::new(),
    };
    store.write_circuit(name, &nodes, &edges, entry).unwrap();
}

/// The store (made once, left in the temp folder) and the tiny model's folder.
fn circuits_store() -> &'static (PathBuf, PathBuf) {
    static STORE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let model = loupe_tests::tiny_model(&dir.join("model"));
        let path = dir.join("store");
        let store = Store::create(&path).unwrap();
        let ioi = task("ioi.jsonl", 'a');
        for method in ["patching", "attribution", "discrete-sae"] {
            write_circuit(&store, &format!("ioi-{method}"), method, &ioi);
        }
        write_circuit(&store, "gt-patching", "patching", &task("greater-than.jsonl", 'b'));
        let row = |method: &str, edge: Option<f32>, cpr, wall_s: f32| EvalRow {
            method: method.into(),
            node_auc_top10: if method == "attribution" { 0.913 } else { 0.702 },
            node_auc_abs: if method == "attribution" { 0.887 } else { 0.655 },
            edge_auc_top10: edge,
            edge_auc_abs: edge.map(|e| e - 0.05),
            cpr,
            cmd: 1.0 - cpr,
            wall_s,
            speedup: 12.0 / wall_s,
        };
        let rows = [row("attribution", Some(0.8), 0.74, 0.5), row("discrete-sae", None, 0.41, 0.25)];
        let faithfulness: Vec<FaithfulnessRow> = ["attribution", "discrete-sae"]
            .iter()
            .flat_map(|m| {
                K.iter().map(move |&k| FaithfulnessRow {
                    method: m.to_string(),
                    k,
                    f: if *m == "attribution" { (k / 20.0).min(1.0) } else { (k / 60.0).min(1.0) },
                })
            })
            .collect();
        let circuits =
            ["patching", "attribution", "discrete-sae"].map(|m| (m.to_string(), format!("ioi-{m}")));
        let entry = CircuitEvalEntry {
            task: ioi,
            circuits: circuits.into_iter().collect(),
            k: K.to_vec(),
            model: "gpt2-tiny".into(),
            model_sha256: "0".repeat(64),
            files: Vec::new(),
        };
        store.write_circuit_eval("ioi", &rows, &faithfulness, entry).unwrap();
        (path, model)
    })
}

fn circuits_app(circuit: Option<&str>) -> Harness<'static, LoupeApp> {
    let (store, model) = circuits_store();
    let options = Options {
        store: store.clone(),
        model: Some(model.clone()),
        view: Some(Tab::Circuits),
        circuit: circuit.map(str::to_string),
        ..Options::default()
    };
    let mut h = harness(LoupeApp::new(options));
    h.run_steps(3);
    h
}

/// Choose `entry` in the combo box labelled `combo`.
fn choose(h: &mut Harness<'static, LoupeApp>, combo: &str, entry: &str) {
    h.get_by_label(combo).click();
    h.run_steps(2);
    h.get_by_label(entry).click();
    h.run_steps(3);
}

fn node_rect(h: &Harness<'static, LoupeApp>, node: &str) -> egui::Rect {
    h.get_by_label(&format!("node {node}")).rect()
}

/// The graph of each method, the threshold, a node selected and pinned, its scores under every
/// method, an edge followed, the evaluation table, zoom, pan and reset.
#[test]
fn circuits_view_draws_a_tasks_circuits_and_their_evaluation() {
    let before = loupe_tests::snapshot(&circuits_store().0);
    let mut h = circuits_app(None);
    // Tasks in the order of their circuits' names: greater-than first, with no evaluation.
    assert_eq!(h.state().circuits_view().circuit_name(), Some("gt-patching"));
    assert!(has_label(&h, "no evaluation of this task: run `loupe circuit eval --store"));
    // The ground truth first: patching, whose table has no edges.
    choose(&mut h, "Task", "ioi.jsonl · 12 pairs · logit_diff");
    assert!(has_label(&h, "ioi-patching · gpt2-tiny · 2 layers × 4 heads · 12 pairs · logit_diff"));
    for node in node_names() {
        assert!(h.query_by_label(&format!("node {node}")).is_some(), "node {node}");
    }
    assert!(has_label(&h, "patching scores no edges"));
    // The evaluation of the task.
    for text in
        ["node AUC (top 10 %)", "edge AUC (|effect| ≥ 0.05)", "speed-up", "0.913", "0.887", "0.800", "0.750"]
    {
        assert!(has_label(&h, text), "the evaluation table shows {text}");
    }
    assert!(
        has_label(&h, "24.0×") && has_label(&h, "48.0×") && has_label(&h, "0.25 s"),
        "speed-ups and times"
    );
    assert!(has_label(&h, "Faithfulness f against k"));
    h.remove_cursor();
    h.run_steps(2);
    snapshot(&mut h, "circuits_patching");

    // Attribution: every edge shown at first (33 < the default 40), then a threshold.
    choose(&mut h, "Method", "attribution · ioi-attribution");
    assert_eq!(h.state().circuits_view().circuit_name(), Some("ioi-attribution"));
    assert!(has_label(&h, "33 of 33 edges with |score| ≥ 0.0000"));
    h.get_by_role_and_label(Role::Slider, "Edge threshold").set_value_accesskit(0.2);
    h.run_steps(3);
    assert!(has_label(&h, "3 of 33 edges with |score| ≥ 0.2000"), "0.3 → 1.2, 0.1 → 1.0, 0.mlp → 1.2");

    // Hover: the node's name and score.
    h.get_by_label("node 1.0").hover();
    h.run_steps(4);
    assert!(has_label(&h, "1.0 · first-order effect -0.4100 (#2 of 10)"), "the hover text");

    // Select 1.2: its scores under the three methods, its strongest edges in.
    h.get_by_label("node 1.2").click();
    h.run_steps(3);
    assert_eq!(h.state().current_circuit_node(), Some(("ioi-attribution", "1.2")));
    assert!(has_label(&h, "Node 1.2") && has_label(&h, "head 2 of layer 1"));
    for v in ["0.6200", "0.5500", "5.0000"] {
        assert!(has_label(&h, v), "1.2 scores {v} under one of the methods");
    }
    assert!(has_label(&h, "Strongest edges in (attribution)"));
    // Pin it with the box, and 0.3 with a shift-click.
    h.get_by_label("Pin").click();
    h.run_steps(2);
    h.get_by_label("node 0.3").click_modifiers(Modifiers::SHIFT);
    h.run_steps(3);
    let pinned: Vec<&str> = h.state().circuits_view().pinned().iter().map(String::as_str).collect();
    assert_eq!(pinned, ["0.3", "1.2"]);
    assert!(has_label(&h, "pinned: 0.3, 1.2 · "));
    assert_eq!(
        h.state().current_circuit_node(),
        Some(("ioi-attribution", "1.2")),
        "a shift-click selects nothing"
    );
    h.remove_cursor();
    h.run_steps(2);
    snapshot(&mut h, "circuits_attribution");

    // Follow the strongest edge into 1.2: 0.3 is selected.
    h.get_by_label("0.3").click();
    h.run_steps(3);
    assert_eq!(h.state().current_circuit_node(), Some(("ioi-attribution", "0.3")));
    // Another method keeps the selection and the pins.
    choose(&mut h, "Method", "discrete-sae · ioi-discrete-sae");
    assert!(has_label(&h, "Node 0.3") && has_label(&h, "codes only in positives"));
    assert_eq!(h.state().circuits_view().pinned().len(), 2);
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(
        h.state().current_circuit_node(),
        Some(("ioi-attribution", "1.2")),
        "back to the previous node"
    );
    assert_eq!(h.state().circuits_view().circuit_name(), Some("ioi-attribution"), "in its circuit");

    // Zoom about the pointer, pan by dragging, reset.
    let at_first = node_rect(&h, "1.2");
    let canvas = h.get_by_label("circuit graph").rect();
    // About 1.2's centre: it stays where it is, twice the size.
    h.hover_at(at_first.center());
    h.event(Event::Zoom(2.0));
    h.run_steps(2);
    let zoomed = node_rect(&h, "1.2");
    assert!((zoomed.width() / at_first.width() - 2.0).abs() < 0.05, "{at_first:?} → {zoomed:?}");
    assert!((zoomed.center() - at_first.center()).length() < 1.0, "the point under the pointer stays");
    h.get_by_label("Reset view").click();
    h.run_steps(2);
    assert_eq!(node_rect(&h, "1.2"), at_first);
    let empty = canvas.min + vec2(50.0, 25.0);
    h.hover_at(empty);
    h.drag_at(empty);
    for step in 1..=4 {
        h.hover_at(empty + vec2(10.0, 5.0) * step as f32);
    }
    h.drop_at(empty + vec2(40.0, 20.0));
    h.run_steps(2);
    let moved = node_rect(&h, "1.2").center() - at_first.center();
    assert!(moved.x > 20.0 && moved.y > 10.0, "the drag pans the graph by {moved:?}");
    h.get_by_label("Reset view").click();
    h.run_steps(2);
    assert_eq!(node_rect(&h, "1.2"), at_first);

    // Back to the other task: its own circuit, the graph in full view.
    choose(&mut h, "Task", "greater-than.jsonl · 12 pairs · logit_diff");
    assert_eq!(h.state().circuits_view().circuit_name(), Some("gt-patching"));
    drop(h);
    assert!(before == loupe_tests::snapshot(&circuits_store().0), "the app changed the store");
}

/// A head opens in the Heads view, from the node's panel or by a double-click, and its pattern
/// runs on the model; back returns to the node.
#[test]
fn circuits_view_opens_a_head_in_the_heads_view() {
    let mut h = circuits_app(Some("ioi-discrete-sae"));
    assert_eq!(h.state().circuits_view().circuit_name(), Some("ioi-discrete-sae"), "--circuit shows it");
    h.get_by_label("node 1.2").click();
    h.run_steps(3);
    h.get_by_label("Open 1.2 in the Heads view").click();
    h.run_steps(3);
    assert_eq!(h.state().current_head(), Some((1, 2)));
    assert_eq!(h.state().tab, Tab::Heads);
    wait_for(&mut h, "the head's pattern", |h| has_label(h, "head 1.2 on 58 tokens · rows"));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Circuits);
    assert_eq!(h.state().current_circuit_node(), Some(("ioi-discrete-sae", "1.2")));
    assert!(has_label(&h, "Node 1.2"));
    // A double-click on a head opens it directly (both clicks in one frame: the harness's clock
    // steps a quarter second a frame).
    let centre = h.get_by_label("node 0.3").rect().center();
    h.hover_at(centre);
    h.run_steps(1);
    for pressed in [true, false, true, false] {
        h.input_mut().events.push(Event::PointerButton {
            pos: centre,
            button: PointerButton::Primary,
            pressed,
            modifiers: Modifiers::NONE,
        });
    }
    h.step();
    h.run_steps(2);
    assert_eq!(h.state().current_head(), Some((0, 3)), "a double-click opens the head");
}

/// A store without circuits says what to run; `loupe gui --circuit` checks the name.
#[test]
fn circuits_view_says_what_the_store_lacks() {
    let s = circuits_store().0.to_str().unwrap();
    loupe_tests::assert_one_error(
        &circuits_store().0,
        &["gui", s, "--circuit", "ioi"],
        "has no circuit \"ioi\" (circuits: gt-patching, ioi-attribution, ioi-discrete-sae, ioi-patching)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    Store::create(&dir).unwrap();
    let d = dir.to_str().unwrap();
    loupe_tests::assert_one_error(
        &dir,
        &["gui", d, "--circuit", "ioi-patching"],
        "has no circuit \"ioi-patching\" (circuits: none; run `loupe circuit` first)",
    );
    let mut h = harness(LoupeApp::new(Options {
        store: dir.clone(),
        view: Some(Tab::Circuits),
        ..Options::default()
    }));
    h.run_steps(3);
    assert!(has_label(
        &h,
        &format!(
            "no circuits in this store: run `loupe circuit --store {d} --task assets/tasks/ioi.jsonl --method patching`"
        )
    ));
    assert!(has_label(&h, &format!("`loupe circuit eval --store {d} --task assets/tasks/ioi.jsonl`")));
}

/// A circuit of Gemma 3 270M's size (18 layers × 4 heads + MLPs: 90 nodes, every edge scored)
/// with every edge drawn: frames stay cheap (the time per frame is printed).
#[test]
fn circuits_view_draws_every_edge_of_a_gemma_sized_circuit() {
    let (n_layers, n_heads) = (18, 4);
    let names = nodes_of(n_layers, n_heads);
    let layer = |n: &str| n.split('.').next().unwrap().parse::<usize>().unwrap();
    let mut state = 7u64;
    let mut random = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let nodes: Vec<NodeRow> =
        names.iter().map(|n| NodeRow { node: n.clone(), layer: layer(n) as u16, score: random() }).collect();
    let mut edges = Vec::new();
    for s in &names {
        for t in &names {
            if layer(s) < layer(t) || (layer(s) == layer(t) && !s.ends_with("mlp") && t.ends_with("mlp")) {
                edges.push(EdgeRow { source: s.clone(), target: t.clone(), score: random().powi(3) });
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let entry = CircuitEntry {
        method: "attribution".into(),
        task: task("ioi.jsonl", 'c'),
        n_layers: n_layers as u32,
        n_heads: n_heads as u32,
        settings: BTreeMap::new(),
        wall_s: 1.0,
        model: "gemma-3-270m".into(),
        model_sha256: "0".repeat(64),
        files: Vec::new(),
    };
    Store::create(&dir).unwrap().write_circuit("big", &nodes, &edges, entry).unwrap();
    let options = Options { store: dir, circuit: Some("big".into()), ..Options::default() };
    let mut h = harness(LoupeApp::new(options));
    h.run_steps(3);
    let n = edges.len();
    assert!(has_label(&h, &format!("40 of {n} edges with |score| ≥ ")), "the strongest 40 at first");
    assert!(h.query_by_label("node 17.mlp").is_some() && h.query_by_label("node 0.0").is_some());
    let (per_frame, triangles) = frame_time(&mut h);
    println!("{:.1} ms per frame ({triangles} triangles) with the strongest 40 edges drawn", per_frame * 1e3);
    h.get_by_role_and_label(Role::Slider, "Edge threshold").set_value_accesskit(0.0);
    h.run_steps(2);
    assert!(has_label(&h, &format!("{n} of {n} edges with |score| ≥ 0.0000")));
    let (per_frame, triangles) = frame_time(&mut h);
    println!(
        "{:.1} ms per frame (UI pass and tessellation, {triangles} triangles) with all {n} edges of 90 nodes drawn",
        per_frame * 1e3
    );
    assert!(per_frame < 0.5, "a frame takes {per_frame:.2} s");
}

/// Seconds per frame over 10 frames (the UI pass and the tessellation of what it drew, as eframe
/// does before the GPU), and the triangles of the last.
fn frame_time(h: &mut Harness<'static, LoupeApp>) -> (f64, usize) {
    let start = std::time::Instant::now();
    let mut triangles = 0;
    for _ in 0..10 {
        h.step();
        let shapes = h.output().shapes.clone();
        triangles = h
            .ctx
            .tessellate(shapes, 1.0)
            .iter()
            .map(|m| match &m.primitive {
                egui::epaint::Primitive::Mesh(mesh) => mesh.indices.len() / 3,
                egui::epaint::Primitive::Callback(_) => 0,
            })
            .sum();
    }
    (start.elapsed().as_secs_f64() / 10.0, triangles)
}
