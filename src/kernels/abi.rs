//! Host mirrors of the kernels' argument blocks: each kernel takes one of these structs by
//! value as its single argument. Pointers are `u64` device addresses, strides are in
//! elements. The layout tests parse the C declarations in `kernels/` and compare every
//! field's offset, so a field added on one side only fails the build's tests.

/// Strides of a (batch, head, sequence) indexed tensor, in that order: the C triples
/// `x_sb, x_sh, x_ss` (and the mask's `m_sb, m_sh, m_sq`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Strides3 {
    /// Batch (or page) stride.
    pub b: i64,
    /// Head stride.
    pub h: i64,
    /// Sequence (position, query row) stride.
    pub s: i64,
}

/// Strides of new-token rows `[B, n, Hkv, D]`: the C triples `x_sb, x_ss, x_sh` (batch,
/// token, head, in that order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TokenStrides {
    /// Batch stride.
    pub b: i64,
    /// Token stride.
    pub t: i64,
    /// Head stride.
    pub h: i64,
}

impl Strides3 {
    /// From element strides (batch, head, sequence).
    pub fn new(b: usize, h: usize, s: usize) -> Self {
        Strides3 {
            b: b as i64,
            h: h as i64,
            s: s as i64,
        }
    }

    /// Element offset of (`batch`, `head`, position 0).
    pub fn at(&self, batch: usize, head: usize) -> usize {
        (batch as i64 * self.b + head as i64 * self.h) as usize
    }
}

impl TokenStrides {
    /// Element offset of (`batch`, token 0, `head`).
    pub fn at(&self, batch: usize, head: usize) -> usize {
        (batch as i64 * self.b + head as i64 * self.h) as usize
    }

    /// From `[batch, token, head]` strides.
    pub fn from_array([b, t, h]: [i64; 3]) -> Self {
        TokenStrides { b, t, h }
    }
}

/// `AttnParams` of kernels/attention_params.h: the flash and traditional kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttnParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub mask: u64,
    pub out: u64,
    pub lse: u64,
    pub workspace: u64,
    pub alibi: u64,
    pub sinks: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    pub block_table: u64,
    pub k_lens: u64,
    pub q_strides: Strides3,
    pub k_strides: Strides3,
    pub v_strides: Strides3,
    pub o_strides: Strides3,
    /// Mask strides: batch, head, query row (0 = broadcast).
    pub m_strides: Strides3,
    /// Log-sum-exp strides: batch, head, query row.
    pub l_strides: Strides3,
    pub batch: i32,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub seq_q: i32,
    pub seq_k: i32,
    pub head_dim: i32,
    pub scale: f32,
    pub causal: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub softcap: f32,
    pub transform: i32,
    pub max_pages: i32,
    pub page_size: i32,
    pub page_shift: i32,
    pub pad_: i32,
}

/// The driver's 128-byte tensor map (`CUtensorMap`, `FaTensorMap` of kernels/tma_ops.h),
/// encoded on the host and read by the kernels' TMA copies.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TensorMap(pub [u64; 16]);

/// Tail padding of [`WsParams`] up to its 64-byte alignment, spelled out for `Pod`.
const WS_PAD: usize = (64 - (3 * 128 + std::mem::size_of::<AttnParams>()) % 64) % 64;

/// `FaWsParams` of kernels/flash_attention_wgmma_ws.h: the tensor maps of Q, K and V ahead
/// of the usual argument block (the warp-specialized Hopper kernel).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct WsParams {
    pub tq: TensorMap,
    pub tk: TensorMap,
    pub tv: TensorMap,
    pub p: AttnParams,
    pub pad_: [u8; WS_PAD],
}

/// log2 of a power-of-two page size (shift and mask in the kernels), else -1 (division):
/// the `page_shift` of [`AttnParams`] and [`DecodeParams`].
pub(crate) fn page_shift(page_size: i32) -> i32 {
    if page_size > 0 && (page_size as u32).is_power_of_two() {
        page_size.trailing_zeros() as i32
    } else {
        -1
    }
}

