// FlashAttention-2 style forward pass (SIMT, f32 accumulation for every dtype).
//
// The SIMT implementation (FA_VARIANT_IMPL simt) of every f32 variant and of every AMD
// variant, and, as fa_flash_forward_split, the one (split) that runs a tile row sized for a
// tensor-core kernel where the host chose no tensor cores (unaligned inputs, CUDA before
// sm_80). Which one runs is the host's choice (src/backend/gpu/dispatch.rs).
//
// One block owns BLOCK_M queries of one (batch, head). K/V tiles of BLOCK_N keys stream
// through shared memory; the softmax is computed online (running max and sum in registers,
// base-2 exponentials with scale*log2(e) folded into Q), and O is written once at the end.
//
// Thread layout: 16 consecutive threads (TX) share RM query rows; a block has TY = THREADS/16
// such row groups. A thread owns
//   S tile: rows row(i), keys tx + 16*j                      (RM x SN registers)
//   O tile: rows row(i), head-dim columns col(c)             (RM x DN registers)
// with row(i) = (i/4)*(TY*4) + ty*4 + i%4, so 4 consecutive rows are one 16-byte load of
// P^T, and col(c) = (c/VEC)*(16*VEC) + tx*VEC + c%VEC, so V is read in VEC-wide vectors.
// Row statistics are reduced with shuffles of width 16 (valid on wave32 and wave64).
//
// Shared memory (f32): Q [BM][DP+4], K [BN][DP+4], V [BN][DP], P^T [BN][BM+4]. The +4
// padding makes the 16 distinct K rows (and P^T rows) read by a half-warp fall on distinct
// banks; Q and P^T reads are broadcasts.
//
// Pipeline per K/V tile t (two barriers):
//   commit K_t -> barrier A -> issue V_t -> S = Q K_t^T, softmax, P^T -> smem, commit V_t
//   -> barrier B -> issue K_{t+1} -> O += P V_t
// Barrier A: K_t visible; every thread is done with V_{t-1} and P_{t-1}, so both may be
// overwritten. Barrier B: P_t and V_t visible; every thread is done with K_t.
// On CUDA sm_80+ f32 tiles are copied with cp.async (no staging registers); elsewhere the
// next tile is staged in registers while the current one is computed.
//
// Needs compat.h, attention_params.h and flash_common.h.
#pragma once

#define FA_TX 16

// Partial unrolling of the two reduction loops. On H100, 1 and 2 were 2-10% slower than 4;
// 8 was within noise of 4.
#ifndef FA_QK_UNROLL
#define FA_QK_UNROLL 4
#endif
#ifndef FA_PV_UNROLL
#define FA_PV_UNROLL 4
#endif

template <int HD, int BM, int BN, int THREADS>
struct FaShape {
    static constexpr int BLOCK_M = BM;
    static constexpr int BLOCK_N = BN;
    static constexpr int TX = FA_TX;
    static constexpr int TY = THREADS / TX;
    static constexpr int DP = (HD + 31) / 32 * 32;  // computed head dim (zero padded)
    static constexpr int RM = BM / TY;
    static constexpr int SN = BN / TX;
    static constexpr int VEC = (DP % (TX * 4) == 0) ? 4 : 2;
    static constexpr int DN = DP / TX;
    static constexpr int QSTR = DP + 4;
    static constexpr int KSTR = DP + 4;
    static constexpr int VSTR = DP;
    static constexpr int PSTR = BM + 4;
    static constexpr int Q_OFF = 0;
    static constexpr int K_OFF = Q_OFF + BM * QSTR;
    static constexpr int V_OFF = K_OFF + BN * KSTR;
    static constexpr int P_OFF = V_OFF + BN * VSTR;
    static constexpr int SMEM_BYTES = (P_OFF + BN * PSTR) * 4;

    static_assert(THREADS % TX == 0, "THREADS must be a multiple of 16");
    static_assert(BM % (TY * 4) == 0, "each thread needs a multiple of 4 query rows");
    static_assert(BN % TX == 0, "BLOCK_N must be a multiple of 16");
    static_assert(DP % (TX * VEC) == 0, "head-dim columns must split evenly over 16 threads");
    static_assert(HD <= 256 && HD % 8 == 0, "head-dim bucket must be a multiple of 8, <= 256");
};

