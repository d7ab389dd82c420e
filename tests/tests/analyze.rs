//! `loupe analyze` end to end on a planted dictionary: the tables hold exactly the top
//! activations (brute force over the planted values), quantile buckets hold what they claim,
//! neighbours and co-occurring features are the planted ones; bad input gets one error line.

use loupe_dict::io::SaeMeta;
use loupe_store::{DictEntry, FeatureTables, Store};
use loupe_tests::planted::{D, DOC_LEN, HOOK, N, commit_sae, planted_sae, planted_store, planted_values};
use loupe_tests::{assert_one_error, loupe, stderr};

#[test]
fn analysis_of_a_planted_dictionary_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let values = planted_values();
    drop(planted_store(&dir, &values));
    let s = dir.to_str().unwrap();
    let out = loupe(&["analyze", "--store", s, "--dictionary", "sae", "--top", "7", "--window", "9"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2000 tokens"), "{text}");
    assert!(text.contains("1 dead"), "{text}");

    let store = Store::open(&dir).unwrap();
    let tables = FeatureTables::open(&store, "sae").unwrap();
    assert_eq!(tables.n_features(), N);
    let entry = tables.entry();
    let graph = entry.find("decoder.hnsw.graph").expect("the index is listed");
    assert!(entry.find("decoder.hnsw.data").is_some());
    // Each analysis writes into folders of its own, `index/<dict>/<generation>/`.
    let index_dir = dir.join(&graph.file).parent().unwrap().to_path_buf();
    assert_eq!(index_dir.parent().unwrap(), store.index_dir("sae"));
    // The index answers queries by direction: each decoder row finds itself first.
    let index =
        loupe_store::index::load(&index_dir, "decoder", loupe_store::index::IndexParams::default()).unwrap();
    let sae = planted_sae();
    for (f, row) in loupe_analysis::features::similar::normalised(&sae.w_dec, D).iter().enumerate() {
        assert_eq!(index.search(row, 2)[0].0, f);
    }
    for f in 0..N {
        // Brute force over the planted values: (value, row) by value descending, earlier row first.
        let mut all: Vec<(f32, u64)> =
            values.iter().enumerate().filter(|(_, v)| v[f] > 0.0).map(|(r, v)| (v[f], r as u64)).collect();
        let stats = tables.stats(f as u32).unwrap();
        assert_eq!(stats.count, all.len() as u64, "feature {f}");
        assert_eq!(stats.dead, all.is_empty());
        assert_eq!(stats.hist.iter().map(|&c| u64::from(c)).sum::<u64>(), stats.count);
        let max = all.iter().map(|e| e.0).fold(0.0, f32::max);
        assert_eq!(stats.max_activation, max);
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));

        let top = tables.top_examples(f as u32).unwrap();
        let got: Vec<(f32, u64)> = top.iter().map(|e| (e.activation, e.row)).collect();
        assert_eq!(got, all.iter().take(7).copied().collect::<Vec<_>>(), "top examples of feature {f}");
        for e in &top {
            // The window: consecutive positions of the example's document, the feature's
            // planted value at each, the example token at `center`.
            assert_eq!(e.tokens.len(), 9);
            assert_eq!(e.tokens[e.center as usize], 1000 * e.doc + e.pos);
            let first = e.row - e.center as u64;
            for (i, (&t, &a)) in e.tokens.iter().zip(&e.activations).enumerate() {
                let r = (first + i as u64) as usize;
                assert_eq!(t, 1000 * (r as u32 / DOC_LEN) + r as u32 % DOC_LEN);
                assert_eq!(a, values[r][f]);
            }
        }

        // Quantile buckets: every sample lies in its bucket; counts are exact; the samples are
        // min(5, tokens) distinct rows.
        let quantile = tables.quantile_examples(f as u32).unwrap();
        let mut buckets: Vec<loupe_store::Bucket> = quantile.iter().map(|e| e.bucket.unwrap()).collect();
        buckets.dedup();
        assert_eq!(buckets.iter().map(|b| b.tokens).sum::<u64>(), stats.count, "feature {f}");
        if !all.is_empty() {
            assert!(buckets.len() >= 5, "feature {f}: only {} buckets", buckets.len());
        }
        for b in &buckets {
            let inside = all.iter().filter(|e| e.0 >= b.lo && e.0 < b.hi).count() as u64;
            assert_eq!(inside, b.tokens, "feature {f} bucket {}", b.index);
            // Equal-count quantiles at bin resolution: no bucket holds much more than a tenth
            // unless it is one histogram bin.
            let one_bin = b.hi / b.lo < 1.1;
            assert!(one_bin || b.tokens as f64 <= 0.25 * stats.count as f64, "feature {f}: {b:?}");
            let sample: Vec<_> = quantile.iter().filter(|e| e.bucket.unwrap().index == b.index).collect();
            assert_eq!(sample.len() as u64, b.tokens.min(5));
            for e in &sample {
                assert!(e.activation >= b.lo && e.activation < b.hi);
                assert_eq!(e.activation, values[e.row as usize][f]);
            }
            let mut rows: Vec<u64> = sample.iter().map(|e| e.row).collect();
            rows.dedup();
            assert_eq!(rows.len(), sample.len());
        }

        // Neighbours: the planted pair first.
        let neighbours = tables.neighbours(f as u32).unwrap();
        assert_eq!(neighbours[0].neighbour as usize, (f + N / 2) % N, "feature {f}: {neighbours:?}");
        assert!(neighbours[0].cosine > 0.9);
        assert!(neighbours.windows(2).all(|w| w[0].cosine >= w[1].cosine));
    }
    // Feature 1 fires on every token feature 0 does: it is 0's top co-occurring feature, with
    // the exact Jaccard index.
    let co = tables.cooccurrence(0).unwrap();
    let both = values.iter().filter(|v| v[0] > 0.0 && v[1] > 0.0).count() as u64;
    let either = values.iter().filter(|v| v[0] > 0.0 || v[1] > 0.0).count() as u64;
    assert_eq!((co[0].other, co[0].shared), (1, both));
    assert!((co[0].jaccard - both as f32 / either as f32).abs() < 1e-6);
    // No model in this store: no logit effects, and the run said so.
    assert!(tables.logits(0).unwrap().is_empty());
    assert!(text.contains("no model recorded"), "{text}");
    // Unknown feature ids are refused by name.
    let err = tables.stats(N as u32).unwrap_err().to_string();
    assert!(err.contains("feature 12 does not exist") && err.contains("12 features"), "{err}");
    assert!(tables.top_examples(99).is_err());

    // `loupe feature` prints a feature, and names an unknown id.
    let out = loupe(&["feature", "--store", s, "--dictionary", "sae", "3"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && shown.contains("feature 3 of sae") && shown.contains("«"), "{shown}");
    assert_one_error(
        &dir,
        &["feature", "--store", s, "--dictionary", "sae", "99"],
        "feature 99 does not exist",
    );

    // A new analysis replaces the old one: without an index this time, the old dump is deleted.
    drop(index);
    let out = loupe(&["analyze", "--store", s, "--dictionary", "sae", "--no-index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(loupe_store::fsutil::files_under(&dir.join("index/sae")).unwrap(), Vec::<String>::new());

    // The analysis is listed with checksums: verify passes, and catches a corrupted table.
    let out = loupe(&["store", "verify", s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = Store::open(&dir).unwrap().features("sae").unwrap();
    let table = dir.join(&listed.find("top_examples.arrow").unwrap().file);
    let mut bytes = std::fs::read(&table).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&table, &bytes).unwrap();
    let out = loupe(&["store", "verify", s]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("top_examples.arrow is corrupt"), "{out:?}");
}

#[test]
fn monet_experts_are_analysed_with_their_mean_output_as_direction() {
    use loupe_dict::Dictionary;
    use loupe_dict::monet::{Decomposition, Monet, MonetSpec};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let spec = MonetSpec {
        decomposition: Decomposition::Vertical,
        d_in: D,
        d_out: D,
        experts: 4,
        heads: 2,
        topk: 2,
        dim: 4,
    };
    let monet = Monet::init(spec, 1).unwrap();
    {
        let store = planted_store(&dir, &planted_values());
        loupe_dict::monet::io::save(&monet, &SaeMeta::default(), None, &store.dictionary_dir("monet"))
            .unwrap();
        let entry = DictEntry {
            hook: HOOK.to_string(),
            output_hook: None,
            kind: "monet".into(),
            variant: "vertical".into(),
            d_in: D as u32,
            n_features: 16,
            status: "done".into(),
            step: 1,
            tokens: 1,
            files: Vec::new(),
        };
        store.commit_dictionary("monet", entry, &["cfg.json", "monet_weights.safetensors"]).unwrap();
    }
    let s = dir.to_str().unwrap();
    let out = loupe(&["analyze", "--store", s, "--dictionary", "monet", "--top", "3", "--no-index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mean output on its top examples"), "{text}");
    let store = Store::open(&dir).unwrap();
    let tables = FeatureTables::open(&store, "monet").unwrap();
    // --no-index: no hnsw files listed, the (exact) neighbour table all the same.
    assert!(tables.entry().files.iter().all(|f| !f.file.starts_with("index/")), "{:?}", tables.entry().files);
    assert!(text.contains("no similarity index"), "{text}");
    // Each expert's direction is its mean output on its top examples: recompute it and check
    // the best neighbour's cosine.
    let acts = store.activations(HOOK).unwrap();
    let shard_rows = acts.shard_entries()[0].rows;
    let input = |row: u64| -> Vec<f32> {
        let (i, r) = ((row / shard_rows) as usize, (row % shard_rows) as usize);
        acts.open_shard(i).unwrap().act().row(r, D).to_f32()
    };
    let inputs: Vec<Vec<f32>> = (0..16u32)
        .map(|f| tables.top_examples(f).unwrap().iter().flat_map(|e| input(e.row)).collect())
        .collect();
    let dirs = monet.mean_feature_outputs(&inputs).unwrap();
    let unit = |f: usize| {
        let v = &dirs[f * D..(f + 1) * D];
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let mut fired = 0;
    for f in 0..16u32 {
        if tables.stats(f).unwrap().dead {
            continue;
        }
        if dirs[f as usize * D..(f as usize + 1) * D].iter().all(|&x| x == 0.0) {
            // Every hidden unit was off on its top examples: no direction, no neighbours.
            assert!(tables.neighbours(f).unwrap().is_empty());
            continue;
        }
        fired += 1;
        let best = tables.neighbours(f).unwrap()[0];
        let cos: f32 = unit(f as usize).iter().zip(unit(best.neighbour as usize)).map(|(a, b)| a * b).sum();
        assert!((cos - best.cosine).abs() < 1e-4, "expert {f}: {cos} vs {}", best.cosine);
    }
    assert!(fired >= 8, "only {fired} experts have a direction: {text}");
}

#[test]
fn bad_input_gets_one_error_line_and_leaves_the_store_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let s = dir.to_str().unwrap();
    {
        // A dictionary of another width listed for the store's hook, and one for a hook the
        // store lacks (with no model to capture it).
        let store = planted_store(&dir, &planted_values());
        let mut narrow = planted_sae();
        narrow.spec.d_in = 16;
        narrow.w_enc = narrow.w_enc.chunks(D).flat_map(|r| r[..16].to_vec()).collect();
        narrow.w_dec = narrow.w_dec.chunks(D).flat_map(|r| r[..16].to_vec()).collect();
        narrow.b_dec = vec![0.0; 16];
        commit_sae(&store, "narrow", &narrow, HOOK);
        commit_sae(&store, "elsewhere", &planted_sae(), "blocks.3.hook_resid_post");
    }
    let base = ["analyze", "--store", s, "--dictionary"];
    let args =
        |rest: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(rest.iter().copied()).collect() };
    assert_one_error(
        &dir,
        &args(&["narrow"]),
        "reads d = 16 but the store's blocks.0.hook_resid_post has d = 32",
    );
    assert_one_error(&dir, &args(&["nope"]), "no dictionary named \"nope\" (it has: elsewhere, narrow, sae)");
    assert_one_error(
        &dir,
        &args(&["elsewhere"]),
        "no activations for blocks.3.hook_resid_post and records no model",
    );
    assert_one_error(&dir, &args(&["sae", "--rows", "5..3"]), "bad --rows");
    assert_one_error(&dir, &args(&["sae", "--rows", "0..999999"]), "beyond the hook's 2000 rows");
    assert_one_error(&dir, &args(&["sae", "--model", "/nonexistent/model.gguf"]), "/nonexistent/model.gguf");
    // A missing store.
    let out = loupe(&["analyze", "--store", "/nonexistent/store", "--dictionary", "sae"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no store at /nonexistent/store"), "{}", stderr(&out));
}
