// int4 products on the CPU: y = x @ dequantize(q) for a weight in the GPTQ layout (models/formats/i4.py), read as
// it is stored (0.5 byte per weight; no dequantized copy). Formula (AutoGPTQ "v1" zeros):
//   w[k, n] = (q[k, n] - z[g, n]) * s[g, n],  z = (stored zero + 1) mod 16,  g = k / group,
// evaluated per group as  y[r, n] += s[g, n] * (sum_k x[r, k] q[k, n] - z[g, n] * sum_k x[r, k])  in float32
// (the integer nibbles enter the sums exactly). OpenMP over column blocks; each thread streams the packed words of
// its block (contiguous int32 along N: qweight [Kp/8, Np]), turns each word row into floats once and adds it into
// up to kMaxRows rows of x (more rows: passes of kMaxRows), vectorized over the columns. A row's sums take the same
// operations in the same order whatever the number of rows (one row: straight from the word; several: from the
// word row's floats, exact either way), so a row's result does not depend on the rows beside it. group must be a multiple of 8 (a word never straddles two groups); K <= Kp (rows k >= K are
// padding: x is taken as 0 there), N <= Np.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/cpu_kernels.h"

namespace rwkv_chat {
namespace {

// ar[m] += sum_j xv[j] * nibble j of wr[m], j = 0..7 in order, for m < cols (one row of x, one word row).
void word_row_plain(const uint32_t* wr, int64_t cols, const float* xv, float* ar) {
#pragma omp simd
    for (int64_t m = 0; m < cols; ++m) {
        const uint32_t w = wr[m];
        float a = ar[m];
        for (int j = 0; j < 8; ++j) a += xv[j] * static_cast<float>(static_cast<int32_t>((w >> (4 * j)) & 15u));
        ar[m] = a;
    }
}

#ifdef RWKV_CHAT_X86_AVX2
// The same with AVX2 + FMA: 8 columns a vector, each nibble widened in the register and one fused multiply-add
// per nibble, in the same order.
__attribute__((target("avx2,fma"))) void word_row_avx2(const uint32_t* wr, int64_t cols, const float* xv,
                                                      float* ar) {
    const __m256i low = _mm256_set1_epi32(15);
    __m256 x[8];
    for (int j = 0; j < 8; ++j) x[j] = _mm256_set1_ps(xv[j]);
    int64_t m = 0;
    for (; m + 8 <= cols; m += 8) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + m));
        __m256 a = _mm256_loadu_ps(ar + m);
        a = _mm256_fmadd_ps(x[0], _mm256_cvtepi32_ps(_mm256_and_si256(w, low)), a);
        a = _mm256_fmadd_ps(x[1], _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 4), low)), a);
        a = _mm256_fmadd_ps(x[2], _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 8), low)), a);
        a = _mm256_fmadd_ps(x[3], _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 12), low)), a);
        a = _mm256_fmadd_ps(x[4], _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 16), low)), a);
        a = _mm256_fmadd_ps(x[5], _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 20), low)), a);
        a = _mm256_fmadd_ps(x[6], _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 24), low)), a);
        a = _mm256_fmadd_ps(x[7], _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 28)), a);
        _mm256_storeu_ps(ar + m, a);
    }
    for (; m < cols; ++m) {
        float a = ar[m];
        for (int j = 0; j < 8; ++j) a = std::fma(xv[j], static_cast<float>((wr[m] >> (4 * j)) & 15u), a);
        ar[m] = a;
    }
}

// The same with AVX-512: 16 columns a vector, each nibble turned into its float by a table lookup (vpermps reads
// the low four bits of each lane: no mask), then the AVX2 form for the last columns; the same fused multiply-adds
// in the same order, so the sums equal the AVX2 form's bit for bit.
__attribute__((target("avx512f,avx2,fma"))) void word_row_avx512(const uint32_t* wr, int64_t cols, const float* xv,
                                                                float* ar) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 x[8];
    for (int j = 0; j < 8; ++j) x[j] = _mm512_set1_ps(xv[j]);
    int64_t m = 0;
    for (; m + 16 <= cols; m += 16) {
        const __m512i w = _mm512_loadu_si512(wr + m);
        __m512 a = _mm512_loadu_ps(ar + m);
        a = _mm512_fmadd_ps(x[0], _mm512_permutexvar_ps(w, table), a);
        a = _mm512_fmadd_ps(x[1], _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), table), a);
        a = _mm512_fmadd_ps(x[2], _mm512_permutexvar_ps(_mm512_srli_epi32(w, 8), table), a);
        a = _mm512_fmadd_ps(x[3], _mm512_permutexvar_ps(_mm512_srli_epi32(w, 12), table), a);
        a = _mm512_fmadd_ps(x[4], _mm512_permutexvar_ps(_mm512_srli_epi32(w, 16), table), a);
        a = _mm512_fmadd_ps(x[5], _mm512_permutexvar_ps(_mm512_srli_epi32(w, 20), table), a);
        a = _mm512_fmadd_ps(x[6], _mm512_permutexvar_ps(_mm512_srli_epi32(w, 24), table), a);
        a = _mm512_fmadd_ps(x[7], _mm512_permutexvar_ps(_mm512_srli_epi32(w, 28), table), a);
        _mm512_storeu_ps(ar + m, a);
    }
    if (m < cols) word_row_avx2(wr + m, cols - m, xv, ar + m);
}

