//! Loupe's tokenizers against the reference: the Gemma 3 tokenizer rebuilt from the GGUF must give
//! exactly the ids transformers gives (`fixtures/gemma3/tokenizer_reference.json`, written by
//! `fixtures/regen.py`), and the all-MiniLM-L6-v2 `tokenizer.json` the ids sentence-transformers
//! gives (`fixtures/minilm/reference.json`). Both need the defaults in the cache (`loupe fetch`);
//! a missing model fails the test rather than skipping it.

use std::path::{Path, PathBuf};

use loupe_model::gguf::Gguf;
use loupe_model::tokenizer::Tokenizer;
use serde_json::Value;

fn cache() -> PathBuf {
    match std::env::var_os("LOUPE_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache").join("loupe"),
    }
}

/// A model from the cache, or a failure saying how to get it.
fn cached_model(name: &str) -> PathBuf {
    let path = cache().join("models").join(name);
    assert!(path.exists(), "{} is missing: run `loupe fetch` first (or set LOUPE_CACHE)", path.display());
    path
}

fn fixture(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn id_list(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn gemma3_gguf_tokenizer_matches_transformers() {
    let reference = fixture("gemma3/tokenizer_reference.json");
    let gguf = Gguf::open(&cached_model(reference["gguf_file"].as_str().unwrap())).expect("open GGUF");
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer from GGUF");
    assert_eq!(tok.kind(), "gguf");
    assert_eq!(tok.bos_id(), Some(reference["bos_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.eos_id(), Some(reference["eos_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.vocab_size(), 262_144);

    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 300, "only {} reference cases", cases.len());
    let mut mismatches = Vec::new();
    let mut spelling = Vec::new();
    let mut round_trip = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = id_list(&case["ids"]);
        let got = tok.encode(text, true).expect("encode");
        if got != want {
            mismatches.push(format!("{text:?}\n    loupe:        {got:?}\n    transformers: {want:?}"));
        }
        let want_tokens: Vec<String> =
            case["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        if tok.token_strings(&want) != want_tokens {
            spelling.push(format!("{text:?}: {:?} vs {want_tokens:?}", tok.token_strings(&want)));
        }
        let plain = tok.encode(text, false).expect("encode without BOS");
        assert_eq!(plain[..], got[1.min(got.len())..], "{text:?}: without BOS is not the same ids minus BOS");
        if tok.decode(&plain).expect("decode") != text {
            round_trip.push(format!("{text:?} -> {:?}", tok.decode(&plain).unwrap()));
        }
    }
    let n = cases.len();
    assert!(
        mismatches.is_empty(),
        "{}/{n} strings tokenize differently from transformers; first ones:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(8)].join("\n")
    );
    assert!(spelling.is_empty(), "token spellings differ:\n{}", spelling[..spelling.len().min(8)].join("\n"));
    assert!(
        round_trip.is_empty(),
        "decode(encode(text)) != text:\n{}",
        round_trip[..round_trip.len().min(8)].join("\n")
    );
}

#[test]
fn minilm_tokenizer_json_adds_cls_and_sep() {
    let dir = cached_model("all-MiniLM-L6-v2");
    let tok = Tokenizer::load(&dir).expect("tokenizer from directory");
    assert_eq!(tok.kind(), "hf");
    let ids = tok.encode("Hello world", true).unwrap();
    assert_eq!(ids, [101, 7592, 2088, 102]);
    assert_eq!(tok.token_strings(&ids), ["[CLS]", "hello", "world", "[SEP]"]);
    assert_eq!(tok.encode("Hello world", false).unwrap(), [7592, 2088]);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(101), Some(102)));
    assert_eq!(tok.vocab_size(), 30_522);

    // The sentences sentence-transformers tokenized (truncated to 256 there; Loupe never truncates).
    let reference = fixture("minilm/reference.json");
    let sentences = reference["sentences"].as_array().unwrap();
    for (s, want) in sentences.iter().zip(reference["ids"].as_array().unwrap()) {
        let (text, want) = (s.as_str().unwrap(), id_list(want));
        let got = tok.encode(text, true).unwrap();
        if got.len() > want.len() {
            assert_eq!(got[..want.len() - 1], want[..want.len() - 1], "{text:?}");
        } else {
            assert_eq!(got, want, "{text:?}");
        }
    }
}
