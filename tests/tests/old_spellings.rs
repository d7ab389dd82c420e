//! Renamed flags and config keys keep their old spelling: `train-sae`, `train-monet` and `import`
//! name their dictionary with `--dictionary` like every other command, and still with `--name`
//! (the train commands' configs with the key `dictionary`, or `name`; both is one error line).

use std::path::Path;

use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{HOOK, assert_one_error, loupe, stderr};

/// A quick run's flags (200 rows of width 8, no model to splice into).
const QUICK: [&str; 12] = [
    "--batch",
    "10",
    "--tokens",
    "50",
    "--eval-tokens",
    "20",
    "--eval-contexts",
    "0",
    "--checkpoint-every",
    "0",
    "--seed",
    "1",
];

fn listed(store: &Path) -> Vec<String> {
    Store::open(store).unwrap().manifest().dictionaries.keys().cloned().collect()
}

#[test]
fn dictionary_is_named_by_dictionary_and_still_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let spec = HookSpec { d: 8, dtype: DType::F32, grad: false };
    let created = Store::create(&store).unwrap();
    let mut writer = created.activation_writer(HOOK, spec).unwrap();
    for doc in 0..4u32 {
        let act: Vec<f32> = (0..50 * 8).map(|i| ((i as u32 * 7 + doc) as f32).sin()).collect();
        writer.append(&[doc; 50], &(0..50).collect::<Vec<u32>>(), &[5u32; 50], &act, None).unwrap();
    }
    writer.finish().unwrap();
    drop(created);
    let s = store.to_str().unwrap();
    let sae = ["--n-features", "16", "--k", "2"];
    let monet = ["--experts", "4", "--heads", "1", "--topk", "2", "--dim", "2"];
    for (command, sizes, new, old) in
        [("train-sae", &sae[..], "sae-new", "sae-old"), ("train-monet", &monet[..], "monet-new", "monet-old")]
    {
        for (flag, name) in [("--dictionary", new), ("--name", old)] {
            let args = [&[command, "--store", s, "--hook", HOOK, flag, name][..], sizes, &QUICK].concat();
            let out = loupe(&args);
            assert!(out.status.success(), "{command} {flag} {name}: {}", stderr(&out));
        }
    }
    // The config key: `dictionary`, or `name` as before.
    let config = tmp.path().join("sae.toml");
    let cfg = config.to_str().unwrap();
    for (key, name) in [("dictionary", "toml-new"), ("name", "toml-old")] {
        std::fs::write(&config, format!("store = {s:?}\nhook = \"{HOOK}\"\n{key} = \"{name}\"\n")).unwrap();
        let out = loupe(&[&["train-sae", "--config", cfg][..], &sae, &QUICK].concat());
        assert!(out.status.success(), "config key {key}: {}", stderr(&out));
    }
    // `import` too: the trained SAE's folder (SAELens layout) under two more names.
    let folder = store.join("dictionaries/sae-new");
    for (flag, name) in [("--dictionary", "imported-new"), ("--name", "imported-old")] {
        let out = loupe(&["import", folder.to_str().unwrap(), "--store", s, "--hook", HOOK, flag, name]);
        assert!(out.status.success(), "import {flag} {name}: {}", stderr(&out));
    }
    let names = [
        "imported-new",
        "imported-old",
        "monet-new",
        "monet-old",
        "sae-new",
        "sae-old",
        "toml-new",
        "toml-old",
    ];
    assert_eq!(listed(&store), names.map(String::from));
    std::fs::write(&config, format!("store = {s:?}\nhook = \"{HOOK}\"\nname = \"a\"\ndictionary = \"b\"\n"))
        .unwrap();
    assert_one_error(&store, &["train-sae", "--config", cfg], "`name` is the old name of `dictionary`");
}