// ar[m] += sum_j xv[j] * nib[j][m], j = 0..7 in order (nib: a word row's nibbles as floats, stride kCols): the
// operations of word_row_avx2, so a row gets the same sums alone or beside others.
__attribute__((target("avx2,fma"))) void nib_row_avx2(const float* nib, int64_t stride, int64_t cols,
                                                     const float* xv, float* ar) {
    __m256 x[8];
    for (int j = 0; j < 8; ++j) x[j] = _mm256_set1_ps(xv[j]);
    int64_t m = 0;
    for (; m + 8 <= cols; m += 8) {
        __m256 a = _mm256_loadu_ps(ar + m);
        for (int j = 0; j < 8; ++j) a = _mm256_fmadd_ps(x[j], _mm256_loadu_ps(nib + j * stride + m), a);
        _mm256_storeu_ps(ar + m, a);
    }
    for (; m < cols; ++m) {
        float a = ar[m];
        for (int j = 0; j < 8; ++j) a = std::fma(xv[j], nib[j * stride + m], a);
        ar[m] = a;
    }
}

#endif

// ar[m] += sum_j xv[j] * nib[j][m] in word_row_plain's order (nib stride: the row of nibble j).
void nib_row_plain(const float* nib, int64_t stride, int64_t cols, const float* xv, float* ar) {
#pragma omp simd
    for (int64_t m = 0; m < cols; ++m) {
        float a = ar[m];
        for (int j = 0; j < 8; ++j) a += xv[j] * nib[j * stride + m];
        ar[m] = a;
    }
}

#ifdef RWKV_CHAT_X86_AVX2
// nib_row_avx2 with 16 columns a vector (the same fused multiply-adds).
__attribute__((target("avx512f,avx2,fma"))) void nib_row_avx512(const float* nib, int64_t stride, int64_t cols,
                                                               const float* xv, float* ar) {
    __m512 x[8];
    for (int j = 0; j < 8; ++j) x[j] = _mm512_set1_ps(xv[j]);
    int64_t m = 0;
    for (; m + 16 <= cols; m += 16) {
        __m512 a = _mm512_loadu_ps(ar + m);
        for (int j = 0; j < 8; ++j) a = _mm512_fmadd_ps(x[j], _mm512_loadu_ps(nib + j * stride + m), a);
        _mm512_storeu_ps(ar + m, a);
    }
    if (m < cols) nib_row_avx2(nib + m, stride, cols - m, xv, ar + m);
}
#endif

void nib_row(const float* nib, int64_t stride, int64_t cols, const float* xv, float* ar) {
#ifdef RWKV_CHAT_X86_AVX2
    if (cpu_has_avx512f()) {
        nib_row_avx512(nib, stride, cols, xv, ar);
        return;
    }
    if (cpu_has_avx2_fma()) {
        nib_row_avx2(nib, stride, cols, xv, ar);
        return;
    }
#endif
    nib_row_plain(nib, stride, cols, xv, ar);
}

// nib[j * stride + m] = nibble j of wr[m] as a float (exact), m < cols.
void decode_nibbles_plain(const uint32_t* wr, int64_t cols, float* nib, int64_t stride) {
    for (int j = 0; j < 8; ++j) {
#pragma omp simd
        for (int64_t m = 0; m < cols; ++m)
            nib[j * stride + m] = static_cast<float>(static_cast<int32_t>((wr[m] >> (4 * j)) & 15u));
    }
}

