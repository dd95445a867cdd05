// What every flash implementation (flash_simt.h, flash_attention_mma.h, _tf32.h, _wgmma.h)
// derives the same way from its block and its AttnParams: the block's first query, the key
// tiles it visits and the block setup (FA_BLOCK_SETUP). A per-call option that changes which keys a
// row sees or where a block reads is added here once.
//
// Needs compat.h and attention_params.h.
#pragma once

// FA_EXT: this compile unit is a variant with the per-call extensions of AttnParams (window,
// softcap, ALiBi, sinks, packed ragged batches, lse strides); the catalog sets
// FA_VARIANT_EXT=1 for those, and FA_VARIANT_EXT=2 for the ones that also read K / V
// through a block table (FA_PAGED: the page fields cost registers in every copy loop, so
// only calls over pages pay for them). In the plain variants every FA_EXT condition is a
// constant false, so they emit the code they had before the extensions existed.
#ifndef FA_VARIANT_EXT
#define FA_VARIANT_EXT 0
#endif
#define FA_EXT (FA_VARIANT_EXT != 0)
#define FA_PAGED (FA_VARIANT_EXT == 2)

// Key tiles of BN keys a block of queries q0 .. q0 + BM - 1 visits: with bottom-right causal
// alignment, keys past the last row's limit are invisible to every row of the block; so are
// keys past the last row's window (FA_EXT).
FA_DEVICE int fa_key_tiles(const AttnParams& p, int q0, int BM, int BN, int seq_q, int seq_k,
                           bool causal) {
    int kend = seq_k;
    const int qlast = ((q0 + BM < seq_q) ? q0 + BM : seq_q) - 1;
    if (causal) {
        const int lim = qlast + (seq_k - seq_q) + 1;
        kend = lim < seq_k ? lim : seq_k;
        if (kend < 0) kend = 0;
    }
    if (FA_EXT) {
        const fa_i64 lim = (fa_i64)qlast + (seq_k - seq_q) + p.window_right + 1;
        if (lim < (fa_i64)kend) kend = lim < 0 ? 0 : (int)lim;
    }
    return (kend + BN - 1) / BN;
}

// The first key tile of the block whose first query is q0: keys left of its window are
// invisible to every row of the block (FA_EXT; 0 otherwise).
FA_DEVICE int fa_first_key_tile(const AttnParams& p, int q0, int BN, int diag) {
    if (!FA_EXT) return 0;
    const fa_i64 lo = (fa_i64)q0 + diag - p.window_left;
    return lo <= 0 ? 0 : (int)(lo / BN);
}

// Whether query rows r0 .. r1 see any key of the tile kv0 .. kv0 + BN - 1 (the causal cut
// and, FA_EXT, the window); warp- or warpgroup-uniform in the tensor-core kernels.
FA_DEVICE bool fa_rows_see_tile(const AttnParams& p, int kv0, int BN, int r0, int r1, int diag,
                                bool causal) {
    bool sees = !causal || kv0 <= r1 + diag;
    if (FA_EXT)
        sees = sees && (fa_i64)kv0 + BN - 1 >= (fa_i64)r0 + diag - p.window_left &&
               (fa_i64)kv0 <= (fa_i64)r1 + diag + p.window_right;
    return sees;
}

// Whether the tile kv0 .. kv0 + BN - 1 for rows r0 .. r1 needs the masked score step: an
// additive mask, keys past seq_k, the causal diagonal or (FA_EXT) a window edge crossing it.
FA_DEVICE bool fa_tile_needs_mask(const AttnParams& p, int kv0, int BN, int r0, int r1, int diag,
                                  int seq_k, bool causal, bool has_mask) {
    bool need = has_mask || (kv0 + BN > seq_k) || (causal && kv0 + BN - 1 > r0 + diag);
    if (FA_EXT)
        need = need || (fa_i64)kv0 < (fa_i64)r1 + diag - p.window_left ||
               (fa_i64)kv0 + BN - 1 > (fa_i64)r0 + diag + p.window_right;
    return need;
}

