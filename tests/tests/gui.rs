//! The desktop app, driven headless through egui_kittest by its accessible labels, on a store the
//! pipeline made: real Gemma 3 270M activations at `blocks.3.hook_resid_post`, a seeded TopK SAE,
//! `loupe analyze`, offline explanations with their MiniLM index and embedding scores (the Heads
//! view's tests are in `gui_heads.rs` and share the helpers here). Snapshot
//! images of each view are rendered on the CPU (wgpu on Mesa's lavapipe) and compared with the
//! committed ones under `tests/snapshots/` (`UPDATE_SNAPSHOTS=1` rewrites them).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::{Harness, SnapshotOptions};
use loupe_app::gui::{LoupeApp, Options};
use loupe_dict::sae::SaeSpec;
use loupe_dict::{Sae, Variant};
use loupe_store::Store;
use loupe_tests::planted::commit_sae;
use loupe_tests::{gemma_gguf, loupe, minilm_dir, stderr};

const DICT: &str = "l3";
pub(crate) const HOOK: &str = "blocks.3.hook_resid_post";

/// The store, made once for all tests of this file (and left in the temp folder).
pub(crate) fn store() -> &'static Path {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let corpus = dir.join("corpus.txt");
        let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money \
                    in my purse, and nothing particular to interest me on shore, I thought I would sail about \
                    a little and see the watery part of the world. It is a way I have of driving off the spleen \
                    and regulating the circulation. Whenever I find myself growing grim about the mouth; \
                    whenever it is a damp, drizzly November in my soul, then I account it high time to get \
                    to sea as soon as I can. ";
        std::fs::write(&corpus, text.repeat(6)).unwrap();
        let s = dir.join("store");
        let (m, c, st) = (gemma_gguf(), corpus.to_str().unwrap().to_string(), s.to_str().unwrap().to_string());
        let run = |args: &[&str]| {
            let out = loupe(args);
            assert!(out.status.success(), "loupe {args:?}: {}", stderr(&out));
        };
        run(&["capture", "--model", m.to_str().unwrap(), "--corpus", &c, "--store", &st, "--hook", HOOK]);
        let sae = Sae::init(SaeSpec { variant: Variant::Topk, d_in: 640, n_features: 48, k: 4 }, 7);
        commit_sae(&Store::open_rw(&s).unwrap(), DICT, &sae, HOOK);
        run(&["analyze", "--store", &st, "--dictionary", DICT]);
        // A second dictionary, to switch to.
        let other = Sae::init(SaeSpec { variant: Variant::Topk, d_in: 640, n_features: 32, k: 4 }, 9);
        commit_sae(&Store::open_rw(&s).unwrap(), "l3-small", &other, HOOK);
        run(&["analyze", "--store", &st, "--dictionary", "l3-small", "--no-index"]);
        let e = minilm_dir();
        let common = ["--store", &st, "--dictionary", DICT, "--embedder", e.to_str().unwrap()];
        run(&[&["explain"][..], &common].concat());
        run(&[&["score"][..], &common, &["--test-examples", "8"]].concat());
        s
    })
}

fn app() -> LoupeApp {
    LoupeApp::new(Options {
        store: store().to_path_buf(),
        embedder: Some(minilm_dir()),
        model: Some(gemma_gguf()),
        ..Options::default()
    })
}

/// A harness over `app`. Model vocabularies hold scripts the default fonts lack (the app finds
/// system fonts for them; the harness has only egui's own fonts), so only the test of the bare
/// window checks for missing glyphs in the app's own labels.
pub(crate) fn harness(app: LoupeApp) -> Harness<'static, LoupeApp> {
    Harness::builder()
        .with_size([1280.0, 800.0])
        .allow_missing_glyphs()
        .wgpu()
        .build_ui_state(|ui, app: &mut LoupeApp| app.show(ui), app)
}

