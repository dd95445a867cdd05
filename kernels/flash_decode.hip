// Split-KV decode ("flash-decoding"): a few queries per sequence against a long KV cache.
// Pure memory traffic, so the design goal is that every K/V byte is read once, with many
// loads in flight:
//  * one block serves every query row of one KV head (all H/Hkv query heads x Sq), so K/V
//    are read once whatever the GQA group;
//  * the cache is cut into num_splits chunks, one block each, so even batch 1 fills the
//    GPU; partial results are merged by log-sum-exp (the last block of a row group on the
//    register path, flash_decode_combine on the other);
//  * K and V tiles are loaded together (16-byte vectors) before either is used;
//  * the register path can also append this step's tokens (n_new > 0): it reads them from
//    the new rows, the first block of each sequence writes them into the cache, and the
//    last block to finish its key loop advances the sequence's length, all in one launch.
// Three bodies behind one entry point per dtype x head dim: the register path (below,
// DecReg<T, HD>::OK) for head dims that split into a power-of-two number of 16-byte lane
// chunks, the shared-memory path for the others, and for 16-bit caches at head dims 64 and
// 128 on CUDA sm_80+ a tensor-core body (DecMma) that the host asks for per launch
// (p.tensor_cores; decode_plan.rs says when). Both take the grid (num_splits *
// row_groups, num_kv_heads, batch) (the host launches batches and KV heads past the y / z
// limit in slices); DEC_THREADS threads; dynamic shared memory from decode_smem_bytes() (the
// host computes the same formulas). K/V rows are read in 16-byte vectors: the host only
// sends 16-byte aligned caches here (bases, strides and head_dim in whole vectors).
// Each entry point has a twin with the per-call options (flash_decode_opt_*, OPT below):
// sliding window, logits softcap, ALiBi, attention sinks and the log-sum-exp output, each
// applied in one place (see "per-call options"); the plain entry points compile as before.
// Keys past a sequence's length are never read (zero-filled), nor are block-table entries
// past it; a negative entry (a page the pool could not give) is never read out of bounds:
// the shared-memory path zero-fills its keys, the register path reads page 0.
#include "compat.h"
#include "decode_params.h"
#include "kv_append.h"
#include "mma_ops.h"

// Timeline hook of scripts/decode_probe.cu (thread 0 of each block records phase n there);
// nothing in the library.
#ifndef DEC_MARK
#define DEC_MARK(n)
#endif

#define DEC_THREADS 256  // measured on H100: 256 threads with 2 keys per lane group per tile beat 128 with 4 by 0-16%
#define DEC_ROWS 16  // query rows per block: (H/Hkv) * Sq rows are split into groups of 16

template <typename T, int HD> struct DecodeTile {
    // Keys per tile: 16 KiB of K per tile (64 keys of bf16 x 128), between 16 and 64 keys,
    // so every thread stages 4 vectors of K and 4 of V whatever the dtype and head dim.
    static constexpr int BYTES = HD * (int)sizeof(T);
    static constexpr int N = 16384 / BYTES > 64 ? 64 : (16384 / BYTES < 16 ? 16 : 16384 / BYTES);
};

// Shared-memory layout (bytes), identical to decode_smem_bytes in src/backend/gpu/decode.rs:
//   K tile [N][HD + pad] and V tile [N][HD + pad] in the storage type (pad = 16 bytes),
//   Q rows [DEC_ROWS][HD] f32, scores [DEC_ROWS][N] f32, row stats 3 x DEC_ROWS f32.
template <typename T, int HD> FA_DEVICE constexpr int dec_row_elems() { return HD + 16 / (int)sizeof(T); }

// Key range of split `split` of a sequence of `len` keys. The host cuts every cache of
// capacity <= MAX_KERNEL_SEQ (< 2^31 - 2^23) into splits whose starts stay below it, so
// split * split_keys fits an int; the end is taken as an offset from the start so that it
// cannot wrap either (a split past the sequence gets end < begin: no keys).
// With options (OPT) the splits are laid over the keys some query's window reaches,
// [max(len - Sq - left, 0), len) (the last query's diagonal is len - 1, so no right bound
// ends the range early): keys before it are never read. The host cuts that span, at most
// left + Sq keys, so a window costs what it covers, not the cache length.
template <bool OPT>
FA_DEVICE void dec_key_range(const DecodeParams& p, int split, int len, int& begin, int& end) {
    if (OPT) {
        // len - Sq - left >= -16 - MAX_KERNEL_SEQ: no overflow (the host clamps left).
        const int base = max(len - p.seq_q - p.window_left, 0);
        const fa_i64 start = (fa_i64)base + (fa_i64)split * p.split_keys;
        begin = start < (fa_i64)len ? (int)start : len;
        end = begin + min(p.split_keys, len - begin);
        return;
    }
    begin = split * p.split_keys;
    end = begin + min(p.split_keys, len - begin);
}

// ------------------------------------------------------------------ per-call options
// The option variants (OPT) differ from the plain ones in three places only: the key range
// above, the score step (dec_opt_score: softcap, ALiBi, window and causal visibility) and
// the row's final normalization (dec_row_final: sinks and the log-sum-exp output), each
// shared by both paths and by every merge. Scores are in the log2 domain there: the softcap
// cap * tanh(s / cap) becomes C * tanh(x / C) with C = cap * log2(e) (the host sends C), and
// the ALiBi slope and the sink are scaled by log2(e).

// What the score step needs of one query row.
struct DecRowOpt {
    int lo, hi;    // keys lo <= j <= hi are kept (window, causal cut, sequence); hi < lo: none
    int diag;      // a_i = i + len - Sq, the row's aligned diagonal
    float slope2;  // ALiBi slope * log2(e), 0 without ALiBi
};

// A row that keeps no key (padding rows).
FA_DEVICE DecRowOpt dec_row_none() {
    DecRowOpt o;
    o.lo = 0;
    o.hi = -1;
    o.diag = 0;
    o.slope2 = 0.f;
    return o;
}

// Query qi of head h in a sequence of len keys. The host clamps window_left to MAX_KERNEL_SEQ
// and window_right to 16, so diag - left and diag + right stay in int.
FA_DEVICE DecRowOpt dec_row_opt(const DecodeParams& p, int h, int qi, int len) {
    DecRowOpt o;
    o.diag = qi + len - p.seq_q;
    o.lo = max(o.diag - p.window_left, 0);
    int hi = min(o.diag + p.window_right, len - 1);
    if (p.causal) hi = min(hi, o.diag);
    o.hi = hi;
    o.slope2 = p.alibi ? p.alibi[h] * FA_LOG2E : 0.f;
    return o;
}

// The score step: softcap (before any masking), the ALiBi bias by |a_i - j|, then key j's
// visibility. s is scale * q.k in the log2 domain.
FA_DEVICE float dec_opt_score(const DecodeParams& p, const DecRowOpt& o, float s, int j) {
    if (p.softcap > 0.f) s = p.softcap * tanhf(s * p.softcap_inv);
    if (p.alibi) s -= o.slope2 * fabsf((float)(o.diag - j));
    return j < o.lo || j > o.hi ? FA_NEG_INF : s;
}

// The row's final normalization, the last step of every variant: from the row's log2-domain
// max m (-inf: no key kept) and sum l of 2^(s - m), the factor that turns sum 2^(s - m) v
// into the output. With OPT the sink joins the denominator and, when `write`, the row's
// natural-log log-sum-exp is stored (-inf for a row that keeps nothing and has no sink, the
// sink alone with one). A NaN sum or sink gives NaN.
template <bool OPT>
FA_DEVICE float dec_row_final(const DecodeParams& p, int b, int h, int qi, float m, float l, bool write) {
    if (!OPT) return l > 0.f ? 1.f / l : 0.f;
    float inv, lse2;
    if (p.sinks) {
        const float s2 = p.sinks[h] * FA_LOG2E;
        const float mm = fmaxf(m, s2);
        const float wk = m == FA_NEG_INF ? 0.f : fa_exp2f(m - mm);
        const float ws = s2 == FA_NEG_INF ? 0.f : fa_exp2f(s2 - mm);
        const float den = l * wk + ws;
        inv = den == 0.f ? 0.f : wk / den;
        lse2 = den == 0.f ? FA_NEG_INF : mm + log2f(den);
        if (s2 != s2) inv = lse2 = s2;
    } else {
        inv = l == 0.f ? 0.f : 1.f / l;
        lse2 = l == 0.f ? FA_NEG_INF : m + log2f(l);
    }
    if (write && p.lse)
        p.lse[(fa_i64)b * p.lse_sb + (fa_i64)h * p.lse_sh + (fa_i64)qi * p.lse_ss] = lse2 * FA_LN2;
    return inv;
}

// Page of key j in its sequence's block-table row and its position within the page: a
// shift and a mask for power-of-two page sizes (page_shift >= 0), a division otherwise.
FA_DEVICE int dec_page_index(const DecodeParams& p, int j) {
    return p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size;
}
FA_DEVICE int dec_page_offset(const DecodeParams& p, int j) {
    return p.page_shift >= 0 ? j & (p.page_size - 1) : j % p.page_size;
}