// ------------------------------------------------------------------ tile staging
// A [ROWS x DP] tile of T from global memory to f32 shared memory [ROWS][SSTR], moved in
// 16-byte chunks. Rows >= row_end and columns >= head_dim are zero filled, so padded keys
// contribute exp2(-inf) * 0 and never 0 * garbage. vec_ok is false when a base pointer or a
// stride is not 16-byte aligned; then the same chunks are moved with scalar accesses.

template <typename T> struct FaChunk;
template <> struct FaChunk<float> {
    static constexpr int EPC = 4;
    FA_DEVICE static fa_u32x4 load_scalar(const float* src) {
        fa_u32x4 v;
        v.x = __float_as_uint(src[0]); v.y = __float_as_uint(src[1]);
        v.z = __float_as_uint(src[2]); v.w = __float_as_uint(src[3]);
        return v;
    }
    FA_DEVICE static void to_smem(float* dst, const fa_u32x4& v, float mul) {
        fa_float4 f;
        f.x = __uint_as_float(v.x) * mul; f.y = __uint_as_float(v.y) * mul;
        f.z = __uint_as_float(v.z) * mul; f.w = __uint_as_float(v.w) * mul;
        *reinterpret_cast<fa_float4*>(dst) = f;
    }
};
template <typename H> struct FaChunkHalf {
    static constexpr int EPC = 8;
    FA_DEVICE static fa_u32x4 load_scalar(const H* src) {
        const unsigned short* s = reinterpret_cast<const unsigned short*>(src);
        fa_u32x4 v;
        v.x = (unsigned int)s[0] | ((unsigned int)s[1] << 16);
        v.y = (unsigned int)s[2] | ((unsigned int)s[3] << 16);
        v.z = (unsigned int)s[4] | ((unsigned int)s[5] << 16);
        v.w = (unsigned int)s[6] | ((unsigned int)s[7] << 16);
        return v;
    }
    FA_DEVICE static void to_smem(float* dst, const fa_u32x4& v, float mul) {
        fa_float4 a, b;
        a.x = fa_half_bits_to_float<H>(v.x & 0xffffu) * mul;
        a.y = fa_half_bits_to_float<H>(v.x >> 16) * mul;
        a.z = fa_half_bits_to_float<H>(v.y & 0xffffu) * mul;
        a.w = fa_half_bits_to_float<H>(v.y >> 16) * mul;
        b.x = fa_half_bits_to_float<H>(v.z & 0xffffu) * mul;
        b.y = fa_half_bits_to_float<H>(v.z >> 16) * mul;
        b.z = fa_half_bits_to_float<H>(v.w & 0xffffu) * mul;
        b.w = fa_half_bits_to_float<H>(v.w >> 16) * mul;
        *reinterpret_cast<fa_float4*>(dst) = a;
        *reinterpret_cast<fa_float4*>(dst + 4) = b;
    }
};
template <> struct FaChunk<fa_f16> : FaChunkHalf<fa_f16> {};
template <> struct FaChunk<fa_bf16> : FaChunkHalf<fa_bf16> {};

template <typename T, int ROWS, int DP, int SSTR, int THREADS>
struct FaTileGeom {
    static constexpr int EPC = FaChunk<T>::EPC;
    static constexpr int CPR = DP / EPC;  // chunks per row
    static constexpr int NCH = ROWS * CPR;
    static constexpr int PER = (NCH + THREADS - 1) / THREADS;
    static_assert(DP % EPC == 0, "row must be whole chunks");
    static_assert(SSTR % 4 == 0, "shared rows must stay 16-byte aligned");
};

// Register-staged copy: issue() loads into registers, commit() widens and stores.
template <typename T, int ROWS, int DP, int SSTR, int THREADS, bool ASYNC>
struct FaStager {
    typedef FaTileGeom<T, ROWS, DP, SSTR, THREADS> G;
    fa_u32x4 reg[G::PER];

