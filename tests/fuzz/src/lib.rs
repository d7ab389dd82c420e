//! What the fuzz targets share: an allocator that turns any single allocation over
//! [`MAX_ALLOCATION`] into a crash (a size read from a file must be checked before anything is
//! allocated from it), a scratch folder for the files a parser reads, and a way to cut one fuzz
//! input into the several files some parsers read together.
//!
//! Each target in `fuzz_targets/` writes its input where the `loupe` command would find the file
//! and calls the same entry point the command calls; an `Err` is a correct answer, a panic, an
//! abort, a crash or an allocation over the cap is a bug.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The largest single allocation a parser may make from a fuzz input (inputs are at most a few
/// hundred KiB, so anything near this size came from a size field that was not checked).
pub const MAX_ALLOCATION: usize = 256 << 20;

/// The system allocator, with [`MAX_ALLOCATION`] as a hard cap per allocation.
pub struct Capped;

fn too_big(layout: Layout) -> ! {
    // Nothing here allocates: stderr is unbuffered and the integer formats in place. Then abort:
    // libFuzzer reports it as a crash and saves the input.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "loupe-fuzz: an allocation of {} bytes (over the cap: a size read from the input was not checked)",
        layout.size()
    );
    std::process::abort()
}

// SAFETY: forwards to `System`, only refusing large layouts.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            too_big(layout)
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            too_big(layout)
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            too_big(layout)
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// This process's scratch folder (in /dev/shm when there is one: the targets write a file per
/// run), created empty on first use.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("loupe-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

/// A fresh, empty folder `name` inside [`scratch`].
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch subfolder");
    dir
}

/// Write `bytes` to `path`, panicking on an I/O error of the scratch folder (not a finding).
pub fn put(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write to the scratch folder");
}

/// Cut `data` into a first part of the length given by its first two bytes (little-endian,
/// capped to what is there) and the rest: how targets that read two files take one input.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (&[], data);
    }
    let len = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    data[2..].split_at(len)
}

/// The input format [`split2`] reads: `first` then `rest`.
pub fn join2(first: &[u8], rest: &[u8]) -> Vec<u8> {
    let len = u16::try_from(first.len()).expect("first part under 64 KiB");
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(rest);
    out
}

pub mod analysis;
