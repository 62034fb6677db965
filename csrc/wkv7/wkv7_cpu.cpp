// WKV-7 on the CPU (OpenMP over batch x head). Formula: models/rwkv/wkv.py wkv7_torch, ChatRWKV
// rwkv/cuda/rwkv7.cu (pip rwkv 0.8.32); S indexed [value i, key j].
#include <algorithm>
#include <vector>

#include "../common/cpu_kernels.h"

namespace rwkv_chat {
namespace {

template <typename F>
void wkv7_impl(int64_t B, int64_t T, int64_t H, int64_t N, const F* r_, const float* w_, const F* k_, const F* v_,
               const F* a_, const F* b_, const float* s_, float* y_, float* s_out) {
    const int64_t C = H * N;
#pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t bb = bh / H, h = bh % H;
        std::vector<float> S(s_ + bh * N * N, s_ + (bh + 1) * N * N);
        std::vector<float> r(N), w(N), k(N), v(N), a(N), b(N);
        for (int64_t t = 0; t < T; ++t) {
            const int64_t o = (bb * T + t) * C + h * N;
            for (int64_t j = 0; j < N; ++j) {
                r[j] = static_cast<float>(r_[o + j]);
                w[j] = w_[o + j];
                k[j] = static_cast<float>(k_[o + j]);
                v[j] = static_cast<float>(v_[o + j]);
                a[j] = static_cast<float>(a_[o + j]);
                b[j] = static_cast<float>(b_[o + j]);
            }
            for (int64_t i = 0; i < N; ++i) {
                float* Si = S.data() + i * N;
                float sa = 0.f;
#pragma omp simd reduction(+ : sa)
                for (int64_t j = 0; j < N; ++j) sa += a[j] * Si[j];
                const float vi = v[i];
                float y = 0.f;
#pragma omp simd reduction(+ : y)
                for (int64_t j = 0; j < N; ++j) {
                    Si[j] = Si[j] * w[j] + sa * b[j] + vi * k[j];
                    y += Si[j] * r[j];
                }
                y_[o + i] = y;
            }
        }
        std::copy(S.begin(), S.end(), s_out + bh * N * N);
    }
}

}  // namespace

void wkv7_cpu_kernel(int act, int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const float* w,
                     const void* k, const void* v, const void* a, const void* b, const float* s, float* y,
                     float* s_out) {
    RWKV_CHAT_CPU_DISPATCH_ACT(act, F,
        wkv7_impl<F>(B, T, H, N, static_cast<const F*>(r), w, static_cast<const F*>(k), static_cast<const F*>(v),
                     static_cast<const F*>(a), static_cast<const F*>(b), s, y, s_out));
}

}  // namespace rwkv_chat
