//! The one decision of which GPU path runs a problem. `forward`, `supports` and every
//! report ask [`plan`]; nothing else chooses.

use crate::backend::{AttentionPath, FlashKernel};
use crate::dtype::DType;
use crate::kernels::{self, FlashTile, KernelFile, TileVendor};
use crate::problem::AttentionProblem;
use crate::tensor::DeviceTensor;

use super::decode_plan::{decode_bucket, decode_smem_bytes, MAX_DECODE_QUERIES};

/// Largest head dimension a flash kernel is built for.
pub const MAX_FLASH_HEAD_DIM: usize = 256;

/// What [`plan`] needs to know about a problem; the same for a full problem and for a
/// config-only question ("would a masked call of this config use flash?").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanInput {
    /// Element type.
    pub dtype: DType,
    /// Head dimension.
    pub head_dim: usize,
    /// Causal masking.
    pub causal: bool,
    /// An additive mask is given.
    pub has_mask: bool,
    /// Queries per sequence.
    pub seq_q: usize,
    /// f32 may run in TF32 on the tensor cores (opt-in; only where the device has them).
    pub tf32: bool,
    /// K and V rows can be read in 16-byte vectors (base addresses, strides and head_dim in
    /// whole 16-byte units, see [`vectors_aligned`]); the decode kernel needs that, the
    /// prefill kernels check it themselves and copy element-wise otherwise.
    pub kv_aligned: bool,
}

impl PlanInput {
    /// The plan input of a validated problem.
    pub fn of(p: &AttentionProblem) -> Self {
        PlanInput {
            dtype: p.dtype,
            head_dim: p.head_dim,
            causal: p.causal,
            has_mask: p.mask.is_some(),
            seq_q: p.seq_q,
            tf32: false,
            kv_aligned: true,
        }
    }

    /// The plan input of a validated problem over these K and V tensors.
    pub fn of_call(p: &AttentionProblem, k: &DeviceTensor, v: &DeviceTensor) -> Self {
        PlanInput {
            kv_aligned: vectors_aligned(k) && vectors_aligned(v),
            ..Self::of(p)
        }
    }
}

/// Whether every row of `t` (dims before the last) starts on a 16-byte boundary and its
/// last dim is a whole number of 16-byte vectors: what 16-byte vector loads need.
pub fn vectors_aligned(t: &DeviceTensor) -> bool {
    let es = t.dtype().size_in_bytes();
    let rank = t.rank();
    t.device_ptr().is_multiple_of(16)
        && t.shape()
            .last()
            .is_some_and(|&d| (d * es).is_multiple_of(16))
        && t.strides()[..rank.saturating_sub(1)]
            .iter()
            .zip(t.shape())
            .all(|(&s, &n)| n == 1 || (s * es).is_multiple_of(16))
}

/// A flash launch: the kernel family and, for the prefill families, its tile
/// configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashChoice {
    /// Kernel family.
    pub kernel: FlashKernel,
    /// Tile configuration from kernels/flash_config.h (prefill families only).
    pub tile: Option<&'static FlashTile>,
}

impl FlashChoice {
    /// Source file of the chosen family.
    pub fn file(&self) -> KernelFile {
        match self.kernel {
            FlashKernel::NonCausal => KernelFile::FlashNoCausal,
            FlashKernel::Causal => KernelFile::FlashCausal,
            FlashKernel::Masked | FlashKernel::Decode => KernelFile::FlashMasked,
        }
    }
}

/// The path a problem takes, with the reason when it is not flash.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The path.
    pub path: AttentionPath,
    /// The flash launch, when the path is flash.
    pub flash: Option<FlashChoice>,
    /// Why flash was not used (None when it is).
    pub fallback_reason: Option<String>,
}

/// The flash family for a problem: Decode for short unmasked query blocks over K/V it can
/// read in 16-byte vectors, else Causal / NonCausal without a mask and Masked with one.
pub fn select_flash_kernel(input: &PlanInput) -> FlashKernel {
    match (input.has_mask, input.causal) {
        (false, _) if input.seq_q <= MAX_DECODE_QUERIES && input.kv_aligned => FlashKernel::Decode,
        (true, _) => FlashKernel::Masked,
        (false, true) => FlashKernel::Causal,
        (false, false) => FlashKernel::NonCausal,
    }
}