/// `DecodeParams` of kernels/decode_params.h: the split-KV decode and combine kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct DecodeParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub partial_o: u64,
    pub partial_lse: u64,
    pub seq_lens: u64,
    pub block_table: u64,
    pub counters: u64,
    pub k_new: u64,
    pub v_new: u64,
    pub pool_next: u64,
    pub arrivals: u64,
    pub q_strides: Strides3,
    pub o_strides: Strides3,
    /// Contiguous cache: batch stride; paged: page stride.
    pub k_strides: Strides3,
    pub v_strides: Strides3,
    /// Fused append: the new tokens' strides.
    pub kn_strides: TokenStrides,
    pub vn_strides: TokenStrides,
    pub batch: i32,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub seq_q: i32,
    pub seq_k: i32,
    pub head_dim: i32,
    pub max_pages: i32,
    pub page_size: i32,
    pub num_splits: i32,
    pub split_keys: i32,
    pub scale: f32,
    pub causal: i32,
    pub n_new: i32,
    pub num_pages: i32,
    /// Per-call options (read by the option variants only): ALiBi slopes `[H]` or 0.
    pub alibi: u64,
    /// Attention-sink logits `[H]`, or 0.
    pub sinks: u64,
    /// Log-sum-exp output `[B, H, Sq]` (natural log), or 0.
    pub lse: u64,
    /// Log-sum-exp strides: batch, head, query.
    pub lse_strides: Strides3,
    /// Keys kept left of the diagonal, clamped by the host (see `decode_params.h`).
    pub window_left: i32,
    /// Keys kept right of the diagonal, clamped by the host.
    pub window_right: i32,
    /// `cap * log2(e)`, or 0 for no softcap.
    pub softcap: f32,
    /// `1 / softcap`, or 0.
    pub softcap_inv: f32,
    /// `log2(page_size)` for a power-of-two page size, else -1 (see [`page_shift`]).
    pub page_shift: i32,
    /// 1: the tensor-core body runs (16-bit, head dims 64 and 128, CUDA sm_80+).
    pub tensor_cores: i32,
}

/// `AppendParams` of kernels/kv_append.h: the KV-cache append kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AppendParams {
    pub k_new: u64,
    pub v_new: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub seq_lens: u64,
    pub block_table: u64,
    pub pool_next: u64,
    pub counts: u64,
    pub kn_strides: TokenStrides,
    pub vn_strides: TokenStrides,
    /// Cache strides: batch (or page), head, position.
    pub c_strides: Strides3,
    pub batch: i32,
    pub n: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub max_pages: i32,
    pub page_size: i32,
    pub num_pages: i32,
    pub pad_: i32,
}

