//! The one streaming pass: rows of a hook in storage order → the dictionary's codes → the
//! accumulators, the spilled codes and the rows' tokens.

use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use loupe_store::Activations;

use super::accumulate::{FeatureStats, QuantileSampler, TopExamples};
use super::codes_file::{CodesFile, CodesWriter};
use super::examples::RowInfo;
use loupe_dict::{Codes, Dictionary};

/// One chunk of rows, as the pass sees it.
pub struct Chunk<'a> {
    /// Index of the first row within the analysed range.
    pub first: u64,
    pub doc: &'a [u32],
    pub pos: &'a [u32],
    pub token: &'a [u32],
    /// `[rows, d]` activations.
    pub act: &'a [f32],
}

/// Call `f` on rows `rows` of `acts` in chunks of at most `chunk` rows (never across shards),
/// converted to f32; a non-finite activation is an error naming its shard and row.
pub fn for_each_chunk(
    acts: &Activations,
    rows: Range<u64>,
    chunk: usize,
    mut f: impl FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    let d = acts.spec().d as usize;
    let mut offset = 0u64;
    let mut x = Vec::new();
    for i in 0..acts.num_shards() {
        let n = acts.shard_entries()[i].rows;
        let (lo, hi) = (rows.start.max(offset), rows.end.min(offset + n));
        if lo < hi {
            let shard = acts.open_shard(i)?;
            let mut r = (lo - offset) as usize;
            let end = (hi - offset) as usize;
            while r < end {
                let e = (r + chunk).min(end);
                x.clear();
                shard.act().rows(r..e, d).to_f32_into(&mut x);
                if let Some(bad) = x.iter().position(|v| !v.is_finite()) {
                    bail!(
                        "non-finite activation ({}) in {} row {} of hook {}",
                        x[bad],
                        acts.shard_path(i).display(),
                        r + bad / d,
                        acts.hook()
                    );
                }
                f(Chunk {
                    first: offset + r as u64 - rows.start,
                    doc: &shard.doc()[r..e],
                    pos: &shard.pos()[r..e],
                    token: &shard.token()[r..e],
                    act: &x,
                })?;
                r = e;
            }
        }
        offset += n;
    }
    Ok(())
}

/// What the pass accumulated.
pub struct PassOutput {
    pub stats: FeatureStats,
    /// Per feature, `(value, row)` from the largest down.
    pub top: Vec<Vec<(f32, u64)>>,
    pub quantiles: QuantileSampler,
    pub codes: CodesFile,
    pub info: RowInfo,
    pub seconds: f64,
}

/// Pass settings.
#[derive(Clone, Copy, Debug)]
pub struct PassConfig {
    pub chunk: usize,
    pub top: usize,
    pub per_quantile: usize,
}

/// Encode rows `rows` of `acts` and account for every code; codes spill to `codes_path`.
/// `progress` gets the rows done.
pub fn run(
    acts: &Activations,
    rows: Range<u64>,
    dict: &dyn Dictionary,
    cfg: PassConfig,
    codes_path: &Path,
    mut progress: impl FnMut(u64),
) -> Result<PassOutput> {
    let started = Instant::now();
    let n = dict.n_features();
    let mut stats = FeatureStats::new(n);
    let mut top = TopExamples::new(n, cfg.top);
    let mut quantiles = QuantileSampler::new(n, cfg.per_quantile);
    let mut codes_out = CodesWriter::create(codes_path)?;
    let mut info = RowInfo::default();
    for_each_chunk(acts, rows, cfg.chunk, |c| {
        let codes = dict.encode(c.act);
        stats.add(&codes);
        top.add(&codes, c.first);
        quantiles.add(&codes, c.first);
        codes_out.append(&codes)?;
        info.doc.extend_from_slice(c.doc);
        info.pos.extend_from_slice(c.pos);
        info.token.extend_from_slice(c.token);
        progress(c.first + c.doc.len() as u64);
        Ok(())
    })?;
    Ok(PassOutput {
        stats,
        top: top.into_sorted(),
        quantiles,
        codes: codes_out.finish()?,
        info,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The reference the analysis is measured against: the same chunks read and encoded, nothing
/// kept. Returns the seconds taken and the codes' total size (so nothing is optimised away).
pub fn encode_only(
    acts: &Activations,
    rows: Range<u64>,
    dict: &dyn Dictionary,
    chunk: usize,
) -> Result<(f64, usize)> {
    let started = Instant::now();
    let mut nnz = 0;
    for_each_chunk(acts, rows, chunk, |c| {
        let codes: Codes = dict.encode(c.act);
        nnz += codes.nnz();
        Ok(())
    })?;
    Ok((started.elapsed().as_secs_f64(), nnz))
}
