//! Activation shards (Arrow IPC files), as every reader of a store maps them (`Shard::open`
//! against the manifest's entry, whose checksum matches the input, and the hook's spec), then
//! every row read back.
//! The first four bytes are the spec and the entry: d (1..=255), flags (bit 0: f32, else f16;
//! bit 1: with grad), rows (u16, little-endian); the rest is the shard file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loupe_fuzz::{put, scratch};
use loupe_store::manifest::{DType, HookSpec, ShardEntry};
use loupe_store::reader::Shard;

fuzz_target!(|data: &[u8]| {
    let [d, flags, r0, r1, file @ ..] = data else { return };
    let spec = HookSpec {
        d: u32::from(*d).max(1),
        dtype: if flags & 1 == 1 { DType::F32 } else { DType::F16 },
        grad: flags & 2 == 2,
    };
    let path = scratch().join("shard-000000.arrow");
    put(&path, file);
    let entry = ShardEntry {
        file: "shard-000000.arrow".into(),
        rows: u64::from(u16::from_le_bytes([*r0, *r1])),
        bytes: file.len() as u64,
        // The listing matches the bytes (an edited store whose checksums were updated), so the
        // input reaches the decoder past the first-read checksum check.
        xxh3: loupe_store::fsutil::file_xxh3(&path).expect("hash the scratch file"),
    };
    let Ok(shard) = Shard::open(&path, &entry, &spec) else { return };
    assert!(shard.is_zero_copy());
    let d = shard.d();
    let mut sum = 0f32;
    for r in 0..shard.rows() {
        shard.prefetch_row(r);
        let _ = (shard.doc()[r], shard.pos()[r], shard.token()[r]);
        sum += shard.act().row(r, d).to_f32().iter().sum::<f32>();
        if let Some(grad) = shard.grad() {
            sum += grad.row(r, d).to_f32().iter().sum::<f32>();
        }
    }
    std::hint::black_box(sum);
});
