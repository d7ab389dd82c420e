//! Group ablation: the next-token loss on the repeated half with several heads `L.H` zeroed
//! together in one forward pass (`hook_z` of each head set to 0 at every position, by
//! [`Intervention::ZeroHeads`] at every layer that has one), and random groups of heads to compare
//! a chosen group against (RESULTS.md: the top 3 induction heads against 3 random heads).
//!
//! The repeated half is [`ablation`](super::ablation)'s: the targets at positions |R| + 1 ..= 2|R|
//! of [BOS] + R + R, predicted from positions |R| ..= 2|R| − 1, averaged over every sequence.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks, Intervention};

/// The mean next-token loss on the repeated half of `repeated` (each [BOS] + R + R, |R| =
/// `repeat_len`) with every head of `heads` (`(layer, head)`) zeroed at once; `heads` empty
/// gives the clean loss. One sequence per forward pass, so the logits stay `[2|R| + 1, vocab]`.
pub fn group_ablation_loss(
    model: &dyn HookedModel,
    repeated: &[Vec<u32>],
    repeat_len: usize,
    heads: &[(usize, usize)],
) -> Result<f32> {
    let c = model.config();
    let len = 2 * repeat_len + 1;
    if repeat_len == 0 || repeated.is_empty() {
        bail!(
            "a group ablation needs at least one repeated sequence with a repeated half of at least one token"
        );
    }
    if let Some(s) = repeated.iter().find(|s| s.len() != len) {
        bail!("a repeated sequence has {} tokens, not [BOS] + 2 × {repeat_len}", s.len());
    }
    if let Some((l, h)) = heads.iter().find(|(l, h)| *l >= c.n_layers || *h >= c.n_heads) {
        bail!("head {l}.{h} does not exist: the model has {} layers of {} heads", c.n_layers, c.n_heads);
    }
    if !c.causal {
        bail!("a group ablation needs a causal language model (a next-token loss)");
    }
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(l, h) in heads {
        by_layer.entry(l).or_default().push(h);
    }
    let mut sum = 0f64;
    for sequence in repeated {
        let tokens = Tensor::from_vec(sequence.clone(), (1, len), &Device::Cpu)?;
        let mut hooks = by_layer.iter().fold(Hooks::new(), |hooks, (l, hs)| {
            hooks.intervene(in_block(*l, names::Z), Intervention::ZeroHeads(hs.clone()))
        });
        let logits = model.forward(&tokens, &mut hooks)?.context("the forward pass stopped early")?;
        // Rows |R| .. 2|R| − 1 predict the second copy, tokens |R| + 1 ..= 2|R|.
        let rows: Vec<Vec<f32>> = logits.squeeze(0)?.narrow(0, repeat_len, repeat_len)?.to_vec2()?;
        for (row, &target) in rows.iter().zip(&sequence[repeat_len + 1..]) {
            // −log softmax(row)[target], in f64.
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = row.iter().map(|&x| f64::from(x - max).exp()).sum::<f64>().ln() + f64::from(max);
            sum += lse - f64::from(row[target as usize]);
        }
    }
    Ok((sum / (repeated.len() * repeat_len) as f64) as f32)
}

/// A group of heads zeroed together against random groups of the same size.
#[derive(Clone, Debug)]
pub struct GroupComparison {
    /// The repeated-half loss with nothing ablated (nats).
    pub clean_loss: f32,
    pub group: Vec<(usize, usize)>,
    /// The loss with `group` zeroed together.
    pub group_loss: f32,
    /// Each random group (drawn from the heads outside `group`) and its loss.
    pub random: Vec<(Vec<(usize, usize)>, f32)>,
}

impl GroupComparison {
    /// The mean loss over the random groups.
    pub fn random_mean(&self) -> f32 {
        self.random.iter().map(|(_, l)| f64::from(*l)).sum::<f64>() as f32 / self.random.len().max(1) as f32
    }
}

/// The clean loss, the loss with `group` zeroed together, and with each of `draws` random groups of
/// the same size (seeded with `seed`, drawn from the other heads) zeroed together.
pub fn compare_groups(
    model: &dyn HookedModel,
    repeated: &[Vec<u32>],
    repeat_len: usize,
    group: &[(usize, usize)],
    draws: usize,
    seed: u64,
) -> Result<GroupComparison> {
    let c = model.config();
    let clean_loss = group_ablation_loss(model, repeated, repeat_len, &[])?;
    let group_loss = group_ablation_loss(model, repeated, repeat_len, group)?;
    let random = random_groups(c.n_layers, c.n_heads, group, group.len(), draws, seed)?
        .into_iter()
        .map(|g| {
            let loss = group_ablation_loss(model, repeated, repeat_len, &g)?;
            Ok((g, loss))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GroupComparison { clean_loss, group: group.to_vec(), group_loss, random })
}

/// `draws` groups of `size` distinct heads drawn uniformly (with `seed`) from the model's
/// `n_layers × n_heads` heads, leaving out `exclude`; each group sorted by layer, then head.
pub fn random_groups(
    n_layers: usize,
    n_heads: usize,
    exclude: &[(usize, usize)],
    size: usize,
    draws: usize,
    seed: u64,
) -> Result<Vec<Vec<(usize, usize)>>> {
    let pool: Vec<(usize, usize)> = (0..n_layers)
        .flat_map(|l| (0..n_heads).map(move |h| (l, h)))
        .filter(|head| !exclude.contains(head))
        .collect();
    if size > pool.len() {
        bail!("cannot draw {size} heads from the {} heads left", pool.len());
    }
    // splitmix64, then a partial Fisher–Yates shuffle of the pool per draw.
    let mut next = super::detectors::splitmix64(seed);
    Ok((0..draws)
        .map(|_| {
            let mut pool = pool.clone();
            for i in 0..size {
                let j = i + (next() % (pool.len() - i) as u64) as usize;
                pool.swap(i, j);
            }
            let mut group = pool[..size].to_vec();
            group.sort_unstable();
            group
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_groups_are_distinct_heads_outside_the_excluded_ones() {
        let exclude = [(0, 1), (3, 2)];
        let groups = random_groups(4, 4, &exclude, 3, 50, 7).unwrap();
        assert_eq!(groups.len(), 50);
        for g in &groups {
            assert_eq!(g.len(), 3);
            assert!(g.windows(2).all(|w| w[0] < w[1]), "sorted and distinct: {g:?}");
            assert!(g.iter().all(|h| !exclude.contains(h) && h.0 < 4 && h.1 < 4));
        }
        assert_eq!(groups, random_groups(4, 4, &exclude, 3, 50, 7).unwrap(), "seeded");
        assert!(random_groups(2, 2, &[], 5, 1, 0).is_err());
    }
}