// Whether scores are transformed (FA_EXT softcap or ALiBi): every tile then takes a
// transform step, the masked one on the tiles fa_tile_needs_mask names.
FA_DEVICE bool fa_transforms(const AttnParams& p) { return FA_EXT && p.transform != 0; }

// The keys a query row keeps, for the masked score step: lim = its aligned diagonal
// (i + seq_k - seq_q); key j is visible iff j < seq_k, j <= lim when causal and, FA_EXT,
// lo <= j <= hi (its window, clamped to 32 bits).
struct FaRowKeys {
    int lim, lo, hi;
};
FA_DEVICE FaRowKeys fa_row_keys(const AttnParams& p, int qi, int diag) {
    FaRowKeys r;
    r.lim = qi + diag;
    r.lo = 0;
    r.hi = 0;
    if (FA_EXT) {
        const fa_i64 lo = (fa_i64)r.lim - p.window_left;
        const fa_i64 hi = (fa_i64)r.lim + p.window_right;
        r.lo = lo < -0x7fffffffLL ? -0x7fffffff : (int)lo;
        r.hi = hi > 0x7fffffffLL ? 0x7fffffff : (int)hi;
    }
    return r;
}
FA_DEVICE bool fa_key_visible(const FaRowKeys& r, int kj, int seq_k, bool causal) {
    bool vis = (kj < seq_k) && (!causal || kj <= r.lim);
    if (FA_EXT) vis = vis && kj >= r.lo && kj <= r.hi;
    return vis;
}

// tanh for the softcap: the hardware approximation where there is one (its relative error,
// about 2^-11, is below the 16-bit inputs' rounding); exact for f32 (PRECISE).
template <bool PRECISE> FA_DEVICE float fa_softcap_tanh(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
    if (!PRECISE) {
        float y;
        asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
        return y;
    }
#endif
    return tanhf(x);
}

// The score transforms of FA_EXT (transform != 0), on a score x already in the log2 domain
// (scale * log2(e) * q.k): softcap cap * tanh(s / cap) is C * tanh(x / C) there with
// C = cap * log2(e); ALiBi subtracts slope2 * |lim - j| (slope2 = slope * log2(e)).
// cap2 <= 0: no softcap.
template <bool PRECISE>
FA_DEVICE float fa_transform_score(float x, float cap2, float slope2, int lim, int kj) {
    if (cap2 > 0.0f) x = cap2 * fa_softcap_tanh<PRECISE>(x * (1.0f / cap2));
    const int d = lim - kj;
    return fmaf(-slope2, (float)(d < 0 ? -d : d), x);
}
// A head's transform constants, read once per masked tile: (cap2, slope2).
FA_DEVICE float fa_cap2(const AttnParams& p) { return p.softcap * FA_LOG2E; }
FA_DEVICE float fa_slope2(const AttnParams& p, int h) {
    return p.alibi != nullptr ? p.alibi[h] * FA_LOG2E : 0.0f;
}

// The end of a row: from its running max m (log2 domain) and its whole sum l, the factor
// that normalizes O (1 / denominator) and the natural-log log-sum-exp. A row that saw no
// key has l = 0: O is 0 and lse -inf. FA_EXT: a sink (sinks[h], natural units) joins the
// denominator, so such a row's lse is the sink; a NaN score or sink makes both NaN.
struct FaRowEnd {
    float inv, lse;
};
FA_DEVICE FaRowEnd fa_row_end(const AttnParams& p, int h, float m, float l) {
    FaRowEnd e;
    if (!FA_EXT) {
        e.inv = l > 0.0f ? 1.0f / l : 0.0f;
        e.lse = l > 0.0f ? fmaf(m, FA_LN2, fa_logf(l)) : FA_NEG_INF;
        return e;
    }
    if (p.sinks == nullptr) {
        e.inv = l == 0.0f ? 0.0f : 1.0f / l;
        e.lse = l == 0.0f ? FA_NEG_INF : fmaf(m, FA_LN2, fa_logf(l));
        return e;
    }
    const float s2 = p.sinks[h] * FA_LOG2E;
    const float mf = fmaxf(m, s2);
    const float keep = l == 0.0f ? 0.0f : fa_exp2f(m - mf);  // rescales the row's own sum
    const float den = fmaf(l, keep, fa_exp2f(s2 - mf));
    e.inv = keep / den;
    e.lse = fmaf(mf, FA_LN2, fa_logf(den));
    return e;
}

