//! Feature analysis accumulators against brute force.

use loupe_analysis::features::accumulate::{FeatureStats, HIST_BINS, TopExamples, hist_bin, hist_bin_edge};
use loupe_dict::Codes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `tokens` rows of random sparse codes over `n` features; values drawn from a few levels so that
/// ties occur.
fn random_rows(rng: &mut StdRng, n: usize, tokens: usize) -> Vec<Vec<(u32, f32)>> {
    (0..tokens)
        .map(|_| {
            let mut row = Vec::new();
            for f in 0..n as u32 {
                if rng.random_bool(0.2) {
                    let level = [0.25f32, 0.5, 1.0, 3.0, 1e-6, 7e4][rng.random_range(0..6)];
                    row.push((f, level * rng.random_range(1..4) as f32));
                }
            }
            row
        })
        .collect()
}

fn feed(rows: &[Vec<(u32, f32)>], n: usize, k: usize, chunk: usize) -> (FeatureStats, Vec<Vec<(f32, u64)>>) {
    let (mut stats, mut top) = (FeatureStats::new(n), TopExamples::new(n, k));
    for (i, part) in rows.chunks(chunk).enumerate() {
        let codes = Codes::from_rows(part.iter().map(Vec::as_slice));
        stats.add(&codes);
        top.add(&codes, (i * chunk) as u64);
    }
    (stats, top.into_sorted())
}

#[test]
fn stats_and_top_examples_equal_brute_force_whatever_the_chunking() {
    let (n, tokens, k) = (12, 700, 5);
    let mut rng = StdRng::seed_from_u64(1);
    let rows = random_rows(&mut rng, n, tokens);
    let (stats, top) = feed(&rows, n, k, 64);
    for f in 0..n as u32 {
        let mut all: Vec<(f32, u64)> = rows
            .iter()
            .enumerate()
            .flat_map(|(t, r)| r.iter().filter(|e| e.0 == f).map(move |e| (e.1, t as u64)))
            .collect();
        let fi = f as usize;
        assert_eq!(stats.count[fi], all.len() as u64);
        let sum: f64 = all.iter().map(|e| e.0 as f64).sum();
        assert!((stats.sum[fi] - sum).abs() < 1e-6 * sum.max(1.0));
        assert_eq!(stats.max[fi], all.iter().map(|e| e.0).fold(0.0, f32::max));
        let mut hist = vec![0u32; HIST_BINS];
        all.iter().for_each(|e| hist[hist_bin(e.0)] += 1);
        assert_eq!(&stats.hist[fi * HIST_BINS..(fi + 1) * HIST_BINS], &hist[..]);
        // Brute force: sort by value descending, earlier row first among equals.
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        assert_eq!(top[fi], all, "feature {f}");
    }
    assert_eq!(stats.tokens, tokens as u64);
    // Another chunking gives the same result, bit for bit.
    let (stats2, top2) = feed(&rows, n, k, 7);
    assert_eq!(top, top2);
    assert_eq!(stats.count, stats2.count);
    assert_eq!(stats.hist, stats2.hist);
    assert_eq!(stats.max, stats2.max);
}

#[test]
fn histogram_bins_are_eighth_octaves() {
    assert_eq!(hist_bin(hist_bin_edge(10)), 10);
    assert_eq!(hist_bin(hist_bin_edge(11) * 0.9999), 10);
    assert_eq!(hist_bin(1.0), 192);
    assert_eq!(hist_bin(2.0), 200);
    assert_eq!(hist_bin(1.05), 192);
    assert_eq!(hist_bin(1.1), 193);
    assert_eq!(hist_bin(1e-30), 0);
    assert_eq!(hist_bin(1e30), HIST_BINS - 1);
}

#[test]
fn quantile_samples_are_the_smallest_priorities_of_each_bucket_whatever_the_chunking() {
    use loupe_analysis::features::accumulate::{QuantileSampler, priority};
    let (n, tokens, m, q) = (6, 3000, 5, 10);
    let mut rng = StdRng::seed_from_u64(9);
    // Continuous values over several octaves, so that buckets are distinct.
    let rows: Vec<Vec<(u32, f32)>> = (0..tokens)
        .map(|_| {
            let mut row = Vec::new();
            for f in 0..n as u32 {
                if rng.random_bool(0.3) {
                    row.push((f, rng.random_range(0.01f32..40.0)));
                }
            }
            row
        })
        .collect();
    let mut results = Vec::new();
    for chunk in [64, 7] {
        let (mut stats, mut sampler) = (FeatureStats::new(n), QuantileSampler::new(n, m));
        for (i, part) in rows.chunks(chunk).enumerate() {
            let codes = Codes::from_rows(part.iter().map(Vec::as_slice));
            stats.add(&codes);
            sampler.add(&codes, (i * chunk) as u64);
        }
        let buckets: Vec<_> =
            (0..n).map(|f| sampler.buckets(f, &stats.hist[f * HIST_BINS..(f + 1) * HIST_BINS], q)).collect();
        for (f, bs) in buckets.iter().enumerate() {
            assert!(bs.len() >= 8, "feature {f}: {} buckets", bs.len());
            assert_eq!(bs.iter().map(|b| b.tokens).sum::<u64>(), stats.count[f]);
            for b in bs {
                let (lo, hi) = (hist_bin_edge(b.bins.start), hist_bin_edge(b.bins.end));
                let mut inside: Vec<(u64, u64)> = rows
                    .iter()
                    .enumerate()
                    .flat_map(|(t, r)| {
                        r.iter().filter(|e| e.0 == f as u32 && e.1 >= lo && e.1 < hi).map(move |_| t)
                    })
                    .map(|t| (priority(f as u32, t as u64), t as u64))
                    .collect();
                assert_eq!(inside.len() as u64, b.tokens);
                // About a tenth of the tokens each (bin edges are 9% apart).
                assert!(b.tokens as f64 <= 0.2 * stats.count[f] as f64, "{b:?}");
                inside.sort_unstable();
                let want: Vec<u64> = inside.iter().take(m).map(|e| e.1).collect();
                assert_eq!(b.sample.iter().map(|s| s.row).collect::<Vec<_>>(), want);
            }
        }
        results.push(buckets);
    }
    assert_eq!(results[0], results[1]);
}
