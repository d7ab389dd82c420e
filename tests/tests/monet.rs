//! Monet experts: the factorised forward against the explicit N-expert sum, the sparse codes, and
//! the auxiliary losses.

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use loupe_dict::monet::{Decomposition, Monet, MonetSpec, aux, explicit};
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

fn batch(rng: &mut StdRng, teacher: &Monet, b: usize) -> (Vec<f32>, Vec<f32>) {
    let d = teacher.spec.d_in;
    let x = gaussian(rng, b * d);
    let xt = Tensor::from_vec(x.clone(), (b, d), &Device::Cpu).unwrap();
    let (g1, g2) = teacher.router.route(&xt, true).unwrap();
    let y = teacher.forward_with(&xt, &g1, &g2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    (x, y)
}

/// A transcoder learns a teacher Monet's map; saved and resumed, it continues exactly.
#[test]
fn training_fits_a_teacher_and_resumes_exactly() {
    use loupe_dict::io::SaeMeta;
    use loupe_dict::job::Fit;
    use loupe_dict::monet::train::{MonetTrainConfig, MonetTrainer};
    for decomposition in [Decomposition::Horizontal, Decomposition::Vertical] {
        let mut rng = StdRng::seed_from_u64(8);
        let teacher = Monet::init(spec(decomposition), 99).unwrap();
        let data: Vec<(Vec<f32>, Vec<f32>)> = (0..12).map(|_| batch(&mut rng, &teacher, 128)).collect();
        let mut cfg = MonetTrainConfig::new(spec(decomposition), 128);
        cfg.lr = 1e-2;
        let mut straight = MonetTrainer::new(cfg.clone()).unwrap();
        let first = straight.train_step(&data[0].0, Some(&data[0].1)).unwrap();
        let mut last = first;
        for _ in 0..20 {
            for (x, y) in &data {
                last = straight.train_step(x, Some(y)).unwrap();
            }
        }
        eprintln!("{decomposition:?}: FVU {} → {}, {} experts per token", first.fvu, last.fvu, last.l0);
        assert!(last.fvu < 0.5 * first.fvu, "{decomposition:?}: FVU {} → {}", first.fvu, last.fvu);

        // Stop after 5 steps, save, load, continue: the same weights as 10 straight steps.
        let mut a = MonetTrainer::new(cfg.clone()).unwrap();
        let mut b = MonetTrainer::new(cfg.clone()).unwrap();
        for (x, y) in &data[..5] {
            a.train_step(x, Some(y)).unwrap();
            b.train_step(x, Some(y)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        b.save_checkpoint(dir.path(), &SaeMeta::default(), &serde_json::json!({})).unwrap();
        let (mut b, _) = MonetTrainer::load_checkpoint(dir.path()).unwrap();
        for (x, y) in &data[5..10] {
            a.train_step(x, Some(y)).unwrap();
            b.train_step(x, Some(y)).unwrap();
        }
        let (ma, mb) = (a.monet().unwrap(), b.monet().unwrap());
        for ((na, va), (_, vb)) in ma.named().iter().zip(mb.named()) {
            let (va, vb): (Vec<f32>, Vec<f32>) = (
                va.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
                vb.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(va, vb, "{decomposition:?}: {na} differs after resuming");
        }
        assert_eq!(a.running, b.running);
        assert_eq!(a.state.m, b.state.m);
    }
}

/// The folded layer reads raw activations as the trained one reads scaled ones.
#[test]
fn folded_monet_reads_raw_activations() {
    use loupe_dict::Dictionary;
    let mut rng = StdRng::seed_from_u64(12);
    let monet = Monet::init(spec(Decomposition::Vertical), 3).unwrap();
    let (s_in, s_out) = (0.01f32, 0.5f32);
    let raw = gaussian(&mut rng, 32 * 12).iter().map(|v| v * 100.0).collect::<Vec<f32>>();
    let scaled: Vec<f32> = raw.iter().map(|v| v * s_in).collect();
    let (ca, ya) = monet.reconstruct(&scaled);
    let (cb, yb) = monet.folded(s_in, s_out).unwrap().reconstruct(&raw);
    assert_eq!(ca.feature, cb.feature);
    for (a, b) in ya.iter().zip(&yb) {
        assert!((a / s_out - b).abs() <= 1e-3 * (1.0 + b.abs()), "{a}/s_out vs {b}");
    }
}

#[test]
fn mean_feature_outputs_are_each_experts_mean_output_by_the_factorised_forward() {
    use loupe_dict::Dictionary;
    for decomposition in [Decomposition::Horizontal, Decomposition::Vertical] {
        let spec = spec(decomposition);
        let monet = Monet::init(spec.clone(), 3).unwrap();
        let mut rng = StdRng::seed_from_u64(4);
        let (e, h, d, o) = (spec.experts, spec.heads, spec.d_in, spec.d_out);
        // Two inputs for every expert (a few get none).
        let inputs: Vec<Vec<f32>> =
            (0..e * e).map(|f| if f % 7 == 3 { Vec::new() } else { gaussian(&mut rng, 2 * d) }).collect();
        let got = monet.mean_feature_outputs(&inputs).unwrap();
        for (f, xs) in inputs.iter().enumerate() {
            let (i, j) = (f / e, f % e);
            let mut want = vec![0.0f32; o];
            for x in xs.chunks(d) {
                // Gate 1 on expert (i, j) alone: head 0 picks sub-experts i and j, the others none.
                let (mut g1, mut g2) = (vec![0.0f32; h * e], vec![0.0f32; h * e]);
                g1[i] = 1.0;
                g2[j] = 1.0;
                let t = |g: Vec<f32>| Tensor::from_vec(g, (1, h, e), &Device::Cpu).unwrap();
                let xt = Tensor::from_slice(x, (1, d), &Device::Cpu).unwrap();
                let y: Vec<f32> = monet
                    .forward_with(&xt, &t(g1), &t(g2))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                want.iter_mut().zip(y).for_each(|(w, v)| *w += v / 2.0);
            }
            for (a, b) in got[f * o..(f + 1) * o].iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{decomposition:?} expert {f}: {a} vs {b}");
            }
        }
    }
}