    FA_DEVICE void issue(float* /*smem*/, const FaRows<T>& rows, int row0, int row_end,
                         int head_dim, bool vec_ok, int tid) {
#pragma unroll
        for (int c = 0; c < G::PER; ++c) {
            const int idx = tid + c * THREADS;
            const int r = idx / G::CPR;
            const int col = (idx % G::CPR) * G::EPC;
            const bool valid = (G::NCH % THREADS == 0 || idx < G::NCH) && (row0 + r < row_end) &&
                               (col < head_dim);
            fa_u32x4 v;
            v.x = 0u; v.y = 0u; v.z = 0u; v.w = 0u;
            if (valid) {
                const T* src = rows.row(row0 + r) + col;
                if (vec_ok) v = *reinterpret_cast<const fa_u32x4*>(src);
                else v = FaChunk<T>::load_scalar(src);
            }
            reg[c] = v;
        }
    }
    FA_DEVICE void commit(float* smem, int tid, float mul) {
#pragma unroll
        for (int c = 0; c < G::PER; ++c) {
            const int idx = tid + c * THREADS;
            if (G::NCH % THREADS != 0 && idx >= G::NCH) continue;
            const int r = idx / G::CPR;
            const int col = (idx % G::CPR) * G::EPC;
            FaChunk<T>::to_smem(smem + r * SSTR + col, reg[c], mul);
        }
    }
};

#if FA_HAS_CP_ASYNC
// Asynchronous copy straight into shared memory (f32 only: no conversion on the way).
template <int ROWS, int DP, int SSTR, int THREADS>
struct FaStager<float, ROWS, DP, SSTR, THREADS, true> {
    typedef FaTileGeom<float, ROWS, DP, SSTR, THREADS> G;

    FA_DEVICE void issue(float* smem, const FaRows<float>& rows, int row0, int row_end,
                         int head_dim, bool vec_ok, int tid) {
#pragma unroll
        for (int c = 0; c < G::PER; ++c) {
            const int idx = tid + c * THREADS;
            if (G::NCH % THREADS != 0 && idx >= G::NCH) continue;
            const int r = idx / G::CPR;
            const int col = (idx % G::CPR) * G::EPC;
            const bool valid = (row0 + r < row_end) && (col < head_dim);
            float* dst = smem + r * SSTR + col;
            const float* src = valid ? rows.row(row0 + r) + col : rows.base;
            if (vec_ok) {
                fa_cp_async16(dst, src, valid);
            } else {
                fa_u32x4 v;
                v.x = 0u; v.y = 0u; v.z = 0u; v.w = 0u;
                if (valid) v = FaChunk<float>::load_scalar(src);
                FaChunk<float>::to_smem(dst, v, 1.0f);
            }
        }
    }
    FA_DEVICE void commit(float* /*smem*/, int /*tid*/, float /*mul*/) { fa_cp_async_wait_all(); }
};
#endif

// ------------------------------------------------------------------ the two tile products
// S[i][j] = sum_d Qs[row(i)][d] * Ks[tx + 16 j][d]. Q already carries scale*log2(e).
template <typename SH>
FA_DEVICE void fa_qk_tile(const float* __restrict__ Qs, const float* __restrict__ Ks,
                          float (&s)[SH::RM][SH::SN], int tx, int ty) {
#pragma unroll
    for (int i = 0; i < SH::RM; ++i)
#pragma unroll
        for (int j = 0; j < SH::SN; ++j) s[i][j] = 0.0f;

    const float* qrow = Qs + ty * 4 * SH::QSTR;
    const float* krow = Ks + tx * SH::KSTR;
#pragma unroll FA_QK_UNROLL
    for (int d = 0; d < SH::DP; d += 4) {
        fa_float4 kv[SH::SN];
#pragma unroll
        for (int j = 0; j < SH::SN; ++j)
            kv[j] = *reinterpret_cast<const fa_float4*>(krow + j * SH::TX * SH::KSTR + d);
#pragma unroll
        for (int i = 0; i < SH::RM; ++i) {
            const int r = (i / 4) * (SH::TY * 4) + (i % 4);
            const fa_float4 q = *reinterpret_cast<const fa_float4*>(qrow + r * SH::QSTR + d);
#pragma unroll
            for (int j = 0; j < SH::SN; ++j) {
                float acc = s[i][j];
                acc = fmaf(q.x, kv[j].x, acc);
                acc = fmaf(q.y, kv[j].y, acc);
                acc = fmaf(q.z, kv[j].z, acc);
                acc = fmaf(q.w, kv[j].w, acc);
                s[i][j] = acc;
            }
        }
    }
}

