// Device-time probe of the decode kernel alone (bf16, 32 query / 8 KV heads, D = 128,
// batch 1), outside the library: the kernel source is compiled by nvcc and launched
// directly, so the figures exclude the host API. It prints, per launch:
//   graph   the launch replayed from a CUDA graph of 320 launches (no launch gaps),
//   stream  the same launches queued on a stream (the gap a host loop pays),
// for the decode kernel, a kernel that only reads the same K/V bytes with the same grid (the
// floor for this grid), and an empty kernel; then the decode result's max abs error against
// a host reference. Build and run on the GPU machine with scripts/decode-probe.sh.
// Arguments: cache length, chunks (splits), distinct caches rotated (1: stays in L2).
// -DDEC_PROBE_KERNEL="path" builds another copy of the kernel source (A/B runs).
// -DDEC_PROBE_MARKS: thread 0 of every block records %globaltimer at the kernel's DEC_MARK
// points, and a timeline of one launch is printed (us after the first block starts).
#ifdef DEC_PROBE_MARKS
#define DEC_NMARKS 9
__device__ unsigned long long* g_dec_marks;
#define DEC_MARK(n)                                                                           \
    do {                                                                                      \
        if (threadIdx.x == 0) {                                                               \
            unsigned long long t_;                                                            \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_) :: "memory");                    \
            g_dec_marks[((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * DEC_NMARKS + (n)] = t_; \
        }                                                                                     \
    } while (0)
#endif
#ifdef DEC_PROBE_KERNEL
#include DEC_PROBE_KERNEL
#else
#include "../kernels/flash_decode.hip"
#endif
#include <cstdio>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <cstdlib>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

__global__ void probe_empty(DecodeParams p) {}

// Lower bound: every block reads its chunk of K and V once with 16-byte loads, all issued
// before any is used.
__global__ void __launch_bounds__(256) probe_read(DecodeParams p) {
    const int split = blockIdx.x, kvh = blockIdx.y;
    const fa_u32x4* k = reinterpret_cast<const fa_u32x4*>((const fa_bf16*)p.k + kvh * p.k_sh + (fa_i64)split * p.split_keys * p.k_ss);
    const fa_u32x4* v = reinterpret_cast<const fa_u32x4*>((const fa_bf16*)p.v + kvh * p.v_sh + (fa_i64)split * p.split_keys * p.v_ss);
    const int n = p.split_keys * 16;  // vectors per chunk (D=128 bf16)
    unsigned acc = 0;
    for (int i = threadIdx.x; i < n; i += 256 * 8) {
        fa_u32x4 a[8], b[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) if (i + u * 256 < n) { a[u] = k[i + u * 256]; b[u] = v[i + u * 256]; } else { a[u] = b[u] = {0, 0, 0, 0}; }
#pragma unroll
        for (int u = 0; u < 8; ++u) acc ^= a[u].x ^ b[u].y;
    }
    if (acc == 0x12345678u) ((float*)p.out)[0] = 1.f;
}

