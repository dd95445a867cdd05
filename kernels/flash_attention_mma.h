// FlashAttention-2 forward pass on tensor cores: f16/bf16 inputs, CUDA sm_80 and newer.
//
// flash_entry.h defines its entry points (FA_VARIANT_IMPL mma). The host launches it only
// where Q, K and V are 16-byte aligned with strides and head_dim in whole 16-byte chunks;
// other inputs take the split SIMT entry point of the same row (a host decision).
//
// Same contract as the SIMT kernel in flash_simt.h: bottom-right causal, additive
// f32 mask (MODE 2), GQA, any head_dim <= bucket (zero padded), rows with no visible key give
// zeros and lse = -inf, 64-bit offsets.
//
// Work split. A block of THREADS = 32 * NWARPS threads owns BLOCK_M = WR * NWARPS queries of
// one (batch, head); warp w owns query rows [WR w, WR w + WR) of the block, WR = 16 * MT with
// MT = 1 or 2 m-tiles of 16 rows. Two m-tiles use every K/V fragment loaded from shared
// memory twice, which is what makes D <= 128 fast; for D > 128 the O accumulator leaves no
// registers for it. K/V tiles of BLOCK_N keys stream through shared memory: cp.async copies,
// two buffers each for K and V, so the copy of tile t+1 overlaps the math on tile t. Causal
// tiles above the diagonal are never visited, and a warp whose rows see no key of a tile
// skips its math. Per tile a warp computes
//   S (WR x BLOCK_N) = Q (WR x D) K^T            mma m16n8k16, f32 accumulate
//   online softmax on the S fragments in registers (exp2 domain, scale*log2(e) applied to S)
//   O (WR x D) += P (WR x BLOCK_N) V              P packed to f16/bf16 in registers
// and writes O once at the end (staged through its own rows of the Q buffer so that global
// stores are 16-byte wide).
//
// Fragment layouts of mma.sync.m16n8k16 (lane = 4 * g + c, g = lane / 4, c = lane % 4); each
// 32-bit register holds two consecutive 16-bit elements along k (A, B) or two f32 along n:
//   A (16 x 16, row major):  a0 = (row g,   k 2c..2c+1)   a1 = (row g+8, k 2c..2c+1)
//                            a2 = (row g,   k 2c+8..+9)   a3 = (row g+8, k 2c+8..+9)
//   B (16 x 8, "col"):       b0 = (k 2c..2c+1, col g)     b1 = (k 2c+8..+9, col g)
//   C (16 x 8, f32):         c0, c1 = (row g, cols 2c, 2c+1)   c2, c3 = (row g+8, same cols)
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i
// and register i of lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of matrix i (with
// .trans: column l/4, rows 2(l%4), 2(l%4)+1).
//   Q (A operand): matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15): lane l points at row l%16,
//     column 8 * (l/16); registers come out as a0..a3.
//   K (B operand of Q K^T, stored [key][d], i.e. already "col" for B): matrices cover keys
//     0-7 / 8-15 and d 0-7 / 8-15; lane l points at key (l%8) + 8 * (l/16), d 8 * ((l/8)%2);
//     registers are b0, b1 of key group 0 and b0, b1 of key group 1.
//   V (B operand of P V, stored [key][d] = row-major B, hence .trans): lane l points at
//     key l%16, d 8 * (l/16); registers are b0, b1 of d group 0 and b0, b1 of d group 1.
//   P (A operand of P V): the C fragments of S n-tiles 2j and 2j+1 are exactly the A
//     fragment of k-step j (a0 = S[2j].c0c1, a1 = S[2j].c2c3, a2 = S[2j+1].c0c1,
//     a3 = S[2j+1].c2c3), so P never leaves the registers.
// A thread therefore owns two query rows (g and g+8) of each m-tile of its warp; row max and
// row sum are reduced over the 4 lanes of a quad.
//
// Shared memory (16-bit elements): Q [BM][STR], K [2][BN][STR], V [2][BN][STR] with
// STR = DP + 8 (DP = head-dim bucket rounded up to 16). A row is then an odd multiple of
// 16 bytes long modulo 128, so the 8 rows one ldmatrix phase reads fall in 8 distinct
// 16-byte bank groups: no bank conflicts, and every row stays 16-byte aligned for cp.async.
//
// Pipeline per tile t (cp.async groups are committed in the order Q+K_0, V_0, K_1, V_1, ...;
// an empty group is committed when there is no next tile so that counting stays uniform):
//   wait K_t, barrier -> issue K_{t+1} into the other K buffer -> S, softmax
//   -> wait V_t, barrier -> issue V_{t+1} into the other V buffer -> O += P V_t
// Buffer reuse: K_{t+1} overwrites K_{t-1}, last read before the second barrier of tile t-1;
// V_{t+1} overwrites V_{t-1}, last read before the first barrier of tile t.
#pragma once

