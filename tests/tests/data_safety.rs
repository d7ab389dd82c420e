//! The store's safety promises under hostile input (issue 18): a name that becomes a path is
//! checked before anything touches the disk, and no command deletes what it did not write; a
//! rewrite (`analyze`, explanations) survives a kill at every write and a full disk; files are
//! checked against the manifest when a run first reads them (bytes, then finite values); sizes
//! read from files are checked before anything is allocated from them; removing a dictionary
//! takes what was made from it along. Every test that could delete folders runs in a sandbox
//! (a temporary folder holding the store and a bystander file beside it).

use std::path::{Path, PathBuf};
use std::process::Command;

use loupe_store::{FeatureTables, Store};
use loupe_tests::planted::{HOOK, planted_store, planted_values};
use loupe_tests::{assert_one_error, loupe, loupe_bin, snapshot, stderr};

/// A sandbox: `<tmp>/outer/bystander.txt` and the planted store at `<tmp>/outer/store`.
fn sandbox() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let outer = tmp.path().join("outer");
    std::fs::create_dir_all(&outer).unwrap();
    std::fs::write(outer.join("bystander.txt"), "not Loupe's").unwrap();
    let store = outer.join("store");
    drop(planted_store(&store, &planted_values()));
    (tmp, store)
}

fn train_args(store: &str, name: &str) -> Vec<String> {
    [
        "train-sae",
        "--store",
        store,
        "--hook",
        HOOK,
        "--name",
        name,
        "--n-features",
        "16",
        "--k",
        "2",
        "--batch",
        "100",
        "--tokens",
        "400",
        "--eval-tokens",
        "200",
        "--eval-contexts",
        "0",
    ]
    .map(str::to_string)
    .to_vec()
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    loupe(&refs)
}

/// The repro of the data loss: `--name ..` deleted the store, `../..` the folder holding it,
/// `.` and `""` every dictionary. Each name is refused with one line and nothing changes.
#[test]
fn dictionary_names_that_are_paths_are_refused_before_the_disk_is_touched() {
    let (tmp, store) = sandbox();
    let s = store.to_str().unwrap();
    let outer = store.parent().unwrap().to_path_buf();
    let before = snapshot(tmp.path());
    let absolute = outer.to_str().unwrap().to_string();
    for name in ["..", "../..", ".", "", absolute.as_str(), "a/b", "sae/../..", "x\0y"] {
        for command in ["train-sae", "train-monet"] {
            let mut args = train_args(s, name);
            args[0] = command.to_string();
            if command == "train-monet" {
                // Monet's own flags; the name is checked before any of them matters.
                args.truncate(7);
            }
            if name.contains('\0') {
                continue; // argv cannot carry a NUL; the library check below covers it
            }
            let out = run(&args);
            let err = stderr(&out);
            assert!(!out.status.success(), "{command} --name {name:?} succeeded");
            assert_eq!(err.lines().count(), 1, "{command} --name {name:?}: {err}");
            assert!(err.contains("invalid dictionary name"), "{command} --name {name:?}: {err}");
            assert_eq!(before, snapshot(tmp.path()), "{command} --name {name:?} changed the sandbox");
        }
    }
    assert!(loupe_store::dictionaries::check_dictionary_name("x\0y").is_err());
    // The same names through `store remove-dictionary` and `import`.
    for name in ["..", "../..", ".", ""] {
        let out = loupe(&["store", "remove-dictionary", s, name]);
        assert!(!out.status.success());
        assert_eq!(before, snapshot(tmp.path()), "remove-dictionary {name:?} changed the sandbox");
    }
}