int main(int argc, char** argv) {
    const int L = argc > 1 ? atoi(argv[1]) : 4096;
    const int splits = argc > 2 ? atoi(argv[2]) : 32;
    const int H = 32, HKV = 8, D = 128, REPS = 320;
    const int COPIES = argc > 3 ? atoi(argv[3]) : 16;
    const size_t cache_elems = (size_t)HKV * L * D;
    std::vector<void*> ks(COPIES), vs(COPIES);
    std::vector<unsigned short> host(cache_elems);
    srand(1);
    for (auto& x : host) x = 0x3c00 + (rand() % 512) - 256;  // bf16 around 0.008..
    for (int c = 0; c < COPIES; ++c) {
        CK(cudaMalloc(&ks[c], cache_elems * 2));
        CK(cudaMalloc(&vs[c], cache_elems * 2));
        CK(cudaMemcpy(ks[c], host.data(), cache_elems * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(vs[c], host.data(), cache_elems * 2, cudaMemcpyHostToDevice));
    }
    void *q, *out, *part;
    int* counters;
    CK(cudaMalloc(&q, H * D * 2));
    CK(cudaMemcpy(q, host.data(), H * D * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&out, H * D * 2));
    CK(cudaMalloc(&part, (size_t)H * splits * (D + 1) * 4));
    CK(cudaMalloc(&counters, 64 * 4));
    CK(cudaMemset(counters, 0, 64 * 4));
    DecodeParams p = {};
    p.q = q; p.out = out;
    p.partial_o = (float*)part;
    p.partial_lse = (float*)part + (size_t)H * splits * D;
    p.counters = counters;
    p.q_sb = H * D; p.q_sh = D; p.q_ss = H * D;
    p.o_sb = H * D; p.o_sh = D; p.o_ss = H * D;
    p.k_sb = (fa_i64)HKV * L * D; p.k_sh = (fa_i64)L * D; p.k_ss = D;
    p.v_sb = p.k_sb; p.v_sh = p.k_sh; p.v_ss = p.k_ss;
    p.batch = 1; p.num_heads = H; p.num_kv_heads = HKV; p.seq_q = 1; p.seq_k = L; p.head_dim = D;
    p.max_pages = 0; p.page_size = 1; p.num_splits = splits; p.split_keys = (L + splits - 1) / splits;
    p.split_keys = (p.split_keys + 31) / 32 * 32;
    p.scale = 0.08838834764f; p.causal = 1;
    const size_t smem = (size_t)DEC_STAGES * 2 * 2 * DEC_THREADS * 16;  // decode_smem_bytes(bf16, 128)
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
#ifdef DEC_PROBE_MARKS
    unsigned long long* dm;  // every launch records its marks here
    CK(cudaMalloc(&dm, (size_t)splits * HKV * DEC_NMARKS * 8));
    CK(cudaMemcpyToSymbol(g_dec_marks, &dm, sizeof(dm)));
#endif
    struct K { const char* name; void (*f)(DecodeParams); dim3 grid; size_t smem; };
    K kernels[] = {
        {"decode", flash_decode_bf16_hd128, dim3(splits, HKV, 1), smem},
        {"read-only", probe_read, dim3(splits, HKV, 1), 0},
        {"empty", probe_empty, dim3(splits, HKV, 1), 0},
    };
    CK(cudaFuncSetAttribute(flash_decode_bf16_hd128, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    for (auto& k : kernels) {
        auto launch = [&](int i) {
            DecodeParams pp = p;
            pp.k = ks[i % COPIES];
            pp.v = vs[i % COPIES];
            k.f<<<k.grid, DEC_THREADS, k.smem, s>>>(pp);
        };
        for (int i = 0; i < 32; ++i) launch(i);
        CK(cudaStreamSynchronize(s));
        CK(cudaGetLastError());
        // Graph of REPS launches: device time without the host's launch gaps.
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
        for (int i = 0; i < REPS; ++i) launch(i);
        CK(cudaStreamEndCapture(s, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        cudaEvent_t a, b;
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
        float best_graph = 1e9, best_stream = 1e9;
        for (int t = 0; t < 7; ++t) {
            CK(cudaEventRecord(a, s));
            CK(cudaGraphLaunch(ge, s));
            CK(cudaEventRecord(b, s));
            CK(cudaEventSynchronize(b));
            float ms;
            CK(cudaEventElapsedTime(&ms, a, b));
            best_graph = fminf(best_graph, ms * 1e3f / REPS);
            CK(cudaEventRecord(a, s));
            for (int i = 0; i < REPS; ++i) launch(i);
            CK(cudaEventRecord(b, s));
            CK(cudaEventSynchronize(b));
            CK(cudaEventElapsedTime(&ms, a, b));
            best_stream = fminf(best_stream, ms * 1e3f / REPS);
        }
        const double bytes = 2.0 * cache_elems * 2;
        printf("L=%d splits=%d copies=%d %-10s graph %6.2f us (%.2f TB/s)  stream %6.2f us\n", L, splits, COPIES, k.name, best_graph,
               bytes / (best_graph * 1e-6) / 1e12, best_stream);
    }
#ifdef DEC_PROBE_MARKS
    {
        const int nb = splits * HKV;
        std::vector<unsigned long long> h((size_t)nb * DEC_NMARKS);
        const char* names[DEC_NMARKS] = {"block start", "first tile", "key loop (thread 0)", "partial written",
                                         "counter", "last: splits merged", "last: output", "group rows in smem",
                                         "first copies issued"};
        const int order[DEC_NMARKS] = {0, 8, 1, 2, 7, 3, 4, 5, 6};
        // Median over 9 launches of each mark's median and latest block.
        std::vector<std::vector<double>> med(DEC_NMARKS), last(DEC_NMARKS);
        for (int t = 0; t < 9 + 4; ++t) {
            CK(cudaMemset(dm, 0, (size_t)nb * DEC_NMARKS * 8));
            DecodeParams pp = p;
            pp.k = ks[t % COPIES];
            pp.v = vs[t % COPIES];
            flash_decode_bf16_hd128<<<dim3(splits, HKV, 1), DEC_THREADS, smem, s>>>(pp);
            CK(cudaStreamSynchronize(s));
            if (t < 4) continue;
            CK(cudaMemcpy(h.data(), dm, h.size() * 8, cudaMemcpyDeviceToHost));
            unsigned long long t0 = ~0ull;
            for (int bk = 0; bk < nb; ++bk) t0 = std::min(t0, h[bk * DEC_NMARKS]);
            for (int m = 0; m < DEC_NMARKS; ++m) {
                std::vector<double> v;
                for (int bk = 0; bk < nb; ++bk)
                    if (h[bk * DEC_NMARKS + m]) v.push_back((h[bk * DEC_NMARKS + m] - t0) * 1e-3);
                if (v.empty()) continue;
                std::sort(v.begin(), v.end());
                med[m].push_back(v[v.size() / 2]);
                last[m].push_back(v.back());
            }
        }
        printf("L=%d splits=%d copies=%d timeline (us after the first block starts; median block / last block):\n", L, splits, COPIES);
        for (int m : order) {
            if (med[m].empty()) continue;
            std::sort(med[m].begin(), med[m].end());
            std::sort(last[m].begin(), last[m].end());
            printf("  %-22s %6.2f / %6.2f\n", names[m], med[m][med[m].size() / 2], last[m][last[m].size() / 2]);
        }
    }
#endif
    // Check the decode result against a host reference for head 0.
    {
        DecodeParams pp = p;
        pp.k = ks[0]; pp.v = vs[0];
        CK(cudaMemset(out, 0, H * D * 2));
        flash_decode_bf16_hd128<<<dim3(splits, HKV, 1), DEC_THREADS, smem, s>>>(pp);
        CK(cudaGetLastError());
        CK(cudaStreamSynchronize(s));
        std::vector<unsigned short> o(H * D);
        CK(cudaMemcpy(o.data(), out, H * D * 2, cudaMemcpyDeviceToHost));
        auto f = [](unsigned short x) { unsigned u = (unsigned)x << 16; float r; memcpy(&r, &u, 4); return r; };
        double maxerr = 0;
        for (int h = 0; h < H; h += 7) {
            const int kvh = h / (H / HKV);
            std::vector<double> sc(L);
            double mx = -1e30;
            for (int j = 0; j < L; ++j) {
                double d = 0;
                for (int e = 0; e < D; ++e) d += f(host[h * D + e]) * f(host[((size_t)kvh * L + j) * D + e]);
                sc[j] = d * p.scale;
                mx = fmax(mx, sc[j]);
            }
            double den = 0;
            for (int j = 0; j < L; ++j) den += (sc[j] = exp(sc[j] - mx));
            for (int e = 0; e < D; ++e) {
                double num = 0;
                for (int j = 0; j < L; ++j) num += sc[j] * f(host[((size_t)kvh * L + j) * D + e]);
                maxerr = fmax(maxerr, fabs(num / den - f(o[h * D + e])));
            }
        }
        printf("L=%d splits=%d max abs err vs host %.3e\n", L, splits, maxerr);
    }
    return 0;
}
