//! The app's Experts view, driven through egui_kittest by its accessible labels, on a store with a
//! tiny Monet dictionary (trained and analysed by the `loupe` binary on the GPT-2 fixture, 4² = 16
//! experts, each one feature) and three experts entries written through `Store::write_experts`
//! (planted tables, so every number shown is known): `monet` (its experts, two domains), `moex`
//! (a MoE-X dictionary of 4 features per expert, not in the store, so no feature pages) and
//! `router` (a router hook over a one-domain corpus); plus an empty store and a synthetic entry
//! of 65,536 experts. The harness helpers and snapshot comparison are `gui.rs'`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use egui::accesskit::Role;
use egui::{Event, Modifiers, PointerButton, vec2};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use loupe_app::gui::{LoupeApp, Options, Tab};
use loupe_store::{
    CoactivationRow, EntropyBin, ExpertDomainRow, ExpertRow, ExpertTokenRow, ExpertsEntry, ExpertsSettings,
    ExpertsSource, ExpertsTables, Store,
};
use loupe_tests::{loupe, stderr, tiny_model};

use crate::gui::{harness, has_label, snapshot, wait_for};

const N: u32 = 16;
const HOOK: &str = "blocks.1.hook_resid_post";

/// The tiny tokenizer's id of an ASCII character (`tiny_model`: [UNK], NUL, tab, newline, then
/// space to `~`).
fn id(c: char) -> u32 {
    c as u32 - ' ' as u32 + 4
}

/// Usage of expert `e`: a permutation of 1..=16 over 40, so the heatmap's order is not the ids'.
fn usage(e: u32) -> f32 {
    (1 + (e * 5) % N) as f32 / 40.0
}

/// Planted tables over `n` experts: expert e's top tokens are 'a' + e (60%) and 'z' (40%);
/// domains `moby-dick` 75% and `sotu` 25% (specialization null with one domain); partners
/// P(e+1 | e) = 0.66 and P(e+2 | e) = 0.2; an entropy histogram of four bins.
fn tables(n: u32, domains: usize) -> ExpertsTables {
    let mut t = ExpertsTables::default();
    for e in 0..n {
        let tokens = (usage(e) * 1000.0) as u64;
        let two = domains > 1;
        t.experts.push(ExpertRow {
            expert: e,
            tokens,
            usage: usage(e),
            mean_gate: 0.5,
            top_token_share: 0.6,
            top_token: id((b'a' + e as u8) as char),
            top_domain_specialization: two.then_some(0.125 + e as f32 / 100.0),
            top_domain: 0,
        });
        for (token, share) in [((b'a' + e as u8) as char, 0.6), ('z', 0.4)] {
            t.vocab.push(ExpertTokenRow {
                expert: e,
                token: id(token),
                count: (share * tokens as f32) as u64,
                share_of_expert: share,
                share_of_token: 0.5,
            });
        }
        for (d, share) in [(0u16, 0.75f32), (1, 0.25)].into_iter().take(domains) {
            let share = if two { share } else { 1.0 };
            t.domains.push(ExpertDomainRow {
                expert: e,
                domain: d,
                count: (share * tokens as f32) as u64,
                share_of_expert: share,
                specialization: two.then_some(share / 10.0),
            });
        }
        for (j, p) in [((e + 1) % n, 0.66f32), ((e + 2) % n, 0.2)] {
            t.coactivation.push(CoactivationRow {
                expert_i: e,
                expert_j: j,
                both: (p * tokens as f32) as u64,
                p_j_given_i: p,
            });
        }
    }
    t.entropy = (0..4)
        .map(|b| EntropyBin { lo: b as f32 * 0.7, hi: (b + 1) as f32 * 0.7, tokens: 10 * (b + 1) })
        .collect();
    t
}

fn entry(source: ExpertsSource, n: u32, per_expert: u32, domains: &[&str]) -> ExpertsEntry {
    ExpertsEntry {
        source,
        n_experts: n,
        features_per_expert: per_expert,
        domains: domains.iter().map(|d| d.to_string()).collect(),
        domain_tokens: domains.iter().map(|_| 500).collect(),
        mean_active: 2.5,
        mean_entropy: 1.25,
        mean_router_entropy: None,
        settings: ExpertsSettings {
            tokens: 1000,
            gate_floor: Some(1e-6),
            top_k: None,
            coactivation_top: 2,
            coactivation_experts: 64,
            vocab_top: 2,
            model: "gpt2-tiny".into(),
            model_sha256: "0".repeat(64),
        },
        files: Vec::new(),
    }
}

