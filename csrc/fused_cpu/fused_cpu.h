// Fused CPU inference: building blocks shared by the per-generation layer functions (fused_cpu.cpp).
// Activations are float32 [rows, width] row-major; a weight is [in N, out M] row-major, float32 or
// the reference's i8 scheme (uint8 w [N, M], scales mx, rx [M], my, ry [N, 1], see models/formats/i8.py),
// or int4 in the GPTQ layout (models/formats/i4.py), or fp8 e4m3fn output-major (models/formats/f8.py; both through
// the compiled products of gemvq/gemvq_cpu.cpp).
// Small products run as hand loops on one thread (no dispatch, no fork/join); large ones go to
// at::mm (MKL/oneDNN) or the OpenMP mm8 kernel (mm8/mm8_cpu.cpp); an i8 matrix times a prompt's rows is
// dequantized for at::mm.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "../common/cpu_kernels.h"

namespace rwkv_chat {
namespace fused {

// A weight [N, M]: float32 (w), i8 (q + scales) or int4 (qw + qz + sc). Raw pointers into tensors the model
// keeps alive.
struct Mat {
    const float* w = nullptr;
    const uint8_t* q = nullptr;
    const float *mx = nullptr, *rx = nullptr, *my = nullptr, *ry = nullptr;
    // int4, GPTQ v1 zeros: qweight int32 [Kp/8, Np], qzeros int32 [Kp/group, Np/8], scales [Kp/group, Np] of
    // sc_type (0 float32, 1 float16, 2 bfloat16); Kp, Np: N and M rounded up to multiples of 8
    const int32_t *qw = nullptr, *qz = nullptr;
    const void* sc = nullptr;
    int sc_type = 0;
    int64_t Kp = 0, Np = 0, group = 0;
    // fp8 e4m3fn (models/formats/f8.py), output-major: w8 bytes [M, N], fscale float32 [M]
    const uint8_t* w8 = nullptr;
    const float* fscale = nullptr;
    int64_t N = 0, M = 0;
    bool present() const { return w != nullptr || q != nullptr || qw != nullptr || w8 != nullptr; }
};

// x [R, N] with row stride ldx as contiguous rows of N floats: x itself where it already is (or one row), else a
// copy held by `packed`.
inline const float* packed_rows(const float* x, int64_t ldx, int64_t R, int64_t N, at::Tensor& packed) {
    if (R <= 1 || ldx == N) return x;
    packed = at::empty({R, N}, at::TensorOptions().dtype(at::kFloat));
    for (int64_t r = 0; r < R; ++r) std::memcpy(packed.data_ptr<float>() + r * N, x + r * ldx, N * sizeof(float));
    return packed.data_ptr<float>();
}

// The most rows an fp8 product takes through the compiled product (F8_CPU_ROWS of models/kernels/dispatch.py);
// more rows dequantize the matrix for at::mm.
constexpr int64_t kF8Rows = 32;

// y[R, M] = x[R, N] (row stride ldx) @ W for an fp8 W: gemvq_f8_cpu_kernel (e4m3 made float32 as read, a row's
// sums the same alone or batched), or above kF8Rows rows W dequantized (e4m3 times the channel's scale, as
// f8.mmf8_torch) for at::mm.
inline void gemm_f8(const float* x, int64_t ldx, int64_t R, const Mat& m, float* y) {
    const int64_t N = m.N, M = m.M;
    auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor packed;
    x = packed_rows(x, ldx, R, N, packed);   // both forms read rows of N floats
    if (R <= kF8Rows) {
        gemvq_f8_cpu_kernel(0, R, N, M, x, m.w8, m.fscale, y);
        return;
    }
    at::Tensor w8 = at::from_blob(const_cast<uint8_t*>(m.w8), {M, N}, at::TensorOptions().dtype(at::kFloat8_e4m3fn));
    at::Tensor wt = w8.to(at::kFloat) * at::from_blob(const_cast<float*>(m.fscale), {M, 1}, opts);
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {R, N}, opts);
    at::Tensor yt = at::from_blob(y, {R, M}, opts);
    at::mm_out(yt, xt, wt.t());
}

// The most rows an int4 product takes through the compiled product (as I4_CPU_ROWS of models/kernels/dispatch.py);
// more rows (a prompt) dequantize the matrix once for at::mm.
constexpr int64_t kI4Rows = 32;

// W [N, M] of an int4 Mat as float32: (q - z) s, exact in float32 (a nibble difference times a 16-bit scale).
template <typename S>
void dequantize_i4(const Mat& m, const S* sc, float* wd) {
    const int64_t N = m.N, M = m.M;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int64_t g = n / m.group;
        const int32_t* qn = m.qw + (n / 8) * m.Np;
        const int32_t* zg = m.qz + g * (m.Np / 8);
        const S* sg = sc + g * m.Np;
        const int shift = 4 * static_cast<int>(n % 8);
        float* dn = wd + n * M;
        for (int64_t j = 0; j < M; ++j) {
            const int32_t q = static_cast<int32_t>((static_cast<uint32_t>(qn[j]) >> shift) & 15u);
            const int32_t z = static_cast<int32_t>(((static_cast<uint32_t>(zg[j / 8]) >> (4 * (j % 8))) + 1u) & 15u);
            dn[j] = static_cast<float>(q - z) * static_cast<float>(sg[j]);
        }
    }
}