// Page (or sequence, for a contiguous cache) and position within it of key j of sequence b;
// false for a page the block table does not hold (a negative entry).
FA_DEVICE bool dec_locate(const DecodeParams& p, int b, int j, fa_i64& page, fa_i64& within) {
    if (p.block_table) {
        page = p.block_table[(fa_i64)b * p.max_pages + dec_page_index(p, j)];
        within = dec_page_offset(p, j);
        return page >= 0;
    }
    page = b;
    within = j;
    return true;
}

// K and V tiles travel global -> registers -> shared memory in two steps, so the loads of
// tile t+1 are in flight while tile t is being used (issue), and all of a thread's loads are
// issued before any is consumed (commit): the 16-byte loads of a tile overlap instead of
// paying the memory latency one by one.
template <typename T, int HD> struct DecStager {
    static constexpr int N = DecodeTile<T, HD>::N;
    static constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte vector
    static constexpr int VPR = HD / VEC;             // vectors per key row
    static constexpr int PER = (N * VPR + DEC_THREADS - 1) / DEC_THREADS;
    fa_u32x4 k[PER];
    fa_u32x4 v[PER];

    FA_DEVICE void issue(const DecodeParams& p, int b, int kvh, int key0, int key_end, int tid) {
        const T* kbase = reinterpret_cast<const T*>(p.k);
        const T* vbase = reinterpret_cast<const T*>(p.v);
#pragma unroll
        for (int c = 0; c < PER; ++c) {
            const int idx = tid + c * DEC_THREADS;
            const int n = idx / VPR, col = (idx % VPR) * VEC;
            const int j = key0 + n;
            fa_u32x4 kv = {0u, 0u, 0u, 0u}, vv = {0u, 0u, 0u, 0u};
            fa_i64 page, within;
            if (idx < N * VPR && j < key_end && col < p.head_dim && dec_locate(p, b, j, page, within)) {
                kv = *reinterpret_cast<const fa_u32x4*>(kbase + page * p.k_sb + (fa_i64)kvh * p.k_sh + within * p.k_ss + col);
                vv = *reinterpret_cast<const fa_u32x4*>(vbase + page * p.v_sb + (fa_i64)kvh * p.v_sh + within * p.v_ss + col);
            }
            k[c] = kv;
            v[c] = vv;
        }
    }

    FA_DEVICE void commit(T* s_k, T* s_v, int tid) const {
        constexpr int ROW = dec_row_elems<T, HD>();
#pragma unroll
        for (int c = 0; c < PER; ++c) {
            const int idx = tid + c * DEC_THREADS;
            if (idx >= N * VPR) continue;
            const int n = idx / VPR, col = (idx % VPR) * VEC;
            *reinterpret_cast<fa_u32x4*>(s_k + n * ROW + col) = k[c];
            *reinterpret_cast<fa_u32x4*>(s_v + n * ROW + col) = v[c];
        }
    }
};

// Four consecutive elements from shared memory as one 16- or 8-byte access.
template <typename T> FA_DEVICE void dec_load4(const T* p, float* out) {
    fa_u32x2 u = *reinterpret_cast<const fa_u32x2*>(p);
    out[0] = fa_half_bits_to_float<T>(u.x & 0xffffu);
    out[1] = fa_half_bits_to_float<T>(u.x >> 16);
    out[2] = fa_half_bits_to_float<T>(u.y & 0xffffu);
    out[3] = fa_half_bits_to_float<T>(u.y >> 16);
}
template <> FA_DEVICE void dec_load4<float>(const float* p, float* out) {
    fa_float4 f = *reinterpret_cast<const fa_float4*>(p);
    out[0] = f.x; out[1] = f.y; out[2] = f.z; out[3] = f.w;
}

// Dot product of one 16-byte chunk of a key row with the matching query values.
template <typename T> FA_DEVICE float dec_dot16(const T* k, const float* q) {
    fa_u32x4 u = *reinterpret_cast<const fa_u32x4*>(k);
    unsigned int w[4] = {u.x, u.y, u.z, u.w};
    float a = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        a += q[2 * i] * fa_half_bits_to_float<T>(w[i] & 0xffffu);
        a += q[2 * i + 1] * fa_half_bits_to_float<T>(w[i] >> 16);
    }
    return a;
}
template <> FA_DEVICE float dec_dot16<float>(const float* k, const float* q) {
    fa_float4 f = *reinterpret_cast<const fa_float4*>(k);
    return q[0] * f.x + q[1] * f.y + q[2] * f.z + q[3] * f.w;
}

template <typename T, int HD, bool OPT>
FA_DEVICE void flash_decode_body(const DecodeParams& p) {
    constexpr int N = DecodeTile<T, HD>::N;
    constexpr int ROW = dec_row_elems<T, HD>();
    FA_DYNAMIC_SMEM(smem);
    T* s_k = reinterpret_cast<T*>(smem);
    T* s_v = s_k + N * ROW;
    float* s_q = reinterpret_cast<float*>(s_v + N * ROW);
    float* s_s = s_q + DEC_ROWS * HD;
    float* s_m = s_s + DEC_ROWS * N;
    float* s_l = s_m + DEC_ROWS;
    float* s_alpha = s_l + DEC_ROWS;

    const int group = p.num_heads / p.num_kv_heads;
    const int rows_total = group * p.seq_q;
    const int row_groups = (rows_total + DEC_ROWS - 1) / DEC_ROWS;
    const int split = (int)(blockIdx.x / (unsigned)row_groups);
    const int row0 = (int)(blockIdx.x % (unsigned)row_groups) * DEC_ROWS;
    const int rows = min(DEC_ROWS, rows_total - row0);
    const int kvh = blockIdx.y;
    const int b = blockIdx.z;
    const int len = p.seq_lens ? p.seq_lens[b] : p.seq_k;
    int key_begin, key_end;
    dec_key_range<OPT>(p, split, len, key_begin, key_end);
    const int tid = threadIdx.x;
    const float scale2 = p.scale * FA_LOG2E;

    // Query rows r = (head within group) * Sq + query index, scaled into the log2 domain.
    for (int idx = tid; idx < DEC_ROWS * HD; idx += DEC_THREADS) {
        int r = idx / HD, d = idx % HD;
        float val = 0.f;
        if (r < rows && d < p.head_dim) {
            int rr = row0 + r;
            int h = kvh * group + rr / p.seq_q, i = rr % p.seq_q;
            const T* q = reinterpret_cast<const T*>(p.q);
            val = fa_load_f32(q + (fa_i64)b * p.q_sb + (fa_i64)h * p.q_sh + (fa_i64)i * p.q_ss + d) * scale2;
        }
        s_q[idx] = val;
    }
    // Row max and sum stay in the registers of the warp that owns the row (every lane holds
    // them), so no lane ever writes a value its neighbours are still reading.
    constexpr int ROWS_PER_GRP = DEC_ROWS / (DEC_THREADS / 32);
    float m_run[ROWS_PER_GRP], l_run[ROWS_PER_GRP];
#pragma unroll
    for (int k = 0; k < ROWS_PER_GRP; ++k) {
        m_run[k] = FA_NEG_INF;
        l_run[k] = 0.f;
    }

    // Output accumulators: thread owns 4 consecutive dims of rows r0, r0 + RG, ...
    constexpr int CHUNKS = HD / 4;
    constexpr int RG = DEC_THREADS / CHUNKS;  // row groups across the block
    constexpr int RPT = (DEC_ROWS + RG - 1) / RG;
    const int dchunk = tid % CHUNKS;
    // Threads past RG * CHUNKS own nothing (head dims whose chunk count does not divide 128).
    const int rbase = tid < RG * CHUNKS ? tid / CHUNKS : DEC_ROWS;
    float acc[RPT][4];
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;

    DecStager<T, HD> stage;
    if (key_begin < key_end) stage.issue(p, b, kvh, key_begin, key_end, tid);
    const int lane = tid % 32, grp = tid / 32;  // groups of 32 threads (wave32 or wave64)
    const int causal_shift = len - p.seq_q;

    for (int key0 = key_begin; key0 < key_end; key0 += N) {
        __syncthreads();  // previous tile fully consumed
        stage.commit(s_k, s_v, tid);
        __syncthreads();
        if (key0 + N < key_end) stage.issue(p, b, kvh, key0 + N, key_end, tid);

        // Scores: thread handles key n = tid % N for rows tid / N, + DEC_THREADS / N, ...
        {
            const int n = tid % N;
            const int j = key0 + n;
            for (int r = tid / N; r < DEC_ROWS; r += DEC_THREADS / N) {
                float s = FA_NEG_INF;
                if (r < rows && j < key_end) {
                    const T* kr = s_k + n * ROW;
                    const float* qr = s_q + r * HD;
                    constexpr int VEC = 16 / (int)sizeof(T);
                    float a0 = 0.f, a1 = 0.f;
#pragma unroll
                    for (int d = 0; d < HD; d += 2 * VEC) {
                        a0 += dec_dot16<T>(kr + d, qr + d);
                        if (d + VEC < HD) a1 += dec_dot16<T>(kr + d + VEC, qr + d + VEC);
                    }
                    s = a0 + a1;
                    if (OPT) {
                        const int rr = row0 + r;
                        const DecRowOpt o = dec_row_opt(p, kvh * group + rr / p.seq_q, rr % p.seq_q, len);
                        s = dec_opt_score(p, o, s, j);
                    } else if (p.causal) {
                        int i = (row0 + r) % p.seq_q;
                        if (j > i + causal_shift) s = FA_NEG_INF;
                    }
                }
                s_s[r * N + n] = s;
            }
        }
        __syncthreads();

        // Online softmax per row: group g of 32 threads handles rows g, g + 4, ...
#pragma unroll
        for (int k = 0; k < ROWS_PER_GRP; ++k) {
            const int r = grp + k * (DEC_THREADS / 32);
            if (r >= rows) continue;
            float mx = FA_NEG_INF;
            for (int n = lane; n < N; n += 32) mx = fmaxf(mx, s_s[r * N + n]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, fa_shfl_xor(mx, o, 32));
            const float m_old = m_run[k];
            const float m_new = fmaxf(m_old, mx);
            // A row that has seen no visible key keeps m = -inf; use 0 to avoid inf - inf.
            const float m_use = m_new == FA_NEG_INF ? 0.f : m_new;
            float sum = 0.f;
            for (int n = lane; n < N; n += 32) {
                float e = fa_exp2f(s_s[r * N + n] - m_use);
                s_s[r * N + n] = e;
                sum += e;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += fa_shfl_xor(sum, o, 32);
            const float alpha = fa_exp2f(m_old - m_use);
            l_run[k] = l_run[k] * alpha + sum;
            m_run[k] = m_new;
            if (lane == 0) s_alpha[r] = alpha;
        }
        __syncthreads();

        // O = O * alpha + P V.
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int r = rbase + i * RG;
            if (r < rows) {
                const float alpha = s_alpha[r];
                float a[4] = {acc[i][0] * alpha, acc[i][1] * alpha, acc[i][2] * alpha, acc[i][3] * alpha};
                const float* pr = s_s + r * N;
                const T* vcol = s_v + dchunk * 4;
#pragma unroll 4
                for (int n = 0; n < N; ++n) {
                    const float pn = pr[n];
                    float vv[4];
                    dec_load4<T>(vcol + n * ROW, vv);
                    a[0] += pn * vv[0];
                    a[1] += pn * vv[1];
                    a[2] += pn * vv[2];
                    a[3] += pn * vv[3];
                }
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][c] = a[c];
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < ROWS_PER_GRP; ++k) {
            s_m[grp + k * (DEC_THREADS / 32)] = m_run[k];
            s_l[grp + k * (DEC_THREADS / 32)] = l_run[k];
        }
    }
    __syncthreads();

    // Write this split's normalized result (or the final output when there is one split).
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int r = rbase + i * RG;
        const int d = dchunk * 4;
        if (r >= rows || d >= p.head_dim) continue;
        const int rr = row0 + r;
        const int h = kvh * group + rr / p.seq_q, qi = rr % p.seq_q;
        const float l = s_l[r];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        if (p.num_splits == 1) {
            const float fin = OPT ? dec_row_final<OPT>(p, b, h, qi, s_m[r], l, dchunk == 0) : inv;
            T* o = reinterpret_cast<T*>(p.out) + (fa_i64)b * p.o_sb + (fa_i64)h * p.o_sh + (fa_i64)qi * p.o_ss + d;
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (d + c < p.head_dim) fa_store(o + c, acc[i][c] * fin);
        } else {
            const fa_i64 slot = (((fa_i64)b * p.num_heads + h) * p.seq_q + qi) * p.num_splits + split;
            float* po = p.partial_o + slot * p.head_dim + d;
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (d + c < p.head_dim) po[c] = acc[i][c] * inv;
            if (dchunk == 0) p.partial_lse[slot] = l > 0.f ? s_m[r] + log2f(l) : FA_NEG_INF;
        }
    }
}

