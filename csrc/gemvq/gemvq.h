// Host-side launchers of the weight-only GEMV kernels for quantized weights (csrc/gemvq/gemvq_cuda.cu):
// y = x @ W for 1..kGemvqMaxRows rows of x with W stored output-major (each output's K weights contiguous).
// Pointers are raw device pointers of contiguous tensors; `act` is an ActType code (0 fp32, 1 fp16,
// 2 bf16) naming the dtype of x and y. Each launcher returns a cudaError_t value (0 on success) or
// kUnsupported when the shape has no kernel. No workspace, no atomics, no host synchronization
// (CUDA-graph capturable).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/launchers.h"

namespace rwkv_chat {

constexpr int kGemvqMaxRows = 4;

// int4, GPTQ v1 zeros (models/formats/i4.py, Int4Weight.output_major): x [rows, K]; qweight int32 [Np, K/8]
// (output n's K nibbles, eight per int32 along K, low nibble first); qzeros int32 [K/group, Np/8] and
// scales fp16 [K/group, Np] in the GPTQ layout; y [rows, N] (N <= Np, Np % 8 == 0).
// y[r][n] = sum_k x[r][k] * (q[n][k] - ((zstored[k/group][n] + 1) & 15)) * scales[k/group][n].
// Needs K % 32 == 0, group % 32 == 0 and group | K, x and qweight 16-byte aligned.
int gemvq_i4_launch(int act, int rows, int K, int N, int Np, int group, const void* x, const int32_t* qweight,
                    const int32_t* qzeros, const void* scales, void* y, cudaStream_t stream);

// fp8 e4m3 (models/formats/f8.py): x [rows, K]; w8 e4m3 bytes [N, K]; scale fp32 [N]; y [rows, N].
// y[r][n] = scale[n] * sum_k x[r][k] * e4m3(w8[n][k]). Needs K % 16 == 0, x and w8 16-byte aligned.
int gemvq_f8_launch(int act, int rows, int K, int N, const void* x, const uint8_t* w8, const float* scale, void* y,
                    cudaStream_t stream);

}  // namespace rwkv_chat
