//! One head's attention pattern on a prompt, for the app's heatmap: one forward pass that caches
//! `blocks.L.attn.hook_pattern` and stops after block L.

use anyhow::{Result, bail};
use candle_core::{DType, Device, IndexOp, Tensor};
use loupe_model::HookedModel;
use loupe_model::hooks::{Hooks, in_block, names};

/// Head `layer.head`'s attention pattern on `tokens` (ids, BOS included as the caller wants):
/// `[query][key]` row-major, `tokens.len()²` values; each row sums to 1 (zero above the diagonal
/// for a causal model).
pub fn attention_pattern(
    model: &dyn HookedModel,
    tokens: &[u32],
    layer: usize,
    head: usize,
) -> Result<Vec<f32>> {
    let c = model.config();
    if layer >= c.n_layers || head >= c.n_heads {
        bail!(
            "head {layer}.{head} does not exist: the model has {} layers of {} heads",
            c.n_layers,
            c.n_heads
        );
    }
    if tokens.is_empty() {
        bail!("the prompt is empty");
    }
    if tokens.len() > c.max_context {
        bail!("the prompt has {} tokens; the model reads at most {}", tokens.len(), c.max_context);
    }
    let hook = in_block(layer, names::PATTERN);
    let input = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu)?;
    let mut hooks = Hooks::new().capture(hook.clone()).stop_after_layer(layer);
    model.forward(&input, &mut hooks)?;
    // `[batch, head, query, key]`.
    let pattern = hooks.get(&hook)?.i((0, head))?.to_dtype(DType::F32)?;
    Ok(pattern.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn tiny() -> Box<dyn HookedModel> {
        loupe_model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny"))
            .unwrap()
    }

    #[test]
    fn a_pattern_is_causal_and_its_rows_sum_to_one() {
        let model = tiny();
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
        let n = tokens.len();
        for (layer, head) in [(0, 0), (1, 3)] {
            let p = attention_pattern(model.as_ref(), &tokens, layer, head).unwrap();
            assert_eq!(p.len(), n * n);
            for q in 0..n {
                let row = &p[q * n..(q + 1) * n];
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "{layer}.{head} row {q} sums to {sum}");
                assert!(row[q + 1..].iter().all(|&v| v == 0.0), "{layer}.{head} row {q} looks ahead");
                assert!(row[..=q].iter().all(|&v| v >= 0.0));
            }
            assert_eq!(p[0], 1.0, "the first token attends only to itself");
        }
        // Heads differ: the pattern is the one head's, not a mean.
        let a = attention_pattern(model.as_ref(), &tokens, 1, 0).unwrap();
        let b = attention_pattern(model.as_ref(), &tokens, 1, 1).unwrap();
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
    }

    /// The head's slice of transformers' pattern on the fixture's reference ids (eager attention).
    #[test]
    fn a_pattern_is_the_heads_slice_of_transformers_pattern() {
        let model = tiny();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny");
        let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let ids: Vec<u32> = r["ids"].i(1).unwrap().to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        for (layer, head) in [(0, 1), (1, 2)] {
            let ours = attention_pattern(model.as_ref(), &ids, layer, head).unwrap();
            let theirs: Vec<f32> = r[&format!("blocks.{layer}.attn.hook_pattern")]
                .i((1, head))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "{layer}.{head} differs from transformers by {diff}");
        }
    }

    #[test]
    fn bad_heads_and_prompts_are_errors() {
        let model = tiny();
        let e = |r: Result<Vec<f32>>| format!("{:#}", r.unwrap_err());
        assert!(e(attention_pattern(model.as_ref(), &[1, 2], 2, 0)).contains("head 2.0 does not exist"));
        assert!(e(attention_pattern(model.as_ref(), &[1, 2], 0, 4)).contains("2 layers of 4 heads"));
        assert!(e(attention_pattern(model.as_ref(), &[], 0, 0)).contains("empty"));
        assert!(e(attention_pattern(model.as_ref(), &[1; 65], 0, 0)).contains("at most 64"));
    }

    /// What the app's heatmap costs on Gemma 3 270M for a 1,000-token prompt (the last layer, so
    /// the whole model runs; layer 0 has a sliding window of 512): `cargo test --release -p
    /// loupe-analysis --lib -- --ignored --nocapture pattern_of_1000_tokens`.
    #[test]
    #[ignore = "needs ~/.cache/loupe/models/gemma-3-270m-q4_k_m.gguf; prints a timing"]
    fn pattern_of_1000_tokens_on_gemma() {
        let home = std::env::var("HOME").unwrap();
        let path = Path::new(&home).join(".cache/loupe/models/gemma-3-270m-q4_k_m.gguf");
        let model = loupe_model::load(&path).unwrap();
        let tokens: Vec<u32> =
            std::iter::once(2).chain((1..1000).map(|i| 1000 + (i * 7919) % 50000)).collect();
        for layer in [0, 17] {
            let start = std::time::Instant::now();
            let p = attention_pattern(model.as_ref(), &tokens, layer, 1).unwrap();
            println!("layer {layer}: {} tokens in {:.2} s", tokens.len(), start.elapsed().as_secs_f64());
            let n = tokens.len();
            let row = &p[(n - 1) * n..];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-3);
            if layer == 0 {
                assert!(row[..n - 512].iter().all(|&v| v == 0.0), "the sliding window of 512");
            }
        }
    }
}
