//! TopK selection through a bf16 GEMM on Intel AMX tiles, with the selected values in exact f32.
//!
//! The encoder GEMM only has to *rank* features per token; the values that train the SAE are a
//! few dot products per token. So `x` and `W_enc` are rounded to bf16, multiplied on the AMX tile
//! unit (`tdpbf16ps`, f32 accumulation, several times the f32 FMA rate), and each token keeps a
//! candidate set of its `keep + margin` best approximate pre-activations while the products are
//! still in cache: no `[batch, n_features]` matrix is written. The candidates are then recomputed
//! exactly in f32 and the final top-k is taken among them, by the same rule as
//! [`super::kernels::topk_row`]. The result equals exact selection unless bf16 rounding moves a
//! true top-k feature below `keep + margin` others (the margin is ≥ 16 ranks; a test measures the
//! agreement on real-shaped data).
//!
//! Hand-written because no crate offers an AMX GEMM with a fused per-row selection, and Rust's
//! AMX intrinsics are unstable: the tile instructions are `asm!`. Linux on x86_64 only (the tile
//! data needs `arch_prctl(ARCH_REQ_XCOMP_PERM)`); elsewhere, or with `LOUPE_NO_AMX` set,
//! [`available`] is false and training uses the f32 GEMM.

use rayon::prelude::*;

/// Most tokens per parallel task (1.3 MB of bf16 rows at d 640).
const ROW_BLOCK: usize = 1024;
/// Most bytes of a task's bf16 rows: they must stay in L2 (2 MB per core here) while `W_enc`
/// streams through.
const ROW_BYTES: usize = 3 << 19;
/// Feature blocks of 32 per group: a group's bf16 weights (40 KB each at d 640) are used by every
/// 32 tokens of the task before the next group is loaded.
const GROUP: usize = 16;

/// Whether the AMX path can run here (CPU has AMX-BF16, the kernel granted the tile state, and
/// `LOUPE_NO_AMX` is unset). Checked once.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| std::env::var_os("LOUPE_NO_AMX").is_none() && imp::enable())
}

/// One line for logs: which TopK selection path training uses here.
pub fn describe() -> &'static str {
    if available() {
        "bf16 candidates on AMX, exact f32 values (LOUPE_NO_AMX=1: f32 GEMM)"
    } else {
        "f32 GEMM (no AMX-BF16 here, or LOUPE_NO_AMX set)"
    }
}

/// Candidates kept per token beyond `keep` before the exact recompute.
fn margin(keep: usize) -> usize {
    (keep / 2).max(16)
}

/// `W_enc` (`[n, d]`) rounded to bf16 and laid out as AMX B tiles: for each block of 16 features
/// and each block of 32 inputs, a 16×16 tile of bf16 pairs (`tile[r][j] = (W[j][2r], W[j][2r+1])`).
/// Features are padded to a multiple of 32 and inputs to a multiple of 32, with zeros.
#[derive(Default)]
pub struct PackedEncoder {
    tiles: Vec<u16>,
    n: usize,
    d: usize,
}

impl PackedEncoder {
    fn k_blocks(&self) -> usize {
        self.d.div_ceil(32)
    }

    fn n_padded(&self) -> usize {
        self.n.div_ceil(32) * 32
    }

    /// Repacks from `w_enc` (`[n, d]`, f32), reusing the buffer.
    pub fn pack(&mut self, w_enc: &[f32], n: usize, d: usize) {
        assert_eq!(w_enc.len(), n * d, "PackedEncoder::pack: w_enc is not [n, d]");
        (self.n, self.d) = (n, d);
        let kb = self.k_blocks();
        let tile_block = kb * 512; // 16 features × all input blocks
        self.tiles.resize(self.n_padded() / 16 * tile_block, 0);
        self.tiles.par_chunks_mut(tile_block).enumerate().for_each(|(fb, out)| {
            for j in 0..16 {
                let f = fb * 16 + j;
                let row = (f < n).then(|| &w_enc[f * d..(f + 1) * d]);
                for b in 0..kb {
                    let tile = &mut out[b * 512..(b + 1) * 512];
                    for r in 0..16 {
                        for h in 0..2 {
                            let i = b * 32 + 2 * r + h;
                            let v = row.map_or(0.0, |row| if i < d { row[i] } else { 0.0 });
                            tile[r * 32 + j * 2 + h] = bf16(v);
                        }
                    }
                }
            }
        });
    }
}

