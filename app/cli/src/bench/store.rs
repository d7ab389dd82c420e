//! `loupe bench store`: the activation store's read path against a raw read of the same files.
//!
//! It writes ~1 GiB of f16 activations, then times one epoch of the shuffled sampler
//! against a raw sequential `read()` of the same shard files, both with a cold page cache (shards
//! evicted with `posix_fadvise(DONTNEED)` first) and warm.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};
use loupe_store::{Activations, DType, HookSpec, Sampler, SamplerConfig, Store, ValuesRef};
use rand::{Rng, SeedableRng};

use crate::store_cmd::bytes;

const HOOK: &str = "blocks.6.hook_resid_post";
const REPEATS: usize = 3;

#[derive(clap::Args)]
pub struct StoreArgs {
    /// Folder for the benchmark store (default: a fresh temporary folder, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How much activation data to write, in GiB.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Activation width.
    #[arg(long, default_value_t = 640)]
    d: u32,
    /// Sampler batch size (rows).
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Keep the benchmark store instead of deleting it.
    #[arg(long)]
    keep: bool,
}

pub fn store(args: &StoreArgs) -> Result<()> {
    if !args.gib.is_finite() || args.gib <= 0.0 || args.d == 0 || args.batch == 0 {
        bail!("bench store: --gib, --d and --batch must be positive");
    }
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            if dir.exists() {
                bail!("bench store: {} already exists; give a new folder", dir.display());
            }
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("loupe-bench-store").tempdir_in(std::env::temp_dir())?;
            temp.path().join("store")
        }
    };
    let result = run_store_bench(&dir, args);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_store_bench(dir: &Path, args: &StoreArgs) -> Result<()> {
    let spec = HookSpec { d: args.d, dtype: DType::F16, grad: false };
    let acts = write_store(dir, spec, args.gib)?;
    let paths: Vec<PathBuf> = (0..acts.num_shards()).map(|i| acts.shard_path(i)).collect();
    let total = acts.bytes();
    println!(
        "store: {} rows, {} shards, {} of Arrow IPC at {}",
        acts.rows(),
        paths.len(),
        bytes(total),
        dir.display()
    );

    // Best of `REPEATS`, interleaved so that drifts in machine load hit both sides alike.
    let config = SamplerConfig::new(args.batch);
    let rowwise = SamplerConfig { run_rows: 1, ..config };
    let (
        mut raw_cold,
        mut sampler_cold,
        mut raw_warm,
        mut sampler_warm,
        mut sampler_f32,
        mut sampler_rowwise,
    ) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..REPEATS {
        evict(&paths)?;
        raw_cold = raw_cold.min(time(|| raw_read(&paths))?);
        evict(&paths)?;
        sampler_cold = sampler_cold.min(time(|| sample_epoch(&acts, config, false))?);
        raw_warm = raw_warm.min(time(|| raw_read(&paths))?);
        sampler_warm = sampler_warm.min(time(|| sample_epoch(&acts, config, false))?);
        sampler_f32 = sampler_f32.min(time(|| sample_epoch(&acts, config, true))?);
        sampler_rowwise = sampler_rowwise.min(time(|| sample_epoch(&acts, rowwise, false))?);
    }
    // What a run pays once per shard, the first time it maps it: checksum and finite scan.
    let shards: Vec<loupe_store::Shard> =
        (0..acts.num_shards()).map(|i| acts.open_shard(i)).collect::<Result<_>>()?;
    let (mut checksum, mut finite) = (f64::MAX, f64::MAX);
    for _ in 0..REPEATS {
        checksum = checksum.min(time(|| {
            for (i, shard) in shards.iter().enumerate() {
                let entry = &acts.shard_entries()[i];
                loupe_store::fsutil::check_bytes(
                    &acts.shard_path(i),
                    shard.file_bytes(),
                    entry.bytes,
                    &entry.xxh3,
                )?;
            }
            Ok(())
        })?);
        finite = finite.min(time(|| {
            for (i, shard) in shards.iter().enumerate() {
                shard.check_finite(&acts.shard_path(i))?;
            }
            Ok(())
        })?);
    }

    let gibs = |secs: f64| total as f64 / secs / (1u64 << 30) as f64;
    println!("best of {REPEATS} passes each:");
    println!("  raw sequential read, cold cache     {:6.2} GiB/s", gibs(raw_cold));
    println!("  sampler epoch, cold cache           {:6.2} GiB/s", gibs(sampler_cold));
    println!("  raw sequential read, warm cache     {:6.2} GiB/s", gibs(raw_warm));
    println!("  sampler epoch, warm cache           {:6.2} GiB/s", gibs(sampler_warm));
    println!("  sampler epoch + f32 widening, warm  {:6.2} GiB/s", gibs(sampler_f32));
    println!(
        "  sampler epoch, warm, run_rows 1     {:6.2} GiB/s (ratio {:.2}; every row shuffled alone)",
        gibs(sampler_rowwise),
        raw_warm / sampler_rowwise
    );
    println!(
        "  first read of a shard in a run, warm: checksum {:.2} GiB/s, finite scan {:.2} GiB/s ({:.0}% of one warm sampler epoch)",
        gibs(checksum),
        gibs(finite),
        100.0 * (checksum + finite) / sampler_warm
    );
    println!(
        "store sampler, cold cache: {:.2} GiB/s, ratio {:.2} vs raw sequential read (cold cache)",
        gibs(sampler_cold),
        raw_cold / sampler_cold
    );
    println!(
        "store sampler: {:.2} GiB/s, ratio {:.2} vs raw sequential read (warm page cache, batch {}, run_rows {}, d {})",
        gibs(sampler_warm),
        raw_warm / sampler_warm,
        args.batch,
        config.run_rows,
        args.d
    );
    Ok(())
}

