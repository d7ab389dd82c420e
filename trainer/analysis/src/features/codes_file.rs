//! Every analysed row's sparse codes, spilled to a temporary file during the pass and mapped
//! afterwards, so that example windows and co-occurrence read the exact codes of the one
//! encoding pass instead of encoding again.
//!
//! Layout: `(feature u32, value f32)` pairs, row after row; the row offsets stay in memory.
//! The file is named `*.tmp` inside the store (removed by the next writer if a run dies) and
//! deleted when the [`CodesFile`] is dropped.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use memmap2::Mmap;

use loupe_dict::Codes;

/// Appends chunks of codes.
pub struct CodesWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    offsets: Vec<u64>,
}

impl CodesWriter {
    pub fn create(path: &Path) -> Result<CodesWriter> {
        // Read access too: the file is mapped once written.
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(CodesWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            offsets: vec![0],
        })
    }

    pub fn append(&mut self, codes: &Codes) -> Result<()> {
        let base = *self.offsets.last().expect("starts with 0");
        let mut buf = Vec::with_capacity(codes.nnz() * 8);
        for (&f, &v) in codes.feature.iter().zip(&codes.value) {
            buf.extend_from_slice(&f.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        self.out.write_all(&buf).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.offsets.extend(codes.offsets[1..].iter().map(|&o| base + u64::from(o)));
        Ok(())
    }

    /// Finish writing and map the file.
    pub fn finish(self) -> Result<CodesFile> {
        let name = self.path.display().to_string();
        let file = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {name}"))?;
        let len = file.metadata()?.len();
        // SAFETY: the file is private to this run (a fresh temporary name) and no longer written.
        let map = if len == 0 {
            None
        } else {
            Some(unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {name}"))?)
        };
        Ok(CodesFile { path: self.path, map, offsets: self.offsets })
    }
}

/// The mapped codes of every analysed row.
pub struct CodesFile {
    path: PathBuf,
    map: Option<Mmap>,
    offsets: Vec<u64>,
}

impl CodesFile {
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Active features of `row`.
    pub fn row(&self, row: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let (a, b) = (self.offsets[row] as usize * 8, self.offsets[row + 1] as usize * 8);
        let bytes = self.map.as_deref().map_or(&[][..], |m| &m[a..b]);
        bytes.chunks_exact(8).map(|e| {
            (
                u32::from_le_bytes(e[..4].try_into().expect("4")),
                f32::from_le_bytes(e[4..].try_into().expect("4")),
            )
        })
    }

    /// Feature `f`'s activation on `row` (0 when inactive).
    pub fn activation(&self, row: usize, f: u32) -> f32 {
        self.row(row).find(|e| e.0 == f).map_or(0.0, |e| e.1)
    }

    /// Mean number of active features per row.
    pub fn mean_active(&self) -> f64 {
        *self.offsets.last().expect("nonempty") as f64 / self.rows().max(1) as f64
    }
}

impl Drop for CodesFile {
    fn drop(&mut self) {
        self.map = None;
        let _ = std::fs::remove_file(&self.path);
    }
}
