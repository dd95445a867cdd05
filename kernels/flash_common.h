// What every flash implementation (flash_simt.h, flash_attention_mma.h, _tf32.h, _wgmma.h)
// derives the same way from its block and its AttnParams: the block's first query, the key
// tiles it visits and the block setup (FA_BLOCK_SETUP). A per-call option that changes which keys a
// row sees or where a block reads is added here once.
//
// Needs compat.h and attention_params.h.
#pragma once

// Key tiles of BN keys a block of queries q0 .. q0 + BM - 1 visits: with bottom-right causal
// alignment, keys past the last row's limit are invisible to every row of the block.
FA_DEVICE int fa_key_tiles(int q0, int BM, int BN, int seq_q, int seq_k, bool causal) {
    int kend = seq_k;
    if (causal) {
        const int qlast = ((q0 + BM < seq_q) ? q0 + BM : seq_q) - 1;
        const int lim = qlast + (seq_k - seq_q) + 1;
        kend = lim < seq_k ? lim : seq_k;
        if (kend < 0) kend = 0;
    }
    return (kend + BN - 1) / BN;
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
//   ntiles            the key tiles of BN keys the block visits
//   has_mask          an additive mask is given (MODE 2)
//   head_dim          the call's head dim
//   qg, kg, vg        this (batch, head)'s Q, K and V rows, as E (the storage type copied).
// Macros rather than a function filling a struct: these statements, in this order, are what
// every kernel had, and NVRTC emits the same code for them (a struct filled after the early
// exit, or another order, changed the emitted code of every kernel).
#define FA_BLOCK_EXIT(MODE, p, q0)                                                               \
    const int seq_q = (p).seq_q;                                                                 \
    const int seq_k = (p).seq_k;                                                                 \
    const bool causal = ((MODE) == 1) || ((MODE) == 2 && (p).causal != 0);                       \
    if ((q0) >= seq_q) return
#define FA_BLOCK_SETUP(E, BM, BN, MODE, p, q0)                                                    \
    static_assert((MODE) >= 0 && (MODE) <= 2, "MASK_MODE is 0, 1 or 2");                         \
    const int h = (int)blockIdx.y;                                                               \
    const int b = (int)blockIdx.z;                                                               \
    const int kvh = h / ((p).num_heads / (p).num_kv_heads);                                      \
    const int diag = seq_k - seq_q;                                                              \
    const int ntiles = fa_key_tiles((q0), (BM), (BN), seq_q, seq_k, causal);                     \
    const bool has_mask = ((MODE) == 2) && ((p).mask != nullptr);                                \
    [[maybe_unused]] const int head_dim = (p).head_dim;                                          \
    const E* qg = static_cast<const E*>((p).q) + (fa_i64)b * (p).q_sb + (fa_i64)h * (p).q_sh;    \
    const E* kg = static_cast<const E*>((p).k) + (fa_i64)b * (p).k_sb + (fa_i64)kvh * (p).k_sh;  \
    const E* vg = static_cast<const E*>((p).v) + (fa_i64)b * (p).v_sb + (fa_i64)kvh * (p).v_sh

// A thread's place in the tensor-core kernels' fragment layouts: tid, its warp and lane,
// and the lane's row g = lane / 4 and column c4 = lane % 4 within its quad.
#define FA_LANE_SETUP()                 \
    const int tid = (int)threadIdx.x;   \
    const int warp = tid >> 5;          \
    const int lane = tid & 31;          \
    const int g = lane >> 2;            \
    const int c4 = lane & 3