template <int VEC> struct FaVecRead;
template <> struct FaVecRead<4> {
    FA_DEVICE static void read(const float* src, float* dst) {
        const fa_float4 t = *reinterpret_cast<const fa_float4*>(src);
        dst[0] = t.x; dst[1] = t.y; dst[2] = t.z; dst[3] = t.w;
    }
};
template <> struct FaVecRead<2> {
    FA_DEVICE static void read(const float* src, float* dst) {
        const fa_float2 t = *reinterpret_cast<const fa_float2*>(src);
        dst[0] = t.x; dst[1] = t.y;
    }
};

// O[i][c] += sum_n P^T[n][row(i)] * V[n][col(c)].
template <typename SH>
FA_DEVICE void fa_pv_tile(const float* __restrict__ Ps, const float* __restrict__ Vs,
                          float (&o)[SH::RM][SH::DN], int tx, int ty) {
    const float* prow = Ps + ty * 4;
    const float* vrow = Vs + tx * SH::VEC;
#pragma unroll FA_PV_UNROLL
    for (int n = 0; n < SH::BLOCK_N; ++n) {
        float pv[SH::RM];
#pragma unroll
        for (int g = 0; g < SH::RM / 4; ++g) {
            const fa_float4 t = *reinterpret_cast<const fa_float4*>(prow + n * SH::PSTR + g * SH::TY * 4);
            pv[g * 4 + 0] = t.x; pv[g * 4 + 1] = t.y; pv[g * 4 + 2] = t.z; pv[g * 4 + 3] = t.w;
        }
        float vv[SH::DN];
#pragma unroll
        for (int g = 0; g < SH::DN / SH::VEC; ++g)
            FaVecRead<SH::VEC>::read(vrow + n * SH::VSTR + g * SH::TX * SH::VEC, vv + g * SH::VEC);
#pragma unroll
        for (int i = 0; i < SH::RM; ++i)
#pragma unroll
            for (int c = 0; c < SH::DN; ++c) o[i][c] = fmaf(pv[i], vv[c], o[i][c]);
    }
}

// ------------------------------------------------------------------ masking and softmax
// Sets S to -inf where key j is invisible to query i: past seq_k, above the bottom-right
// causal diagonal (j > i + seq_k - seq_q) or (FA_EXT) outside the row's window; applies the
// FA_EXT score transforms and adds the additive mask (MODE 2) in log2 units.
template <typename SH, int MODE, bool PRECISE>
FA_DEVICE void fa_mask_tile(float (&s)[SH::RM][SH::SN], const AttnParams& p, int b, int h, int q0,
                            int kv0, int seq_q, int seq_k, bool causal, int tx, int ty) {
    const int diag = seq_k - seq_q;
    const bool has_mask = (MODE == 2) && (p.mask != nullptr);
    const bool transform = FA_EXT && p.transform != 0;
    const float cap2 = FA_EXT ? fa_cap2(p) : 0.0f;
    const float slope2 = FA_EXT ? fa_slope2(p, h) : 0.0f;
#pragma unroll
    for (int i = 0; i < SH::RM; ++i) {
        const int qi = q0 + (i / 4) * (SH::TY * 4) + ty * 4 + (i % 4);
        const FaRowKeys rk = fa_row_keys(p, qi, diag);
        const bool row_ok = qi < seq_q;
        const float* mrow = nullptr;
        if (has_mask)
            mrow = p.mask + (fa_i64)b * p.m_sb + (fa_i64)h * p.m_sh + (fa_i64)qi * p.m_sq;
#pragma unroll
        for (int j = 0; j < SH::SN; ++j) {
            const int kj = kv0 + tx + SH::TX * j;
            const bool vis = fa_key_visible(rk, kj, seq_k, causal);
            float x = s[i][j];
            if (transform) x = fa_transform_score<PRECISE>(x, cap2, slope2, rk.lim, kj);
            if (has_mask && vis && row_ok) x = fa_mask_log2(x, mrow[kj]);
            s[i][j] = vis ? x : FA_NEG_INF;
        }
    }
}

