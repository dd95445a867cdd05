// Appends new tokens' K and V to a device KV cache, contiguous or paged, for the whole
// batch and every KV head in one launch, and advances the per-sequence lengths.
// Grid (batch), 256 threads. A block walks its sequence's new tokens in order, so a page
// is taken from the pool (device-side counter) exactly when a token starts one, and the
// host never has to send a block-table update.
#include "kv_append.h"

template <typename E> FA_DEVICE void kv_append_body(const AppendParams& p) {
    __shared__ fa_i64 s_page;
    kv_append_sequence<E>(p, blockIdx.x, p.seq_lens[blockIdx.x], true, &s_page);
}

FA_KERNEL void FA_LAUNCH_BOUNDS(256) kv_append_b2(AppendParams p) { kv_append_body<unsigned short>(p); }
FA_KERNEL void FA_LAUNCH_BOUNDS(256) kv_append_b4(AppendParams p) { kv_append_body<unsigned int>(p); }
