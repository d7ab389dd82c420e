//! The app's Graph view, driven through egui_kittest by its accessible labels, on a store holding
//! two planted attribution graphs (written through `Store::start_graph`, no model needed: a
//! 4-token, 2-layer graph with features, errors, embeddings and logits, and a tiny second one),
//! explanations of the two per-layer transcoders and a minimal analysis of one of them (so its
//! feature page opens); plus a larger graph for the level of detail and frame time. The harness
//! helpers and snapshot comparison are `gui.rs'`.

use std::path::PathBuf;
use std::sync::OnceLock;

use egui::accesskit::Role;
use egui::{Event, Modifiers, PointerButton, vec2};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use loupe_app::gui::{LoupeApp, Options, Tab};
use loupe_store::graphs::{GraphEdgeRow, GraphEntry, GraphNodeRow, GraphSettings, SupernodeRow};
use loupe_store::{Explanation, Explanations, FeatureRow, FeaturesEntry, Provenance, Store};

use crate::gui::{harness, has_label, snapshot, type_into, wait_for};

const GRAPH: &str = "ioi-small";

fn node(
    kind: &str,
    layer: u16,
    position: u32,
    feature: u32,
    activation: f32,
    influence: f32,
) -> GraphNodeRow {
    let node_id = match kind {
        "embedding" => format!("E_{feature}_{position}"),
        "error" => format!("{layer}_error_{position}"),
        _ => format!("{layer}_{feature}_{position}"),
    };
    GraphNodeRow {
        node: 0,
        node_id,
        kind: kind.into(),
        layer,
        position,
        feature,
        activation,
        probability: (kind == "logit").then_some(influence),
        influence,
    }
}

fn entry(tokens: &[&str], n_layers: u32, n_nodes: usize, n_edges: usize) -> GraphEntry {
    GraphEntry {
        prompt: tokens[1..].concat(),
        tokens: (1..=tokens.len() as u32).collect(),
        token_strs: tokens.iter().map(|t| t.to_string()).collect(),
        transcoders: (0..n_layers).map(|l| format!("tc{l}")).collect(),
        transcoder_kind: "plt".into(),
        n_layers,
        settings: GraphSettings::default(),
        active_features: n_nodes as u64,
        n_nodes: n_nodes as u64,
        n_edges: n_edges as u64,
        replacement_score: 0.625,
        completeness_score: 0.875,
        replacement_score_unpruned: 0.5,
        completeness_score_unpruned: 0.75,
        wall_s: 1.5,
        model: "gpt2-tiny".into(),
        model_sha256: "0".repeat(64),
        files: Vec::new(),
    }
}

fn write_graph(
    store: &Store,
    name: &str,
    mut nodes: Vec<GraphNodeRow>,
    edges: &[GraphEdgeRow],
    e: GraphEntry,
) {
    for (i, n) in nodes.iter_mut().enumerate() {
        n.node = i as u32;
    }
    let mut w = store.start_graph(name).unwrap();
    for batch in nodes.chunks(50_000) {
        w.write_nodes(batch).unwrap();
    }
    for batch in edges.chunks(200_000) {
        w.write_edges(batch).unwrap();
    }
    w.commit(e).unwrap();
}

/// The planted graph's nodes: embeddings 0–3, features 4 (0_5_2), 5 (0_7_3), 6 (1_3_3), errors
/// 7–8, logits 9–10.
fn small_nodes() -> Vec<GraphNodeRow> {
    vec![
        node("embedding", 0, 0, 1, 0.0, 0.01),
        node("embedding", 0, 1, 2, 0.0, 0.02),
        node("embedding", 0, 2, 3, 0.0, 0.2),
        node("embedding", 0, 3, 4, 0.0, 0.1),
        node("feature", 0, 2, 5, 2.5, 0.3),
        node("feature", 0, 3, 7, 0.75, 0.1),
        node("feature", 1, 3, 3, 1.25, 0.5),
        node("error", 0, 3, 0, 0.0, 0.05),
        node("error", 1, 3, 0, 0.0, 0.04),
        node("logit", 2, 3, 42, 0.0, 0.6),
        node("logit", 2, 3, 17, 0.0, 0.3),
    ]
}

