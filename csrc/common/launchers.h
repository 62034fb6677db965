// Host-side launchers of the CUDA kernels (defined in the .cu files of each op family).
// Pointers are raw device pointers of contiguous tensors; `act` is an ActType code (0 fp32,
// 1 fp16, 2 bf16) naming the activation dtype behind the `void*` arguments. Each launcher
// returns a cudaError_t value (0 on success) or kUnsupported when the shape has no kernel.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace rwkv_chat {

constexpr int kUnsupported = -1;

// WKV-4: k, v, y [B, T, C] (act); w, u [C], aa/bb/pp in and out [B, C] (fp32).
int wkv4_cuda_launch(int act, int B, int T, int C, const float* w, const float* u, const void* k,
                     const void* v, const float* aa, const float* bb, const float* pp, void* y,
                     float* aa_out, float* bb_out, float* pp_out, cudaStream_t stream);

// WKV-5/6: r, k, v, y [B, T, H, N] (act); w [H, N] (WKV-5) or [B, T, H, N] (WKV-6) fp32,
// u [H, N] fp32, s and s_out [B, H, N(key), N(value)] (fp32). s_out may alias s.
int wkv5_cuda_launch(int act, bool per_token, int B, int T, int H, int N, const void* r, const void* k,
                     const void* v, const float* w, const float* u, const float* s, void* y,
                     float* s_out, cudaStream_t stream);
int wkv6_cuda_launch(int act, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                     const float* w, const float* u, const float* s, void* y, float* s_out,
                     cudaStream_t stream);

// WKV-7: r, k, v, a, b [B, T, H, N] (act); w [B, T, H, N] fp32 decay; y [B, T, H, N] fp32;
// s and s_out [B, H, N(value), N(key)] fp32. s_out may alias s.
int wkv7_cuda_launch(int act, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                     const void* v, const void* a, const void* b, const float* s, float* y, float* s_out,
                     cudaStream_t stream);

// mm8 GEMV (csrc/mm8/mm8_cuda.cu) over `rows` (1..kMm8MaxGemvRows) rows of x [rows, N] with the i8
// weight stored output-major: w uint8 [M, N] (output m's N weights contiguous; N % 16 == 0), mx, rx [M],
// my, ry [N] (act dtype); y [rows, M] act. sm_count: the device's multiprocessors (sizes the grid).
// No workspace. More rows (or N % 16 != 0): dequantize + cuBLAS, see the binding.
constexpr int kMm8MaxGemvRows = 4;
int mm8_gemv_launch(int act, int rows, int N, int M, const void* x, const uint8_t* w, const void* mx,
                    const void* rx, const void* my, const void* ry, void* y, int sm_count, cudaStream_t stream);

// Dequantize the output-major w [M, N] to out [M, N] in the act dtype:
// out[m][n] = (w[m][n] + 0.5) * ry[n] * rx[m] + my[n] + mx[m].
int mm8_dequant_launch(int act, int M, int N, const uint8_t* w, const void* mx, const void* rx,
                       const void* my, const void* ry, void* out, cudaStream_t stream);

}  // namespace rwkv_chat
