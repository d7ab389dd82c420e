//! GGUF model files: what `loupe capture --model x.gguf` and `loupe tokenize` read
//! (`model::load`, then the tokenizer from the same file).
#![no_main]

use libfuzzer_sys::fuzz_target;
use loupe_fuzz::{put, scratch};

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("model.gguf");
    put(&path, data);
    let _ = loupe_model::load(&path);
    let _ = loupe_model::tokenizer::Tokenizer::load(&path);
});
