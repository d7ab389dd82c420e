//! Checks of the sparse Monet code against the references: the forward against the explicit
//! expert-by-expert sum ([`super::explicit`]) and the candle router, the hand-written backward
//! against finite differences, the gate floor on a planted router, and reproducibility.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::sparse::{self, GATE_FLOOR, Layout, Params};
use super::train::{MonetTrainConfig, MonetTrainer};
use super::{Decomposition, Monet, MonetSpec, explicit};
use crate::Dictionary;

fn gaussian(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v: f32 = StandardNormal.sample(rng);
            scale * v
        })
        .collect()
}

fn spec(decomposition: Decomposition) -> MonetSpec {
    // Widths past 16 with a remainder: both paths of the 16-lane kernels.
    MonetSpec { decomposition, d_in: 40, d_out: 36, experts: 8, heads: 2, topk: 2, dim: 6 }
}

/// A layer with noise on every weight (non-zero biases), so that every term is exercised.
fn noisy(decomposition: Decomposition, seed: u64) -> Monet {
    let monet = Monet::init(spec(decomposition), seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed + 100);
    for var in monet.vars() {
        let t = var.as_tensor();
        let noise =
            Tensor::from_vec(gaussian(&mut rng, t.elem_count(), 0.3), t.dims(), &Device::Cpu).unwrap();
        var.set(&(t + noise).unwrap()).unwrap();
    }
    monet
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn params_round_trip_through_the_file_layout() {
    for decomposition in [Decomposition::Horizontal, Decomposition::Vertical] {
        let monet = noisy(decomposition, 1);
        let named: Vec<Vec<f32>> = monet.named().iter().map(|(_, v)| values(v.as_tensor())).collect();
        let (lay, params) = monet.sparse_params().unwrap();
        assert_eq!(params.to_named(&lay), named);
        let back = Monet::from_named(
            monet.spec.clone(),
            &named,
            [vec![0.0; 2], vec![0.0; 2]],
            [vec![1.0; 2], vec![1.0; 2]],
        )
        .unwrap();
        for ((n, a), (_, b)) in monet.named().iter().zip(back.named()) {
            assert_eq!(values(a.as_tensor()), values(b.as_tensor()), "{n}");
        }
    }
}

#[test]
fn sparse_forward_equals_the_explicit_expert_sum_and_routes_as_candle() {
    for decomposition in [Decomposition::Horizontal, Decomposition::Vertical] {
        let monet = noisy(decomposition, 1);
        let mut rng = StdRng::seed_from_u64(2);
        let (b, d, o) = (32, 40, 36);
        let x = gaussian(&mut rng, b * d, 1.0);
        let xt = Tensor::from_vec(x.clone(), (b, d), &Device::Cpu).unwrap();
        let (g1, g2) = monet.router.route(&xt, true).unwrap();
        let slow = explicit::forward(&monet, &xt, &g1, &g2).unwrap();

        // The sparse forward on candle's routes.
        let (lay, params) = monet.sparse_params().unwrap();
        let routes = sparse::Routes::from_dense(&values(&g1), &values(&g2), 2, 8);
        let (mut f, mut y) = (sparse::Forward::default(), Vec::new());
        sparse::forward_routed(&params, &lay, &x, routes, &mut f, &mut y);
        let scale = slow.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1);
        assert_eq!(y.len(), b * o);
        for (i, (a, s)) in y.iter().zip(&slow).enumerate() {
            assert!((a - s).abs() <= 1e-4 * scale, "{decomposition:?} value {i}: sparse {a} vs explicit {s}");
        }

        // The sparse router selects and gates as candle's (batch statistics).
        let mut z = Default::default();
        sparse::logits(&params, &lay, &x, &mut z);
        let norm = sparse::batch_norm(&lay, &z);
        let mine = sparse::select(&lay, &z, &norm);
        let theirs = sparse::Routes::from_dense(&values(&g1), &values(&g2), 2, 8);
        assert_eq!(mine.offsets, theirs.offsets, "{decomposition:?}: different selections");
        assert_eq!(mine.id, theirs.id);
        for (a, b) in mine.gate.iter().zip(&theirs.gate) {
            assert!((a - b).abs() < 1e-5, "{decomposition:?}: gate {a} vs {b}");
        }
        // About topk per head and side, at least one.
        let kept = mine.id.len() as f32 / (b * 2 * 2) as f32;
        assert!((1.0..4.0).contains(&kept), "{kept} kept per head");

        // Inference: the sparse path equals candle's factorised forward on the running statistics.
        let (codes, y) = monet.reconstruct(&x);
        let want = values(&monet.forward(&xt).unwrap());
        for (a, s) in y.iter().zip(&want) {
            assert!((a - s).abs() <= 1e-4 * scale, "{decomposition:?}: reconstruct {a} vs {s}");
        }
        assert_eq!(codes.tokens(), b);
    }
}