// ------------------------------------------------------------------ register path
// Head dims whose row is a power-of-two number of 16-byte vectors, from 8 to 32 (64, 128
// and 256 in 16-bit types, 32, 64 and 128 in f32), never share K or V between threads:
//  * lane `lane` of a key group of VPR = HD / VEC consecutive threads owns the 16-byte column
//    chunk `lane` of every key the group loads, and keeps the same chunk of the query rows
//    in registers; a tile is PER keys per group;
//  * each thread copies its own vectors into its own slots of a ring of DEC_STAGES tiles in
//    shared memory (cp.async where available), so DEC_STAGES - 1 tiles are in flight while one
//    is used, without holding registers and without any barrier: a thread only ever reads
//    what it copied;
//  * the PER x DEC_RROWS = 8 scores of a tile are summed over the group's lanes by a
//    reduce-scatter (each xor step halves the values a lane keeps), so each lane ends with
//    one score (key c, row r) and runs the online softmax of that row for that key alone:
//    a third of the shuffles and a sixth of the exponentials of an all-reduce; the
//    probabilities and rescale factors then go back to every lane for P V;
//  * each key group accumulates P V for its column chunk in registers. The groups are
//    merged once at the end (shared memory), and the splits either by the last block of the
//    (sequence, kv head, row group) (counters != null) or by flash_decode_combine.
// Grid (num_splits * row_groups, num_kv_heads, batch), row groups of DEC_RROWS query rows.
#define DEC_RROWS 4
#ifndef DEC_STAGES
#define DEC_STAGES 3
#endif
#define DEC_REG_BLOCKS 2  // blocks per multiprocessor the register budget allows

template <typename T, int HD> struct DecReg {
    static constexpr int VEC = 16 / (int)sizeof(T);
    static constexpr int VPR = HD / VEC;
    static constexpr int PER = 2;  // keys per group per tile
    static constexpr int NV = PER * DEC_RROWS;  // scores per lane before the reduce-scatter
    static constexpr bool OK = HD % VEC == 0 && VPR >= NV && VPR <= 32 && (VPR & (VPR - 1)) == 0;
    static constexpr int GROUPS = OK ? DEC_THREADS / VPR : 1;
    static constexpr int N = PER * GROUPS;
    static constexpr int SUB = OK ? VPR / NV : 1;  // lanes holding one score afterwards
};

// 16 bytes of T as floats (8 for 16-bit types, 4 for f32).
template <typename T> FA_DEVICE void dec_unpack16(const fa_u32x4& u, float* f) {
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = fa_half_bits_to_float<T>(w[i] & 0xffffu);
        f[2 * i + 1] = fa_half_bits_to_float<T>(w[i] >> 16);
    }
}
template <> FA_DEVICE void dec_unpack16<float>(const fa_u32x4& u, float* f) {
    f[0] = fa_bits_to_float(u.x);
    f[1] = fa_bits_to_float(u.y);
    f[2] = fa_bits_to_float(u.z);
    f[3] = fa_bits_to_float(u.w);
}