/// Unlisted files under `dictionaries/<name>/`: Loupe's own leftovers (a run killed before its
/// first checkpoint) are cleared; anything else makes the run refuse, and stays.
#[test]
fn unlisted_dictionary_folders_are_cleared_only_of_loupes_own_files() {
    let (_tmp, store) = sandbox();
    let s = store.to_str().unwrap();
    let foreign = store.join("dictionaries/mine");
    std::fs::create_dir_all(foreign.join("checkpoints/step-00000001")).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    std::fs::write(foreign.join("checkpoints/step-00000001/cfg.json"), "{}").unwrap();
    let out = run(&train_args(s, "mine"));
    assert!(!out.status.success(), "trained over a folder holding a user's file");
    assert!(stderr(&out).contains("notes.txt"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(foreign.join("notes.txt")).unwrap(), "mine");
    assert!(foreign.join("checkpoints/step-00000001/cfg.json").exists());

    let leftover = store.join("dictionaries/left");
    std::fs::create_dir_all(leftover.join("checkpoints/step-00000003")).unwrap();
    for f in ["cfg.json", "sae_weights.safetensors", "checkpoints/step-00000003/state.json"] {
        std::fs::write(leftover.join(f), "half-written").unwrap();
    }
    let out = run(&train_args(s, "left"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!leftover.join("checkpoints").exists());
    let verify = loupe(&["store", "verify", s]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

/// After `store remove-dictionary`, a new dictionary of the same name starts with no analysis
/// and no explanations: nothing of the old one is served for it.
#[test]
fn removing_a_dictionary_removes_its_analysis_and_explanations() {
    let (_tmp, store) = sandbox();
    let s = store.to_str().unwrap();
    let out = loupe(&["analyze", "--store", s, "--dictionary", "sae", "--top", "3", "--rows", "all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = loupe(&["explain", "--store", s, "--dictionary", "sae", "--features", "0..3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Store::open(&store).unwrap().manifest();
    assert!(m.features.contains_key("sae") && m.explanations.contains_key("sae"));

    let out = loupe(&["store", "remove-dictionary", s, "sae"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = Store::open(&store).unwrap().manifest();
    assert!(m.dictionaries.is_empty() && m.features.is_empty() && m.explanations.is_empty());
    for dir in ["dictionaries/sae", "features/sae", "explanations/sae", "index/sae"] {
        let left = loupe_store::fsutil::files_under(&store.join(dir)).unwrap();
        assert!(left.is_empty(), "{dir} still holds {left:?}");
    }
    let verify = loupe(&["store", "verify", s]);
    assert!(verify.status.success(), "{}", stderr(&verify));

    let out = run(&train_args(s, "sae"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_one_error(&store, &["feature", "--store", s, "--dictionary", "sae", "0"], "no analysis");
}

/// Every file of a listed analysis, with its bytes.
fn listed_analysis(store: &Path) -> Vec<(String, Vec<u8>)> {
    let entry = Store::open(store).unwrap().features("sae").expect("an analysis is listed");
    entry.files.iter().map(|f| (f.file.clone(), std::fs::read(store.join(&f.file)).unwrap())).collect()
}

fn analyze(store: &Path, top: &str) -> Command {
    let mut cmd = Command::new(loupe_bin());
    cmd.args(["analyze", "--store", store.to_str().unwrap(), "--dictionary", "sae", "--rows", "all"]);
    cmd.args(["--top", top]);
    cmd
}

/// A kill at every write of `analyze`'s write phase (and before it) leaves the previous analysis
/// listed, intact and readable, and `store verify` green; the run after that succeeds.
#[test]
fn analyze_survives_a_kill_at_every_write() {
    let (_tmp, store) = sandbox();
    let out = analyze(&store, "3").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let first = listed_analysis(&store);
    let mut killed = 0;
    for writes in 0.. {
        let out = analyze(&store, "5").env("LOUPE_CRASH_AFTER_WRITES", writes.to_string()).output().unwrap();
        let verify = loupe(&["store", "verify", store.to_str().unwrap()]);
        assert!(verify.status.success(), "kill after {writes} writes: {}", stderr(&verify));
        if out.status.success() {
            break;
        }
        assert!(out.status.code().is_none(), "kill after {writes} writes: {}", stderr(&out));
        killed += 1;
        assert_eq!(first, listed_analysis(&store), "kill after {writes} writes changed the listed analysis");
        FeatureTables::open(&Store::open(&store).unwrap(), "sae").unwrap();
    }
    assert!(killed >= 7, "only {killed} kill points: the write phase was not covered");
    let tables = FeatureTables::open(&Store::open(&store).unwrap(), "sae").unwrap();
    assert_eq!(tables.top_examples(0).unwrap().len(), 5, "the run after the kills is listed");
    // Nothing of the killed runs or of the first analysis is left behind.
    let listed: Vec<String> = listed_analysis(&store).into_iter().map(|(f, _)| f).collect();
    for dir in ["features", "index"] {
        for f in loupe_store::fsutil::files_under(&store.join(dir)).unwrap() {
            assert!(listed.contains(&format!("{dir}/{f}")), "{dir}/{f} is left over (listed: {listed:?})");
        }
    }
}

/// A full disk (a small tmpfs) at any point of `analyze` leaves the previous analysis listed and
/// `store verify` green, with one error line. Needs root for the mount; skipped otherwise.
#[test]
fn analyze_on_a_full_disk_keeps_the_previous_analysis() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"]).arg(&mnt).output();
    if !mounted.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let store = mnt.join("store");
    drop(planted_store(&store, &planted_values()));
    let out = analyze(&store, "3").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let first = listed_analysis(&store);
    let size: usize = first.iter().map(|(_, b)| b.len()).sum();
    let filler = mnt.join("filler");
    let mut failures = 0;
    // Leave less and less room: from more than an analysis needs down to nothing.
    for step in 0..12 {
        let _ = std::fs::remove_file(&filler);
        let free = free_bytes(&mnt);
        let room = size * 2 * (11 - step) / 11;
        std::fs::write(&filler, vec![1u8; free.saturating_sub(room as u64) as usize]).ok();
        let out = analyze(&store, "5").output().unwrap();
        let _ = std::fs::remove_file(&filler);
        let verify = loupe(&["store", "verify", store.to_str().unwrap()]);
        assert!(verify.status.success(), "room {room}: {}", stderr(&verify));
        if !out.status.success() {
            failures += 1;
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "room {room}: {err}");
            assert!(err.starts_with("error: "), "room {room}: {err}");
            let listed = listed_analysis(&store);
            assert!(listed == first || FeatureTables::open(&Store::open(&store).unwrap(), "sae").is_ok());
        }
    }
    assert!(failures > 0, "the disk never filled: the test did not test a full disk");
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

/// Flip one byte of a listed shard: `train-sae` and `analyze` refuse it with the file named
/// (before, only `store verify` noticed).
#[test]
fn runs_refuse_a_shard_that_no_longer_matches_its_checksum() {
    let (_tmp, store) = sandbox();
    let s = store.to_str().unwrap();
    let shard = store.join("activations").join(HOOK).join("00001.arrow");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();
    assert_one_error(&store, &run_args(&train_args(s, "new")), "does not match its checksum");
    assert_one_error(&store, &["analyze", "--store", s, "--dictionary", "sae", "--rows", "all"], "checksum");
}

fn run_args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A non-finite value in a shard whose checksum was updated with it (an edited store): every
/// run names the shard and the row, for training rows and held-out rows alike.
#[test]
fn non_finite_activations_are_refused_with_shard_and_row() {
    for (value, row) in [(f32::NAN, 10usize), (f32::INFINITY, 1990)] {
        let (_tmp, store) = sandbox();
        let s = store.to_str().unwrap();
        // Row `row` of the planted store holds its values in columns 0..12; find the bytes of
        // one non-zero value of it in its shard and replace them.
        let values = planted_values();
        let f = values[row].iter().position(|&v| v > 0.0).unwrap();
        let (shard_index, in_shard) = (row / 700, row % 700);
        let shard = store.join("activations").join(HOOK).join(format!("{shard_index:05}.arrow"));
        let mut bytes = std::fs::read(&shard).unwrap();
        let needle = values[row][f].to_le_bytes();
        let hits: Vec<usize> =
            bytes.windows(4).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
        assert_eq!(hits.len(), 1, "value of row {row} not unique in its shard");
        bytes[hits[0]..hits[0] + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&shard, &bytes).unwrap();
        relist(&store, &shard);
        let needle = format!("{} row {in_shard} holds a non-finite activation", shard.display());
        assert_one_error(&store, &run_args(&train_args(s, "new")), &needle);
        assert_one_error(&store, &["analyze", "--store", s, "--dictionary", "sae", "--rows", "all"], &needle);
    }
}

/// Update the manifest's size and checksum of `file` to its current bytes (what an editor of a
/// store would do to slip a change past the checksums).
fn relist(store: &Path, file: &Path) {
    let path = store.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let name = file.file_name().unwrap().to_str().unwrap();
    let bytes = std::fs::read(file).unwrap();
    let xxh3 = loupe_store::fsutil::file_xxh3(file).unwrap();
    for shard in m["hooks"][HOOK]["shards"].as_array_mut().unwrap() {
        if shard["file"] == name {
            shard["xxh3"] = xxh3.clone().into();
            shard["bytes"] = (bytes.len() as u64).into();
        }
    }
    std::fs::write(path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Sizes from files are checked before anything is allocated from them: a manifest that claims
/// 4e9 features, and a feature range of 4e9 ids, fail at once with one line.
#[test]
fn huge_counts_from_files_and_flags_fail_before_allocating() {
    let (_tmp, store) = sandbox();
    let s = store.to_str().unwrap();
    let out = loupe(&["analyze", "--store", s, "--dictionary", "sae", "--rows", "all", "--top", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = loupe(&["explain", "--store", s, "--dictionary", "sae", "--features", "0..4000000000"]);
    let errors: Vec<String> =
        stderr(&out).lines().filter(|l| !l.starts_with("note: ")).map(str::to_string).collect();
    assert!(!out.status.success());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("the dictionary has features 0..12"), "{errors:?}");

    let path = store.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["features"]["sae"]["n_features"] = 4_000_000_000u32.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_one_error(&store, &["feature", "--store", s, "--dictionary", "sae", "0"], "4000000000 features");
    let verify = loupe(&["store", "verify", s]);
    assert!(!verify.status.success(), "verify accepted 4e9 features");
    assert!(stderr(&verify).contains("4000000000"), "{}", stderr(&verify));
}

/// A truncated or edited search index (`.hnsw.data`, `.hnsw.graph`) is refused with one line
/// naming the file, where hnsw_rs used to panic (exit 101) or exit 1 without a word. Needs the
/// fetched MiniLM model for the index.
#[test]
fn search_refuses_a_truncated_index() {
    let (_tmp, store) = sandbox();
    let s = store.to_str().unwrap();
    let out = loupe(&["analyze", "--store", s, "--dictionary", "sae", "--top", "3", "--rows", "all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = loupe(&["explain", "--store", s, "--dictionary", "sae", "--features", "0..6"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entry = Store::open(&store).unwrap().explanations_entry("sae").unwrap();
    let search = ["search", "--store", s, "--dictionary", "sae", "a token"];
    let out = loupe(&search);
    assert!(out.status.success(), "{}", stderr(&out));
    for ending in [".hnsw.data", ".hnsw.graph"] {
        let file = entry.files.iter().find(|f| f.file.ends_with(ending)).expect("the index is listed");
        let path = store.join(&file.file);
        let clean = std::fs::read(&path).unwrap();
        std::fs::write(&path, &clean[..clean.len() / 2]).unwrap();
        assert_one_error(&store, &search, &format!("{} is", path.display()));
        let mut edited = clean.clone();
        edited[clean.len() / 2] ^= 0x40;
        std::fs::write(&path, &edited).unwrap();
        assert_one_error(&store, &search, "checksum");
        std::fs::write(&path, &clean).unwrap();
    }
}