/// f32 → bf16 bits, rounding to nearest even (finite inputs; NaN is rejected before training).
#[inline(always)]
fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Per token of `x` (`[tokens, d]`, f32): the `keep` largest exact values of `x·W_enc[f] + b_enc[f]`
/// that are > 0, as `(feature, value)` in descending value order (ties: lower feature first), the
/// same rows [`super::kernels::topk_row`] would give on the exact pre-activations. `packed` must
/// hold `w_enc`. Requires [`available`].
pub fn select_topk(
    x: &[f32],
    w_enc: &[f32],
    packed: &PackedEncoder,
    b_enc: &[f32],
    keep: usize,
) -> Vec<Vec<(u32, f32)>> {
    let (n, d) = (packed.n, packed.d);
    assert!(available(), "amx::select_topk without AMX");
    assert_eq!(w_enc.len(), n * d);
    assert_eq!(b_enc.len(), n);
    assert_eq!(x.len() % d, 0);
    let tokens = x.len() / d;
    let mut bias = vec![f32::NEG_INFINITY; packed.n_padded()];
    bias[..n].copy_from_slice(b_enc);
    let job = Job { x, w_enc, b_enc, packed, bias, keep, keep_c: keep + margin(keep), select: true };
    job.run(tokens)
}

/// The bf16 products of [`select_topk`] alone, without the selection (for `loupe bench
/// train-sae`'s AMX GEMM rate): `x` (`[tokens, d]`) times the packed `W_enc`, all discarded.
pub fn products_only(x: &[f32], packed: &PackedEncoder) {
    assert!(available(), "amx::products_only without AMX");
    let bias = vec![0.0; packed.n_padded()];
    let job = Job { x, w_enc: &[], b_enc: &[], packed, bias, keep: 0, keep_c: 0, select: false };
    job.run(x.len() / packed.d);
}

/// What every row block of [`select_topk`] reads.
struct Job<'a> {
    x: &'a [f32],
    w_enc: &'a [f32],
    b_enc: &'a [f32],
    packed: &'a PackedEncoder,
    /// `b_enc` padded with −∞ to the padded feature count.
    bias: Vec<f32>,
    keep: usize,
    /// Candidates per token.
    keep_c: usize,
    /// False: compute the products only ([`products_only`]).
    select: bool,
}

impl Job<'_> {
    /// Every token's selection, in parallel over blocks of tokens.
    fn run(&self, tokens: usize) -> Vec<Vec<(u32, f32)>> {
        let per_thread = tokens.div_ceil(rayon::current_num_threads().max(1)).div_ceil(32) * 32;
        let fit = (ROW_BYTES / (self.packed.k_blocks() * 64) / 32 * 32).max(32);
        let row_block = per_thread.clamp(32, ROW_BLOCK.min(fit));
        let blocks: Vec<Vec<Vec<(u32, f32)>>> = (0..tokens.div_ceil(row_block))
            .into_par_iter()
            .map(|blk| {
                let t0 = blk * row_block;
                // SAFETY: `available()` holds, so the CPU has AMX-BF16 and AVX-512.
                unsafe { self.rows(t0, row_block.min(tokens - t0)) }
            })
            .collect();
        blocks.into_iter().flatten().collect()
    }

    /// The selections of tokens `t0..t0 + rows`.
    ///
    /// # Safety
    /// The CPU must have AMX-BF16 and AVX-512 (checked by [`available`]).
    #[cfg_attr(
        all(target_arch = "x86_64", target_os = "linux"),
        target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")
    )]
    unsafe fn rows(&self, t0: usize, rows: usize) -> Vec<Vec<(u32, f32)>> {
        let (d, packed) = (self.packed.d, self.packed);
        let (kb, np) = (packed.k_blocks(), packed.n_padded());
        let rows_p = rows.div_ceil(32) * 32;
        // A tiles: for each 16 rows and each 32 inputs, 16×32 bf16 contiguous.
        let mut xb = vec![0u16; rows_p * kb * 32];
        for t in 0..rows {
            let src = &self.x[(t0 + t) * d..(t0 + t + 1) * d];
            for (i, &v) in src.iter().enumerate() {
                xb[((t / 16) * kb + i / 32) * 512 + (t % 16) * 32 + i % 32] = bf16(v);
            }
        }
        let mut cands: Vec<Candidates> = (0..rows).map(|_| Candidates::new(self.keep_c)).collect();
        let mut c = [0f32; 32 * 32];
        imp::with_tiles(|| {
            for g0 in (0..np / 32).step_by(GROUP) {
                for sub in 0..rows_p / 32 {
                    for fc in g0..(g0 + GROUP).min(np / 32) {
                        let b = &packed.tiles[fc * 2 * kb * 512..(fc + 1) * 2 * kb * 512];
                        // SAFETY: `xb` has two row tiles of `kb` tiles from `sub · 2 · kb · 512`,
                        // `b` two 16-feature blocks of `kb` tiles; tiles are configured.
                        unsafe {
                            imp::block_32x32(
                                xb[sub * 2 * kb * 512..].as_ptr(),
                                kb * 512,
                                b.as_ptr(),
                                kb,
                                &mut c,
                            )
                        };
                        if !self.select {
                            continue;
                        }
                        let bias: &[f32; 32] = self.bias[fc * 32..fc * 32 + 32].try_into().unwrap();
                        let live = (rows - sub * 32).min(32);
                        for (r, cand) in cands[sub * 32..sub * 32 + live].iter_mut().enumerate() {
                            cand.offer(c[r * 32..r * 32 + 32].try_into().unwrap(), bias, fc * 32);
                        }
                    }
                }
            }
        });
        if !self.select {
            return Vec::new();
        }
        for cand in &mut cands {
            cand.cut();
        }
        let mut r: Vec<Vec<(u32, f32)>> = Vec::with_capacity(rows);
        for t in 0..rows {
            // The next token's W_enc rows are gathered from L3 while this token's are used.
            if let Some(next) = cands.get(t + 1) {
                for &(f, _) in &next.buf {
                    let row = &self.w_enc[f as usize * d..(f as usize + 1) * d];
                    for line in row.chunks(16) {
                        prefetch(line.as_ptr());
                    }
                }
            }
            let row = &self.x[(t0 + t) * d..(t0 + t + 1) * d];
            r.push(std::mem::take(&mut cands[t]).exact(row, self.w_enc, self.b_enc, d, self.keep));
        }
        r
    }
}