// y[R, M] = x[R, N] (row stride ldx) @ W for an int4 W (gemvq_i4_cpu_kernel: the words read as stored, a row's
// result independent of the rows beside it); above kI4Rows rows W is dequantized (dequantize_i4) for at::mm.
inline void gemm_i4(const float* x, int64_t ldx, int64_t R, const Mat& m, float* y) {
    const int64_t N = m.N, M = m.M;
    auto opts = at::TensorOptions().dtype(at::kFloat);
    if (R <= kI4Rows) {
        at::Tensor packed;
        x = packed_rows(x, ldx, R, N, packed);
        gemvq_i4_cpu_kernel(0, m.sc_type, R, N, m.Kp, M, m.Np, m.group, x, m.qw, m.qz, m.sc, y);
        return;
    }
    at::Tensor wt = at::empty({N, M}, opts);
    RWKV_CHAT_CPU_DISPATCH_ACT(m.sc_type, S, dequantize_i4(m, static_cast<const S*>(m.sc), wt.data_ptr<float>()));
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {R, N}, {ldx, 1}, opts);
    at::Tensor yt = at::from_blob(y, {R, M}, opts);
    at::mm_out(yt, xt, wt);
}

// Products with at least this many multiply-adds (rows * N * M) leave the hand loops ...
constexpr int64_t kBigWork = int64_t(1) << 18;
// ... unless the matrix has fewer entries (N * M) than kSmallMat and the call has at most kStepRows rows
// (a batched decode step of up to 16 conversations): those run as hand loops, one row at a time, whatever
// the row count, so a row's result never depends on how many rows share the step and the small models
// decode row-count invariant without padding rows (the work rule alone sent a 64x256 matrix to BLAS at
// 16 rows and to the hand loop at 4). Calls of 1-4 rows take the same path as under the work rule for
// these matrices (4 * 2^16 = kBigWork), so one-token steps are unchanged; calls above kStepRows rows
// (prompts) keep the work rule, whose BLAS products follow the eager path's summation order.
constexpr int64_t kSmallMat = int64_t(1) << 16;
constexpr int64_t kStepRows = 16;

// The layer functions are compiled for AVX-512, AVX2+FMA and the baseline, picked at load time by the
// CPU (GCC function multiversioning); the helpers below are inlined into each clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define RWKV_FUSED_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RWKV_FUSED_CLONES
#endif
#define RWKV_FUSED_INLINE inline __attribute__((always_inline))

// 8 floats as one value (one AVX2 register; two SSE registers in the baseline clone): the accumulators
// stay in registers (a plain float array is spilled to the stack on every step).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"   // v8 returned by value: every caller inlines these helpers
#endif
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
RWKV_FUSED_INLINE v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
RWKV_FUSED_INLINE void store8(float* p, const v8& v) { *reinterpret_cast<v8u*>(p) = v; }
RWKV_FUSED_INLINE v8 load8(const uint8_t* p) {
    u8x8 u;
    std::memcpy(&u, p, 8);
    return __builtin_convertvector(u, v8);
}

// y[0:8K] = x[0:N] @ W[:, 0:8K] (row stride M; W float32 or uint8), K accumulators in registers.
template <int K, typename W>
RWKV_FUSED_INLINE void gemv_tile(const float* x, int64_t N, const W* w, int64_t M, float* y) {
    v8 acc[K];
    for (int q = 0; q < K; ++q) acc[q] = v8{};
    for (int64_t n = 0; n < N; ++n) {
        const v8 xv = v8{} + x[n];
        const W* wn = w + n * M;
        for (int q = 0; q < K; ++q) acc[q] += xv * load8(wn + 8 * q);
    }
    for (int q = 0; q < K; ++q) store8(y + 8 * q, acc[q]);
}

// the last M % 8 columns, one at a time
template <typename W>
RWKV_FUSED_INLINE void gemv_col(const float* x, int64_t N, const W* w, int64_t M, float* y) {
    float acc = 0.f;
    for (int64_t n = 0; n < N; ++n) acc += x[n] * static_cast<float>(w[n * M]);
    *y = acc;
}

template <typename W>
RWKV_FUSED_INLINE void gemv(const float* x, int64_t N, const W* w, int64_t M, float* y) {
    int64_t j = 0;
    for (; j + 64 <= M; j += 64) gemv_tile<8>(x, N, w + j, M, y + j);
    for (; j + 8 <= M; j += 8) gemv_tile<1>(x, N, w + j, M, y + j);
    for (; j < M; ++j) gemv_col(x, N, w + j, M, y + j);
}

// Columns [64 t0, 64 t1) of y = x @ W (one row x), in register tiles; compiled per CPU (clones).
void gemv_tiles(const float* x, int64_t N, const float* w, int64_t M, float* y, int64_t t0, int64_t t1);

