// Unfused attention, entirely on the device, in three launches whatever batch and heads:
//   attn_scores_<dt>   workspace[b,h,i,j] = scale * q_i . k_j + mask[b,h,i,j]  (-inf where
//                      causal hides key j)          grid (ceil(Sk/64), ceil(Sq/64), B*H), block 256
//   attn_softmax_rows  softmax over j of every workspace row, in place; a row whose max is
//                      -inf becomes zeros           grid (B*H*Sq), block 256
//   attn_pv_<dt>       out[b,i,h,:] = sum_j workspace[b,h,i,j] * v[b,j,kvh,:]
//                                                    grid (ceil(D/64), ceil(Sq/64), B*H), block 256
// workspace is f32, contiguous [B, H, Sq, Sk]. Any head_dim works. Grid y and z (and x for
// the softmax) may be clamped by the host: every kernel strides over the rest.
// With -DFA_VARIANT_DT=<dt> only that dtype (plus the softmax) is emitted.
#include "compat.h"
#include "attention_params.h"

#define FA_TR_TILE 64   // output tile edge
#define FA_TR_KC 16     // reduction chunk staged in shared memory
#define FA_TR_PAD 68    // shared row length: 16-byte aligned rows, fewer bank conflicts

// One 64x64 tile of S = Q K^T for one (b, h), 4x4 outputs per thread. Shared tiles are
// reduction-major so each thread reads its 4 rows and its 4 columns as two vectors.
template <typename T>
FA_DEVICE void fa_attn_scores(const AttnParams& p) {
    __shared__ __attribute__((aligned(16))) float Qs[FA_TR_KC][FA_TR_PAD];
    __shared__ __attribute__((aligned(16))) float Ks[FA_TR_KC][FA_TR_PAD];
    const int tid = (int)threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int seq_q = p.seq_q, seq_k = p.seq_k, hd = p.head_dim;
    const int j0 = (int)blockIdx.x * FA_TR_TILE;
    const fa_i64 nbh = (fa_i64)p.batch * p.num_heads;
    const int group = p.num_heads / p.num_kv_heads;
    const int diag = seq_k - seq_q;

    for (fa_i64 bh = blockIdx.z; bh < nbh; bh += gridDim.z) {
        const int b = (int)(bh / p.num_heads);
        const int h = (int)(bh % p.num_heads);
        const T* qg = static_cast<const T*>(p.q) + (fa_i64)b * p.q_sb + (fa_i64)h * p.q_sh;
        const T* kg = static_cast<const T*>(p.k) + (fa_i64)b * p.k_sb + (fa_i64)(h / group) * p.k_sh;
        for (int i0 = (int)blockIdx.y * FA_TR_TILE; i0 < seq_q; i0 += (int)gridDim.y * FA_TR_TILE) {
            float acc[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[a][c] = 0.0f;

            for (int d0 = 0; d0 < hd; d0 += FA_TR_KC) {
                // 64 rows x 16 dims of Q and of K; 16 consecutive threads read one row's dims.
#pragma unroll
                for (int r = 0; r < (FA_TR_TILE * FA_TR_KC) / 256; ++r) {
                    const int e = tid + r * 256;
                    const int row = e / FA_TR_KC, dd = e % FA_TR_KC;
                    const int d = d0 + dd;
                    const int qi = i0 + row, kj = j0 + row;
                    Qs[dd][row] = (qi < seq_q && d < hd) ? fa_load_f32<T>(qg + (fa_i64)qi * p.q_ss + d) : 0.0f;
                    Ks[dd][row] = (kj < seq_k && d < hd) ? fa_load_f32<T>(kg + (fa_i64)kj * p.k_ss + d) : 0.0f;
                }
                fa_syncthreads();
#pragma unroll
                for (int dd = 0; dd < FA_TR_KC; ++dd) {
                    const fa_float4 qv = *reinterpret_cast<const fa_float4*>(&Qs[dd][ty * 4]);
                    const fa_float4 kv = *reinterpret_cast<const fa_float4*>(&Ks[dd][tx * 4]);
                    const float qa[4] = {qv.x, qv.y, qv.z, qv.w};
                    const float ka[4] = {kv.x, kv.y, kv.z, kv.w};
#pragma unroll
                    for (int a = 0; a < 4; ++a)
#pragma unroll
                        for (int c = 0; c < 4; ++c) acc[a][c] = fmaf(qa[a], ka[c], acc[a][c]);
                }
                fa_syncthreads();  // the next chunk overwrites Qs/Ks
            }

#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const int qi = i0 + ty * 4 + a;
                if (qi >= seq_q) continue;
                float* srow = p.workspace + ((fa_i64)bh * seq_q + qi) * (fa_i64)seq_k;
                const float* mrow = p.mask == nullptr ? nullptr
                    : p.mask + (fa_i64)b * p.m_sb + (fa_i64)h * p.m_sh + (fa_i64)qi * p.m_sq;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int kj = j0 + tx * 4 + c;
                    if (kj >= seq_k) continue;
                    // Natural units here; the same rule as fa_mask_log2: -inf removes the
                    // key whatever its score, finite values are added.
                    float x = acc[a][c] * p.scale;
                    if (mrow != nullptr) x = mrow[kj] == FA_NEG_INF ? FA_NEG_INF : x + mrow[kj];
                    if (p.causal != 0 && kj > qi + diag) x = FA_NEG_INF;
                    srow[kj] = x;
                }
            }
        }
    }
}

