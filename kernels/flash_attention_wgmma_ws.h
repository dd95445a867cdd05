// FlashAttention forward pass on Hopper, warp specialized: f16/bf16 inputs, CUDA sm_90a, on
// Q / K / V that TMA can address (16-byte aligned bases, strides in whole 16-byte units and
// non-zero; the host checks, others take flash_attention_wgmma.h): dense, packed ragged
// batches (FA_EXT: one map over all rows, each block at its sequence's first row) and paged
// K / V (FA_PAGED: one box per page, power-of-two pages that divide or are divided by BN).
//
// Same contract as the other flash kernels: bottom-right causal, additive f32 mask (MODE 2),
// GQA, any head_dim <= bucket (zero padded), rows with no visible key give zeros and
// lse = -inf, 64-bit offsets; the FA_EXT variants add the window, softcap, ALiBi, sinks and
// strided lse (flash_common.h, mma_softmax.h), with every tile of the window's range on
// both math warpgroups and the masking step cutting each row to its own keys.
//
// Roles. THREADS = 128 * (NC + 1): warpgroup 0 is the producer, warpgroups 1 .. NC do the
// math, each on 64 query rows of the block's BLOCK_M = 64 * NC.
// - The producer warp issues TMA copies (tma_ops.h; lane 0, or for paged K / V one lane per
//   page box): the block's Q tile once, then K_t and V_t of each key tile into a
//   STAGES-deep ring of shared-memory slots, each slot with a "full" mbarrier (completed by the bytes TMA delivers) and an "empty" one (completed when
//   every math warp is done with the slot). Where a V tile reaches past its sequence into
//   rows that are not zeros (packed or paged), the producer warp zeroes those rows before
//   completing the slot. The producer keeps few registers (setmaxnreg) and the math
//   warpgroups take them.
// - A math warpgroup overlaps its own work (intra-warpgroup): it issues S_t = Q K_t^T and
//   O += P_{t-1} V_{t-1} together, waits for S_t only, runs the masking and softmax of S_t
//   while P_{t-1} V_{t-1} is still on the tensor cores, then waits for that and rescales O.
// - The math warpgroups take turns issuing their GEMMs (ping-pong on named barriers, a ring
//   of NC turns), so one warpgroup's softmax runs under another's GEMMs.
// Copies, GEMMs and softmax therefore overlap; no block-wide barrier runs in the key loop.
#pragma once

#include "mma_ops.h"
#include "mma_softmax.h"
#include "mma_block_io.h"
#include "wgmma_ops.h"
#include "tma_ops.h"

// Layout of a block on this kernel (plain constants: the host side of a build sees them too).
// The tile geometry is FaWgTile's (wgmma_ops.h): one TMA box per 64-column atom, a K or V
// slot of KV_BYTES.
template <int HD, int BN, int NC, int STAGES>
struct FaWsShape : FaWgTile<HD, 64 * NC, BN> {
    typedef FaWgTile<HD, 64 * NC, BN> Tile;
    static constexpr int BM = 64 * NC;
    static constexpr int THREADS = 128 * (NC + 1);
    static constexpr int Q_OFF = 0;
    static constexpr int K_OFF = Q_OFF + Tile::Q_BYTES;
    static constexpr int V_OFF = K_OFF + STAGES * Tile::KV_BYTES;
    static constexpr int BAR_OFF = V_OFF + STAGES * Tile::KV_BYTES;
    static constexpr int NBAR = 2 + 4 * STAGES;     // Q full, zero fill; K full, K empty, V full, V empty
    static constexpr int END = BAR_OFF + 8 * NBAR;
    static constexpr int SMEM_BYTES = END + 1024;   // slack to align the atoms to 1024 bytes
    // Registers per thread after the hand-over (setmaxnreg): the block holds what the launch
    // bound gave every thread (65536 / THREADS, in steps of 8); the producer gives its
    // surplus to the math warpgroups, and the two together must stay within that (a larger
    // request waits forever). The paged producer needs more than 24 for its page arithmetic:
    // 40 beside two math warpgroups, 32 beside three, where 160 per math thread fills the
    // bound exactly (152 there draws ptxas warning C7512 on the D=64 paged kernel).
    static constexpr int REG_LAUNCH = 65536 / THREADS / 8 * 8;
    static constexpr int REG_PRODUCER = FA_PAGED ? (NC == 2 ? 40 : 32) : 24;
    static constexpr int REG_MATH = NC == 2 ? (FA_PAGED ? 232 : 240) : 160;

    static_assert(NC >= 2 && NC <= 3, "two or three math warpgroups");
    static_assert(BM <= 256, "a TMA box holds at most 256 rows");
    static_assert(BM * Tile::OSTR * 2 <= 2 * STAGES * Tile::KV_BYTES, "epilogue staging must fit the K / V slots");
    static_assert(128 * REG_PRODUCER + 128 * NC * REG_MATH <= THREADS * REG_LAUNCH,
                  "register hand-over exceeds what the launch bound gives the block");
};