fn small_edges() -> Vec<GraphEdgeRow> {
    let e = |source, target, weight| GraphEdgeRow { source, target, weight };
    vec![
        e(2, 4, 0.8),
        e(4, 6, 1.5),
        e(5, 6, -0.7),
        e(6, 9, 2.0),
        e(3, 5, 0.4),
        e(7, 6, 0.1),
        e(8, 9, 0.05),
        e(6, 10, 0.6),
        e(1, 4, 0.02),
        e(4, 9, 0.3),
    ]
}

fn explanations(items: &[(u32, &str)]) -> Explanations {
    let explanations = items
        .iter()
        .map(|&(f, text)| Explanation {
            feature_id: f,
            explainer: "planted".into(),
            explanation: Some(text.into()),
            failure: None,
            provenance: Provenance { model: "planted".into(), ..Provenance::default() },
        })
        .collect();
    Explanations { explanations, scores: Vec::new() }
}

/// A minimal analysis of `dict` (`n` features, no examples), enough for its feature page.
fn analyse(store: &Store, dict: &str, n: u32) {
    let mut w = store.features_writer(dict).unwrap();
    w.vocab(&["<bos>".to_string(), "When".into(), " Mary".into(), " and".into()]).unwrap();
    let rows: Vec<FeatureRow> = (0..n)
        .map(|f| FeatureRow {
            feature_id: f,
            count: 10,
            density: 0.01,
            mean_activation: 1.0,
            max_activation: 2.0,
            dead: false,
            dense: false,
            hist_first_bin: 0,
            hist: vec![10],
        })
        .collect();
    w.features(&rows).unwrap();
    w.examples(&[], false).unwrap();
    w.examples(&[], true).unwrap();
    w.cooccurrence(&[]).unwrap();
    store
        .commit_features(
            w,
            FeaturesEntry {
                hook: "blocks.1.hook_mlp_out".into(),
                n_features: n,
                tokens: 1000,
                files: Vec::new(),
            },
        )
        .unwrap();
}

/// The store (made once, left in the temp folder).
fn graph_store() -> &'static PathBuf {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let path = tempfile::tempdir().unwrap().keep().join("store");
        let store = Store::create(&path).unwrap();
        let tokens = ["<bos>", "When", " Mary", " and"];
        let (nodes, edges) = (small_nodes(), small_edges());
        let e = entry(&tokens, 2, nodes.len(), edges.len());
        write_graph(&store, GRAPH, nodes, &edges, e);
        let tiny = vec![node("embedding", 0, 0, 1, 0.0, 1.0), node("logit", 1, 0, 9, 0.0, 1.0)];
        write_graph(&store, "other", tiny, &[], entry(&["<bos>"], 1, 2, 0));
        store.commit_explanations("tc0", &explanations(&[(5, "the name Mary")]), None).unwrap();
        store.commit_explanations("tc1", &explanations(&[(3, "says a name after 'and'")]), None).unwrap();
        analyse(&store, "tc1", 8);
        path
    })
}

fn graph_app(path: &std::path::Path, graph: Option<&str>) -> Harness<'static, LoupeApp> {
    let options = Options {
        store: path.to_path_buf(),
        view: Some(Tab::Graph),
        graph: graph.map(str::to_string),
        ..Options::default()
    };
    let mut h = harness(LoupeApp::new(options));
    h.run_steps(3);
    h
}

fn node_rect(h: &Harness<'static, LoupeApp>, node: &str) -> egui::Rect {
    h.get_by_label(&format!("node {node}")).rect()
}

fn supernodes() -> Vec<SupernodeRow> {
    Store::open(graph_store()).unwrap().read_supernodes(GRAPH).unwrap()
}

