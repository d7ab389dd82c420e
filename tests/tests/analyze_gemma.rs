//! `loupe analyze` with the real Gemma 3 270M: a dictionary for a hook the store does not hold is
//! analysed on activations captured on the fly (into a temporary store that is then deleted),
//! with token strings and logit effects from the model.

use loupe_dict::sae::SaeSpec;
use loupe_dict::{Sae, Variant};
use loupe_store::{FeatureTables, Store};
use loupe_tests::planted::commit_sae;
use loupe_tests::{gemma_gguf, loupe, stderr};

#[test]
fn a_missing_hook_is_captured_on_the_fly_with_token_strings_and_logit_effects() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in \
                my purse, and nothing particular to interest me on shore, I thought I would sail about a \
                little and see the watery part of the world. ";
    std::fs::write(&corpus, text.repeat(8)).unwrap();
    let dir = tmp.path().join("store");
    let (m, c, s) = (gemma_gguf(), corpus.to_str().unwrap().to_string(), dir.to_str().unwrap().to_string());
    let out = loupe(&[
        "capture",
        "--model",
        m.to_str().unwrap(),
        "--corpus",
        &c,
        "--store",
        &s,
        "--hook",
        "blocks.0.hook_resid_post",
        "--context",
        "64",
        "--max-tokens",
        "100",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sae = Sae::init(SaeSpec { variant: Variant::Topk, d_in: 640, n_features: 64, k: 4 }, 1);
    commit_sae(&Store::open_rw(&dir).unwrap(), "l1", &sae, "blocks.1.hook_resid_post");
    let out = loupe(&[
        "analyze",
        "--store",
        &s,
        "--dictionary",
        "l1",
        "--capture-tokens",
        "200",
        "--logit-tokens",
        "3",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("captured on the fly"), "{text}");
    let store = Store::open(&dir).unwrap();
    let tables = FeatureTables::open(&store, "l1").unwrap();
    assert!(tables.entry().tokens >= 200, "{:?}", tables.entry());
    // The temporary capture is gone, and the store still holds only what it held.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("analyze-capture"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!store.manifest().hooks.contains_key("blocks.1.hook_resid_post"));
    // Examples are real text, and every feature has 3 promoted and 3 suppressed tokens.
    let live = (0..64).find(|&f| !tables.stats(f).unwrap().dead).expect("some feature fired");
    let example = &tables.top_examples(live).unwrap()[0];
    let words: String = example.tokens.iter().map(|&t| tables.token_string(t)).collect();
    assert!(text_has_corpus_words(&words), "{words:?}");
    assert_eq!(tables.logits(live).unwrap().len(), 6);
    assert_eq!(tables.token_id(" the").map(|id| tables.token_string(id)), Some(" the".to_string()));
}

fn text_has_corpus_words(s: &str) -> bool {
    ["Ishmael", "money", "purse", "shore", "sail", "world", "watery", "years"].iter().any(|w| s.contains(w))
}
