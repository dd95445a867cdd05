// Tensor-core building blocks shared by the flash and decode kernels: CUDA sm_80 and newer
// (FA_HAS_MMA 1), nothing elsewhere. Fragment layouts are described in
// flash_attention_mma.h.
#pragma once

#include "compat.h"

#if FA_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define FA_HAS_MMA 1

FA_DEVICE unsigned int fa_smem_u32(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}
FA_DEVICE void fa_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> FA_DEVICE void fa_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
FA_DEVICE void fa_ldsm_x4(unsigned int addr, unsigned int (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
FA_DEVICE void fa_ldsm_x4_trans(unsigned int addr, unsigned int (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <typename T> struct FaMma;
template <> struct FaMma<fa_f16> {
    FA_DEVICE static void mma(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                              unsigned int b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // lo in bits 0-15, hi in bits 16-31, round to nearest even.
    FA_DEVICE static unsigned int pack(float lo, float hi) {
        unsigned int r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct FaMma<fa_bf16> {
    FA_DEVICE static void mma(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                              unsigned int b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    FA_DEVICE static unsigned int pack(float lo, float hi) {
        unsigned int r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

// A tile of probabilities in the accumulator layout (2 * KP n-tiles of 8 columns) as the KP
// A fragments (m16k16) of the product with V: n-tiles 2kk and 2kk + 1 make k-step kk.
template <typename T, int KP>
FA_DEVICE void fa_mma_pack_p(unsigned int (&pf)[KP][4], const float (&s)[2 * KP][4]) {
#pragma unroll
    for (int kk = 0; kk < KP; ++kk) {
        pf[kk][0] = FaMma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
        pf[kk][1] = FaMma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
        pf[kk][2] = FaMma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pf[kk][3] = FaMma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

#else
#define FA_HAS_MMA 0
#endif
