//! Dictionary folders: `cfg.json` (or `state.json`) + a safetensors file, as `loupe import`,
//! `loupe analyze` and a resumed `loupe train-sae`/`train-monet` read them. The first byte picks
//! the layout; the rest is the JSON file and the safetensors file (`loupe_fuzz::split2`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use loupe_fuzz::{fresh_dir, put, split2};
use loupe_dict::{io, monet};

/// (JSON file, weights file) of each layout.
pub const LAYOUTS: [(&str, &str); 4] = [
    ("cfg.json", "sae_weights.safetensors"),
    ("cfg.json", "sae.safetensors"),
    ("state.json", "state.safetensors"),
    ("cfg.json", "monet_weights.safetensors"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&layout, rest)) = data.split_first() else { return };
    let (json_name, weights_name) = LAYOUTS[layout as usize % LAYOUTS.len()];
    let (json, weights) = split2(rest);
    let dir = fresh_dir("dict");
    put(&dir.join(json_name), json);
    put(&dir.join(weights_name), weights);
    match weights_name {
        "state.safetensors" => {
            let _ = io::load_state(&dir);
        }
        "monet_weights.safetensors" => {
            let _ = monet::io::load(&dir);
        }
        _ => {
            let _ = io::load_sae(&dir);
        }
    }
});
