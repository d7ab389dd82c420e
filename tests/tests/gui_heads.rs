//! The app's Heads view, driven through egui_kittest by its accessible labels, on a store of the
//! tiny GPT-2 (2 layers × 4 heads, a character-level tokenizer): an attention-output SAE at
//! `blocks.0.attn.hook_z` trained and analysed by the pipeline, and `loupe heads`' table. The
//! harness helpers and snapshot comparison are `gui.rs`'.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use loupe_app::gui::{LoupeApp, Options};
use loupe_store::Store;
use loupe_tests::{gemma_gguf, loupe, stderr};

use crate::gui::{HOOK, harness, has_label, snapshot, store, type_into, wait_for};

const ATTN_DICT: &str = "attn";
const ATTN_HOOK: &str = "blocks.0.attn.hook_z";

/// The store's heads table.
fn heads_table() -> loupe_store::HeadsTable {
    Store::open(&attn_store().0).unwrap().read_heads("default").unwrap().expect("a heads table")
}

/// The grid's "range" line for `column` of the heads table.
fn range_line(column: &str) -> String {
    let values: Vec<f32> = heads_table().rows.iter().map(|r| r.score(column)).collect();
    let (lo, hi) =
        values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    format!("range {lo:.4} to {hi:.4}")
}

/// The tiny store (made once, left in the temp folder) and its model folder.
fn attn_store() -> &'static (PathBuf, PathBuf) {
    static STORE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let model = loupe_tests::tiny_model(&dir.join("model"));
        let corpus = dir.join("corpus.txt");
        let text = "The cat sat on the mat. The dog sat on the log. A cat and a dog met on a mat by a log. ";
        std::fs::write(&corpus, text.repeat(40)).unwrap();
        let s = dir.join("store");
        let (m, c, st) = (model.to_str().unwrap(), corpus.to_str().unwrap(), s.to_str().unwrap());
        let run = |args: &[&str]| {
            let out = loupe(args);
            assert!(out.status.success(), "loupe {args:?}: {}", stderr(&out));
        };
        run(&[
            "capture",
            "--model",
            m,
            "--corpus",
            c,
            "--store",
            st,
            "--hook",
            ATTN_HOOK,
            "--context",
            "64",
            "--no-bos",
        ]);
        run(&[
            "train-sae",
            "--store",
            st,
            "--dictionary",
            ATTN_DICT,
            "--hook",
            ATTN_HOOK,
            "--n-features",
            "32",
            "--k",
            "4",
            "--batch",
            "256",
            "--eval-contexts",
            "0",
        ]);
        run(&["analyze", "--store", st, "--dictionary", ATTN_DICT, "--no-index"]);
        run(&["heads", "--store", st, "--repeat-len", "20", "--text-len", "64", "--mean-ablation"]);
        (s, model)
    })
}

fn attn_app(options: Options) -> LoupeApp {
    let (store, model) = attn_store();
    LoupeApp::new(Options { store: store.clone(), model: Some(model.clone()), ..options })
}

/// The grid, a score chosen, a head clicked, its pattern on the prompt, back and forward.
#[test]
fn heads_view_shows_the_grid_and_a_heads_pattern() {
    let before = loupe_tests::snapshot(&attn_store().0);
    let mut h = harness(attn_app(Options::default()));
    wait_for(&mut h, "the dictionary to load", |h| h.state().notes_loaded());
    h.get_by_label("Heads").click();
    h.run_steps(3);
    assert!(has_label(&h, "default · 2 layers × 4 heads · 16 sequences"), "the table's heading");
    for l in 0..2 {
        for hd in 0..4 {
            assert!(h.query_by_label(&format!("{l}.{hd}")).is_some(), "cell {l}.{hd}");
        }
    }
    // Coloured by induction first: its range is the table's.
    assert!(has_label(&h, &range_line("induction")), "induction's range");
    snapshot(&mut h, "heads_grid");
    h.get_by_label("Score").click();
    h.run_steps(2);
    h.get_by_label("ablation Δloss (zero)").click();
    h.run_steps(2);
    assert!(has_label(&h, &range_line("ablation_zero")), "the ablation deltas' range");

    // Open head 1.2: its scores, and its pattern on the prompt lab's prompt (58 characters).
    h.get_by_label("1.2").click();
    h.run_steps(2);
    assert_eq!(h.state().current_head(), Some((1, 2)));
    assert!(has_label(&h, "Head 1.2"));
    let row = heads_table().get(1, 2).unwrap().clone();
    assert!(
        has_label(&h, &format!("{:.4}", row.induction))
            && has_label(&h, &format!("{:.4}", row.ablation_zero))
    );
    wait_for(&mut h, "the pattern", |h| has_label(h, "head 1.2 on 58 tokens · rows"));
    snapshot(&mut h, "heads_pattern");

    // Another prompt, typed here: the prompt lab has it too.
    type_into(&mut h, "Prompt", "abcabc");
    h.get_by_label("Run").click();
    wait_for(&mut h, "the pattern of the new prompt", |h| has_label(h, "head 1.2 on 6 tokens · rows"));
    assert_eq!(h.state_mut().prompt().as_str(), "abcabc");

    // Another head, then back and forward through the history.
    h.get_by_label("0.3").click();
    wait_for(&mut h, "head 0.3's pattern", |h| has_label(h, "head 0.3 on 6 tokens · rows"));
    h.get_by_label("« Back").click();
    h.run_steps(2);
    assert_eq!(h.state().current_head(), Some((1, 2)));
    h.get_by_label("Features").click();
    h.run_steps(2);
    let first = h
        .query_all_by_role(Role::Button)
        .find_map(|n| n.accesskit_node().label().and_then(|l| l.strip_prefix("feature ").map(str::to_string)))
        .expect("a live feature in the list");
    h.get_by_role_and_label(Role::Button, &format!("feature {first}")).click();
    h.run_steps(2);
    let first: u32 = first.parse().unwrap();
    assert_eq!(h.state().current_feature(), Some(first));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().current_head(), Some((1, 2)), "back from a feature to a head");
    assert!(has_label(&h, "Head 1.2"), "in the Heads view");
    h.get_by_label("Forward »").click();
    h.run_steps(2);
    assert_eq!(h.state().current_feature(), Some(first));
    drop(h);
    assert!(before == loupe_tests::snapshot(&attn_store().0), "the app changed the store");
}

