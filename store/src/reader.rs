//! Reading activation shards: memory-mapped, zero-copy views.
//!
//! A [`Shard`] maps its file and decodes the single record batch in place: the `doc`, `pos`,
//! `token`, `act` and `grad` slices it hands out point into the mapping (checked by
//! [`Shard::is_zero_copy`]). Shards are immutable once listed, so the mapping never changes under
//! a reader.

use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, UInt32Type};
use arrow_array::{Array, RecordBatch};
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_ipc::convert::try_fb_to_schema;
use arrow_ipc::reader::{FileDecoder, read_footer_length};
use arrow_ipc::root_as_footer;
use arrow_schema::{DataType, Fields, Schema};
use half::f16;
use memmap2::Mmap;

use crate::manifest::{HookSpec, ShardEntry};
use crate::schema::{ACT, DOC, GRAD, POS, TOKEN, check_schema};
use crate::store::Store;
use crate::values::ValuesRef;

/// The shards of one hook, as listed in the manifest.
#[derive(Clone, Debug)]
pub struct Activations {
    hook: String,
    dir: PathBuf,
    spec: HookSpec,
    shards: Vec<ShardEntry>,
}

impl Store {
    /// The activation table of `hook`; the error lists the hooks the store holds.
    pub fn activations(&self, hook: &str) -> Result<Activations> {
        let manifest = self.manifest();
        let Some(entry) = manifest.hooks.get(hook) else {
            let known: Vec<&str> = manifest.hooks.keys().map(String::as_str).collect();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            bail!("store {} has no activations for hook {hook} (it has: {known})", self.root().display());
        };
        Ok(Activations {
            hook: hook.to_string(),
            dir: self.root().join("activations").join(hook),
            spec: entry.spec,
            shards: entry.shards.clone(),
        })
    }
}

impl Activations {
    pub fn hook(&self) -> &str {
        &self.hook
    }
    pub fn spec(&self) -> HookSpec {
        self.spec
    }
    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
    pub fn shard_entries(&self) -> &[ShardEntry] {
        &self.shards
    }
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }
    pub fn shard_path(&self, i: usize) -> PathBuf {
        self.dir.join(&self.shards[i].file)
    }
    /// Map and decode shard `i`, checking it against the manifest (size, schema, rows).
    pub fn open_shard(&self, i: usize) -> Result<Shard> {
        Shard::open(&self.shard_path(i), &self.shards[i], &self.spec)
    }
}

/// Column values borrowed from the mapping.
#[derive(Clone, Debug)]
enum VectorColumn {
    F16(ScalarBuffer<f16>),
    F32(ScalarBuffer<f32>),
}

impl VectorColumn {
    fn view(&self) -> ValuesRef<'_> {
        match self {
            VectorColumn::F16(b) => ValuesRef::F16(b),
            VectorColumn::F32(b) => ValuesRef::F32(b),
        }
    }
}

/// One memory-mapped shard.
#[derive(Clone, Debug)]
pub struct Shard {
    map: Arc<Mmap>,
    rows: usize,
    d: usize,
    doc: ScalarBuffer<u32>,
    pos: ScalarBuffer<u32>,
    token: ScalarBuffer<u32>,
    act: VectorColumn,
    grad: Option<VectorColumn>,
}