// One 16-byte global -> shared copy (zero-filled when !valid), and the grouping of copies:
// asynchronous with cp.async, a plain load and store elsewhere (then commit/wait are no-ops).
FA_DEVICE void dec_copy16(void* dst, const void* src, bool valid) {
#if FA_HAS_CP_ASYNC
    fa_cp_async16(dst, src, valid);
#else
    fa_u32x4 v = {0u, 0u, 0u, 0u};
    if (valid) v = *reinterpret_cast<const fa_u32x4*>(src);
    *reinterpret_cast<fa_u32x4*>(dst) = v;
#endif
}
FA_DEVICE void dec_commit() {
#if FA_HAS_CP_ASYNC
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int PENDING> FA_DEVICE void dec_wait() {
#if FA_HAS_CP_ASYNC
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// L1-bypassing reads of the split results other blocks wrote during this launch.
FA_DEVICE float dec_load_cg(const float* p) {
#if FA_CUDA
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
#else
    return *reinterpret_cast<const volatile float*>(p);
#endif
}
FA_DEVICE fa_float4 dec_load_cg4(const float* p) {
    fa_float4 v;
#if FA_CUDA
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
#else
    const volatile float* q = p;
    v.x = q[0];
    v.y = q[1];
    v.z = q[2];
    v.w = q[3];
#endif
    return v;
}

// Ring slot of this thread's vector c (K: kv 0, V: kv 1) of stage st, in 16-byte units:
// consecutive threads use consecutive 16 bytes, so every access is conflict-free.
FA_DEVICE int dec_slot(int st, int c, int kv, int per, int tid) {
    return ((st * per + c) * 2 + kv) * DEC_THREADS + tid;
}

// Starts the copies of keys key0 + kg + c * GROUPS (c < PER), column chunk `col`, into stage st.
template <typename T, int HD>
FA_DEVICE void dec_reg_issue(const DecodeParams& p, fa_u32x4* ring, int st, int b, int kvh, int key0,
                             int key_end, int len_old, int kg, int col, bool col_ok, int tid) {
    using R = DecReg<T, HD>;
    const T* kbase = reinterpret_cast<const T*>(p.k);
    const T* vbase = reinterpret_cast<const T*>(p.v);
#pragma unroll
    for (int c = 0; c < R::PER; ++c) {
        const int j = key0 + kg + c * R::GROUPS;
        const bool valid = j < key_end && col_ok;
        const T* ks = kbase;
        const T* vs = vbase;
        if (valid && j >= len_old) {
            // A token this launch appends: read from the new rows, not the cache.
            const fa_i64 t = j - len_old;
            ks = reinterpret_cast<const T*>(p.k_new) + (fa_i64)b * p.kn_sb + t * p.kn_ss + (fa_i64)kvh * p.kn_sh + col;
            vs = reinterpret_cast<const T*>(p.v_new) + (fa_i64)b * p.vn_sb + t * p.vn_ss + (fa_i64)kvh * p.vn_sh + col;
        } else if (valid) {
            fa_i64 page, within;
            if (p.block_table) {
                // A negative entry (a page the pool could not give) reads page 0: in bounds.
                page = max(p.block_table[(fa_i64)b * p.max_pages + j / p.page_size], 0);
                within = j % p.page_size;
            } else {
                page = b;
                within = j;
            }
            ks = kbase + page * p.k_sb + (fa_i64)kvh * p.k_sh + within * p.k_ss + col;
            vs = vbase + page * p.v_sb + (fa_i64)kvh * p.v_sh + within * p.v_ss + col;
        }
        dec_copy16(ring + dec_slot(st, c, 0, R::PER, tid), ks, valid);
        dec_copy16(ring + dec_slot(st, c, 1, R::PER, tid), vs, valid);
    }
}

// The fused append of sequence b (kv_append.h), with this launch's arguments.
template <typename T> struct DecBits { typedef unsigned short type; };
template <> struct DecBits<float> { typedef unsigned int type; };
template <typename T>
FA_DEVICE void dec_append(const DecodeParams& p, int b, int len_old, fa_i64* s_page) {
    AppendParams a;
    a.k_new = p.k_new;
    a.v_new = p.v_new;
    a.k_cache = const_cast<void*>(p.k);
    a.v_cache = const_cast<void*>(p.v);
    a.seq_lens = const_cast<int*>(p.seq_lens);
    a.block_table = const_cast<int*>(p.block_table);
    a.pool_next = p.pool_next;
    a.counts = nullptr;
    a.kn_sb = p.kn_sb;
    a.kn_ss = p.kn_ss;
    a.kn_sh = p.kn_sh;
    a.vn_sb = p.vn_sb;
    a.vn_ss = p.vn_ss;
    a.vn_sh = p.vn_sh;
    a.c_sb = p.k_sb;  // a KvCache's K and V share their strides
    a.c_sh = p.k_sh;
    a.c_ss = p.k_ss;
    a.batch = p.batch;
    a.n = p.n_new;
    a.num_kv_heads = p.num_kv_heads;
    a.head_dim = p.head_dim;
    a.max_pages = p.max_pages;
    a.page_size = p.page_size;
    a.num_pages = p.num_pages;
    kv_append_sequence<typename DecBits<T>::type>(a, b, len_old, false, s_page);
}

// Group rows in shared memory are stored in 16-byte chunks, chunk h * VPR + lane holding
// dims lane * VEC + 4h .. + 3 (h < VEC / 4), so that the lanes of a group write consecutive
// chunks (no bank conflicts) and the merge reads them back in order.
template <int VPR, int VEC> FA_DEVICE int dec_chunk_dim(int c4) { return (c4 % VPR) * VEC + (c4 / VPR) * 4; }

// Splits merged per thread of the last block, loaded together before any is used.
#define DEC_MERGE_BATCH 8

// Folds (m2, l2, a2) into the running (m, l, a): max, sum and weighted dims, log2 domain.
FA_DEVICE void dec_fold(float& m, float& l, fa_float4& a, float m2, float l2, fa_float4 a2) {
    const float mn = fmaxf(m, m2);
    if (mn == FA_NEG_INF) return;
    const float w1 = fa_exp2f(m - mn), w2 = fa_exp2f(m2 - mn);
    l = l * w1 + l2 * w2;
    a.x = a.x * w1 + a2.x * w2;
    a.y = a.y * w1 + a2.y * w2;
    a.z = a.z * w1 + a2.z * w2;
    a.w = a.w * w1 + a2.w * w2;
    m = mn;
}

// Folds the running (m, l, a) of `parts` adjacent lanes (a power of two up to 32) into each.
FA_DEVICE void dec_fold_lanes(float& m, float& l, fa_float4& a, int parts) {
    for (int o = 1; o < parts; o <<= 1) {
        const float m2 = fa_shfl_xor(m, o, 32), l2 = fa_shfl_xor(l, o, 32);
        const fa_float4 a2 = {fa_shfl_xor(a.x, o, 32), fa_shfl_xor(a.y, o, 32), fa_shfl_xor(a.z, o, 32),
                              fa_shfl_xor(a.w, o, 32)};
        dec_fold(m, l, a, m2, l2, a2);
    }
}

// After the key loop of a block: s_acc [G][RB][HD] holds each key group's unnormalized
// output rows, s_m and s_l [G][RB] their running max and sum (log2 domain), visible to the
// whole block. Merges the groups and writes the output (one split) or this split's partial
// result; the last split of a (sequence, kv head, row group) to finish then merges all
// splits (counters != null), else flash_decode_combine does.
// Both merges give each (row, 4 dims) PARTS adjacent threads, so every thread of the block
// works and the parts meet through shuffles, not shared memory and barriers: at B=1 these
// merges run on one block per multiprocessor, bound by the latency of one thread's chain.
template <typename T, int HD, int VPR, int G, int RB, bool OPT>
FA_DEVICE void dec_finish(const DecodeParams& p, const float* s_acc, const float* s_m, const float* s_l,
                          int rows, int row0, int kvh, int b, int split, int rg, int row_groups,
                          int tid) {
    // Items (row, 4 dims); with fewer items than threads each gets PARTS adjacent threads,
    // with more each thread takes every (DEC_THREADS / PARTS)-th: either way every thread
    // runs the same, compile-time number of iterations (one on the register path), so the
    // shuffles below see whole warps.
    constexpr int ITEMS = RB * (HD / 4);
    constexpr int PARTS = ITEMS >= DEC_THREADS ? 1 : DEC_THREADS / ITEMS;
    constexpr int STRIDE = DEC_THREADS / PARTS;
    static_assert(ITEMS % STRIDE == 0 && PARTS <= 32 && (PARTS & (PARTS - 1)) == 0 && G % PARTS == 0,
                  "the merges give each (row, 4 dims) a power-of-two number of adjacent threads");
    const int group = p.num_heads / p.num_kv_heads;
    const int part = tid % PARTS;
#pragma unroll
    for (int it = 0; it < ITEMS / STRIDE; ++it) {
        const int idx = tid / PARTS + it * STRIDE;
        const int r = idx / (HD / 4);
        const int rr = row0 + r;
        const int h = kvh * group + rr / p.seq_q, qi = rr % p.seq_q;
        // Key groups part, part + PARTS, ... weighed by 2^(m_g - row max). Padding rows and
        // dims hold zeros (m = -inf), so every thread computes and only the stores are guarded.
        // Chunk c4 of a group row holds dims dec_chunk_dim(c4).
        const int c4 = idx % (HD / 4);
        const int d = dec_chunk_dim<VPR, HD / VPR>(c4);
        float mx = FA_NEG_INF;
#pragma unroll
        for (int k = 0; k < G / PARTS; ++k) mx = fmaxf(mx, s_m[(k * PARTS + part) * RB + r]);
        for (int o = 1; o < PARTS; o <<= 1) mx = fmaxf(mx, fa_shfl_xor(mx, o, 32));
        float den = 0.f;
        fa_float4 num = {0.f, 0.f, 0.f, 0.f};
        if (mx != FA_NEG_INF) {
#pragma unroll
            for (int k = 0; k < G / PARTS; ++k) {
                const int g = k * PARTS + part;
                const float w = fa_exp2f(s_m[g * RB + r] - mx);
                const fa_float4 a = *reinterpret_cast<const fa_float4*>(s_acc + (g * RB + r) * HD + c4 * 4);
                den += w * s_l[g * RB + r];
                num.x += w * a.x;
                num.y += w * a.y;
                num.z += w * a.z;
                num.w += w * a.w;
            }
        }
        for (int o = 1; o < PARTS; o <<= 1) {
            den += fa_shfl_xor(den, o, 32);
            num.x += fa_shfl_xor(num.x, o, 32);
            num.y += fa_shfl_xor(num.y, o, 32);
            num.z += fa_shfl_xor(num.z, o, 32);
            num.w += fa_shfl_xor(num.w, o, 32);
        }
        const float inv = den > 0.f ? 1.f / den : 0.f;
        if (part == 0 && r < rows && d < p.head_dim) {
            if (p.num_splits == 1) {
                const float fin = OPT ? dec_row_final<OPT>(p, b, h, qi, mx, den, d == 0) : inv;
                T* o = reinterpret_cast<T*>(p.out) + (fa_i64)b * p.o_sb + (fa_i64)h * p.o_sh + (fa_i64)qi * p.o_ss + d;
                fa_store(o, num.x * fin);
                fa_store(o + 1, num.y * fin);
                fa_store(o + 2, num.z * fin);
                fa_store(o + 3, num.w * fin);
            } else {
                const fa_i64 slot = (((fa_i64)b * p.num_heads + h) * p.seq_q + qi) * p.num_splits + split;
                *reinterpret_cast<fa_float4*>(p.partial_o + slot * p.head_dim + d) =
                    fa_float4{num.x * inv, num.y * inv, num.z * inv, num.w * inv};
                if (d == 0) p.partial_lse[slot] = den > 0.f ? mx + log2f(den) : FA_NEG_INF;
            }
        }
    }
    DEC_MARK(3);
    if (p.num_splits == 1 || !p.counters) return;

    // The last split of this (sequence, kv head, row group) to finish merges all of them.
    // The barrier orders the block's partial writes before thread 0's acquire-release
    // atomic, which also orders the last block's reads after every other block's release.
    const fa_i64 counter = ((fa_i64)b * p.num_kv_heads + kvh) * row_groups + rg;
    __syncthreads();
    bool last = false;
    if (tid == 0) last = fa_atomic_add_acq_rel_device(p.counters + counter, 1) == p.num_splits - 1;
    DEC_MARK(4);
    if (!__syncthreads_or(last)) return;
    // Splits part, part + PARTS, ... of the row's 4 dims (natural order in the partial rows):
    // each batch's partial rows and log-sum-exps are loaded together (one round trip to L2),
    // then folded into a running max, sum and weighted sum; then the parts are folded.
    const int S = p.num_splits;
#pragma unroll
    for (int it = 0; it < ITEMS / STRIDE; ++it) {
        const int idx = tid / PARTS + it * STRIDE;
        const int r = idx / (HD / 4);
        const int rr = row0 + r;
        const int h = kvh * group + rr / p.seq_q, qi = rr % p.seq_q;
        const int d = (idx % (HD / 4)) * 4;
        const bool active = r < rows && d < p.head_dim;
        float mx = FA_NEG_INF, den = 0.f;
        fa_float4 a = {0.f, 0.f, 0.f, 0.f};
        if (active) {
            const fa_i64 base = (((fa_i64)b * p.num_heads + h) * p.seq_q + qi) * S;
            const float* lse = p.partial_lse + base;
            const float* po = p.partial_o + base * p.head_dim + d;
            for (int s0 = part; s0 < S; s0 += PARTS * DEC_MERGE_BATCH) {
                float x[DEC_MERGE_BATCH];
                fa_float4 v[DEC_MERGE_BATCH];
#pragma unroll
                for (int u = 0; u < DEC_MERGE_BATCH; ++u) {
                    const int sp = s0 + u * PARTS;
                    x[u] = sp < S ? dec_load_cg(lse + sp) : FA_NEG_INF;
                    v[u] = sp < S ? dec_load_cg4(po + (fa_i64)sp * p.head_dim) : fa_float4{0.f, 0.f, 0.f, 0.f};
                }
                float bm = mx;
#pragma unroll
                for (int u = 0; u < DEC_MERGE_BATCH; ++u) bm = fmaxf(bm, x[u]);
                if (bm == FA_NEG_INF) continue;
                const float rescale = fa_exp2f(mx - bm);
                den *= rescale;
                a.x *= rescale;
                a.y *= rescale;
                a.z *= rescale;
                a.w *= rescale;
#pragma unroll
                for (int u = 0; u < DEC_MERGE_BATCH; ++u) {
                    const float wu = fa_exp2f(x[u] - bm);
                    den += wu;
                    a.x += wu * v[u].x;
                    a.y += wu * v[u].y;
                    a.z += wu * v[u].z;
                    a.w += wu * v[u].w;
                }
                mx = bm;
            }
        }
        dec_fold_lanes(mx, den, a, PARTS);
        DEC_MARK(5);
        if (part == 0 && active) {
            const float inv = dec_row_final<OPT>(p, b, h, qi, mx, den, d == 0);
            T* o = reinterpret_cast<T*>(p.out) + (fa_i64)b * p.o_sb + (fa_i64)h * p.o_sh + (fa_i64)qi * p.o_ss + d;
            fa_store(o, a.x * inv);
            fa_store(o + 1, a.y * inv);
            fa_store(o + 2, a.z * inv);
            fa_store(o + 3, a.w * inv);
        }
    }
    if (tid == 0) p.counters[counter] = 0;
    DEC_MARK(6);
}

// Shared memory of the register path (decode_smem_bytes on the host): the ring,
// DEC_STAGES x PER x 2 x DEC_THREADS x 16 bytes. After the key loop the same bytes hold the
// group accumulators [GROUPS][DEC_RROWS][HD] f32 and the group max and sum
// [GROUPS][DEC_RROWS] f32; then the split merge's per-part results.
template <typename T, int HD, bool OPT>
FA_DEVICE void flash_decode_reg_body(const DecodeParams& p) {
    using R = DecReg<T, HD>;
    constexpr int VEC = R::VEC, VPR = R::VPR, G = R::GROUPS, PER = R::PER, N = R::N, SUB = R::SUB;
    constexpr int RB = DEC_RROWS;
    static_assert(R::NV == 8, "the reduce-scatter below takes 8 scores to 1 in three steps");
    FA_DYNAMIC_SMEM(smem);
    fa_u32x4* ring = reinterpret_cast<fa_u32x4*>(smem);
    float* s_acc = reinterpret_cast<float*>(smem);
    float* s_m = s_acc + G * RB * HD;
    float* s_l = s_m + G * RB;

    const int group = p.num_heads / p.num_kv_heads;
    const int rows_total = group * p.seq_q;
    const int row_groups = (rows_total + RB - 1) / RB;
    const int split = blockIdx.x / row_groups;
    const int rg = blockIdx.x % row_groups;
    const int row0 = rg * RB;
    const int rows = min(RB, rows_total - row0);
    const int kvh = blockIdx.y;
    const int b = blockIdx.z;
    DEC_MARK(0);
    // With a fused append the sequence is len_old cached tokens plus n_new new ones.
    const int len_old = p.seq_lens ? p.seq_lens[b] : p.seq_k;
    const int len = len_old + p.n_new;
    int key_begin, key_end;
    dec_key_range<OPT>(p, split, len, key_begin, key_end);
    const int tid = threadIdx.x;
    const int lane = tid % VPR;
    const int kg = tid / VPR;
    const int col = lane * VEC;
    const bool col_ok = col < p.head_dim;
    const float scale2 = p.scale * FA_LOG2E;
    const int causal_shift = len - p.seq_q;
    // The score this lane keeps after the reduce-scatter: key c, row r of the tile.
    const int mine = lane / SUB;
    const int my_c = mine / RB, my_r = mine % RB;

    // This lane's chunk of each query row, one 16-byte load where aligned, loaded before the
    // first tiles' copies go out: behind them it would wait for the block's whole ring, and the
    // first tile's scores with it (measured: the query arrived 1.1 - 1.8 us after the copies
    // were issued at B=1, L=4096).
    fa_u32x4 q_raw[RB];
    bool q_vec[RB];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        const int rr = row0 + r;
        const int h = kvh * group + rr / p.seq_q, i = rr % p.seq_q;
        const T* qp = reinterpret_cast<const T*>(p.q) + (fa_i64)b * p.q_sb + (fa_i64)h * p.q_sh + (fa_i64)i * p.q_ss + col;
        q_vec[r] = r < rows && col_ok && ((unsigned long long)qp & 15u) == 0;
        q_raw[r] = q_vec[r] ? *reinterpret_cast<const fa_u32x4*>(qp) : fa_u32x4{0u, 0u, 0u, 0u};
    }
    // Then the first tiles' copies.
#pragma unroll
    for (int st = 0; st < DEC_STAGES - 1; ++st) {
        const int k0 = key_begin + st * N;
        if (k0 < key_end) dec_reg_issue<T, HD>(p, ring, st, b, kvh, k0, key_end, len_old, kg, col, col_ok, tid);
        dec_commit();
    }
    DEC_MARK(8);
    // Fused append: the first block of each sequence writes its new tokens into the cache
    // (positions no block of this launch reads there: the new rows are read directly).
    // Its page scratch is the ring's last stage, not yet in use.
    if (p.n_new > 0 && blockIdx.x == 0 && blockIdx.y == 0)
        dec_append<T>(p, b, len_old, reinterpret_cast<fa_i64*>(ring + dec_slot(DEC_STAGES - 1, 0, 0, PER, 0)));

    // The query chunk in the log2 domain (unaligned rows element by element).
    float q[RB][VEC];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        if (q_vec[r]) {
            dec_unpack16<T>(q_raw[r], q[r]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[r][e] *= scale2;
        } else {
            const int rr = row0 + r;
            const int h = kvh * group + rr / p.seq_q, i = rr % p.seq_q;
            const T* qp = reinterpret_cast<const T*>(p.q) + (fa_i64)b * p.q_sb + (fa_i64)h * p.q_sh + (fa_i64)i * p.q_ss + col;
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[r][e] = r < rows && col_ok ? fa_load_f32(qp + e) * scale2 : 0.f;
        }
    }
    // The last key this lane's row sees (-1: a padding row).
    int my_last = -1;
    if (my_r < rows) {
        const int qi = (row0 + my_r) % p.seq_q;
        my_last = p.causal ? qi + causal_shift : 0x7fffffff;
    }
    DecRowOpt my_opt = dec_row_none();
    if (OPT && my_r < rows) {
        const int rr = row0 + my_r;
        my_opt = dec_row_opt(p, kvh * group + rr / p.seq_q, rr % p.seq_q, len);
    }

    // Online softmax state of this lane's row (over its key c of each tile), and P V.
    float m = FA_NEG_INF, l = 0.f, acc[RB][VEC];
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] = 0.f;

    int st = 0;
    for (int key0 = key_begin; key0 < key_end; key0 += N) {
        // Refill the slot this thread emptied last iteration, then wait for the current tile.
        const int k_ahead = key0 + (DEC_STAGES - 1) * N;
        const int st_ahead = st == 0 ? DEC_STAGES - 1 : st - 1;
        if (k_ahead < key_end) dec_reg_issue<T, HD>(p, ring, st_ahead, b, kvh, k_ahead, key_end, len_old, kg, col, col_ok, tid);
        dec_commit();
        dec_wait<DEC_STAGES - 1>();
        if (key0 == key_begin) DEC_MARK(1);

        // Partial dots of this lane's chunk: s[c * RB + r].
        float s[PER * RB];
#pragma unroll
        for (int c = 0; c < PER; ++c) {
            float kf[VEC];
            dec_unpack16<T>(ring[dec_slot(st, c, 0, PER, tid)], kf);
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                float a = 0.f;
#pragma unroll
                for (int e = 0; e < VEC; ++e) a += q[r][e] * kf[e];
                s[c * RB + r] = a;
            }
        }
        // Reduce-scatter over the group: at step k the lanes with bit VPR >> (k + 1) set keep
        // the upper half of their values and add their partner's copy of it.
#pragma unroll
        for (int k = 0; k < 3; ++k) {
            const int o = VPR >> (k + 1);
            const int half = 4 >> k;
            const bool hi = (lane & o) != 0;
#pragma unroll
            for (int i = 0; i < half; ++i) {
                const float send = hi ? s[i] : s[half + i];
                const float keep = hi ? s[half + i] : s[i];
                s[i] = keep + fa_shfl_xor(send, o, VPR);
            }
        }
#pragma unroll
        for (int o = SUB / 2; o > 0; o >>= 1) s[0] += fa_shfl_xor(s[0], o, VPR);

        // This lane's key c of row r: mask, max with the row's other key (lane ^ VPR / 2),
        // rescale and probability.
        const int j = key0 + kg + my_c * G;
        const float sc = OPT ? (j >= key_end ? FA_NEG_INF : dec_opt_score(p, my_opt, s[0], j))
                             : (j >= key_end || j > my_last ? FA_NEG_INF : s[0]);
        const float mt = fmaxf(sc, fa_shfl_xor(sc, VPR / 2, VPR));
        const float m_new = fmaxf(m, mt);
        // A row that has seen no visible key keeps m = -inf; use 0 to avoid inf - inf.
        const float m_use = m_new == FA_NEG_INF ? 0.f : m_new;
        const float alpha = fa_exp2f(m - m_use);
        const float pr = fa_exp2f(sc - m_use);
        l = l * alpha + pr;
        m = m_new;

        // Every lane rescales and accumulates all rows: the factors come from the lanes
        // holding them.
        float al[RB];
#pragma unroll
        for (int r = 0; r < RB; ++r) al[r] = fa_shfl(alpha, r * SUB, VPR);
#pragma unroll
        for (int r = 0; r < RB; ++r)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[r][e] *= al[r];
#pragma unroll
        for (int c = 0; c < PER; ++c) {
            float vf[VEC];
            dec_unpack16<T>(ring[dec_slot(st, c, 1, PER, tid)], vf);
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                const float pc = fa_shfl(pr, (c * RB + r) * SUB, VPR);
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[r][e] += pc * vf[e];
            }
        }
        st = st == DEC_STAGES - 1 ? 0 : st + 1;
    }
    dec_wait<0>();
    DEC_MARK(2);
    // The row's sum over both keys of each tile (the two lanes share m).
    l += fa_shfl_xor(l, VPR / 2, VPR);
    __syncthreads();  // the ring's bytes are reused below
    // Fused append: the last block of the sequence to get here (every thread of every block
    // read seq_lens[b] before its barrier above) advances the length.
    if (p.n_new > 0 && tid == 0) {
        fa_fence_acq_rel_device();
        if (atomicAdd(p.arrivals + b, 1) == (int)(gridDim.x * gridDim.y) - 1) {
            const_cast<int*>(p.seq_lens)[b] = len;
            p.arrivals[b] = 0;
        }
    }

    // Merge the key groups: group g's rows scale by 2^(m_g - max m).
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int hh = 0; hh < VEC / 4; ++hh)
            *reinterpret_cast<fa_float4*>(s_acc + (kg * RB + r) * HD + (hh * VPR + lane) * 4) =
                fa_float4{acc[r][4 * hh], acc[r][4 * hh + 1], acc[r][4 * hh + 2], acc[r][4 * hh + 3]};
    if (my_c == 0 && lane % SUB == 0) {
        s_m[kg * RB + my_r] = m;
        s_l[kg * RB + my_r] = l;
    }
    __syncthreads();
    DEC_MARK(7);
    dec_finish<T, HD, VPR, G, RB, OPT>(p, s_acc, s_m, s_l, rows, row0, kvh, b, split, rg, row_groups, tid);
}

