// Shared helpers of the CUDA kernels: activation types and their float conversions.
// The .cu files include no torch headers (they build fast and stand alone); the torch-facing
// checks and the operator registration live in csrc/cuda_ops.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace rwkv_chat {

// Activation dtype codes, shared with the bindings (cuda_ops.cpp).
enum class ActType : int { F32 = 0, F16 = 1, BF16 = 2 };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename F> __device__ __forceinline__ F from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Call go(std::integral_constant<int, N>{}) for a head size the WKV kernels are instantiated for
// (8, 16, 32, 64, 128); false for any other N.
template <typename Go>
inline bool dispatch_head_size(int N, Go&& go) {
    switch (N) {
    case 8: go(std::integral_constant<int, 8>{}); return true;
    case 16: go(std::integral_constant<int, 16>{}); return true;
    case 32: go(std::integral_constant<int, 32>{}); return true;
    case 64: go(std::integral_constant<int, 64>{}); return true;
    case 128: go(std::integral_constant<int, 128>{}); return true;
    default: return false;
    }
}

}  // namespace rwkv_chat

// Instantiate a launcher template for the three activation types, switching on an ActType code.
#define RWKV_CHAT_DISPATCH_ACT(act, F, ...)                                   \
    switch (act) {                                                            \
    case ::rwkv_chat::ActType::F32: { using F = float; __VA_ARGS__; break; }          \
    case ::rwkv_chat::ActType::F16: { using F = __half; __VA_ARGS__; break; }         \
    case ::rwkv_chat::ActType::BF16: { using F = __nv_bfloat16; __VA_ARGS__; break; } \
    }
