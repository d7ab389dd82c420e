//! Bad stores get one clear error line and a non-zero exit from `loupe store info|verify`, and the
//! failing command changes nothing on disk.

use std::path::Path;

use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{HOOK, loupe, snapshot, stderr, write_synthetic};

const SPEC: HookSpec = HookSpec { d: 12, dtype: DType::F16, grad: true };

/// A small valid store with 3 shards.
fn make_store(dir: &Path) {
    write_synthetic(&Store::create(dir).unwrap(), HOOK, SPEC, 3, 20, 25, 11);
    let out = loupe(&["store", "verify", dir.to_str().unwrap()]);
    assert!(out.status.success(), "fresh store does not verify: {}", stderr(&out));
}

fn shard(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join("activations").join(HOOK).join(format!("{i:05}.arrow"))
}

/// Run `loupe store <cmd> <dir>`; expect failure with exactly one line containing `expect`
/// (verify may add `note:` lines), and no change to the store's files.
fn expect_failure(cmd: &str, dir: &Path, expect: &str) {
    let before = dir.exists().then(|| snapshot(dir));
    let out = loupe(&["store", cmd, dir.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "store {cmd} succeeded on a bad store");
    assert_eq!(out.status.code(), Some(1));
    let errors: Vec<&str> = err.lines().filter(|l| !l.starts_with("note: ")).collect();
    assert_eq!(errors.len(), 1, "expected one error line from store {cmd}, got:\n{err}");
    assert!(errors[0].starts_with("error: ") && errors[0].contains(expect), "store {cmd}: {err}");
    assert_eq!(before, dir.exists().then(|| snapshot(dir)), "store {cmd} changed the store");
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn truncated_shard() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path());
    let path = shard(dir.path(), 1);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::File::options().write(true).open(&path).unwrap().set_len(len - 100).unwrap();
    for cmd in ["info", "verify"] {
        expect_failure(cmd, dir.path(), "truncated or replaced");
    }
}

#[test]
fn flipped_byte_is_caught_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path());
    let path = shard(dir.path(), 0);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    expect_failure("verify", dir.path(), "checksum");
}

#[test]
fn flipped_bytes_anywhere_never_crash_verify() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path());
    let path = shard(dir.path(), 2);
    let clean = std::fs::read(&path).unwrap();
    // Readers do not hash, so a flip may go unnoticed, but it must never panic: every byte, several
    // patterns, including the Arrow metadata, footer and trailer.
    for at in 0..clean.len() {
        for flip in [0x01, 0x80, 0xA5, 0xFF] {
            let mut bytes = clean.clone();
            bytes[at] ^= flip;
            std::fs::write(&path, &bytes).unwrap();
            let _ = Store::open(dir.path()).unwrap().activations(HOOK).unwrap().open_shard(2);
        }
    }
    // And through the command, every 7th byte.
    for at in (0..clean.len()).step_by(7) {
        let mut bytes = clean.clone();
        bytes[at] ^= 0xA5;
        std::fs::write(&path, &bytes).unwrap();
        let out = loupe(&["store", "verify", dir.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "byte {at}: {}", stderr(&out));
        assert!(stderr(&out).contains("checksum"), "byte {at}: {}", stderr(&out));
    }
}

#[test]
fn shard_with_wrong_width() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path());
    // A well-formed shard of width 16 under a manifest entry that is consistent in size and
    // checksum: only the schema check can notice.
    let other = tempfile::tempdir().unwrap();
    write_synthetic(&Store::create(other.path()).unwrap(), HOOK, HookSpec { d: 16, ..SPEC }, 1, 25, 25, 12);
    let foreign = Store::open(other.path()).unwrap().manifest().hooks[HOOK].shards[0].clone();
    std::fs::copy(shard(other.path(), 0), shard(dir.path(), 0)).unwrap();
    edit_manifest(dir.path(), |m| {
        let entry = &mut m["hooks"][HOOK]["shards"][0];
        entry["bytes"] = foreign.bytes.into();
        entry["xxh3"] = foreign.xxh3.clone().into();
    });
    expect_failure("verify", dir.path(), "column act has width 16, but the manifest says d = 12");
}

#[test]
fn manifest_naming_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path());
    std::fs::remove_file(shard(dir.path(), 2)).unwrap();
    for cmd in ["info", "verify"] {
        expect_failure(cmd, dir.path(), "is listed in the manifest but the file is missing");
    }
}

#[test]
fn unknown_store_version() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path());
    edit_manifest(dir.path(), |m| m["version"] = 99.into());
    for cmd in ["info", "verify"] {
        expect_failure(cmd, dir.path(), "store version 99");
    }
    // A writer refuses it too, before touching anything.
    let before = snapshot(dir.path());
    assert!(Store::open_rw(dir.path()).is_err());
    assert_eq!(before, snapshot(dir.path()));
}

#[test]
fn malformed_manifest() {
    let dir = tempfile::tempdir().unwrap();
    make_store(dir.path());
    std::fs::write(
        dir.path().join("manifest.json"),
        b"{\"format\": \"loupe-store\", \"version\": 1, \"hooks\": 7",
    )
    .unwrap();
    expect_failure("info", dir.path(), "manifest.json is not valid JSON");
    edit_manifest_raw(
        dir.path(),
        r#"{"format": "loupe-store", "version": 1, "hooks": {"../x": {"d": 4, "dtype": "f16", "grad": false, "shards": []}}}"#,
    );
    expect_failure("verify", dir.path(), "invalid hook name");
}

fn edit_manifest_raw(dir: &Path, text: &str) {
    std::fs::write(dir.join("manifest.json"), text).unwrap();
}

#[test]
fn non_existent_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    for cmd in ["info", "verify"] {
        expect_failure(cmd, &missing, "directory does not exist");
    }
    assert!(!missing.exists());
    expect_failure("info", dir.path(), "manifest.json is missing");
}

#[test]
fn create_refuses_a_folder_that_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    let before = snapshot(dir.path());
    let err = Store::create(dir.path()).err().expect("created a store over foreign files");
    assert!(format!("{err:#}").contains("is not empty"), "{err:#}");
    assert_eq!(before, snapshot(dir.path()));
}