/// The store (made once, left in the temp folder).
fn experts_store() -> &'static PathBuf {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let model = tiny_model(&dir.join("model"));
        // A BOS token (NUL), which capture prepends.
        std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
        let corpus = dir.join("corpus.txt");
        let text: String =
            (0..300).map(|i| format!("the whale {} sat on the deck {}. ", i % 7, i % 11)).collect();
        std::fs::write(&corpus, text).unwrap();
        let store = dir.join("store");
        let s = store.to_str().unwrap();
        let run = |args: &[&str]| {
            let out = loupe(args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        };
        let (m, c) = (model.to_str().unwrap(), corpus.to_str().unwrap());
        run(&["capture", "--model", m, "--corpus", c, "--store", s, "--hook", HOOK, "--context", "32"]);
        run(&[
            "train-monet",
            "--store",
            s,
            "--hook",
            HOOK,
            "--dictionary",
            "monet",
            "--experts",
            "4",
            "--heads",
            "2",
            "--topk",
            "2",
            "--dim",
            "8",
            "--batch",
            "128",
            "--tokens",
            "2560",
            "--eval-contexts",
            "0",
        ]);
        run(&["analyze", "--store", s, "--dictionary", "monet", "--no-index"]);
        let opened = Store::open_rw(&store).unwrap();
        let monet =
            ExpertsSource::Dictionary { name: "monet".into(), kind: "monet".into(), hook: HOOK.into() };
        let two = ["moby-dick", "sotu"];
        opened.write_experts("monet", &tables(N, 2), entry(monet, N, 1, &two)).unwrap();
        let moex =
            ExpertsSource::Dictionary { name: "moex-x".into(), kind: "moex".into(), hook: HOOK.into() };
        opened.write_experts("moex", &tables(8, 2), entry(moex, 8, 4, &two)).unwrap();
        let router = ExpertsSource::Hook { hook: "blocks.0.mlp.hook_expert_weights".into() };
        opened.write_experts("router", &tables(8, 1), entry(router, 8, 0, &["moby-dick"])).unwrap();
        store
    })
}

fn experts_app(path: &Path, experts: Option<&str>) -> Harness<'static, LoupeApp> {
    let options = Options {
        store: path.to_path_buf(),
        view: Some(Tab::Experts),
        experts: experts.map(str::to_string),
        ..Options::default()
    };
    let mut h = harness(LoupeApp::new(options));
    wait_for(&mut h, "the expert tables", |h| {
        let v = h.state().experts_view();
        v.experts().is_some() || (!v.is_loading() && h.query_by_label_contains("no expert tables").is_some())
    });
    h
}

fn current(h: &Harness<'static, LoupeApp>) -> Option<(String, u32)> {
    h.state().current_expert().map(|(s, e)| (s.to_string(), e))
}

fn click_link(h: &mut Harness<'static, LoupeApp>, label: &str) {
    h.get_by_role_and_label(Role::Link, label).click();
    h.run_steps(3);
}