/// Central differences of the loss (selection held fixed) against the hand-written gradients, on
/// a sample of every weight tensor.
fn check_gradients(decomposition: Decomposition) {
    let spec = spec(decomposition);
    let (b, d, o) = (48, spec.d_in, spec.d_out);
    let mut rng = StdRng::seed_from_u64(7);
    let mut cfg = MonetTrainConfig::new(spec, b);
    cfg.uniformity_alpha = 0.3;
    cfg.ambiguity_alpha = 0.2;
    let mut t = MonetTrainer::new(cfg).unwrap();
    // Non-zero biases and larger weights, so that every term matters.
    for w in t.params.tensors_mut() {
        let noise = gaussian(&mut rng, w.len(), 0.3);
        w.iter_mut().zip(noise).for_each(|(w, n)| *w += n);
    }
    let x = gaussian(&mut rng, b * d, 1.0);
    let y = gaussian(&mut rng, b * o, 1.0);
    let (loss0, grads) = t.gradients(&x, Some(&y)).unwrap();
    let grads: Params = grads.clone();
    assert!(loss0.fvu > 0.0 && loss0.uniformity > 0.0 && loss0.ambiguity > 0.0, "{loss0:?}");
    let routes0 = t.last_routes().clone();
    let eps = 1e-3f32;
    let (mut checked, mut worst) = (0, 0.0f64);
    let n_tensors = grads.tensors().len();
    for ti in 0..n_tensors {
        let analytic = grads.tensors()[ti].clone();
        let scale = analytic.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        assert!(scale > 0.0, "{decomposition:?}: tensor {ti} has no gradient");
        for _ in 0..30 {
            let i = rng.random_range(0..analytic.len());
            let mut eval = |delta: f32| {
                let old = t.params.tensors_mut()[ti][i];
                t.params.tensors_mut()[ti][i] = old + delta;
                let (loss, _) = t.gradients(&x, Some(&y)).unwrap();
                let loss = loss.total();
                let same = t.last_routes().id == routes0.id && t.last_routes().offsets == routes0.offsets;
                t.params.tensors_mut()[ti][i] = old;
                (loss, same)
            };
            let ((plus, s1), (minus, s2)) = (eval(eps), eval(-eps));
            if !(s1 && s2) {
                continue; // the perturbation moved the selection
            }
            let fd = (plus - minus) / (2.0 * eps as f64);
            let err = (fd - analytic[i] as f64).abs() / scale;
            worst = worst.max(err);
            assert!(
                err < 3e-3,
                "{decomposition:?} tensor {ti} index {i}: finite difference {fd:e} vs analytic {:e} (scale {scale:e})",
                analytic[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 20 * n_tensors, "{decomposition:?}: only {checked} weights checked");
    eprintln!("{decomposition:?}: {checked} weights, worst error {worst:.2e} of the largest gradient");
}

#[test]
fn vertical_backward_matches_finite_differences() {
    check_gradients(Decomposition::Vertical);
}

#[test]
fn horizontal_backward_matches_finite_differences() {
    check_gradients(Decomposition::Horizontal);
}

/// One head, E 4, topk 2 (σ = 0): the logits are [100, 60, −80, −80] on every token, so sub-expert
/// 1 is kept (its normalised logit is above 0) with a gate e^−40 ≈ 4e-18 on each side.
fn planted() -> Monet {
    let spec = MonetSpec {
        decomposition: Decomposition::Vertical,
        d_in: 3,
        d_out: 4,
        experts: 4,
        heads: 1,
        topk: 2,
        dim: 2,
    };
    let monet = Monet::init(spec, 0).unwrap();
    let mut w = vec![0.0f32; 3 * 4];
    w[..4].copy_from_slice(&[100.0, 60.0, -80.0, -80.0]);
    for r in 0..2 {
        monet.router.w[r].set(&Tensor::from_vec(w.clone(), (3, 4), &Device::Cpu).unwrap()).unwrap();
    }
    monet
}

#[test]
fn gates_below_the_floor_are_not_active() {
    let monet = planted();
    let x: Vec<f32> = (0..16).flat_map(|t| [1.0, 0.1 * t as f32, -0.05 * t as f32]).collect();
    let xt = Tensor::from_vec(x.clone(), (16, 3), &Device::Cpu).unwrap();
    // Running statistics mean 0, variance 1: σ = 0 keeps sub-experts 0 and 1 on both sides.
    let (g1, g2) = monet.router.route(&xt, false).unwrap();
    let (a, b) = (values(&g1), values(&g2));
    assert!(a[1] > 0.0 && a[1] < 1e-15 && b[1] > 0.0, "the planted gate is {}", a[1]);
    // Four experts have a non-zero gate on each token; only (0, 0) is above the floor.
    let nonzero: usize = (0..16).map(|t| (0..4).filter(|&i| a[t * 4 + i] > 0.0).count().pow(2)).sum();
    assert_eq!(nonzero, 4 * 16);
    let codes = monet.encode(&x);
    for t in 0..16 {
        let (f, v) = codes.row(t);
        assert_eq!(f, &[0], "token {t}");
        assert!((v[0] - 1.0).abs() < 1e-6 && v[0] > GATE_FLOOR);
    }
    // L0 and dead fraction as an evaluation counts them: 1 expert per token, 15 of 16 dead.
    let l0 = codes.nnz() as f64 / 16.0;
    let mut fires = [0u32; 16];
    codes.feature.iter().for_each(|&f| fires[f as usize] += 1);
    let dead = fires.iter().filter(|&&c| c == 0).count();
    assert_eq!((l0, dead), (1.0, 15));
    assert_eq!(monet.route(&x).unwrap(), codes);
    // The reconstruction still uses every gate: it equals the explicit sum with all four experts.
    let (_, y) = monet.reconstruct(&x);
    let slow = explicit::forward(&monet, &xt, &g1, &g2).unwrap();
    for (p, q) in y.iter().zip(&slow) {
        assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()));
    }

    // Training counts the same way: the batch's statistics keep sub-experts 0 and 1 as well
    // (normalised logits 1.4 and 0.9 vs σ = 0), and the step's L0 is 1, its dead fraction 15/16.
    let mut cfg = MonetTrainConfig::new(monet.spec.clone(), 16);
    cfg.dead_tokens = 1;
    let mut trainer = MonetTrainer::new(cfg).unwrap();
    trainer.params.router = planted().sparse_params().unwrap().1.router;
    let target: Vec<f32> = (0..16 * 4).map(|i| (i % 7) as f32).collect();
    let stats = trainer.train_step(&x, Some(&target)).unwrap();
    let kept: Vec<u32> = trainer.last_routes().id[..2].to_vec();
    assert_eq!(kept, [0, 1]);
    assert_eq!((stats.l0, stats.dead_fraction), (1.0, 15.0 / 16.0));
}

#[test]
fn codes_count_the_gate_mass_not_the_kept_pairs() {
    // Two heads; head 0 splits 0.5/0.5 on both sides, head 1 keeps a tiny second sub-expert.
    let e = 4;
    let g1 = [0.5, 0.5, 0.0, 0.0, /* head 1 */ 1.0 - 1e-9, 0.0, 0.0, 1e-9];
    let g2 = [0.5, 0.0, 0.5, 0.0, /* head 1 */ 0.0, 1.0, 0.0, 0.0];
    let codes = sparse::codes(&sparse::Routes::from_dense(&g1, &g2, 2, e), e);
    let (f, v) = codes.row(0);
    // (0,0) (0,2) (1,0) (1,2) at 0.25 from head 0, (0,1) at ~1 from head 1; (3,1) at 1e-9 is not
    // (features i·4 + j).
    assert_eq!(f, &[0, 1, 2, 4, 6]);
    assert!((v.iter().sum::<f32>() - 2.0).abs() < 1e-6);
}

#[test]
fn training_is_reproducible_across_thread_counts() {
    let mut rng = StdRng::seed_from_u64(3);
    let spec = spec(Decomposition::Vertical);
    let data: Vec<Vec<f32>> = (0..3).map(|_| gaussian(&mut rng, 64 * spec.d_in, 1.0)).collect();
    let run = |threads: usize| -> Vec<Vec<f32>> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut t = MonetTrainer::new(MonetTrainConfig::new(spec.clone(), 64)).unwrap();
            let target: Vec<f32> = data[0][..64 * spec.d_out].to_vec();
            for x in &data {
                t.train_step(x, Some(&target)).unwrap();
            }
            t.params.tensors().into_iter().cloned().collect()
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn layout_matches_the_spec() {
    let lay = Layout::of(&spec(Decomposition::Vertical));
    assert_eq!((lay.k, lay.out[0].as_ref().unwrap().1.cw), (3, 7));
    let lay = Layout::of(&spec(Decomposition::Horizontal));
    assert_eq!((lay.k, lay.out[1].as_ref().unwrap().1.cw), (6, 7));
}

/// The hand-written loss and gradients equal candle's autograd on the candle formulation (the
/// factorised forward, [`super::aux`]'s losses): what training computed before the rewrite.
#[test]
fn gradients_equal_candle_autograd() {
    for decomposition in [Decomposition::Horizontal, Decomposition::Vertical] {
        let spec = spec(decomposition);
        let (b, d, o) = (48, spec.d_in, spec.d_out);
        let mut rng = StdRng::seed_from_u64(9);
        let mut cfg = MonetTrainConfig::new(spec.clone(), b);
        cfg.uniformity_alpha = 0.3;
        cfg.ambiguity_alpha = 0.2;
        let mut t = MonetTrainer::new(cfg).unwrap();
        for w in t.params.tensors_mut() {
            let noise = gaussian(&mut rng, w.len(), 0.3);
            w.iter_mut().zip(noise).for_each(|(w, n)| *w += n);
        }
        let x = gaussian(&mut rng, b * d, 1.0);
        let y = gaussian(&mut rng, b * o, 1.0);
        let (loss, grads) = t.gradients(&x, Some(&y)).unwrap();
        let lay = Layout::of(&spec);
        let mine = grads.to_named(&lay);

        let monet = t.monet().unwrap();
        let xt = Tensor::from_vec(x, (b, d), &Device::Cpu).unwrap();
        let yt = Tensor::from_vec(y.clone(), (b, o), &Device::Cpu).unwrap();
        let (g1, g2) = monet.router.route(&xt, true).unwrap();
        let out = monet.forward_with(&xt, &g1, &g2).unwrap();
        let denom = crate::train::total_variance(&y, o);
        let fvu = ((out - &yt).unwrap().sqr().unwrap().sum_all().unwrap() / denom).unwrap();
        let u = ((super::aux::uniformity(&g1).unwrap() + super::aux::uniformity(&g2).unwrap()).unwrap()
            * 0.5)
            .unwrap();
        let a = ((super::aux::ambiguity(&g1).unwrap() + super::aux::ambiguity(&g2).unwrap()).unwrap() * 0.5)
            .unwrap();
        let total = ((&fvu + (u * 0.3).unwrap()).unwrap() + (a * 0.2).unwrap()).unwrap();
        let theirs = total.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (loss.total() - theirs).abs() < 1e-5 * theirs,
            "{decomposition:?}: loss {} vs candle {theirs}",
            loss.total()
        );
        let grads = total.backward().unwrap();
        for ((name, var), mine) in monet.named().iter().zip(&mine) {
            let want = values(grads.get(var.as_tensor()).unwrap());
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (p, q)) in mine.iter().zip(&want).enumerate() {
                assert!((p - q).abs() <= 1e-4 * scale, "{decomposition:?} {name}[{i}]: {p} vs candle {q}");
            }
        }
    }
}
