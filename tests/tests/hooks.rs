//! Interventions and gradient targets behave as documented (on the tiny GPT-2 fixture, where
//! every run is fast).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use loupe_model::{self as model, HookedModel, Hooks, Intervention};
use loupe_tests::fixture;

fn setup() -> (Box<dyn HookedModel>, Tensor, Tensor) {
    let model = model::load(&fixture("gpt2-tiny")).unwrap();
    let r = candle_core::safetensors::load(fixture("gpt2-tiny/reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["ids"].to_dtype(DType::U32).unwrap();
    (model, ids.narrow(0, 0, 1).unwrap(), ids.narrow(0, 1, 1).unwrap())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn logits(model: &dyn HookedModel, tokens: &Tensor, hooks: &mut Hooks) -> Tensor {
    model.forward(tokens, hooks).unwrap().unwrap()
}

#[test]
fn patching_a_run_into_another_reproduces_it_downstream() {
    let (model, a, b) = setup();
    let hook = "blocks.1.hook_resid_pre";
    let mut run_b = Hooks::new().capture(hook);
    let logits_b = logits(model.as_ref(), &b, &mut run_b);
    let patch = run_b.get(hook).unwrap().clone();
    // Everything after blocks.1's input depends only on the residual stream at that point.
    let patched = logits(model.as_ref(), &a, &mut Hooks::new().intervene(hook, Intervention::Replace(patch)));
    assert!(max_diff(&patched, &logits_b) < 1e-6);
    assert!(max_diff(&logits(model.as_ref(), &a, &mut Hooks::new()), &logits_b) > 1e-2);
}

#[test]
fn add_zero_map_and_zero_heads() {
    let (model, a, _) = setup();
    let hook = "blocks.0.hook_resid_post";
    let mut base = Hooks::new().capture(hook);
    logits(model.as_ref(), &a, &mut base);
    let x = base.get(hook).unwrap().clone();
    let delta = Tensor::randn(0f32, 1.0, x.dims(), &Device::Cpu).unwrap();

    let added =
        logits(model.as_ref(), &a, &mut Hooks::new().intervene(hook, Intervention::Add(delta.clone())));
    let replaced = (&x + &delta).unwrap();
    let same = logits(model.as_ref(), &a, &mut Hooks::new().intervene(hook, Intervention::Replace(replaced)));
    assert!(max_diff(&added, &same) < 1e-5);

    let doubled: model::hooks::MapFn = Arc::new(|t: &Tensor| t * 2.0);
    let mapped = logits(model.as_ref(), &a, &mut Hooks::new().intervene(hook, Intervention::Map(doubled)));
    let twice = logits(
        model.as_ref(),
        &a,
        &mut Hooks::new().intervene(hook, Intervention::Replace((&x * 2.0).unwrap())),
    );
    assert!(max_diff(&mapped, &twice) < 1e-5);

    // Zeroing every head of hook_z is zeroing hook_z; zeroing one head changes the output, and the
    // cache after the intervention shows that head as zeros.
    let z = "blocks.0.attn.hook_z";
    let all =
        logits(model.as_ref(), &a, &mut Hooks::new().intervene(z, Intervention::ZeroHeads(vec![0, 1, 2, 3])));
    let zero = logits(model.as_ref(), &a, &mut Hooks::new().intervene(z, Intervention::Zero));
    assert!(max_diff(&all, &zero) < 1e-6);
    let mut one = Hooks::new().intervene(z, Intervention::ZeroHeads(vec![2])).capture(z);
    let ablated = logits(model.as_ref(), &a, &mut one);
    assert!(max_diff(&ablated, &logits(model.as_ref(), &a, &mut Hooks::new())) > 1e-4);
    let cached = one.get(z).unwrap();
    assert_eq!(cached.dims()[2], 4);
    assert_eq!(
        cached.narrow(2, 2, 1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );
    assert!(
        cached.narrow(2, 1, 1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
    );

    let err =
        model.forward(&a, &mut Hooks::new().intervene(z, Intervention::ZeroHeads(vec![9]))).unwrap_err();
    assert!(format!("{err:#}").contains("head 9 does not exist"), "{err:#}");
    let err =
        model.forward(&a, &mut Hooks::new().intervene(hook, Intervention::ZeroHeads(vec![0]))).unwrap_err();
    assert!(format!("{err:#}").contains("per-head activation"), "{err:#}");
}

#[test]
fn gradients_at_two_hooks_and_the_chunked_loss_agree_with_plain_autograd() {
    let (model, a, _) = setup();
    let (h0, h1) = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out");
    let mut plain = Hooks::new().grad(h0).grad(h1);
    let out = logits(model.as_ref(), &a, &mut plain);
    let n = (a.dim(1).unwrap() - 1) as f64;
    let loss = (model::next_token_loss(&out, &a).unwrap() * n).unwrap();
    let grads = loss.backward().unwrap();
    let mut chunked = Hooks::new().grad(h0).grad(h1);
    let (sum, cgrads) = model::loss_gradients(model.as_ref(), &a, &mut chunked).unwrap();
    assert!((sum - loss.to_scalar::<f32>().unwrap() as f64).abs() < 1e-3);
    for h in [h0, h1] {
        let g1 = grads.get(plain.var(h).unwrap().as_tensor()).unwrap();
        let g2 = cgrads.get(chunked.var(h).unwrap().as_tensor()).unwrap();
        let scale = g1.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 0.0);
        assert!(max_diff(g1, g2) <= 1e-4 * scale, "{h}");
    }
}
