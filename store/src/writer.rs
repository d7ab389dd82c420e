//! [`ActivationWriter`]: appends rows to a hook and commits them as shards.
//!
//! Rows are buffered in memory; each full buffer becomes one Arrow IPC file with one record batch,
//! written as `NNNNN.arrow.tmp`, fsynced, renamed to `NNNNN.arrow`, and only then listed in the
//! manifest. A writer killed at any point leaves the store valid: committed shards are complete and
//! listed, a half-written one is an unlisted `.tmp` file.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow_array::types::{Float16Type, Float32Type, UInt32Type};
use arrow_array::{ArrayRef, FixedSizeListArray, PrimitiveArray, RecordBatch};
use arrow_ipc::writer::FileWriter;

use crate::fsutil::{self, HashingWriter};
use crate::manifest::{HookEntry, HookSpec, ShardEntry, check_hook_name};
use crate::schema::{item_field, shard_schema};
use crate::store::Store;
use crate::values::{Element, Values};

/// Default shard size: ~128 MiB of activation data per file.
pub const DEFAULT_SHARD_BYTES: usize = 128 << 20;

/// Buffers rows for one hook and writes them as shards of the store.
///
/// Call [`ActivationWriter::finish`] to commit the last, partial shard; rows still buffered when
/// the writer is dropped are discarded (never half-written).
pub struct ActivationWriter<'s> {
    store: &'s Store,
    hook: String,
    spec: HookSpec,
    shard_rows: usize,
    /// Index of the next shard file (continues after the listed ones).
    next_index: u64,
    doc: Vec<u32>,
    pos: Vec<u32>,
    token: Vec<u32>,
    act: Values,
    grad: Option<Values>,
}

impl Store {
    /// A writer for `hook`. If the store already holds the hook, `spec` must match it; new shards
    /// are appended after the existing ones.
    pub fn activation_writer(&self, hook: &str, spec: HookSpec) -> Result<ActivationWriter<'_>> {
        if !self.is_writable() {
            bail!("store {} is open read-only", self.root().display());
        }
        check_hook_name(hook)?;
        if spec.d == 0 {
            bail!("hook {hook}: activation width d must be at least 1");
        }
        if let Some(existing) = self.manifest().hooks.get(hook) {
            check_same_spec(hook, &existing.spec, &spec)?;
        }
        let row_bytes = spec.d as usize * spec.dtype.size() * if spec.grad { 2 } else { 1 };
        Ok(ActivationWriter {
            store: self,
            hook: hook.to_string(),
            spec,
            shard_rows: (DEFAULT_SHARD_BYTES / row_bytes).max(1),
            next_index: next_shard_index(self.manifest().hooks.get(hook)),
            doc: Vec::new(),
            pos: Vec::new(),
            token: Vec::new(),
            act: Values::new(spec.dtype),
            grad: spec.grad.then(|| Values::new(spec.dtype)),
        })
    }
}

fn check_same_spec(hook: &str, stored: &HookSpec, asked: &HookSpec) -> Result<()> {
    if stored != asked {
        bail!("hook {hook} is stored with {stored}, cannot append rows with {asked}");
    }
    Ok(())
}

impl<'s> ActivationWriter<'s> {
    /// Rows per shard (the default aims at ~128 MiB files).
    pub fn with_shard_rows(mut self, rows: usize) -> Self {
        self.shard_rows = rows.max(1);
        self
    }

    pub fn spec(&self) -> HookSpec {
        self.spec
    }

    /// Rows buffered and not yet committed.
    pub fn pending_rows(&self) -> usize {
        self.doc.len()
    }

    pub fn shard_rows(&self) -> usize {
        self.shard_rows
    }