/// The flash kernel that runs `input`, or the reason none can.
pub fn can_use_flash_attention(
    input: &PlanInput,
    flash_enabled: bool,
    max_shared_bytes: u32,
    vendor: TileVendor,
) -> Result<FlashChoice, String> {
    if !input.dtype.is_float() {
        // Every entry point refuses integer operands; a plan asked for one says so.
        return Err(format!(
            "no attention kernel takes {} (f32, f16 or bf16 only)",
            input.dtype
        ));
    }
    if !flash_enabled {
        return Err(
            "flash attention is switched off (use_flash_attention = false or FORGE_ATTN_FLASH=0)"
                .into(),
        );
    }
    if input.head_dim > MAX_FLASH_HEAD_DIM {
        return Err(format!(
            "head_dim {} exceeds the largest flash head_dim {MAX_FLASH_HEAD_DIM}",
            input.head_dim
        ));
    }
    if !input.head_dim.is_multiple_of(8) {
        return Err(format!(
            "head_dim {} is not a multiple of 8",
            input.head_dim
        ));
    }
    let kernel = select_flash_kernel(input);
    let (tile, smem) = if kernel == FlashKernel::Decode {
        let bucket = decode_bucket(input.head_dim)
            .ok_or_else(|| format!("no decode kernel for head_dim {}", input.head_dim))?;
        (None, decode_smem_bytes(input.dtype, bucket))
    } else if let Some(tile) = (input.tf32 && input.dtype == DType::F32)
        .then(|| kernels::flash_tile_tf32(vendor, input.head_dim))
        .flatten()
    {
        // TF32 where the vendor's table has a row for it, the f32 kernel otherwise.
        (Some(tile), tile.smem_bytes)
    } else {
        let tile = kernels::flash_tile_for_vendor(vendor, input.dtype, input.head_dim).ok_or_else(
            || {
                format!(
                    "no flash tile configuration for {} head_dim {}",
                    input.dtype, input.head_dim
                )
            },
        )?;
        (Some(tile), tile.smem_bytes)
    };
    if smem > max_shared_bytes {
        return Err(format!(
            "the {kernel:?} kernel for {} head_dim {} needs {smem} bytes of shared memory, the device allows {max_shared_bytes}",
            input.dtype, input.head_dim
        ));
    }
    Ok(FlashChoice { kernel, tile })
}

/// Decides the path of `input`.
pub fn plan(
    input: &PlanInput,
    flash_enabled: bool,
    max_shared_bytes: u32,
    vendor: TileVendor,
) -> Plan {
    match can_use_flash_attention(input, flash_enabled, max_shared_bytes, vendor) {
        Ok(choice) => Plan {
            path: AttentionPath::Flash(choice.kernel),
            flash: Some(choice),
            fallback_reason: None,
        },
        Err(reason) => Plan {
            path: AttentionPath::Traditional,
            flash: None,
            fallback_reason: Some(reason),
        },
    }
}

/// Longest query or key sequence the GPU kernels take: their 32-bit tile and key indices
/// stay clear of `i32::MAX` by a margin of 2^23 (a grid row of 64-key tiles).
pub const MAX_KERNEL_SEQ: usize = i32::MAX as usize - (1 << 23);

/// Whether problem sizes fit the kernels' 32-bit size fields. Batch and heads have no
/// limit of their own: calls past the grid's y / z limit run in slices (`grid.rs`).
pub fn check_kernel_limits(p: &AttentionProblem) -> Result<(), String> {
    check_sizes(p.batch, p.seq_q, p.seq_k, p.num_heads, p.head_dim)
}

/// [`check_kernel_limits`] on bare sizes (also what `supports` asks of a config).
pub fn check_sizes(
    batch: usize,
    seq_q: usize,
    seq_k: usize,
    num_heads: usize,
    head_dim: usize,
) -> Result<(), String> {
    let int = i32::MAX as usize;
    for (name, v, limit) in [
        ("batch", batch, int),
        ("seq_q", seq_q, MAX_KERNEL_SEQ),
        ("seq_k", seq_k, MAX_KERNEL_SEQ),
        ("num_heads", num_heads, int),
        ("head_dim", head_dim, int),
    ] {
        if v > limit {
            return Err(format!(
                "{name} = {v} exceeds the GPU kernels' limit {limit}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(seq_q: usize, kv_aligned: bool) -> PlanInput {
        PlanInput {
            dtype: DType::F16,
            head_dim: 128,
            causal: false,
            has_mask: false,
            seq_q,
            tf32: false,
            kv_aligned,
        }
    }

    #[test]
    fn integer_dtypes_plan_no_kernel() {
        for dtype in [DType::I32, DType::U32, DType::I64] {
            for seq_q in [1, 64] {
                let plan = super::plan(
                    &PlanInput {
                        dtype,
                        ..input(seq_q, true)
                    },
                    true,
                    u32::MAX,
                    TileVendor::Cuda,
                );
                assert_eq!(plan.flash, None, "{dtype}");
                let reason = plan.fallback_reason.unwrap();
                assert!(
                    reason.contains(&format!("no attention kernel takes {dtype}")),
                    "{reason}"
                );
            }
        }
    }

    #[test]
    fn unaligned_kv_never_takes_the_decode_kernel() {
        assert_eq!(select_flash_kernel(&input(1, true)), FlashKernel::Decode);
        assert_eq!(
            select_flash_kernel(&input(1, false)),
            FlashKernel::NonCausal
        );
        let causal = PlanInput {
            causal: true,
            ..input(16, false)
        };
        assert_eq!(select_flash_kernel(&causal), FlashKernel::Causal);
    }

    #[test]
    fn large_batches_and_heads_fit_sequence_limits_do_not() {
        assert!(check_sizes(2048 * 1024, 1, 4096, 64 * 1024, 128).is_ok());
        let e = check_sizes(1, 1, MAX_KERNEL_SEQ + 1, 1, 8).unwrap_err();
        assert!(e.contains(&(MAX_KERNEL_SEQ + 1).to_string()), "{e}");
        assert!(check_sizes(1, MAX_KERNEL_SEQ, MAX_KERNEL_SEQ, 1, 8).is_ok());
    }
}
