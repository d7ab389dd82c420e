//! `manifest.json`: what every command that opens a store parses first (`Manifest::parse`), and
//! the sums `loupe store info` and the readers take over a parsed manifest.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use loupe_store::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(manifest) = Manifest::parse(text, Path::new("manifest.json")) else { return };
    for entry in manifest.hooks.values() {
        let _ = (entry.rows(), entry.bytes());
    }
    // What a writer saves must read back as the same manifest.
    let again = Manifest::parse(&manifest.to_json(), Path::new("manifest.json"))
        .expect("a parsed manifest written back parses");
    assert_eq!(again, manifest);
});
