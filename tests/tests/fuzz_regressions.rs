//! Inputs the fuzz targets (`tests/fuzz`, README "Fuzzing") found crashing a parser, kept in
//! `tests/fuzz/regressions/<target>/` in the target's input format and replayed here through
//! the same entry points: each must now be an error that says what is wrong.

use std::path::{Path, PathBuf};

use loupe_store::{DType, HookSpec, Shard, ShardEntry};

fn regression(rel: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Open `file` as a shard of `rows` rows of a hook with `spec` (as the shard target does).
fn open_shard(dir: &Path, file: &[u8], spec: HookSpec, rows: u64) -> String {
    let path: PathBuf = dir.join("shard-000000.arrow");
    std::fs::write(&path, file).unwrap();
    // Listed with its real checksum (as the target does), so that the input reaches the decoder.
    let xxh3 = loupe_store::fsutil::file_xxh3(&path).unwrap();
    let entry = ShardEntry { file: "shard-000000.arrow".into(), rows, bytes: file.len() as u64, xxh3 };
    match Shard::open(&path, &entry, &spec) {
        Ok(_) => panic!("the regression input opened as a shard"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn arrow_files_that_panicked_the_arrow_decoder_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // shard target: d, flags (bit 0 f32, bit 1 grad), rows (u16), then the file. Its `act`
    // column claimed lists whose length × size overflowed (arrow's `expect`).
    let input = regression("shard/fixed-size-list-length-overflow");
    let spec = HookSpec {
        d: u32::from(input[0]).max(1),
        dtype: if input[1] & 1 == 1 { DType::F32 } else { DType::F16 },
        grad: input[1] & 2 == 2,
    };
    let err = open_shard(dir.path(), &input[4..], spec, u64::from(u16::from_le_bytes([input[2], input[3]])));
    assert!(err.contains("lists of"), "{err}");

    // features target: table, n_features, then the file (a table, decoded by the same function
    // as shards): a union column made arrow slice past a buffer; a list's offsets
    // buffer that was not a whole number of offsets failed an assertion in arrow.
    let spec = HookSpec { d: 4, dtype: DType::F32, grad: false };
    for (input, expected) in [
        ("features/union-column", "a type Loupe never writes"),
        ("features/list-offsets-partial-value", "not of 4-byte values"),
    ] {
        let input = regression(input);
        let err = open_shard(dir.path(), &input[2..], spec, 0);
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn gguf_files_that_crashed_the_loader_are_errors() {
    // gguf target: the model file itself. A tensor whose dimensions multiply past usize (candle
    // multiplies unchecked), an empty one (candle views it through a misaligned pointer), and a
    // block count of billions (a 10 GB `Vec::with_capacity`).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    for (input, expected) in [
        ("gguf/tensor-shape-overflow", "impossible shape"),
        ("gguf/empty-tensor", "impossible shape"),
        ("gguf/huge-block-count", "does not fit a file of"),
    ] {
        std::fs::write(&path, regression(input)).unwrap();
        let err = format!("{:#}", loupe_model::load(&path).err().expect("the model loaded"));
        assert!(err.contains(expected), "{input}: {err}");
    }
}
