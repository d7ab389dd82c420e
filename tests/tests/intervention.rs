//! The intervention scorer with the real Gemma 3 270M: features whose decoder rows are the
//! unembedding rows of chosen words, explained as those words, must be matched to their own
//! steering effects far better than chance; a feature count of one is a recorded failure.

use loupe_dict::sae::SaeSpec;
use loupe_dict::{Sae, Variant};
use loupe_model::tokenizer::Tokenizer;
use loupe_store::{Explanation, Explanations, Provenance, Store};
use loupe_tests::planted::commit_sae;
use loupe_tests::{gemma_gguf, loupe, minilm_dir, stderr};

const WORDS: [&str; 8] = [" whale", " river", " castle", " music", " doctor", " green", " bread", " winter"];

#[test]
fn steering_effects_match_their_own_explanations() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in \
                my purse, and nothing particular to interest me on shore, I thought I would sail about. ";
    std::fs::write(&corpus, text.repeat(12)).unwrap();
    let dir = tmp.path().join("store");
    let (m, s) = (gemma_gguf(), dir.to_str().unwrap().to_string());
    let capture = [
        "capture",
        "--model",
        m.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--store",
        &s,
        "--hook",
        "blocks.3.hook_resid_post",
        "--context",
        "64",
        "--max-tokens",
        "300",
    ];
    let out = loupe(&capture);
    assert!(out.status.success(), "{}", stderr(&out));

    // Decoder rows: the unembedding (tied embedding) rows of the words, unit norm.
    let model = loupe_model::load(&m).unwrap();
    let tokenizer = Tokenizer::load(&m).unwrap();
    let unembed = model.unembedding().unwrap();
    // A ReLU SAE whose encoder reads nothing and whose bias is 1: every feature fires with
    // activation 1 on every token, so the steering strength is `--steer-scale` itself.
    let mut sae = Sae::init(SaeSpec { variant: Variant::Relu, d_in: 640, n_features: WORDS.len(), k: 0 }, 7);
    sae.w_enc.iter_mut().for_each(|w| *w = 0.0);
    sae.b_enc.iter_mut().for_each(|b| *b = 1.0);
    for (f, word) in WORDS.iter().enumerate() {
        let ids = tokenizer.encode(word, false).unwrap();
        assert_eq!(ids.len(), 1, "{word:?} is one token");
        let mut row: Vec<f32> = unembed.get(ids[0] as usize).unwrap().to_vec1().unwrap();
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
        sae.w_dec[f * 640..(f + 1) * 640].copy_from_slice(&row);
    }
    commit_sae(&Store::open_rw(&dir).unwrap(), "words", &sae, "blocks.3.hook_resid_post");
    let out = loupe(&["analyze", "--store", &s, "--dictionary", "words", "--rows", "all", "--no-index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    {
        let store = Store::open_rw(&dir).unwrap();
        let explanations = WORDS
            .iter()
            .enumerate()
            .map(|(f, w)| Explanation {
                feature_id: f as u32,
                explainer: "planted".into(),
                explanation: Some(format!("the word{w}")),
                failure: None,
                provenance: Provenance { model: "planted".into(), ..Provenance::default() },
            })
            .collect();
        store.commit_explanations("words", &Explanations { explanations, scores: Vec::new() }, None).unwrap();
    }
    let minilm = minilm_dir();
    let minilm = minilm.to_str().unwrap().to_string();
    let score = |extra: &[&str], features: &str| {
        let mut a = vec!["score", "--store", s.as_str(), "--dictionary", "words", "--explainer", "planted"];
        a.extend(["--scorers", "intervention", "--features", features, "--steer-scale", "3000"]);
        a.extend(["--embedder", minilm.as_str()]);
        a.extend_from_slice(extra);
        loupe(&a)
    };
    let out = score(&[], "0..8");
    assert!(out.status.success(), "{}", stderr(&out));
    let all = Store::open(&dir).unwrap().explanations("words").unwrap();
    let scores: Vec<f32> =
        all.scores.iter().map(|s| s.score.unwrap_or_else(|| panic!("{:?}", s.failure))).collect();
    assert_eq!(scores.len(), WORDS.len());
    let mean = scores.iter().sum::<f32>() / scores.len() as f32;
    let perfect = scores.iter().filter(|&&s| s == 1.0).count();
    assert!(mean >= 0.85 && perfect >= 5, "intervention scores {scores:?}");
    for s in &all.scores {
        assert_eq!(
            (s.scorer.as_str(), s.n_examples, s.provenance.example_rows.len()),
            ("intervention", 8, 4)
        );
    }

    // One feature alone has nothing to be compared with: a recorded failure, not a score; a run
    // in which every record failed exits non-zero with one line saying why.
    let out = score(&["--redo"], "3");
    assert!(!out.status.success(), "a run that scored nothing succeeded");
    let errors: Vec<String> =
        stderr(&out).lines().filter(|l| l.starts_with("error: ")).map(str::to_string).collect();
    assert!(errors.len() == 1 && errors[0].contains("at least two"), "{}", stderr(&out));
    let all = Store::open(&dir).unwrap().explanations("words").unwrap();
    let three = all.scores.iter().find(|s| s.feature_id == 3).unwrap();
    assert!(three.failure.as_deref().is_some_and(|f| f.contains("at least two")), "{three:?}");
    assert_eq!(all.scores.iter().filter(|s| s.failure.is_none()).count(), WORDS.len() - 1);
}
