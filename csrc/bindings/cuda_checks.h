// Checks shared by the CUDA bindings (cuda_ops.cpp, fused_ops.cpp, chunk_ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "../common/launchers.h"
#include "checks.h"

namespace rwkv_chat {

constexpr auto kCUDA = at::DeviceType::CUDA;

// A launcher's return code: kUnsupported (no kernel for the shape) or a cudaError_t value.
inline void check_launch(int rc, const char* op) {
    TORCH_CHECK(rc != kUnsupported, op, ": no kernel for this head size/shape");
    TORCH_CHECK(rc == 0, op, ": CUDA error ", cudaGetErrorString(static_cast<cudaError_t>(rc)));
}

// The WKV-7 operands on CUDA (wkv7_cuda, wkv7_chunk_cuda): r, k, v, a, b [B, T, H, N] in the activation
// dtype; w, y [B, T, H, N] and s, s_out [B, H, N, N] float32; all on one device. Sets B, T, H, N and returns
// the activation code.
inline int check_wkv7_cuda(const char* op, const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& a, const at::Tensor& b, const at::Tensor& s,
                           const at::Tensor& y, const at::Tensor& s_out, int64_t& B, int64_t& T, int64_t& H,
                           int64_t& N) {
    TORCH_CHECK(r.dim() == 4, op, ": r must be [B, T, H, N], got ", r.sizes());
    B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const auto F = r.scalar_type();
    const int act = act_code(r, op);
    for (const auto* t : {&r, &k, &v, &a, &b}) check_tensor(*t, op, "r/k/v/a/b", kCUDA, F, {B, T, H, N});
    check_tensor(w, op, "w", kCUDA, at::kFloat, {B, T, H, N});
    check_tensor(y, op, "y", kCUDA, at::kFloat, {B, T, H, N});
    check_tensor(s, op, "s", kCUDA, at::kFloat, {B, H, N, N});
    check_tensor(s_out, op, "s_out", kCUDA, at::kFloat, {B, H, N, N});
    check_same_device(op, {r, w, k, v, a, b, s, y, s_out});
    return act;
}

}  // namespace rwkv_chat
