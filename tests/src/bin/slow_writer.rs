//! Test helper: appends rows to a store for ever, announcing each shard write on stdout, so that
//! a test can kill it at any point of a write (see tests/kill_writer.rs).
//!
//! Usage: slow_writer <store> <shard_rows> <d>

use loupe_store::{DType, HookSpec, Store};
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = &args[1];
    let shard_rows: usize = args[2].parse().expect("shard_rows");
    let d: usize = args[3].parse().expect("d");
    let store = Store::create(dir).expect("open store");
    let spec = HookSpec { d: d as u32, dtype: DType::F32, grad: true };
    let mut writer =
        store.activation_writer(loupe_tests::HOOK, spec).expect("writer").with_shard_rows(shard_rows);
    let chunk = 64usize;
    let act: Vec<f32> = (0..chunk * d).map(|i| (i % 977) as f32 * 0.25).collect();
    let mut out = std::io::stdout();
    for step in 0u32.. {
        if writer.pending_rows() + chunk >= shard_rows {
            writeln!(out, "writing").unwrap();
            out.flush().unwrap();
        }
        let doc = vec![step; chunk];
        let pos: Vec<u32> = (0..chunk as u32).collect();
        writer.append(&doc, &pos, &pos, &act, Some(&act)).expect("append");
        if writer.pending_rows() < chunk {
            writeln!(out, "committed").unwrap();
            out.flush().unwrap();
        }
    }
}