// ------------------------------------------------------------------ tensor-core path
// 16-bit caches with head dims 64 and 128 on CUDA sm_80+ when the host asks for it
// (p.tensor_cores; see decode_plan.rs): the query rows of a KV head, up to 16 (the GQA group
// times the queries), are the M dimension of mma.sync m16n8k16, so the math per K/V byte is a
// few instructions whatever the group, and a draft of several queries reads K/V once too.
//  * Each of the 8 warps owns 16 consecutive keys of every 128-key tile: it copies them
//    (cp.async) into its own slots of a DEC_MSTAGES-stage ring and reads them back with ldmatrix, so
//    the key loop has no block barrier, only warp ones.
//  * S = Q K^T (16 rows x 16 keys, Q from shared memory), the online softmax on the
//    accumulator fragments (rows g and g + 8 of each lane, reduced over its quad), then
//    O += P V with P packed into A fragments straight from S; O is rescaled only when some
//    row's max moved.
//  * The warps' rows are merged, and the splits, as on the register path (dec_finish).
#define DEC_MWARPS (DEC_THREADS / 32)
#define DEC_MKEYS 16  // keys per warp per tile
#ifndef DEC_MSTAGES
#define DEC_MSTAGES 2
#endif
#ifndef DEC_NO_TENSOR_CORES  // 1: the register path alone (A/B runs of scripts/decode_probe.cu)
#define DEC_NO_TENSOR_CORES 0
#endif

