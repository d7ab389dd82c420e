//! Corpora: a JSONL file (one `{"text": …}` per line) or a plain text file, as
//! `loupe capture --corpus` reads them (`Corpus::open`, then every document in order).
//! The first byte picks the file kind and the first document to visit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loupe_fuzz::{fresh_dir, put};
use loupe_trainer::corpus::Corpus;

fuzz_target!(|data: &[u8]| {
    let Some((&first, text)) = data.split_first() else { return };
    let dir = fresh_dir("corpus");
    let path = dir.join(if first & 1 == 0 { "corpus.jsonl" } else { "corpus.txt" });
    put(&path, text);
    let Ok(corpus) = Corpus::open(&path) else { return };
    let mut seen = 0u64;
    let _ = corpus.for_each(u32::from(first >> 1), |doc, done| {
        seen += doc.text.len() as u64;
        assert!(done <= corpus.bytes() + 1, "read {done} bytes of a {}-byte corpus", corpus.bytes());
        Ok(true)
    });
});