// Online softmax update for one tile; S becomes P in place. A row that has seen no visible key
// keeps m = -inf and l = 0: exponentials are then taken against 0 instead of -inf, so
// exp2(-inf - (-inf)) = NaN never happens.
template <typename SH>
FA_DEVICE void fa_softmax_tile(float (&s)[SH::RM][SH::SN], float (&m)[SH::RM], float (&l)[SH::RM],
                               float (&o)[SH::RM][SH::DN]) {
#pragma unroll
    for (int i = 0; i < SH::RM; ++i) {
        float mx = s[i][0];
#pragma unroll
        for (int j = 1; j < SH::SN; ++j) mx = fmaxf(mx, s[i][j]);
#pragma unroll
        for (int off = SH::TX / 2; off > 0; off >>= 1) mx = fmaxf(mx, fa_shfl_xor(mx, off, SH::TX));
        const float m_new = fmaxf(m[i], mx);
        const float m_use = (m_new == FA_NEG_INF) ? 0.0f : m_new;
        const float alpha = fa_exp2f(m[i] - m_use);
        m[i] = m_new;
        float rs = 0.0f;
#pragma unroll
        for (int j = 0; j < SH::SN; ++j) {
            const float e = fa_exp2f(s[i][j] - m_use);
            s[i][j] = e;
            rs += e;
        }
        l[i] = fmaf(l[i], alpha, rs);  // per-thread partial sum; reduced once at the end
#pragma unroll
        for (int c = 0; c < SH::DN; ++c) o[i][c] *= alpha;
    }
}

// P^T[key][row] so that the P.V product reads 4 consecutive rows as one vector.
template <typename SH>
FA_DEVICE void fa_store_p(float* Ps, const float (&s)[SH::RM][SH::SN], int tx, int ty) {
#pragma unroll
    for (int j = 0; j < SH::SN; ++j) {
        float* dst = Ps + (tx + SH::TX * j) * SH::PSTR + ty * 4;
#pragma unroll
        for (int g = 0; g < SH::RM / 4; ++g) {
            fa_float4 v;
            v.x = s[g * 4 + 0][j]; v.y = s[g * 4 + 1][j];
            v.z = s[g * 4 + 2][j]; v.w = s[g * 4 + 3][j];
            *reinterpret_cast<fa_float4*>(dst + g * SH::TY * 4) = v;
        }
    }
}

// ------------------------------------------------------------------ output
template <typename T, int VEC> struct FaStoreVec;
template <> struct FaStoreVec<float, 4> {
    FA_DEVICE static void store(float* dst, const float* v) {
        fa_float4 t; t.x = v[0]; t.y = v[1]; t.z = v[2]; t.w = v[3];
        *reinterpret_cast<fa_float4*>(dst) = t;
    }
};
template <> struct FaStoreVec<float, 2> {
    FA_DEVICE static void store(float* dst, const float* v) {
        fa_float2 t; t.x = v[0]; t.y = v[1];
        *reinterpret_cast<fa_float2*>(dst) = t;
    }
};
template <typename H> FA_DEVICE unsigned int fa_pack_half2(float a, float b) {
    return (unsigned int)fa_from_float<H>(a).bits | ((unsigned int)fa_from_float<H>(b).bits << 16);
}
template <typename H> struct FaStoreHalf4 {
    FA_DEVICE static void store(H* dst, const float* v) {
        fa_u32x2 t; t.x = fa_pack_half2<H>(v[0], v[1]); t.y = fa_pack_half2<H>(v[2], v[3]);
        *reinterpret_cast<fa_u32x2*>(dst) = t;
    }
};
template <typename H> struct FaStoreHalf2 {
    FA_DEVICE static void store(H* dst, const float* v) {
        *reinterpret_cast<unsigned int*>(dst) = fa_pack_half2<H>(v[0], v[1]);
    }
};
template <> struct FaStoreVec<fa_f16, 4> : FaStoreHalf4<fa_f16> {};
template <> struct FaStoreVec<fa_bf16, 4> : FaStoreHalf4<fa_bf16> {};
template <> struct FaStoreVec<fa_f16, 2> : FaStoreHalf2<fa_f16> {};
template <> struct FaStoreVec<fa_bf16, 2> : FaStoreHalf2<fa_bf16> {};