/// Every node drawn as a button, the threshold, hover texts, select and back, pin, a supernode
/// saved to the store and read back, a feature page opened, zoom, pan and reset, the graph menu.
#[test]
fn graph_view_draws_selects_pins_and_saves_supernodes() {
    let mut h = graph_app(graph_store(), None);
    assert_eq!(h.state().graph_view().graph_name(), Some(GRAPH), "the first graph by name");
    for n in small_nodes() {
        assert!(h.query_by_label(&format!("node {}", n.node_id)).is_some(), "node {}", n.node_id);
    }
    assert!(has_label(&h, "ioi-small · gpt2-tiny · 2 layers · 4 tokens · plt tc0, tc1 · 11 nodes, 10 edges"));
    assert!(has_label(&h, "replacement 0.625, completeness 0.875"));
    assert!(has_label(&h, "10 of 10 edges with |weight| ≥ 0.0000"), "fewer than the default 200: all");
    assert_eq!(h.state().graph_view().drawn.edges, 10);
    assert_eq!(h.state().graph_view().drawn.nodes, 11);
    h.remove_cursor();
    h.run_steps(2);
    snapshot(&mut h, "graph");

    h.get_by_role_and_label(Role::Slider, "Edge threshold").set_value_accesskit(0.5);
    h.run_steps(3);
    assert!(has_label(&h, "5 of 10 edges with |weight| ≥ 0.5000"));
    assert_eq!(h.state().graph_view().drawn.edges, 5);

    // Hover: what the node is, its explanation, activation and influence.
    h.get_by_label("node 1_3_3").hover();
    h.run_steps(3);
    assert!(has_label(&h, "1_3_3 · feature 3 of layer 1 at position 3 (\" and\")"));
    assert!(has_label(&h, "tc1 #3: says a name after 'and'"));
    assert!(has_label(&h, "activation 1.2500 · influence 0.5000"));
    h.get_by_label("node 0_7_3").hover();
    h.run_steps(3);
    assert!(has_label(&h, "tc0 #7: no explanation"));
    h.get_by_label("node 2_42_3").hover();
    h.run_steps(3);
    assert!(has_label(&h, "probability 0.6000 · influence 0.6000"));

    // Select: a navigation item; the panel's strongest edges.
    h.get_by_label("node 1_3_3").click();
    h.run_steps(3);
    assert_eq!(h.state().current_graph_node(), Some((GRAPH, "1_3_3")));
    assert!(has_label(&h, "Node 1_3_3") && has_label(&h, "Strongest edges in"));
    assert!(has_label(&h, "1.5000") && has_label(&h, "-0.7000"), "0_5_2 → 1_3_3 and 0_7_3 → 1_3_3");
    h.get_by_label("node 0_5_2").click();
    h.run_steps(3);
    assert_eq!(h.state().current_graph_node(), Some((GRAPH, "0_5_2")));
    assert!(has_label(&h, "tc0 has no analysis for a feature page: run `loupe analyze --store"));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().current_graph_node(), Some((GRAPH, "1_3_3")), "back to the previous node");
    assert!(has_label(&h, "Node 1_3_3"));

    // Pin two nodes (shift-click): the subgraph lists them and the edge between them.
    h.get_by_label("node 0_5_2").click_modifiers(Modifiers::SHIFT);
    h.run_steps(2);
    h.get_by_label("node 1_3_3").click_modifiers(Modifiers::SHIFT);
    h.run_steps(3);
    assert_eq!(h.state().graph_view().pinned(), ["0_5_2", "1_3_3"]);
    assert_eq!(h.state().current_graph_node(), Some((GRAPH, "1_3_3")), "a shift-click selects nothing");
    assert!(has_label(&h, "Subgraph: 2 pinned") && has_label(&h, "edges among them: 1"));
    assert!(has_label(&h, "0_5_2 -> 1_3_3"));

    // Group them into a supernode: saved in the store.
    assert!(supernodes().is_empty());
    type_into(&mut h, "Supernode name", "say Mary");
    h.get_by_label("Group pinned").click();
    h.run_steps(3);
    let saved = [("say Mary", "0_5_2"), ("say Mary", "1_3_3")]
        .map(|(s, n)| SupernodeRow { supernode: s.into(), node_id: n.into() });
    assert_eq!(supernodes(), saved);
    assert!(has_label(&h, "Remove say Mary"));
    h.remove_cursor();
    h.run_steps(2);
    snapshot(&mut h, "graph_pinned");
    // Read back by a new app.
    let fresh = graph_app(graph_store(), Some(GRAPH));
    assert!(has_label(&fresh, "Remove say Mary") && has_label(&fresh, "0_5_2, 1_3_3"));
    drop(fresh);

    // Another process holds the writer lock: an error line, nothing saved.
    {
        let _writer = Store::open_rw(graph_store()).unwrap();
        h.get_by_label("Remove say Mary").click();
        h.run_steps(3);
        assert!(has_label(&h, "Error: cannot save the supernodes: store"));
        assert!(has_label(&h, "is being written by another process"));
        assert_eq!(supernodes(), saved);
    }
    h.get_by_label("Remove say Mary").click();
    h.run_steps(3);
    assert!(supernodes().is_empty(), "removed from the store");
    assert!(!has_label(&h, "Remove say Mary"));

    // The feature page of an analysed transcoder's feature: the Features tab, that dictionary.
    h.get_by_label("Open feature 3 of tc1").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Features);
    assert_eq!(h.state().current_feature(), Some(3));
    wait_for(&mut h, "tc1 to load", |h| h.state().is_loaded());
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Graph);
    assert_eq!(h.state().current_graph_node(), Some((GRAPH, "1_3_3")));

    // A double-click on a feature opens its page too (both clicks in one frame: the harness's
    // clock steps a quarter second a frame).
    let centre = node_rect(&h, "1_3_3").center();
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
    assert_eq!((h.state().tab, h.state().current_feature()), (Tab::Features, Some(3)));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Graph);

    // Zoom about a node, pan by dragging, reset.
    let at_first = node_rect(&h, "0_5_2");
    h.hover_at(at_first.center());
    h.event(Event::Zoom(2.0));
    h.run_steps(2);
    let zoomed = node_rect(&h, "0_5_2");
    assert!((zoomed.width() / at_first.width() - 2.0).abs() < 0.1, "{at_first:?} → {zoomed:?}");
    assert!((zoomed.center() - at_first.center()).length() < 1.0, "the point under the pointer stays");
    h.get_by_label("Reset view").click();
    h.run_steps(2);
    assert_eq!(node_rect(&h, "0_5_2"), at_first);
    let canvas = h.get_by_label("attribution graph").rect();
    let empty = canvas.min + vec2(60.0, 10.0);
    h.hover_at(empty);
    h.drag_at(empty);
    for step in 1..=4 {
        h.hover_at(empty + vec2(10.0, 5.0) * step as f32);
    }
    h.drop_at(empty + vec2(40.0, 20.0));
    h.run_steps(2);
    let moved = node_rect(&h, "0_5_2").center() - at_first.center();
    assert!(moved.x > 20.0 && moved.y > 10.0, "the drag pans the graph by {moved:?}");
    h.get_by_label("Reset view").click();
    h.run_steps(2);
    assert_eq!(node_rect(&h, "0_5_2"), at_first);

    // The graph menu.
    h.get_by_label("Attribution graph").click();
    h.run_steps(2);
    h.get_by_label("other").click();
    h.run_steps(3);
    assert_eq!(h.state().graph_view().graph_name(), Some("other"));
    assert!(h.query_by_label("node E_1_0").is_some() && h.query_by_label("node 0_5_2").is_none());
}

