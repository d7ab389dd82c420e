//! Reading corpora (`loupe_model::corpus`): JSONL lines parsed as they are read (escapes,
//! nested fields, CRLF, a line that is not UTF-8 skipped, malformed lines named), a byte cap that
//! never cuts a character, and a content hash that sees an edit keeping every size.

use loupe_model::corpus::{Corpus, Skipped};

fn texts(corpus: &Corpus, cap: Option<u64>) -> (Vec<(u32, String)>, Skipped) {
    let mut docs = Vec::new();
    let skipped = corpus
        .for_each(0, cap, |d, _| {
            docs.push((d.id, d.text));
            Ok(true)
        })
        .unwrap();
    (docs, skipped)
}

#[test]
fn jsonl_lines_are_parsed_as_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.jsonl");
    let mut text = Vec::new();
    text.extend_from_slice(b"{\"meta\": {\"a\": [1, \"}\\\"\", null]}, \"text\": \"caf\\u00e9 \\ud83d\\udc33\\n\", \"n\": 2}\r\n");
    text.extend_from_slice(b"   \t\r\n");
    text.extend_from_slice(b"{\"text\": \"bad \xff\"}\n");
    text.extend_from_slice(b"{\"text\": \"x\", \"text\": 3}\n");
    // Raw multi-byte characters, cut across the reader's buffers; then one bad byte after the text.
    let wide = "é🐳ü".repeat(5000);
    text.extend_from_slice(format!("{{\"text\": \"{wide}\"}}\n").as_bytes());
    text.extend_from_slice(format!("{{\"text\": \"{wide}\", \"id\": \"").as_bytes());
    text.extend_from_slice(b"\xff\"}");
    std::fs::write(&path, &text).unwrap();
    let corpus = Corpus::open(&path).unwrap();
    let (docs, skipped) = texts(&corpus, None);
    assert_eq!(docs, vec![(0, "café 🐳\n".to_string()), (2, "x".to_string()), (3, wide.clone())]);
    assert_eq!(skipped.invalid_utf8, 2);
    let (docs, skipped) = texts(&Corpus::open(&path).unwrap(), Some(7));
    assert_eq!(docs[2], (3, "é🐳".to_string()));
    assert_eq!(skipped.invalid_utf8, 2);
    assert_eq!(skipped.first.unwrap(), format!("{}:3", path.display()));

    // A cap cuts the text, never inside a character.
    let (docs, _) = texts(&corpus, Some(4));
    assert_eq!(docs[0].1, "caf");
    let (docs, _) = texts(&corpus, Some(5));
    assert_eq!(docs[0].1, "café");

    for (line, needle) in [
        ("{\"text\": \"a\"} trailing", "c.jsonl:1: not a JSON object"),
        ("{\"text\": 5}", "c.jsonl:1: JSONL line has no string field \"text\""),
        ("[\"text\"]", "c.jsonl:1: not a JSON object"),
        ("{\"text\": \"unterminated", "c.jsonl:1: not a JSON object"),
    ] {
        std::fs::write(&path, line).unwrap();
        let err = Corpus::open(&path).unwrap().for_each(0, None, |_, _| Ok(true)).unwrap_err();
        assert!(format!("{err:#}").contains(needle), "{line}: {err:#}");
    }
}

#[test]
fn a_cap_bounds_what_a_text_file_gives() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "ab\u{e9}cd").unwrap();
    let corpus = Corpus::open(dir.path()).unwrap();
    assert_eq!(texts(&corpus, Some(3)).0, vec![(0, "ab".to_string())]);
    assert_eq!(texts(&corpus, Some(4)).0, vec![(0, "ab\u{e9}".to_string())]);
    assert_eq!(texts(&corpus, None).0, vec![(0, "ab\u{e9}cd".to_string())]);
}

#[test]
fn the_hash_sees_an_edit_that_keeps_the_size() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "the whale").unwrap();
    std::fs::write(dir.path().join("b.txt"), "the sea").unwrap();
    let before = Corpus::open(dir.path()).unwrap().xxh3().unwrap();
    assert_eq!(before, Corpus::open(dir.path()).unwrap().xxh3().unwrap());
    std::fs::write(dir.path().join("b.txt"), "the SEA").unwrap();
    let after = Corpus::open(dir.path()).unwrap();
    assert_eq!(after.bytes(), 16);
    let edited = after.xxh3().unwrap();
    assert_ne!(before, edited);
    // Moving bytes between files changes it too.
    std::fs::write(dir.path().join("a.txt"), "the whalet").unwrap();
    std::fs::write(dir.path().join("b.txt"), "he SEA").unwrap();
    assert_ne!(edited, Corpus::open(dir.path()).unwrap().xxh3().unwrap());
}
