// C++ CPU kernels (OpenMP), on raw pointers of contiguous tensors. `act` names the activation
// dtype behind `void*` arguments (0 fp32, 1 fp16, 2 bf16); state and decay are fp32. Shapes and
// formulas as the CUDA launchers (common/launchers.h). These files include no torch headers
// beyond c10's Half/BFloat16, so the CPU library builds in one heavy translation unit
// (bindings/cpu_ops.cpp) plus light ones.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

// x86-64 with GCC or Clang: kernels may carry an AVX2 + FMA form (functions with target("avx2,fma")), taken where
// cpu_has_avx2_fma() says the CPU runs it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RWKV_CHAT_X86_AVX2 1
#endif

namespace rwkv_chat {

#ifdef RWKV_CHAT_X86_AVX2
// Whether this CPU runs AVX2 and FMA instructions (asked once).
inline bool cpu_has_avx2_fma() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}
// Whether this CPU also runs AVX-512F (asked once; the AVX-512 forms use AVX2 + FMA for their tails).
inline bool cpu_has_avx512f() {
    static const bool yes = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f");
    return yes;
}
#endif

void wkv4_cpu_kernel(int act, int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                     const void* v, const float* aa, const float* bb, const float* pp, void* y, float* aa_out,
                     float* bb_out, float* pp_out);
void wkv5_cpu_kernel(int act, int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const void* k,
                     const void* v, const float* w, const float* u, const float* s, void* y, float* s_out);
void wkv6_cpu_kernel(int act, int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const void* k,
                     const void* v, const float* w, const float* u, const float* s, void* y, float* s_out);
void wkv7_cpu_kernel(int act, int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const float* w,
                     const void* k, const void* v, const void* a, const void* b, const float* s, float* y,
                     float* s_out);
void mm8_cpu_kernel(int act, int64_t rows, int64_t N, int64_t M, const void* x, const uint8_t* w, const void* mx,
                    const void* rx, const void* my, const void* ry, void* y);
// int4, GPTQ layout (csrc/gemvq/gemvq_cpu.cpp): x [rows, K] (act), qweight int32 [Kp/8, Np], qzeros int32
// [Kp/group, Np/8], scales [Kp/group, Np] (scale_type: an act code), group % 8 == 0, K <= Kp; y [rows, N] (act).
void gemvq_i4_cpu_kernel(int act, int scale_type, int64_t rows, int64_t K, int64_t Kp, int64_t N, int64_t Np,
                         int64_t group, const void* x, const int32_t* qweight, const int32_t* qzeros,
                         const void* scales, void* y);
// fp8 e4m3fn, output-major (csrc/gemvq/gemvq_cpu.cpp): x [rows, K] (act), w8 e4m3 bytes [N, K], fscale float32
// [N]; y [rows, N] (act) = fscale * (x @ e4m3(w8).T). Denormals must not be flushed (the decode relies on them).
void gemvq_f8_cpu_kernel(int act, int64_t rows, int64_t K, int64_t N, const void* x, const uint8_t* w8,
                         const float* fscale, void* y);

}  // namespace rwkv_chat

#define RWKV_CHAT_CPU_DISPATCH_ACT(act, F, ...)                    \
    switch (act) {                                                 \
    case 0: { using F = float; __VA_ARGS__; break; }               \
    case 1: { using F = c10::Half; __VA_ARGS__; break; }           \
    default: { using F = c10::BFloat16; __VA_ARGS__; break; }      \
    }
