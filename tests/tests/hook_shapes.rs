//! Every hook point an architecture lists (`HookedModel::hook_list`) fires on a forward pass with
//! all of them cached, with the shape the list documents: GPT-2 (the tiny fixture), BERT
//! (all-MiniLM-L6-v2) and Gemma 3 (the GGUF), each on a batch of two short sequences.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};
use loupe_model::{self as model, HookedModel, Hooks};
use loupe_tests::{fixture, gemma_gguf, minilm_dir};

fn assert_listed_hooks_fire(model: &dyn HookedModel, ids: [[u32; 5]; 2]) {
    let c = model.config();
    let arch = &c.architecture;
    let points = model.hook_list().points(c.n_layers);
    let names: BTreeSet<&str> = points.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.len(), points.len(), "{arch}: a hook is listed twice");
    assert_eq!(model.hook_names(), points.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>());
    let mut hooks = points.iter().fold(Hooks::new(), |h, (name, _)| h.capture(name.as_str()));
    let tokens = Tensor::new(&ids, &Device::Cpu).unwrap();
    model.forward(&tokens, &mut hooks).unwrap();
    let fired: BTreeSet<&str> = hooks.cache().keys().map(String::as_str).collect();
    let silent: Vec<&&str> = names.difference(&fired).collect();
    assert!(silent.is_empty(), "{arch}: listed hooks that did not fire: {silent:?}");
    for (name, shape) in &points {
        let got = hooks.get(name).unwrap().dims().to_vec();
        assert_eq!(got, shape.dims(c, 2, 5), "{arch} {name} ({shape:?})");
    }
}

#[test]
fn gpt2_hooks_fire_with_their_shapes() {
    let model = model::load(&fixture("gpt2-tiny")).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[1, 2, 3, 4, 5], [50, 60, 70, 80, 90]]);
}

#[test]
fn bert_hooks_fire_with_their_shapes() {
    let model = model::load(&minilm_dir()).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[101, 7592, 2088, 999, 102], [101, 1037, 2158, 2003, 102]]);
}

#[test]
fn gemma3_hooks_fire_with_their_shapes() {
    let model = model::load(&gemma_gguf()).unwrap();
    assert_listed_hooks_fire(model.as_ref(), [[2, 651, 6207, 563, 4610], [2, 818, 496, 1047, 236761]]);
}