// Sum (or max) over the block; blockDim.x must be a multiple of 32. Shuffles stay within
// 32 lanes and the groups are combined through shared memory, so wave64 works too.
FA_DEVICE float fa_block_reduce(float v, float* red, bool is_max) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = fa_shfl_xor(v, off, 32);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    const int tid = (int)threadIdx.x;
    if ((tid & 31) == 0) red[tid >> 5] = v;
    fa_syncthreads();
    float r = red[0];
    const int groups = (int)blockDim.x >> 5;
    for (int g = 1; g < groups; ++g) r = is_max ? fmaxf(r, red[g]) : r + red[g];
    fa_syncthreads();  // red is reused by the next reduction
    return r;
}

FA_KERNEL void FA_LAUNCH_BOUNDS(256) attn_softmax_rows(AttnParams p) {
    __shared__ float red[32];
    const fa_i64 rows = (fa_i64)p.batch * p.num_heads * p.seq_q;
    const int n = p.seq_k;
    const int tid = (int)threadIdx.x, nt = (int)blockDim.x;
    for (fa_i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        float* x = p.workspace + row * (fa_i64)n;
        float mx = FA_NEG_INF;
        for (int j = tid; j < n; j += nt) mx = fmaxf(mx, x[j]);
        mx = fa_block_reduce(mx, red, true);
        if (mx == FA_NEG_INF) {  // no visible key: zeros, never NaN
            for (int j = tid; j < n; j += nt) x[j] = 0.0f;
            continue;
        }
        // x - mx before the log2 scaling: mx * log2(e) overflows for scores near -FLT_MAX.
        float sum = 0.0f;
        for (int j = tid; j < n; j += nt) sum += fa_exp2f((x[j] - mx) * FA_LOG2E);
        sum = fa_block_reduce(sum, red, false);
        const float inv = 1.0f / sum;
        for (int j = tid; j < n; j += nt) x[j] = fa_exp2f((x[j] - mx) * FA_LOG2E) * inv;
    }
}