// Where a row's log-sum-exp goes: [B, H, Sq] contiguous in the plain variants; through the
// l_* strides, after the sequence's first packed row q_row0, in the FA_EXT ones.
FA_DEVICE float* fa_lse_at(const AttnParams& p, int b, int h, int q_row0, int qi) {
    if (!FA_EXT) return p.lse + ((fa_i64)b * p.num_heads + h) * p.seq_q + qi;
    return p.lse + (fa_i64)b * p.l_sb + (fa_i64)h * p.l_sh + ((fa_i64)q_row0 + qi) * p.l_ss;
}

// Causal blocks with more queries have more keys: start those first.
FA_DEVICE int fa_block_q0(const AttnParams& p, int bm, int mode) {
    const bool causal = (mode == 1) || (mode == 2 && p.causal != 0);
    const int qblk = causal ? (int)(gridDim.x - 1u - blockIdx.x) : (int)blockIdx.x;
    return qblk * bm;
}

// The block setup every flash kernel starts with, in one place (a per-call option that
// changes which keys a row sees or where a block reads is added here once), in two steps.
// FA_BLOCK_EXIT(MODE, p, q0) declares
//   seq_q, seq_k      the sequence lengths
//   causal            MODE 0: no mask, not causal; MODE 1: causal, no mask; MODE 2: additive
//                     f32 mask (nullable), causal when p.causal != 0
// and returns when the block (first query q0) has no query: block-uniform, before any
// barrier. FA_BLOCK_SETUP(E, BM, BN, MODE, p, q0) then declares
//   h, b, kvh         the block's head and batch entry (grid y, z) and the KV head it reads
//   diag              the bottom-right causal diagonal: key j is visible to query i when
//                     j <= i + diag
//   tbeg, ntiles      the key tiles of BN keys the block visits: tbeg .. ntiles - 1
//   has_mask          an additive mask is given (MODE 2)
//   head_dim          the call's head dim
//   qg, kg, vg        this (batch, head)'s Q, K and V rows, as E (the storage type copied)
//   o_off             the element offset of its output rows
// (FA_BLOCK_EXIT also declares q_row0 and k_row0, the sequence's first packed row: 0
// unless the batch is packed).
// Macros rather than a function filling a struct: these statements, in this order, are what
// every kernel had, and NVRTC emits the same code for them (a struct filled after the early
// exit, or another order, changed the emitted code of every kernel).
#define FA_BLOCK_EXIT(MODE, p, q0)                                                               \
    const int q_row0 = (FA_EXT && (p).cu_q != nullptr) ? (p).cu_q[blockIdx.z] : 0;               \
    const int k_row0 = (FA_EXT && (p).cu_k != nullptr) ? (p).cu_k[blockIdx.z] : 0;               \
    const int seq_q = (FA_EXT && (p).cu_q != nullptr) ? (p).cu_q[blockIdx.z + 1] - q_row0         \
                                                      : (p).seq_q;                               \
    const int seq_k = (FA_EXT && (p).cu_k != nullptr)   ? (p).cu_k[blockIdx.z + 1] - k_row0       \
                      : (FA_PAGED && (p).k_lens != nullptr) ? (p).k_lens[blockIdx.z]              \
                                                          : (p).seq_k;                           \
    const bool causal = ((MODE) == 1) || ((MODE) == 2 && (p).causal != 0);                       \
    if ((q0) >= seq_q) return
