//! The flash tile table of `kernels/flash_config.h`.
//!
//! Each row `FA_TILE(dtype, HEAD_DIM_BUCKET, BLOCK_M, BLOCK_N, THREADS, SMEM_BYTES)` (CUDA),
//! `FA_TILE_SM90(...)` (CUDA sm_90, Hopper's wgmma kernel, built for compute_90a),
//! `FA_TILE_SM90_WS(...)` (CUDA sm_90, the warp-specialized kernel fed by TMA) or
//! `FA_TILE_HIP(...)` (AMD, whose workgroups get at most 64 KiB of LDS) is one flash
//! variant per mask mode. The kernels expand the same rows (hipcc builds every
//! `FA_TILE_HIP` row; NVRTC builds one `FA_TILE` row with `-DFA_VARIANT_*`), so the host
//! and the device agree on tile sizes by construction.

use std::sync::OnceLock;

use crate::dtype::DType;
use crate::error::{AttentionError, Result};

/// File that holds the table.
pub const FLASH_CONFIG_FILE: &str = "flash_config.h";

/// Which row set of the table: the vendor whose devices run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TileVendor {
    /// `FA_TILE` rows (NVIDIA, NVRTC).
    Cuda,
    /// NVIDIA sm_90 (Hopper): its `FA_TILE_SM90` rows replace the `FA_TILE` row of the same
    /// dtype and head-dim bucket; everything else as [`TileVendor::Cuda`].
    CudaSm90,
    /// `FA_TILE_HIP` rows (AMD, hipcc).
    Hip,
}

impl TileVendor {
    /// The row macro of this vendor.
    pub fn macro_name(self) -> &'static str {
        match self {
            TileVendor::Cuda => "FA_TILE",
            TileVendor::CudaSm90 => "FA_TILE_SM90",
            TileVendor::Hip => "FA_TILE_HIP",
        }
    }
}

/// One row of the flash tile table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlashTile {
    /// Element type of Q, K, V and the output.
    pub dtype: DType,
    /// An f32 row that computes in TF32 on the tensor cores (dtype token `tf32`, opt-in).
    pub tf32: bool,
    /// An `FA_TILE_SM90` row: Hopper's warpgroup MMA kernel, built for compute_90a.
    pub wgmma: bool,
    /// An `FA_TILE_SM90_WS` row: Hopper's warp-specialized kernel (a TMA producer
    /// warpgroup and `block_m / 64` math warpgroups), built for compute_90a.
    pub warp_specialized: bool,
    /// Head-dim bucket: the variant serves every head_dim up to this value.
    pub head_dim: usize,
    /// Query rows per block.
    pub block_m: u32,
    /// Key rows per inner tile.
    pub block_n: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory per block, in bytes.
    pub smem_bytes: u32,
}

fn malformed(line_no: usize, line: &str, why: &str) -> AttentionError {
    AttentionError::KernelBuild {
        kernel: FLASH_CONFIG_FILE.into(),
        log: format!(
            "line {line_no}: {why}: {:?} (expected FA_TILE, FA_TILE_SM90 or FA_TILE_HIP(dtype, \
             head_dim, block_m, block_n, threads, smem_bytes) with dtype f32|f16|bf16|tf32 and \
             positive integers; FA_TILE_SM90 rows f16|bf16 with threads = 2 * block_m, \
             FA_TILE_SM90_WS rows f16|bf16 with block_m 128 or 192 and threads = 2 * block_m + 128)",
            line.trim()
        ),
        source: None,
    }
}

