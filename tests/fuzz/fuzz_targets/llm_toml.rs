//! `llm.toml`: what `loupe explain --llm-config` reads (`LlmConfig::load`), and the client a
//! valid config makes (`Llm::new`: its limits and durations come from the file).
#![no_main]

use libfuzzer_sys::fuzz_target;
use loupe_autointerp::llm::{Llm, LlmConfig};
use loupe_fuzz::{put, scratch};

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("llm.toml");
    put(&path, data);
    let Ok(cfg) = LlmConfig::load(&path) else { return };
    let _ = Llm::new(&cfg, None, None);
});
