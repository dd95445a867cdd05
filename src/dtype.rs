//! Element types a tensor can hold.

use half::{bf16, f16};

use crate::error::{AttentionError, Result};

/// Element type of a [`crate::DeviceTensor`].
///
/// Attention computes on the float types (`F32`, `F16`, `BF16`); the integer types hold
/// indices and lengths (block tables, sequence lengths, cumulative offsets) and can be
/// stored, viewed, copied and transferred like any tensor, but every attention entry point
/// refuses them with [`AttentionError::DTypeMismatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 64-bit integer.
    I64,
}

/// What attention accepts, as error messages spell it.
pub(crate) const ATTENTION_DTYPES: &str = "f32, f16 or bf16";

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
        }
    }

    /// Short lowercase name, as used in kernel variant names (`f32`, `f16`, `bf16`) and
    /// messages (`i32`, `u32`, `i64`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
        }
    }

    /// Whether this is a floating-point type, one that attention computes on.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// [`AttentionError::DTypeMismatch`] naming `what` unless this is a float type.
    pub(crate) fn check_attention(self, what: &str) -> Result<()> {
        if self.is_float() {
            return Ok(());
        }
        Err(AttentionError::DTypeMismatch {
            what: what.into(),
            expected: ATTENTION_DTYPES.into(),
            got: self.to_string(),
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A host element type that maps to a [`DType`]: `f32`, `half::f16`, `half::bf16`, `i32`,
/// `u32`, `i64`.
pub trait HostElement: bytemuck::Pod + Copy + Send + Sync + 'static {
    /// The matching dtype.
    const DTYPE: DType;
    /// Widen to f32. Integers convert to the nearest f32 (exact up to 2^24 in magnitude).
    fn to_f32(self) -> f32;
    /// Round from f32. Integers take Rust's `as` conversion: toward zero, saturating at
    /// the type's bounds, NaN to 0.
    fn from_f32(v: f32) -> Self;
}

impl HostElement for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl HostElement for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl HostElement for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// The integer element types: `as` both ways (see [`HostElement`]).
macro_rules! integer_element {
    ($($t:ty => $d:ident),*) => {$(
        impl HostElement for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
        }
    )*};
}

integer_element!(i32 => I32, u32 => U32, i64 => I64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_names_and_kinds() {
        let all = [
            (DType::F32, 4, "f32", true),
            (DType::F16, 2, "f16", true),
            (DType::BF16, 2, "bf16", true),
            (DType::I32, 4, "i32", false),
            (DType::U32, 4, "u32", false),
            (DType::I64, 8, "i64", false),
        ];
        for (d, size, name, float) in all {
            assert_eq!(d.size_in_bytes(), size, "{d}");
            assert_eq!(d.name(), name);
            assert_eq!(d.to_string(), name);
            assert_eq!(d.is_float(), float, "{d}");
            assert_eq!(d.check_attention("q").is_ok(), float, "{d}");
        }
        assert_eq!(<i32 as HostElement>::DTYPE, DType::I32);
        assert_eq!(<u32 as HostElement>::DTYPE, DType::U32);
        assert_eq!(<i64 as HostElement>::DTYPE, DType::I64);
        let err = DType::I64.check_attention("mask").unwrap_err();
        assert_eq!(
            err.to_string(),
            "dtype mismatch for mask: expected f32, f16 or bf16, got i64"
        );
    }

    #[test]
    fn integer_conversions_follow_as() {
        assert_eq!(i32::from_f32(-2.7), -2);
        assert_eq!(i32::from_f32(f32::NAN), 0);
        assert_eq!(i32::from_f32(1e20), i32::MAX);
        assert_eq!(u32::from_f32(-1.0), 0);
        assert_eq!(i64::from_f32(-1e30), i64::MIN);
        assert_eq!((1i64 << 40).to_f32(), 2f32.powi(40));
        assert_eq!(u32::MAX.to_f32(), 4_294_967_296.0);
        assert_eq!((-5i32).to_f32(), -5.0);
    }
}
