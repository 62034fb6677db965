// Host-side launchers of the weight-only GEMV kernels for quantized weights (csrc/gemvq/gemvq_cuda.cu):
// y = act(x) @ W for 1..kGemvqMaxRows rows of x with W stored output-major (each output's K weights contiguous).
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
constexpr int kGemvqMaxEntries = 4;

// The weight kinds (gemvq_launch's `kind`): fp8 e4m3, int4 GPTQ, the reference's uint8 (i8).
constexpr int kGemvqF8 = 0;
constexpr int kGemvqI4 = 1;
constexpr int kGemvqU8 = 2;

// What a product applies to x before multiplying (GemvqEntry::act; the codes of the fused backend's GEMVs).
constexpr int kGemvqActNone = 0;
constexpr int kGemvqActRelu2 = 3;   // relu(x)^2, rounded to the activation dtype (the RWKV channel-mix value)
// The row's norm, float32 statistics over the whole row, the result rounded to the activation dtype:
constexpr int kGemvqActLayerNorm = 4;   // (x - mean) / sqrt(var + eps) * ln_w + ln_b (biased var; ln_b may be null)
constexpr int kGemvqActRmsNorm = 5;     // x / sqrt(mean(x^2) + eps) * ln_w

// One product y = x @ W (raw device pointers of contiguous tensors; x and w 16-byte aligned):
//   int4, GPTQ v1 zeros (models/formats/i4.py, Int4Weight.output_major): x [rows, K]; w = qweight int32 [Np, K/8]
//   (output n's K nibbles, eight per int32 along K, low nibble first); zeros = qzeros int32 [K/group, Np/8] and
//   scales fp16 [K/group, Np] in the GPTQ layout; y [rows, N] (N <= Np, Np % 8 == 0);
//   y[r][n] = sum_k a[r][k] * (q[n][k] - ((zstored[k/group][n] + 1) & 15)) * scales[k/group][n], a = act(x);
//   K % 32 == 0, group % 32 == 0 and group | K.
//   fp8 e4m3 (models/formats/f8.py): x [rows, K]; w = w8 e4m3 bytes [N, K]; fscale fp32 [N]; y [rows, N];
//   y[r][n] = fscale[n] * sum_k a[r][k] * e4m3(w8[n][k]); K % 16 == 0.
//   uint8, the reference's i8 (models/formats/i8.py, Int8Weight.output_major): x [rows, K]; w = uint8 [N, K];
//   rx, mx [N] and ry, my [K] in the activation dtype (ry, my 16-byte aligned); y [rows, N];
//   y[r][n] = sum_k a[r][k] * ((w[n][k] + 0.5) * ry[k] * rx[n] + my[k] + mx[n])
//           = rx[n] * (sum_k a'[k] * (w[n][k] - 128) + 128.5 * sum_k a'[k]) + sum_k a[r][k] * my[k]
//             + mx[n] * sum_k a[r][k],  a' = a[r][k] * ry[k];  K % 16 == 0; fp16 / bf16 activations only.
// scales 4-byte aligned (int4: both scales of an output pair are one load).
struct GemvqEntry {
    const void* x;
    const void* w;
    const void* scales;    // int4
    const void* zeros;     // int4
    const float* fscale;   // fp8
    const void* rx;        // uint8: [N] activation dtype, with mx
    const void* mx;
    const void* ry;        // uint8: [K] activation dtype, with my (16-byte aligned)
    const void* my;
    void* y;
    int K, N, Np, group;   // Np, group: int4
    int act;               // kGemvqActNone, kGemvqActRelu2, kGemvqActLayerNorm or kGemvqActRmsNorm
    const void* ln_w;      // the norms: [K] in the activation dtype, 16-byte aligned
    const void* ln_b;      // LayerNorm: [K] like ln_w, or null (no bias)
    float eps;             // the norms' epsilon
};

// 1..kGemvqMaxEntries products of one kind (kGemvqF8, kGemvqI4 or kGemvqU8), all with `rows` rows
// (1..kGemvqMaxRows) of the activation dtype `act`, in one launch.
int gemvq_launch(int kind, int act, int rows, int n, const GemvqEntry* entries, cudaStream_t stream);

// int4 weight-only GEMM on the tensor cores for decode batches (csrc/gemvq/gemmq_cuda.cu): y [M, N] = x [M, K] @ W
// with W as for the int4 GEMV above (qweight int32 [Np, K/8] output-major, qzeros, scales fp16 16-byte aligned);
// `act` fp16 or bf16. K and group multiples of 128, group | K. G >= 1 matrices of that shape laid one after
// another, each with its own x and y (x [G, M, K], qweight [G, Np, K/8], qzeros [G, K/group, Np/8], scales
// [G, K/group, Np], y [G, M, N]). `splits` ranges of K (> 1: float32 partials in `work` [splits, G, M, N], and
// `counters` one int32 per tile (G x row tiles x column tiles), zero between launches, left zero); `warps` 4 or 8
// (block width 32 x warps outputs); `k_groups` 1, 2 (4 warps) or 4 (4 warps, M <= 32): groups of warps share each
// block's K range (up to 205,840 bytes of shared memory a block; kUnsupported where the device has less). relu2 != 0:
// x is taken as relu(x)^2 rounded to `act` (the RWKV channel-mix value's input). No host synchronization
// (CUDA-graph capturable).
int gemmq_i4_launch(int act, int G, int M, int K, int N, int Np, int group, int splits, int warps, int k_groups,
                    int relu2, const void* x, const uint32_t* qweight, const uint32_t* qzeros, const void* scales, void* y,
                    float* work, int* counters, cudaStream_t stream);
// The same GEMM for the reference's uint8 weights (models/formats/i8.py, output-major: w8 uint8 [N, K], each
// output's K bytes contiguous; mx, rx fp16 [N], my, ry fp16 [K]; fp16 activations only; or a stack of G such
// products, each its own x and y, laid one after another: x [G, M, K], w8 [G, N, K], mx, rx [G, N], my, ry [G, K]):
// y = ((x ry) @ (w8 + 0.5)) rx + (x @ my) + sum(x) mx, the reference's (w8 + 0.5) ry rx + my + mx factored, x ry
// rounded to fp16 as it is staged and the row sums taken in float32 alongside. K % 128 == 0; x, w8, my and ry
// 16-byte aligned.
int gemmq_u8_launch(int act, int G, int M, int K, int N, int splits, int warps, int k_groups, int relu2, const void* x,
                    const uint8_t* w8, const void* mx, const void* rx, const void* my, const void* ry, void* y,
                    float* work, int* counters, cudaStream_t stream);
// Blocks of gemmq_i4_launch's (u8: gemmq_u8_launch's) kernel for `act`, M rows, `warps` and `k_groups` that one
// multiprocessor of the current device holds at once (the CUDA occupancy calculator); 0 where it cannot run there.
int gemmq_blocks_per_sm(int act, int M, int warps, int k_groups, bool u8);

}  // namespace rwkv_chat
