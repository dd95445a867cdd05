// FlashAttention forward pass on Hopper's warpgroup MMA (wgmma): f16/bf16 inputs, CUDA sm_90a.
//
// flash_entry.h defines its entry points (FA_VARIANT_IMPL wgmma, the FA_TILE_SM90 rows of
// flash_config.h, built for compute_90a); the host launches it only on 16-byte aligned
// inputs, others take the split SIMT entry point of the same row. Same contract as the other flash kernels: bottom-right causal, additive f32 mask (MODE 2), GQA,
// any head_dim <= bucket (zero padded), rows with no visible key give zeros and lse = -inf,
// 64-bit offsets.
//
// Work split. THREADS = 128 * NWG: warpgroup w owns query rows [64 w, 64 w + 64) of the
// block's BLOCK_M = 64 * NWG. Per key tile of BLOCK_N keys a warpgroup computes
//   S (64 x BN)  = Q (64 x D) K^T    wgmma, Q and K straight from shared memory
//   online softmax on S in registers  (mma_softmax.h: each warp holds 16 rows in the
//                                      mma.sync accumulator layout)
//   O (64 x D)  += P (64 x BN) V      wgmma, P from registers, V from shared memory
// Neither operand passes through registers on the way to the tensor cores (no ldmatrix), and
// one instruction covers 64 rows and up to 256 columns; that is what the mma.sync kernel
// lacks at D = 256, where its O accumulator leaves no room for larger tiles.
//
// Shared memory: Q [BM], K [2][BN], V [2][BN] rows, each tile stored as 128-byte swizzled
// column atoms (wgmma_ops.h), so wgmma reads them without bank conflicts and cp.async writes
// whole 16-byte chunks. The pipeline is that of flash_attention_mma.h: cp.async groups
// Q+K_0, V_0, K_1, V_1, ..., the copy of tile t+1 overlapping the math on tile t; a
// proxy fence after each wait makes the copied tile visible to wgmma. The P V of tile t stays
// in flight until the Q K^T of tile t+1 has been issued and waited for.
#pragma once

#include "mma_ops.h"
#include "mma_softmax.h"
#include "mma_block_io.h"
#include "wgmma_ops.h"

// Layout of a tile row on this kernel (plain constants: the host side of a build sees them too).
template <int HD, int BM, int BN, int THREADS>
struct FaWgShape : FaWgTile<HD, BM, BN> {
    typedef FaWgTile<HD, BM, BN> Tile;
    static constexpr int NWG = THREADS / 128;
    static constexpr int Q_OFF = 0;
    static constexpr int K_OFF = Q_OFF + Tile::Q_BYTES;
    static constexpr int V_OFF = K_OFF + 2 * Tile::KV_BYTES;
    static constexpr int END = V_OFF + 2 * Tile::KV_BYTES;
    static constexpr int SMEM_BYTES = END + 1024;   // slack to align the atoms to 1024 bytes

    static_assert(THREADS % 128 == 0 && BM == 64 * NWG, "BLOCK_M must be 64 rows per warpgroup");
    static_assert(BM * Tile::OSTR * 2 <= END, "epilogue staging must fit the tile buffers");
};

#if FA_HAS_WGMMA


