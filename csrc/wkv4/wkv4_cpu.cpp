// WKV-4 on the CPU (OpenMP over batch x channel). Formula: models/rwkv/wkv.py wkv4_torch, ChatRWKV
// rwkv/cuda/operators.cu kernel_wkv_forward (pip rwkv 0.8.32).
#include <algorithm>
#include <cmath>

#include "../common/cpu_kernels.h"
#include "../common/wkv4_step.h"

namespace rwkv_chat {
namespace {

template <typename F>
void wkv4_impl(int64_t B, int64_t T, int64_t C, const float* w_, const float* u_, const F* k_, const F* v_,
               const float* aa_, const float* bb_, const float* pp_, F* y_, float* aa_out, float* bb_out,
               float* pp_out) {
#pragma omp parallel for schedule(static)
    for (int64_t idx = 0; idx < B * C; ++idx) {
        const int64_t b = idx / C, c = idx % C;
        const float w = w_[c], u = u_[c];
        float aa = aa_[idx], bb = bb_[idx], pp = pp_[idx];
        const int64_t base = b * T * C + c;
        for (int64_t t = 0; t < T; ++t) {
            const float kk = static_cast<float>(k_[base + t * C]);
            const float vv = static_cast<float>(v_[base + t * C]);
            y_[base + t * C] = static_cast<F>(wkv4_step(w, u, kk, vv, aa, bb, pp));
        }
        aa_out[idx] = aa;
        bb_out[idx] = bb;
        pp_out[idx] = pp;
    }
}

}  // namespace

void wkv4_cpu_kernel(int act, int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                     const void* v, const float* aa, const float* bb, const float* pp, void* y, float* aa_out,
                     float* bb_out, float* pp_out) {
    RWKV_CHAT_CPU_DISPATCH_ACT(act, F,
        wkv4_impl<F>(B, T, C, w, u, static_cast<const F*>(k), static_cast<const F*>(v), aa, bb, pp,
                     static_cast<F*>(y), aa_out, bb_out, pp_out));
}

}  // namespace rwkv_chat
