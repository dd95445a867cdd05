// Small device tensor operations. All kernels: block 256, grid x = min(ceil(numel/256), 4096);
// each thread strides over the elements, so any grid size is correct.
//   copy_strided_b2 / copy_strided_b4 (CopyParams): dst[idx] = src[idx] bit for bit, for 2- or
//       4-byte elements, through each side's strides (e.g. appending into a KV-cache view).
//   fill_b2 (FillParamsB2) / fill_b4 (FillParams): contiguous fill with a bit pattern.
#include "compat.h"
#include "attention_params.h"

// Unravels a row-major index of shape[0..3] and applies both stride sets. The 32-bit path
// avoids 64-bit division (a long instruction sequence) whenever the sizes allow it.
template <typename U>
FA_DEVICE void fa_copy_strided(const CopyParams& p) {
    const U* src = static_cast<const U*>(p.src);
    U* dst = static_cast<U*>(p.dst);
    const fa_i64 n = p.numel;
    const fa_i64 step = (fa_i64)gridDim.x * blockDim.x;
    fa_i64 idx = (fa_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (n < 2147483647LL) {
        const unsigned int s1 = (unsigned int)p.shape[1], s2 = (unsigned int)p.shape[2],
                           s3 = (unsigned int)p.shape[3];
        for (; idx < n; idx += step) {
            unsigned int r = (unsigned int)idx;
            const unsigned int i3 = r % s3; r /= s3;
            const unsigned int i2 = r % s2; r /= s2;
            const unsigned int i1 = r % s1;
            const unsigned int i0 = r / s1;
            const fa_i64 so = (fa_i64)i0 * p.src_strides[0] + (fa_i64)i1 * p.src_strides[1] +
                              (fa_i64)i2 * p.src_strides[2] + (fa_i64)i3 * p.src_strides[3];
            const fa_i64 d = (fa_i64)i0 * p.dst_strides[0] + (fa_i64)i1 * p.dst_strides[1] +
                             (fa_i64)i2 * p.dst_strides[2] + (fa_i64)i3 * p.dst_strides[3];
            dst[d] = src[so];
        }
    } else {
        for (; idx < n; idx += step) {
            fa_i64 r = idx;
            const fa_i64 i3 = r % p.shape[3]; r /= p.shape[3];
            const fa_i64 i2 = r % p.shape[2]; r /= p.shape[2];
            const fa_i64 i1 = r % p.shape[1];
            const fa_i64 i0 = r / p.shape[1];
            const fa_i64 so = i0 * p.src_strides[0] + i1 * p.src_strides[1] + i2 * p.src_strides[2] +
                              i3 * p.src_strides[3];
            const fa_i64 d = i0 * p.dst_strides[0] + i1 * p.dst_strides[1] + i2 * p.dst_strides[2] +
                             i3 * p.dst_strides[3];
            dst[d] = src[so];
        }
    }
}

FA_KERNEL void FA_LAUNCH_BOUNDS(256) copy_strided_b2(CopyParams p) { fa_copy_strided<unsigned short>(p); }
FA_KERNEL void FA_LAUNCH_BOUNDS(256) copy_strided_b4(CopyParams p) { fa_copy_strided<unsigned int>(p); }

FA_KERNEL void FA_LAUNCH_BOUNDS(256) fill_b4(FillParams p) {
    unsigned int* dst = static_cast<unsigned int*>(p.dst);
    const fa_i64 step = (fa_i64)gridDim.x * blockDim.x;
    for (fa_i64 i = (fa_i64)blockIdx.x * blockDim.x + threadIdx.x; i < p.numel; i += step) dst[i] = p.value;
}

FA_KERNEL void FA_LAUNCH_BOUNDS(256) fill_b2(FillParamsB2 p) {
    unsigned short* dst = static_cast<unsigned short*>(p.dst);
    const fa_i64 step = (fa_i64)gridDim.x * blockDim.x;
    for (fa_i64 i = (fa_i64)blockIdx.x * blockDim.x + threadIdx.x; i < p.numel; i += step) dst[i] = p.value;
}