template <typename T, int HD> struct DecMma {
    static constexpr bool OK = FA_HAS_MMA && !DEC_NO_TENSOR_CORES && sizeof(T) == 2 && (HD == 64 || HD == 128);
    static constexpr int ROW = HD + 8;  // shared row in elements: a 16-byte pad keeps ldmatrix conflict-free
    static constexpr int N = DEC_MWARPS * DEC_MKEYS;  // keys per block tile
    static constexpr int WARP_ELEMS = 2 * DEC_MKEYS * ROW;  // one warp's K then V rows of one stage
    static constexpr int CPR = HD / 8;  // 16-byte chunks per row
    static constexpr int CPL = DEC_MKEYS * CPR / 32;  // chunks of K (and of V) per lane per tile
};

#if FA_HAS_MMA
// Copies keys key0 .. key0 + 15 (this warp's of one tile) into the warp's stage slots `ks`
// (K rows, then V rows), zero-filled past key_end; keys past the cached ones come from this
// launch's new rows (fused append). A negative block-table entry reads page 0 (in bounds).
template <typename T, int HD>
FA_DEVICE void dec_mma_issue(const DecodeParams& p, T* ks, int b, int kvh, int key0, int key_end, int len_old,
                             int lane) {
    using M = DecMma<T, HD>;
    T* vs = ks + DEC_MKEYS * M::ROW;
    const T* kbase = reinterpret_cast<const T*>(p.k);
    const T* vbase = reinterpret_cast<const T*>(p.v);
    // With pages of a multiple of 16 keys and an aligned start the 16 keys share one page.
    const bool one_page = p.block_table && (p.page_size & 15) == 0 && (key0 & 15) == 0;
    fa_i64 page0 = 0;
    if (one_page && key0 < len_old) page0 = max(p.block_table[(fa_i64)b * p.max_pages + dec_page_index(p, key0)], 0);
#pragma unroll 2
    for (int i = 0; i < M::CPL; ++i) {
        const int c = lane + 32 * i;
        const int kk = c / M::CPR, col = (c % M::CPR) * 8;
        const int j = key0 + kk;
        const bool valid = j < key_end && col < p.head_dim;
        const T* ksrc = kbase;
        const T* vsrc = vbase;
        if (valid && j >= len_old) {
            const fa_i64 t = j - len_old;
            ksrc = reinterpret_cast<const T*>(p.k_new) + (fa_i64)b * p.kn_sb + t * p.kn_ss + (fa_i64)kvh * p.kn_sh + col;
            vsrc = reinterpret_cast<const T*>(p.v_new) + (fa_i64)b * p.vn_sb + t * p.vn_ss + (fa_i64)kvh * p.vn_sh + col;
        } else if (valid) {
            fa_i64 page, within;
            if (p.block_table) {
                page = one_page ? page0 : max(p.block_table[(fa_i64)b * p.max_pages + dec_page_index(p, j)], 0);
                within = dec_page_offset(p, j);
            } else {
                page = b;
                within = j;
            }
            ksrc = kbase + page * p.k_sb + (fa_i64)kvh * p.k_sh + within * p.k_ss + col;
            vsrc = vbase + page * p.v_sb + (fa_i64)kvh * p.v_sh + within * p.v_ss + col;
        }
        dec_copy16(ks + kk * M::ROW + col, ksrc, valid);
        dec_copy16(vs + kk * M::ROW + col, vsrc, valid);
    }
}

