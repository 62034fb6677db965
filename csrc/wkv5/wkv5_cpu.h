// WKV-5/5.1/5.2/6 on the CPU (OpenMP over batch x head). Formula: models/rwkv/wkv.py wkv5_torch,
// ChatRWKV rwkv/cuda/rwkv5.cu, rwkv6.cu (pip rwkv 0.8.32); S indexed [key j, value i].
#pragma once

#include <vector>

#include "../common/cpu_kernels.h"

namespace rwkv_chat {

template <typename F, bool PER_TOKEN>
void wkv5_cpu_impl(int64_t B, int64_t T, int64_t H, int64_t N, const F* r_, const F* k_, const F* v_,
                   const float* w_, const float* u_, const float* s_, F* y_, float* s_out) {
    const int64_t C = H * N;
#pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        std::vector<float> S(s_ + bh * N * N, s_ + (bh + 1) * N * N);
        std::vector<float> r(N), k(N), v(N), y(N), w(N);
        const float* u = u_ + h * N;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t o = (b * T + t) * C + h * N;
            for (int64_t j = 0; j < N; ++j) {
                r[j] = static_cast<float>(r_[o + j]);
                k[j] = static_cast<float>(k_[o + j]);
                v[j] = static_cast<float>(v_[o + j]);
                w[j] = PER_TOKEN ? w_[o + j] : w_[h * N + j];
                y[j] = 0.f;
            }
            for (int64_t j = 0; j < N; ++j) {
                float* Sj = S.data() + j * N;
                const float rj = r[j], kj = k[j], uj = u[j], wj = w[j];
#pragma omp simd
                for (int64_t i = 0; i < N; ++i) {
                    const float x = kj * v[i];
                    y[i] += rj * (uj * x + Sj[i]);
                    Sj[i] = Sj[i] * wj + x;
                }
            }
            for (int64_t i = 0; i < N; ++i) y_[o + i] = static_cast<F>(y[i]);
        }
        std::copy(S.begin(), S.end(), s_out + bh * N * N);
    }
}

}  // namespace rwkv_chat