// One 64 (queries) x 64 (head-dim) tile of O = P V for one (b, h), 4x4 outputs per thread.
template <typename T>
FA_DEVICE void fa_attn_pv(const AttnParams& p) {
    __shared__ __attribute__((aligned(16))) float Ps[FA_TR_KC][FA_TR_PAD];
    __shared__ __attribute__((aligned(16))) float Vs[FA_TR_KC][FA_TR_PAD];
    const int tid = (int)threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int seq_q = p.seq_q, seq_k = p.seq_k, hd = p.head_dim;
    const int c0 = (int)blockIdx.x * FA_TR_TILE;
    const fa_i64 nbh = (fa_i64)p.batch * p.num_heads;
    const int group = p.num_heads / p.num_kv_heads;

    for (fa_i64 bh = blockIdx.z; bh < nbh; bh += gridDim.z) {
        const int b = (int)(bh / p.num_heads);
        const int h = (int)(bh % p.num_heads);
        const T* vg = static_cast<const T*>(p.v) + (fa_i64)b * p.v_sb + (fa_i64)(h / group) * p.v_sh;
        T* og = static_cast<T*>(p.out) + (fa_i64)b * p.o_sb + (fa_i64)h * p.o_sh;
        for (int i0 = (int)blockIdx.y * FA_TR_TILE; i0 < seq_q; i0 += (int)gridDim.y * FA_TR_TILE) {
            const float* pw = p.workspace + ((fa_i64)bh * seq_q + i0) * (fa_i64)seq_k;
            float acc[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[a][c] = 0.0f;

            for (int k0 = 0; k0 < seq_k; k0 += FA_TR_KC) {
#pragma unroll
                for (int r = 0; r < (FA_TR_TILE * FA_TR_KC) / 256; ++r) {
                    const int e = tid + r * 256;
                    // P: 16 consecutive threads read 16 consecutive keys of one query row.
                    const int prow = e / FA_TR_KC, pk = e % FA_TR_KC;
                    Ps[pk][prow] = (i0 + prow < seq_q && k0 + pk < seq_k)
                                       ? pw[(fa_i64)prow * seq_k + k0 + pk] : 0.0f;
                    // V: 64 consecutive threads read one key's 64 head-dim columns.
                    const int vk = e / FA_TR_TILE, vc = e % FA_TR_TILE;
                    Vs[vk][vc] = (k0 + vk < seq_k && c0 + vc < hd)
                                     ? fa_load_f32<T>(vg + (fa_i64)(k0 + vk) * p.v_ss + c0 + vc) : 0.0f;
                }
                fa_syncthreads();
#pragma unroll
                for (int kk = 0; kk < FA_TR_KC; ++kk) {
                    const fa_float4 pv = *reinterpret_cast<const fa_float4*>(&Ps[kk][ty * 4]);
                    const fa_float4 vv = *reinterpret_cast<const fa_float4*>(&Vs[kk][tx * 4]);
                    const float pa[4] = {pv.x, pv.y, pv.z, pv.w};
                    const float va[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
                    for (int a = 0; a < 4; ++a)
#pragma unroll
                        for (int c = 0; c < 4; ++c) acc[a][c] = fmaf(pa[a], va[c], acc[a][c]);
                }
                fa_syncthreads();  // the next chunk overwrites Ps/Vs
            }

#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const int qi = i0 + ty * 4 + a;
                if (qi >= seq_q) continue;
                T* orow = og + (fa_i64)qi * p.o_ss;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int col = c0 + tx * 4 + c;
                    if (col < hd) fa_store<T>(orow + col, acc[a][c]);
                }
            }
        }
    }
}

#define FA_TR_ELEM_f32 float
#define FA_TR_ELEM_f16 fa_f16
#define FA_TR_ELEM_bf16 fa_bf16
#define FA_DEFINE_TRADITIONAL_I(dt)                                                         \
    FA_KERNEL void FA_LAUNCH_BOUNDS(256) attn_scores_##dt(AttnParams p) {                  \
        fa_attn_scores<FA_TR_ELEM_##dt>(p);                                                 \
    }                                                                                       \
    FA_KERNEL void FA_LAUNCH_BOUNDS(256) attn_pv_##dt(AttnParams p) { fa_attn_pv<FA_TR_ELEM_##dt>(p); }
#define FA_DEFINE_TRADITIONAL(dt) FA_DEFINE_TRADITIONAL_I(dt)

#if defined(FA_VARIANT_DT)
FA_DEFINE_TRADITIONAL(FA_VARIANT_DT)
#else
FA_DEFINE_TRADITIONAL(f32)
FA_DEFINE_TRADITIONAL(f16)
FA_DEFINE_TRADITIONAL(bf16)
#endif
