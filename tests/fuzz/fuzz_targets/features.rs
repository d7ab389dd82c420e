//! Feature tables (`features/<dict>/*.arrow`), as `loupe feature`, auto-interp and the app read
//! an analysis (`FeatureTables::open`, then every lookup of every feature). A store written by
//! the store's own writer is the baseline; each input replaces one table: the first byte picks
//! it (`loupe_fuzz::analysis::TABLES`), the second is the manifest's `n_features`, the rest is
//! the file (listed in the manifest with its size and checksum).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loupe_fuzz::analysis::{self, DICT, TABLES};
use loupe_fuzz::{put, scratch};
use loupe_store::store::MANIFEST_FILE;
use loupe_store::{FeatureTables, Manifest, Store};

/// The baseline: its manifest and the original bytes of each table.
fn baseline() -> &'static (Manifest, Vec<Vec<u8>>) {
    static BASE: OnceLock<(Manifest, Vec<Vec<u8>>)> = OnceLock::new();
    BASE.get_or_init(|| {
        let root = scratch().join("store");
        let store = analysis::write(&root).expect("baseline analysis");
        let entry = store.features(DICT).expect("baseline lists the analysis");
        let tables = TABLES
            .iter()
            .map(|t| std::fs::read(root.join(&entry.find(t).expect("table listed").file)).expect("baseline table"))
            .collect();
        (store.manifest(), tables)
    })
}

fuzz_target!(|data: &[u8]| {
    let [pick, n_features, table @ ..] = data else { return };
    let (manifest, originals) = baseline();
    let root = scratch().join("store");
    let i = *pick as usize % TABLES.len();
    let mut manifest = manifest.clone();
    let entry = manifest.features.get_mut(DICT).expect("baseline lists the analysis");
    entry.n_features = u32::from(*n_features);
    let listed = entry.files.iter_mut().find(|f| f.file.ends_with(&format!("/{}", TABLES[i]))).expect("table listed");
    let rel = listed.file.clone();
    put(&root.join(&rel), table);
    // The listing matches the bytes (an edited store whose checksums were updated), so the input
    // reaches the decoder past the first-read checksum check.
    listed.bytes = table.len() as u64;
    listed.xxh3 = loupe_store::fsutil::file_xxh3(&root.join(&rel)).expect("hash the scratch file");
    put(&root.join(MANIFEST_FILE), manifest.to_json().as_bytes());

    if let Ok(store) = Store::open(&root)
        && let Ok(tables) = FeatureTables::open(&store, DICT)
    {
        let mut seen = 0usize;
        for f in 0..tables.n_features() as u32 + 1 {
            let _ = tables.stats(f);
            if f < tables.n_features() as u32 {
                let _ = tables.flags(f);
            }
            for examples in [tables.top_examples(f), tables.quantile_examples(f)].into_iter().flatten() {
                for e in examples {
                    seen += e.tokens.iter().map(|&t| tables.token_string(t).len()).sum::<usize>();
                }
            }
            for l in tables.logits(f).into_iter().flatten() {
                seen += tables.token_string(l.token).len();
            }
            seen += tables.neighbours(f).map_or(0, |n| n.len());
            seen += tables.cooccurrence(f).map_or(0, |c| c.len());
        }
        seen += tables.densities().len() + tables.max_activations().len();
        let _ = tables.token_id("a");
        std::hint::black_box(seen);
    }
    put(&root.join(&rel), &originals[i]);
});
