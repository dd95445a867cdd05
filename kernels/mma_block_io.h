// The output end of a tensor-core flash block (flash_attention_mma.h, _tf32.h, _wgmma.h):
// the quad-reduced row sums, the staging and stores of 16-bit rows and the log-sum-exp. Fragment rows as in mma_softmax.h: a
// thread holds rows row0 + g + 8r (r = 0, 1) of its quad.
#pragma once

#include "compat.h"
#include "attention_params.h"
#include "flash_common.h"
#include "mma_ops.h"

// A row's sum over the four lanes of its quad (each holds a quarter of the columns), left in
// l; returns the factor that normalizes its O (fa_row_end: 1 / sum, or 0 for a row that saw
// no visible key; FA_EXT sinks join the sum). m is the row's running max.
FA_DEVICE float fa_mma_quad_sum_inv(const AttnParams& p, int h, float m, float& l) {
    l += fa_shfl_xor(l, 1, 32);
    l += fa_shfl_xor(l, 2, 32);
    return fa_row_end(p, h, m, l).inv;
}

// Copies ROWS rows of 16-bit output staged in shared memory (row stride str elements, CPR
// 16-byte chunks per row) to the output rows row0 .., one chunk per lane at a time; 16-byte
// stores where the output allows them. o_off is the block's output offset (FA_BLOCK_SETUP),
// rows from seq_q on are not stored.
template <int ROWS, int CPR>
FA_DEVICE void fa_mma_store_rows16(const AttnParams& p, const unsigned short* ow, int str, int row0,
                                   fa_i64 o_off, int seq_q, int lane) {
    unsigned short* og = static_cast<unsigned short*>(p.out) + o_off;
    const bool out_vec = ((reinterpret_cast<fa_u64>(p.out) & 15u) == 0) && (((p.o_sb | p.o_sh | p.o_ss) & 7) == 0);
#pragma unroll
    for (int it = 0; it < (ROWS * CPR + 31) / 32; ++it) {
        const int idx = lane + 32 * it;
        if (idx >= ROWS * CPR) break;
        const int r = idx / CPR;
        const int col = (idx % CPR) * 8;
        const int qi = row0 + r;
        if (qi < seq_q && col < p.head_dim) {
            unsigned short* dst = og + (fa_i64)qi * p.o_ss + col;
            const unsigned short* src = ow + r * str + col;
            if (out_vec) {
                *reinterpret_cast<fa_u32x4*>(dst) = *reinterpret_cast<const fa_u32x4*>(src);
            } else {
                for (int e = 0; e < 8 && col + e < p.head_dim; ++e) dst[e] = src[e];
            }
        }
    }
}

// The natural-log log-sum-exp of the thread's rows row0 + g + 8r from their running max
// (log2 domain) and whole sum (fa_row_end), written by one lane of each quad when the
// caller asked for it; q_row0 and seq_q as FA_BLOCK_EXIT declares them.
FA_DEVICE void fa_mma_store_lse(const AttnParams& p, int b, int h, int q_row0, int seq_q, int row0, int g,
                                int c4, const float (&m)[2], const float (&l)[2]) {
    if (p.lse == nullptr || c4 != 0) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = row0 + g + 8 * r;
        if (qi < seq_q) *fa_lse_at(p, b, h, q_row0, qi) = fa_row_end(p, h, m[r], l[r]).lse;
    }
}

#if FA_HAS_MMA
// O / l of a warp's MT m-tiles (accumulator layout, DT n-tiles of 8 columns) as 16-bit rows
// into the staging rows ow (row stride str elements): row 16 mt + g + 8r, columns 8j + 2c4.
template <typename T, int MT, int DT>
FA_DEVICE void fa_mma_stage_o16(unsigned short* ow, int str, const float (&o)[MT][DT][4],
                                const float (&inv)[MT][2], int g, int c4) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < DT; ++j) {
            *reinterpret_cast<unsigned int*>(ow + (16 * mt + g) * str + 8 * j + 2 * c4) =
                FaMma<T>::pack(o[mt][j][0] * inv[mt][0], o[mt][j][1] * inv[mt][0]);
            *reinterpret_cast<unsigned int*>(ow + (16 * mt + g + 8) * str + 8 * j + 2 * c4) =
                FaMma<T>::pack(o[mt][j][2] * inv[mt][1], o[mt][j][3] * inv[mt][1]);
        }
}
// The same for one m-tile.
template <typename T, int DT>
FA_DEVICE void fa_mma_stage_o16(unsigned short* ow, int str, const float (&o)[DT][4], const float (&inv)[2],
                                int g, int c4) {
    fa_mma_stage_o16<T, 1, DT>(ow, str, reinterpret_cast<const float(&)[1][DT][4]>(o),
                               reinterpret_cast<const float(&)[1][2]>(inv), g, c4);
}
#endif  // FA_HAS_MMA
