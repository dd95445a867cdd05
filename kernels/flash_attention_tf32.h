// FlashAttention-2 forward pass for f32 inputs on the tensor cores in TF32 (opt-in), CUDA
// sm_80 and newer. Same contract, work split and pipeline as flash_attention_mma.h (read
// that first); what differs:
//  * mma.sync m16n8k8 with tf32 operands: Q, K, V and P are rounded to TF32 (10 mantissa
//    bits, cvt.rna) as they enter the tensor cores, S and O accumulate in f32;
//  * shared memory holds f32 rows of STR = DP + 4 floats (DP = bucket rounded up to 8):
//    16-byte rows shifted by an odd number of 16-byte units, so ldmatrix phases and the
//    scalar V reads below are free of bank conflicts;
//  * one 16-row m-tile per warp (BLOCK_M = 16 * warps).
//
// Fragments of mma.m16n8k8 tf32 (lane = 4 g + c), one f32/tf32 element per register:
//   A (16 x 8):  a0 = (row g, k c)  a1 = (row g+8, k c)  a2 = (row g, k c+4)  a3 = (row g+8, k c+4)
//   B (8 x 8):   b0 = (k c, col g)  b1 = (k c+4, col g)
//   C (16 x 8):  c0, c1 = (row g, cols 2c, 2c+1)  c2, c3 = (row g+8, same cols)
// ldmatrix (b16) on 32-bit data: an 8 x 8 b16 matrix is 8 rows x 4 f32 and lane (g, c)
// receives f32 element c of row g, which is a0..a3 for Q (matrices rows 0-7 | 8-15 x
// k 0-3 | 4-7) and b0, b1 for K stored [key][d] (matrices keys 0-7 | 8-15 x d 0-3 | 4-7).
// P V: the order of the 8 keys of a k-step is free as long as P and V agree. Taking
// k-position c as key 2c and position c + 4 as key 2c + 1 makes the S accumulators of an
// n-tile exactly the A fragment (a0 = c0, a1 = c2, a2 = c1, a3 = c3): no shuffles. V's
// B fragment then is V[2c][g] and V[2c + 1][g], two scalar shared loads per lane.
#pragma once

#include "mma_ops.h"
#include "mma_softmax.h"
#include "mma_block_io.h"

#if FA_HAS_MMA

template <int HD, int BM, int BN, int THREADS>
struct FaTf32Shape {
    static constexpr int NWARPS = THREADS / 32;
    static constexpr int DP = (HD + 7) / 8 * 8;
    static constexpr int STR = DP + 4;   // floats
    static constexpr int CPR = DP / 4;   // 16-byte chunks per row
    static constexpr int Q_OFF = 0;
    static constexpr int K_OFF = Q_OFF + BM * STR;
    static constexpr int V_OFF = K_OFF + 2 * BN * STR;
    static constexpr int SMEM_BYTES = (V_OFF + 2 * BN * STR) * 4;
    static constexpr int NT = BN / 8;   // S n-tiles and P V k-steps
    static constexpr int DT = DP / 8;   // O n-tiles and Q K^T k-steps
    static constexpr bool QREG = DP <= 128;  // Q fragments (DP / 2 registers) kept
    static constexpr int QF = QREG ? DT : 1;
    static_assert(BM == 16 * NWARPS, "BLOCK_M must be 16 rows per warp");
    static_assert(BN % 16 == 0, "BLOCK_N must be a multiple of 16");
};