// ------------------------------------------------------------------ the kernel body
// MODE 0: no mask, not causal. MODE 1: causal, no mask. MODE 2: additive f32 mask (nullable)
// and causal when p.causal != 0. blockDim.x must equal THREADS and the dynamic shared memory
// must be SMEM bytes.
// fa_flash_tile computes the BM queries starting at q0; fa_flash_forward picks q0 from the block
// index (causal grids run in reverse so the blocks with the most keys start first).
template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_tile(const AttnParams& p, const int q0) {
    typedef FaShape<HD, BM, BN, THREADS> SH;
    static_assert(SH::SMEM_BYTES <= SMEM, "shared-memory layout exceeds the tile row's SMEM_BYTES");
#if FA_HAS_CP_ASYNC
    constexpr bool ASYNC = fa_elem<T>::is_f32;
#else
    constexpr bool ASYNC = false;
#endif
    constexpr int RM = SH::RM;
    constexpr int DN = SH::DN;
    constexpr int VEC = SH::VEC;

    FA_DYNAMIC_SMEM(fa_smem);
    float* smem = reinterpret_cast<float*>(fa_smem);
    float* Qs = smem + SH::Q_OFF;
    float* Ks = smem + SH::K_OFF;
    float* Vs = smem + SH::V_OFF;
    float* Ps = smem + SH::P_OFF;

    const int tid = (int)threadIdx.x;
    const int tx = tid % SH::TX;
    const int ty = tid / SH::TX;
    FA_BLOCK_EXIT(MODE, p, q0);
    FA_BLOCK_SETUP(T, BM, BN, MODE, p, q0);

    const fa_u64 in_addr = reinterpret_cast<fa_u64>(p.q) | reinterpret_cast<fa_u64>(p.k) |
                           reinterpret_cast<fa_u64>(p.v);
    const fa_i64 in_strides = p.q_sb | p.q_sh | p.q_ss | p.k_sb | p.k_sh | p.k_ss | p.v_sb |
                              p.v_sh | p.v_ss;
    const bool in_vec = ((in_addr & 15u) == 0) && ((in_strides & (FaChunk<T>::EPC - 1)) == 0);

    // Q is scaled by scale*log2(e) once, so S comes out in the exp2 domain.
    {
        FaStager<T, BM, SH::DP, SH::QSTR, THREADS, false> qst;
        qst.issue(Qs, qg, q0, seq_q, p.head_dim, in_vec, tid);
        qst.commit(Qs, tid, p.scale * FA_LOG2E);
    }

    float o[RM][DN];
    float m_i[RM];
    float l_i[RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        m_i[i] = FA_NEG_INF;
        l_i[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < DN; ++c) o[i][c] = 0.0f;
    }

    FaStager<T, BN, SH::DP, SH::KSTR, THREADS, ASYNC> kst;
    FaStager<T, BN, SH::DP, SH::VSTR, THREADS, ASYNC> vst;
    if (ntiles > tbeg) kst.issue(Ks, kg, tbeg * BN, seq_k, p.head_dim, in_vec, tid);
    const int qlast = (q0 + BM < seq_q ? q0 + BM : seq_q) - 1;

    for (int t = tbeg; t < ntiles; ++t) {
        const int kv0 = t * BN;
        kst.commit(Ks, tid, 1.0f);
        fa_syncthreads();  // A: K_t (and Q) visible; V and P^T of the last tile are free
        vst.issue(Vs, vg, kv0, seq_k, p.head_dim, in_vec, tid);

        float s[RM][SH::SN];
        fa_qk_tile<SH>(Qs, Ks, s, tx, ty);
        if (fa_tile_needs_mask(p, kv0, BN, q0, qlast, diag, seq_k, causal, has_mask) || fa_transforms(p))
            fa_mask_tile<SH, MODE, fa_elem<T>::is_f32>(s, p, b, h, q0, kv0, seq_q, seq_k, causal, tx, ty);
        fa_softmax_tile<SH>(s, m_i, l_i, o);
        fa_store_p<SH>(Ps, s, tx, ty);

        vst.commit(Vs, tid, 1.0f);
        fa_syncthreads();  // B: P^T and V_t visible; K_t is free
        if (t + 1 < ntiles) kst.issue(Ks, kg, kv0 + BN, seq_k, p.head_dim, in_vec, tid);
        fa_pv_tile<SH>(Ps, Vs, o, tx, ty);
    }

    // Epilogue: O / l, and lse = ln(sum exp(s*scale)) (fa_row_end).
    T* og = static_cast<T*>(p.out) + o_off;
    const bool out_vec = (reinterpret_cast<fa_u64>(p.out) % (fa_u64)(VEC * sizeof(T)) == 0) &&
                         (((p.o_sb | p.o_sh | p.o_ss) & (VEC - 1)) == 0);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        float l = l_i[i];
#pragma unroll
        for (int off = SH::TX / 2; off > 0; off >>= 1) l += fa_shfl_xor(l, off, SH::TX);
        const int qi = q0 + (i / 4) * (SH::TY * 4) + ty * 4 + (i % 4);
        if (qi < seq_q) {
            const FaRowEnd end = fa_row_end(p, h, m_i[i], l);
            const float inv = end.inv;
            T* orow = og + (fa_i64)qi * p.o_ss;
#pragma unroll
            for (int g = 0; g < DN / VEC; ++g) {
                const int col = g * SH::TX * VEC + tx * VEC;
                if (col < p.head_dim) {
                    float v[VEC];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) v[e] = o[i][g * VEC + e] * inv;
                    if (out_vec) FaStoreVec<T, VEC>::store(orow + col, v);
                    else {
#pragma unroll
                        for (int e = 0; e < VEC; ++e) fa_store<T>(orow + col + e, v[e]);
                    }
                }
            }
            if (p.lse != nullptr && tx == 0) *fa_lse_at(p, b, h, q_row0, qi) = end.lse;
        }
    }
}

