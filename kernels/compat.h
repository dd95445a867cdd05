// Vendor compatibility layer: the only place where HIP (AMD) and CUDA differ.
// Self-contained for NVIDIA: NVRTC compiles these sources with no include path, so no
// toolkit header is named on that side. On AMD only hip_runtime.h is needed; it is included
// explicitly because not every hipcc pre-includes it (Debian's ROCm 5.2 does not).
#pragma once

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIP_PLATFORM_HCC__) || \
    (defined(__HIPCC__) && !defined(__CUDACC__))
#define FA_HIP 1
#define FA_CUDA 0
#include <hip/hip_runtime.h>
#elif defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FA_HIP 0
#define FA_CUDA 1
#else
#error "compat.h: compile with hipcc (AMD) or NVRTC/nvcc (NVIDIA)"
#endif

typedef long long fa_i64;
typedef unsigned long long fa_u64;

#define FA_DEVICE __device__ __forceinline__
#define FA_KERNEL extern "C" __global__
#define FA_LAUNCH_BOUNDS(n) __launch_bounds__(n)
// The occupancy hint only exists on CUDA; AMD's second argument means something else.
#if FA_CUDA
#define FA_LAUNCH_BOUNDS_MIN(n, min_blocks) __launch_bounds__(n, min_blocks)
#else
#define FA_LAUNCH_BOUNDS_MIN(n, min_blocks) __launch_bounds__(n)
#endif

#define fa_syncthreads() __syncthreads()
#define FA_DYNAMIC_SMEM(name) extern __shared__ __attribute__((aligned(16))) unsigned char name[]

// Wavefront width. Kernels never depend on it for correctness (shuffles use width <= 32);
// it is only used to size per-warp scratch.
#if FA_CUDA
#define FA_WARP_SIZE 32
#elif defined(__AMDGCN_WAVEFRONT_SIZE)
#define FA_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define FA_WARP_SIZE 64
#endif

// CUDA sm_80+ can stream tiles into shared memory without staging them in registers.
#if FA_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define FA_HAS_CP_ASYNC 1
#else
#define FA_HAS_CP_ASYNC 0
#endif

// Own vector types: identical layout and alignment on both vendors, so one
// reinterpret_cast gives one 16-byte (or 8-byte) memory instruction.
struct __attribute__((aligned(16))) fa_float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) fa_float2 { float x, y; };
struct __attribute__((aligned(16))) fa_u32x4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(8))) fa_u32x2 { unsigned int x, y; };

FA_DEVICE float fa_bits_to_float(unsigned int u) { return __uint_as_float(u); }
FA_DEVICE unsigned int fa_float_to_bits(float f) { return __float_as_uint(f); }

// Kernels test values against -inf (fully masked rows): never build them with
// --use_fast_math / -ffast-math, whose finite-math assumption may fold those tests away.
#define FA_NEG_INF (__uint_as_float(0xff800000u))
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

// Scores of keys an additive mask leaves in, in the log2 domain: x + m * log2(e). A mask value
// of -inf removes the key whatever x holds (so NaN or inf in a removed key's K cannot reach
// the row, the same as the causal cut); finite values, however negative, are added as in
// f32 torch (-FLT_MAX on every key of a row gives its plain average), clamped first so that
// m * log2(e) cannot overflow to -inf. NaN in the mask stays NaN.
#define FA_MASK_FLOOR (-2.3e38f)  // -FLT_MAX / log2(e) = -2.3587e38, less the scores' room
FA_DEVICE float fa_mask_log2(float x, float m) {
    if (m == FA_NEG_INF) return FA_NEG_INF;
    return fmaf(m < FA_MASK_FLOOR ? FA_MASK_FLOOR : m, FA_LOG2E, x);
}

// ---------------------------------------------------------------- 16-bit storage types
struct fa_f16 {
    unsigned short bits;
    FA_DEVICE float to_float() const {
#if FA_CUDA
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
        return f;
#else
        return static_cast<float>(__builtin_bit_cast(_Float16, bits));
#endif
    }
    FA_DEVICE static fa_f16 from_float(float f) {
        fa_f16 r;
#if FA_CUDA
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
#else
        r.bits = __builtin_bit_cast(unsigned short, static_cast<_Float16>(f));
#endif
        return r;
    }
};