/// Step frames until `done` holds (background jobs run on their own threads meanwhile).
pub(crate) fn wait_for(
    h: &mut Harness<'static, LoupeApp>,
    what: &str,
    done: impl Fn(&Harness<'static, LoupeApp>) -> bool,
) {
    let start = Instant::now();
    while !done(h) {
        assert!(start.elapsed() < Duration::from_secs(180), "timed out waiting for {what}");
        assert!(h.state().error().is_none(), "while waiting for {what}: {:?}", h.state().error());
        let shown = h.query_all_by_label_contains("Error:").next().and_then(|n| n.accesskit_node().label());
        assert!(shown.is_none(), "while waiting for {what}: {shown:?}");
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(3);
}

/// Replace the text of the text field labelled `label`.
pub(crate) fn type_into(h: &mut Harness<'static, LoupeApp>, label: &str, text: &str) {
    h.get_by_label(label).focus();
    h.run_steps(1);
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.key_press(egui::Key::Backspace);
    h.run_steps(1);
    h.get_by_label(label).type_text(text);
    h.run_steps(2);
}

pub(crate) fn has_label(h: &Harness<'static, LoupeApp>, label: &str) -> bool {
    h.query_all_by_label_contains(label).next().is_some()
}

/// Snapshots differ a little between CPUs (the model's floats) and Mesa versions: allow a small
/// share of pixels to differ.
pub(crate) fn snapshot(h: &mut Harness<'static, LoupeApp>, name: &str) {
    let options = SnapshotOptions::new().threshold(2.0).max_failed_pixels(6000);
    h.snapshot_options(name, &options);
}

#[test]
fn browse_search_open_follow_and_go_back() {
    let before = loupe_tests::snapshot(store());
    let mut h = harness(app());
    wait_for(&mut h, "the dictionary and its explanations to load", |h| h.state().notes_loaded());
    let tables = loupe_store::FeatureTables::open(&Store::open(store()).unwrap(), DICT).unwrap();
    let live = (0..48).filter(|&f| !tables.stats(f).unwrap().dead).count();
    assert!(has_label(&h, &format!("{live} of 48 features")), "the list hides dead features");
    snapshot(&mut h, "feature_list");

    // Text search over explanations: every offline explanation says "fires on".
    type_into(&mut h, "Search", "fires on");
    assert!(has_label(&h, &format!("{live} of 48 features")), "every live feature's explanation says it");
    type_into(&mut h, "Search", "fires on nothing like this");
    assert!(has_label(&h, "0 of 48 features"));

    // Semantic search ranks features by meaning; open the first hit.
    h.get_by_label("Semantic").click();
    h.run_steps(2);
    type_into(&mut h, "Search", "the word money");
    h.get_by_label("Find").click();
    wait_for(&mut h, "semantic results", |h| has_label(h, "ranked by similarity to \"the word money\""));
    let first = h
        .query_all_by_role(Role::Button)
        .find_map(|n| n.accesskit_node().label().and_then(|l| l.strip_prefix("feature ").map(str::to_string)))
        .expect("a hit");
    let first: u32 = first.parse().unwrap();
    h.get_by_role_and_label(Role::Button, &format!("feature {first}")).click();
    h.run_steps(3);
    assert_eq!(h.state().current_feature(), Some(first));
    assert!(has_label(&h, &format!("Feature {first} of {DICT}")), "the page's heading");
    assert!(has_label(&h, "Top examples"));
    assert!(has_label(&h, "explainer offline"), "the explanation's provenance");
    snapshot(&mut h, "feature_page");

    // Follow a neighbour, then go back.
    let similar = h
        .query_all_by_role(Role::Link)
        .find_map(|n| n.accesskit_node().label().and_then(|l| l.strip_prefix("feature ").map(str::to_string)))
        .expect("a neighbour link");
    let similar: u32 = similar.parse().unwrap();
    // (By accessibility action: the link may be below the page's visible part.)
    h.get_all_by_role_and_label(Role::Link, &format!("feature {similar}")).next().unwrap().click_accesskit();
    h.run_steps(3);
    assert_eq!(h.state().current_feature(), Some(similar));
    assert!(has_label(&h, &format!("Feature {similar} of {DICT}")));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().current_feature(), Some(first));
    h.get_by_label("Forward »").click();
    h.run_steps(3);
    assert_eq!(h.state().current_feature(), Some(similar));
    drop(h);
    assert!(before == loupe_tests::snapshot(store()), "the app changed the store");
}

#[test]
fn prompt_lab_runs_a_prompt_and_steers() {
    let mut h = harness(app());
    wait_for(&mut h, "the dictionary and its explanations to load", |h| h.state().notes_loaded());
    h.get_by_label("Prompt lab").click();
    h.run_steps(2);
    h.get_by_label("Run").click();
    wait_for(&mut h, "the prompt to run", |h| has_label(h, "Next token"));
    // Gemma's top next token after the IOI prompt is " Mary".
    assert!(has_label(&h, "\" Mary\""), "the next-token list");
    // The last token's features are listed; pick another token, then the last again.
    assert!(has_label(&h, "Top features at token 14 \" to\""), "the last token is selected after a run");
    h.get_all_by_label(" Mary").next().expect("the token Mary").click();
    h.run_steps(2);
    assert!(has_label(&h, "Top features at token 2 \" Mary\""));
    h.get_all_by_label(" to").last().expect("the last token").click();
    h.run_steps(2);
    assert!(has_label(&h, "Top features at token 14"));
    // Every token's strongest features, unfolded and folded again.
    h.get_by_label("Top features of every token").click();
    h.run_steps(2);
    assert!(has_label(&h, " 14  to") && has_label(&h, "  2  Mary"), "a row per token");
    h.get_by_label("Top features of every token").click();
    h.run_steps(2);
    let feature = h.query_all_by_role(Role::Link).find_map(|n| {
        n.accesskit_node().label().and_then(|l| l.strip_prefix("feature ").map(str::to_string))
    });
    h.get_by_label("Steer").click();
    wait_for(&mut h, "the steered distribution", |h| has_label(h, "added with coefficient"));
    snapshot(&mut h, "prompt_lab");
    if let Some(f) = feature {
        let f: u32 = f.parse().unwrap();
        h.get_all_by_role_and_label(Role::Link, &format!("feature {f}")).next().unwrap().click_accesskit();
        h.run_steps(3);
        assert_eq!(h.state().current_feature(), Some(f));
        assert!(has_label(&h, &format!("Feature {f} of {DICT}")));
    }
}

#[test]
fn a_missing_store_is_an_error_in_the_window() {
    let app = LoupeApp::new(Options { store: "/nonexistent/store".into(), ..Options::default() });
    let mut h = Harness::builder()
        .with_size([800.0, 300.0])
        .build_ui_state(|ui, app: &mut LoupeApp| app.show(ui), app);
    h.run_steps(2);
    let error = h.state().error().expect("an error").to_string();
    assert!(error.contains("/nonexistent/store"), "{error}");
    assert!(has_label(&h, "Error:"));
}

/// Without a dictionary, or without its analysis, the app still draws every view, and each says
/// what the store lacks and the command that makes it.
#[test]
fn views_say_what_the_store_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let spec = loupe_store::HookSpec { d: 16, dtype: loupe_store::DType::F32, grad: false };
    loupe_tests::write_synthetic(&Store::create(&dir).unwrap(), HOOK, spec, 2, 8, 16, 5);
    let lacks = |message: &str| {
        let app = LoupeApp::new(Options { store: dir.clone(), ..Options::default() });
        let mut h = Harness::builder()
            .with_size([1280.0, 800.0])
            .build_ui_state(|ui, app: &mut LoupeApp| app.show(ui), app);
        h.run_steps(3);
        assert_eq!(h.state().error(), None);
        assert!(!has_label(&h, "Error:"));
        assert!(has_label(&h, message), "the feature list says {message:?}");
        assert!(has_label(&h, "No feature open."), "the feature page draws");
        h.get_by_label("Prompt lab").click();
        h.run_steps(2);
        assert!(has_label(&h, "Prompt lab") && has_label(&h, message), "the prompt lab says {message:?}");
        h.get_by_label("Features").click();
        h.run_steps(2);
        assert!(has_label(&h, message));
    };
    lacks("no dictionary in this store: run `loupe train-sae`");
    let sae = Sae::init(SaeSpec { variant: Variant::Topk, d_in: 16, n_features: 8, k: 2 }, 3);
    commit_sae(&Store::open_rw(&dir).unwrap(), "sae", &sae, HOOK);
    lacks("no analysed dictionary in this store: run `loupe analyze --dictionary sae`");
}

