// Device-time probe of the Hopper (wgmma) flash kernel against the mma.sync one, outside the
// library: kernels/flash_attention_wgmma.h and flash_attention_mma.h compiled by nvcc for
// sm_90a and launched directly, bf16, [B, S, H, D] layout. It first checks several tile
// configurations on small ragged shapes (causal, GQA, head_dim below its bucket) against an
// f64 host reference (output and lse), then times each configuration at B*S = 16384,
// H = 2048/D (the prefill bench shapes) and prints TFLOP/s and the largest difference to the
// mma.sync output. Build and run on the GPU machine with scripts/wgmma-probe.sh [D ...]
// (no argument: D = 256 and 128; otherwise each D of 64, 192, 256).
#include "../kernels/compat.h"
#include "../kernels/attention_params.h"
#include "../kernels/flash_entry.h"
#include "probe_host.h"
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <algorithm>


template <int HD, int BM, int BN, int TH, int SM, int MODE>
__global__ void __launch_bounds__(TH, 1) k_wg(AttnParams p) {
#ifdef __CUDA_ARCH__
    fa_wgmma_forward<fa_bf16, HD, BM, BN, TH, SM, MODE>(p);
#endif
}
template <int HD, int BM, int BN, int TH, int SM, int MODE>
__global__ void __launch_bounds__(TH, 1) k_mma(AttnParams p) {
#ifdef __CUDA_ARCH__
    fa_mma_forward<fa_bf16, HD, BM, BN, TH, SM, MODE>(p);
#endif
}


struct Prob { int B, H, HKV, Sq, Sk, D; bool causal; };

AttnParams make(const Prob& pr, void* q, void* k, void* v, void* o, float* lse) {
    AttnParams p; memset(&p, 0, sizeof p);
    p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse;
    p.q_ss = (fa_i64)pr.H * pr.D; p.q_sh = pr.D; p.q_sb = (fa_i64)pr.Sq * pr.H * pr.D;
    p.o_ss = p.q_ss; p.o_sh = p.q_sh; p.o_sb = p.q_sb;
    p.k_ss = (fa_i64)pr.HKV * pr.D; p.k_sh = pr.D; p.k_sb = (fa_i64)pr.Sk * pr.HKV * pr.D;
    p.v_ss = p.k_ss; p.v_sh = p.k_sh; p.v_sb = p.k_sb;
    p.batch = pr.B; p.num_heads = pr.H; p.num_kv_heads = pr.HKV; p.seq_q = pr.Sq; p.seq_k = pr.Sk;
    p.head_dim = pr.D; p.scale = 1.0f / sqrtf((float)pr.D); p.causal = pr.causal;
    return p;
}

template <typename K>
float launch(K kern, int bm, int th, int smem, const AttnParams& p, int reps) {
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    dim3 grid((p.seq_q + bm - 1) / bm, p.num_heads, p.batch);
    kern<<<grid, th, smem>>>(p);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    if (reps == 0) return 0;
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < reps; ++i) kern<<<grid, th, smem>>>(p);
    cudaEventRecord(b); CK(cudaEventSynchronize(b));
    float ms; cudaEventElapsedTime(&ms, a, b);
    return ms / reps;
}

