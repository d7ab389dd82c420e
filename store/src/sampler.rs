//! Shuffled mini-batches across all shards of a hook, without loading the store into memory.
//!
//! Each epoch splits every shard into chunks of `chunk_rows` consecutive rows and visits the chunks
//! in a random order. Chunks are taken `window_chunks` at a time into a window, cut into runs of
//! `run_rows` consecutive rows; the runs are shuffled and dealt into batches, and runs left over
//! when a window runs low are mixed into the next one. Every row is therefore delivered exactly once
//! per epoch, reads stay chunk-local (good for the page cache and disks), and only run *indices* are
//! held in memory: the values are copied straight from the memory-mapped shards into the batch.

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::reader::{Activations, Shard};
use crate::values::Values;

/// Runs ahead of the copy whose first row is prefetched.
const PREFETCH_AHEAD: usize = 2;

/// How batches are drawn.
#[derive(Clone, Copy, Debug)]
pub struct SamplerConfig {
    /// Rows per batch.
    pub batch_size: usize,
    /// Seed of the shuffle; epoch `e` uses a seed derived from this and `e`.
    pub seed: u64,
    /// Consecutive rows read together.
    pub chunk_rows: usize,
    /// Chunks mixed together in one shuffle window.
    pub window_chunks: usize,
    /// Consecutive rows that stay together inside a batch (1: every row shuffled on its own).
    /// Short runs cost little shuffling and let the copy stream; see BENCHMARKS.md.
    pub run_rows: usize,
    /// Also deliver the `grad` column (the hook must have it).
    pub grad: bool,
    /// Skip the last, short batch of an epoch.
    pub drop_last: bool,
    /// Use only the first this many rows of the hook (in storage order: shard by shard); the rest
    /// can be held out for evaluation.
    pub row_limit: Option<u64>,
}

impl SamplerConfig {
    pub fn new(batch_size: usize) -> SamplerConfig {
        SamplerConfig {
            batch_size,
            seed: 0,
            chunk_rows: 128,
            window_chunks: 512,
            run_rows: 8,
            grad: false,
            drop_last: false,
            row_limit: None,
        }
    }
}

/// A batch of rows in the hook's stored element type.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub d: usize,
    pub doc: Vec<u32>,
    pub pos: Vec<u32>,
    pub token: Vec<u32>,
    /// `[rows * d]`
    pub act: Values,
    /// `[rows * d]`, when the sampler was asked for gradients.
    pub grad: Option<Values>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.doc.len()
    }
}

/// Draws shuffled batches from one hook; see the module docs.
pub struct Sampler {
    shards: Vec<Shard>,
    config: SamplerConfig,
    d: usize,
    dtype: crate::DType,
}

impl Sampler {
    /// Map every shard of `acts` (cheap: nothing is read yet) and check the configuration.
    pub fn new(acts: &Activations, config: SamplerConfig) -> Result<Sampler> {
        if config.batch_size == 0
            || config.chunk_rows == 0
            || config.window_chunks == 0
            || config.run_rows == 0
        {
            bail!("sampler: batch_size, chunk_rows, window_chunks and run_rows must be at least 1");
        }
        if config.grad && !acts.spec().grad {
            bail!("hook {} has no gradients stored (capture it with gradients)", acts.hook());
        }
        let shards = (0..acts.num_shards()).map(|i| acts.open_shard(i)).collect::<Result<Vec<_>>>()?;
        Ok(Sampler { shards, config, d: acts.spec().d as usize, dtype: acts.spec().dtype })
    }

    /// Rows this sampler delivers per epoch (all of the hook's, or the first `row_limit`).
    pub fn rows(&self) -> u64 {
        let all = self.shards.iter().map(|s| s.rows() as u64).sum();
        self.config.row_limit.map_or(all, |limit| limit.min(all))
    }

    /// An empty batch with this sampler's shape, to pass to [`Epoch::next_into`].
    pub fn empty_batch(&self) -> Batch {
        Batch {
            d: self.d,
            doc: Vec::new(),
            pos: Vec::new(),
            token: Vec::new(),
            act: Values::new(self.dtype),
            grad: self.config.grad.then(|| Values::new(self.dtype)),
        }
    }