/// Replaces `/* ... */` and `// ...` comments by blanks, keeping line breaks.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_block = false;
    while let Some(c) = chars.next() {
        if in_block {
            if c == '*' && chars.peek() == Some(&'/') {
                chars.next();
                in_block = false;
                out.push(' ');
            } else if c == '\n' {
                out.push('\n');
            }
            continue;
        }
        match (c, chars.peek()) {
            ('/', Some('*')) => {
                chars.next();
                in_block = true;
            }
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// A row's dtype token: the element type, and whether it is the TF32 form of f32.
fn parse_dtype(token: &str) -> Option<(DType, bool)> {
    match token {
        "f32" => Some((DType::F32, false)),
        "tf32" => Some((DType::F32, true)),
        "f16" => Some((DType::F16, false)),
        "bf16" => Some((DType::BF16, false)),
        _ => None,
    }
}

impl FlashTile {
    /// The dtype part of the kernel names and of `FA_VARIANT_DT`: `tf32` for TF32 rows,
    /// else the element type's name.
    pub fn kernel_dtype_name(&self) -> &'static str {
        if self.tf32 {
            "tf32"
        } else {
            self.dtype.name()
        }
    }
}

/// The two row sets of a parsed table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TileTable {
    /// `FA_TILE` rows.
    pub cuda: Vec<FlashTile>,
    /// `FA_TILE_SM90` rows.
    pub sm90: Vec<FlashTile>,
    /// `FA_TILE_SM90_WS` rows.
    pub sm90_ws: Vec<FlashTile>,
    /// `FA_TILE_HIP` rows.
    pub hip: Vec<FlashTile>,
}

impl TileTable {
    fn rows(&self, vendor: TileVendor) -> &[FlashTile] {
        match vendor {
            TileVendor::Cuda => &self.cuda,
            TileVendor::CudaSm90 => &self.sm90,
            TileVendor::Hip => &self.hip,
        }
    }
}

/// Parses the text of `flash_config.h` into its CUDA (`FA_TILE`), Hopper (`FA_TILE_SM90`)
/// and AMD (`FA_TILE_HIP`) rows, in that order.
///
/// Blank lines, comments and preprocessor lines are skipped; every other line must be a
/// well-formed row, and each (row set, dtype, head_dim) may appear once. `FA_TILE_SM90` rows
/// are f16/bf16 with 64 query rows per 128-thread warpgroup, and their head-dim bucket must
/// have an `FA_TILE` row of the same dtype (the row they replace on sm_90). Anything else is
/// an [`AttentionError::KernelBuild`] naming the line. A table without `FA_TILE` rows is an
/// error; one without `FA_TILE_HIP` rows uses the CUDA rows on AMD too.
pub fn parse_flash_config(text: &str) -> Result<(Vec<FlashTile>, Vec<FlashTile>, Vec<FlashTile>)> {
    let t = parse_table(text)?;
    Ok((t.cuda, t.sm90, t.hip))
}

