// Argument checks shared by the CPU and CUDA bindings. The Python wrappers in
// rwkv_chat.models.kernels validate first and raise typed errors; these TORCH_CHECKs keep the
// ops safe when called directly through torch.ops.rwkv_chat.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>

namespace rwkv_chat {

inline int act_code(const at::Tensor& t, const char* op) {
    switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, op, ": activation dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
    }
    return -1;
}

inline void check_tensor(const at::Tensor& t, const char* op, const char* name, at::DeviceType dev,
                         at::ScalarType dtype, std::initializer_list<int64_t> shape) {
    TORCH_CHECK(t.device().type() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(t.dim() == (int64_t)shape.size(), op, ": ", name, " must have ", shape.size(), " dims, got ",
                t.sizes());
    int i = 0;
    for (int64_t s : shape) {
        TORCH_CHECK(t.size(i) == s, op, ": ", name, " has shape ", t.sizes(), ", dim ", i, " must be ", s);
        ++i;
    }
}

inline void check_same_device(const char* op, std::initializer_list<at::Tensor> ts) {
    const at::Device d = ts.begin()->device();
    for (const auto& t : ts) TORCH_CHECK(t.device() == d, op, ": tensors on different devices ", d, " and ", t.device());
}

}  // namespace rwkv_chat
