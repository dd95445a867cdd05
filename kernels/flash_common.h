// What every flash implementation (flash_simt.h, flash_attention_mma.h, _tf32.h, _wgmma.h)
// derives the same way from its block and its AttnParams: the block's first query, the key
// tiles it visits and the block setup (FaBlock). A per-call option that changes which keys a
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

// One block's setup: (batch, head) from the grid, the KV head it reads (GQA), the
// bottom-right causal diagonal (key j is visible to query i when j <= i + diag), the mask
// mode's flags, the key tiles of BN keys to visit and the base pointers of this (batch,
// head)'s Q, K and V rows, in elements of E (the storage type the kernel copies as).
// MODE 0: no mask, not causal. MODE 1: causal, no mask. MODE 2: additive f32 mask
// (nullable), causal when p.causal != 0.
template <typename E>
struct FaBlock {
    int q0;
    int seq_q;
    int seq_k;
    int h;
    int b;
    int kvh;
    int diag;
    int head_dim;
    int ntiles;
    bool causal;
    bool has_mask;
    const E* qg;
    const E* kg;
    const E* vg;
};

// A thread's place in the tensor-core kernels' fragment layouts: its warp, lane, and the
// lane's row g = lane / 4 and column c4 = lane % 4 within its quad.
struct FaLane {
    int tid;
    int warp;
    int lane;
    int g;
    int c4;
};
FA_DEVICE FaLane fa_lane() {
    const int tid = (int)threadIdx.x;
    const int lane = tid & 31;
    return FaLane{tid, tid >> 5, lane, lane >> 2, lane & 3};
}

template <typename E, int BM, int BN, int MODE>
FA_DEVICE FaBlock<E> fa_block(const AttnParams& p, int q0) {
    static_assert(MODE >= 0 && MODE <= 2, "MASK_MODE is 0, 1 or 2");
    FaBlock<E> k;
    k.q0 = q0;
    k.seq_q = p.seq_q;
    k.seq_k = p.seq_k;
    k.h = (int)blockIdx.y;
    k.b = (int)blockIdx.z;
    k.kvh = k.h / (p.num_heads / p.num_kv_heads);
    k.diag = k.seq_k - k.seq_q;
    k.head_dim = p.head_dim;
    k.causal = (MODE == 1) || (MODE == 2 && p.causal != 0);
    k.has_mask = (MODE == 2) && (p.mask != nullptr);
    k.ntiles = fa_key_tiles(q0, BM, BN, k.seq_q, k.seq_k, k.causal);
    k.qg = static_cast<const E*>(p.q) + (fa_i64)k.b * p.q_sb + (fa_i64)k.h * p.q_sh;
    k.kg = static_cast<const E*>(p.k) + (fa_i64)k.b * p.k_sb + (fa_i64)k.kvh * p.k_sh;
    k.vg = static_cast<const E*>(p.v) + (fa_i64)k.b * p.v_sb + (fa_i64)k.kvh * p.v_sh;
    return k;
}