pub(crate) fn parse_table(text: &str) -> Result<TileTable> {
    let stripped = strip_comments(text);
    let mut table = TileTable::default();
    for (idx, (line, original)) in stripped.lines().zip(text.lines()).enumerate() {
        let line_no = idx + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (vendor, ws, rest) = if let Some(r) = t.strip_prefix("FA_TILE_HIP") {
            (TileVendor::Hip, false, r)
        } else if let Some(r) = t.strip_prefix("FA_TILE_SM90_WS") {
            (TileVendor::CudaSm90, true, r)
        } else if let Some(r) = t.strip_prefix("FA_TILE_SM90") {
            (TileVendor::CudaSm90, false, r)
        } else if let Some(r) = t.strip_prefix("FA_TILE") {
            (TileVendor::Cuda, false, r)
        } else {
            return Err(malformed(line_no, original, "not an FA_TILE(...) row"));
        };
        let args = rest
            .trim_start()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| malformed(line_no, original, "not an FA_TILE(...) row"))?;
        let fields: Vec<&str> = args.split(',').map(str::trim).collect();
        let [dt, hd, bm, bn, th, smem] = fields[..] else {
            return Err(malformed(
                line_no,
                original,
                &format!("{} fields instead of 6", fields.len()),
            ));
        };
        let (dtype, tf32) = parse_dtype(dt)
            .ok_or_else(|| malformed(line_no, original, &format!("unknown dtype {dt:?}")))?;
        let num = |s: &str, what: &str| -> Result<u32> {
            match s.parse::<u32>() {
                Ok(v) if v > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(v),
                _ => Err(malformed(
                    line_no,
                    original,
                    &format!("{what} {s:?} is not a positive integer"),
                )),
            }
        };
        let tile = FlashTile {
            dtype,
            tf32,
            head_dim: num(hd, "head_dim")? as usize,
            block_m: num(bm, "block_m")?,
            block_n: num(bn, "block_n")?,
            threads: num(th, "threads")?,
            smem_bytes: num(smem, "smem_bytes")?,
            wgmma: vendor == TileVendor::CudaSm90 && !ws,
            warp_specialized: ws,
        };
        if ws
            && (tile.dtype == DType::F32
                || !matches!(tile.block_m, 128 | 192)
                || tile.threads != 2 * tile.block_m + 128)
        {
            return Err(malformed(
                line_no,
                original,
                "FA_TILE_SM90_WS rows are f16 or bf16 with 2 or 3 math warpgroups of 64 rows and one producer warpgroup",
            ));
        }
        if tile.wgmma {
            if tile.dtype == DType::F32 {
                return Err(malformed(
                    line_no,
                    original,
                    "FA_TILE_SM90 rows are f16 or bf16",
                ));
            }
            if tile.threads != 2 * tile.block_m || !tile.threads.is_multiple_of(128) {
                return Err(malformed(
                    line_no,
                    original,
                    "FA_TILE_SM90 rows have 64 query rows per 128-thread warpgroup",
                ));
            }
        }
        let rows = match vendor {
            TileVendor::Cuda => &mut table.cuda,
            TileVendor::CudaSm90 if ws => &mut table.sm90_ws,
            TileVendor::CudaSm90 => &mut table.sm90,
            TileVendor::Hip => &mut table.hip,
        };
        if rows
            .iter()
            .any(|x| x.dtype == tile.dtype && x.tf32 == tile.tf32 && x.head_dim == tile.head_dim)
        {
            return Err(malformed(
                line_no,
                original,
                &format!(
                    "duplicate {}{} row for {} hd{}",
                    vendor.macro_name(),
                    if ws { "_WS" } else { "" },
                    tile.kernel_dtype_name(),
                    tile.head_dim
                ),
            ));
        }
        rows.push(tile);
    }
    if table.cuda.is_empty() {
        return Err(AttentionError::KernelBuild {
            kernel: FLASH_CONFIG_FILE.into(),
            log: "no FA_TILE rows".into(),
            source: None,
        });
    }
    if let Some(orphan) = table.sm90.iter().find(|w| {
        !table
            .cuda
            .iter()
            .any(|c| !c.tf32 && c.dtype == w.dtype && c.head_dim == w.head_dim)
    }) {
        return Err(AttentionError::KernelBuild {
            kernel: FLASH_CONFIG_FILE.into(),
            log: format!(
                "FA_TILE_SM90 row {} hd{} has no FA_TILE row of the same dtype and head-dim \
                 bucket to replace",
                orphan.dtype, orphan.head_dim
            ),
            source: None,
        });
    }
    if let Some(orphan) = table.sm90_ws.iter().find(|w| {
        !table
            .sm90
            .iter()
            .any(|c| c.dtype == w.dtype && c.head_dim == w.head_dim)
    }) {
        return Err(AttentionError::KernelBuild {
            kernel: FLASH_CONFIG_FILE.into(),
            log: format!(
                "FA_TILE_SM90_WS row {} hd{} has no FA_TILE_SM90 row of the same dtype and \
                 head-dim bucket to stand in for",
                orphan.dtype, orphan.head_dim
            ),
            source: None,
        });
    }
    if table.hip.is_empty() {
        table.hip = table.cuda.clone();
    }
    Ok(table)
}

fn embedded_table() -> &'static Result<TileTable> {
    static TABLE: OnceLock<Result<TileTable>> = OnceLock::new();
    TABLE.get_or_init(|| match super::kernel_source(FLASH_CONFIG_FILE) {
        Some(text) => parse_table(text),
        None => Err(AttentionError::KernelBuild {
            kernel: FLASH_CONFIG_FILE.into(),
            log: format!("kernels/{FLASH_CONFIG_FILE} is missing from this build"),
            source: None,
        }),
    })
}

