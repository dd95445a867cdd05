// Device-time probe of the warp-specialized Hopper flash kernel (kernels/flash_attention_wgmma_ws.h)
// against the single-role one (flash_attention_wgmma.h), outside the library: both compiled
// by nvcc for sm_90a and launched directly, bf16, [B, S, H, D] layout, the TMA tensor maps
// encoded here through the driver entry point. It first checks each configuration on small
// ragged shapes (causal, GQA, head_dim below its bucket, additive mask) against an f64 host
// reference (output and lse), then times both kernels at B*S = 16384, H = 2048/D (the
// prefill bench shapes) and prints TFLOP/s. Args: [D ...] (0: checks only).
#include "../kernels/compat.h"
#include "../kernels/attention_params.h"
#include "../kernels/flash_entry.h"
#include "probe_host.h"
#include "../kernels/flash_attention_wgmma_ws.h"
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>


template <int HD, int BM, int BN, int TH, int SM, int MODE>
__global__ void __launch_bounds__(TH, 1) k_wg(AttnParams p) {
#ifdef __CUDA_ARCH__
    fa_wgmma_forward<fa_bf16, HD, BM, BN, TH, SM, MODE>(p);
#endif
}
template <int HD, int BN, int NC, int ST, int MODE>
__global__ void __launch_bounds__(128 * (NC + 1), 1) k_ws(const __grid_constant__ FaWsParams P) {
#ifdef __CUDA_ARCH__
    fa_wgmma_ws_forward<fa_bf16, HD, BN, NC, ST, MODE>(P);
#endif
}


struct Prob { int B, H, HKV, Sq, Sk, D; bool causal; bool mask; };

AttnParams make(const Prob& pr, void* q, void* k, void* v, void* o, float* lse, float* mask) {
    AttnParams p; memset(&p, 0, sizeof p);
    p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse; p.mask = mask;
    p.q_ss = (fa_i64)pr.H * pr.D; p.q_sh = pr.D; p.q_sb = (fa_i64)pr.Sq * pr.H * pr.D;
    p.o_ss = p.q_ss; p.o_sh = p.q_sh; p.o_sb = p.q_sb;
    p.k_ss = (fa_i64)pr.HKV * pr.D; p.k_sh = pr.D; p.k_sb = (fa_i64)pr.Sk * pr.HKV * pr.D;
    p.v_ss = p.k_ss; p.v_sh = p.k_sh; p.v_sb = p.k_sb;
    if (mask) { p.m_sq = pr.Sk; p.m_sh = (fa_i64)pr.Sq * pr.Sk; p.m_sb = (fa_i64)pr.H * pr.Sq * pr.Sk; }
    p.batch = pr.B; p.num_heads = pr.H; p.num_kv_heads = pr.HKV; p.seq_q = pr.Sq; p.seq_k = pr.Sk;
    p.head_dim = pr.D; p.scale = 1.0f / sqrtf((float)pr.D); p.causal = pr.causal;
    return p;
}

static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
static void map4(FaTensorMap* m, const void* base, int d, int s, int h, int b, long ss, long sh, long sb, int box_rows) {
    cuuint64_t dims[4] = {(cuuint64_t)d, (cuuint64_t)s, (cuuint64_t)h, (cuuint64_t)b};
    cuuint64_t strides[3] = {(cuuint64_t)ss * 2, (cuuint64_t)sh * 2, (cuuint64_t)sb * 2};
    cuuint32_t box[4] = {64, (cuuint32_t)box_rows, 1, 1};
    cuuint32_t es[4] = {1, 1, 1, 1};
    CUresult r = encode(reinterpret_cast<CUtensorMap*>(m), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void*>(base), dims, strides, box, es,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("cuTensorMapEncodeTiled failed: %d\n", (int)r); exit(1); }
}
static FaWsParams ws_params(const AttnParams& p, int bm, int bn) {
    FaWsParams P; memset(&P, 0, sizeof P);
    P.p = p;
    map4(&P.tq, p.q, p.head_dim, p.seq_q, p.num_heads, p.batch, p.q_ss, p.q_sh, p.q_sb, bm);
    map4(&P.tk, p.k, p.head_dim, p.seq_k, p.num_kv_heads, p.batch, p.k_ss, p.k_sh, p.k_sb, bn);
    map4(&P.tv, p.v, p.head_dim, p.seq_k, p.num_kv_heads, p.batch, p.v_ss, p.v_sh, p.v_sb, bn);
    return P;
}

