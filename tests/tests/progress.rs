//! Long jobs report through `loupe_store::Progress`: a capture and a store verification name
//! their stage, count up to their total, and (capture) say how many tokens they stored.

use std::sync::Mutex;

use loupe_model::capture::{CaptureConfig, capture};
use loupe_store::{DType, Progress, Store};
use loupe_tests::{HOOK, tiny_model};

/// Every report, as text: `stage NAME`, `DONE/TOTAL` or `message TEXT`.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Progress for Recorder {
    fn stage(&self, name: &str) {
        self.0.lock().unwrap().push(format!("stage {name}"));
    }

    fn set(&self, done: u64, total: u64) {
        self.0.lock().unwrap().push(format!("{done}/{total}"));
    }

    fn message(&self, text: &str) {
        self.0.lock().unwrap().push(format!("message {text}"));
    }
}

/// The `(done, total)` reports, in order.
fn counts(events: &[String]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter(|e| !e.starts_with("stage ") && !e.starts_with("message "))
        .filter_map(|e| e.split_once('/'))
        .map(|(d, t)| (d.parse().unwrap(), t.parse().unwrap()))
        .collect()
}

#[test]
fn capture_and_verify_report_their_stage_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, "a short text to capture, long enough for a few contexts. ".repeat(20)).unwrap();
    let store = tmp.path().join("store");
    let cfg = CaptureConfig {
        model: tiny_model(&tmp.path().join("model")),
        corpus: corpus.clone(),
        store: store.clone(),
        hooks: vec![HOOK.to_string()],
        context: 32,
        stride: None,
        bos: false,
        dtype: DType::F32,
        grads: false,
        batch: 2,
        shard_rows: Some(300),
        max_tokens: None,
    };
    let recorder = Recorder::default();
    let report = capture(&cfg, &recorder).unwrap();
    let events = recorder.0.into_inner().unwrap();
    assert_eq!(events[0], "stage capturing");
    let bytes = std::fs::metadata(&corpus).unwrap().len();
    let read = counts(&events);
    assert!(!read.is_empty() && read.iter().all(|&(d, t)| t == bytes && d <= t), "{events:?}");
    assert!(read.windows(2).all(|w| w[0].0 <= w[1].0), "{events:?}");
    let last = events.iter().rfind(|e| e.starts_with("message")).unwrap();
    let tokens: u64 = last["message ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(tokens > 0 && tokens <= report.tokens && last.contains("tokens/s"), "{last}");

    let recorder = Recorder::default();
    let store = Store::open(&store).unwrap();
    assert!(store.verify(&recorder).is_ok());
    let events = recorder.0.into_inner().unwrap();
    let total: u64 = store.manifest().hooks.values().map(|h| h.bytes()).sum();
    assert_eq!(events[0], "stage verifying");
    assert_eq!(counts(&events).last(), Some(&(total, total)), "{events:?}");
}
