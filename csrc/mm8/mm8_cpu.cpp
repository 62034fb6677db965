// mm8 on the CPU: y = x @ dequantize(w) for the reference's i8 weights, fp32 accumulation.
// Formula and its factored evaluation: see mm8_cuda.cu: y = rx * (sum_n xr[n] w[n, m] + 0.5 sum_n xr[n])
// + sum_n x[n] my[n] + mx[m] sum_n x[n], xr = x * ry. The sum over the uint8 weights runs over chunks of
// kChunk columns: for each input n in order, the chunk's accumulators take xr[n] * w[n, chunk] (each weight row
// segment read contiguously; four rows a pass). With AVX2 + FMA (checked at run time) the accumulators are
// 8-float vectors, the bytes widened by vpmovzxbd and each step one fused multiply-add; elsewhere plain loops
// (which the compiler vectorizes for the baseline).
// OpenMP over (chunk, row), the rows of a chunk inner so its weights stay in cache across the rows of a prompt.
// Each column's sum runs over n in order in one code path whatever the row count, so a row's results do not
// depend on the other rows of the call.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/cpu_kernels.h"

namespace rwkv_chat {
namespace {

constexpr int64_t kChunk = 512;

// acc[0:W] = sum_n xr[n] * w[n, 0:W] (row stride M), W <= kChunk; the plain form.
void chunk_sums_plain(const float* xr, int64_t N, const uint8_t* w, int64_t M, int64_t W, float* acc) {
    std::fill(acc, acc + W, 0.f);
    for (int64_t n = 0; n < N; ++n) {
        const float s = xr[n];
        const uint8_t* wn = w + n * M;
        for (int64_t m = 0; m < W; ++m) acc[m] += s * static_cast<float>(wn[m]);
    }
}

#ifdef RWKV_CHAT_X86_AVX2
// The same sums with AVX2 + FMA: each accumulator takes xr[n] * w[n, m] for n in order, one fused multiply-add a
// step (the tail columns too), so the results are those of the plain form where the compiler fuses its
// multiply-adds (aarch64, x86 built for FMA), within a rounding per step elsewhere.
__attribute__((target("avx2,fma"))) void chunk_sums_avx2(const float* xr, int64_t N, const uint8_t* w, int64_t M,
                                                        int64_t W, float* acc) {
    const int64_t V = W / 8 * 8;
    std::fill(acc, acc + W, 0.f);
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
        const uint8_t* w0 = w + n * M;
        const __m256 x0 = _mm256_set1_ps(xr[n]), x1 = _mm256_set1_ps(xr[n + 1]);
        const __m256 x2 = _mm256_set1_ps(xr[n + 2]), x3 = _mm256_set1_ps(xr[n + 3]);
        for (int64_t m = 0; m < V; m += 8) {
            const uint8_t* p = w0 + m;
            __m256 a = _mm256_loadu_ps(acc + m);
            a = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))), a);
            a = _mm256_fmadd_ps(x1, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + M)))), a);
            a = _mm256_fmadd_ps(x2, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 * M)))), a);
            a = _mm256_fmadd_ps(x3, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 3 * M)))), a);
            _mm256_storeu_ps(acc + m, a);
        }
        for (int64_t m = V; m < W; ++m)
            for (int k = 0; k < 4; ++k) acc[m] = std::fma(xr[n + k], static_cast<float>(w0[k * M + m]), acc[m]);
    }
    for (; n < N; ++n) {
        const uint8_t* wn = w + n * M;
        const __m256 s = _mm256_set1_ps(xr[n]);
        for (int64_t m = 0; m < V; m += 8)
            _mm256_storeu_ps(acc + m, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wn + m)))), _mm256_loadu_ps(acc + m)));
        for (int64_t m = V; m < W; ++m) acc[m] = std::fma(xr[n], static_cast<float>(wn[m]), acc[m]);
    }
}

#endif

void chunk_sums(const float* xr, int64_t N, const uint8_t* w, int64_t M, int64_t W, float* acc) {
#ifdef RWKV_CHAT_X86_AVX2
    if (cpu_has_avx2_fma()) {
        chunk_sums_avx2(xr, N, w, M, W, acc);
        return;
    }
#endif
    chunk_sums_plain(xr, N, w, M, W, acc);
}

template <typename F>
void mm8_impl(int64_t rows, int64_t N, int64_t M, const F* x, const uint8_t* w, const F* mx, const F* rx,
              const F* my, const F* ry, F* y) {
    const int64_t chunks = (M + kChunk - 1) / kChunk;
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
    for (int64_t t = 0; t < chunks; ++t) {
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t m0 = t * kChunk, m1 = std::min(M, m0 + kChunk);
            float acc[kChunk];
            chunk_sums(xr.data() + r * N, N, w + m0, M, m1 - m0, acc);
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