FA_DEVICE unsigned int fa_tf32_round(float x) {
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
FA_DEVICE unsigned int fa_tf32_round_bits(unsigned int x) {
    return fa_tf32_round(__uint_as_float(x));
}
FA_DEVICE void fa_mma_tf32(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                           unsigned int b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ROWS f32 rows into shared [ROWS][STR] floats: the 16-bit copy with every size doubled.
template <int ROWS, int CPR, int STR, int THREADS>
FA_DEVICE void fa_tf32_copy_tile(float* dst, const FaRows<float>& src, int row0, int row_end,
                                 int head_dim, int tid) {
    fa_mma_copy_tile<ROWS, CPR, 2 * STR, THREADS>(reinterpret_cast<unsigned short*>(dst),
                                                  src.as<unsigned short>(2), row0, row_end,
                                                  2 * head_dim, tid);
}

template <int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_tf32_forward(const AttnParams& p) {
    typedef FaTf32Shape<HD, BM, BN, THREADS> MS;
    static_assert(MS::SMEM_BYTES <= SMEM, "TF32 layout exceeds the tile row's SMEM_BYTES");
    constexpr int STR = MS::STR;

    const int q0 = fa_block_q0(p, BM, MODE);
    FA_BLOCK_EXIT(MODE, p, q0);

    FA_DYNAMIC_SMEM(fa_smem);
    float* smem = reinterpret_cast<float*>(fa_smem);
    float* Qs = smem + MS::Q_OFF;
    float* Ks = smem + MS::K_OFF;
    float* Vs = smem + MS::V_OFF;

    FA_LANE_SETUP();
    FA_BLOCK_SETUP(float, BM, BN, MODE, p, q0);

    if (ntiles > tbeg) {
        fa_tf32_copy_tile<BM, MS::CPR, STR, THREADS>(Qs, qg, q0, seq_q, head_dim, tid);
        fa_tf32_copy_tile<BN, MS::CPR, STR, THREADS>(Ks, kg, tbeg * BN, seq_k, head_dim, tid);
        fa_cp_async_commit();
        fa_tf32_copy_tile<BN, MS::CPR, STR, THREADS>(Vs, vg, tbeg * BN, seq_k, head_dim, tid);
        fa_cp_async_commit();
    }

    const int wrow0 = q0 + 16 * warp;
    const float sl2 = p.scale * FA_LOG2E;

    float o[MS::DT][4];
    float m_i[2] = {FA_NEG_INF, FA_NEG_INF};
    float l_i[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < MS::DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    unsigned int qf[MS::QF][4];

    // Per-lane ldmatrix addresses (bytes, shared window), see the notes above.
    const unsigned int q_addr =
        fa_smem_u32(Qs + (16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8) * STR + (lane >> 4) * 4);
    const unsigned int k_addr =
        fa_smem_u32(Ks + ((lane & 7) + ((lane >> 4) << 3)) * STR + ((lane >> 3) & 1) * 4);
    constexpr unsigned int KV_BUF = BN * STR;  // floats

    for (int t = tbeg; t < ntiles; ++t) {
        const int kv0 = t * BN;
        const int nb = (t + 1 - tbeg) & 1;  // the buffer of tile t + 1
        const unsigned int buf = (unsigned int)(nb ^ 1) * KV_BUF;
        fa_cp_async_wait<1>();
        fa_syncthreads();  // K_t (and Q) visible; every warp is done with K_{t-1}'s buffer
        if (t + 1 < ntiles)
            fa_tf32_copy_tile<BN, MS::CPR, STR, THREADS>(Ks + nb * KV_BUF, kg,
                                                         kv0 + BN, seq_k, head_dim, tid);
        fa_cp_async_commit();

        if (MS::QREG && t == tbeg) {
#pragma unroll
            for (int kk = 0; kk < MS::QF; ++kk) {
                fa_ldsm_x4(q_addr + kk * 32, qf[kk]);
#pragma unroll
                for (int e = 0; e < 4; ++e) qf[kk][e] = fa_tf32_round_bits(qf[kk][e]);
            }
        }

        const bool active = (wrow0 < seq_q) && fa_rows_see_tile(p, kv0, BN, wrow0, wrow0 + 15, diag, causal);

        float s[MS::NT][4];
#pragma unroll
        for (int j = 0; j < MS::NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;

        if (active) {
            // S = Q K_t^T
#pragma unroll
            for (int kk = 0; kk < MS::DT; ++kk) {
                unsigned int a[4];
                if (MS::QREG) {
                    a[0] = qf[kk % MS::QF][0]; a[1] = qf[kk % MS::QF][1];
                    a[2] = qf[kk % MS::QF][2]; a[3] = qf[kk % MS::QF][3];
                } else {
                    fa_ldsm_x4(q_addr + kk * 32, a);
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[e] = fa_tf32_round_bits(a[e]);
                }
#pragma unroll
                for (int np = 0; np < MS::NT / 2; ++np) {
                    unsigned int kb[4];
                    fa_ldsm_x4(k_addr + (buf + np * 16 * STR) * 4 + kk * 32, kb);
#pragma unroll
                    for (int e = 0; e < 4; ++e) kb[e] = fa_tf32_round_bits(kb[e]);
                    fa_mma_tf32(s[2 * np], a, kb[0], kb[1]);
                    fa_mma_tf32(s[2 * np + 1], a, kb[2], kb[3]);
                }
            }

            const float mul = fa_mma_scale_mask<BN, true>(s, p, b, h, wrow0, g, c4, kv0, seq_q, seq_k, diag, causal, has_mask, sl2);

            // Online softmax (mma_softmax.h).
            fa_mma_online_softmax<MS::NT, MS::DT>(s, o, m_i, l_i, mul);
        }

        fa_cp_async_wait<1>();
        fa_syncthreads();  // V_t visible; every warp is done with V_{t-1}'s buffer
        if (t + 1 < ntiles)
            fa_tf32_copy_tile<BN, MS::CPR, STR, THREADS>(Vs + nb * KV_BUF, vg,
                                                         kv0 + BN, seq_k, head_dim, tid);
        fa_cp_async_commit();

        if (active) {
            // O += P V_t with k-position c = key 2c, c + 4 = key 2c + 1 (see above).
            const float* vb = Vs + buf + (2 * c4) * STR + g;
#pragma unroll
            for (int kk = 0; kk < MS::NT; ++kk) {
                const unsigned int a[4] = {fa_tf32_round(s[kk][0]), fa_tf32_round(s[kk][2]),
                                           fa_tf32_round(s[kk][1]), fa_tf32_round(s[kk][3])};
                const float* vk = vb + 8 * kk * STR;
#pragma unroll
                for (int n = 0; n < MS::DT; ++n) {
                    const unsigned int b0 = fa_tf32_round(vk[8 * n]);
                    const unsigned int b1 = fa_tf32_round(vk[STR + 8 * n]);
                    fa_mma_tf32(o[n], a, b0, b1);
                }
            }
        }
    }

    fa_cp_async_wait<0>();
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) inv[r] = fa_mma_quad_sum_inv(p, h, m_i[r], l_i[r]);

    // Each lane owns two consecutive columns of rows g and g + 8 of every 8-column tile.
    float* og = static_cast<float*>(p.out) + o_off;
    const bool out_vec = ((reinterpret_cast<fa_u64>(p.out) & 7u) == 0) &&
                         (((p.o_sb | p.o_sh | p.o_ss) & 1) == 0);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = wrow0 + g + 8 * r;
        if (qi >= seq_q) continue;
        float* orow = og + (fa_i64)qi * p.o_ss;
#pragma unroll
        for (int n = 0; n < MS::DT; ++n) {
            const int col = 8 * n + 2 * c4;
            const float x0 = o[n][2 * r] * inv[r];
            const float x1 = o[n][2 * r + 1] * inv[r];
            if (out_vec && col + 1 < head_dim) {
                fa_float2 v2;
                v2.x = x0;
                v2.y = x1;
                *reinterpret_cast<fa_float2*>(orow + col) = v2;
            } else {
                if (col < head_dim) orow[col] = x0;
                if (col + 1 < head_dim) orow[col + 1] = x1;
            }
        }
    }

    fa_mma_store_lse(p, b, h, q_row0, seq_q, wrow0, g, c4, m_i, l_i);
}

#endif  // FA_HAS_MMA
