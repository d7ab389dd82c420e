//! Logit effects treat the final norm as the model does: on a real residual-stream vector at the
//! last layer, `direction_logits` is the model's own logits up to the norm's division (and, for
//! LayerNorm, its bias), so the promoted tokens of a direction are what the model would predict.

use candle_core::{D, DType, Device, Tensor};
use loupe_analysis::features::logits::logit_effects;
use loupe_model::tokenizer::Tokenizer;
use loupe_model::{self as model, HookedModel, Hooks};
use loupe_tests::{fixture, gemma_gguf};

/// The last block's output and the logits at every position of `ids`.
fn run(model: &dyn HookedModel, ids: &[u32], hook: &str) -> (Tensor, Tensor) {
    let tokens = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mut hooks = Hooks::new().capture(hook);
    let logits = model.forward(&tokens, &mut hooks).unwrap().unwrap().squeeze(0).unwrap();
    (hooks.get(hook).unwrap().squeeze(0).unwrap(), logits)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn gemma3_direction_logits_are_the_models_logits_times_the_rms() {
    let path = gemma_gguf();
    let model = model::load(&path).unwrap();
    let tok = Tokenizer::load(&path).unwrap();
    let ids = tok.encode("When Mary and John went to the store, John gave a drink to", true).unwrap();
    let (x, logits) = run(model.as_ref(), &ids, "blocks.17.hook_resid_post");
    let rms = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6).unwrap().sqrt().unwrap();
    let direct = model.direction_logits(&x).unwrap().broadcast_div(&rms).unwrap();
    let diff = max_abs(&(&direct - &logits).unwrap());
    assert!(diff <= 1e-3 * max_abs(&logits), "max diff {diff}");
    // The last position's direction promotes " Mary" most, as the model predicts.
    let last: Vec<f32> = x.narrow(0, ids.len() - 1, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let effects = logit_effects(model.as_ref(), &last, last.len(), 5).unwrap();
    let mary = tok.encode(" Mary", false).unwrap();
    assert_eq!((effects[0].rank, effects[0].token), (1, mary[0]), "{effects:?}");
    assert_eq!(effects.iter().filter(|e| e.rank < 0).count(), 5);
    assert!(effects[5].value < effects[0].value);
}

#[test]
fn gpt2_direction_logits_centre_and_scale_like_layer_norm() {
    let model = model::load(&fixture("gpt2-tiny")).unwrap();
    let r = candle_core::safetensors::load(fixture("gpt2-tiny/reference.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = r["ids"].to_dtype(DType::U32).unwrap().get(0).unwrap().to_vec1().unwrap();
    let (x, logits) = run(model.as_ref(), &ids, "blocks.1.hook_resid_post");
    // logits = W_U·(((x − μ)/σ) ⊙ w + b): logits − direct/σ is W_U·b at every position.
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
    let sigma = (centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap();
    let direct = model.direction_logits(&x).unwrap().broadcast_div(&sigma).unwrap();
    let bias_term = (&logits - &direct).unwrap();
    let first = bias_term.narrow(0, 0, 1).unwrap();
    let spread = max_abs(&bias_term.broadcast_sub(&first).unwrap());
    assert!(spread <= 1e-4 * max_abs(&logits), "W_U·b differs across positions by {spread}");
    // A constant direction is what LayerNorm removes: no logit effect at all.
    let constant = Tensor::ones((1, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(max_abs(&model.direction_logits(&constant).unwrap()) < 1e-5);
}
