//! The TOML config of `loupe train-sae --config` and `loupe train-monet --config`: the
//! command's own reader (`train_job::merged`, included from app/src), with no flags given.
#![no_main]
#![allow(dead_code, unused_imports)]

use libfuzzer_sys::fuzz_target;
use loupe_fuzz::{put, scratch};

#[path = "../../../app/cli/src/dict_args.rs"]
mod dict_args;
#[path = "../../../app/cli/src/progress.rs"]
mod progress;
#[path = "../../../app/cli/src/train_job.rs"]
mod train_job;
#[path = "../../../app/cli/src/train_monet_cmd.rs"]
mod train_monet_cmd;
#[path = "../../../app/cli/src/train_sae_cmd.rs"]
mod train_sae_cmd;

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("train.toml");
    put(&path, data);
    let _ = train_job::merged(&train_sae_cmd::Args::default(), Some(&path));
    let _ = train_job::merged(&train_monet_cmd::Args::default(), Some(&path));
});