// A kernel and how to launch it.
struct Kern {
    const void* fn; int bm, bn, th, smem; bool ws;
};
template <int HD, int BM, int BN, int TH, int MODE> Kern wg() {
    constexpr int sm = FaWgShape<HD, BM, BN, TH>::SMEM_BYTES;
    return Kern{(const void*)k_wg<HD, BM, BN, TH, sm, MODE>, BM, BN, TH, sm, false};
}
template <int HD, int BN, int NC, int ST, int MODE> Kern ws() {
    typedef FaWsShape<HD, BN, NC, ST> S;
    return Kern{(const void*)k_ws<HD, BN, NC, ST, MODE>, S::BM, BN, S::THREADS, S::SMEM_BYTES, true};
}

float launch(const Kern& k, const AttnParams& p, int reps) {
    CK(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem));
    dim3 grid((p.seq_q + k.bm - 1) / k.bm, p.num_heads, p.batch);
    FaWsParams P;
    AttnParams pc = p;
    void* args[1];
    if (k.ws) { P = ws_params(p, k.bm, k.bn); args[0] = &P; } else args[0] = &pc;
    CK(cudaLaunchKernel(k.fn, grid, dim3(k.th), args, k.smem, 0));
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    if (reps == 0) return 0;
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < reps; ++i) CK(cudaLaunchKernel(k.fn, grid, dim3(k.th), args, k.smem, 0));
    cudaEventRecord(b); CK(cudaEventSynchronize(b));
    float ms; cudaEventElapsedTime(&ms, a, b);
    return ms / reps;
}

static int fails = 0;
void check(const char* name, const Kern& kern, Prob pr) {
    size_t nq = (size_t)pr.B * pr.Sq * pr.H * pr.D, nk = (size_t)pr.B * pr.Sk * pr.HKV * pr.D;
    size_t nm = pr.mask ? (size_t)pr.B * pr.H * pr.Sq * pr.Sk : 0;
    std::vector<unsigned short> hq(nq), hk(nk), hv(nk), ho(nq);
    std::vector<float> hm(nm);
    for (auto& x : hq) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    for (auto& x : hk) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    for (auto& x : hv) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    for (auto& x : hm) x = (rand() % 7 == 0) ? -INFINITY : (rand() / (float)RAND_MAX - 0.5f) * 3;
    void *q, *k, *v, *o; float *lse, *mask = nullptr;
    CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2)); CK(cudaMalloc(&o, nq * 2));
    CK(cudaMalloc(&lse, (size_t)pr.B * pr.H * pr.Sq * 4));
    if (nm) { CK(cudaMalloc(&mask, nm * 4)); CK(cudaMemcpy(mask, hm.data(), nm * 4, cudaMemcpyHostToDevice)); }
    CK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(o, 0xff, nq * 2));
    AttnParams p = make(pr, q, k, v, o, lse, mask);
    launch(kern, p, 0);
    std::vector<float> hl((size_t)pr.B * pr.H * pr.Sq);
    CK(cudaMemcpy(ho.data(), o, nq * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hl.data(), lse, hl.size() * 4, cudaMemcpyDeviceToHost));
    const RefErr re = reference_error(pr.B, pr.H, pr.HKV, pr.Sq, pr.Sk, pr.D, pr.causal, p.scale, hq, hk, hv,
                                      nm ? &hm : nullptr, ho, hl);
    const double maxe = re.out, maxl = re.lse;
    const bool ok = maxe < 2e-2 && maxl < 1e-3;
    fails += !ok;
    printf("check %-24s B=%d H=%d Hkv=%d Sq=%d Sk=%d D=%d causal=%d mask=%d  max|err| %.3e  lse %.3e  %s\n", name, pr.B, pr.H,
           pr.HKV, pr.Sq, pr.Sk, pr.D, pr.causal, pr.mask, maxe, maxl, ok ? "ok" : "FAIL");
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse); if (mask) cudaFree(mask);
}

struct Bufs { void *q, *k, *v, *o; };
void timeit(const char* name, const Kern& k, const Prob& pr, const Bufs& bf, double flop) {
    AttnParams p = make(pr, bf.q, bf.k, bf.v, bf.o, nullptr, nullptr);
    launch(k, p, 3);
    float ms = launch(k, p, 10);
    printf("  %-28s %8.3f ms  %6.1f TFLOP/s\n", name, ms, flop / ms / 1e9);
}