#include "mma_ops.h"
#include "mma_softmax.h"
#include "mma_block_io.h"

#if FA_HAS_MMA

template <int HD, int BM, int BN, int THREADS>
struct FaMmaShape {
    static constexpr int NWARPS = THREADS / 32;
    static constexpr int MT = BM / (16 * NWARPS);  // 16-row m-tiles per warp
    static constexpr int WR = 16 * MT;             // query rows per warp
    static constexpr int DP = (HD + 15) / 16 * 16;  // computed head dim (zero padded)
    static constexpr int STR = DP + 8;              // shared row stride, elements
    static constexpr int CPR = DP / 8;              // 16-byte chunks per row
    static constexpr int Q_OFF = 0;
    static constexpr int K_OFF = Q_OFF + BM * STR;
    static constexpr int V_OFF = K_OFF + 2 * BN * STR;
    static constexpr int SMEM_BYTES = (V_OFF + 2 * BN * STR) * 2;
    static constexpr int NT = BN / 8;   // S n-tiles (8 keys each)
    static constexpr int DT = DP / 8;   // O n-tiles (8 head-dim columns each)
    static constexpr int KQ = DP / 16;  // k-steps of Q K^T
    static constexpr int KP = BN / 16;  // k-steps of P V
    // Q fragments (4 * KQ * MT registers) stay in registers while they take at most 32;
    // beyond, they are re-read with ldmatrix so that the O accumulator (MT * D / 2
    // registers) keeps the rest of the register file.
    static constexpr bool QREG = DP * MT <= 128;
    static constexpr int QF = QREG ? KQ : 1;

    static_assert(THREADS % 32 == 0 && (MT == 1 || MT == 2) && BM == WR * NWARPS,
                  "BLOCK_M must be 16 or 32 rows per warp");
    static_assert(BN % 16 == 0, "BLOCK_N must be a multiple of 16");
    static_assert(HD <= 256 && HD % 8 == 0, "head-dim bucket must be a multiple of 8, <= 256");
};

// ------------------------------------------------------------------ tile copy
// ROWS x DP elements from global rows row0.. (FaRows: dense or paged) into shared
// [ROWS][STR], 16-byte chunks by cp.async. Rows >= row_end and columns >= head_dim are zero
// filled (the source is then not read), so padded keys meet exp2(-inf) * 0, never 0 * garbage.
template <int ROWS, int CPR, int STR, int THREADS,
          bool BY_ROWS = (THREADS % CPR == 0) && (ROWS % (THREADS / CPR) == 0)>
struct FaMmaCopy {
    FA_DEVICE static void run(unsigned short* dst, const FaRows<unsigned short>& src, int row0,
                              int row_end, int head_dim, int tid) {
        constexpr int NCH = ROWS * CPR;
#pragma unroll
        for (int c = 0; c < (NCH + THREADS - 1) / THREADS; ++c) {
            const int idx = tid + c * THREADS;
            if (NCH % THREADS != 0 && idx >= NCH) break;
            const int r = idx / CPR;
            const int col = (idx % CPR) * 8;
            const bool valid = (row0 + r < row_end) && (col < head_dim);
            const unsigned short* s = valid ? src.row(row0 + r) + col : src.base;
            fa_cp_async16(dst + r * STR + col, s, valid);
        }
    }
};
// Each thread copies one column chunk of every RS-th row through one running pointer, so no
// per-chunk 64-bit address stays live across the tile loop (measured ~8% faster); paged rows
// are looked up one by one.
template <int ROWS, int CPR, int STR, int THREADS>
struct FaMmaCopy<ROWS, CPR, STR, THREADS, true> {
    FA_DEVICE static void run(unsigned short* dst, const FaRows<unsigned short>& src, int row0,
                              int row_end, int head_dim, int tid) {
        constexpr int RS = THREADS / CPR;
        const int r0 = tid / CPR;
        const int col = (tid % CPR) * 8;
        const unsigned short* s = src.base + (fa_i64)(row0 + r0) * src.stride + col;
        const fa_i64 step = (fa_i64)RS * src.stride;
        const bool col_ok = col < head_dim;
#pragma unroll
        for (int c = 0; c < ROWS / RS; ++c) {
            const int r = row0 + r0 + c * RS;
            const bool valid = col_ok && (r < row_end);
            const unsigned short* a = src.paged() ? (valid ? src.row(r) + col : src.base)
                                                  : (valid ? s : src.base);
            fa_cp_async16(dst + (r0 + c * RS) * STR + col, a, valid);
            s += step;
        }
    }
};
template <int ROWS, int CPR, int STR, int THREADS>
FA_DEVICE void fa_mma_copy_tile(unsigned short* dst, const FaRows<unsigned short>& src, int row0,
                                int row_end, int head_dim, int tid) {
    FaMmaCopy<ROWS, CPR, STR, THREADS>::run(dst, src, row0, row_end, head_dim, tid);
}