/// A store without graphs says what to run; `loupe gui --graph` checks the name.
#[test]
fn graph_view_says_what_the_store_lacks() {
    let s = graph_store().to_str().unwrap();
    loupe_tests::assert_one_error(
        graph_store(),
        &["gui", s, "--graph", "nope"],
        "has no attribution graph \"nope\" (graphs: ioi-small, other)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    Store::create(&dir).unwrap();
    let d = dir.to_str().unwrap();
    loupe_tests::assert_one_error(
        &dir,
        &["gui", d, "--graph", "ioi-small"],
        "has no attribution graph \"ioi-small\" (graphs: none; run `loupe graph` first)",
    );
    let h = graph_app(&dir, None);
    assert!(has_label(
        &h,
        &format!(
            "no attribution graphs in this store: run `loupe graph --store {d} --transcoders NAMES --prompt TEXT`"
        )
    ));
}

/// A graph of 40,000 nodes and 400,000 edges over 256 tokens: density bins at zoom 1, nodes one
/// by one once zoomed in, at most the edge budget drawn; frames stay cheap (printed).
#[test]
fn graph_view_draws_a_large_graph_by_level_of_detail() {
    let (layers, tokens) = (18u16, 256u32);
    let mut state = 11u64;
    let mut random = move |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let mut nodes: Vec<GraphNodeRow> = (0..tokens).map(|p| node("embedding", 0, p, p, 0.0, 0.01)).collect();
    let mut seen = std::collections::HashSet::new();
    while nodes.len() < 40_000 {
        let (l, p, f) = (random(layers as u64) as u16, random(tokens as u64) as u32, random(8192) as u32);
        if seen.insert((l, p, f)) {
            nodes.push(node("feature", l, p, f, 1.0, 1.0 / (1 + random(1000)) as f32));
        }
    }
    nodes.push(node("logit", layers, tokens - 1, 5, 0.0, 0.9));
    let n = nodes.len() as u64;
    let edges: Vec<GraphEdgeRow> = (0..400_000)
        .map(|k| GraphEdgeRow {
            source: random(n) as u32,
            target: random(n) as u32,
            weight: (1.0 + random(1000) as f32) * if k % 3 == 0 { -1e-3 } else { 1e-3 },
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let words: Vec<String> = (0..tokens).map(|p| format!(" w{p}")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let e = entry(&words, layers as u32, nodes.len(), edges.len());
    write_graph(&Store::create(&dir).unwrap(), "big", nodes, &edges, e);
    let mut h = graph_app(&dir, Some("big"));
    assert_eq!(h.state().graph_view().graph_name(), Some("big"));
    assert!(has_label(&h, "edges with |weight| ≥ "));
    h.get_by_role_and_label(Role::Slider, "Edge threshold").set_value_accesskit(0.0);
    h.run_steps(3);
    assert!(has_label(&h, "400000 of 400000 edges with |weight| ≥ 0.0000"));
    let drawn = h.state().graph_view().drawn;
    assert!(drawn.bins > 0 && drawn.nodes == 0, "zoomed out: density bins ({drawn:?})");
    assert_eq!(drawn.edges, loupe_app::gui::graph::EDGE_BUDGET, "the edge budget");
    assert!(h.query_by_label("node E_0_0").is_none(), "no buttons for density bins");
    let per_frame = frame_time(&mut h);
    println!("{:.1} ms per frame zoomed out ({drawn:?})", per_frame * 1e3);
    assert!(per_frame < 0.5, "a frame takes {per_frame:.2} s");
    // Zoom in about the canvas' centre until nodes are drawn one by one.
    let centre = h.get_by_label("attribution graph").rect().center();
    h.hover_at(centre);
    for _ in 0..6 {
        h.event(Event::Zoom(2.0));
        h.run_steps(1);
    }
    h.run_steps(2);
    let drawn = h.state().graph_view().drawn;
    assert!(drawn.nodes > 0 && drawn.bins == 0, "zoomed in: nodes one by one ({drawn:?})");
    assert!(drawn.edges <= loupe_app::gui::graph::EDGE_BUDGET);
    let per_frame = frame_time(&mut h);
    println!("{:.1} ms per frame zoomed in ({drawn:?})", per_frame * 1e3);
    assert!(per_frame < 0.5, "a frame takes {per_frame:.2} s");
}

/// Seconds per frame over 10 frames (the UI pass and the tessellation of what it drew).
fn frame_time(h: &mut Harness<'static, LoupeApp>) -> f64 {
    let start = std::time::Instant::now();
    for _ in 0..10 {
        h.step();
        let shapes = h.output().shapes.clone();
        std::hint::black_box(h.ctx.tessellate(shapes, 1.0));
    }
    start.elapsed().as_secs_f64() / 10.0
}