/// The rows of `vendor` in the embedded `kernels/flash_config.h`, parsed once; the parse
/// error (malformed or missing table) on every call otherwise.
pub fn flash_table(vendor: TileVendor) -> Result<&'static [FlashTile]> {
    match embedded_table() {
        Ok(t) => Ok(t.rows(vendor)),
        Err(e) => Err(e.clone()),
    }
}

/// The CUDA rows (`FA_TILE`) of the embedded table; empty if the table does not parse
/// (then no flash variant is ever chosen, and [`flash_table`] says why). The unit tests
/// make sure the shipped table parses.
pub fn flash_tiles() -> &'static [FlashTile] {
    flash_table(TileVendor::Cuda).unwrap_or(&[])
}

/// The CUDA tile for `dtype` with the smallest head-dim bucket `>= head_dim`; `None` when
/// `head_dim` is 0, above every bucket of that dtype, or the table does not parse.
pub fn flash_tile_for(dtype: DType, head_dim: usize) -> Option<&'static FlashTile> {
    flash_tile_for_vendor(TileVendor::Cuda, dtype, head_dim)
}

/// [`flash_tile_for`] on the row set of `vendor` (TF32 rows excluded). For
/// [`TileVendor::CudaSm90`] the `FA_TILE` row that would be chosen is replaced by the
/// `FA_TILE_SM90` row of the same dtype and bucket, where there is one.
pub fn flash_tile_for_vendor(
    vendor: TileVendor,
    dtype: DType,
    head_dim: usize,
) -> Option<&'static FlashTile> {
    let keep = |t: &FlashTile| t.dtype == dtype && !t.tf32;
    if vendor != TileVendor::CudaSm90 {
        return smallest_bucket(vendor, head_dim, keep);
    }
    let base = smallest_bucket(TileVendor::Cuda, head_dim, keep)?;
    let hopper = flash_table(TileVendor::CudaSm90)
        .ok()?
        .iter()
        .find(|t| keep(t) && t.head_dim == base.head_dim);
    Some(hopper.unwrap_or(base))
}

/// The `FA_TILE_SM90_WS` rows of the embedded table (Hopper's warp-specialized kernel).
pub fn flash_table_ws() -> Result<&'static [FlashTile]> {
    match embedded_table() {
        Ok(t) => Ok(&t.sm90_ws),
        Err(e) => Err(e.clone()),
    }
}

/// The `FA_TILE_SM90_WS` row that stands in for the sm_90 row of `dtype` and `head_dim`
/// ([`flash_tile_for_vendor`] on [`TileVendor::CudaSm90`]), where there is one.
pub fn flash_tile_ws(dtype: DType, head_dim: usize) -> Option<&'static FlashTile> {
    let base = flash_tile_for_vendor(TileVendor::CudaSm90, dtype, head_dim)?;
    flash_table_ws()
        .ok()?
        .iter()
        .find(|t| t.dtype == dtype && t.head_dim == base.head_dim)
}

/// The TF32 row (f32 inputs on the tensor cores) of `vendor` for `head_dim`, if any
/// (sm_90 uses the `FA_TILE` TF32 rows).
pub fn flash_tile_tf32(vendor: TileVendor, head_dim: usize) -> Option<&'static FlashTile> {
    let vendor = match vendor {
        TileVendor::CudaSm90 => TileVendor::Cuda,
        v => v,
    };
    smallest_bucket(vendor, head_dim, |t| t.tf32)
}

fn smallest_bucket(
    vendor: TileVendor,
    head_dim: usize,
    keep: impl Fn(&FlashTile) -> bool,
) -> Option<&'static FlashTile> {
    if head_dim == 0 {
        return None;
    }
    flash_table(vendor)
        .ok()?
        .iter()
        .filter(|t| keep(t) && t.head_dim >= head_dim)
        .min_by_key(|t| t.head_dim)
}