    /// Append `n` rows: `doc`, `pos`, `token` of length `n`, `act` (and `grad` when the hook has
    /// gradients) of length `n * d`. Values are converted to the stored type; NaN, infinities and
    /// values outside f16 range are refused with an error naming the row, and nothing is appended.
    /// Full shards are written as they fill.
    pub fn append<T: Element>(
        &mut self,
        doc: &[u32],
        pos: &[u32],
        token: &[u32],
        act: &[T],
        grad: Option<&[T]>,
    ) -> Result<()> {
        let n = doc.len();
        let d = self.spec.d as usize;
        if pos.len() != n || token.len() != n {
            bail!(
                "append to {}: doc, pos and token lengths differ ({n}, {}, {})",
                self.hook,
                pos.len(),
                token.len()
            );
        }
        if act.len() != n * d {
            bail!("append to {}: act has {} values, expected {n} rows × d {d}", self.hook, act.len());
        }
        match (grad, &self.grad) {
            (Some(g), Some(_)) if g.len() != n * d => {
                bail!("append to {}: grad has {} values, expected {n} rows × d {d}", self.hook, g.len())
            }
            (None, Some(_)) => {
                bail!("append to {}: the hook stores gradients but none were given", self.hook)
            }
            (Some(_), None) => bail!("append to {}: gradients given but the hook stores none", self.hook),
            _ => {}
        }
        let start = self.act.len();
        append_checked(&mut self.act, act, d, doc, pos, "act", &self.hook)?;
        if let (Some(g), Some(buf)) = (grad, self.grad.as_mut())
            && let Err(e) = append_checked(buf, g, d, doc, pos, "grad", &self.hook)
        {
            self.act.truncate(start);
            return Err(e);
        }
        self.doc.extend_from_slice(doc);
        self.pos.extend_from_slice(pos);
        self.token.extend_from_slice(token);
        while self.doc.len() >= self.shard_rows {
            self.write_shard(self.shard_rows)?;
        }
        Ok(())
    }

    /// Commit buffered rows as a (possibly short) shard.
    pub fn flush(&mut self) -> Result<()> {
        if !self.doc.is_empty() {
            self.write_shard(self.doc.len())?;
        }
        Ok(())
    }

    /// Commit buffered rows and close the writer.
    pub fn finish(mut self) -> Result<()> {
        self.flush()
    }

    /// Write every buffered row as a shard file *without* listing it; list it (with shards of
    /// other hooks, atomically) through [`Store::commit_shards`]. `None` when nothing is buffered.
    pub fn write_pending(&mut self) -> Result<Option<PendingShard>> {
        match self.doc.len() {
            0 => Ok(None),
            rows => self.write_file(rows).map(Some),
        }
    }

    /// Write the first `rows` buffered rows as the next shard and list it in the manifest.
    fn write_shard(&mut self, rows: usize) -> Result<()> {
        let shard = self.write_file(rows)?;
        self.store.commit_shards(vec![shard], |_| Ok(()))
    }

    fn write_file(&mut self, rows: usize) -> Result<PendingShard> {
        let d = self.spec.d as usize;
        let batch = self.take_batch(rows, d)?;
        let dir = self.store.root().join("activations").join(&self.hook);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file_name = format!("{:05}.arrow", self.next_index);
        let path = dir.join(&file_name);
        let (bytes, xxh3) = write_ipc_file(&path, &batch)
            .with_context(|| format!("cannot write shard {}", path.display()))?;
        self.next_index += 1;
        Ok(PendingShard {
            hook: self.hook.clone(),
            spec: self.spec,
            entry: ShardEntry { file: file_name, rows: rows as u64, bytes, xxh3 },
        })
    }

    /// Move the first `rows` buffered rows into a record batch.
    fn take_batch(&mut self, rows: usize, d: usize) -> Result<RecordBatch> {
        let u32_col = |v: &mut Vec<u32>| -> ArrayRef {
            let rest = v.split_off(rows);
            let head = std::mem::replace(v, rest);
            Arc::new(PrimitiveArray::<UInt32Type>::new(head.into(), None))
        };
        let mut columns = vec![u32_col(&mut self.doc), u32_col(&mut self.pos), u32_col(&mut self.token)];
        columns.push(vector_column(&mut self.act, rows, d)?);
        if let Some(grad) = self.grad.as_mut() {
            columns.push(vector_column(grad, rows, d)?);
        }
        Ok(RecordBatch::try_new(shard_schema(&self.spec), columns)?)
    }
}