// ROWS x DP elements from global rows row0.. (FaRows: dense or paged) into a swizzled tile of
// ROWS-row atoms, 16-byte chunks by cp.async; rows >= row_end and columns >= head_dim are
// zero filled (the source is then not read).
template <int ROWS, int CPR, int THREADS>
FA_DEVICE void fa_wgmma_copy_tile(unsigned char* dst, const FaRows<unsigned short>& src, int row0,
                                  int row_end, int head_dim, int tid) {
    if constexpr (THREADS % CPR == 0 && ROWS % (THREADS / CPR) == 0) {
        // One column chunk of every RS-th row through one running pointer; RS is a multiple
        // of 8 here, so the swizzled offset only moves by whole rows.
        constexpr int RS = THREADS / CPR;
        const int r0 = tid / CPR;
        const int ch = tid % CPR;
        const bool col_ok = ch * 8 < head_dim;
        const unsigned short* s = src.base + (fa_i64)(row0 + r0) * src.stride + ch * 8;
        const fa_i64 step = (fa_i64)RS * src.stride;
        unsigned char* d = dst + (ch >> 3) * (ROWS * 128) + fa_wgmma_swz(r0, ch & 7);
#pragma unroll
        for (int c = 0; c < ROWS / RS; ++c) {
            const int r = row0 + r0 + c * RS;
            const bool valid = col_ok && (r < row_end);
            const unsigned short* a = src.paged() ? (valid ? src.row(r) + ch * 8 : src.base)
                                                  : (valid ? s : src.base);
            fa_cp_async16(d + (RS % 8 == 0 ? c * RS * 128 : fa_wgmma_swz(r0 + c * RS, ch & 7) -
                                                               fa_wgmma_swz(r0, ch & 7)),
                          a, valid);
            s += step;
        }
    } else {
        constexpr int NCH = ROWS * CPR;
#pragma unroll
        for (int c = 0; c < (NCH + THREADS - 1) / THREADS; ++c) {
            const int idx = tid + c * THREADS;
            if (NCH % THREADS != 0 && idx >= NCH) break;
            const int r = idx / CPR;
            const int ch = idx % CPR;
            const bool valid = (row0 + r < row_end) && (ch * 8 < head_dim);
            const unsigned short* s = valid ? src.row(row0 + r) + ch * 8 : src.base;
            fa_cp_async16(dst + (ch >> 3) * (ROWS * 128) + fa_wgmma_swz(r, ch & 7), s, valid);
        }
    }
}

