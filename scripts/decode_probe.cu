// Device-time probe of the decode kernel alone (bf16, 32 query / 8 KV heads, D = 128),
// outside the library: the kernel source is compiled by nvcc and launched
// directly, so the figures exclude the host API. It prints, per launch:
//   graph   the launch replayed from a CUDA graph of 320 launches (no launch gaps),
//   stream  the same launches queued on a stream (the gap a host loop pays),
// for the decode kernel, a kernel that only reads the same K/V bytes with the same grid (the
// floor for this grid), and an empty kernel; then the decode result's max abs error against
// a host reference. Build and run on the GPU machine with scripts/decode-probe.sh.
// Arguments: cache length, chunks (splits), distinct caches rotated (1: stays in L2), batch
// (default 1), page size (default 0: a contiguous cache; else pages of that many keys in a
// shuffled pool, read through a block table), launches per timing (default 320), path (1: the
// tensor-core body; not with DEC_PROBE_KERNEL). Caches are token-major, [B][L][Hkv][D].
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
// before any is used (contiguous caches).
__global__ void __launch_bounds__(256) probe_read(DecodeParams p) {
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const fa_bf16* kb = (const fa_bf16*)p.k + (fa_i64)b * p.k_sb + (fa_i64)kvh * p.k_sh;
    const fa_bf16* vb = (const fa_bf16*)p.v + (fa_i64)b * p.v_sb + (fa_i64)kvh * p.v_sh;
    const int n = p.split_keys * 16;  // vectors per chunk (D=128 bf16)
    unsigned acc = 0;
    for (int i = threadIdx.x; i < n; i += 256 * 8) {
        fa_u32x4 a[8], c[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int idx = i + u * 256;
            const fa_i64 key = (fa_i64)split * p.split_keys + idx / 16;
            if (idx < n && key < p.seq_k) {
                a[u] = *(const fa_u32x4*)(kb + key * p.k_ss + (idx % 16) * 8);
                c[u] = *(const fa_u32x4*)(vb + key * p.v_ss + (idx % 16) * 8);
            } else a[u] = c[u] = {0, 0, 0, 0};
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) acc ^= a[u].x ^ c[u].y;
    }
    if (acc == 0x12345678u) ((float*)p.out)[0] = 1.f;
}

// Value of (sequence b, kv head h, key j, dim d) of K (which 0) or V (1), and of the queries
// (which 2, j = head): k / 128 for k in -128..127, exact in bf16.
__host__ __device__ inline float probe_value(int which, int b, int h, int j, int d) {
    unsigned x = (unsigned)which * 0x9e3779b9u ^ (unsigned)b * 0x85ebca6bu ^ (unsigned)h * 0xc2b2ae35u ^
                 (unsigned)j * 0x27d4eb2fu ^ (unsigned)d * 0x165667b1u;
    x ^= x >> 15; x *= 0x2c1b3c6du; x ^= x >> 12; x *= 0x297a2d39u; x ^= x >> 15;
    return ((int)(x & 0xff) - 128) / 128.f;
}
__host__ __device__ inline unsigned short probe_bits(float f) {
    unsigned u; memcpy(&u, &f, 4); return (unsigned short)(u >> 16);
}

// Fills K and V of every sequence at the physical row the layout gives key j.
__global__ void probe_fill(DecodeParams p, unsigned short* k, unsigned short* v) {
    const fa_i64 total = (fa_i64)p.batch * p.seq_k * p.num_kv_heads * p.head_dim;
    for (fa_i64 i = blockIdx.x * (fa_i64)blockDim.x + threadIdx.x; i < total; i += (fa_i64)gridDim.x * blockDim.x) {
        const int d = (int)(i % p.head_dim);
        const int h = (int)((i / p.head_dim) % p.num_kv_heads);
        const int j = (int)((i / ((fa_i64)p.head_dim * p.num_kv_heads)) % p.seq_k);
        const int b = (int)(i / ((fa_i64)p.head_dim * p.num_kv_heads * p.seq_k));
        fa_i64 page = b, within = j;
        if (p.block_table) {
            page = p.block_table[(fa_i64)b * p.max_pages + j / p.page_size];
            within = j % p.page_size;
        }
        const fa_i64 at = page * p.k_sb + h * p.k_sh + within * p.k_ss + d;
        k[at] = probe_bits(probe_value(0, b, h, j, d));
        v[at] = probe_bits(probe_value(1, b, h, j, d));
    }
}

