//! `loupe bench similar`: the similar-feature index — hnsw_rs build time, query latency and
//! recall@10 against brute force, on `--features` unit vectors of width `--d`.
//!
//! The vectors are a trained dictionary's decoder directions (`--store`, `--dictionary`), or
//! Gaussian directions (no structure at all: the hardest case for an ANN index). Queries are `--queries` of the indexed vectors
//! themselves, as when the analysis lists each feature's neighbours, timed one at a time on
//! one thread. The reference is the brute-force scan over all vectors in the same run.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use loupe_analysis::features::similar::{brute_force, normalised};
use loupe_store::index::{Index, IndexParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 65_536)]
    features: usize,
    #[arg(long, default_value_t = 640)]
    d: usize,
    /// Queries timed (and checked against brute force).
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Links per node (hnsw M).
    #[arg(long, default_value_t = IndexParams::default().connections)]
    connections: usize,
    #[arg(long, default_value_t = IndexParams::default().ef_construction)]
    ef_construction: usize,
    #[arg(long, default_value_t = IndexParams::default().ef_search)]
    ef_search: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use the decoder directions of this store's dictionaries (comma-separated, concatenated)
    /// instead of Gaussian vectors.
    #[arg(long, requires = "dictionary")]
    store: Option<std::path::PathBuf>,
    #[arg(long, requires = "store")]
    dictionary: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    if args.features < 11 || args.d == 0 || args.queries == 0 {
        bail!("bench similar: need at least 11 features, d >= 1 and queries >= 1");
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let (vectors, what) = match (&args.store, &args.dictionary) {
        (Some(store), Some(names)) => {
            let store = loupe_store::Store::open(store)?;
            let mut vectors = Vec::new();
            for name in names.split(',') {
                let (_, dict) = loupe_dict::open_in_store(&store, name)?;
                let dirs = dict
                    .decoder_directions()
                    .with_context(|| format!("{name}'s features have no fixed directions"))?;
                vectors.extend(normalised(dirs, dict.d_out()));
            }
            (vectors, format!("decoder directions of {names}"))
        }
        _ => {
            let raw: Vec<f32> = (0..args.features * args.d).map(|_| rng.sample(StandardNormal)).collect();
            (normalised(&raw, args.d), "Gaussian unit vectors".to_string())
        }
    };
    let (features, d) = (vectors.len(), vectors[0].len());
    let params = IndexParams {
        connections: args.connections,
        ef_construction: args.ef_construction,
        ef_search: args.ef_search,
    };
    println!(
        "{features} {what} of width {d}; hnsw M {}, ef_construction {}, ef_search {} ({} threads)",
        params.connections,
        params.ef_construction,
        params.ef_search,
        rayon::current_num_threads()
    );
    let started = Instant::now();
    let index = Index::build(&vectors, params);
    let build = started.elapsed().as_secs_f64();
    println!("build: {build:.1} s");

    let queries: Vec<usize> = (0..args.queries).map(|_| rng.random_range(0..features)).collect();
    let started = Instant::now();
    let found: Vec<Vec<usize>> =
        queries.iter().map(|&q| index.search(&vectors[q], 10).into_iter().map(|e| e.0).collect()).collect();
    let query_ms = started.elapsed().as_secs_f64() * 1e3 / args.queries as f64;
    let started = Instant::now();
    let exact: Vec<Vec<usize>> = queries.iter().map(|&q| brute_force(&vectors, &vectors[q], 10)).collect();
    let brute_ms = started.elapsed().as_secs_f64() * 1e3 / args.queries as f64;
    let hits: usize =
        found.iter().zip(&exact).map(|(f, e)| f.iter().filter(|id| e.contains(id)).count()).sum();
    let recall = hits as f64 / (10 * args.queries) as f64;
    println!(
        "query (one thread): hnsw {query_ms:.3} ms, brute force {brute_ms:.3} ms; recall@10 {recall:.4}"
    );
    println!(
        "similar: {query_ms:.3} ms/query at recall@10 {recall:.3} (build {build:.1} s), ratio {:.1} vs brute force",
        brute_ms / query_ms
    );
    Ok(())
}
