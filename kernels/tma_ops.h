// Hopper's asynchronous data movement and warp-specialization primitives: CUDA sm_90a only
// (FA_HAS_WGMMA, wgmma_ops.h), nothing elsewhere. Used by flash_attention_wgmma_ws.h.
//
// - Tensor memory access (TMA): one thread copies a whole box of a tensor (described on the
//   host by a 128-byte tensor map, FaTensorMap) into shared memory, in the 128-byte swizzle
//   that wgmma reads (wgmma_ops.h), zero filling what lies outside the tensor. The copy
//   completes on an mbarrier by the bytes it delivers.
// - mbarriers: 64-bit shared-memory barriers with an arrival count and a transaction count;
//   each completion flips a phase bit. A waiter names the parity of the phase it waits for:
//   on a fresh barrier, parity 1 counts as already complete (the first wait of a producer on
//   an empty slot passes).
// - Named barriers (bar.sync / bar.arrive with an id and a thread count) order warpgroups
//   among themselves without stopping the rest of the block.
// - setmaxnreg moves registers between warpgroups: the producer gives its surplus to the
//   math warpgroups.
#pragma once

#include "compat.h"

// The driver's CUtensorMap: opaque, 128 bytes, 64-byte aligned (cuda.h is not available to
// every compiler of these sources).
struct alignas(64) FaTensorMap {
    unsigned long long opaque[16];
};

#if FA_HAS_WGMMA

FA_DEVICE void fa_mbar_init(unsigned int bar, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialized barriers visible to the async proxy (TMA) and the other threads (with
// the block barrier that follows).
FA_DEVICE void fa_mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// One arrival that also announces `bytes` of TMA transactions for the current phase.
FA_DEVICE void fa_mbar_arrive_tx(unsigned int bar, unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// One arrival for the whole (converged) warp, from one elected lane: a predicated instruction,
// not a branch, so no divergent path opens while a warpgroup MMA is in flight.
FA_DEVICE void fa_mbar_arrive_warp(unsigned int bar) {
    asm volatile("{\n.reg .pred e;\nelect.sync _|e, 0xffffffff;\n@e mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}
// One plain arrival (no transaction bytes): completes a phase whose data a thread wrote.
FA_DEVICE void fa_mbar_arrive(unsigned int bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed.
FA_DEVICE void fa_mbar_wait(unsigned int bar, unsigned int parity) {
    unsigned int done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// A 4-D box of `map` at element coordinates (c0 innermost .. c3) into shared memory at
// `dst`, completing on barrier `bar`.
FA_DEVICE void fa_tma_load_4d(unsigned int dst, const FaTensorMap* map, int c0, int c1, int c2, int c3,
                              unsigned int bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
        "%5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<fa_u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
// 16 zero bytes at shared-memory address `dst`.
FA_DEVICE void fa_st_shared_zero16(unsigned int dst) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0u) : "memory");
}
FA_DEVICE void fa_tma_prefetch_map(const FaTensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<fa_u64>(map)) : "memory");
}

FA_DEVICE void fa_named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
FA_DEVICE void fa_named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <int N> FA_DEVICE void fa_setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> FA_DEVICE void fa_setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }

#endif  // FA_HAS_WGMMA
