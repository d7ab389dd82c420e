//! The metrics the scorers report.

/// Mean of the true-positive and true-negative rates (a rate whose class is absent is left out).
pub fn balanced_accuracy(pred: &[bool], truth: &[bool]) -> Option<f32> {
    let rate = |class: bool| {
        let n = truth.iter().filter(|&&t| t == class).count();
        let hit = pred.iter().zip(truth).filter(|(p, t)| **t == class && **p == class).count();
        (n > 0).then(|| hit as f32 / n as f32)
    };
    match (rate(true), rate(false)) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    }
}

/// F1 of the positive class (0 when nothing is predicted or true positive).
pub fn f1(pred: &[bool], truth: &[bool]) -> Option<f32> {
    if pred.is_empty() {
        return None;
    }
    let tp = pred.iter().zip(truth).filter(|(p, t)| **p && **t).count() as f32;
    let fp = pred.iter().zip(truth).filter(|(p, t)| **p && !**t).count() as f32;
    let fn_ = pred.iter().zip(truth).filter(|(p, t)| !**p && **t).count() as f32;
    Some(if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fn_) })
}

/// Area under the ROC curve of `scores` separating true from false: the probability that a
/// random positive scores above a random negative (ties count half). None without both classes.
pub fn auroc(scores: &[f32], truth: &[bool]) -> Option<f32> {
    let pos: Vec<f32> = scores.iter().zip(truth).filter(|(_, t)| **t).map(|(s, _)| *s).collect();
    let neg: Vec<f32> = scores.iter().zip(truth).filter(|(_, t)| !**t).map(|(s, _)| *s).collect();
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut wins = 0.0f64;
    for p in &pos {
        for n in &neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    Some((wins / (pos.len() * neg.len()) as f64) as f32)
}

/// Pearson correlation; None when either side is constant.
pub fn pearson(x: &[f32], y: &[f32]) -> Option<f32> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let mean = |v: &[f32]| v[..n].iter().map(|&a| a as f64).sum::<f64>() / n as f64;
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (x[i] as f64 - mx, y[i] as f64 - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    (sxx > 0.0 && syy > 0.0).then(|| (sxy / (sxx * syy).sqrt()) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_known_cases() {
        let truth = [true, true, false, false];
        assert_eq!(balanced_accuracy(&[true, false, false, false], &truth), Some(0.75));
        assert_eq!(f1(&[true, false, true, false], &truth), Some(0.5));
        assert_eq!(auroc(&[0.9, 0.4, 0.4, 0.1], &truth), Some(0.875));
        assert_eq!(auroc(&[0.9, 0.8], &[true, true]), None);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]).unwrap() - 0.9986).abs() < 1e-3);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
    }
}