template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_wgmma_forward(const AttnParams& p) {
    typedef FaWgShape<HD, BM, BN, THREADS> WS;
    static_assert(WS::SMEM_BYTES <= SMEM, "wgmma layout exceeds the tile row's SMEM_BYTES");

    const int q0 = fa_block_q0(p, BM, MODE);
    FA_BLOCK_EXIT(MODE, p, q0);

    FA_SMEM_ALIGNED_1024(sm, sbase);

    FA_LANE_SETUP();
    const int wg = tid >> 7;
    FA_BLOCK_SETUP(unsigned short, BM, BN, MODE, p, q0);
    if (ntiles > tbeg) {
        fa_wgmma_copy_tile<BM, WS::CPR, THREADS>(sm + WS::Q_OFF, qg, q0, seq_q, head_dim, tid);
        fa_wgmma_copy_tile<BN, WS::CPR, THREADS>(sm + WS::K_OFF, kg, tbeg * BN, seq_k, head_dim, tid);
        fa_cp_async_commit();
        fa_wgmma_copy_tile<BN, WS::CPR, THREADS>(sm + WS::V_OFF, vg, tbeg * BN, seq_k, head_dim, tid);
        fa_cp_async_commit();
    }

    const int wg_row0 = q0 + 64 * wg;          // this warpgroup's first query
    const int wrow0 = q0 + 16 * warp;          // this warp's first query
    const float sl2 = p.scale * FA_LOG2E;

    float o[WS::DT][4];
#pragma unroll
    for (int j = 0; j < WS::DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m_i[2] = {FA_NEG_INF, FA_NEG_INF};
    float l_i[2] = {0.0f, 0.0f};

    // Descriptors (wgmma_ops.h). Q: this warpgroup's 64 rows of every atom; k-step kk is
    // atom kk / 4, bytes 32 * (kk % 4). K likewise over BN rows. V: k-step kk is keys
    // 16 kk .. 16 kk + 15, i.e. 16 rows of 128 bytes further.
    const fa_u64 q_desc = fa_wgmma_desc(sbase + WS::Q_OFF + wg * 64 * 128, 16, 1024);
    const fa_u64 k_desc = fa_wgmma_desc(sbase + WS::K_OFF, 16, 1024);
    const fa_u64 v_desc = fa_wgmma_desc(sbase + WS::V_OFF, BN * 128, 1024);
    constexpr fa_u64 KV_BUF_UNITS = WS::KV_BYTES >> 4;  // descriptor address units

    for (int t = tbeg; t < ntiles; ++t) {
        const int kv0 = t * BN;
        const int nb = (t + 1 - tbeg) & 1;  // the buffer of tile t + 1
        const fa_u64 buf = (fa_u64)(nb ^ 1) * KV_BUF_UNITS;
        fa_cp_async_wait<1>();
        fa_fence_proxy_async();
        fa_syncthreads();  // K_t (and Q) visible to wgmma; every warpgroup is done with K_{t-1}
        if (t + 1 < ntiles)
            fa_wgmma_copy_tile<BN, WS::CPR, THREADS>(sm + WS::K_OFF + nb * WS::KV_BYTES, kg, kv0 + BN, seq_k, head_dim, tid);
        fa_cp_async_commit();

        // Warpgroup-uniform: a group whose rows are past seq_q or see no key of this tile
        // (causal, window) skips the tile; its m, l and O are what a fully masked tile would leave.
        const bool active = (wg_row0 < seq_q) && fa_rows_see_tile(p, kv0, BN, wg_row0, wg_row0 + 63, diag, causal);

        float s[WS::NT][4];
        unsigned int pf[WS::KP][4];
        if (active) {
            fa_wgmma_issue_qk<T, BM, BN, WS::KQ>(s, q_desc, k_desc + buf);
            fa_wgmma_wait<0>();  // also retires the previous tile's P V
            fa_wgmma_hold(s);
            fa_wgmma_hold(o);

            const float mul = fa_mma_scale_mask<BN>(s, p, b, h, wrow0, g, c4, kv0, seq_q, seq_k, diag, causal, has_mask, sl2);
            fa_mma_online_softmax<WS::NT, WS::DT>(s, o, m_i, l_i, mul);
            fa_mma_pack_p<T, WS::KP>(pf, s);
        }

        // An inactive group may still have P V_{t-1} in flight, reading the buffer the copy
        // below refills: retire it first (active groups did, in the wait above).
        if (!active) fa_wgmma_wait<0>();
        fa_cp_async_wait<1>();
        fa_fence_proxy_async();
        fa_syncthreads();  // V_t visible to wgmma; every warpgroup is done with V_{t-1}
        if (t + 1 < ntiles)
            fa_wgmma_copy_tile<BN, WS::CPR, THREADS>(sm + WS::V_OFF + nb * WS::KV_BYTES, vg, kv0 + BN, seq_k, head_dim, tid);
        fa_cp_async_commit();

        if (active) {
            // Left in flight: it overlaps the next tile's barrier, copy issue and Q K^T; the
            // wait there (or below) retires it before O is touched (+2-6% at D = 64 and 192).
            fa_wgmma_issue_pv<T, WS::DP, WS::KP>(o, pf, v_desc + buf);
        }
    }
    fa_wgmma_wait<0>();
    fa_wgmma_hold(o);

    // Epilogue: O / l staged through shared memory (every buffer is free now), then 16-byte
    // stores; each warp stages and stores its own 16 rows.
    fa_cp_async_wait<0>();
    fa_syncthreads();
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) inv[r] = fa_mma_quad_sum_inv(p, h, m_i[r], l_i[r]);
    unsigned short* ow = reinterpret_cast<unsigned short*>(sm) + 16 * warp * WS::OSTR;
    fa_mma_stage_o16<T>(ow, WS::OSTR, o, inv, g, c4);
    __syncwarp();

    fa_mma_store_rows16<16, WS::CPR>(p, ow, WS::OSTR, wrow0, o_off, seq_q, lane);
    fa_mma_store_lse(p, b, h, q_row0, seq_q, wrow0, g, c4, m_i, l_i);
}

#endif  // FA_HAS_WGMMA
