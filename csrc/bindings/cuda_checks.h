// Checks shared by the CUDA bindings (cuda_ops.cpp, fused_ops.cpp, chunk_ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "../common/launchers.h"

namespace rwkv_chat {

constexpr auto kCUDA = at::DeviceType::CUDA;

// A launcher's return code: kUnsupported (no kernel for the shape) or a cudaError_t value.
inline void check_launch(int rc, const char* op) {
    TORCH_CHECK(rc != kUnsupported, op, ": no kernel for this head size/shape");
    TORCH_CHECK(rc == 0, op, ": CUDA error ", cudaGetErrorString(static_cast<cudaError_t>(rc)));
}

}  // namespace rwkv_chat
