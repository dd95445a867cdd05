// Argument block of the split-KV decode kernels (mirrored in src/backend/gpu/decode.rs).
#pragma once

typedef struct {
    const void* q;            // [B, Sq, H, D] / [B, H, Sq, D] through the strides below
    const void* k;            // contiguous cache, or the page pool when block_table != null
    const void* v;
    void* out;                // same shape and dtype as q
    float* partial_o;         // [B, H, Sq, num_splits, head_dim] f32 (num_splits > 1 only)
    float* partial_lse;       // [B, H, Sq, num_splits] base-2 log-sum-exp
    const int* seq_lens;      // [B] keys per sequence, or null: every sequence has seq_k
    const int* block_table;   // [B, max_pages] page ids, or null: contiguous cache
    int* counters;            // finished splits per (sequence, kv head, row group), or null:
                              // flash_decode_combine merges; zero between launches
    const void* k_new;        // fused append (register path only): n_new tokens per sequence,
    const void* v_new;        // [B, n_new, Hkv, D] through the kn_/vn_ strides, or null
    int* pool_next;           // fused append into a paged cache: the pool's next free page
    int* arrivals;            // fused append: [B] blocks that have read seq_lens; zero
                              // between launches
    long long q_sb, q_sh, q_ss;
    long long o_sb, o_sh, o_ss;
    long long k_sb, k_sh, k_ss;  // contiguous: batch stride; paged: page stride
    long long v_sb, v_sh, v_ss;
    long long kn_sb, kn_ss, kn_sh;  // fused append: new tokens' batch, token, head strides
    long long vn_sb, vn_ss, vn_sh;
    int batch;
    int num_heads;
    int num_kv_heads;
    int seq_q;                // queries per sequence (<= 16 is the decode regime)
    int seq_k;                // keys when seq_lens is null; otherwise the largest length
                              // (after the fused append, if any)
    int head_dim;
    int max_pages;            // block-table row length
    int page_size;            // keys per page (paged caches)
    int num_splits;           // key chunks per (sequence, kv head), one block each
    int split_keys;           // keys per chunk, a multiple of the key tile
    float scale;
    int causal;
    int n_new;                // fused append: tokens appended per sequence (0: none)
    int num_pages;            // fused append into a paged cache: pages in the pool
    // Per-call options, read only by the option variants (flash_decode_opt_*):
    const float* alibi;       // [H] ALiBi slopes, or null
    const float* sinks;       // [H] attention-sink logits, or null
    float* lse;               // [B, H, Sq] natural-log log-sum-exp through lse_s*, or null
    long long lse_sb, lse_sh, lse_ss;
    int window_left;          // keys kept left of the diagonal; the host clamps it to
                              // MAX_KERNEL_SEQ (unbounded: that limit), so a_i - left fits
    int window_right;         // keys kept right of the diagonal, clamped to <= 16 (a larger
                              // bound keeps every key: a_i >= len - Sq), so a_i + right fits
    float softcap;            // cap * log2(e): the softcap in the log2 domain; 0: none
    float softcap_inv;        // 1 / softcap (0: none)
    int page_shift;           // log2(page_size) when that is a power of two, else -1
    int tensor_cores;         // 1: the tensor-core body (16-bit, head dims 64 and 128, CUDA
                              // sm_80+); 0: the register or shared-memory path
} DecodeParams;