// Runs kernel `kern` on `pr` with random data against an f64 host reference.
template <typename K>
void check(const char* name, K kern, int bm, int th, int smem, Prob pr) {
    size_t nq = (size_t)pr.B * pr.Sq * pr.H * pr.D, nk = (size_t)pr.B * pr.Sk * pr.HKV * pr.D;
    std::vector<unsigned short> hq(nq), hk(nk), hv(nk), ho(nq);
    for (auto& x : hq) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    for (auto& x : hk) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    for (auto& x : hv) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    void *q, *k, *v, *o; float* lse;
    CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2)); CK(cudaMalloc(&o, nq * 2));
    CK(cudaMalloc(&lse, (size_t)pr.B * pr.H * pr.Sq * 4));
    CK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(o, 0xff, nq * 2));
    AttnParams p = make(pr, q, k, v, o, lse);
    launch(kern, bm, th, smem, p, 0);
    std::vector<float> hl((size_t)pr.B * pr.H * pr.Sq);
    CK(cudaMemcpy(ho.data(), o, nq * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hl.data(), lse, hl.size() * 4, cudaMemcpyDeviceToHost));
    const RefErr re = reference_error(pr.B, pr.H, pr.HKV, pr.Sq, pr.Sk, pr.D, pr.causal, p.scale, hq, hk, hv,
                                      nullptr, ho, hl);
    const double maxe = re.out, maxl = re.lse;
    printf("check %-28s B=%d H=%d Hkv=%d Sq=%d Sk=%d D=%d causal=%d  max|err| %.3e  lse %.3e  %s\n", name, pr.B, pr.H,
           pr.HKV, pr.Sq, pr.Sk, pr.D, pr.causal, maxe, maxl, (maxe < 2e-2 && maxl < 1e-3) ? "ok" : "FAIL");
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse);
}

struct Bufs { void *q, *k, *v, *o, *o2; };

template <typename K>
void timeit(const char* name, K kern, int bm, int th, int smem, const Prob& pr, const Bufs& bf, void* out, double flop) {
    AttnParams p = make(pr, bf.q, bf.k, bf.v, out, nullptr);
    float ms = launch(kern, bm, th, smem, p, 10);
    printf("  %-34s %8.3f ms  %6.1f TFLOP/s\n", name, ms, flop / ms / 1e9);
}

template <int HD, int BM, int BN, int TH> constexpr int wg_smem() {
    return FaWgShape<HD, BM, BN, TH>::SMEM_BYTES > FaSplitShape<HD, TH>::SMEM_BYTES ? FaWgShape<HD, BM, BN, TH>::SMEM_BYTES : FaSplitShape<HD, TH>::SMEM_BYTES;
}
#define WG(HD, BM, BN, TH, MODE) k_wg<HD, BM, BN, TH, wg_smem<HD, BM, BN, TH>(), MODE>, BM, TH, wg_smem<HD, BM, BN, TH>()
#define MMA(HD, BM, BN, TH, SMEM, MODE) k_mma<HD, BM, BN, TH, SMEM, MODE>, BM, TH, SMEM