struct fa_bf16 {
    unsigned short bits;
    FA_DEVICE float to_float() const { return __uint_as_float(((unsigned int)bits) << 16); }
    FA_DEVICE static fa_bf16 from_float(float f) {
        unsigned int u = __float_as_uint(f);
        fa_bf16 r;
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            r.bits = (unsigned short)((u >> 16) | 0x0040u);  // keep NaN a (quiet) NaN
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
            r.bits = (unsigned short)(u >> 16);
        }
        return r;
    }
};

// Conversions of a raw 16-bit pattern, used when a 16-byte chunk holds 8 elements.
template <typename T> FA_DEVICE float fa_half_bits_to_float(unsigned int bits16);
template <> FA_DEVICE float fa_half_bits_to_float<fa_f16>(unsigned int b) {
    fa_f16 h; h.bits = (unsigned short)b; return h.to_float();
}
template <> FA_DEVICE float fa_half_bits_to_float<fa_bf16>(unsigned int b) {
    fa_bf16 h; h.bits = (unsigned short)b; return h.to_float();
}

// ---------------------------------------------------------------- generic element access
template <typename T> struct fa_elem;
template <> struct fa_elem<float> { static constexpr bool is_f32 = true; };
template <> struct fa_elem<fa_f16> { static constexpr bool is_f32 = false; };
template <> struct fa_elem<fa_bf16> { static constexpr bool is_f32 = false; };

template <typename T> FA_DEVICE float fa_to_float(T v) { return v.to_float(); }
template <> FA_DEVICE float fa_to_float<float>(float v) { return v; }
template <typename T> FA_DEVICE T fa_from_float(float f) { return T::from_float(f); }
template <> FA_DEVICE float fa_from_float<float>(float f) { return f; }

template <typename T> FA_DEVICE float fa_load_f32(const T* p) { return fa_to_float<T>(*p); }
template <typename T> FA_DEVICE void fa_store(T* p, float f) { *p = fa_from_float<T>(f); }

// ---------------------------------------------------------------- warp shuffles / math
// width <= 32 keeps the same lane groups on wave32 and wave64 hardware.
FA_DEVICE float fa_shfl_xor(float v, int lane_mask, int width) {
#if FA_CUDA
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
#else
    return __shfl_xor(v, lane_mask, width);
#endif
}

// Orders this thread's earlier memory operations (and, after a block barrier, the block's)
// before its later ones at device scope: the release before and the acquire after an
// atomic flag. Lighter than __threadfence's sequentially consistent fence on CUDA.
FA_DEVICE void fa_fence_acq_rel_device() {
#if FA_CUDA
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
#else
    __threadfence();
#endif
}

// Atomic add at device scope that is both a release of this thread's earlier writes (and,
// after a block barrier, the block's) and an acquire of what other releasers wrote: one
// instruction where a fence, the atomic and a second fence would wait on memory twice.
FA_DEVICE int fa_atomic_add_acq_rel_device(int* p, int v) {
#if FA_CUDA
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
#else
    return __hip_atomic_fetch_add(p, v, __ATOMIC_ACQ_REL, __HIP_MEMORY_SCOPE_AGENT);
#endif
}

// Value of lane `src` of this lane's group of `width` lanes.
FA_DEVICE float fa_shfl(float v, int src, int width) {
#if FA_CUDA
    return __shfl_sync(0xffffffffu, v, src, width);
#else
    return __shfl(v, src, width);
#endif
}

// Fast 2^x; exp2(-inf) is +0 on both vendors, which the softmax relies on.
FA_DEVICE float fa_exp2f(float x) {
#if FA_CUDA
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);
#endif
}

FA_DEVICE float fa_logf(float x) { return logf(x); }

// ---------------------------------------------------------------- async copy (CUDA sm_80+)
#if FA_HAS_CP_ASYNC
// Copies 16 bytes, or writes 16 zero bytes when !valid (src is then not read).
FA_DEVICE void fa_cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
    unsigned int dst = (unsigned int)__cvta_generic_to_shared(smem_dst);
    int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
                 "r"(src_bytes)
                 : "memory");
}
FA_DEVICE void fa_cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}
#endif