// The kernel's one argument: tensor maps of Q, K and V ([B, H, S, D] boxes of 64 columns x
// BLOCK_M or BLOCK_N rows, 128-byte swizzle, zero fill outside) ahead of the usual block.
struct FaWsParams {
    FaTensorMap tq, tk, tv;
    AttnParams p;
};

#if FA_HAS_WGMMA

template <typename T, int HD, int BN, int NC, int STAGES, int MODE>
FA_DEVICE void fa_wgmma_ws_forward(const FaWsParams& P) {
    typedef FaWsShape<HD, BN, NC, STAGES> WS;
    constexpr int BM = WS::BM;
    const AttnParams& p = P.p;

    const int q0 = fa_block_q0(p, BM, MODE);
    FA_BLOCK_EXIT(MODE, p, q0);

    FA_SMEM_ALIGNED_1024(sm, sbase);

    FA_LANE_SETUP();
    // Read back through a shuffle from lane 0 so that the compiler sees it warp-uniform: the
    // role branches below are then not divergent paths, and wgmma is not serialized in them.
    const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
    FA_BLOCK_SETUP(unsigned short, BM, BN, MODE, p, q0);
    (void)qg;
    (void)kg;
    (void)vg;
    const int n = ntiles - tbeg;  // key tiles this block visits (may be none)

    const unsigned int bar_q = sbase + WS::BAR_OFF;
    const unsigned int bar_z = bar_q + 8;  // a V tile's copies before its tail is zeroed
    const unsigned int bar_kf = bar_z + 8, bar_ke = bar_kf + 8 * STAGES;
    const unsigned int bar_vf = bar_ke + 8 * STAGES, bar_ve = bar_vf + 8 * STAGES;
    if (tid == 0) {
        fa_mbar_init(bar_q, 1);
        fa_mbar_init(bar_z, 1);
        for (int s = 0; s < STAGES; ++s) {
            fa_mbar_init(bar_kf + 8 * s, 1);
            fa_mbar_init(bar_vf + 8 * s, 1);
            fa_mbar_init(bar_ke + 8 * s, 4 * NC);  // one arrival per math warp
            fa_mbar_init(bar_ve + 8 * s, 4 * NC);
        }
        fa_mbar_init_fence();
    }
    fa_syncthreads();

    if (wg == 0) {
        // Producer: its first warp. Lane 0 issues the copies and barrier operations; the whole
        // warp zero fills a V tile's rows past the sequence's end (below).
        fa_setmaxnreg_dec<WS::REG_PRODUCER>();
        if (warp == 0 && n > 0) {
            // Packed batches are one map entry whose rows run through every sequence; paged
            // K / V are maps of [page_size rows, heads, pages] read in boxes of
            // min(page_size, BN) rows, one per page (the host checks that one divides the other).
            const bool packed_q = FA_EXT && p.cu_q != nullptr;
            const bool packed_k = FA_EXT && p.cu_k != nullptr;
            const bool paged = FA_PAGED && p.block_table != nullptr;
            const int box = paged && p.page_size < BN ? p.page_size : BN;
            const int* table = paged ? p.block_table + (fa_i64)b * p.max_pages : nullptr;
            const unsigned int box_bytes = (unsigned int)box * 128u * WS::KA;
            if (lane == 0) {
                fa_tma_prefetch_map(&P.tq);
                fa_tma_prefetch_map(&P.tk);
                fa_tma_prefetch_map(&P.tv);
                fa_mbar_arrive_tx(bar_q, WS::Q_BYTES);
#pragma unroll
                for (int a = 0; a < WS::KA; ++a)
                    fa_tma_load_4d(sbase + WS::Q_OFF + a * BM * 128, &P.tq, 64 * a, q_row0 + q0, h,
                                   packed_q ? 0 : b, bar_q);
            }
            // Paged: lane j of the warp holds the page of box j of a tile (the loads of a
            // tile's pages run side by side, one tile ahead of its copies) and issues its copies.
            auto page_of = [&](int key) { return p.page_shift >= 0 ? key >> p.page_shift : key / p.page_size; };
            auto tile_pages = [&](int kv0) {
                const int key = kv0 + lane * box;
                if (!paged || lane * box >= BN || key >= seq_k) return 0;
                return table[page_of(key)];
            };
            // Keys kv0 .. of `map` (the rows that exist: a paged tile stops at the last page
            // the sequence has) into the slot at `dst`, completing on `bar`. The whole warp
            // calls it, after lane 0 has seen the slot free.
            auto load_kv = [&](const FaTensorMap* map, unsigned int dst, unsigned int bar, int kv0, int pages) {
                if (!paged) {
                    if (lane == 0) {
                        fa_mbar_arrive_tx(bar, WS::KV_BYTES);
#pragma unroll
                        for (int a = 0; a < WS::KA; ++a)
                            fa_tma_load_4d(dst + a * BN * 128, map, 64 * a, k_row0 + kv0, kvh, packed_k ? 0 : b, bar);
                    }
                    return;
                }
                const int keys = seq_k - kv0 < BN ? seq_k - kv0 : BN;
                const int boxes = (keys + box - 1) / box;
                if (lane == 0) fa_mbar_arrive_tx(bar, (unsigned int)boxes * box_bytes);
                __syncwarp();
                // Lane j copies box j: the boxes of a tile are issued side by side.
                if (lane < boxes) {
                    const int key = kv0 + lane * box;
                    const int in = key - page_of(key) * p.page_size;
#pragma unroll
                    for (int a = 0; a < WS::KA; ++a)
                        fa_tma_load_4d(dst + a * BN * 128 + lane * box * 128, map, 64 * a, in, kvh, pages, bar);
                }
            };
            unsigned int zph = 0;  // parity of the zero-fill barrier's next phase
            int next_pages = tile_pages(tbeg * BN);
            for (int i = 0; i < n; ++i) {
                const int s = i % STAGES;
                const unsigned int ph = (unsigned int)(i / STAGES) & 1u;
                const int kv0 = (tbeg + i) * BN;
                const unsigned int kdst = sbase + WS::K_OFF + s * WS::KV_BYTES;
                const unsigned int vdst = sbase + WS::V_OFF + s * WS::KV_BYTES;
                const int pages = next_pages;
                if (paged && i + 1 < n) next_pages = tile_pages(kv0 + BN);
                if (lane == 0) fa_mbar_wait(bar_ke + 8 * s, ph ^ 1u);
                load_kv(&P.tk, kdst, bar_kf + 8 * s, kv0, pages);
                // K rows past the sequence's end only give scores the masking step replaces;
                // V rows there meet probabilities of 0, so they must be finite: rows of the
                // next packed sequence or an unused page slot may not be, and are zeroed.
                // (Past the tensor's end TMA fills zeros itself.)
                const bool zero_tail = (packed_k || paged) && kv0 + BN > seq_k;
                if (lane == 0) fa_mbar_wait(bar_ve + 8 * s, ph ^ 1u);
                if (!zero_tail) {
                    load_kv(&P.tv, vdst, bar_vf + 8 * s, kv0, pages);
                } else {
                    load_kv(&P.tv, vdst, bar_z, kv0, pages);
                    __syncwarp();
                    fa_mbar_wait(bar_z, zph);
                    zph ^= 1u;
                    const int keep = seq_k - kv0;  // >= 1: a visited tile starts inside
                    const int chunks = (BN - keep) * 8;  // 16-byte chunks of the rows past it, per atom
#pragma unroll
                    for (int a = 0; a < WS::KA; ++a)
                        for (int c = lane; c < chunks; c += 32)
                            fa_st_shared_zero16(vdst + a * BN * 128 + keep * 128 + c * 16);
                    fa_fence_proxy_async();  // before wgmma reads them
                    __syncwarp();
                    if (lane == 0) fa_mbar_arrive(bar_vf + 8 * s);
                }
            }
        }
        return;
    }

    // Math warpgroups.
    fa_setmaxnreg_inc<WS::REG_MATH>();
    const int cw = wg - 1;              // math warpgroup
    const int cwarp = warp - 4;         // math warp
    const int wrow0 = q0 + 16 * cwarp;  // this warp's first query
    const float sl2 = p.scale * FA_LOG2E;
    const int turn = 1 + cw;             // named barrier of this warpgroup's GEMM turn
    const int next = 1 + (cw + 1) % NC;  // ... and of the next one's

    float o[WS::DT][4];
#pragma unroll
    for (int j = 0; j < WS::DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m_i[2] = {FA_NEG_INF, FA_NEG_INF};
    float l_i[2] = {0.0f, 0.0f};
    unsigned int pf[WS::KP][4];

    // Descriptors as in flash_attention_wgmma.h: Q's rows of this warpgroup in every atom,
    // K K-major over BN rows, V MN-major; a slot is KV_BYTES further.
    const fa_u64 q_desc = fa_wgmma_desc(sbase + WS::Q_OFF + cw * 64 * 128, 16, 1024);
    const fa_u64 k_desc = fa_wgmma_desc(sbase + WS::K_OFF, 16, 1024);
    const fa_u64 v_desc = fa_wgmma_desc(sbase + WS::V_OFF, BN * 128, 1024);
    constexpr fa_u64 SLOT_UNITS = WS::KV_BYTES >> 4;  // descriptor address units

    // Every tile of the block runs on both warpgroups: a causal warpgroup whose rows see none
    // of a diagonal tile masks it whole (one tile per block at most), which keeps the
    // tensor-core code free of branches the compiler would have to serialize around.
    // The two products of a tile on ring slot st (wgmma_ops.h), each one commit group.
    auto issue_s = [&](float (&sc)[WS::NT][4], int st) {
        fa_wgmma_issue_qk<T, BM, BN, WS::KQ>(sc, q_desc, k_desc + (fa_u64)st * SLOT_UNITS);
    };
    auto issue_pv = [&](int st) { fa_wgmma_issue_pv<T, WS::DP, WS::KP>(o, pf, v_desc + (fa_u64)st * SLOT_UNITS); };
    // Scores of tile kv0 to probabilities (into pf), alpha the rescale O still owes.
    auto softmax = [&](float (&sc)[WS::NT][4], int kv0, float (&alpha)[2]) {
        const float mul = fa_mma_scale_mask<BN>(sc, p, b, h, wrow0, g, c4, kv0, seq_q, seq_k, diag, causal, has_mask, sl2);
        fa_mma_softmax_rows<WS::NT>(sc, m_i, l_i, mul, alpha);
    };

    if (cw == NC - 1) fa_named_arrive(1, 256);  // the first warpgroup's first turn
    if (n > 0) {
        fa_mbar_wait(bar_q, 0);
        // Tile 0: S_0 alone.
        {
            float s[WS::NT][4];
            fa_named_sync(turn, 256);
            fa_mbar_wait(bar_kf, 0);
            issue_s(s, 0);
            fa_named_arrive(next, 256);
            fa_wgmma_wait<0>();
            fa_wgmma_hold(s);
            fa_mbar_arrive_warp(bar_ke);
            float alpha[2];
            softmax(s, tbeg * BN, alpha);
            fa_mma_pack_p<T, WS::KP>(pf, s);
        }
        // Tile t: S_t and P_{t-1} V_{t-1} issued together; the softmax of S_t runs while
        // P_{t-1} V_{t-1} is on the tensor cores.
        for (int i = 1; i < n; ++i) {
            const int st = i % STAGES, sp = (i - 1) % STAGES;
            const unsigned int ph = (unsigned int)(i / STAGES) & 1u;
            const unsigned int pp = (unsigned int)((i - 1) / STAGES) & 1u;
            float s[WS::NT][4];
            fa_named_sync(turn, 256);
            fa_mbar_wait(bar_kf + 8 * st, ph);
            fa_mbar_wait(bar_vf + 8 * sp, pp);
            issue_s(s, st);
            issue_pv(sp);
            fa_named_arrive(next, 256);
            fa_wgmma_wait<1>();  // S_t done
            fa_wgmma_hold(s);
            fa_mbar_arrive_warp(bar_ke + 8 * st);  // this warp is done with K_t
            float alpha[2];
            softmax(s, (tbeg + i) * BN, alpha);
            fa_wgmma_wait<0>();  // P_{t-1} V_{t-1} done
            fa_wgmma_hold(o);
            fa_mbar_arrive_warp(bar_ve + 8 * sp);  // ... and with V_{t-1}
            fa_mma_rescale<WS::DT>(o, alpha);
            fa_mma_pack_p<T, WS::KP>(pf, s);
        }
        const int sl = (n - 1) % STAGES;
        fa_mbar_wait(bar_vf + 8 * sl, (unsigned int)((n - 1) / STAGES) & 1u);
        issue_pv(sl);
        fa_wgmma_wait<0>();
        fa_wgmma_hold(o);
    }
    // The last warpgroup's last turn hand-over, so no arrival is left pending on the first's barrier.
    if (cw == 0) fa_named_sync(turn, 256);

    // Epilogue: every math warp is done with every slot (and every copy has landed: each was
    // waited for), so O / l is staged over the K / V slots, then stored in 16-byte chunks.
    fa_named_sync(1 + NC, 128 * NC);
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) inv[r] = fa_mma_quad_sum_inv(p, h, m_i[r], l_i[r]);
    unsigned short* ow = reinterpret_cast<unsigned short*>(sm + WS::K_OFF) + 16 * cwarp * WS::OSTR;
    fa_mma_stage_o16<T>(ow, WS::OSTR, o, inv, g, c4);
    __syncwarp();
    fa_mma_store_rows16<16, WS::CPR>(p, ow, WS::OSTR, wrow0, o_off, seq_q, lane);
    fa_mma_store_lse(p, b, h, q_row0, seq_q, wrow0, g, c4, m_i, l_i);
}

#endif  // FA_HAS_WGMMA
