//! The inner loops of the sparse Monet passes, on 16-lane chunks (one AVX-512 register) and on
//! groups of entries that share a weight row, so that each row loaded from cache serves several
//! tokens. Hand-written because the passes gather rows by token (no BLAS call fits), and candle's
//! ops would materialise every gathered matrix. Inlined into the `multiversion` callers.

/// Lanes per chunk.
const L: usize = 16;

/// `[a·x_g for g]`: G dot products sharing `a` (read from L1 again for each).
#[inline(always)]
pub fn dots<const G: usize>(a: &[f32], xs: [&[f32]; G]) -> [f32; G] {
    // A plain loop: `array::map`'s closure may not be inlined into the caller's SIMD version.
    let mut out = [0.0f32; G];
    for g in 0..G {
        out[g] = dot16(a, xs[g]);
    }
    out
}

/// `a·x` in 16 lanes.
#[inline(always)]
fn dot16(a: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; L];
    let (ac, ar) = a.as_chunks::<L>();
    let (xc, xr) = x[..a.len()].as_chunks::<L>();
    for (a, x) in ac.iter().zip(xc) {
        for l in 0..L {
            acc[l] += a[l] * x[l];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(xr).map(|(a, x)| a * x).sum::<f32>()
}

/// `y += Σ_g c_g·x_g`, accumulating in registers.
#[inline(always)]
pub fn axpys<const G: usize>(c: [f32; G], xs: [&[f32]; G], y: &mut [f32]) {
    let n = y.len() / L * L;
    let (yc, yr) = y.as_chunks_mut::<L>();
    for (j, y) in yc.iter_mut().enumerate() {
        let mut acc = *y;
        for g in 0..G {
            let x: &[f32; L] = xs[g][j * L..j * L + L].try_into().expect("16 lanes");
            for l in 0..L {
                acc[l] += c[g] * x[l];
            }
        }
        *y = acc;
    }
    for (i, y) in yr.iter_mut().enumerate() {
        for g in 0..G {
            *y += c[g] * xs[g][n + i];
        }
    }
}

/// `y += Σ_r c[r]·rows[r]` (`rows` is `[c.len(), y.len()]`), accumulating in registers.
#[inline(always)]
pub fn combine(c: &[f32], rows: &[f32], y: &mut [f32]) {
    let w = y.len();
    let n = w / L * L;
    let (yc, yr) = y.as_chunks_mut::<L>();
    for (j, y) in yc.iter_mut().enumerate() {
        let mut acc = *y;
        for (r, &a) in c.iter().enumerate() {
            let row = &rows[r * w + j * L..r * w + j * L + L];
            for l in 0..L {
                acc[l] += a * row[l];
            }
        }
        *y = acc;
    }
    for (i, y) in yr.iter_mut().enumerate() {
        for (r, &a) in c.iter().enumerate() {
            *y += a * rows[r * w + n + i];
        }
    }
}