// Shared memory (decode_smem_bytes on the host): Q [16][ROW] in T, then the ring,
// DEC_MSTAGES x DEC_MWARPS x WARP_ELEMS in T. After the key loop the ring's bytes hold the
// warps' rows [DEC_MWARPS][16][HD] f32 and their max and sum [DEC_MWARPS][16] f32.
template <typename T, int HD, bool OPT>
FA_DEVICE void flash_decode_mma_body(const DecodeParams& p) {
    using M = DecMma<T, HD>;
    using Mma = FaMma<T>;
    constexpr int ROW = M::ROW, N = M::N, KS = HD / 16, NT = HD / 8;
    constexpr int RB = 16;
    FA_DYNAMIC_SMEM(smem);
    T* s_q = reinterpret_cast<T*>(smem);
    T* ring = s_q + RB * ROW;
    float* s_acc = reinterpret_cast<float*>(smem);
    float* s_m = s_acc + DEC_MWARPS * RB * HD;
    float* s_l = s_m + DEC_MWARPS * RB;

    const int group = p.num_heads / p.num_kv_heads;
    const int rows_total = group * p.seq_q;
    const int row_groups = (rows_total + RB - 1) / RB;
    const int split = blockIdx.x / row_groups;
    const int rg = blockIdx.x % row_groups;
    const int row0 = rg * RB;
    const int rows = min(RB, rows_total - row0);
    const int kvh = blockIdx.y;
    const int b = blockIdx.z;
    DEC_MARK(0);
    const int len_old = p.seq_lens ? p.seq_lens[b] : p.seq_k;
    const int len = len_old + p.n_new;
    int key_begin, key_end;
    dec_key_range<OPT>(p, split, len, key_begin, key_end);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const float scale2 = p.scale * FA_LOG2E;
    const int tiles = key_end > key_begin ? (key_end - key_begin + N - 1) / N : 0;
    T* my_ring = ring + warp * M::WARP_ELEMS;
    constexpr int STAGE = DEC_MWARPS * M::WARP_ELEMS;

    // The first tiles' copies go out before anything else.
#pragma unroll
    for (int st = 0; st < DEC_MSTAGES - 1; ++st) {
        if (st < tiles)
            dec_mma_issue<T, HD>(p, my_ring + st * STAGE, b, kvh, key_begin + st * N + warp * DEC_MKEYS, key_end,
                                 len_old, lane);
        dec_commit();
    }
    // Query rows r = (head within group) * Sq + query index; padding rows and dims are zero.
    for (int idx = tid; idx < RB * HD; idx += DEC_THREADS) {
        const int r = idx / HD, d = idx % HD;
        float val = 0.f;
        if (r < rows && d < p.head_dim) {
            const int rr = row0 + r;
            const int h = kvh * group + rr / p.seq_q, i = rr % p.seq_q;
            val = fa_load_f32(reinterpret_cast<const T*>(p.q) + (fa_i64)b * p.q_sb + (fa_i64)h * p.q_sh + (fa_i64)i * p.q_ss + d);
        }
        fa_store(s_q + r * ROW + d, val);
    }
    // Fused append: the first block of each sequence writes its new tokens into the cache;
    // its page scratch is warp 0's slot of the last stage, not in use yet.
    if (p.n_new > 0 && blockIdx.x == 0 && blockIdx.y == 0)
        dec_append<T>(p, b, len_old, reinterpret_cast<fa_i64*>(ring + (DEC_MSTAGES - 1) * STAGE));
    __syncthreads();  // s_q written (and the append's scratch released)

    // Rows g and g + 8 of this lane: what each keeps.
    int last[2];
    DecRowOpt opt[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        const int r = g + 8 * u;
        last[u] = -1;
        opt[u] = dec_row_none();
        if (r < rows) {
            const int rr = row0 + r;
            last[u] = p.causal ? rr % p.seq_q + len - p.seq_q : 0x7fffffff;
            if (OPT) opt[u] = dec_row_opt(p, kvh * group + rr / p.seq_q, rr % p.seq_q, len);
        }
    }
    // ldmatrix row addresses of this lane: Q and K in 16 x 16 blocks (matrix l / 8 of an x4
    // load: rows (l / 8 & 1) * 8 + l % 8 for Q, (l / 16) * 8 + l % 8 for K), V transposed.
    const int mat = lane / 8, mrow = lane % 8;
    const unsigned int q_addr = fa_smem_u32(s_q + ((mat & 1) * 8 + mrow) * ROW + (mat >> 1) * 8);
    const int k_off = ((mat >> 1) * 8 + mrow) * ROW + (mat & 1) * 8;
    const int v_off = DEC_MKEYS * ROW + ((mat & 1) * 8 + mrow) * ROW + (mat >> 1) * 8;

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {FA_NEG_INF, FA_NEG_INF}, l[2] = {0.f, 0.f};

    for (int t = 0; t < tiles; ++t) {
        const int st = t % DEC_MSTAGES;
        const int ahead = t + DEC_MSTAGES - 1;
        if (ahead < tiles)
            dec_mma_issue<T, HD>(p, my_ring + (ahead % DEC_MSTAGES) * STAGE, b, kvh,
                                 key_begin + ahead * N + warp * DEC_MKEYS, key_end, len_old, lane);
        dec_commit();
        dec_wait<DEC_MSTAGES - 1>();
        __syncwarp();  // the warp's copies of this stage are visible to all its lanes
        const T* tile = my_ring + st * STAGE;
        const unsigned int k_addr = fa_smem_u32(tile + k_off);
        const unsigned int v_addr = fa_smem_u32(tile + v_off);
        const int key0 = key_begin + t * N + warp * DEC_MKEYS;

        // S = Q K^T: keys 0-7 (s[0]) and 8-15 (s[1]) of the warp's 16.
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            unsigned int qa[4], kb[4];
            fa_ldsm_x4(q_addr + k * 32, qa);
            fa_ldsm_x4(k_addr + k * 32, kb);
            Mma::mma(s[0], qa, kb[0], kb[1]);
            Mma::mma(s[1], qa, kb[2], kb[3]);
        }
        // Lane holds s[n][e]: row g + 8 * (e / 2), key key0 + 8n + 2 t4 + e % 2.
        bool moved = false;
        float alpha[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            float mx = FA_NEG_INF;
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = key0 + 8 * n + 2 * t4 + e;
                    float x = s[n][2 * u + e] * scale2;
                    if (OPT)
                        x = j >= key_end ? FA_NEG_INF : dec_opt_score(p, opt[u], x, j);
                    else
                        x = j >= key_end || j > last[u] ? FA_NEG_INF : x;
                    s[n][2 * u + e] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, fa_shfl_xor(mx, 1, 32));
            mx = fmaxf(mx, fa_shfl_xor(mx, 2, 32));
            const float m_new = fmaxf(m[u], mx);
            // A row that has seen no visible key keeps m = -inf; use 0 to avoid inf - inf.
            const float m_use = m_new == FA_NEG_INF ? 0.f : m_new;
            alpha[u] = fa_exp2f(m[u] - m_use);
            moved |= m_new != m[u];
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pe = fa_exp2f(s[n][2 * u + e] - m_use);
                    s[n][2 * u + e] = pe;
                    sum += pe;
                }
            l[u] = l[u] * alpha[u] + sum;
            m[u] = m_new;
        }
        if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[0];
                o[n][2] *= alpha[1];
                o[n][3] *= alpha[1];
            }
        }
        // P as the A fragment of one k-step of 16 keys.
        const unsigned int pa[4] = {Mma::pack(s[0][0], s[0][1]), Mma::pack(s[0][2], s[0][3]),
                                    Mma::pack(s[1][0], s[1][1]), Mma::pack(s[1][2], s[1][3])};