/// Write `gib` GiB of random f16 activations as documents of 1024 positions.
fn write_store(dir: &Path, spec: HookSpec, gib: f64) -> Result<Activations> {
    let d = spec.d as usize;
    let row_bytes = d * 2 + 12;
    let rows = ((gib * (1u64 << 30) as f64) / row_bytes as f64) as usize;
    let store = Store::create(dir)?;
    let mut writer = store.activation_writer(HOOK, spec)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let pool: Vec<f16> =
        (0..(1 << 21) + 1024 * d).map(|_| f16::from_f32(rng.random_range(-4.0..4.0))).collect();
    let bar = ProgressBar::new(rows as u64).with_style(
        ProgressStyle::with_template("writing {bar:30} {pos}/{len} rows {per_sec}").expect("valid template"),
    );
    let doc_len = 1024usize;
    let (mut doc, mut written) = (0u32, 0usize);
    while written < rows {
        let n = doc_len.min(rows - written);
        let offset = rng.random_range(0..(1 << 21));
        let pos: Vec<u32> = (0..n as u32).collect();
        let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..262_144)).collect();
        writer.append(&vec![doc; n], &pos, &tokens, &pool[offset..offset + n * d], None)?;
        written += n;
        doc += 1;
        bar.set_position(written as u64);
    }
    writer.finish()?;
    bar.finish_and_clear();
    store.activations(HOOK)
}

fn time(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

/// The reference: read every shard file front to back with `read()` into a reused buffer.
fn raw_read(paths: &[PathBuf]) -> Result<()> {
    let mut buf = vec![0u8; 8 << 20];
    let mut sum = 0u64;
    for path in paths {
        let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sum = sum.wrapping_add(buf[n - 1] as u64);
        }
    }
    std::hint::black_box(sum);
    Ok(())
}

/// One epoch of shuffled batches, optionally widened to f32 as a trainer would.
fn sample_epoch(acts: &Activations, config: SamplerConfig, widen: bool) -> Result<()> {
    let sampler = Sampler::new(acts, config)?;
    let mut epoch = sampler.epoch(0);
    let mut batch = sampler.empty_batch();
    let mut wide = Vec::new();
    let mut rows = 0u64;
    while epoch.next_into(&mut batch) {
        rows += batch.rows() as u64;
        if widen {
            batch.act.as_ref().to_f32_into(&mut wide);
            std::hint::black_box(&wide);
        }
        if let ValuesRef::F16(v) = batch.act.as_ref() {
            std::hint::black_box(v.last());
        }
    }
    if rows != sampler.rows() {
        bail!("sampler delivered {rows} rows, the store holds {}", sampler.rows());
    }
    Ok(())
}

/// Drop the shards from the page cache (they are clean: the writer fsynced them).
fn evict(paths: &[PathBuf]) -> Result<()> {
    for path in paths {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: plain syscall on a valid descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            bail!("posix_fadvise failed on {} (error {rc})", path.display());
        }
    }
    Ok(())
}
