// Fused CPU inference: building blocks shared by the per-generation layer functions (fused_cpu.cpp).
// Activations are float32 [rows, width] row-major; a weight is [in N, out M] row-major, float32 or
// the reference's i8 scheme (uint8 w [N, M], scales mx, rx [M], my, ry [N, 1], see models/quant.py).
// Small products run as hand loops on one thread (no dispatch, no fork/join); large ones go to
// at::mm (MKL/oneDNN) or the OpenMP mm8 kernel (mm8/mm8_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/cpu_kernels.h"

namespace rwkv_chat {
namespace fused {

// A weight [N, M]: float32 (w) or i8 (q + scales). Raw pointers into tensors the model keeps alive.
struct Mat {
    const float* w = nullptr;
    const uint8_t* q = nullptr;
    const float *mx = nullptr, *rx = nullptr, *my = nullptr, *ry = nullptr;
    int64_t N = 0, M = 0;
    bool present() const { return w != nullptr || q != nullptr; }
};

// Products with at least this many multiply-adds (rows * N * M) leave the hand loops.
constexpr int64_t kBigWork = int64_t(1) << 18;

// y[R, M] = x[R, N] (row stride ldx) @ W. y must not alias x.
inline void gemm(const float* x, int64_t ldx, int64_t R, const Mat& m, float* y) {
    const int64_t N = m.N, M = m.M;
    const bool big = R * N * M >= kBigWork;
    if (m.w != nullptr) {
        if (big) {
            auto opts = at::TensorOptions().dtype(at::kFloat);
            at::Tensor xt = at::from_blob(const_cast<float*>(x), {R, N}, {ldx, 1}, opts);
            at::Tensor wt = at::from_blob(const_cast<float*>(m.w), {N, M}, opts);
            at::Tensor yt = at::from_blob(y, {R, M}, opts);
            at::mm_out(yt, xt, wt);
            return;
        }
        for (int64_t r = 0; r < R; ++r) {
            const float* xr = x + r * ldx;
            float* yr = y + r * M;
            std::memset(yr, 0, sizeof(float) * M);
            for (int64_t n = 0; n < N; ++n) {
                const float xv = xr[n];
                const float* wn = m.w + n * M;
#pragma omp simd
                for (int64_t j = 0; j < M; ++j) yr[j] += xv * wn[j];
            }
        }
        return;
    }
    // i8: y = rx * (sum_n x ry w + 0.5 sum_n x ry) + sum_n x my + mx * sum_n x (as mm8_cpu_kernel)
    if (big && ldx == N) {
        mm8_cpu_kernel(0, R, N, M, x, m.q, m.mx, m.rx, m.my, m.ry, y);
        return;
    }
    for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * ldx;
        float* yr = y + r * M;
        std::memset(yr, 0, sizeof(float) * M);
        float sxr = 0.f, sxmy = 0.f, sx = 0.f;
        for (int64_t n = 0; n < N; ++n) {
            const float xv = xr[n];
            const float s = xv * m.ry[n];
            sxr += s;
            sxmy += xv * m.my[n];
            sx += xv;
            const uint8_t* wn = m.q + n * M;
#pragma omp simd
            for (int64_t j = 0; j < M; ++j) yr[j] += s * static_cast<float>(wn[j]);
        }
        for (int64_t j = 0; j < M; ++j) yr[j] = m.rx[j] * (yr[j] + 0.5f * sxr) + sxmy + m.mx[j] * sx;
    }
}

// LayerNorm over the last dim (eps 1e-5), rows of width C.
inline void layer_norm(const float* x, int64_t R, int64_t C, const float* w, const float* b, float* y) {
    for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * C;
        float* yr = y + r * C;
        float mean = 0.f;
        for (int64_t c = 0; c < C; ++c) mean += xr[c];
        mean /= static_cast<float>(C);
        float var = 0.f;
        for (int64_t c = 0; c < C; ++c) { const float d = xr[c] - mean; var += d * d; }
        var /= static_cast<float>(C);
        const float inv = 1.f / std::sqrt(var + 1e-5f), shift = -inv * mean;   // as ATen's LayerNorm
        for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] * inv + shift) * w[c] + b[c];
    }
}

// GroupNorm with one group per head of size N (eps 64e-5, the ln_x of v5-v7), in place on [R, H*N].
inline void head_group_norm(float* y, int64_t R, int64_t H, int64_t N, const float* w, const float* b) {
    for (int64_t r = 0; r < R; ++r) {
        for (int64_t h = 0; h < H; ++h) {
            float* yh = y + r * H * N + h * N;
            float mean = 0.f;
            for (int64_t i = 0; i < N; ++i) mean += yh[i];
            mean /= static_cast<float>(N);
            float var = 0.f;
            for (int64_t i = 0; i < N; ++i) { const float d = yh[i] - mean; var += d * d; }
            var /= static_cast<float>(N);
            const float inv = 1.f / std::sqrt(var + 64e-5f);
            for (int64_t i = 0; i < N; ++i) {       // as ATen's GroupNorm: x * scale + bias
                const float sc = inv * w[h * N + i];
                yh[i] = yh[i] * sc + (b[h * N + i] - sc * mean);
            }
        }
    }
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// prev[r] = the previous position's features of row r = (b, t): state[b] for t = 0, else x[r - 1].
// Writes dst[r] = prev[r] (mode 0) or prev[r] - x[r] (mode 1); then state[b] = x[(b, T - 1)].
inline void time_shift(const float* x, float* state, int64_t B, int64_t T, int64_t C, float* dst, int mode) {
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const int64_t r = b * T + t;
            const float* p = t == 0 ? state + b * C : x + (r - 1) * C;
            const float* xr = x + r * C;
            float* d = dst + r * C;
            if (mode == 0) std::memcpy(d, p, sizeof(float) * C);
            else for (int64_t c = 0; c < C; ++c) d[c] = p[c] - xr[c];
        }
        std::memcpy(state + b * C, x + (b * T + T - 1) * C, sizeof(float) * C);
    }
}

}  // namespace fused
}  // namespace rwkv_chat