template <int MODE>
void bench(int D, int S) {
    Prob pr{16384 / S, 2048 / D, 2048 / D, S, S, D, MODE == 1};
    size_t n = (size_t)pr.B * S * pr.H * D;
    std::vector<unsigned short> h(n);
    for (auto& x : h) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 2);
    Bufs bf;
    CK(cudaMalloc(&bf.q, n * 2)); CK(cudaMalloc(&bf.k, n * 2)); CK(cudaMalloc(&bf.v, n * 2));
    CK(cudaMalloc(&bf.o, n * 2)); CK(cudaMalloc(&bf.o2, n * 2));
    CK(cudaMemcpy(bf.q, h.data(), n * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bf.k, h.data() + 7, (n - 7) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bf.v, h.data() + 13, (n - 13) * 2, cudaMemcpyHostToDevice));
    double flop = 4.0 * pr.B * pr.H * (double)S * S * D * (MODE == 1 ? 0.5 : 1.0);
    printf("D=%d S=%d B=%d H=%d causal=%d\n", D, S, pr.B, pr.H, MODE);
    if (D == 64) {
        timeit("mma 128x64 t128", MMA(64, 128, 64, 128, 55296, MODE), pr, bf, bf.o, flop);
        timeit("wgmma 128x64 t256", WG(64, 128, 64, 256, MODE), pr, bf, bf.o2, flop);
        timeit("wgmma 192x128 t384", WG(64, 192, 128, 384, MODE), pr, bf, bf.o2, flop);
        timeit("wgmma 128x128 t256", WG(64, 128, 128, 256, MODE), pr, bf, bf.o2, flop);
    } else if (D == 192) {
        timeit("mma 64x32 t128", MMA(192, 64, 32, 128, 79360, MODE), pr, bf, bf.o, flop);
        timeit("wgmma 128x96 t256", WG(192, 128, 96, 256, MODE), pr, bf, bf.o2, flop);
        timeit("wgmma 128x64 t256", WG(192, 128, 64, 256, MODE), pr, bf, bf.o2, flop);
    } else if (D == 256) {
        timeit("mma 64x32 t128", MMA(256, 64, 32, 128, 103936, MODE), pr, bf, bf.o, flop);
        timeit("wgmma 128x64 t256", WG(256, 128, 64, 256, MODE), pr, bf, bf.o2, flop);
        timeit("wgmma 128x32 t256", WG(256, 128, 32, 256, MODE), pr, bf, bf.o2, flop);
        timeit("wgmma 64x64 t128", WG(256, 64, 64, 128, MODE), pr, bf, bf.o2, flop);
    } else {
        timeit("mma 128x64 t128", MMA(128, 128, 64, 128, 104448, MODE), pr, bf, bf.o, flop);
        timeit("wgmma 128x128 t256", WG(128, 128, 128, 256, MODE), pr, bf, bf.o2, flop);
        timeit("wgmma 128x64 t256", WG(128, 128, 64, 256, MODE), pr, bf, bf.o2, flop);
        timeit("wgmma 192x128 t384", WG(128, 192, 128, 384, MODE), pr, bf, bf.o2, flop);
    }
    // last wgmma config vs mma output
    std::vector<unsigned short> a(n), c(n);
    CK(cudaMemcpy(a.data(), bf.o, n * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(c.data(), bf.o2, n * 2, cudaMemcpyDeviceToHost));
    double md = 0; for (size_t i = 0; i < n; ++i) md = std::max(md, (double)std::fabs(bf2f(a[i]) - bf2f(c[i])));
    printf("  max |wgmma - mma| %.3e\n", md);
    cudaFree(bf.q); cudaFree(bf.k); cudaFree(bf.v); cudaFree(bf.o); cudaFree(bf.o2);
}

int main(int argc, char** argv) {
    srand(3);
    check("wg256 128x64 nc", WG(256, 128, 64, 256, 0), Prob{1, 2, 1, 200, 333, 256, false});
    check("wg256 128x64 causal", WG(256, 128, 64, 256, 1), Prob{2, 4, 2, 300, 333, 256, true});
    check("wg256 128x64 hd200", WG(256, 128, 64, 256, 1), Prob{1, 2, 2, 130, 130, 200, true});
    check("wg256 128x32 causal", WG(256, 128, 32, 256, 1), Prob{1, 2, 1, 257, 257, 256, true});
    check("wg256 64x64 nc", WG(256, 64, 64, 128, 0), Prob{1, 2, 1, 100, 190, 256, false});
    check("wg128 128x128 causal", WG(128, 128, 128, 256, 1), Prob{2, 4, 1, 300, 500, 128, true});
    check("wg128 128x64 nc", WG(128, 128, 64, 256, 0), Prob{1, 3, 3, 129, 77, 128, false});
    check("wg128 128x128 hd72", WG(128, 128, 128, 256, 0), Prob{1, 2, 2, 64, 200, 72, false});
    check("wg64 128x128 causal", WG(64, 128, 128, 256, 1), Prob{1, 2, 2, 333, 333, 64, true});
    check("wg192 128x64 causal", WG(192, 128, 64, 256, 1), Prob{1, 2, 2, 200, 200, 192, true});
    check("mma256 ref", MMA(256, 64, 32, 128, 103936, 1), Prob{2, 4, 2, 300, 333, 256, true});
    if (argc > 1 && atoi(argv[1]) == 0) return 0;
    const int only = argc > 1 ? atoi(argv[1]) : 1;
    if (only == 1) {
        for (int S : {512, 2048, 8192}) { bench<0>(256, S); bench<1>(256, S); }
        for (int S : {2048, 8192}) { bench<0>(128, S); bench<1>(128, S); }
    } else {
        for (int S : {512, 2048, 8192}) { bench<0>(only, S); bench<1>(only, S); }
    }
    return 0;
}