/// The bars, the heatmap's hover, an expert's panel, back and forward, its feature page (link and
/// double-click), the sort, and the entries of a dictionary without analysis and of a router.
#[test]
fn experts_view_shows_usage_coactivation_and_an_experts_panel() {
    let mut h = experts_app(experts_store(), Some("monet"));
    assert_eq!(h.state().tab, Tab::Experts);
    assert!(has_label(
        &h,
        "monet · monet dictionary monet at blocks.1.hook_resid_post · 16 experts · 1000 tokens"
    ));
    assert!(has_label(&h, "domains: moby-dick (500), sotu (500)"));
    for e in 0..N {
        assert!(h.query_by_label(&format!("expert {e}")).is_some(), "the bar of expert {e}");
    }
    // Sorted by usage: expert 3 (16/40) first, expert 0 (1/40) last.
    let y = |h: &Harness<'static, LoupeApp>, e: u32| {
        h.get_by_role_and_label(Role::Button, &format!("expert {e}")).rect().top()
    };
    assert!(y(&h, 3) < y(&h, 6) && y(&h, 6) < y(&h, 0), "most used first");
    h.get_by_role_and_label(Role::Button, "expert 3").hover();
    h.run_steps(5);
    assert!(has_label(&h, "expert 3: usage 0.4000 (400 tokens) · mean gate 0.5000 · top token share 0.600"));
    assert!(has_label(&h, "P(column | row) among the 16 most used experts (of 16)"));
    assert!(has_label(&h, "Click an expert"));

    // The heatmap: the pair under the pointer.
    let order = h.state().experts_view().experts().unwrap().heatmap.experts.clone();
    assert_eq!(order[0], 3, "the most used expert first");
    let rect = h.get_by_label("co-activation heatmap").rect();
    let cell = rect.width() / order.len() as f32;
    let at = |i: usize, j: usize| rect.min + vec2((j as f32 + 0.5) * cell, (i as f32 + 0.5) * cell);
    let (i, j) = (0, order.iter().position(|&e| e == 4).unwrap());
    h.hover_at(at(i, j));
    h.run_steps(5);
    assert!(has_label(&h, "expert 3 → expert 4: P(4 | 3) = 0.6600"), "P(e+1 | e)");
    let k = order.iter().position(|&e| e == 9).unwrap();
    h.hover_at(at(i, k));
    h.run_steps(5);
    assert!(has_label(&h, "expert 3 → expert 9: P(9 | 3) = no row in the table"));
    // A click on a row selects its expert.
    h.hover_at(at(i, j));
    h.run_steps(1);
    h.input_mut().events.push(Event::PointerButton {
        pos: at(i, j),
        button: PointerButton::Primary,
        pressed: true,
        modifiers: Modifiers::NONE,
    });
    h.step();
    h.input_mut().events.push(Event::PointerButton {
        pos: at(i, j),
        button: PointerButton::Primary,
        pressed: false,
        modifiers: Modifiers::NONE,
    });
    h.run_steps(3);
    assert_eq!(current(&h), Some(("monet".into(), 3)));

    // Select expert 5: its numbers, tokens (spelled by the analysis' vocabulary), domains, partners.
    h.remove_cursor();
    h.get_by_role_and_label(Role::Button, "expert 5").click();
    h.run_steps(3);
    assert_eq!(current(&h), Some(("monet".into(), 5)));
    assert!(has_label(&h, "Expert 5"));
    assert!(has_label(&h, "0.2500 (250 tokens)"), "usage 10/40");
    assert!(has_label(&h, "spelled by the vocabulary of monet"));
    assert!(h.query_by_label("\"f\"").is_some() && h.query_by_label("\"z\"").is_some(), "'a' + 5 and 'z'");
    assert!(has_label(&h, "moby-dick") && has_label(&h, "75.0%") && has_label(&h, "0.075"));
    assert!(h.query_by_label("undefined (one domain)").is_none());
    assert!(h.query_by_role_and_label(Role::Link, "expert 6").is_some());
    assert!(has_label(&h, "0.660") && has_label(&h, "0.200"), "P(6 | 5), P(7 | 5)");
    assert!(h.query_by_role_and_label(Role::Link, "feature 5").is_some(), "Monet: expert 5 is feature 5");
    h.remove_cursor();
    h.run_steps(2);
    snapshot(&mut h, "experts");

    // A partner: another navigation item; back and forward.
    click_link(&mut h, "expert 6");
    assert_eq!(current(&h), Some(("monet".into(), 6)));
    assert!(has_label(&h, "Expert 6"));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(current(&h), Some(("monet".into(), 5)));
    h.get_by_label("Forward »").click();
    h.run_steps(3);
    assert_eq!(current(&h), Some(("monet".into(), 6)));
    assert!(has_label(&h, "Expert 6"));

    // The feature page of the expert (Monet: feature e), and back.
    click_link(&mut h, "feature 6");
    assert_eq!((h.state().tab, h.state().current_feature()), (Tab::Features, Some(6)));
    wait_for(&mut h, "monet to load", |h| h.state().is_loaded());
    assert!(has_label(&h, "Feature 6"));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Experts);
    assert_eq!(current(&h), Some(("monet".into(), 6)));

    // A double-click on a bar opens the expert's feature directly.
    let centre = h.get_by_role_and_label(Role::Button, "expert 2").rect().center();
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
    assert_eq!((h.state().tab, h.state().current_feature()), (Tab::Features, Some(2)));
    h.get_by_label("« Back").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Experts);

    // Sort by id.
    h.get_by_label("Sort by").click();
    h.run_steps(2);
    h.get_by_label("id").click();
    h.run_steps(3);
    assert!(y(&h, 0) < y(&h, 1) && y(&h, 1) < y(&h, 3), "by id");
    h.get_by_label("Sort by").click();
    h.run_steps(2);
    h.get_by_label("domain specialization").click();
    h.run_steps(3);
    assert!(y(&h, 15) < y(&h, 14) && y(&h, 14) < y(&h, 0), "by domain specialization (0.125 + e/100)");

    // MoE-X: an expert's block of features; its dictionary has no analysis: the command.
    h.get_by_label("Expert tables").click();
    h.run_steps(2);
    h.get_by_label("moex").click();
    h.run_steps(1);
    wait_for(&mut h, "moex", |h| h.state().experts_view().experts().is_some_and(|e| e.name() == "moex"));
    assert!(has_label(
        &h,
        "moex · moex dictionary moex-x at blocks.1.hook_resid_post · 8 experts (4 features each)"
    ));
    h.get_by_role_and_label(Role::Button, "expert 2").click();
    h.run_steps(3);
    assert_eq!(current(&h), Some(("moex".into(), 2)));
    assert!(has_label(&h, "moex-x has no analysis for its feature pages: run `loupe analyze --store"));

    // A router over a one-domain corpus: specialization undefined, no features.
    h.get_by_label("Expert tables").click();
    h.run_steps(2);
    h.get_by_label("router").click();
    h.run_steps(1);
    wait_for(&mut h, "router", |h| h.state().experts_view().experts().is_some_and(|e| e.name() == "router"));
    assert!(has_label(&h, "one domain (moby-dick): domain specialization is undefined"));
    h.get_by_role_and_label(Role::Button, "expert 1").click();
    h.run_steps(3);
    assert!(has_label(&h, "undefined (one domain)"));
    assert!(has_label(&h, "an expert of a model's router: no dictionary features"));
    // Back across entries: the moex entry shows again with its expert.
    h.get_by_label("« Back").click();
    h.run_steps(1);
    wait_for(&mut h, "moex again", |h| {
        h.state().experts_view().experts().is_some_and(|e| e.name() == "moex")
    });
    assert_eq!(current(&h), Some(("moex".into(), 2)));
    assert!(has_label(&h, "Expert 2"));
}

