// mm8 on the CPU: y = x @ dequantize(w) for the reference's i8 weights, fp32 accumulation.
// Formula and its factored evaluation: see mm8_cuda.cu. OpenMP over (row, column block); each
// thread streams the weight rows of its column block (contiguous bytes).
#include <algorithm>
#include <vector>

#include "../common/cpu_kernels.h"

namespace rwkv_chat {
namespace {

template <typename F>
void mm8_impl(int64_t rows, int64_t N, int64_t M, const F* x, const uint8_t* w, const F* mx, const F* rx,
              const F* my, const F* ry, F* y) {
    constexpr int64_t kCols = 256;
    const int64_t blocks = (M + kCols - 1) / kCols;
    // Per-row scalars: xr[n] = x[n] ry[n], sum xr, sum x my, sum x.
    std::vector<float> xr(rows * N), sxr(rows), sxmy(rows), sx(rows);
    for (int64_t r = 0; r < rows; ++r) {
        float a = 0.f, b = 0.f, c = 0.f;
        for (int64_t n = 0; n < N; ++n) {
            const float xv = static_cast<float>(x[r * N + n]);
            xr[r * N + n] = xv * static_cast<float>(ry[n]);
            a += xr[r * N + n];
            b += xv * static_cast<float>(my[n]);
            c += xv;
        }
        sxr[r] = a; sxmy[r] = b; sx[r] = c;
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t m0 = blk * kCols, m1 = std::min(M, m0 + kCols);
            float acc[kCols];
            std::fill(acc, acc + kCols, 0.f);
            const float* xrr = xr.data() + r * N;
            for (int64_t n = 0; n < N; ++n) {
                const float s = xrr[n];
                const uint8_t* wr = w + n * M + m0;
#pragma omp simd
                for (int64_t m = 0; m < m1 - m0; ++m) acc[m] += s * static_cast<float>(wr[m]);
            }
            for (int64_t m = m0; m < m1; ++m) {
                const float v = static_cast<float>(rx[m]) * (acc[m - m0] + 0.5f * sxr[r]) + sxmy[r] +
                                static_cast<float>(mx[m]) * sx[r];
                y[r * M + m] = static_cast<F>(v);
            }
        }
    }
}

}  // namespace

void mm8_cpu_kernel(int act, int64_t rows, int64_t N, int64_t M, const void* x, const uint8_t* w, const void* mx,
                    const void* rx, const void* my, const void* ry, void* y) {
    RWKV_CHAT_CPU_DISPATCH_ACT(act, F,
        mm8_impl<F>(rows, N, M, static_cast<const F*>(x), w, static_cast<const F*>(mx), static_cast<const F*>(rx),
                    static_cast<const F*>(my), static_cast<const F*>(ry), static_cast<F*>(y)));
}

}  // namespace rwkv_chat