#define FA_BLOCK_SETUP(E, BM, BN, MODE, p, q0)                                                    \
    static_assert((MODE) >= 0 && (MODE) <= 2, "MASK_MODE is 0, 1 or 2");                         \
    const int h = (int)blockIdx.y;                                                               \
    const int b = (int)blockIdx.z;                                                               \
    const int kvh = h / ((p).num_heads / (p).num_kv_heads);                                      \
    const int diag = seq_k - seq_q;                                                              \
    const int ntiles = fa_key_tiles((p), (q0), (BM), (BN), seq_q, seq_k, causal);                \
    const int tbeg = fa_first_key_tile((p), (q0), (BN), diag);                                   \
    const bool has_mask = ((MODE) == 2) && ((p).mask != nullptr);                                \
    [[maybe_unused]] const int head_dim = (p).head_dim;                                          \
    const fa_i64 o_off = (fa_i64)b * (p).o_sb + (fa_i64)h * (p).o_sh + (fa_i64)q_row0 * (p).o_ss; \
    const FaRows<E> qg = fa_dense_rows<E>((p).q, (fa_i64)b * (p).q_sb + (fa_i64)h * (p).q_sh +   \
                                                     (fa_i64)q_row0 * (p).q_ss, (p).q_ss);      \
    const FaRows<E> kg = fa_kv_rows<E>((p), (p).k, (p).k_sb, (p).k_sh, (p).k_ss, b, kvh, k_row0); \
    const FaRows<E> vg = fa_kv_rows<E>((p), (p).v, (p).v_sb, (p).v_sh, (p).v_ss, b, kvh, k_row0)

// Where the rows of one operand of a block start: row r at base + r * stride, or, for paged
// K / V (FA_PAGED, table set), at base + table[r / page_size] * page_stride +
// (r % page_size) * stride. The copy loops of every implementation address rows through it.
template <typename E> struct FaRows {
    const E* base;
    fa_i64 stride;
    const int* table;  // this sequence's row of the block table, or null
    fa_i64 page_stride;
    int page_size;
    int page_shift;  // log2(page_size), or -1
    FA_DEVICE bool paged() const { return FA_PAGED && table != nullptr; }
    FA_DEVICE const E* row(int r) const {
        if (paged()) {
            const int pg = page_shift >= 0 ? r >> page_shift : r / page_size;
            const int in = page_shift >= 0 ? r & (page_size - 1) : r - pg * page_size;
            return base + (fa_i64)table[pg] * page_stride + (fa_i64)in * stride;
        }
        return base + (fa_i64)r * stride;
    }
    // The same rows as another element type (the TF32 copy moves f32 rows as 16-bit pairs).
    template <typename F> FA_DEVICE FaRows<F> as(int scale) const {
        FaRows<F> o;
        o.base = reinterpret_cast<const F*>(base);
        o.stride = stride * scale;
        o.table = table;
        o.page_stride = page_stride * scale;
        o.page_size = page_size;
        o.page_shift = page_shift;
        return o;
    }
};
template <typename E> FA_DEVICE FaRows<E> fa_dense_rows(const void* ptr, fa_i64 off, fa_i64 stride) {
    FaRows<E> r;
    r.base = static_cast<const E*>(ptr) + off;
    r.stride = stride;
    r.table = nullptr;
    r.page_stride = 0;
    r.page_size = 1;
    r.page_shift = 0;
    return r;
}
// K or V rows of (batch b, KV head kvh): dense (the sequence's rows from k_row0) or paged.
template <typename E>
FA_DEVICE FaRows<E> fa_kv_rows(const AttnParams& p, const void* ptr, fa_i64 sb, fa_i64 sh, fa_i64 ss, int b,
                               int kvh, int k_row0) {
    if (FA_PAGED && p.block_table != nullptr) {
        FaRows<E> r;
        r.base = static_cast<const E*>(ptr) + (fa_i64)kvh * sh;
        r.stride = ss;
        r.table = p.block_table + (fa_i64)b * p.max_pages;
        r.page_stride = sb;
        r.page_size = p.page_size;
        r.page_shift = p.page_shift;
        return r;
    }
    return fa_dense_rows<E>(ptr, (fa_i64)b * sb + (fa_i64)kvh * sh + (fa_i64)k_row0 * ss, ss);
}

// A thread's place in the tensor-core kernels' fragment layouts: tid, its warp and lane,
// and the lane's row g = lane / 4 and column c4 = lane % 4 within its quad.
#define FA_LANE_SETUP()                 \
    const int tid = (int)threadIdx.x;   \
    const int warp = tid >> 5;          \
    const int lane = tid & 31;          \
    const int g = lane >> 2;            \
    const int c4 = lane & 3