#ifdef RWKV_CHAT_X86_AVX2
// The same, 16 columns a vector, the float of each nibble by the table lookup of word_row_avx512.
__attribute__((target("avx512f,avx2,fma"))) void decode_nibbles_avx512(const uint32_t* wr, int64_t cols, float* nib,
                                                                      int64_t stride) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t m = 0;
    for (; m + 16 <= cols; m += 16) {
        const __m512i w = _mm512_loadu_si512(wr + m);
        for (int j = 0; j < 8; ++j)
            _mm512_storeu_ps(nib + j * stride + m, _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4 * j), table));
    }
    if (m < cols) decode_nibbles_plain(wr + m, cols - m, nib + m, stride);
}
#endif

void decode_nibbles(const uint32_t* wr, int64_t cols, float* nib, int64_t stride) {
#ifdef RWKV_CHAT_X86_AVX2
    if (cpu_has_avx512f()) {
        decode_nibbles_avx512(wr, cols, nib, stride);
        return;
    }
#endif
    decode_nibbles_plain(wr, cols, nib, stride);
}

void word_row(const uint32_t* wr, int64_t cols, const float* xv, float* ar) {
#ifdef RWKV_CHAT_X86_AVX2
    if (cpu_has_avx512f()) {
        word_row_avx512(wr, cols, xv, ar);
        return;
    }
    if (cpu_has_avx2_fma()) {
        word_row_avx2(wr, cols, xv, ar);
        return;
    }
#endif
    word_row_plain(wr, cols, xv, ar);
}

constexpr int64_t kCols = 128;    // output columns per block (one thread)
constexpr int64_t kMaxRows = 8;   // rows of x per pass over the weights

template <typename F, typename S>
void i4_impl(int64_t rows, int64_t K, int64_t Kp, int64_t N, int64_t Np, int64_t group, const F* x,
             const int32_t* qw, const int32_t* qz, const S* sc, F* y) {
    const int64_t blocks = (N + kCols - 1) / kCols, groups = Kp / group;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t m0 = blk * kCols, cols = std::min(N, m0 + kCols) - m0;
        float out[kMaxRows][kCols], acc[kMaxRows][kCols], nib[8][kCols];
        for (int64_t r = 0; r < rows; ++r) std::fill(out[r], out[r] + cols, 0.f);
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
            if (k0 >= k1) break;
            float sx[kMaxRows] = {};
            // x[r, k .. k + 8) as floats (0 past the group's end), added to the row's sum
            auto load_x = [&](int64_t r, int64_t k, float* xv) {
                for (int j = 0; j < 8; ++j) {
                    xv[j] = k + j < k1 ? static_cast<float>(x[r * K + k + j]) : 0.f;
                    sx[r] += xv[j];
                }
            };
            for (int64_t r = 0; r < rows; ++r) std::fill(acc[r], acc[r] + cols, 0.f);
            for (int64_t k = k0; k < k1; k += 8) {
                const uint32_t* wr = reinterpret_cast<const uint32_t*>(qw + (k / 8) * Np + m0);
                if (rows == 1) {                           // one row: the nibbles straight into the sums
                    float xv[8];
                    load_x(0, k, xv);
                    word_row(wr, cols, xv, acc[0]);
                    continue;
                }
                decode_nibbles(wr, cols, nib[0], kCols);   // the word row's nibbles, once for every row of x
                for (int64_t r = 0; r < rows; ++r) {
                    float xv[8];
                    load_x(r, k, xv);
                    nib_row(nib[0], kCols, cols, xv, acc[r]);
                }
            }
            const int32_t* zr = qz + g * (Np / 8);
            const S* sr = sc + g * Np + m0;
            for (int64_t m = 0; m < cols; ++m) {
                const int64_t n = m0 + m;
                const float z = static_cast<float>(((static_cast<uint32_t>(zr[n / 8]) >> (4 * (n % 8))) + 1u) & 15u);
                const float s = static_cast<float>(sr[m]);
                for (int64_t r = 0; r < rows; ++r) out[r][m] += s * (acc[r][m] - z * sx[r]);
            }
        }
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t m = 0; m < cols; ++m) y[r * N + m0 + m] = static_cast<F>(out[r][m]);
    }
}

}  // namespace