/// The planted store records no model, and its dictionary reads width 32: the prompt lab says so in
/// the window, for each of the two problems, and the app goes on.
#[test]
fn prompt_lab_errors_appear_in_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    drop(loupe_tests::planted::planted_store(&dir, &loupe_tests::planted::planted_values()));
    let out = loupe(&["analyze", "--store", dir.to_str().unwrap(), "--dictionary", "sae", "--no-index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (model, expected) in [
        (None, "the store records no model; start the app with --model"),
        (Some(gemma_gguf()), "dictionary sae reads width 32 but the model's residual stream is 640 wide"),
    ] {
        let mut h = harness(LoupeApp::new(Options { store: dir.clone(), model, ..Options::default() }));
        wait_for(&mut h, "the dictionary and its explanations to load", |h| h.state().notes_loaded());
        h.get_by_label("Prompt lab").click();
        h.run_steps(2);
        h.get_by_label("Run").click();
        let start = Instant::now();
        while !has_label(&h, "Error:") {
            assert!(start.elapsed() < Duration::from_secs(120), "no error shown (expected {expected:?})");
            h.step();
            std::thread::sleep(Duration::from_millis(20));
        }
        h.run_steps(2);
        assert!(has_label(&h, expected), "expected {expected:?} in the window");
        // The app still works: back to the list, open a feature.
        h.get_by_label("Features").click();
        h.run_steps(2);
        h.get_by_role_and_label(Role::Button, "feature 0").click();
        h.run_steps(2);
        assert_eq!(h.state().current_feature(), Some(0));
    }
}

