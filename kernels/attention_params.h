// Kernel argument blocks shared by the host (mirrored as #[repr(C)] structs in
// src/backend/gpu/params.rs) and every attention kernel. Passed by value as the
// kernel's single argument so both vendors launch every kernel the same way.
// Strides are in elements; the last (head_dim / key) dimension is always contiguous.
#pragma once

typedef long long fa_i64;

typedef struct {
    const void* q;          // [B, Sq, H, D] or [B, H, Sq, D] through the strides below
    const void* k;          // [B, Sk, Hkv, D] / [B, Hkv, Sk, D]
    const void* v;          // same shape as k
    const float* mask;      // additive f32 mask or null; broadcast through zero strides
    void* out;              // same shape and dtype as q
    float* lse;             // [B, H, Sq] natural-log log-sum-exp, or null
    float* workspace;       // traditional path: scores/probabilities [B, H, Sq, Sk] f32
    // Per-call extensions, read only by the FA_EXT flash variants (flash_common.h):
    const float* alibi;     // [H] ALiBi slopes or null: score - slope[h] * |i + Sk - Sq - j|
    const float* sinks;     // [H] sink logits or null: exp(sink[h]) joins each row's denominator
    const int* cu_q;        // [B + 1] row offsets of packed (varlen) queries, or null
    const int* cu_k;        // [B + 1] row offsets of packed keys / values, or null
    const int* block_table; // [B, max_pages] page ids of paged K / V, or null
    const int* k_lens;      // [B] keys of each paged sequence (with block_table)
    fa_i64 q_sb, q_sh, q_ss;
    fa_i64 k_sb, k_sh, k_ss;
    fa_i64 v_sb, v_sh, v_ss;
    fa_i64 o_sb, o_sh, o_ss;
    fa_i64 m_sb, m_sh, m_sq;  // mask strides for batch, head, query row (0 = broadcast)
    fa_i64 l_sb, l_sh, l_ss;  // lse strides for batch, head, query row (FA_EXT variants)
    int batch;
    int num_heads;
    int num_kv_heads;       // num_heads % num_kv_heads == 0; head h reads kv head h / (H / Hkv)
    int seq_q;
    int seq_k;
    int head_dim;           // runtime head dim, <= the variant's compile-time bucket
    float scale;            // softmax scale (natural base)
    int causal;             // 1: key j visible to query i iff j <= i + (seq_k - seq_q)
    // FA_EXT variants: key j is kept iff a - window_left <= j <= a + window_right, with
    // a = i + seq_k - seq_q (the host gives bounds that reach past every key when a side is
    // unbounded); softcap > 0: score -> softcap * tanh(score / softcap) before anything else;
    // transform != 0: softcap or alibi is set, so every tile takes the masked score step.
    // With cu_q / cu_k, seq_q / seq_k are the longest sequence's lengths (the grid) and each
    // sequence b has cu[b + 1] - cu[b] rows starting at row cu[b]; the batch strides of
    // q, k, v, out and lse are then 0.
    int window_left;
    int window_right;
    float softcap;
    int transform;
    // Paged K / V (block_table set): key j of sequence b is row j % page_size of page
    // block_table[b * max_pages + j / page_size]; k_sb / v_sb are then the page strides.
    // page_shift = log2(page_size) for powers of two, else -1.
    int max_pages;
    int page_size;
    int page_shift;
    int pad_;
} AttnParams;

// Strided device-to-device copy (tensor_ops.hip: copy_strided_b2 / copy_strided_b4).
// Rank padded to 4 with leading size-1 dims; strides in elements; numel = product of shape.
typedef struct {
    const void* src;
    void* dst;
    fa_i64 shape[4];
    fa_i64 src_strides[4];
    fa_i64 dst_strides[4];
    fa_i64 numel;
} CopyParams;

// Contiguous fill of numel 4-byte elements with a bit pattern (tensor_ops.hip: fill_b4).
typedef struct {
    void* dst;
    unsigned int value;
    fa_i64 numel;
} FillParams;

// Contiguous fill of numel 2-byte elements with a bit pattern (tensor_ops.hip: fill_b2).
typedef struct {
    void* dst;
    unsigned short value;
    fa_i64 numel;
} FillParamsB2;
