//! A planted dictionary for end-to-end tests of analysis and auto-interp: activations whose
//! codes under a ReLU SAE are exactly known values, in a store of 40 documents × 50 tokens
//! (token id = 1000 · doc + pos, so windows are checkable).

use std::path::Path;

use loupe_dict::io::{SaeMeta, save_sae};
use loupe_dict::sae::SaeSpec;
use loupe_dict::{Sae, Variant};
use loupe_store::{DType, DictEntry, HookSpec, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const HOOK: &str = "blocks.0.hook_resid_post";
pub const D: usize = 32;
pub const N: usize = 12;
pub const DOCS: u32 = 40;
pub const DOC_LEN: u32 = 50;

/// Planted values: `values[row][f]` (0 = inactive). Feature 1 fires whenever feature 0 does
/// (and sometimes alone); feature 11 never fires.
pub fn planted_values() -> Vec<[f32; N]> {
    let mut rng = StdRng::seed_from_u64(3);
    (0..DOCS * DOC_LEN)
        .map(|_| {
            let mut v = [0.0f32; N];
            for _ in 0..2 {
                let f = rng.random_range(0..N - 1);
                v[f] = rng.random_range(0.05f32..6.0);
            }
            if v[0] > 0.0 {
                v[1] = rng.random_range(0.05f32..6.0);
            }
            v
        })
        .collect()
}

/// A ReLU SAE whose encoder reads coordinate f for feature f (so the codes are exactly the
/// planted values) and whose decoder rows come in similar pairs (f, f + 6).
pub fn planted_sae() -> Sae {
    let mut rng = StdRng::seed_from_u64(4);
    let mut w_enc = vec![0.0f32; N * D];
    for f in 0..N {
        w_enc[f * D + f] = 1.0;
    }
    let base: Vec<Vec<f32>> =
        (0..N / 2).map(|_| (0..D).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
    let mut w_dec = Vec::with_capacity(N * D);
    for f in 0..N {
        let mut row: Vec<f32> =
            base[f % (N / 2)].iter().map(|v| v + rng.random_range(-0.1f32..0.1)).collect();
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
        w_dec.extend(row);
    }
    Sae {
        spec: SaeSpec { variant: Variant::Relu, d_in: D, n_features: N, k: 2 },
        w_enc,
        b_enc: vec![0.0; N],
        w_dec,
        b_dec: vec![0.0; D],
        threshold: None,
        threshold_relative: false,
    }
}

/// A store with the planted rows (token id = 1000 · doc + pos, so windows are checkable) and the
/// SAE listed as dictionary `sae`, still open for writing (drop it before running `loupe`; one
/// lock per test, since a lock fd can leak for a moment into a child another test thread spawns).
pub fn planted_store(dir: &Path, values: &[[f32; N]]) -> Store {
    let store = Store::create(dir).unwrap();
    let spec = HookSpec { d: D as u32, dtype: DType::F32, grad: false };
    let mut writer = store.activation_writer(HOOK, spec).unwrap().with_shard_rows(700);
    for doc in 0..DOCS {
        let rows = &values[(doc * DOC_LEN) as usize..((doc + 1) * DOC_LEN) as usize];
        let mut act = vec![0.0f32; rows.len() * D];
        for (r, v) in rows.iter().enumerate() {
            act[r * D..r * D + N].copy_from_slice(v);
        }
        let pos: Vec<u32> = (0..DOC_LEN).collect();
        let token: Vec<u32> = (0..DOC_LEN).map(|p| 1000 * doc + p).collect();
        writer.append(&vec![doc; DOC_LEN as usize], &pos, &token, &act, None).unwrap();
    }
    writer.finish().unwrap();
    commit_sae(&store, "sae", &planted_sae(), HOOK);
    store
}

pub fn commit_sae(store: &Store, name: &str, sae: &Sae, hook: &str) {
    save_sae(sae, &SaeMeta::default(), &store.dictionary_dir(name)).unwrap();
    let entry = DictEntry {
        hook: hook.to_string(),
        output_hook: None,
        kind: "sae".into(),
        variant: sae.spec.variant.name().into(),
        d_in: sae.spec.d_in as u32,
        n_features: sae.spec.n_features as u32,
        status: "done".into(),
        step: 1,
        tokens: 1,
        files: Vec::new(),
    };
    store.commit_dictionary(name, entry, &["cfg.json", "sae_weights.safetensors"]).unwrap();
}