    /// The batches of epoch `epoch`, in a reproducible order.
    pub fn epoch(&self, epoch: u64) -> Epoch<'_> {
        let seed = self.config.seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = StdRng::seed_from_u64(seed);
        let step = self.config.chunk_rows;
        let mut chunks: Vec<(u32, u32, u32)> = Vec::new();
        let mut left = self.rows();
        for (s, shard) in self.shards.iter().enumerate() {
            let rows = (shard.rows() as u64).min(left) as usize;
            left -= rows as u64;
            for start in (0..rows).step_by(step) {
                chunks.push((s as u32, start as u32, step.min(rows - start) as u32));
            }
        }
        chunks.shuffle(&mut rng);
        Epoch { sampler: self, chunks, next_chunk: 0, window: Vec::new(), cursor: 0, rng }
    }
}

/// One pass over every row; an iterator of batches.
pub struct Epoch<'a> {
    sampler: &'a Sampler,
    /// (shard, first row, rows) of each chunk, in visiting order.
    chunks: Vec<(u32, u32, u32)>,
    next_chunk: usize,
    /// (shard, first row, rows) of the runs in the current window.
    window: Vec<(u32, u32, u32)>,
    cursor: usize,
    rng: StdRng,
}

impl Epoch<'_> {
    /// Fill `batch` (its buffers are reused) with the next batch; false when the epoch is over.
    pub fn next_into(&mut self, batch: &mut Batch) -> bool {
        let batch_size = self.sampler.config.batch_size;
        let available = |e: &Self| e.window[e.cursor..].iter().map(|r| r.2 as usize).sum::<usize>();
        while self.next_chunk < self.chunks.len() && available(self) < batch_size {
            self.refill();
        }
        let take = batch_size.min(available(self));
        if take == 0 || (take < batch_size && self.sampler.config.drop_last) {
            return false;
        }
        batch.doc.clear();
        batch.pos.clear();
        batch.token.clear();
        batch.act.clear();
        if let Some(g) = batch.grad.as_mut() {
            g.clear();
        }
        // Whole runs that fit, then part of the next one (the rest stays in the window).
        let mut whole = 0;
        let mut rows = 0;
        while let Some(run) = self.window.get(self.cursor + whole)
            && rows + run.2 as usize <= take
        {
            rows += run.2 as usize;
            whole += 1;
        }
        // Which runs form the batch is random; their order inside it does not matter to training,
        // so copy them in storage order: near-sequential reads are markedly faster.
        let runs = &mut self.window[self.cursor..self.cursor + whole];
        runs.sort_unstable();
        for (i, &(s, start, len)) in runs.iter().enumerate() {
            if let Some(&(ps, pstart, _)) = runs.get(i + PREFETCH_AHEAD) {
                self.sampler.shards[ps as usize].prefetch_row(pstart as usize);
            }
            copy_run(self.sampler, batch, s, start, len);
        }
        self.cursor += whole;
        if rows < take {
            let (s, start, len) = self.window[self.cursor];
            let part = (take - rows) as u32;
            copy_run(self.sampler, batch, s, start, part);
            self.window[self.cursor] = (s, start + part, len - part);
        }
        true
    }

    /// Keep the unused runs of the window, add the runs of the next `window_chunks` chunks, shuffle.
    fn refill(&mut self) {
        self.window.drain(..self.cursor);
        self.cursor = 0;
        let run = self.sampler.config.run_rows as u32;
        let end = (self.next_chunk + self.sampler.config.window_chunks).min(self.chunks.len());
        for &(s, start, len) in &self.chunks[self.next_chunk..end] {
            self.window
                .extend((start..start + len).step_by(run as usize).map(|r| (s, r, run.min(start + len - r))));
        }
        self.next_chunk = end;
        self.window.shuffle(&mut self.rng);
    }
}

/// Append rows `[start, start + len)` of shard `s` to the batch.
fn copy_run(sampler: &Sampler, batch: &mut Batch, s: u32, start: u32, len: u32) {
    let shard = &sampler.shards[s as usize];
    let (d, rows) = (sampler.d, start as usize..(start + len) as usize);
    batch.doc.extend_from_slice(&shard.doc()[rows.clone()]);
    batch.pos.extend_from_slice(&shard.pos()[rows.clone()]);
    batch.token.extend_from_slice(&shard.token()[rows.clone()]);
    batch.act.extend_from(shard.act(), rows.start * d..rows.end * d);
    if let (Some(g), Some(src)) = (batch.grad.as_mut(), shard.grad()) {
        g.extend_from(src, rows.start * d..rows.end * d);
    }
}

impl Iterator for Epoch<'_> {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        let mut batch = self.sampler.empty_batch();
        self.next_into(&mut batch).then_some(batch)
    }
}