template <int MODE> void bench(int D, int S) {
    Prob pr{16384 / S, 2048 / D, 2048 / D, S, S, D, MODE == 1, false};
    size_t n = (size_t)pr.B * S * pr.H * D;
    std::vector<unsigned short> h(n);
    for (auto& x : h) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    Bufs bf;
    CK(cudaMalloc(&bf.q, n * 2)); CK(cudaMalloc(&bf.k, n * 2)); CK(cudaMalloc(&bf.v, n * 2)); CK(cudaMalloc(&bf.o, n * 2));
    CK(cudaMemcpy(bf.q, h.data(), n * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bf.k, h.data() + 7, (n - 7) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bf.v, h.data() + 13, (n - 13) * 2, cudaMemcpyHostToDevice));
    double flop = 4.0 * pr.B * pr.H * (double)S * S * D * (MODE == 1 ? 0.5 : 1.0);
    printf("D=%d S=%d B=%d H=%d causal=%d\n", D, S, pr.B, pr.H, MODE);
    if (D == 64) {
        timeit("wgmma 128x128 t256", wg<64, 128, 128, 256, MODE>(), pr, bf, flop);
        timeit("ws 128x128 nc2", ws<64, 128, 2, 2, MODE>(), pr, bf, flop);
        timeit("ws 192x128 nc3", ws<64, 128, 3, 2, MODE>(), pr, bf, flop);
        timeit("ws 128x128 nc2 st3", ws<64, 128, 2, 3, MODE>(), pr, bf, flop);
    } else if (D == 256) {
        timeit("wgmma 128x64 t256", wg<256, 128, 64, 256, MODE>(), pr, bf, flop);
        timeit("ws 128x64 nc2", ws<256, 64, 2, 2, MODE>(), pr, bf, flop);
    } else {
        timeit("wgmma 128x128 t256", wg<128, 128, 128, 256, MODE>(), pr, bf, flop);
        timeit("ws 128x128 nc2", ws<128, 128, 2, 2, MODE>(), pr, bf, flop);
        timeit("ws 128x192 nc2", ws<128, 192, 2, 2, MODE>(), pr, bf, flop);
        timeit("ws 128x96 nc2 st3", ws<128, 96, 2, 3, MODE>(), pr, bf, flop);
    }
    cudaFree(bf.q); cudaFree(bf.k); cudaFree(bf.v); cudaFree(bf.o);
}

int main(int argc, char** argv) {
    cudaDriverEntryPointQueryResult qr;
    CK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", (void**)&encode, cudaEnableDefault, &qr));
    srand(3);
    check("ws128 nc", ws<128, 128, 2, 2, 0>(), Prob{1, 3, 3, 129, 77, 128, false, false});
    check("ws128 causal gqa", ws<128, 128, 2, 2, 1>(), Prob{2, 4, 1, 300, 500, 128, true, false});
    check("ws128 causal sq>sk", ws<128, 128, 2, 2, 1>(), Prob{1, 2, 2, 300, 200, 128, true, false});
    check("ws128 hd72", ws<128, 128, 2, 2, 0>(), Prob{1, 2, 2, 64, 200, 72, false, false});
    check("ws128 mask", ws<128, 128, 2, 2, 2>(), Prob{1, 2, 2, 150, 260, 128, true, true});
    check("ws128 long", ws<128, 128, 2, 2, 1>(), Prob{1, 2, 1, 1100, 1300, 128, true, false});
    check("ws128x192", ws<128, 192, 2, 2, 1>(), Prob{1, 2, 1, 333, 555, 128, true, false});
    check("ws128x96 st3", ws<128, 96, 2, 3, 1>(), Prob{1, 2, 1, 333, 555, 128, true, false});
    check("ws64 nc3 causal", ws<64, 128, 3, 2, 1>(), Prob{1, 2, 2, 333, 333, 64, true, false});
    check("ws64 nc2 causal", ws<64, 128, 2, 2, 1>(), Prob{1, 2, 2, 333, 700, 64, true, false});
    check("ws64 st3", ws<64, 128, 2, 3, 0>(), Prob{2, 2, 2, 333, 900, 64, false, false});
    check("ws256 causal", ws<256, 64, 2, 2, 1>(), Prob{2, 4, 2, 300, 333, 256, true, false});
    check("ws256 hd200", ws<256, 64, 2, 2, 1>(), Prob{1, 2, 2, 130, 130, 200, true, false});
    check("ws192 causal", ws<192, 96, 2, 2, 1>(), Prob{2, 3, 1, 257, 385, 192, true, false});
    printf("checks: %d failed\n", fails);
    if (argc > 1 && atoi(argv[1]) == 0) return fails != 0;
    std::vector<int> dims;
    for (int i = 1; i < argc; ++i) dims.push_back(atoi(argv[i]));
    if (dims.empty()) dims = {128, 64, 256};
    for (int D : dims)
        for (int S : {512, 2048, 8192}) { bench<0>(D, S); bench<1>(D, S); }
    return fails != 0;
}
