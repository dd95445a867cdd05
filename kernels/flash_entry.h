// Entry points of the flash kernels, one per (mask mode, tile row, implementation).
//
// Which implementation a launch runs is decided on the host (src/backend/gpu/dispatch.rs)
// and named by the catalog (src/kernels/catalog.rs), which compiles one variant at a time
// with
//   FA_VARIANT_NAME     the entry point's name
//   FA_VARIANT_IMPL     simt | split | mma | tf32 | wgmma | wgws (the body below)
//   FA_VARIANT_DT, _HD, _BM, _BN, _THREADS, _SMEM   the tile row of flash_config.h
// Without FA_VARIANT_* (the AMD build of every FA_TILE_HIP row) each row is emitted as
// flash_attention_<mode>_<dt>_hd<bucket> on the SIMT body.
//
// The tensor-core bodies exist only where the target has their instructions (mma: CUDA
// sm_80+, wgmma: compute_90a); asking for one elsewhere is a compile error, not a fallback.
#pragma once

#include "flash_common.h"
#include "flash_simt.h"
#include "flash_attention_mma.h"
#include "flash_attention_tf32.h"
#include "flash_attention_wgmma.h"
#include "flash_attention_wgmma_ws.h"

// Element type of a row's dtype token; TF32 rows hold f32.
#define FA_ELEM_f32 float
#define FA_ELEM_f16 fa_f16
#define FA_ELEM_bf16 fa_bf16
#define FA_ELEM_tf32 float

// The bodies, by FA_VARIANT_IMPL token.
// simt: the SIMT kernel on the row's own tile.
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_impl_simt(const AttnParams& p) {
    fa_flash_forward<T, HD, BM, BN, THREADS, SMEM, MODE>(p);
}
// split: the SIMT kernel in smaller tiles on a row sized for a tensor-core kernel.
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_impl_split(const AttnParams& p) {
    fa_flash_forward_split<T, HD, BM, THREADS, SMEM, MODE>(p, fa_block_q0(p, BM, MODE));
}
#if FA_HAS_MMA
// mma: f16/bf16 on mma.sync (16-byte aligned inputs).
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_impl_mma(const AttnParams& p) {
    fa_mma_forward<T, HD, BM, BN, THREADS, SMEM, MODE>(p);
}
// tf32: f32 in TF32 on mma.sync (16-byte aligned inputs).
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_impl_tf32(const AttnParams& p) {
    fa_tf32_forward<HD, BM, BN, THREADS, SMEM, MODE>(p);
}
#endif
#if FA_HAS_WGMMA
// wgmma: f16/bf16 on Hopper's warpgroup MMA (16-byte aligned inputs).
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_impl_wgmma(const AttnParams& p) {
    fa_wgmma_forward<T, HD, BM, BN, THREADS, SMEM, MODE>(p);
}
// wgws: f16/bf16 on Hopper, warp specialized with TMA copies (an FA_TILE_SM90_WS row; plain,
// option and paged variants); its argument carries the tensor maps (FaWsParams).
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_impl_wgws(const FaWsParams& P) {
    typedef FaWsShape<HD, BN, BM / 64, 2> WS;
    static_assert(WS::BM == BM && WS::THREADS == THREADS, "FA_TILE_SM90_WS rows have THREADS = 2 * BLOCK_M + 128");
    static_assert(WS::SMEM_BYTES <= SMEM, "warp-specialized layout exceeds the tile row's SMEM_BYTES");
    fa_wgmma_ws_forward<T, HD, BN, BM / 64, 2, MODE>(P);
}
#endif

// The kernel argument of each body: the argument block, or (wgws) the tensor maps ahead of
// it, as a grid constant so that TMA can read the maps where the launch put them.
#define FA_PARAM_simt AttnParams
#define FA_PARAM_split AttnParams
#define FA_PARAM_mma AttnParams
#define FA_PARAM_tf32 AttnParams
#define FA_PARAM_wgmma AttnParams
#define FA_PARAM_wgws const __grid_constant__ FaWsParams

// Occupancy hint. One block per SM: a 2-block cap (128 registers) makes the hd32/hd64 tiles
// spill and measured no faster on H100.
#ifndef FA_FLASH_MIN_BLOCKS
#define FA_FLASH_MIN_BLOCKS 1
#endif

#define FA_DEFINE_FLASH_KERNEL_I(fn, impl, mode, dt, hd, bm, bn, th, sm)                     \
    FA_KERNEL void FA_LAUNCH_BOUNDS_MIN(th, FA_FLASH_MIN_BLOCKS) fn(FA_PARAM_##impl p) {     \
        fa_flash_impl_##impl<FA_ELEM_##dt, hd, bm, bn, th, sm, mode>(p);                     \
    }
#define FA_DEFINE_FLASH_KERNEL(fn, impl, mode, dt, hd, bm, bn, th, sm) \
    FA_DEFINE_FLASH_KERNEL_I(fn, impl, mode, dt, hd, bm, bn, th, sm)

// A flash file (MODE = its mask mode): the one variant FA_VARIANT_* names, or, without them,
// every FA_TILE_HIP row on the SIMT body (name flash_attention_<name>_<dt>_hd<bucket>).
#define FA_DEFINE_FLASH_ROW_I(name, mode, dt, hd, bm, bn, th, sm) \
    FA_DEFINE_FLASH_KERNEL(flash_attention_##name##_##dt##_hd##hd, simt, mode, dt, hd, bm, bn, th, sm)
#define FA_DEFINE_FLASH_ROW(name, mode, dt, hd, bm, bn, th, sm) \
    FA_DEFINE_FLASH_ROW_I(name, mode, dt, hd, bm, bn, th, sm)
#define FA_DEFINE_FLASH_VARIANT(mode)                                                          \
    FA_DEFINE_FLASH_KERNEL(FA_VARIANT_NAME, FA_VARIANT_IMPL, mode, FA_VARIANT_DT, FA_VARIANT_HD, \
                           FA_VARIANT_BM, FA_VARIANT_BN, FA_VARIANT_THREADS, FA_VARIANT_SMEM)
