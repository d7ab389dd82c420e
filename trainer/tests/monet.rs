//! Monet experts: the factorised forward against the explicit N-expert sum, the sparse codes, and
//! the auxiliary losses.

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use loupe_trainer::dict::monet::{Decomposition, Monet, MonetSpec, aux, explicit};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

fn gaussian(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| StandardNormal.sample(rng)).collect()
}

fn spec(decomposition: Decomposition) -> MonetSpec {
    MonetSpec { decomposition, d_in: 12, d_out: 10, experts: 8, heads: 2, topk: 2, dim: 6 }
}

#[test]
fn factorised_forward_equals_the_explicit_expert_sum() {
    for decomposition in [Decomposition::Horizontal, Decomposition::Vertical] {
        let monet = Monet::init(spec(decomposition), 1).unwrap();
        // Non-zero biases, so that every term of the factorisation is exercised.
        let mut rng = StdRng::seed_from_u64(2);
        for var in monet.vars() {
            let shape = var.as_tensor().dims().to_vec();
            let noise =
                Tensor::from_vec(gaussian(&mut rng, var.as_tensor().elem_count()), shape, &Device::Cpu);
            var.set(&(var.as_tensor() + noise.unwrap().affine(0.3, 0.0).unwrap()).unwrap()).unwrap();
        }
        let (b, d) = (16, 12);
        let x = Tensor::from_vec(gaussian(&mut rng, b * d), (b, d), &Device::Cpu).unwrap();
        let (g1, g2) = monet.router.route(&x, true).unwrap();
        let fast: Vec<f32> =
            monet.forward_with(&x, &g1, &g2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let slow = explicit::forward(&monet, &x, &g1, &g2).unwrap();
        let scale = slow.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1);
        for (i, (a, s)) in fast.iter().zip(&slow).enumerate() {
            assert!(
                (a - s).abs() <= 1e-4 * scale,
                "{decomposition:?} value {i}: factorised {a} vs explicit {s}"
            );
        }
        // Sparse codes: the gates of the kept experts sum to H per token (each softmax sums to 1),
        // and every head keeps at least one sub-expert per side.
        let codes = monet.codes(&g1, &g2).unwrap();
        for t in 0..b {
            let (features, values) = codes.row(t);
            assert!(!features.is_empty());
            assert!(features.iter().all(|&f| (f as usize) < 64));
            let total: f32 = values.iter().sum();
            assert!((total - 2.0).abs() < 1e-4, "token {t}: gates sum to {total}");
        }
        // About topk sub-experts per head and side are kept: at most (H·topk·…)² experts.
        let mean_active = codes.nnz() as f32 / b as f32;
        assert!(mean_active < 40.0, "{decomposition:?}: {mean_active} experts per token");
    }
}

#[test]
fn parameters_grow_as_the_square_root_of_the_experts() {
    let at = |e: usize| {
        MonetSpec {
            decomposition: Decomposition::Vertical,
            d_in: 640,
            d_out: 640,
            experts: e,
            heads: 4,
            topk: 8,
            dim: 16,
        }
        .parameters()
    };
    let ratio = at(512) as f64 / at(256) as f64;
    assert!((1.9..2.1).contains(&ratio), "4× the experts, {ratio}× the parameters");
}

/// Train one router on a single auxiliary loss and watch the quantity it is named after.
#[test]
fn uniformity_and_ambiguity_do_what_their_names_say() {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, d) = (256, 12);
    // Skewed inputs: a shared offset makes a few sub-experts win every token at first.
    let offset = gaussian(&mut rng, d);
    let xs: Vec<f32> = (0..b * d)
        .map(|i| {
            let n: f32 = StandardNormal.sample(&mut rng);
            0.3 * n + 3.0 * offset[i % d]
        })
        .collect();
    let skewed = Tensor::from_vec(xs, (b, d), &Device::Cpu).unwrap();
    // Small inputs: small logits, so each head spreads its weight over the sub-experts it keeps.
    let small =
        Tensor::from_vec(gaussian(&mut rng, b * d), (b, d), &Device::Cpu).unwrap().affine(0.05, 0.0).unwrap();
    let usage_spread = |m: &Monet| -> f32 {
        let (g1, _) = m.router.route(&skewed, true).unwrap();
        let p: Vec<f32> = g1.mean(0).unwrap().mean(0).unwrap().to_vec1().unwrap();
        p.iter().fold(0.0f32, |a, v| a.max(*v)) * p.len() as f32 // 1 when uniform
    };
    let hesitation = |m: &Monet| -> f32 {
        let (g1, _) = m.router.route(&small, true).unwrap();
        aux::ambiguity(&g1).unwrap().to_scalar::<f32>().unwrap()
    };
    let train = |which: &str, x: &Tensor| -> (Monet, Monet) {
        let before = Monet::init(spec(Decomposition::Vertical), 5).unwrap();
        let after = Monet::init(spec(Decomposition::Vertical), 5).unwrap();
        let mut opt = AdamW::new(
            after.router.vars(),
            ParamsAdamW { lr: 0.05, weight_decay: 0.0, ..Default::default() },
        )
        .unwrap();
        for _ in 0..300 {
            let (g1, g2) = after.router.route(x, true).unwrap();
            let loss = match which {
                "uniformity" => (aux::uniformity(&g1).unwrap() + aux::uniformity(&g2).unwrap()).unwrap(),
                _ => (aux::ambiguity(&g1).unwrap() + aux::ambiguity(&g2).unwrap()).unwrap(),
            };
            opt.backward_step(&loss).unwrap();
        }
        (before, after)
    };
    let (before, after) = train("uniformity", &skewed);
    let (u0, u1) = (usage_spread(&before), usage_spread(&after));
    eprintln!("uniformity: busiest sub-expert at {u0:.2}× → {u1:.2}× its fair share");
    assert!(u0 > 3.0 && u1 < 0.6 * u0, "uniformity did not balance usage: {u0} → {u1}");

    let (before, after) = train("ambiguity", &small);
    let (a0, a1) = (hesitation(&before), hesitation(&after));
    eprintln!("ambiguity: mean 1 − max gate {a0:.3} → {a1:.3}");
    assert!(a0 > 0.2 && a1 < 0.3 * a0, "ambiguity did not sharpen the routes: {a0} → {a1}");
}
