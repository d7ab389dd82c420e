//! Activations written to a store read back bit-exactly, zero-copy, and the sampler delivers every
//! row exactly once per epoch.

use std::collections::BTreeMap;

use loupe_store::{DType, HookSpec, Sampler, SamplerConfig, Store, Values, ValuesRef};
use loupe_tests::{HOOK, Rows, write_synthetic};

fn specs() -> Vec<HookSpec> {
    let mut out = Vec::new();
    for dtype in [DType::F16, DType::F32] {
        for grad in [false, true] {
            out.push(HookSpec { d: 24, dtype, grad });
        }
    }
    out
}

/// Concatenate every shard of the hook, in order.
fn read_back(store: &Store, spec: HookSpec) -> Rows {
    let acts = store.activations(HOOK).unwrap();
    assert_eq!(acts.spec(), spec);
    let mut rows = Rows {
        doc: vec![],
        pos: vec![],
        token: vec![],
        act: Values::new(spec.dtype),
        grad: spec.grad.then(|| Values::new(spec.dtype)),
    };
    for i in 0..acts.num_shards() {
        let shard = acts.open_shard(i).unwrap();
        assert!(shard.is_zero_copy(), "shard {i} was copied on open");
        rows.doc.extend_from_slice(shard.doc());
        rows.pos.extend_from_slice(shard.pos());
        rows.token.extend_from_slice(shard.token());
        rows.act.extend_from(shard.act(), 0..shard.act().len());
        assert_eq!(shard.grad().is_some(), spec.grad);
        if let (Some(g), Some(src)) = (rows.grad.as_mut(), shard.grad()) {
            g.extend_from(src, 0..src.len());
        }
    }
    rows
}

fn bits(v: &Values) -> Vec<u8> {
    v.as_ref().as_bytes().to_vec()
}

#[test]
fn round_trip_is_bit_exact_for_f16_and_f32_with_and_without_grad() {
    for spec in specs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        let written = write_synthetic(&store, HOOK, spec, 9, 37, 50, 1);
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let acts = store.activations(HOOK).unwrap();
        assert_eq!(acts.rows(), 9 * 37, "{spec}");
        assert_eq!(acts.num_shards(), (9 * 37usize).div_ceil(50), "{spec}");
        let read = read_back(&store, spec);
        assert_eq!(read.doc, written.doc, "{spec}");
        assert_eq!(read.pos, written.pos, "{spec}");
        assert_eq!(read.token, written.token, "{spec}");
        assert_eq!(bits(&read.act), bits(&written.act), "{spec}: act bits differ");
        assert_eq!(read.grad.as_ref().map(bits), written.grad.as_ref().map(bits), "{spec}: grad bits differ");
        assert!(store.verify(&()).is_ok(), "{spec}");
    }
}

#[test]
fn appending_to_an_existing_hook_continues_after_its_shards() {
    let spec = HookSpec { d: 8, dtype: DType::F16, grad: false };
    let dir = tempfile::tempdir().unwrap();
    let first = write_synthetic(&Store::create(dir.path()).unwrap(), HOOK, spec, 2, 10, 7, 2);
    let second = write_synthetic(&Store::open_rw(dir.path()).unwrap(), HOOK, spec, 3, 10, 7, 3);
    let store = Store::open(dir.path()).unwrap();
    let read = read_back(&store, spec);
    assert_eq!(read.token, [first.token, second.token].concat());
    let files: Vec<String> = store.manifest().hooks[HOOK].shards.iter().map(|s| s.file.clone()).collect();
    assert_eq!(files.len(), 3 + 5);
    assert_eq!(files.last().unwrap(), "00007.arrow");

    let other = HookSpec { d: 9, ..spec };
    let err = Store::open_rw(dir.path()).unwrap().activation_writer(HOOK, other).err().unwrap();
    assert!(format!("{err:#}").contains("is stored with d=8 f16 without grad"), "{err:#}");
}

