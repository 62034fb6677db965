// Host-side launcher of the chunked WKV-7 prefill kernels (csrc/wkv7/wkv7_chunk_cuda.cu).
#pragma once

#include <cuda_runtime.h>

#include "../common/launchers.h"

namespace rwkv_chat {

// Floats of fp32 device workspace the chunked WKV-7 needs for B x T x H heads of size N in chunks of L.
long wkv7_chunk_workspace_floats(int B, int T, int H, int N, int L);

// Chunked WKV-7 (same contract as wkv7_cuda_launch): r, k, v, a, b [B, T, H, N] (act); w [B, T, H, N]
// fp32 decay factors in RWKV-7's range [0.545, 1); y [B, T, H, N] fp32; s, s_out [B, H, N(value), N(key)]
// fp32 (s_out may alias s); work: wkv7_chunk_workspace_floats(...) floats. N = 64 and L in {16, 32};
// any other returns kUnsupported.
int wkv7_chunk_cuda_launch(int act, int B, int T, int H, int N, int L, const void* r, const float* w, const void* k,
                           const void* v, const void* a, const void* b, const float* s, float* y, float* s_out,
                           float* work, cudaStream_t stream);

}  // namespace rwkv_chat