void gemvq_i4_cpu_kernel(int act, int scale_type, int64_t rows, int64_t K, int64_t Kp, int64_t N, int64_t Np,
                         int64_t group, const void* x, const int32_t* qweight, const int32_t* qzeros,
                         const void* scales, void* y) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {       // kMaxRows rows of x share each decoded word row
        const int64_t n = std::min(kMaxRows, rows - r0);
        const int esize = act == 0 ? 4 : 2;
        const char* xb = static_cast<const char*>(x) + r0 * K * esize;
        char* yb = static_cast<char*>(y) + r0 * N * esize;
        RWKV_CHAT_CPU_DISPATCH_ACT(act, F,
            RWKV_CHAT_CPU_DISPATCH_ACT(scale_type, S,
                i4_impl<F, S>(n, K, Kp, N, Np, group, reinterpret_cast<const F*>(xb), qweight, qzeros,
                              static_cast<const S*>(scales), reinterpret_cast<F*>(yb))));
    }
}


// fp8 e4m3fn products on the CPU: y[r, n] = fscale[n] * sum_k x[r, k] * e4m3(w8[n, k]) (models/formats/f8.py,
// output-major w8 [N, K]), the e4m3 bytes read as stored (1 byte per weight) and made float32 exactly in registers:
// the byte's low seven bits shifted into a float32's exponent and mantissa fields (bits 20-26) give 2^-120 times
// its magnitude, normal or subnormal (the float32 is then subnormal itself: denormals must not be flushed, as
// torch leaves them), the sign bit moved to bit 31, times 2^120. OpenMP over outputs; each output's K bytes are
// decoded once per 8 inputs and added into every row of x, a row's sums in the same order alone or batched.
namespace {

constexpr float kE4m3Scale = 1.329227995784915872903807060280344576e36f;   // 2^120

inline float e4m3_value(uint8_t b) {
    const uint32_t bits = (static_cast<uint32_t>(b & 0x80u) << 24) | (static_cast<uint32_t>(b & 0x7Fu) << 20);
    float f;
    std::memcpy(&f, &bits, 4);
    return f * kE4m3Scale;
}

constexpr int64_t kF8MaxRows = 8;   // rows of x per pass over the weights

// acc[r] (its first 8 of 32 lanes) += x[r, k0 .. k0 + 8k) * the output's bytes, lane j summing the inputs k = j (mod 8); the
// remaining K % 8 inputs into tail[r] in order.
void f8_row_plain(const uint8_t* wn, int64_t K, int64_t rows, const float* const* xr, float (*acc)[32], float* tail) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        float wv[8];
        for (int j = 0; j < 8; ++j) wv[j] = e4m3_value(wn[k + j]);
        for (int64_t r = 0; r < rows; ++r)
            for (int j = 0; j < 8; ++j) acc[r][j] += xr[r][k + j] * wv[j];
    }
    for (; k < K; ++k) {
        const float wv = e4m3_value(wn[k]);
        for (int64_t r = 0; r < rows; ++r) tail[r] += xr[r][k] * wv;
    }
}

#ifdef RWKV_CHAT_X86_AVX2
__attribute__((target("avx2,fma"))) void f8_row_avx2(const uint8_t* wn, int64_t K, int64_t rows,
                                                    const float* const* xr, float (*acc)[32], float* tail) {
    const __m256i mag = _mm256_set1_epi32(0x7F), sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256 big = _mm256_set1_ps(kE4m3Scale);
    __m256 a[kF8MaxRows];
    for (int64_t r = 0; r < rows; ++r) a[r] = _mm256_loadu_ps(acc[r]);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wn + k)));
        const __m256i bits = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(b, 24), sign),
                                             _mm256_slli_epi32(_mm256_and_si256(b, mag), 20));
        const __m256 w = _mm256_mul_ps(_mm256_castsi256_ps(bits), big);
        for (int64_t r = 0; r < rows; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k), w, a[r]);
    }
    for (int64_t r = 0; r < rows; ++r) _mm256_storeu_ps(acc[r], a[r]);
    for (; k < K; ++k) {
        const float wv = e4m3_value(wn[k]);
        for (int64_t r = 0; r < rows; ++r) tail[r] = std::fma(xr[r][k], wv, tail[r]);
    }
}

// The same with AVX-512: 16 inputs a vector, two accumulators a row (lanes 0-15: the inputs k = j mod 32 < 16,
// lanes 16-31: the others; two chains of fused multiply-adds, so one row does not wait on each one's latency), then
// the AVX2 form for the last K mod 32 inputs (one more 16 into the first accumulator, then 8s and singles).
__attribute__((target("avx512f,avx2,fma"))) __m512i e4m3_bits16(const uint8_t* p) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi32(b, 24), _mm512_set1_epi32(static_cast<int>(0x80000000u))),
                           _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7F)), 20));
}