/// `CopyParams` of kernels/attention_params.h: the strided copies of tensor_ops.hip. Rank
/// padded to 4 with leading size-1 dimensions.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CopyParams {
    pub src: u64,
    pub dst: u64,
    pub shape: [i64; 4],
    pub src_strides: [i64; 4],
    pub dst_strides: [i64; 4],
    pub numel: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kernel_source;
    use std::mem::{align_of, offset_of, size_of};

    /// (field name, byte offset) of every field of the C struct `name` in `header`, with
    /// the struct's size: natural alignment, pointers and `long long` 8 bytes.
    fn c_layout(header: &str, name: &str) -> (Vec<(String, usize)>, usize) {
        let text = kernel_source(header).unwrap_or_else(|| panic!("no kernels/{header}"));
        let end = text
            .find(&format!("}} {name};"))
            .unwrap_or_else(|| panic!("{header}: no struct {name}"));
        let start = text[..end]
            .rfind("typedef struct {")
            .expect("typedef struct")
            + 16;
        let body: String = text[start..end]
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ");
        let (mut fields, mut offset, mut max_align) = (Vec::new(), 0usize, 1usize);
        for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
            // The type is everything before the first declarator; `*` makes it a pointer.
            let pointer = decl.contains('*');
            let decl = decl.replace('*', " ");
            let (ty, names) = decl
                .split_once(',')
                .map_or((decl.as_str(), ""), |(first, rest)| (first, rest));
            let mut words: Vec<&str> = ty.split_whitespace().collect();
            let first = words.pop().expect("a declarator");
            let ty = words.join(" ");
            let size = if pointer {
                8
            } else {
                match ty
                    .trim_start_matches("const ")
                    .trim_start_matches("unsigned ")
                {
                    "long long" | "fa_i64" => 8,
                    "int" | "float" | "unsigned" => 4,
                    "short" => 2,
                    other => panic!("{header}: unknown C type {other:?} in {name}"),
                }
            };
            max_align = max_align.max(size);
            let declarators = std::iter::once(first)
                .chain(names.split(',').map(str::trim).filter(|n| !n.is_empty()));
            for d in declarators {
                let (field, count) = match d.split_once('[') {
                    Some((f, n)) => (f, n.trim_end_matches(']').parse::<usize>().unwrap()),
                    None => (d, 1),
                };
                offset = offset.next_multiple_of(size);
                fields.push((field.to_string(), offset));
                offset += size * count;
            }
        }
        (fields, offset.next_multiple_of(max_align))
    }

    /// Asserts that `T` has exactly the C fields of `name`, at the same offsets and size.
    fn assert_layout<T>(header: &str, name: &str, rust: &[(String, usize)]) {
        let (c, c_size) = c_layout(header, name);
        assert_eq!(rust, c.as_slice(), "{name}: fields (C name, offset)");
        assert_eq!(size_of::<T>(), c_size, "{name}: size");
        assert_eq!(align_of::<T>(), 8, "{name}: alignment");
    }

    /// The C names of a [`Strides3`] triple `<x>_sb, <x>_sh, <x>_ss`.
    fn bhs(x: &str) -> Vec<String> {
        ["sb", "sh", "ss"].map(|s| format!("{x}_{s}")).to_vec()
    }

    /// The C names of a [`TokenStrides`] triple `<x>_sb, <x>_ss, <x>_sh`.
    fn bsh(x: &str) -> Vec<String> {
        ["sb", "ss", "sh"].map(|s| format!("{x}_{s}")).to_vec()
    }

    /// `(C name, offset)` pairs: `f` for a field of the same name, `f => names` for a
    /// stride triple whose C fields are consecutive 8-byte integers (or an array, one name).
    macro_rules! fields {
        ($t:ty; $($f:ident $(=> $names:expr)?),+ $(,)?) => {{
            let mut v: Vec<(String, usize)> = Vec::new();
            $(
                let base = offset_of!($t, $f);
                #[allow(unused_mut)]
                let mut names: Vec<String> = vec![stringify!($f).to_string()];
                $(names = $names;)?
                for (i, c) in names.into_iter().enumerate() {
                    v.push((c, base + 8 * i));
                }
            )+
            v
        }};
    }

    #[test]
    fn stride_types_are_three_consecutive_i64() {
        // What `fields!` assumes of a triple: its C fields at base + 0, 8, 16 in order.
        let at = |names: &[&str]| -> Vec<(String, usize)> {
            names
                .iter()
                .zip([0, 8, 16])
                .map(|(n, o)| (n.to_string(), o))
                .collect()
        };
        assert_eq!(fields!(Strides3; b, h, s), at(&["b", "h", "s"]));
        assert_eq!(fields!(TokenStrides; b, t, h), at(&["b", "t", "h"]));
        assert_eq!(size_of::<Strides3>(), 24);
        assert_eq!(size_of::<TokenStrides>(), 24);
        assert_eq!(
            TokenStrides::from_array([1, 2, 3]),
            TokenStrides { b: 1, t: 2, h: 3 }
        );
        assert_eq!(Strides3::new(100, 10, 1).at(2, 3), 230);
        assert_eq!(TokenStrides::from_array([100, 1, 10]).at(2, 3), 230);
    }

    #[test]
    fn attn_params_match_the_c_struct() {
        let rust = fields!(AttnParams;
            q, k, v, mask, out, lse, workspace, alibi, sinks, cu_q, cu_k, block_table, k_lens,
            q_strides => bhs("q"),
            k_strides => bhs("k"),
            v_strides => bhs("v"),
            o_strides => bhs("o"),
            m_strides => vec!["m_sb".into(), "m_sh".into(), "m_sq".into()],
            l_strides => bhs("l"),
            batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, scale, causal,
            window_left, window_right, softcap, transform, max_pages, page_size, page_shift, pad_);
        assert_layout::<AttnParams>("attention_params.h", "AttnParams", &rust);
    }

    #[test]
    fn decode_params_match_the_c_struct() {
        let rust = fields!(DecodeParams;
            q, k, v, out, partial_o, partial_lse, seq_lens, block_table, counters,
            k_new, v_new, pool_next, arrivals,
            q_strides => bhs("q"),
            o_strides => bhs("o"),
            k_strides => bhs("k"),
            v_strides => bhs("v"),
            kn_strides => bsh("kn"),
            vn_strides => bsh("vn"),
            batch, num_heads, num_kv_heads, seq_q, seq_k, head_dim, max_pages, page_size,
            num_splits, split_keys, scale, causal, n_new, num_pages,
            alibi, sinks, lse,
            lse_strides => bhs("lse"),
            window_left, window_right, softcap, softcap_inv, page_shift, tensor_cores);
        assert_layout::<DecodeParams>("decode_params.h", "DecodeParams", &rust);
    }

    #[test]
    fn append_params_match_the_c_struct() {
        let rust = fields!(AppendParams;
            k_new, v_new, k_cache, v_cache, seq_lens, block_table, pool_next, counts,
            kn_strides => bsh("kn"),
            vn_strides => bsh("vn"),
            c_strides => bhs("c"),
            batch, n, num_kv_heads, head_dim, max_pages, page_size, num_pages, pad_);
        assert_layout::<AppendParams>("kv_append.h", "AppendParams", &rust);
    }

    #[test]
    fn copy_params_match_the_c_struct() {
        let rust = fields!(CopyParams; src, dst, shape, src_strides, dst_strides, numel);
        assert_layout::<CopyParams>("attention_params.h", "CopyParams", &rust);
    }

    #[test]
    fn ws_params_put_the_tensor_maps_ahead_of_the_argument_block() {
        assert_eq!((size_of::<TensorMap>(), align_of::<TensorMap>()), (128, 64));
        assert_eq!(offset_of!(WsParams, tk), 128);
        assert_eq!(offset_of!(WsParams, tv), 256);
        assert_eq!(offset_of!(WsParams, p), 384);
        assert_eq!(align_of::<WsParams>(), 64);
        assert_eq!(
            size_of::<WsParams>(),
            (384 + size_of::<AttnParams>()).next_multiple_of(64)
        );
        // The C declaration this mirrors, field for field.
        let text = kernel_source("flash_attention_wgmma_ws.h").expect("kernel header");
        assert!(text
            .contains("struct FaWsParams {\n    FaTensorMap tq, tk, tv;\n    AttnParams p;\n};"));
        let maps = kernel_source("tma_ops.h").expect("kernel header");
        assert!(maps
            .contains("struct alignas(64) FaTensorMap {\n    unsigned long long opaque[16];\n};"));
    }

    #[test]
    fn the_c_parser_pads_like_a_c_compiler() {
        // FillParamsB2: a pointer, a 2-byte value padded to the next 8-byte field.
        let (fields, size) = c_layout("attention_params.h", "FillParamsB2");
        let offsets: Vec<usize> = fields.iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, [0, 8, 16]);
        assert_eq!(size, 24);
    }
}
