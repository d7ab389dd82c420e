//! Checks of MoE-X: the factorised forward against the explicit wide MLP, the hand-written
//! backward against finite differences, training on planted data, folding, files.

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::train::{MoexTrainConfig, MoexTrainer};
use super::*;
use crate::Dictionary;

fn spec(d_in: usize, d_out: usize, experts: usize, m: usize, k: usize) -> MoexSpec {
    MoexSpec { d_in, d_out, experts, expert_width: m, top_k: k }
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// A layer with random biases too (the router's bias terms are exercised).
fn random_moex(s: MoexSpec, seed: u64) -> Moex {
    let mut moex = Moex::init(s, seed).unwrap();
    moex.b_enc = random(moex.b_enc.len(), seed + 1, 0.3);
    moex.b_dec = random(moex.b_dec.len(), seed + 2, 0.5);
    moex
}

#[test]
fn factorised_forward_equals_the_explicit_wide_mlp() {
    for (s, tokens) in
        [(spec(16, 16, 8, 12, 2), 300), (spec(24, 10, 5, 7, 3), 97), (spec(8, 8, 2, 33, 1), 50)]
    {
        let moex = random_moex(s.clone(), 3);
        let x = random(tokens * s.d_in, 4, 2.0);
        let fw = moex.forward(&x);
        let (y, acts) = explicit::forward(&moex, &fw.routing, &x);
        let worst = fw.y.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{s:?}: factorised and explicit outputs differ by {worst}");
        // The codes are the explicit activations' non-zeros, feature by feature.
        let codes = moex.codes(&fw);
        let n = s.n_features();
        for t in 0..tokens {
            let (f, v) = codes.row(t);
            let dense: Vec<(u32, f32)> = acts[t * n..(t + 1) * n]
                .iter()
                .enumerate()
                .filter(|(_, a)| **a != 0.0)
                .map(|(i, a)| (i as u32, *a))
                .collect();
            assert_eq!(f.len(), dense.len(), "token {t}: active features differ");
            for ((fi, vi), (fj, vj)) in f.iter().zip(v).zip(&dense) {
                assert_eq!(fi, fj);
                assert!((vi - vj).abs() <= 1e-5, "token {t} feature {fi}: {vi} vs {vj}");
            }
        }
        // Each token has k distinct experts, gates summing to one.
        for t in 0..tokens {
            let sl = fw.routing.token_slots(t);
            let ids: Vec<u32> = fw.routing.expert[sl.clone()].to_vec();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "experts not ascending: {ids:?}");
            let sum: f32 = fw.routing.gate[sl].iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
    }
}

#[test]
fn the_router_prefers_the_sparsest_experts() {
    // Expert 1's units all have a large negative bias (almost never active), expert 0's a large
    // positive one: every token must go to expert 1 first.
    let s = spec(8, 8, 3, 4, 1);
    let mut moex = random_moex(s.clone(), 5);
    moex.b_enc[4..8].iter_mut().zip([-5.0, -5.1, -4.9, -5.0]).for_each(|(b, v)| *b = v);
    moex.b_enc[0..4].iter_mut().zip([5.0, 5.1, 4.9, 5.0]).for_each(|(b, v)| *b = v);
    let x = random(20 * 8, 6, 1.0);
    let r = router::route(&moex, &x);
    assert!(r.expert.iter().all(|&e| e == 1), "routing {:?}", r.expert);
    // And the estimate agrees with the real count: expert 1 is the sparsest in fact.
    let fw = moex.forward_routed(&x, r);
    assert!(fw.pre[1].iter().filter(|h| **h > 0.0).count() < fw.pre[1].len() / 10);
}

/// Central differences of the loss in one parameter, or `None` when the step changes the routing
/// or which units are active (the loss is not differentiable across those).
fn numeric(t: &mut MoexTrainer, x: &[f32], y: &[f32], get: &dyn Fn(&mut Moex) -> &mut f32) -> Option<f64> {
    let h = 1e-3f32;
    let key = |t: &MoexTrainer| {
        let fw = t.moex.forward(&x.iter().map(|v| v * t.cfg.input_scale).collect::<Vec<_>>());
        (fw.routing.expert.clone(), t.moex.codes(&fw).feature, t.loss(x, Some(y)).unwrap())
    };
    let base = key(t);
    let old = *get(&mut t.moex);
    *get(&mut t.moex) = old + h;
    let up = key(t);
    *get(&mut t.moex) = old - h;
    let down = key(t);
    *get(&mut t.moex) = old;
    if up.0 != base.0 || down.0 != base.0 || up.1 != base.1 || down.1 != base.1 {
        return None;
    }
    Some((up.2 - down.2) / (2.0 * h as f64))
}

#[test]
fn gradients_match_finite_differences() {
    let s = spec(6, 5, 4, 3, 2);
    let tokens = 12;
    for (l1, balance) in [(0.0f32, 0.0f32), (0.3, 0.5)] {
        let mut cfg = MoexTrainConfig::new(s.clone(), tokens);
        cfg.l1_coefficient = l1;
        cfg.balance_alpha = balance;
        cfg.input_scale = 1.3;
        cfg.output_scale = 0.8;
        let mut t = MoexTrainer::new(cfg).unwrap();
        t.moex = random_moex(s.clone(), 11);
        let (x, y) = (random(tokens * 6, 12, 1.5), random(tokens * 5, 13, 1.0));
        let g = t.gradients(&x, Some(&y)).unwrap();
        let close = |num: Option<f64>, ana: f32| {
            num.is_none_or(|num| (num - ana as f64).abs() <= 0.03 * num.abs().max(ana.abs() as f64) + 2e-3)
        };
        let mut checked = 0;
        let (n, d, o) = (s.n_features(), s.d_in, s.d_out);
        for f in 0..n {
            for i in 0..d {
                let num = numeric(&mut t, &x, &y, &|m: &mut Moex| &mut m.w_enc[f * d + i]);
                assert!(
                    close(num, g.w_enc[f * d + i]),
                    "W_enc[{f},{i}] numeric {num:?} analytic {} (l1 {l1})",
                    g.w_enc[f * d + i]
                );
                checked += num.is_some() as usize;
            }
            let num = numeric(&mut t, &x, &y, &|m: &mut Moex| &mut m.b_enc[f]);
            assert!(close(num, g.b_enc[f]), "b_enc[{f}] numeric {num:?} analytic {} (l1 {l1})", g.b_enc[f]);
            for j in 0..o {
                let num = numeric(&mut t, &x, &y, &|m: &mut Moex| &mut m.w_dec[f * o + j]);
                assert!(
                    close(num, g.w_dec[f * o + j]),
                    "W_dec[{f},{j}] numeric {num:?} analytic {} (l1 {l1})",
                    g.w_dec[f * o + j]
                );
                checked += num.is_some() as usize;
            }
        }
        for j in 0..o {
            let num = numeric(&mut t, &x, &y, &|m: &mut Moex| &mut m.b_dec[j]);
            assert!(close(num, g.b_dec[j]), "b_dec[{j}] numeric {num:?} analytic {}", g.b_dec[j]);
        }
        assert!(checked > 60, "only {checked} parameters checked (l1 {l1})");
    }
}

/// Sparse sums of planted directions.
fn planted(d: usize, dirs: usize, active: usize, tokens: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = random(dirs * d, seed + 100, 1.0);
    w.chunks_mut(d).for_each(crate::sae::normalize);
    let mut x = vec![0f32; tokens * d];
    for row in x.chunks_mut(d) {
        for _ in 0..active {
            let f = rng.random_range(0..dirs);
            let a = 1.0 + rng.random::<f32>() * 2.0;
            row.iter_mut().zip(&w[f * d..(f + 1) * d]).for_each(|(x, w)| *x += a * w);
        }
    }
    x
}

#[test]
fn training_reduces_the_loss_on_planted_data() {
    let (d, b) = (16, 256);
    let x = planted(d, 24, 3, b * 200, 21);
    let mut cfg = MoexTrainConfig::new(spec(d, d, 8, 8, 2), b);
    cfg.lr = 3e-3;
    let mut t = MoexTrainer::new(cfg).unwrap();
    let mut fvus = Vec::new();
    for batch in x.chunks(b * d) {
        fvus.push(t.train_step(batch, None).unwrap().fvu);
    }
    let first: f32 = fvus[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = fvus[fvus.len() - 5..].iter().sum::<f32>() / 5.0;
    assert!(last < 0.3 * first && last < 0.3, "FVU {first} → {last}");
}

#[test]
fn training_is_reproducible() {
    let (d, b) = (12, 64);
    let x = planted(d, 16, 2, b * 4, 31);
    let run = || {
        let mut t = MoexTrainer::new(MoexTrainConfig::new(spec(d, d, 6, 5, 2), b)).unwrap();
        for batch in x.chunks(b * d) {
            t.train_step(batch, None).unwrap();
        }
        t.moex
    };
    assert_eq!(run(), run());
}

#[test]
fn folding_the_scales_keeps_the_function() {
    let s = spec(10, 6, 5, 4, 2);
    let moex = random_moex(s.clone(), 41);
    let (si, so) = (2.5f32, 0.4f32);
    let raw = moex.folded(si, so);
    let x = random(30 * 10, 42, 1.0);
    let xs: Vec<f32> = x.iter().map(|v| v * si).collect();
    let (a, b) = (raw.forward(&x), moex.forward(&xs));
    assert_eq!(a.routing.expert, b.routing.expert);
    for (u, v) in a.y.iter().zip(&b.y) {
        assert!((u - v / so).abs() <= 1e-4 * (1.0 + u.abs()), "{u} vs {}", v / so);
    }
}

#[test]
fn files_round_trip_and_the_dictionary_interface() {
    let s = spec(10, 7, 4, 3, 2);
    let moex = random_moex(s.clone(), 51);
    let dir = tempfile::tempdir().unwrap();
    moex.save(dir.path()).unwrap();
    let (back, _) = io::load(dir.path()).unwrap();
    assert_eq!(back, moex);
    let x = random(9 * 10, 52, 1.0);
    let (codes, y) = back.reconstruct(&x);
    assert_eq!(y, moex.forward(&x).y);
    assert_eq!(back.experts().unwrap(), crate::ExpertLayout { n_experts: 4, features_per_expert: 3 });
    let route = back.route(&x).unwrap();
    assert_eq!(route.tokens(), 9);
    for t in 0..9 {
        let (experts, gates) = route.row(t);
        assert_eq!(experts.len(), 2);
        assert!((gates.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Every active feature belongs to a chosen expert.
        let (features, _) = codes.row(t);
        assert!(features.iter().all(|f| experts.contains(&(f / 3))));
    }
    assert_eq!(back.decoder_directions().unwrap().len(), 12 * 7);
}

#[test]
fn bad_specs_are_refused() {
    assert!(spec(8, 8, 4, 4, 4).validate().unwrap_err().to_string().contains("top-k"));
    assert!(spec(8, 8, 4, 4, 0).validate().is_err());
    assert!(spec(8, 8, 1, 4, 1).validate().is_err());
    assert!(spec(8, 8, 4, 0, 1).validate().is_err());
}

#[test]
fn a_checkpoint_resumes_to_the_same_weights() {
    use crate::job::Fit;
    let (d, b) = (12, 64);
    let x = planted(d, 16, 2, b * 6, 61);
    let y = random(b * 6 * 7, 62, 1.0);
    let mut cfg = MoexTrainConfig::new(spec(d, 7, 6, 5, 2), b);
    cfg.l1_coefficient = 0.01;
    cfg.input_scale = 1.7;
    cfg.dead_tokens = 100;
    let steps = |t: &mut MoexTrainer, range: std::ops::Range<usize>| {
        for s in range {
            t.train_step(&x[s * b * d..(s + 1) * b * d], Some(&y[s * b * 7..(s + 1) * b * 7])).unwrap();
        }
    };
    let mut straight = MoexTrainer::new(cfg.clone()).unwrap();
    steps(&mut straight, 0..6);
    let mut first = MoexTrainer::new(cfg).unwrap();
    steps(&mut first, 0..3);
    let dir = tempfile::tempdir().unwrap();
    let resume = serde_json::json!({ "epoch": 0, "batch": 3 });
    first.save_checkpoint(dir.path(), &crate::io::SaeMeta::default(), &resume).unwrap();
    let (mut resumed, back) = MoexTrainer::load_checkpoint(dir.path()).unwrap();
    assert_eq!(back, resume);
    steps(&mut resumed, 3..6);
    assert_eq!(resumed.moex, straight.moex);
    assert_eq!(resumed.state.since_fired, straight.state.since_fired);
    assert_eq!(resumed.state.moments, straight.state.moments);
}