template <typename T, int HD, int BM, int BN, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_forward(const AttnParams& p) {
    fa_flash_tile<T, HD, BM, BN, THREADS, SMEM, MODE>(p, fa_block_q0(p, BM, MODE));
}

// The SIMT kernel on a row whose (BLOCK_M, BLOCK_N, SMEM_BYTES) were sized for another
// implementation: the block's BM queries are done as BM/BMS consecutive SIMT tiles of
// BMS = THREADS/4 queries and 32 keys, which fit the smaller shared-memory budget.
template <int HD, int THREADS>
struct FaSplitShape {
    static constexpr int BMS = THREADS / 4;
    static constexpr int BNS = 32;
    typedef FaShape<HD, BMS, BNS, THREADS> SH;
    static constexpr int SMEM_BYTES = SH::SMEM_BYTES;
};

template <typename T, int HD, int BM, int THREADS, int SMEM, int MODE>
FA_DEVICE void fa_flash_forward_split(const AttnParams& p, const int q0) {
    typedef FaSplitShape<HD, THREADS> SP;
    static_assert(BM % SP::BMS == 0, "BLOCK_M must be a multiple of THREADS/4");
    for (int s = 0; s < BM / SP::BMS; ++s) {
        if (s > 0) fa_syncthreads();  // the previous tile's shared memory is free again
        fa_flash_tile<T, HD, SP::BMS, SP::BNS, THREADS, SMEM, MODE>(p, q0 + s * SP::BMS);
    }
}