// ------------------------------------------------------------------ the kernel body
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_mma_forward(const AttnParams& p) {
    typedef FaMmaShape<HD, BM, BN, THREADS> MS;
    typedef FaMma<T> MM;
    static_assert(MS::SMEM_BYTES <= SMEM, "tensor-core layout exceeds the tile row's SMEM_BYTES");
    constexpr int STR = MS::STR;

    const int q0 = fa_block_q0(p, BM, MODE);
    FA_BLOCK_EXIT(MODE, p, q0);

    FA_DYNAMIC_SMEM(fa_smem);
    unsigned short* smem = reinterpret_cast<unsigned short*>(fa_smem);
    unsigned short* Qs = smem + MS::Q_OFF;
    unsigned short* Ks = smem + MS::K_OFF;
    unsigned short* Vs = smem + MS::V_OFF;

    FA_LANE_SETUP();
    FA_BLOCK_SETUP(unsigned short, BM, BN, MODE, p, q0);

    if (ntiles > tbeg) {
        fa_mma_copy_tile<BM, MS::CPR, STR, THREADS>(Qs, qg, q0, seq_q, head_dim, tid);
        fa_mma_copy_tile<BN, MS::CPR, STR, THREADS>(Ks, kg, tbeg * BN, seq_k, head_dim, tid);
        fa_cp_async_commit();
        fa_mma_copy_tile<BN, MS::CPR, STR, THREADS>(Vs, vg, tbeg * BN, seq_k, head_dim, tid);
        fa_cp_async_commit();
    }

    // Rows of this warp: wrow0 .. wrow0 + WR - 1 (queries); this thread's, in m-tile mt:
    // wrow0 + 16 * mt + g and + 8.
    constexpr int MT = MS::MT;
    constexpr int WR = MS::WR;
    const int wrow0 = q0 + WR * warp;
    const float sl2 = p.scale * FA_LOG2E;

    float o[MT][MS::DT][4];
    float m_i[MT][2];
    float l_i[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < MS::DT; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.0f;
        m_i[mt][0] = m_i[mt][1] = FA_NEG_INF;
        l_i[mt][0] = l_i[mt][1] = 0.0f;
    }
    unsigned int qf[MT][MS::QF][4];

    // Per-lane ldmatrix addresses (bytes, shared window), see the layout notes above.
    const unsigned int q_addr =
        fa_smem_u32(Qs + (WR * warp + (lane & 15)) * STR + (lane >> 4) * 8);
    const unsigned int k_addr =
        fa_smem_u32(Ks + ((lane & 7) + ((lane >> 4) << 3)) * STR + ((lane >> 3) & 1) * 8);
    const unsigned int v_addr = fa_smem_u32(Vs + (lane & 15) * STR + (lane >> 4) * 8);
    constexpr unsigned int KV_BUF_BYTES = BN * STR * 2;

    for (int t = tbeg; t < ntiles; ++t) {
        const int kv0 = t * BN;
        const int nb = (t + 1 - tbeg) & 1;  // the buffer of tile t + 1
        const unsigned int buf = (unsigned int)(nb ^ 1) * KV_BUF_BYTES;
        fa_cp_async_wait<1>();
        fa_syncthreads();  // K_t (and Q) visible; every warp is done with K_{t-1}'s buffer
        if (t + 1 < ntiles)
            fa_mma_copy_tile<BN, MS::CPR, STR, THREADS>(Ks + nb * BN * STR, kg,
                                                        kv0 + BN, seq_k, head_dim, tid);
        fa_cp_async_commit();

        if (MS::QREG && t == tbeg) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < MS::QF; ++kk)
                    fa_ldsm_x4(q_addr + mt * 16 * STR * 2 + kk * 32, qf[mt][kk]);
        }

        // A warp whose rows are past seq_q, or whose rows see no key of this tile (causal,
        // window), has nothing to add: its m, l and O are what a fully masked tile would leave.
        const bool active = (wrow0 < seq_q) && fa_rows_see_tile(p, kv0, BN, wrow0, wrow0 + WR - 1, diag, causal);

        float s[MT][MS::NT][4];
        unsigned int pf[MT][MS::KP][4];  // P as the A operand of P V, k-step by k-step
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < MS::NT; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;

        if (active) {
            // S = Q K_t^T
#pragma unroll
            for (int kk = 0; kk < MS::KQ; ++kk) {
                unsigned int a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (MS::QREG) {
                        a[mt][0] = qf[mt][kk % MS::QF][0]; a[mt][1] = qf[mt][kk % MS::QF][1];
                        a[mt][2] = qf[mt][kk % MS::QF][2]; a[mt][3] = qf[mt][kk % MS::QF][3];
                    } else {
                        fa_ldsm_x4(q_addr + mt * 16 * STR * 2 + kk * 32, a[mt]);
                    }
                }
#pragma unroll
                for (int np = 0; np < MS::NT / 2; ++np) {
                    unsigned int kb[4];
                    fa_ldsm_x4(k_addr + buf + np * 16 * STR * 2 + kk * 32, kb);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        MM::mma(s[mt][2 * np], a[mt], kb[0], kb[1]);
                        MM::mma(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
                    }
                }
            }

            // Scale, then mask where the tile needs it (mma_softmax.h).
            const float mul = fa_mma_scale_mask<BN>(s, p, b, h, wrow0, g, c4, kv0, seq_q, seq_k, diag, causal, has_mask, sl2);

            // Online softmax (mma_softmax.h), one m-tile at a time.
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) fa_mma_online_softmax<MS::NT, MS::DT>(s[mt], o[mt], m_i[mt], l_i[mt], mul);
            // P to 16 bits now: half the registers of S across the V copy and P V.
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) fa_mma_pack_p<T, MS::KP>(pf[mt], s[mt]);
        }

        fa_cp_async_wait<1>();
        fa_syncthreads();  // V_t visible; every warp is done with V_{t-1}'s buffer
        if (t + 1 < ntiles)
            fa_mma_copy_tile<BN, MS::CPR, STR, THREADS>(Vs + nb * BN * STR, vg,
                                                        kv0 + BN, seq_k, head_dim, tid);
        fa_cp_async_commit();

        if (active) {
            // O += P V_t, P straight from the S accumulators.
#pragma unroll
            for (int kk = 0; kk < MS::KP; ++kk) {
#pragma unroll
                for (int np = 0; np < MS::DT / 2; ++np) {
                    unsigned int vb[4];
                    fa_ldsm_x4_trans(v_addr + buf + kk * 16 * STR * 2 + np * 32, vb);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        MM::mma(o[mt][2 * np], pf[mt][kk], vb[0], vb[1]);
                        MM::mma(o[mt][2 * np + 1], pf[mt][kk], vb[2], vb[3]);
                    }
                }
            }
        }
    }

    // Epilogue: O / l through this warp's rows of the Q buffer, then 16-byte stores.
    fa_cp_async_wait<0>();
    fa_syncthreads();  // no copy in flight anywhere; Q rows are only reused by their own warp
    float inv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) inv[mt][r] = fa_mma_quad_sum_inv(p, h, m_i[mt][r], l_i[mt][r]);
    unsigned short* ow = Qs + WR * warp * STR;
    fa_mma_stage_o16<T>(ow, STR, o, inv, g, c4);
    __syncwarp();

    fa_mma_store_rows16<WR, MS::CPR>(p, ow, STR, wrow0, o_off, seq_q, lane);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) fa_mma_store_lse(p, b, h, q_row0, seq_q, wrow0 + 16 * mt, g, c4, m_i[mt], l_i[mt]);
}

#endif  // FA_HAS_MMA