/// A head of the attention-output SAE's layer lists the features most attributed to it; one opens
/// its page, with its head-attribution bars and, on the prompt, its DFA per head and source token.
/// (Needs the head attribution of `loupe analyze` and `loupe dfa`'s computation.)
#[test]
fn heads_view_opens_an_attributed_feature() {
    let mut h = harness(attn_app(Options { head: Some((0, 1)), ..Options::default() }));
    wait_for(&mut h, "the dictionary to load", |h| h.state().notes_loaded());
    assert_eq!(h.state().current_head(), Some((0, 1)), "--head opens the head");
    wait_for(&mut h, "the pattern", |h| has_label(h, "head 0.1 on 58 tokens · rows"));
    assert!(
        !has_label(&h, "has no head attribution"),
        "the analysis of an attention-output SAE has its head attribution"
    );
    let feature = h
        .query_all_by_role(Role::Link)
        .find_map(|n| n.accesskit_node().label().and_then(|l| l.strip_prefix("feature ").map(str::to_string)))
        .expect("a feature attributed to head 0.1");
    let feature: u32 = feature.parse().unwrap();
    h.get_all_by_role_and_label(Role::Link, &format!("feature {feature}")).next().unwrap().click_accesskit();
    h.run_steps(3);
    assert_eq!(h.state().current_feature(), Some(feature));
    assert!(has_label(&h, &format!("Feature {feature} of {ATTN_DICT}")));
    assert!(has_label(&h, "Heads of layer 0 (attention-output SAE)"));
    assert!(has_label(&h, "w_f(h): the share of the feature's decoder norm"), "head-attribution bars");
    h.get_by_label("Attribute").click();
    wait_for(&mut h, "the attribution", |h| has_label(h, "Source tokens for head"));
    assert!(has_label(&h, "pre-activation"));
    snapshot(&mut h, "heads_feature_dfa");
    h.get_all_by_role_and_label(Role::Link, "0.1").next().unwrap().click_accesskit();
    h.run_steps(3);
    assert_eq!(h.state().current_head(), Some((0, 1)), "a head link opens the head");
}

/// A store without a heads table says so and names the command; `loupe gui --head` checks the
/// head against the table.
#[test]
fn heads_view_says_what_the_store_lacks() {
    let s = attn_store().0.to_str().unwrap();
    loupe_tests::assert_one_error(
        &attn_store().0,
        &["gui", s, "--head", "2.0"],
        "head 2.0 does not exist: the model has 2 layers of 4 heads",
    );
    loupe_tests::assert_one_error(&attn_store().0, &["gui", s, "--head", "x"], "bad head \"x\"");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let spec = loupe_store::HookSpec { d: 16, dtype: loupe_store::DType::F32, grad: false };
    loupe_tests::write_synthetic(&Store::create(&dir).unwrap(), HOOK, spec, 2, 8, 16, 5);
    let mut h = harness(LoupeApp::new(Options { store: dir, ..Options::default() }));
    h.run_steps(3);
    h.get_by_label("Heads").click();
    h.run_steps(3);
    assert!(has_label(&h, "no head scores in this store: run `loupe heads --store"));
}

/// A pattern of about 1,000 Gemma tokens: computed in the background, drawn as one texture, with
/// frames that stay cheap (the time per frame is printed).
#[test]
fn heads_view_draws_the_pattern_of_a_long_prompt() {
    let sentence = "Call me Ishmael. Some years ago, never mind how long precisely, having little money, \
                    I thought I would sail about a little and see the watery part of the world. ";
    let prompt = sentence.repeat(28);
    let options = Options { head: Some((5, 0)), prompt: Some(prompt), ..Options::default() };
    let mut h = harness(LoupeApp::new(Options {
        store: store().to_path_buf(),
        model: Some(gemma_gguf()),
        ..options
    }));
    let start = Instant::now();
    // The caption, "head 5.0 on N tokens · rows: …" (a label's text is its accessible value).
    let caption = |h: &Harness<'static, LoupeApp>| {
        h.query_all_by_label_contains("head 5.0 on ")
            .filter_map(|n| n.accesskit_node().value().or_else(|| n.accesskit_node().label()))
            .find(|t| t.contains(" tokens · rows"))
    };
    wait_for(&mut h, "the long pattern", |h| caption(h).is_some());
    let caption = caption(&h).unwrap();
    let n: usize = caption["head 5.0 on ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!((900..=1100).contains(&n), "{caption}");
    println!("pattern of {n} tokens shown after {:.1} s", start.elapsed().as_secs_f64());
    let frames = Instant::now();
    h.run_steps(10);
    let per_frame = frames.elapsed().as_secs_f64() / 10.0;
    println!("{:.1} ms per frame with the {n} × {n} pattern shown", per_frame * 1e3);
    assert!(per_frame < 1.0, "a frame takes {per_frame:.2} s");
    // This store has no heads table: the grid's place says so (no snapshot: it names a temp path).
    assert!(has_label(&h, "no head scores in this store: run `loupe heads --store"));
}