int main(int argc, char** argv) {
    const int L = argc > 1 ? atoi(argv[1]) : 4096;
    const int splits = argc > 2 ? atoi(argv[2]) : 32;
    const int COPIES = argc > 3 ? atoi(argv[3]) : 16;
    const int B = argc > 4 ? atoi(argv[4]) : 1;
    const int PAGE = argc > 5 ? atoi(argv[5]) : 0;
    const int H = 32, HKV = 8, D = 128, REPS = argc > 6 ? atoi(argv[6]) : 320;
    const size_t cache_elems = (size_t)B * HKV * L * D;
    const int pages_per_seq = PAGE ? (L + PAGE - 1) / PAGE : 0;
    const size_t pool_elems = PAGE ? (size_t)B * pages_per_seq * PAGE * HKV * D : cache_elems;
    std::vector<void*> ks(COPIES), vs(COPIES);
    int* table = nullptr;
    DecodeParams p = {};
    p.batch = B; p.num_heads = H; p.num_kv_heads = HKV; p.seq_q = 1; p.seq_k = L; p.head_dim = D;
    p.k_ss = (fa_i64)HKV * D; p.k_sh = D;
    p.k_sb = PAGE ? (fa_i64)PAGE * HKV * D : (fa_i64)L * HKV * D;
    p.v_sb = p.k_sb; p.v_sh = p.k_sh; p.v_ss = p.k_ss;
    p.max_pages = pages_per_seq; p.page_size = PAGE ? PAGE : 1;
    const int MMA = argc > 7 ? atoi(argv[7]) : 0;
#ifndef DEC_PROBE_KERNEL
    p.page_shift = PAGE && (PAGE & (PAGE - 1)) == 0 ? __builtin_ctz(PAGE) : -1;
    p.tensor_cores = MMA;
#endif
    if (PAGE) {
        // A shuffled pool: sequence b's page i is a random page of the pool.
        std::vector<int> perm((size_t)B * pages_per_seq);
        for (size_t i = 0; i < perm.size(); ++i) perm[i] = (int)i;
        srand(7);
        for (size_t i = perm.size(); i > 1; --i) std::swap(perm[i - 1], perm[(size_t)rand() % i]);
        CK(cudaMalloc(&table, perm.size() * 4));
        CK(cudaMemcpy(table, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
        p.block_table = table;
    }
    for (int c = 0; c < COPIES; ++c) {
        CK(cudaMalloc(&ks[c], pool_elems * 2));
        CK(cudaMalloc(&vs[c], pool_elems * 2));
        probe_fill<<<1024, 256>>>(p, (unsigned short*)ks[c], (unsigned short*)vs[c]);
        CK(cudaGetLastError());
    }
    std::vector<unsigned short> hq((size_t)B * H * D);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int d = 0; d < D; ++d) hq[((size_t)b * H + h) * D + d] = probe_bits(probe_value(2, b, 0, h, d));
    void *q, *out, *part;
    int* counters;
    const size_t rows = (size_t)B * H;
    CK(cudaMalloc(&q, rows * D * 2));
    CK(cudaMemcpy(q, hq.data(), rows * D * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&out, rows * D * 2));
    CK(cudaMalloc(&part, rows * splits * (D + 1) * 4));
    CK(cudaMalloc(&counters, (size_t)B * HKV * 4 * 64));
    CK(cudaMemset(counters, 0, (size_t)B * HKV * 4 * 64));
    p.q = q; p.out = out;
    p.partial_o = (float*)part;
    p.partial_lse = (float*)part + rows * splits * D;
    p.counters = counters;
    p.q_sb = H * D; p.q_sh = D; p.q_ss = H * D;
    p.o_sb = H * D; p.o_sh = D; p.o_ss = H * D;
    p.num_splits = splits; p.split_keys = (L + splits - 1) / splits;
    const int gran = MMA ? 128 : 32;  // split_granularity on the host
    p.split_keys = (p.split_keys + gran - 1) / gran * gran;
    p.scale = 0.08838834764f; p.causal = 1;
    // decode_smem_bytes(bf16, 128) of the register and the tensor-core path
#ifndef DEC_MSTAGES
#define DEC_MSTAGES 2
#endif
    const size_t smem = MMA ? (size_t)(16 + DEC_MSTAGES * 8 * 2 * 16) * (128 + 8) * 2 : (size_t)DEC_STAGES * 2 * 2 * DEC_THREADS * 16;
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
    const dim3 grid(splits, HKV, B);
#ifdef DEC_PROBE_MARKS
    unsigned long long* dm;  // every launch records its marks here
    CK(cudaMalloc(&dm, (size_t)splits * HKV * B * DEC_NMARKS * 8));
    CK(cudaMemcpyToSymbol(g_dec_marks, &dm, sizeof(dm)));
#endif
    struct K { const char* name; void (*f)(DecodeParams); dim3 grid; size_t smem; };
    K kernels[] = {
        {"decode", flash_decode_bf16_hd128, grid, smem},
        {"read-only", probe_read, grid, 0},
        {"empty", probe_empty, grid, 0},
    };
    CK(cudaFuncSetAttribute(flash_decode_bf16_hd128, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    int occ = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, flash_decode_bf16_hd128, DEC_THREADS, smem));
    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, flash_decode_bf16_hd128));
    printf("B=%d L=%d page=%d splits=%d: %d regs, %d blocks/SM, %zu B smem\n", B, L, PAGE, splits, fa.numRegs, occ, smem);
    for (auto& k : kernels) {
        if (PAGE && k.f == probe_read) continue;
        auto launch = [&](int i) {
            DecodeParams pp = p;
            pp.k = ks[i % COPIES];
            pp.v = vs[i % COPIES];
            k.f<<<k.grid, DEC_THREADS, k.smem, s>>>(pp);
        };
        for (int i = 0; i < 8; ++i) launch(i);
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
        for (int t = 0; t < 5; ++t) {
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
        CK(cudaGraphExecDestroy(ge));
        CK(cudaGraphDestroy(g));
        const double bytes = 2.0 * cache_elems * 2;
        printf("B=%d L=%d page=%d splits=%d copies=%d %-10s graph %8.2f us (%.2f TB/s)  stream %8.2f us\n", B, L, PAGE,
               splits, COPIES, k.name, best_graph, bytes / (best_graph * 1e-6) / 1e12, best_stream);
    }
#ifdef DEC_PROBE_MARKS
    {
        const int nb = splits * HKV * B;
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
            flash_decode_bf16_hd128<<<grid, DEC_THREADS, smem, s>>>(pp);
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
    // Check the decode result against a host reference for a few heads of the last sequence.
    {
        DecodeParams pp = p;
        pp.k = ks[0]; pp.v = vs[0];
        CK(cudaMemset(out, 0, rows * D * 2));
        flash_decode_bf16_hd128<<<grid, DEC_THREADS, smem, s>>>(pp);
        CK(cudaGetLastError());
        CK(cudaStreamSynchronize(s));
        std::vector<unsigned short> o(rows * D);
        CK(cudaMemcpy(o.data(), out, rows * D * 2, cudaMemcpyDeviceToHost));
        auto f = [](unsigned short x) { unsigned u = (unsigned)x << 16; float r; memcpy(&r, &u, 4); return r; };
        double maxerr = 0;
        const int b = B - 1;
        std::vector<double> sc(L);
        for (int h = 0; h < H; h += 7) {
            const int kvh = h / (H / HKV);
            double mx = -1e30;
            for (int j = 0; j < L; ++j) {
                double d = 0;
                for (int e = 0; e < D; ++e) d += (double)probe_value(2, b, 0, h, e) * probe_value(0, b, kvh, j, e);
                sc[j] = d * p.scale;
                mx = fmax(mx, sc[j]);
            }
            double den = 0;
            for (int j = 0; j < L; ++j) den += (sc[j] = exp(sc[j] - mx));
            for (int e = 0; e < D; ++e) {
                double num = 0;
                for (int j = 0; j < L; ++j) num += sc[j] * probe_value(1, b, kvh, j, e);
                maxerr = fmax(maxerr, fabs(num / den - f(o[((size_t)b * H + h) * D + e])));
            }
        }
        printf("B=%d L=%d page=%d splits=%d max abs err vs host %.3e\n", B, L, PAGE, splits, maxerr);
    }
    return 0;
}