// y = x @ W for one row and a large W: 64-column tiles split over the OpenMP threads, each streaming
// its tiles' rows once (memory-bound: the weight bytes are the cost).
template <typename W>
inline void gemv_parallel(const float* x, int64_t N, const W* w, int64_t M, float* y) {
    const int64_t tiles = M / 64;
#pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t t0 = tiles * id / nt, t1 = tiles * (id + 1) / nt;
        if (t1 > t0) gemv_tiles(x, N, w, M, y, t0, t1);
    }
    for (int64_t j = tiles * 64; j < M; ++j) {
        float acc = 0.f;
        for (int64_t n = 0; n < N; ++n) acc += x[n] * static_cast<float>(w[n * M + j]);
        y[j] = acc;
    }
}

// y[R, M] = x[R, N] (row stride ldx) @ W. y must not alias x.
RWKV_FUSED_INLINE void gemm(const float* x, int64_t ldx, int64_t R, const Mat& m, float* y) {
    if (m.qw != nullptr) {
        gemm_i4(x, ldx, R, m, y);
        return;
    }
    if (m.w8 != nullptr) {
        gemm_f8(x, ldx, R, m, y);
        return;
    }
    const int64_t N = m.N, M = m.M;
    const bool big = R * N * M >= kBigWork && (N * M >= kSmallMat || R > kStepRows);
    if (m.w != nullptr) {
        if (big && R == 1 && omp_get_max_threads() > 1) {   // measured: beats MKL's sgemv with 2 threads,
            gemv_parallel(x, N, m.w, M, y);                 // not with 1
            return;
        }
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
            gemv(xr, N, m.w, M, yr);
        }
        return;
    }
    // i8, a prompt (more than kStepRows rows): the matrix dequantized, (w + 0.5) ry rx + my + mx (the reference's
    // i8 formula, models/formats/i8.py), then at::mm: the rows share the BLAS product's tiles
    if (big && R > kStepRows) {
        at::Tensor wt = at::empty({N, M}, at::TensorOptions().dtype(at::kFloat));
        float* wd = wt.data_ptr<float>();
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const uint8_t* qn = m.q + n * M;
            float* dn = wd + n * M;
            const float ry = m.ry[n], my = m.my[n];
            for (int64_t j = 0; j < M; ++j) dn[j] = (static_cast<float>(qn[j]) + 0.5f) * ry * m.rx[j] + my + m.mx[j];
        }
        auto opts = at::TensorOptions().dtype(at::kFloat);
        at::Tensor xt = at::from_blob(const_cast<float*>(x), {R, N}, {ldx, 1}, opts);
        at::Tensor yt = at::from_blob(y, {R, M}, opts);
        at::mm_out(yt, xt, wt);
        return;
    }
    // i8: y = rx * (sum_n x ry w + 0.5 sum_n x ry) + sum_n x my + mx * sum_n x (as mm8_cpu_kernel)
    if (big && ldx == N) {
        mm8_cpu_kernel(0, R, N, M, x, m.q, m.mx, m.rx, m.my, m.ry, y);
        return;
    }
    float xs[1024];
    for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * ldx;
        float* yr = y + r * M;
        float sxr = 0.f, sxmy = 0.f, sx = 0.f;
        for (int64_t n0 = 0; n0 < N; n0 += 1024) {      // xs = x * ry, in slices of 1024 inputs
            const int64_t n1 = std::min<int64_t>(N, n0 + 1024);
            for (int64_t n = n0; n < n1; ++n) {
                const float xv = xr[n];
                xs[n - n0] = xv * m.ry[n];
                sxr += xs[n - n0];
                sxmy += xv * m.my[n];
                sx += xv;
            }
            if (n0 == 0) {             // the first slice writes y, later ones add into it
                gemv(xs, n1 - n0, m.q, M, yr);
            } else {
                float part[64];
                for (int64_t j0 = 0; j0 < M; j0 += 64) {
                    const int64_t mj = std::min<int64_t>(64, M - j0);
                    for (int64_t j = 0; j < mj; ++j) gemv_col(xs, n1 - n0, m.q + n0 * M + j0 + j, M, part + j);
                    for (int64_t j = 0; j < mj; ++j) yr[j0 + j] += part[j];
                }
            }
        }
        for (int64_t j = 0; j < M; ++j) yr[j] = m.rx[j] * (yr[j] + 0.5f * sxr) + sxmy + m.mx[j] * sx;
    }
}

// LayerNorm over the last dim (eps 1e-5), rows of width C.
RWKV_FUSED_INLINE void layer_norm(const float* x, int64_t R, int64_t C, const float* w, const float* b, float* y) {
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
RWKV_FUSED_INLINE void head_group_norm(float* y, int64_t R, int64_t H, int64_t N, const float* w, const float* b) {
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

RWKV_FUSED_INLINE float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// prev[r] = the previous position's features of row r = (b, t): state[b] for t = 0, else x[r - 1].
// Writes dst[r] = prev[r] (mode 0) or prev[r] - x[r] (mode 1); then state[b] = x[(b, T - 1)].
RWKV_FUSED_INLINE void time_shift(const float* x, float* state, int64_t B, int64_t T, int64_t C, float* dst, int mode) {
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