#[test]
fn writer_refuses_nan_and_f16_overflow_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).unwrap();
    let spec = HookSpec { d: 4, dtype: DType::F16, grad: false };
    let mut w = store.activation_writer(HOOK, spec).unwrap();
    let err = w.append(&[0, 0], &[0, 1], &[5, 6], &[0.0f32, 1.0, 2.0, 3.0, 4.0, f32::NAN, 6.0, 7.0], None);
    let msg = format!("{:#}", err.unwrap_err());
    assert!(msg.contains("row doc 0 pos 1 column act[1] is NaN"), "{msg}");
    let err = w.append(&[3], &[9], &[5], &[0.0f32, 1.0, 70_000.0, 3.0], None);
    let msg = format!("{:#}", err.unwrap_err());
    assert!(msg.contains("outside the f16 range") && msg.contains("pos 9"), "{msg}");
    assert_eq!(w.pending_rows(), 0);
    let err = w.append(&[0], &[0], &[0], &[1.0f32; 3], None).unwrap_err();
    assert!(format!("{err:#}").contains("expected 1 rows × d 4"), "{err:#}");
    w.append(&[1], &[2], &[3], &[1.0f32, 2.0, 3.0, 4.0], None).unwrap();
    w.finish().unwrap();
    assert_eq!(store.activations(HOOK).unwrap().rows(), 1);
}

/// (doc, pos) -> index of the row in write order.
fn row_index(rows: &Rows) -> BTreeMap<(u32, u32), usize> {
    rows.doc.iter().zip(&rows.pos).enumerate().map(|(i, (&d, &p))| ((d, p), i)).collect()
}

fn row_bytes(v: ValuesRef<'_>, i: usize, d: usize) -> Vec<u8> {
    v.row(i, d).as_bytes().to_vec()
}

#[test]
fn sampler_delivers_every_row_once_per_epoch_with_its_values() {
    let spec = HookSpec { d: 16, dtype: DType::F32, grad: true };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).unwrap();
    let written = write_synthetic(&store, HOOK, spec, 13, 41, 97, 4);
    let index = row_index(&written);
    let acts = store.activations(HOOK).unwrap();
    for (batch_size, run_rows, window_chunks) in [(64, 1, 3), (100, 8, 2), (7, 3, 50), (200, 8, 512)] {
        let config = SamplerConfig {
            run_rows,
            window_chunks,
            chunk_rows: 16,
            grad: true,
            ..SamplerConfig::new(batch_size)
        };
        let sampler = Sampler::new(&acts, config).unwrap();
        let mut orders = Vec::new();
        for epoch in 0..2 {
            let mut seen = vec![0u32; written.doc.len()];
            let mut order = Vec::new();
            let batches: Vec<_> = sampler.epoch(epoch).collect();
            for (b, batch) in batches.iter().enumerate() {
                let last = b + 1 == batches.len();
                assert!(batch.rows() == batch_size || (last && batch.rows() < batch_size));
                for r in 0..batch.rows() {
                    let i = index[&(batch.doc[r], batch.pos[r])];
                    seen[i] += 1;
                    order.push(i);
                    assert_eq!(batch.token[r], written.token[i]);
                    assert_eq!(row_bytes(batch.act.as_ref(), r, 16), row_bytes(written.act.as_ref(), i, 16));
                    let (got, want) = (batch.grad.as_ref().unwrap(), written.grad.as_ref().unwrap());
                    assert_eq!(row_bytes(got.as_ref(), r, 16), row_bytes(want.as_ref(), i, 16));
                }
            }
            assert!(
                seen.iter().all(|&n| n == 1),
                "batch {batch_size} run {run_rows}: rows not seen exactly once"
            );
            orders.push(order);
        }
        assert_ne!(orders[0], orders[1], "two epochs gave the same order");
        let again: Vec<u32> = sampler.epoch(1).flat_map(|b| b.doc).collect();
        let first: Vec<u32> = orders[1].iter().map(|&i| written.doc[i]).collect();
        assert_eq!(again, first, "an epoch is not reproducible");
    }
}

#[test]
fn sampler_mixes_documents_within_a_batch() {
    let spec = HookSpec { d: 4, dtype: DType::F16, grad: false };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).unwrap();
    write_synthetic(&store, HOOK, spec, 64, 128, 1024, 5);
    let sampler = Sampler::new(&store.activations(HOOK).unwrap(), SamplerConfig::new(256)).unwrap();
    let batch = sampler.epoch(0).next().unwrap();
    let mut docs = batch.doc.clone();
    docs.sort();
    docs.dedup();
    assert!(docs.len() >= 20, "a batch of 256 rows drew from only {} of 64 documents", docs.len());
    let err = Sampler::new(
        &store.activations(HOOK).unwrap(),
        SamplerConfig { grad: true, ..SamplerConfig::new(8) },
    );
    assert!(format!("{:#}", err.err().unwrap()).contains("has no gradients stored"));
}
