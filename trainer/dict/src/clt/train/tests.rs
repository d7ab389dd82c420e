//! Checks of the CLT training step: gradients against finite differences, and training that
//! recovers a planted CLT.

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::super::tests::random_clt;
use super::*;

fn batch(l: usize, tokens: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..l).map(|_| (0..tokens * d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()).collect()
}

fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// Central differences of the loss in one parameter, or `None` when the step changes which pairs
/// are selected (the loss jumps there).
fn numeric(
    t: &mut CltTrainer,
    xs: &[&[f32]],
    ys: &[&[f32]],
    get: &dyn Fn(&mut Clt) -> &mut f32,
) -> Option<f64> {
    let h = 2e-3f32;
    let frozen = t.pass(xs, ys).unwrap().residual;
    let selected = |t: &CltTrainer| {
        let p = t.pass_with(xs, ys, Some(&frozen)).unwrap();
        let keys = |c: &[Codes]| c.iter().map(|c| (c.offsets.clone(), c.feature.clone())).collect::<Vec<_>>();
        (keys(&p.codes), keys(&p.aux), p.loss)
    };
    let base = selected(t);
    let old = *get(&mut t.clt);
    *get(&mut t.clt) = old + h;
    let up = selected(t);
    *get(&mut t.clt) = old - h;
    let down = selected(t);
    *get(&mut t.clt) = old;
    if (up.0 != base.0 || up.1 != base.1) || (down.0 != base.0 || down.1 != base.1) {
        return None;
    }
    Some((up.2 - down.2) / (2.0 * h as f64))
}

#[test]
fn gradients_match_finite_differences() {
    let (l, n, d, k, tokens) = (3, 12, 6, 3, 10);
    for (auxk_alpha, dead_tokens) in [(0.0, 1_000_000), (0.5, 0)] {
        let mut cfg = CltConfig::new(0, l, d, n, k, tokens);
        cfg.auxk_alpha = auxk_alpha;
        cfg.dead_tokens = dead_tokens;
        cfg.k_aux = 4;
        cfg.input_scale = vec![1.5, 1.0, 0.7];
        cfg.output_scale = vec![0.8, 1.2, 1.0];
        let mut t = CltTrainer::new(cfg).unwrap();
        t.clt = random_clt(l, n, d, k, 7);
        let (x, y) = (batch(l, tokens, d, 1), batch(l, tokens, d, 2));
        let (xs, ys) = (refs(&x), refs(&y));
        let g = t.gradients(&xs, &ys).unwrap();
        let (mut checked, mut skipped) = (0, 0);
        let mut rng = StdRng::seed_from_u64(3);
        let close = |num: Option<f64>, ana: f32| {
            num.is_none_or(|num| (num - ana as f64).abs() <= 0.02 * num.abs().max(ana.abs() as f64) + 2e-3)
        };
        for _ in 0..60 {
            let i = rng.random_range(0..l);
            let f = rng.random_range(0..n);
            let j = rng.random_range(0..d);
            let tgt = rng.random_range(0..l - i);
            let w = (l - i) * d;
            let num = numeric(&mut t, &xs, &ys, &|c: &mut Clt| &mut c.w_dec[i][f * w + tgt * d + j]);
            let ana = g.w_dec[i][f * w + tgt * d + j];
            assert!(
                close(num, ana),
                "W_dec[{i}][{f},{tgt},{j}] numeric {num:?} analytic {ana} (aux {auxk_alpha})"
            );
            let num = numeric(&mut t, &xs, &ys, &|c: &mut Clt| &mut c.w_enc[i][f * d + j]);
            let ana = g.w_enc[i][f * d + j];
            assert!(close(num, ana), "W_enc[{i}][{f},{j}] numeric {num:?} analytic {ana} (aux {auxk_alpha})");
            let num = numeric(&mut t, &xs, &ys, &|c: &mut Clt| &mut c.b_enc[i][f]);
            assert!(close(num, g.b_enc[i][f]), "b_enc[{i}][{f}] numeric {num:?} analytic {}", g.b_enc[i][f]);
            let num = numeric(&mut t, &xs, &ys, &|c: &mut Clt| &mut c.b_dec[i][j]);
            assert!(close(num, g.b_dec[i][j]), "b_dec[{i}][{j}] numeric {num:?} analytic {}", g.b_dec[i][j]);
            checked += 1;
            skipped += [
                numeric(&mut t, &xs, &ys, &|c: &mut Clt| &mut c.w_enc[i][f * d + j]),
                numeric(&mut t, &xs, &ys, &|c: &mut Clt| &mut c.b_enc[i][f]),
            ]
            .iter()
            .filter(|n| n.is_none())
            .count();
        }
        assert_eq!(checked, 60);
        assert!(skipped < 30, "{skipped} of 120 encoder checks changed the selection");
        // Some gradients are not zero: the check is not vacuous.
        assert!(g.w_enc.iter().flatten().any(|v| v.abs() > 1e-3));
        assert!(g.w_dec.iter().flatten().any(|v| v.abs() > 1e-3));
    }
}

#[test]
fn training_recovers_a_planted_clt() {
    let (l, n, d, k, tokens) = (3, 16, 8, 3, 256);
    let teacher = random_clt(l, n, d, k, 11);
    let mut cfg = CltConfig::new(0, l, d, n, k, tokens);
    cfg.lr = 1e-2;
    cfg.seed = 5;
    cfg.dead_tokens = 2_000;
    let mut t = CltTrainer::new(cfg).unwrap();
    let (mut first, mut last) = (None, 0.0);
    for s in 0..400 {
        let x = batch(l, tokens, d, 100 + s);
        let (_, y) = teacher.forward(&refs(&x));
        let stats = t.step(&refs(&x), &refs(&y)).unwrap();
        first.get_or_insert(stats.mean_fvu());
        last = stats.mean_fvu();
        assert!((stats.l0 - k as f32).abs() < 1.0, "L0 {}", stats.l0);
    }
    let first = first.unwrap();
    assert!(last < 0.25 * first && last < 0.2, "mean FVU {first} → {last}");
    // Decoder rows stay at unit norm.
    for (i, w) in t.clt.w_dec.iter().enumerate() {
        for row in w.chunks((l - i) * d) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        }
    }
}

#[test]
fn bad_settings_are_refused() {
    let cfg = CltConfig::new(0, 2, 4, 8, 9, 16);
    assert!(CltTrainer::new(cfg).err().unwrap().to_string().contains("k = 9"));
    let mut t = CltTrainer::new(CltConfig::new(0, 2, 4, 8, 2, 16)).unwrap();
    let x = batch(2, 3, 4, 1);
    let short = vec![x[0].clone(), x[1][..8].to_vec()];
    assert!(t.step(&refs(&x), &refs(&short)).is_err());
    assert!(t.step(&refs(&x[..1]), &refs(&x[..1])).is_err());
}