impl Shard {
    /// Map `path` and check it against its manifest entry and the hook's spec.
    pub fn open(path: &Path, entry: &ShardEntry, spec: &HookSpec) -> Result<Shard> {
        let name = path.display();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("shard {name} is listed in the manifest but the file is missing")
            }
            Err(e) => return Err(e).with_context(|| format!("cannot stat shard {name}")),
        };
        if meta.len() != entry.bytes {
            bail!(
                "shard {name} is {} bytes but the manifest says {} (truncated or replaced)",
                meta.len(),
                entry.bytes
            );
        }
        let file = std::fs::File::open(path).with_context(|| format!("cannot open shard {name}"))?;
        // SAFETY: listed shards are immutable (written under a temporary name, then renamed); the
        // store never modifies or truncates them in place.
        let map = Arc::new(unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map shard {name}"))?);
        // The first time this process maps the shard, its bytes are checked against the manifest
        // (before decoding, so that corruption is named as such), and after decoding every value
        // must be finite (the writer refuses others; a shard edited afterwards may hold some).
        let first = !crate::fsutil::already_checked(path, entry.bytes, &entry.xxh3);
        if first {
            crate::fsutil::check_bytes(path, &map, entry.bytes, &entry.xxh3)?;
        }
        // Large page-cache folios mapped with huge pages cut the TLB misses of the sampler's row
        // gathers (~1.4x warm-cache throughput, BENCHMARKS.md). A hint: failure is harmless.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let batch =
            decode_single_batch(&map).map_err(|e| anyhow!("shard {name} is not a valid shard: {e}"))?;
        check_schema(&batch.schema(), spec)
            .map_err(|e| anyhow!("shard {name} does not match its hook: {e}"))?;
        if batch.num_rows() as u64 != entry.rows {
            bail!("shard {name} has {} rows but the manifest says {}", batch.num_rows(), entry.rows);
        }
        let u32_col = |col: &str| {
            batch.column_by_name(col).expect("checked").as_primitive::<UInt32Type>().values().clone()
        };
        let vectors = |col: &str| -> Option<VectorColumn> {
            let list = batch.column_by_name(col)?.as_fixed_size_list();
            let values = list.values().slice(list.offset() * spec.d as usize, list.len() * spec.d as usize);
            Some(match spec.dtype {
                crate::DType::F16 => VectorColumn::F16(values.as_primitive::<Float16Type>().values().clone()),
                crate::DType::F32 => VectorColumn::F32(values.as_primitive::<Float32Type>().values().clone()),
            })
        };
        let shard = Shard {
            rows: batch.num_rows(),
            d: spec.d as usize,
            doc: u32_col(DOC),
            pos: u32_col(POS),
            token: u32_col(TOKEN),
            act: vectors(ACT).expect("checked"),
            grad: vectors(GRAD),
            map,
        };
        if first {
            shard.check_finite(path)?;
            crate::fsutil::mark_checked(path, entry.bytes, &entry.xxh3);
        }
        Ok(shard)
    }

    /// The whole file, as mapped.
    pub fn file_bytes(&self) -> &[u8] {
        &self.map
    }

    /// Refuse a non-finite activation or gradient, naming the shard (at `path`) and the row;
    /// [`Shard::open`] does this the first time a process maps the shard.
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        let columns = [("activation", Some(&self.act)), ("gradient", self.grad.as_ref())];
        for (what, column) in columns.into_iter().filter_map(|(w, c)| c.map(|c| (w, c))) {
            if let Some(i) = column.view().first_non_finite() {
                bail!(
                    "shard {} row {} holds a non-finite {what} ({}): the shard changed after it was written",
                    path.display(),
                    i / self.d,
                    column.view().get_f32(i)
                );
            }
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn d(&self) -> usize {
        self.d
    }
    pub fn doc(&self) -> &[u32] {
        &self.doc
    }
    pub fn pos(&self) -> &[u32] {
        &self.pos
    }
    pub fn token(&self) -> &[u32] {
        &self.token
    }
    /// All activation rows, flat `[rows * d]`.
    pub fn act(&self) -> ValuesRef<'_> {
        self.act.view()
    }
    /// All gradient rows, when the hook has them.
    pub fn grad(&self) -> Option<ValuesRef<'_>> {
        self.grad.as_ref().map(VectorColumn::view)
    }

    /// Whether every column is a view into the file mapping (no copy was made on open).
    pub fn is_zero_copy(&self) -> bool {
        let range = self.map.as_ptr_range();
        let inside = |bytes: &[u8]| {
            bytes.is_empty() || (range.contains(&bytes.as_ptr()) && bytes.as_ptr_range().end <= range.end)
        };
        inside(bytemuck::cast_slice(&self.doc))
            && inside(bytemuck::cast_slice(&self.pos))
            && inside(bytemuck::cast_slice(&self.token))
            && inside(self.act().as_bytes())
            && self.grad().is_none_or(|g| inside(g.as_bytes()))
    }

    /// Ask the CPU to start loading activation row `r` into cache (no effect on other targets).
    #[inline]
    pub fn prefetch_row(&self, r: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let bytes = self.act().as_bytes();
            let row = bytes.len() / self.rows.max(1);
            let start = bytes[r * row..].as_ptr();
            for line in (0..row).step_by(64) {
                // SAFETY: prefetch is a hint and never faults; the address is inside the row.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        start.add(line).cast(),
                    )
                };
            }
        }
    }
}