/// One token's running candidate set: every value above `floor` is kept until the buffer holds
/// `4 · keep` of them, then it is cut to the best `keep` and `floor` rises to the worst kept.
#[derive(Default)]
struct Candidates {
    keep: usize,
    floor: f32,
    buf: Vec<(u32, f32)>,
}

impl Candidates {
    fn new(keep: usize) -> Self {
        Candidates { keep, floor: f32::NEG_INFINITY, buf: Vec::with_capacity(4 * keep + 32) }
    }

    /// Offers 32 approximate pre-activations (features `f0..f0 + 32`).
    #[inline(always)]
    fn offer(&mut self, pre: &[f32; 32], bias: &[f32; 32], f0: usize) {
        let mut v = [0f32; 32];
        let mut above = 0u32;
        for j in 0..32 {
            v[j] = pre[j] + bias[j];
            above |= ((v[j] > self.floor) as u32) << j;
        }
        while above != 0 {
            let j = above.trailing_zeros() as usize;
            self.buf.push(((f0 + j) as u32, v[j]));
            above &= above - 1;
        }
        if self.buf.len() >= 4 * self.keep {
            self.cut();
        }
    }

    fn cut(&mut self) {
        if self.buf.len() > self.keep {
            self.buf.select_nth_unstable_by(self.keep - 1, |a, b| b.1.total_cmp(&a.1));
            self.buf.truncate(self.keep);
            self.floor = self.buf.iter().fold(f32::INFINITY, |m, e| m.min(e.1));
        }
    }

    /// The final top-`keep` by exact value among the candidates.
    #[inline(always)]
    fn exact(mut self, x: &[f32], w_enc: &[f32], b_enc: &[f32], d: usize, keep: usize) -> Vec<(u32, f32)> {
        self.cut();
        let mut out: Vec<(u32, f32)> = self
            .buf
            .iter()
            .map(|&(f, _)| {
                let f = f as usize;
                (f as u32, super::kernels::dot(x, &w_enc[f * d..(f + 1) * d]) + b_enc[f])
            })
            .filter(|e| e.1 > 0.0)
            .collect();
        let by_value = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if keep == 0 {
            out.clear();
        } else if out.len() > keep {
            out.select_nth_unstable_by(keep - 1, by_value);
            out.truncate(keep);
        }
        out.sort_unstable_by(by_value);
        out
    }
}

