// Registration of the weight-only GEMV ops for int4 and fp8 weights (csrc/gemvq/gemvq_cuda.cu) and their
// argument checks. Each op writes into a caller-allocated output and returns nothing.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <stdint.h>

#include "../gemvq/gemvq.h"
#include "checks.h"
#include "cuda_checks.h"

namespace rwkv_chat {
namespace {

// int4 GEMV: x [rows, K] (1..kGemvqMaxRows rows, activation dtype); qweight int32 [Np, K/8] (the output-major
// storage of models/formats/i4.py, Int4Weight.output_major); qzeros int32 [K/group, Np/8] and scales float16
// [K/group, Np] (GPTQ layout, v1 zeros); y [rows, N] (N <= Np). K % 32 == 0, group % 32 == 0.
void gemvq_i4_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                   int64_t group, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemvq_i4_cuda";
    TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && qweight.dim() == 2, op, ": x, y and qweight must be 2-D");
    const int64_t rows = x.size(0), K = x.size(1), N = y.size(1), Np = qweight.size(0);
    const auto F = x.scalar_type();
    const int act = act_code(x, op);
    TORCH_CHECK(rows >= 1 && rows <= kGemvqMaxRows, op, ": 1..", kGemvqMaxRows, " rows, got ", rows);
    TORCH_CHECK(K >= 32 && K % 32 == 0, op, ": K must be a positive multiple of 32, got ", K);
    TORCH_CHECK(group >= 32 && group % 32 == 0 && K % group == 0, op,
                ": group must be a multiple of 32 dividing K, got ", group);
    TORCH_CHECK(Np % 8 == 0 && N <= Np, op, ": qweight rows ", Np, " must be a multiple of 8, at least N = ", N);
    check_tensor(x, op, "x", kCUDA, F, {rows, K});
    check_tensor(qweight, op, "qweight", kCUDA, at::kInt, {Np, K / 8});
    check_tensor(qzeros, op, "qzeros", kCUDA, at::kInt, {K / group, Np / 8});
    check_tensor(scales, op, "scales", kCUDA, at::kHalf, {K / group, Np});
    check_tensor(y, op, "y", kCUDA, F, {rows, N});
    check_same_device(op, {x, qweight, qzeros, scales, y});
    TORCH_CHECK(K <= INT32_MAX && Np <= INT32_MAX, op, ": shapes beyond int32");
    if (N == 0) return;
    const at::cuda::CUDAGuard guard(x.device());
    const at::Tensor xa = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 ? x : x.clone();
    TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, op, ": qweight must be 16-byte aligned");
    check_launch(gemvq_i4_launch(act, (int)rows, (int)K, (int)N, (int)Np, (int)group, xa.data_ptr(),
                                 qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), scales.data_ptr(),
                                 y.data_ptr(), at::cuda::getCurrentCUDAStream()),
                 op);
}

// fp8 GEMV: x [rows, K] (1..kGemvqMaxRows rows, activation dtype); w8 the e4m3 bytes [N, K] (uint8 view of
// models/formats/f8.py's Float8Weight.w8); scale float32 [N]; y [rows, N]. K % 16 == 0.
void gemvq_f8_cuda(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemvq_f8_cuda";
    TORCH_CHECK(x.dim() == 2 && w8.dim() == 2, op, ": x and w8 must be 2-D");
    const int64_t rows = x.size(0), K = x.size(1), N = w8.size(0);
    const auto F = x.scalar_type();
    const int act = act_code(x, op);
    TORCH_CHECK(rows >= 1 && rows <= kGemvqMaxRows, op, ": 1..", kGemvqMaxRows, " rows, got ", rows);
    TORCH_CHECK(K >= 16 && K % 16 == 0, op, ": K must be a positive multiple of 16, got ", K);
    check_tensor(x, op, "x", kCUDA, F, {rows, K});
    check_tensor(w8, op, "w8", kCUDA, at::kByte, {N, K});
    check_tensor(scale, op, "scale", kCUDA, at::kFloat, {N});
    check_tensor(y, op, "y", kCUDA, F, {rows, N});
    check_same_device(op, {x, w8, scale, y});
    TORCH_CHECK(K <= INT32_MAX && N <= INT32_MAX, op, ": shapes beyond int32");
    if (N == 0) return;
    const at::cuda::CUDAGuard guard(x.device());
    const at::Tensor xa = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 ? x : x.clone();
    TORCH_CHECK(reinterpret_cast<uintptr_t>(w8.data_ptr()) % 16 == 0, op, ": w8 must be 16-byte aligned");
    check_launch(gemvq_f8_launch(act, (int)rows, (int)K, (int)N, xa.data_ptr(), w8.data_ptr<uint8_t>(),
                                 scale.data_ptr<float>(), y.data_ptr(), at::cuda::getCurrentCUDAStream()),
                 op);
}

}  // namespace
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.def("gemvq_i4_cuda(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group, Tensor(a!) y) -> ()",
          &rwkv_chat::gemvq_i4_cuda);
    m.def("gemvq_f8_cuda(Tensor x, Tensor w8, Tensor scale, Tensor(a!) y) -> ()", &rwkv_chat::gemvq_f8_cuda);
}
