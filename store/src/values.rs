//! Activation vectors in either stored element type: owned ([`Values`]) or borrowed ([`ValuesRef`]).
//!
//! Rows are contiguous: row `i` of a width-`d` table is `[i * d, (i + 1) * d)`.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::manifest::DType;

/// Owned activation values, flat `[rows * d]`.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

/// Borrowed activation values, flat `[rows * d]` (from a memory-mapped shard or a [`Values`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValuesRef<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl Values {
    pub fn new(dtype: DType) -> Values {
        match dtype {
            DType::F16 => Values::F16(Vec::new()),
            DType::F32 => Values::F32(Vec::new()),
        }
    }

    pub fn dtype(&self) -> DType {
        self.as_ref().dtype()
    }

    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_ref(&self) -> ValuesRef<'_> {
        match self {
            Values::F16(v) => ValuesRef::F16(v),
            Values::F32(v) => ValuesRef::F32(v),
        }
    }

    pub fn clear(&mut self) {
        match self {
            Values::F16(v) => v.clear(),
            Values::F32(v) => v.clear(),
        }
    }

    pub fn truncate(&mut self, len: usize) {
        match self {
            Values::F16(v) => v.truncate(len),
            Values::F32(v) => v.truncate(len),
        }
    }

    /// Append `src[range]`; both sides must have the same element type.
    pub fn extend_from(&mut self, src: ValuesRef<'_>, range: std::ops::Range<usize>) {
        match (self, src) {
            (Values::F16(dst), ValuesRef::F16(src)) => dst.extend_from_slice(&src[range]),
            (Values::F32(dst), ValuesRef::F32(src)) => dst.extend_from_slice(&src[range]),
            _ => panic!("Values::extend_from: element types differ"),
        }
    }
}

impl<'a> ValuesRef<'a> {
    pub fn dtype(&self) -> DType {
        match self {
            ValuesRef::F16(_) => DType::F16,
            ValuesRef::F32(_) => DType::F32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ValuesRef::F16(v) => v.len(),
            ValuesRef::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i` of a width-`d` table.
    pub fn row(&self, i: usize, d: usize) -> ValuesRef<'a> {
        match self {
            ValuesRef::F16(v) => ValuesRef::F16(&v[i * d..(i + 1) * d]),
            ValuesRef::F32(v) => ValuesRef::F32(&v[i * d..(i + 1) * d]),
        }
    }

    /// Rows `rows` of a width-`d` table.
    pub fn rows(&self, rows: std::ops::Range<usize>, d: usize) -> ValuesRef<'a> {
        match self {
            ValuesRef::F16(v) => ValuesRef::F16(&v[rows.start * d..rows.end * d]),
            ValuesRef::F32(v) => ValuesRef::F32(&v[rows.start * d..rows.end * d]),
        }
    }

    /// The raw bytes (for hashing and bit-exact comparisons).
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            ValuesRef::F16(v) => bytemuck::cast_slice(v),
            ValuesRef::F32(v) => bytemuck::cast_slice(v),
        }
    }

    /// Widen to f32 into `out` (cleared first). f16 uses the F16C/NEON conversion when available.
    pub fn to_f32_into(&self, out: &mut Vec<f32>) {
        out.clear();
        match self {
            ValuesRef::F32(v) => out.extend_from_slice(v),
            ValuesRef::F16(v) => {
                out.resize(v.len(), 0.0);
                v.convert_to_f32_slice(out);
            }
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.to_f32_into(&mut out);
        out
    }

    /// Element `i` as f32.
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            ValuesRef::F16(v) => v[i].to_f32(),
            ValuesRef::F32(v) => v[i],
        }
    }

    /// The index of the first NaN or infinite element. Blocks are scanned with a branch-free
    /// test on the exponent bits (vectorised by the compiler), so a clean shard costs one pass at
    /// memory speed.
    pub fn first_non_finite(&self) -> Option<usize> {
        const BLOCK: usize = 4096;
        fn find<T: Copy>(v: &[T], bad: impl Fn(T) -> bool) -> Option<usize> {
            v.chunks(BLOCK).enumerate().find_map(|(b, chunk)| {
                let any = chunk.iter().fold(false, |acc, &x| acc | bad(x));
                any.then(|| b * BLOCK + chunk.iter().position(|&x| bad(x)).expect("found"))
            })
        }
        match self {
            ValuesRef::F16(v) => find(v, |x: f16| x.to_bits() & 0x7c00 == 0x7c00),
            ValuesRef::F32(v) => find(v, |x: f32| x.to_bits() & 0x7f80_0000 == 0x7f80_0000),
        }
    }
}

/// An element type callers may hand to the writer: f32 or f16. Values are converted to the
/// hook's stored type on the way in.
pub trait Element: Copy + sealed::Sealed {
    /// Append `src` to `dst`, converting to `dst`'s element type.
    fn append_converted(src: &[Self], dst: &mut Values);
    fn is_finite(self) -> bool;
    fn to_f32(self) -> f32;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

impl Element for f32 {
    fn append_converted(src: &[f32], dst: &mut Values) {
        match dst {
            Values::F32(v) => v.extend_from_slice(src),
            Values::F16(v) => {
                let start = v.len();
                v.resize(start + src.len(), f16::ZERO);
                v[start..].convert_from_f32_slice(src);
            }
        }
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    fn append_converted(src: &[f16], dst: &mut Values) {
        match dst {
            Values::F16(v) => v.extend_from_slice(src),
            Values::F32(v) => {
                let start = v.len();
                v.resize(start + src.len(), 0.0);
                src.convert_to_f32_slice(&mut v[start..]);
            }
        }
    }
    fn is_finite(self) -> bool {
        f16::is_finite(self)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
