//! Corpora: a JSONL file (one `{"text": …}` per line) or a plain text file, as
//! `loupe capture --corpus` reads them (`Corpus::open`, then every document in order).
//! The first byte picks the file kind (bit 0), whether a document's text is capped at 64 bytes as
//! `--max-tokens` does (bit 1), and the first document to visit (the rest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use loupe_fuzz::{fresh_dir, put};
use loupe_model::corpus::Corpus;

fuzz_target!(|data: &[u8]| {
    let Some((&first, text)) = data.split_first() else { return };
    let dir = fresh_dir("corpus");
    let path = dir.join(if first & 1 == 0 { "corpus.jsonl" } else { "corpus.txt" });
    put(&path, text);
    let Ok(corpus) = Corpus::open(&path) else { return };
    let mut seen = 0u64;
    let cap = (first & 2 != 0).then_some(64);
    let _ = corpus.for_each(u32::from(first >> 2), cap, |doc, done| {
        seen += doc.text.len() as u64;
        assert!(cap.is_none_or(|c| doc.text.len() as u64 <= c), "a capped document holds {} bytes", doc.text.len());
        assert!(done <= corpus.bytes() + 1, "read {done} bytes of a {}-byte corpus", corpus.bytes());
        Ok(true)
    });
});
