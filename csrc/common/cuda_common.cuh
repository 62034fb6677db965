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

// Programmatic dependent launch (sm_90+). A kernel launched by `launch_pdl` may start while the previous
// kernel of the stream (or CUDA graph: capture keeps the edge programmatic) still runs. `pdl_trigger` lets
// the next kernel launch now; `pdl_wait` returns once the previous kernel has completed and its writes are
// visible to the whole grid. Every thread calls `pdl_wait` (or is ordered after a thread of its block that
// did, by a block barrier) before it reads anything a previous kernel wrote and before it writes anything;
// only immutable weights are read before it. Both are no-ops when the kernel was
// launched without the attribute or below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Whether the current device takes programmatic dependent launches (compute capability 9.0+).
inline bool pdl_supported() {
    static int cache[64] = {0};   // 0 unknown, 1 yes, 2 no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    if (cache[dev] == 0) {
        int major = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cache[dev] = major >= 9 ? 1 : 2;
    }
    return cache[dev] == 1;
}

// An attribute of the current device (cached per device; 0 where it cannot be read).
template <cudaDeviceAttr A>
inline int device_attribute() {
    static int cache[64] = {0};
    static bool known[64] = {false};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
    if (!known[dev]) {
        int v = 0;
        cache[dev] = cudaDeviceGetAttribute(&v, A, dev) == cudaSuccess ? v : 0;
        known[dev] = true;
    }
    return cache[dev];
}

// The current device's multiprocessor count (cached per device; 1 where it cannot be read).
inline int device_sm_count() {
    const int sms = device_attribute<cudaDevAttrMultiProcessorCount>();
    return sms > 0 ? sms : 1;
}

// A launcher's return code: the launch's error, else any error the launch left pending (0: none).
inline int launch_rc(cudaError_t e) { return (int)(e != cudaSuccess ? e : cudaGetLastError()); }

// Launch a kernel with one launch attribute (used when `on`). Returns the launch's error code.
template <typename... KArgs, typename... Args>
inline cudaError_t launch_with(cudaLaunchAttribute attr, bool on, void (*kernel)(KArgs...), unsigned grid,
                               unsigned block, size_t smem, cudaStream_t stream, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = on ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Launch a kernel that calls pdl_wait before touching data of earlier kernels, with programmatic stream
// serialization where the device has it. Returns the launch's error code.
template <typename... KArgs, typename... Args>
inline cudaError_t launch_pdl(void (*kernel)(KArgs...), unsigned grid, unsigned block, size_t smem,
                              cudaStream_t stream, Args... args) {
    cudaLaunchAttribute attr = {};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    return launch_with(attr, pdl_supported(), kernel, grid, block, smem, stream, args...);
}

// Launch a cooperative kernel (every block resident at once, or the launch fails: grid barriers are safe).
template <typename... KArgs, typename... Args>
inline cudaError_t launch_cooperative(void (*kernel)(KArgs...), unsigned grid, unsigned block, size_t smem,
                                      cudaStream_t stream, Args... args) {
    cudaLaunchAttribute attr = {};
    attr.id = cudaLaunchAttributeCooperative;
    attr.val.cooperative = 1;
    return launch_with(attr, true, kernel, grid, block, smem, stream, args...);
}

}  // namespace rwkv_chat

// Instantiate a launcher template for the three activation types, switching on an ActType code.
#define RWKV_CHAT_DISPATCH_ACT(act, F, ...)                                   \
    switch (act) {                                                            \
    case ::rwkv_chat::ActType::F32: { using F = float; __VA_ARGS__; break; }          \
    case ::rwkv_chat::ActType::F16: { using F = __half; __VA_ARGS__; break; }         \
    case ::rwkv_chat::ActType::BF16: { using F = __nv_bfloat16; __VA_ARGS__; break; } \
    }