/// A shard file written but not yet listed in the manifest.
#[derive(Clone, Debug)]
pub struct PendingShard {
    pub hook: String,
    pub spec: HookSpec,
    pub entry: ShardEntry,
}

impl Store {
    /// List written shards (of any hooks) in one atomic manifest update, together with `change`
    /// (e.g. progress that must move with the rows).
    pub fn commit_shards(
        &self,
        shards: Vec<PendingShard>,
        change: impl FnOnce(&mut crate::Manifest) -> Result<()>,
    ) -> Result<()> {
        self.commit(|m| {
            for shard in shards {
                let entry = m
                    .hooks
                    .entry(shard.hook.clone())
                    .or_insert(HookEntry { spec: shard.spec, shards: Vec::new() });
                check_same_spec(&shard.hook, &entry.spec, &shard.spec)?;
                entry.shards.push(shard.entry);
            }
            change(m)
        })
    }
}

/// Split the first `rows` rows off `values` into a FixedSizeList column.
fn vector_column(values: &mut Values, rows: usize, d: usize) -> Result<ArrayRef> {
    let n = rows * d;
    let list = match values {
        Values::F16(v) => {
            let rest = v.split_off(n);
            let head = std::mem::replace(v, rest);
            let items = PrimitiveArray::<Float16Type>::new(head.into(), None);
            FixedSizeListArray::try_new(item_field(crate::DType::F16), d as i32, Arc::new(items), None)?
        }
        Values::F32(v) => {
            let rest = v.split_off(n);
            let head = std::mem::replace(v, rest);
            let items = PrimitiveArray::<Float32Type>::new(head.into(), None);
            FixedSizeListArray::try_new(item_field(crate::DType::F32), d as i32, Arc::new(items), None)?
        }
    };
    Ok(Arc::new(list))
}

/// Convert and append `src` to `dst`; on a non-finite or out-of-range value, undo and explain.
fn append_checked<T: Element>(
    dst: &mut Values,
    src: &[T],
    d: usize,
    doc: &[u32],
    pos: &[u32],
    column: &str,
    hook: &str,
) -> Result<()> {
    let start = dst.len();
    let where_ =
        |i: usize| format!("{hook}: row doc {} pos {} column {column}[{}]", doc[i / d], pos[i / d], i % d);
    if let Some(i) = src.iter().position(|v| !v.is_finite()) {
        bail!("{} is {} — activations must be finite", where_(i), src[i].to_f32());
    }
    T::append_converted(src, dst);
    let overflow = match &*dst {
        Values::F16(v) => v[start..].iter().position(|x| !x.is_finite()),
        Values::F32(_) => None,
    };
    if let Some(i) = overflow {
        dst.truncate(start);
        bail!("{} is {}, outside the f16 range (±65504); store this hook as f32", where_(i), src[i].to_f32());
    }
    Ok(())
}

/// The index after the highest listed shard of a hook.
fn next_shard_index(entry: Option<&HookEntry>) -> u64 {
    entry
        .into_iter()
        .flat_map(|e| &e.shards)
        .filter_map(|s| s.file.strip_suffix(".arrow")?.parse::<u64>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Write one record batch as an Arrow IPC file, crash-safely; returns its size and xxh3-128.
fn write_ipc_file(path: &std::path::Path, batch: &RecordBatch) -> Result<(u64, String)> {
    let tmp: PathBuf = fsutil::tmp_path(path);
    let result = (|| -> Result<(u64, String)> {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let mut ipc = FileWriter::try_new(&mut out, &batch.schema())?;
        ipc.write(batch)?;
        ipc.finish()?;
        drop(ipc);
        let (buffered, bytes, xxh3) = out.finish();
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((bytes, xxh3))
    })();
    match result {
        Ok(done) => {
            fsutil::commit_tmp(&tmp, path)?;
            Ok(done)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