/// An empty store says what to run; `loupe gui --experts` checks the name.
#[test]
fn experts_view_says_what_the_store_lacks() {
    let s = experts_store().to_str().unwrap();
    loupe_tests::assert_one_error(
        experts_store(),
        &["gui", s, "--experts", "nope"],
        "has no expert tables \"nope\" (experts: moex, monet, router)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    Store::create(&dir).unwrap();
    let d = dir.to_str().unwrap();
    loupe_tests::assert_one_error(
        &dir,
        &["gui", d, "--experts", "monet"],
        "has no expert tables \"monet\" (experts: none; run `loupe experts` first)",
    );
    let h = experts_app(&dir, None);
    assert!(has_label(
        &h,
        &format!("no expert tables in this store: run `loupe experts --store {d} --dictionary NAME`")
    ));
}

/// 65,536 experts: only the rows in view are laid out, the heatmap is capped, scrolling and
/// hovering stay fast (printed).
#[test]
fn experts_view_stays_fast_at_65536_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let (t, e) = loupe_app::gui::experts_synthetic::synthetic(65_536);
    Store::create(&dir).unwrap().write_experts("synthetic", &t, e).unwrap();
    let mut h = experts_app(&dir, Some("synthetic"));
    let v = h.state().experts_view();
    assert_eq!(v.experts().unwrap().len(), 65_536);
    assert_eq!(v.experts().unwrap().heatmap.len(), loupe_app::gui::experts_data::HEATMAP_MAX);
    assert!(v.rows_drawn > 10 && v.rows_drawn < 100, "{} rows laid out", v.rows_drawn);
    let first =
        h.state().experts_view().experts().unwrap().order(loupe_app::gui::experts_data::Sort::Usage)[0];
    assert!(h.query_by_label(&format!("expert {first}")).is_some());
    // Scroll deep into the list: other rows, as few.
    let over = h.get_by_role_and_label(Role::Button, &format!("expert {first}")).rect().center();
    h.hover_at(over);
    h.event(Event::MouseWheel {
        unit: egui::MouseWheelUnit::Point,
        delta: vec2(0.0, -400_000.0),
        phase: egui::TouchPhase::Move,
        source: egui::MouseWheelSource::Wheel,
        modifiers: Modifiers::NONE,
    });
    h.run_steps(3);
    assert!(h.query_by_label(&format!("expert {first}")).is_none(), "scrolled away from the top");
    assert!(h.state().experts_view().rows_drawn < 100);
    let per_frame = frame_time(&mut h);
    println!("{:.2} ms per frame at 65,536 experts", per_frame * 1e3);
    assert!(per_frame < 0.1, "a frame takes {per_frame:.3} s");
    let rect = h.get_by_label("co-activation heatmap").rect();
    h.hover_at(rect.center());
    h.run_steps(5);
    assert!(has_label(&h, "→ expert"), "the hovered pair");
    let per_frame = frame_time(&mut h);
    println!("{:.2} ms per frame hovering the heatmap", per_frame * 1e3);
    assert!(per_frame < 0.1, "a frame takes {per_frame:.3} s");
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