#pragma unroll
        for (int n = 0; n < NT / 2; ++n) {
            unsigned int vb[4];
            fa_ldsm_x4_trans(v_addr + n * 32, vb);
            Mma::mma(o[2 * n], pa, vb[0], vb[1]);
            Mma::mma(o[2 * n + 1], pa, vb[2], vb[3]);
        }
        __syncwarp();  // every lane is done with this stage before it is refilled
    }
    dec_wait<0>();
    DEC_MARK(2);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        l[u] += fa_shfl_xor(l[u], 1, 32);
        l[u] += fa_shfl_xor(l[u], 2, 32);
    }
    __syncthreads();  // the ring's bytes are reused below
    // Fused append: the last block of the sequence to get here advances the length.
    if (p.n_new > 0 && tid == 0) {
        fa_fence_acq_rel_device();
        if (atomicAdd(p.arrivals + b, 1) == (int)(gridDim.x * gridDim.y) - 1) {
            const_cast<int*>(p.seq_lens)[b] = len;
            p.arrivals[b] = 0;
        }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int d = n * 8 + 2 * t4;
        *reinterpret_cast<fa_float2*>(s_acc + (warp * RB + g) * HD + d) = fa_float2{o[n][0], o[n][1]};
        *reinterpret_cast<fa_float2*>(s_acc + (warp * RB + g + 8) * HD + d) = fa_float2{o[n][2], o[n][3]};
    }
    if (t4 == 0) {
        s_m[warp * RB + g] = m[0];
        s_l[warp * RB + g] = l[0];
        s_m[warp * RB + g + 8] = m[1];
        s_l[warp * RB + g + 8] = l[1];
    }
    __syncthreads();
    DEC_MARK(7);
    dec_finish<T, HD, HD / 4, DEC_MWARPS, RB, OPT>(p, s_acc, s_m, s_l, rows, row0, kvh, b, split, rg, row_groups, tid);
}
#endif

template <typename T, int HD, bool REG, bool OPT> struct DecPath {
    static FA_DEVICE void run(const DecodeParams& p) { flash_decode_body<T, HD, OPT>(p); }
};
template <typename T, int HD, bool OPT, bool MMA = DecMma<T, HD>::OK> struct DecRegPath {
    static FA_DEVICE void run(const DecodeParams& p) { flash_decode_reg_body<T, HD, OPT>(p); }
};
#if FA_HAS_MMA
template <typename T, int HD, bool OPT> struct DecRegPath<T, HD, OPT, true> {
    static FA_DEVICE void run(const DecodeParams& p) {
        if (p.tensor_cores)
            flash_decode_mma_body<T, HD, OPT>(p);
        else
            flash_decode_reg_body<T, HD, OPT>(p);
    }
};
#endif
template <typename T, int HD, bool OPT> struct DecPath<T, HD, true, OPT> {
    static FA_DEVICE void run(const DecodeParams& p) { DecRegPath<T, HD, OPT>::run(p); }
};

// Merges the splits of one (batch, head, query) row: weights 2^(lse_s - max lse).
// Grid (min(B * H * Sq, 2^31 - 1)), 128 threads, each block striding over the rows.
template <typename T, bool OPT>
FA_DEVICE void flash_decode_combine_row(const DecodeParams& p, fa_i64 row) {
    const int qi = (int)(row % p.seq_q);
    const int h = (int)((row / p.seq_q) % p.num_heads);
    const int b = (int)(row / ((fa_i64)p.seq_q * p.num_heads));
    const float* lse = p.partial_lse + row * p.num_splits;
    float mx = FA_NEG_INF;
    for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse[s]);
    T* o = reinterpret_cast<T*>(p.out) + (fa_i64)b * p.o_sb + (fa_i64)h * p.o_sh + (fa_i64)qi * p.o_ss;
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        float num = 0.f, den = 0.f;
        if (mx != FA_NEG_INF) {
            for (int s = 0; s < p.num_splits; ++s) {
                float w = fa_exp2f(lse[s] - mx);
                num += w * p.partial_o[(row * p.num_splits + s) * p.head_dim + d];
                den += w;
            }
        }
        if (OPT)
            fa_store(o + d, num * dec_row_final<true>(p, b, h, qi, mx, den, d == 0));
        else
            fa_store(o + d, den > 0.f ? num / den : 0.f);
    }
}

template <typename T, bool OPT>
FA_DEVICE void flash_decode_combine_body(const DecodeParams& p) {
    const fa_i64 rows_total = (fa_i64)p.batch * p.num_heads * p.seq_q;
    for (fa_i64 row = blockIdx.x; row < rows_total; row += gridDim.x)
        flash_decode_combine_row<T, OPT>(p, row);
}

// Each dtype x head dim has a plain entry point and one with the per-call options
// (flash_decode_opt_*: OPT = true), which the host runs only when an option or the
// log-sum-exp output is asked for, so plain calls keep their code.
#define DEC_KERNEL(NAME, T, HD, OPT)                                                            \
    FA_KERNEL void FA_LAUNCH_BOUNDS_MIN(DEC_THREADS, (DecReg<T, HD>::OK ? DEC_REG_BLOCKS : 1))   \
        NAME(DecodeParams p) {                                                                  \
        DecPath<T, HD, DecReg<T, HD>::OK, OPT>::run(p);                                         \
    }
#define DEC_INSTANTIATE(DT, T, HD) DEC_KERNEL(flash_decode_##DT##_hd##HD, T, HD, false)
#define DEC_INSTANTIATE_OPT(DT, T, HD) DEC_KERNEL(flash_decode_opt_##DT##_hd##HD, T, HD, true)
#define DEC_COMBINE(DT, T) \
    FA_KERNEL void flash_decode_combine_##DT(DecodeParams p) { flash_decode_combine_body<T, false>(p); }
#define DEC_COMBINE_OPT(DT, T) \
    FA_KERNEL void flash_decode_combine_opt_##DT(DecodeParams p) { flash_decode_combine_body<T, true>(p); }

#define DEC_ALL_HD_OF(INST, DT, T)                                                               \
    INST(DT, T, 32) INST(DT, T, 64) INST(DT, T, 80) INST(DT, T, 96) INST(DT, T, 128)               \
    INST(DT, T, 160) INST(DT, T, 192) INST(DT, T, 224) INST(DT, T, 256)
#define DEC_ALL_HD(DT, T)                                                                        \
    DEC_ALL_HD_OF(DEC_INSTANTIATE, DT, T) DEC_COMBINE(DT, T)                                     \
    DEC_ALL_HD_OF(DEC_INSTANTIATE_OPT, DT, T) DEC_COMBINE_OPT(DT, T)

// NVRTC compiles one dtype x head-dim at a time (FA_VARIANT_*), plain or with options
// (FA_VARIANT_OPTS=1); hipcc builds them all.
#if defined(FA_VARIANT_DT) && defined(FA_VARIANT_HD)
#define DEC_T_f32 float
#define DEC_T_f16 fa_f16
#define DEC_T_bf16 fa_bf16
#define DEC_CAT2(a, b) a##b
#define DEC_CAT(a, b) DEC_CAT2(a, b)
// One more expansion level so FA_VARIANT_* expand before the token pasting.
#define DEC_INSTANTIATE_X(DT, T, HD) DEC_INSTANTIATE(DT, T, HD)
#define DEC_COMBINE_X(DT, T) DEC_COMBINE(DT, T)
#define DEC_INSTANTIATE_OPT_X(DT, T, HD) DEC_INSTANTIATE_OPT(DT, T, HD)
#define DEC_COMBINE_OPT_X(DT, T) DEC_COMBINE_OPT(DT, T)
#if defined(FA_VARIANT_OPTS) && FA_VARIANT_OPTS
DEC_INSTANTIATE_OPT_X(FA_VARIANT_DT, DEC_CAT(DEC_T_, FA_VARIANT_DT), FA_VARIANT_HD)
DEC_COMBINE_OPT_X(FA_VARIANT_DT, DEC_CAT(DEC_T_, FA_VARIANT_DT))
#else
DEC_INSTANTIATE_X(FA_VARIANT_DT, DEC_CAT(DEC_T_, FA_VARIANT_DT), FA_VARIANT_HD)
DEC_COMBINE_X(FA_VARIANT_DT, DEC_CAT(DEC_T_, FA_VARIANT_DT))
#endif
#else
DEC_ALL_HD(f32, float)
DEC_ALL_HD(f16, fa_f16)
DEC_ALL_HD(bf16, fa_bf16)
#endif