/// Check the record batch message's buffer ranges and lengths before arrow-ipc decodes it: arrow
/// slices buffers at the offsets the file claims and panics if they lie outside the block, so a
/// corrupt byte there must become an error here instead.
fn check_message(block: &[u8], meta_len: usize, schema: &Schema) -> Result<()> {
    if meta_len < 8 || meta_len > block.len() {
        bail!("bad metadata length {meta_len}");
    }
    let body_len = (block.len() - meta_len) as i64;
    let meta = &block[..meta_len];
    let flatbuffer = if meta[..4] == [0xff; 4] { &meta[8..] } else { &meta[4..] };
    let message =
        arrow_ipc::root_as_message(flatbuffer).map_err(|e| anyhow!("unreadable batch metadata: {e}"))?;
    let batch = message.header_as_record_batch().ok_or_else(|| anyhow!("block is not a record batch"))?;
    if batch.compression().is_some() {
        bail!("compressed shards are not supported (Loupe writes uncompressed, zero-copy shards)");
    }
    if batch.length() < 0 {
        bail!("negative row count");
    }
    for buf in batch.buffers().into_iter().flatten() {
        let (offset, len) = (buf.offset(), buf.length());
        if offset < 0 || len < 0 || offset.checked_add(len).is_none_or(|end| end > body_len) {
            bail!("buffer [{offset}, +{len}) lies outside the record batch body ({body_len} bytes)");
        }
    }
    let nodes = batch.nodes().ok_or_else(|| anyhow!("record batch lists no columns"))?;
    for node in nodes {
        if node.length() < 0 || node.null_count() < 0 || node.null_count() > node.length() {
            bail!("bad column length {} or null count {}", node.length(), node.null_count());
        }
    }
    let buffers = batch.buffers().ok_or_else(|| anyhow!("record batch lists no buffers"))?;
    check_columns(schema.fields(), &mut nodes.iter(), &mut buffers.iter())
}

/// Walk the schema in the order of the batch's column nodes and buffers, for what arrow would
/// panic on: a fixed-size list whose `length × size` overflows, an offsets or values buffer
/// whose length is not a whole number of its elements. Only the column types Loupe writes are
/// accepted (its readers check the exact schema afterwards).
fn check_columns<'a>(
    fields: &Fields,
    nodes: &mut impl Iterator<Item = &'a arrow_ipc::FieldNode>,
    buffers: &mut impl Iterator<Item = &'a arrow_ipc::Buffer>,
) -> Result<()> {
    for field in fields {
        let name = field.name();
        let node = nodes.next().ok_or_else(|| anyhow!("fewer column nodes than columns"))?;
        // Each buffer of this column, in order, with the width of its elements.
        let mut expect = |widths: &[i64]| -> Result<()> {
            for width in widths {
                let buffer = buffers.next().ok_or_else(|| anyhow!("column {name} is missing buffers"))?;
                if buffer.length() % width != 0 {
                    bail!(
                        "column {name} has a buffer of {} bytes, not of {width}-byte values",
                        buffer.length()
                    );
                }
            }
            Ok(())
        };
        match field.data_type() {
            DataType::FixedSizeList(child, size) => {
                if *size < 0 || i64::from(*size).checked_mul(node.length()).is_none() {
                    bail!("column {name} has {} lists of {size} values", node.length());
                }
                expect(&[1])?;
                check_columns(&Fields::from(vec![child.clone()]), nodes, buffers)?;
            }
            DataType::List(child) => {
                expect(&[1, 4])?;
                check_columns(&Fields::from(vec![child.clone()]), nodes, buffers)?;
            }
            DataType::Utf8 => expect(&[1, 4, 1])?,
            DataType::Boolean => expect(&[1, 1])?,
            t if t.is_numeric() => expect(&[1, t.primitive_width().expect("numeric") as i64])?,
            other => bail!("column {name} has a type Loupe never writes ({other})"),
        }
    }
    Ok(())
}

