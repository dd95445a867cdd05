// Online softmax on the accumulator fragments of mma.sync (m16n8, f32 accumulators), shared
// by the f16/bf16 and TF32 flash kernels. Fragment layout (flash_attention_mma.h): in one
// 16-row m-tile a thread holds rows g and g + 8 (r = 0, 1) of its quad and columns
// 2 * c4 + {0, 1} of each 8-column n-tile j, as s[j][2 * r + e]; the output fragment o has
// the same layout over the head dims.
#pragma once

#include "compat.h"
#include "attention_params.h"
#include "flash_common.h"

// Masks one m-tile of scores that are already in the log2 domain: keys past seq_k, above
// the bottom-right causal diagonal (key > query + diag) or (FA_EXT) outside the row's window
// become -inf; FA_EXT score transforms apply (flash_common.h), then visible keys get the
// additive mask (fa_mask_log2) when there is one. row0 is the m-tile's first query row; the
// thread's rows are row0 + g + 8r, its keys kv0 + 8j + 2 * c4 + e.
template <int NT, bool PRECISE>
FA_DEVICE void fa_mma_mask_tile(float (&s)[NT][4], const AttnParams& p, int b, int h, int row0, int g,
                                int c4, int kv0, int seq_q, int seq_k, int diag, bool causal,
                                bool has_mask) {
    const bool transform = FA_EXT && p.transform != 0;
    const float cap2 = FA_EXT ? fa_cap2(p) : 0.0f;
    const float slope2 = FA_EXT ? fa_slope2(p, h) : 0.0f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = row0 + g + 8 * r;
        const FaRowKeys rk = fa_row_keys(p, qi, diag);
        const float* mrow = nullptr;
        if (has_mask && qi < seq_q)
            mrow = p.mask + (fa_i64)b * p.m_sb + (fa_i64)h * p.m_sh + (fa_i64)qi * p.m_sq;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int kj = kv0 + 8 * j + 2 * c4 + e;
                const bool vis = fa_key_visible(rk, kj, seq_k, causal);
                float x = s[j][2 * r + e];
                if (transform) x = fa_transform_score<PRECISE>(x, cap2, slope2, rk.lim, kj);
                if (mrow != nullptr && vis) x = fa_mask_log2(x, mrow[kj]);
                s[j][2 * r + e] = vis ? x : FA_NEG_INF;
            }
    }
}

// Scores s (raw with mul = scale * log2(e) > 0, or already in the log2 domain with mul = 1)
// become unnormalized probabilities; m is the reference max per row, l the per-lane partial
// row sum (quad-reduced by the caller at the end), alpha the factor by which the row's O
// must be scaled to the new reference. A row with no visible key so far keeps m = -inf and
// l = 0; its exponentials are taken against 0 so that -inf - -inf never happens.
template <int NT>
FA_DEVICE void fa_mma_softmax_rows(float (&s)[NT][4], float (&m)[2], float (&l)[2], float mul, float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = s[0][2 * r];
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
        mx = fmaxf(mx, fa_shfl_xor(mx, 1, 32));
        mx = fmaxf(mx, fa_shfl_xor(mx, 2, 32));
        const float m_new = fmaxf(m[r], mx * mul);
        const float m_use = m_new == FA_NEG_INF ? 0.0f : m_new;
        alpha[r] = fa_exp2f(m[r] - m_use);
        m[r] = m_new;
        float rs = 0.0f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const float e0 = fa_exp2f(fmaf(s[j][2 * r], mul, -m_use));
            const float e1 = fa_exp2f(fmaf(s[j][2 * r + 1], mul, -m_use));
            s[j][2 * r] = e0;
            s[j][2 * r + 1] = e1;
            rs += e0 + e1;
        }
        l[r] = fmaf(l[r], alpha[r], rs);
    }
}

// O rows scaled by their alpha (fa_mma_softmax_rows).
template <int DT> FA_DEVICE void fa_mma_rescale(float (&o)[DT][4], const float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < DT; ++j) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        o[j][2] *= alpha[1];
        o[j][3] *= alpha[1];
    }
}