__attribute__((target("avx512f,avx2,fma"))) void f8_row_avx512(const uint8_t* wn, int64_t K, int64_t rows,
                                                               const float* const* xr, float (*acc)[32], float* tail) {
    const __m512 big = _mm512_set1_ps(kE4m3Scale);
    __m512 a0[kF8MaxRows], a1[kF8MaxRows];
    for (int64_t r = 0; r < rows; ++r) {
        a0[r] = _mm512_loadu_ps(acc[r]);
        a1[r] = _mm512_loadu_ps(acc[r] + 16);
    }
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 w0 = _mm512_mul_ps(_mm512_castsi512_ps(e4m3_bits16(wn + k)), big);
        const __m512 w1 = _mm512_mul_ps(_mm512_castsi512_ps(e4m3_bits16(wn + k + 16)), big);
        for (int64_t r = 0; r < rows; ++r) {
            a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + k), w0, a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + k + 16), w1, a1[r]);
        }
    }
    if (k + 16 <= K) {
        const __m512 w0 = _mm512_mul_ps(_mm512_castsi512_ps(e4m3_bits16(wn + k)), big);
        for (int64_t r = 0; r < rows; ++r) a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + k), w0, a0[r]);
        k += 16;
    }
    for (int64_t r = 0; r < rows; ++r) {
        _mm512_storeu_ps(acc[r], a0[r]);
        _mm512_storeu_ps(acc[r] + 16, a1[r]);
    }
    if (k < K) {
        const float* xk[kF8MaxRows];
        for (int64_t r = 0; r < rows; ++r) xk[r] = xr[r] + k;
        f8_row_avx2(wn + k, K - k, rows, xk, acc, tail);
    }
}
#endif

template <typename F>
void f8_impl(int64_t rows, int64_t K, int64_t N, const F* x, const uint8_t* w8, const float* fscale, F* y) {
    // the rows as float32 (the products read x once per output): float32 x as it is, else a converted copy
    std::vector<float> xf;
    const float* xs = nullptr;
    if constexpr (std::is_same_v<F, float>) {
        xs = x;
    } else {
        xf.resize(static_cast<size_t>(rows * K));
        for (int64_t i = 0; i < rows * K; ++i) xf[i] = static_cast<float>(x[i]);
        xs = xf.data();
    }
    const float* xr[kF8MaxRows];
    for (int64_t r = 0; r < rows; ++r) xr[r] = xs + r * K;
#ifdef RWKV_CHAT_X86_AVX2
    const bool avx2 = cpu_has_avx2_fma(), avx512 = cpu_has_avx512f();
#endif
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float acc[kF8MaxRows][32] = {}, tail[kF8MaxRows] = {};   // lanes 8-31: the AVX-512 form's only
        const uint8_t* wn = w8 + n * K;
#ifdef RWKV_CHAT_X86_AVX2
        if (avx512)
            f8_row_avx512(wn, K, rows, xr, acc, tail);
        else if (avx2)
            f8_row_avx2(wn, K, rows, xr, acc, tail);
        else
#endif
            f8_row_plain(wn, K, rows, xr, acc, tail);
        for (int64_t r = 0; r < rows; ++r) {
            float part[4];                 // lanes in eights, each summed as a pairwise tree, then the four in order
            for (int h = 0; h < 4; ++h) {
                const float* q = acc[r] + 8 * h;
                part[h] = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
            }
            const float s = ((part[0] + part[1]) + (part[2] + part[3])) + tail[r];
            y[r * N + n] = static_cast<F>(s * fscale[n]);
        }
    }
}

}  // namespace

void gemvq_f8_cpu_kernel(int act, int64_t rows, int64_t K, int64_t N, const void* x, const uint8_t* w8,
                         const float* fscale, void* y) {
    const int esize = act == 0 ? 4 : 2;
    for (int64_t r0 = 0; r0 < rows; r0 += kF8MaxRows) {
        const int64_t n = std::min(kF8MaxRows, rows - r0);
        const char* xb = static_cast<const char*>(x) + r0 * K * esize;
        char* yb = static_cast<char*>(y) + r0 * N * esize;
        RWKV_CHAT_CPU_DISPATCH_ACT(act, F,
            f8_impl<F>(n, K, N, reinterpret_cast<const F*>(xb), w8, fscale, reinterpret_cast<F*>(yb)));
    }
}

}  // namespace rwkv_chat
