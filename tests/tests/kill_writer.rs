//! A writer killed at any point (SIGKILL) leaves a store that verifies and holds only complete
//! shards; the next writer cleans up and carries on.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use loupe_store::Store;
use loupe_tests::{HOOK, loupe, stderr};

#[test]
fn killed_writer_leaves_only_complete_shards() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let shard_rows = 2048;
    let mut saw_partial_write = false;
    // Kill at different moments: right as a shard write starts, and a little later.
    for (round, delay_ms) in [0u64, 0, 1, 3, 0, 5].into_iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_slow_writer"))
            .args([store.to_str().unwrap(), &shard_rows.to_string(), "512"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it commit one shard, then kill it when the next write begins.
        assert_eq!(lines.find(|l| l.as_deref().unwrap() == "committed").unwrap().unwrap(), "committed");
        lines.find(|l| l.as_deref().unwrap() == "writing").unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();

        let hook_dir = store.join("activations").join(HOOK);
        saw_partial_write |= std::fs::read_dir(&hook_dir).unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".tmp")
        });
        let out = loupe(&["store", "verify", store.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "round {round}: killed writer left a store that fails verify: {}",
            stderr(&out)
        );

        let opened = Store::open(&store).unwrap();
        let entry = &opened.manifest().hooks[HOOK];
        assert!(entry.shards.len() > round, "round {round}: committed shards went missing");
        assert!(entry.shards.iter().all(|s| s.rows == shard_rows as u64), "a listed shard is partial");
        let acts = opened.activations(HOOK).unwrap();
        for i in 0..acts.num_shards() {
            assert_eq!(acts.open_shard(i).unwrap().rows(), shard_rows);
        }
    }
    // The next writer removes leftovers of the interrupted writes.
    drop(Store::open_rw(&store).unwrap());
    let leftovers: Vec<_> = std::fs::read_dir(store.join("activations").join(HOOK))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files survived a writer open: {leftovers:?}");
    eprintln!("a kill landed inside a shard write at least once: {saw_partial_write}");
}