#[test]
fn dictionaries_are_selectable() {
    let mut h = harness(app());
    wait_for(&mut h, "the dictionary and its explanations to load", |h| h.state().notes_loaded());
    h.get_by_role_and_label(Role::Button, "feature 3").click();
    h.run_steps(2);
    assert_eq!(h.state().current_feature(), Some(3));
    h.get_by_label("Dictionary").click();
    h.run_steps(2);
    h.get_by_label("l3-small").click();
    h.run_steps(2);
    wait_for(&mut h, "the other dictionary to load", |h| h.state().notes_loaded());
    assert!(has_label(&h, "sae/topk · 32 features"), "the header names the new dictionary");
    assert!(has_label(&h, "of 32 features"), "the list shows its features");
    assert_eq!(h.state().current_feature(), None, "pages of the other dictionary are closed");
    assert!(has_label(&h, "none yet: run `loupe explain`") || has_label(&h, "Select a feature"));
}

/// Back after a switch of dictionary opens the page left in the other one, in its dictionary.
#[test]
fn back_returns_across_a_dictionary_switch() {
    let mut h = harness(app());
    wait_for(&mut h, "the dictionary and its explanations to load", |h| h.state().notes_loaded());
    h.get_by_role_and_label(Role::Button, "feature 3").click();
    h.run_steps(2);
    h.get_by_label("Dictionary").click();
    h.run_steps(2);
    h.get_by_label("l3-small").click();
    wait_for(&mut h, "the other dictionary to load", |h| has_label(h, "sae/topk · 32 features"));
    assert_eq!(h.state().current_feature(), None);
    h.get_by_label("« Back").click();
    wait_for(&mut h, "the first dictionary to load again", |h| has_label(h, "sae/topk · 48 features"));
    assert_eq!(h.state().current_feature(), Some(3));
    assert!(has_label(&h, &format!("Feature 3 of {DICT}")));
}

/// `loupe gui` checks its arguments before it opens a window: one error line, non-zero exit.
#[test]
fn bad_gui_arguments_get_one_error_line() {
    let s = store().to_str().unwrap();
    let one = loupe_tests::assert_one_error;
    one(store(), &["gui", s, "--dictionary", "nope"], "has no analysis of \"nope\" (analysed: l3, l3-small)");
    one(
        store(),
        &["gui", s, "--dictionary", DICT, "--feature", "48"],
        "feature 48 does not exist (l3 has 48 features)",
    );
    one(
        store(),
        &["gui", s, "--model", "/nonexistent/model.gguf"],
        "model not found: /nonexistent/model.gguf",
    );
    let out = loupe(&["gui", "/nonexistent/store"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/store"), "{err}");
}

/// Explanations record the analysis they were made from: after a new `loupe analyze` they are
/// stale, `loupe store info` and the app say so, and `loupe explain --redo` makes them current.
#[test]
fn explanations_of_an_earlier_analysis_are_marked_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    drop(loupe_tests::planted::planted_store(&dir, &loupe_tests::planted::planted_values()));
    let d = dir.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = loupe(args);
        assert!(out.status.success(), "loupe {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let e = minilm_dir();
    run(&["analyze", "--store", d, "--dictionary", "sae", "--no-index"]);
    run(&["explain", "--store", d, "--dictionary", "sae", "--embedder", e.to_str().unwrap()]);
    assert!(!Store::open(&dir).unwrap().explanations_stale("sae"));
    assert!(!run(&["store", "info", d]).contains("stale"));

    run(&["analyze", "--store", d, "--dictionary", "sae", "--no-index", "--top", "5"]);
    assert!(Store::open(&dir).unwrap().explanations_stale("sae"));
    assert!(run(&["store", "info", d]).contains("(stale: made from an earlier analysis"));
    let mut h = harness(LoupeApp::new(Options { store: dir.clone(), ..Options::default() }));
    wait_for(&mut h, "the dictionary and its explanations to load", |h| h.state().notes_loaded());
    assert!(has_label(&h, "stale explanations: made from an earlier analysis"));
    drop(h);

    // Scoring rewrites the tables but makes nothing current; explaining anew does.
    run(&[
        "score",
        "--store",
        d,
        "--dictionary",
        "sae",
        "--embedder",
        e.to_str().unwrap(),
        "--test-examples",
        "4",
    ]);
    assert!(Store::open(&dir).unwrap().explanations_stale("sae"));
    run(&["explain", "--store", d, "--dictionary", "sae", "--embedder", e.to_str().unwrap(), "--redo"]);
    assert!(!Store::open(&dir).unwrap().explanations_stale("sae"));
}
