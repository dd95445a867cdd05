// Host side shared by the flash probes (scripts/wgmma_probe.cu, scripts/wgmma_ws_probe.cu):
// error checks, bf16 conversion and the f64 reference an output and its lse are compared
// with ([B, S, H, D] bf16 operands, GQA, bottom-right causal, optional additive mask).
#pragma once

#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1); } } while (0)

static unsigned short f2bf(float f) { unsigned u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (unsigned short)(u >> 16); }
static float bf2f(unsigned short b) { unsigned u = (unsigned)b << 16; float f; memcpy(&f, &u, 4); return f; }

// Largest |output - reference| and |lse - reference| (a row without keys must give -inf);
// 1e30 for a NaN or a finite lse where there should be none.
struct RefErr { double out, lse; };
static RefErr reference_error(int B, int H, int HKV, int Sq, int Sk, int D, bool causal, float scale,
                              const std::vector<unsigned short>& hq, const std::vector<unsigned short>& hk,
                              const std::vector<unsigned short>& hv, const std::vector<float>* mask,
                              const std::vector<unsigned short>& ho, const std::vector<float>& hl) {
    RefErr e{0, 0};
    const int G = H / HKV, diag = Sk - Sq;
    std::vector<double> sc(Sk);
    for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < Sq; ++i) {
        const unsigned short* qi = &hq[(((size_t)b * Sq + i) * H + h) * D];
        double mx = -INFINITY;
        for (int j = 0; j < Sk; ++j) {
            const double mv = mask ? (*mask)[(((size_t)b * H + h) * Sq + i) * Sk + j] : 0.0;
            if ((causal && j > i + diag) || mv == -INFINITY) { sc[j] = -INFINITY; continue; }
            const unsigned short* kj = &hk[(((size_t)b * Sk + j) * HKV + h / G) * D];
            double s = 0; for (int d = 0; d < D; ++d) s += (double)bf2f(qi[d]) * bf2f(kj[d]);
            sc[j] = s * scale + mv; mx = std::max(mx, sc[j]);
        }
        double l = 0; for (int j = 0; j < Sk; ++j) { sc[j] = (sc[j] == -INFINITY) ? 0 : exp(sc[j] - mx); l += sc[j]; }
        for (int d = 0; d < D; ++d) {
            double acc = 0;
            for (int j = 0; j < Sk; ++j) if (sc[j] != 0) acc += sc[j] * bf2f(hv[(((size_t)b * Sk + j) * HKV + h / G) * D + d]);
            const double ref = l > 0 ? acc / l : 0;
            const double got = bf2f(ho[(((size_t)b * Sq + i) * H + h) * D + d]);
            e.out = std::max(e.out, std::fabs(got - ref));
            if (!(got == got)) e.out = 1e30;
        }
        const double lref = l > 0 ? mx + log(l) : -INFINITY;
        const double lg = hl[((size_t)b * H + h) * Sq + i];
        if (l > 0) e.lse = std::max(e.lse, std::fabs(lg - lref)); else if (lg != -INFINITY) e.lse = 1e30;
    }
    return e;
}