// fa_mma_softmax_rows with O rescaled at once. O is rescaled on every tile: keeping the old
// reference until some row max of the warp grew by more than 2^8 (a warp vote per tile,
// skipping most rescales) measured 9% slower at head_dim 64 on the H100 and within 1.5% at
// 128 and 256.
template <int NT, int DT>
FA_DEVICE void fa_mma_online_softmax(float (&s)[NT][4], float (&o)[DT][4], float (&m)[2], float (&l)[2],
                                     float mul) {
    float alpha[2];
    fa_mma_softmax_rows<NT>(s, m, l, mul, alpha);
    fa_mma_rescale<DT>(o, alpha);
}

// The FA_EXT transforms on a tile whose keys every row sees (no visibility test): raw scores
// become scale * log2(e) * q.k, softcapped, minus the ALiBi bias. The bias distance
// |lim - j| is taken in float from a per-row base (exact below 2^24 keys), two operations
// per score; the softcap folds the scale into its 1 / C.
template <bool PRECISE, int MT, int NT>
FA_DEVICE void fa_mma_transform_tile(float (&s)[MT][NT][4], const AttnParams& p, int h, int wrow0, int g,
                                     int c4, int kv0, int diag, float sl2) {
    const float cap2 = fa_cap2(p);
    const float slope2 = fa_slope2(p, h);
    if (cap2 > 0.0f) {
        const float pre = sl2 * (1.0f / cap2);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] = cap2 * fa_softcap_tanh<PRECISE>(s[mt][j][e] * pre);
    } else {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] *= sl2;
    }
    if (slope2 != 0.0f) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // lim - j for this thread's first key of the tile.
                const float base = (float)(wrow0 + 16 * mt + g + 8 * r + diag - kv0 - 2 * c4);
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        s[mt][j][2 * r + e] =
                            fmaf(-slope2, fabsf(base - (float)(8 * j + e)), s[mt][j][2 * r + e]);
            }
    }
}

// The score step of the tensor-core kernels, on the MT m-tiles of a warp whose first query
// is wrow0, for the key tile kv0 .. kv0 + BN - 1: tiles that need masking
// (fa_tile_needs_mask: keys past seq_k, the causal diagonal, an additive mask, FA_EXT
// transforms and window edges) are scaled into the exp2 domain first (sl2 = scale * log2(e)),
// then masked; other tiles stay raw and the scale is folded into the exponent (mul = sl2 > 0
// keeps the row max where it is). Returns the mul for fa_mma_online_softmax. PRECISE: f32
// inputs (exact tanh for the softcap).
template <int BN, bool PRECISE = false, int MT, int NT>
FA_DEVICE float fa_mma_scale_mask(float (&s)[MT][NT][4], const AttnParams& p, int b, int h, int wrow0, int g,
                                  int c4, int kv0, int seq_q, int seq_k, int diag, bool causal,
                                  bool has_mask, float sl2) {
    const int wlast = (wrow0 + 16 * MT < seq_q ? wrow0 + 16 * MT : seq_q) - 1;
    const bool need_mask = fa_tile_needs_mask(p, kv0, BN, wrow0, wlast, diag, seq_k, causal, has_mask);
    if (fa_transforms(p) && !need_mask && sl2 > 0.0f) {
        fa_mma_transform_tile<PRECISE>(s, p, h, wrow0, g, c4, kv0, diag, sl2);
        return 1.0f;
    }
    float mul = sl2;
    if (need_mask || fa_transforms(p) || !(sl2 > 0.0f)) {
        mul = 1.0f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] *= sl2;
    }
    if (need_mask)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            fa_mma_mask_tile<NT, PRECISE>(s[mt], p, b, h, wrow0 + 16 * mt, g, c4, kv0, seq_q, seq_k, diag,
                                          causal, has_mask);
    return mul;
}
// The same on one m-tile.
template <int BN, bool PRECISE = false, int NT>
FA_DEVICE float fa_mma_scale_mask(float (&s)[NT][4], const AttnParams& p, int b, int h, int wrow0, int g, int c4,
                                  int kv0, int seq_q, int seq_k, int diag, bool causal, bool has_mask,
                                  float sl2) {
    return fa_mma_scale_mask<BN, PRECISE>(reinterpret_cast<float(&)[1][NT][4]>(s), p, b, h, wrow0, g, c4, kv0,
                                          seq_q, seq_k, diag, causal, has_mask, sl2);
}
