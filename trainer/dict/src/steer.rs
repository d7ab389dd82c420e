//! Steering: the model run with `coefficient ×` one feature's decoder direction added at a hook,
//! on every position of every sequence, through the runtime's [`Hooks`] (at a per-head hook such
//! as `attn.hook_z`, the direction is each position's heads concatenated).
//! The one way Loupe steers: the app's prompt lab (coefficient = strength × the prompt's mean
//! norm at the hook) and the intervention scorer (coefficient = scale × the feature's maximum
//! activation) both call [`Steering::logits`]; each picks its coefficient.
//!
//! Only features with a fixed direction can be steered by adding one (SAE features, MoE-X units):
//! Monet experts, whose output depends on their input, are refused with one line.

use anyhow::{Result, anyhow, bail};
use candle_core::{Device, Tensor};
use loupe_model::HookedModel;
use loupe_model::hooks::{Hooks, Intervention};

use crate::Dictionary;

/// A dictionary's features, steered at a hook.
pub struct Steering<'a> {
    pub dictionary: &'a dyn Dictionary,
    /// The dictionary's name, for errors.
    pub name: &'a str,
    /// Where the directions are added (the dictionary's hook).
    pub hook: &'a str,
}

impl Steering<'_> {
    /// Hooks that add `coefficient` × feature `f`'s decoder direction at the hook.
    pub fn hooks(&self, f: u32, coefficient: f32) -> Result<Hooks> {
        let Some(dirs) = self.dictionary.decoder_directions() else {
            bail!(
                "{} has no fixed decoder directions (Monet experts cannot be steered by adding one)",
                self.name
            );
        };
        let n = self.dictionary.n_features();
        if f as usize >= n {
            bail!("feature {f} does not exist ({} has {n} features)", self.name);
        }
        let d = self.dictionary.d_out();
        let row = &dirs[f as usize * d..(f as usize + 1) * d];
        let add = (Tensor::from_slice(row, d, &Device::Cpu)? * f64::from(coefficient))?;
        // A per-head hook (`attn.hook_z`, `[batch, pos, head, d_head]`) takes the row as its heads
        // concatenated, as capture stores them.
        let add_at: loupe_model::hooks::MapFn = std::sync::Arc::new(move |x: &Tensor| {
            let tail = x.dims().get(2..).unwrap_or(&[]).to_vec();
            x.broadcast_add(&add.reshape(tail)?.to_dtype(x.dtype())?)
        });
        Ok(Hooks::new().intervene(self.hook, Intervention::Map(add_at)))
    }

    /// `model`'s logits on `tokens` (`[batch, seq]`) with feature `f` steered by `coefficient`.
    pub fn logits(
        &self,
        model: &dyn HookedModel,
        tokens: &Tensor,
        f: u32,
        coefficient: f32,
    ) -> Result<Tensor> {
        let mut hooks = self.hooks(f, coefficient)?;
        model.forward(tokens, &mut hooks)?.ok_or_else(|| anyhow!("the model gave no logits"))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::IndexOp;

    use super::*;
    use crate::Variant;
    use crate::monet::{Decomposition, Monet, MonetSpec};
    use crate::sae::{Sae, SaeSpec};

    const HOOK: &str = "blocks.0.hook_resid_post";

    fn tiny() -> Box<dyn HookedModel> {
        loupe_model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny"))
            .unwrap()
    }

    fn last(logits: &Tensor) -> Vec<f32> {
        logits.i((0, logits.dim(1).unwrap() - 1)).unwrap().to_vec1().unwrap()
    }

    /// Steering adds exactly `coefficient ×` the feature's decoder row at the hook: the logits
    /// equal a forward pass with that vector added by hand; zero changes nothing, and another
    /// feature or coefficient changes them.
    #[test]
    fn steering_adds_the_scaled_decoder_row() {
        let model = tiny();
        let sae = Sae::init(SaeSpec { variant: Variant::Topk, d_in: 64, n_features: 4, k: 2 }, 3);
        let steering = Steering { dictionary: &sae, name: "probe", hook: HOOK };
        let tokens = Tensor::from_vec(vec![5u32, 9, 17, 33], (1, 4), &Device::Cpu).unwrap();
        let plain = last(&model.forward(&tokens, &mut Hooks::new()).unwrap().unwrap());
        let row = Tensor::from_slice(&sae.w_dec[2 * 64..3 * 64], 64, &Device::Cpu).unwrap();
        let by_hand = (row * 2.5).unwrap();
        let mut hooks = Hooks::new().intervene(HOOK, Intervention::Add(by_hand));
        let expected = last(&model.forward(&tokens, &mut hooks).unwrap().unwrap());
        assert_eq!(last(&steering.logits(model.as_ref(), &tokens, 2, 2.5).unwrap()), expected);
        assert_eq!(last(&steering.logits(model.as_ref(), &tokens, 2, 0.0).unwrap()), plain);
        assert_ne!(last(&steering.logits(model.as_ref(), &tokens, 1, 2.5).unwrap()), expected);
        assert_ne!(expected, plain);
        let err = steering.logits(model.as_ref(), &tokens, 4, 1.0).unwrap_err().to_string();
        assert_eq!(err, "feature 4 does not exist (probe has 4 features)");
    }

    #[test]
    fn monet_experts_are_refused() {
        let spec = MonetSpec {
            decomposition: Decomposition::Horizontal,
            d_in: 64,
            d_out: 64,
            experts: 4,
            heads: 1,
            topk: 1,
            dim: 2,
        };
        let monet = Monet::init(spec, 1).unwrap();
        let steering = Steering { dictionary: &monet, name: "experts", hook: HOOK };
        let err = steering.hooks(0, 1.0).err().expect("refused").to_string();
        assert_eq!(
            err,
            "experts has no fixed decoder directions (Monet experts cannot be steered by adding one)"
        );
    }
}
