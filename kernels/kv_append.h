// The KV-cache append of one sequence, shared by the append kernel (kv_cache.hip) and the
// decode kernel's fused append (flash_decode.hip).
#pragma once

#include "compat.h"

typedef struct {
    const void* k_new;        // [B, n, Hkv, D] through the strides below
    const void* v_new;
    void* k_cache;            // contiguous [B, Hkv, capacity, D] or pool [pages, Hkv, page_size, D]
    void* v_cache;
    int* seq_lens;            // [B] tokens already cached; advanced by this kernel
    int* block_table;         // [B, max_pages] page ids (paged), or null
    int* pool_next;           // next free page of the pool (paged), or null
    const int* counts;        // [B] new tokens per sequence, or null: every sequence gets n
    long long kn_sb, kn_ss, kn_sh;
    long long vn_sb, vn_ss, vn_sh;
    long long c_sb, c_sh, c_ss;  // cache strides: batch (or page), head, position
    int batch;
    int n;                    // new tokens per sequence (the largest when counts != null)
    int num_kv_heads;
    int head_dim;
    int max_pages;
    int page_size;
    int num_pages;            // pages in the pool (paged): the counter never hands out more
    int pad_;
} AppendParams;

// Sequence b's new tokens into its cache, by one whole block; a page is taken from the pool
// (device-side counter) exactly when a token starts one; a page past the pool is never
// handed out (the entry becomes -1, the token is dropped and readers stay inside the pool:
// the host refuses such appends before they are queued, so this only bounds a misuse).
// `start` is the sequence's length before the append; `advance` writes the new length to
// seq_lens (the fused decode kernel advances it itself, once every block has read the old
// one). s_page: 8 bytes of shared memory (the caller's, so that no kernel gains static
// shared memory by including this).
template <typename E>
FA_DEVICE void kv_append_sequence(const AppendParams& p, int b, int start, bool advance, fa_i64* s_page) {
    const int count = p.counts ? p.counts[b] : p.n;
    const E* kn = reinterpret_cast<const E*>(p.k_new);
    const E* vn = reinterpret_cast<const E*>(p.v_new);
    E* kc = reinterpret_cast<E*>(p.k_cache);
    E* vc = reinterpret_cast<E*>(p.v_cache);
    const fa_i64 per_token = (fa_i64)p.num_kv_heads * p.head_dim;
    for (int t = 0; t < count; ++t) {
        const int pos = start + t;
        fa_i64 slot, within;
        if (p.block_table) {
            if (threadIdx.x == 0) {
                int* entry = p.block_table + (fa_i64)b * p.max_pages + pos / p.page_size;
                if (pos % p.page_size == 0) {
                    const int taken = atomicAdd(p.pool_next, 1);
                    *entry = taken < p.num_pages ? taken : -1;
                }
                *s_page = *entry;
            }
            __syncthreads();
            slot = *s_page;
            within = pos % p.page_size;
            if (slot < 0) {
                __syncthreads();  // s_page is rewritten for the next token
                continue;
            }
        } else {
            slot = b;
            within = pos;
        }
        for (fa_i64 i = threadIdx.x; i < per_token; i += blockDim.x) {
            const fa_i64 h = i / p.head_dim, d = i % p.head_dim;
            const fa_i64 dst = slot * p.c_sb + h * p.c_sh + within * p.c_ss + d;
            kc[dst] = kn[(fa_i64)b * p.kn_sb + (fa_i64)t * p.kn_ss + h * p.kn_sh + d];
            vc[dst] = vn[(fa_i64)b * p.vn_sb + (fa_i64)t * p.vn_ss + h * p.vn_sh + d];
        }
        __syncthreads();  // s_page is rewritten for the next token
    }
    if (advance && threadIdx.x == 0) p.seq_lens[b] = start + count;
}