/// Decode the record batches of an Arrow IPC file held in `map`, without copying.
///
/// Hand-written over arrow-ipc's `FileDecoder` because arrow's `FileReader` reads through
/// `Read + Seek` into fresh buffers; this is the zero-copy path arrow documents for mmap.
pub(crate) fn decode_batches(map: &Arc<Mmap>) -> Result<Vec<RecordBatch>> {
    let len = map.len();
    if len < 10 + 8 {
        bail!("file is too short to be an Arrow IPC file ({len} bytes)");
    }
    let ptr = NonNull::new(map.as_ptr() as *mut u8).ok_or_else(|| anyhow!("empty mapping"))?;
    // SAFETY: the pointer and length describe the mapping, which `owner` keeps alive.
    let buffer = unsafe { Buffer::from_custom_allocation(ptr, len, map.clone()) };
    let trailer: [u8; 10] = buffer[len - 10..].try_into().expect("10 bytes");
    let footer_len = read_footer_length(trailer)?;
    if footer_len + 10 > len {
        bail!("footer length {footer_len} exceeds the file size {len}");
    }
    let footer = root_as_footer(&buffer[len - 10 - footer_len..len - 10])
        .map_err(|e| anyhow!("unreadable footer: {e}"))?;
    let schema = footer.schema().ok_or_else(|| anyhow!("footer has no schema"))?;
    let schema = Arc::new(try_fb_to_schema(schema)?);
    let decoder = FileDecoder::new(schema.clone(), footer.version()).with_require_alignment(true);
    let blocks = footer.recordBatches().ok_or_else(|| anyhow!("footer lists no record batches"))?;
    let mut batches = Vec::with_capacity(blocks.len());
    for block in blocks.iter() {
        let start = usize::try_from(block.offset()).map_err(|_| anyhow!("negative block offset"))?;
        let block_len = usize::try_from(block.metaDataLength())
            .ok()
            .zip(usize::try_from(block.bodyLength()).ok())
            .and_then(|(m, b)| m.checked_add(b))
            .ok_or_else(|| anyhow!("bad block length"))?;
        if start.checked_add(block_len).is_none_or(|end| end > len - 10 - footer_len) {
            bail!("record batch block [{start}, +{block_len}) lies outside the file");
        }
        let data = buffer.slice_with_length(start, block_len);
        check_message(&data, block.metaDataLength() as usize, &schema)?;
        batches.push(
            decoder.read_record_batch(block, &data)?.ok_or_else(|| anyhow!("record batch block is empty"))?,
        );
    }
    Ok(batches)
}

/// The one record batch of the mapped Arrow IPC file `map` (see [`decode_batches`]).
pub(crate) fn decode_single_batch(map: &Arc<Mmap>) -> Result<RecordBatch> {
    let mut batches = decode_batches(map)?;
    if batches.len() != 1 {
        bail!("expected exactly one record batch, found {}", batches.len());
    }
    Ok(batches.remove(0))
}