/// Hints the cache line at `p` into L2.
#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    };
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;

    /// Checks CPUID for AMX-TILE and AMX-BF16 and asks Linux for the tile data state.
    pub fn enable() -> bool {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86_64 CPU that runs Rust's std.
        let ext = unsafe { core::arch::x86_64::__cpuid_count(7, 0) };
        let (tile, bf16) = ((ext.edx >> 24) & 1 == 1, (ext.edx >> 22) & 1 == 1);
        if !(tile
            && bf16
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq"))
        {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain syscall; it only changes this process' permitted xsave features.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                 in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }

    /// Runs `f` with all eight tiles configured as 16 rows × 64 bytes, then releases them.
    pub fn with_tiles(f: impl FnOnce()) {
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1; // palette 1
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64; // bytes per row
            cfg.0[48 + t] = 16; // rows
        }
        // SAFETY: `available()` was checked by the caller; the config is a valid palette-1 one.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        f();
        // SAFETY: releases the tile state configured above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `c[32][32] = A·B` for 32 rows of `a` (bf16, `lda` elements per row, `kb·32` used) and the
    /// 32 features of two consecutive 16-feature tile blocks at `b` (each `kb` tiles of 512).
    ///
    /// # Safety
    /// Tiles configured by [`with_tiles`]; `a` readable for 32 rows of `lda ≥ kb·32`, `b` for
    /// `2·kb·512` elements.
    #[inline(always)]
    pub unsafe fn block_32x32(a: *const u16, a_half: usize, b: *const u16, kb: usize, c: &mut [f32; 1024]) {
        let (sa, sb) = (64usize, 64usize);
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            let a1 = a.add(a_half);
            let b1 = b.add(kb * 512);
            for k in 0..kb {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(k * 512),
                    a1 = in(reg) a1.add(k * 512),
                    b0 = in(reg) b.add(k * 512),
                    b1 = in(reg) b1.add(k * 512),
                    sa = in(reg) sa,
                    sb = in(reg) sb,
                    options(nostack, readonly),
                );
            }
            let p = c.as_mut_ptr();
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) p,
                c1 = in(reg) p.add(16),
                c2 = in(reg) p.add(16 * 32),
                c3 = in(reg) p.add(16 * 32 + 16),
                s = in(reg) 128usize,
                options(nostack),
            );
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub fn enable() -> bool {
        false
    }

    pub fn with_tiles(_: impl FnOnce()) {
        unreachable!("AMX is not available on this target")
    }

    pub unsafe fn block_32x32(_: *const u16, _: usize, _: *const u16, _: usize, _: &mut [f32; 1024]) {
        unreachable!("AMX is not available on this target")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels;
    use rand::{Rng, SeedableRng};

    fn data(tokens: usize, n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x = (0..tokens * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let w = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0) / (d as f32).sqrt()).collect();
        let b = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        (x, w, b)
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(bf16(-2.0), 0xc000);
        assert_eq!(f32::from_bits((bf16(1.0 + 1.0 / 256.0) as u32) << 16), 1.0); // tie → even
        assert_eq!(f32::from_bits((bf16(1.0 + 3.0 / 256.0) as u32) << 16), 1.0 + 4.0 / 256.0);
    }

    /// Odd sizes (padding in tokens, features and inputs) and a realistic shape: the AMX
    /// selection matches exact f32 selection on nearly every token, and its values are exact.
    #[test]
    fn amx_selection_matches_exact_selection() {
        if !available() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        for &(tokens, n, d, k) in &[(37, 100, 45, 5), (300, 4096, 640, 32)] {
            let (x, w, b) = data(tokens, n, d, 7);
            let mut packed = PackedEncoder::default();
            packed.pack(&w, n, d);
            let got = select_topk(&x, &w, &packed, &b, k);
            let mut pre = vec![0.0; tokens * n];
            kernels::matmul_nt(&x, &w, &mut pre, tokens, n, d, false);
            let mut same = 0;
            for t in 0..tokens {
                let (mut want, mut scratch) = (Vec::new(), Vec::new());
                kernels::topk_row(&pre[t * n..(t + 1) * n], Some(&b), k, &mut want, &mut scratch);
                let ids = |r: &[(u32, f32)]| r.iter().map(|e| e.0).collect::<Vec<_>>();
                same += (ids(&got[t]) == ids(&want)) as usize;
                for (&(f, v), &(_, _)) in got[t].iter().zip(&want) {
                    let exact = pre[t * n + f as usize] + b[f as usize];
                    assert!(
                        (v - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                        "token {t} feature {f}: {v} vs {exact}"
                    );
                }
            }
            assert!(same as f64 >= 0.99 * tokens as f64, "{same} of {tokens} tokens select exactly");
        }
    }
}
