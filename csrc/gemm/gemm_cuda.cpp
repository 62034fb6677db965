// gemm: c = a @ b for fp16/bf16 a [rows, K] and b [K, M] (row-major, or the transpose of a
// row-major [M, K], as a weight stored [out, in] and viewed with .t()), fp32 accumulation,
// c [rows, M] in fp16/bf16 or fp32, through cublasGemmEx on PyTorch's cuBLAS handle and stream.
// Row-major C = A B is computed as column-major C^T = B^T A^T (ChatRWKV gemm_fp16_cublas.cpp,
// pip rwkv 0.8.32), so no transposes are materialized.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

namespace rwkv_chat {

static cudaDataType_t cuda_type(const at::Tensor& t) {
    switch (t.scalar_type()) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
    }
}

void gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    TORCH_CHECK(a.is_cuda() && b.is_cuda() && c.is_cuda(), "rwkv_chat::gemm_cuda: tensors must be on CUDA");
    TORCH_CHECK(a.get_device() == b.get_device() && a.get_device() == c.get_device(),
                "rwkv_chat::gemm_cuda: tensors on different devices");
    TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
                "rwkv_chat::gemm_cuda: a must be fp16 or bf16, got ", a.scalar_type());
    TORCH_CHECK(b.scalar_type() == a.scalar_type(), "rwkv_chat::gemm_cuda: b dtype ", b.scalar_type(),
                " differs from a dtype ", a.scalar_type());
    TORCH_CHECK(c.scalar_type() == a.scalar_type() || c.scalar_type() == at::kFloat,
                "rwkv_chat::gemm_cuda: c must be a's dtype or fp32, got ", c.scalar_type());
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "rwkv_chat::gemm_cuda: 2-D tensors expected");
    const bool b_t = !b.is_contiguous() && b.t().is_contiguous();
    TORCH_CHECK(a.is_contiguous() && (b.is_contiguous() || b_t) && c.is_contiguous(),
                "rwkv_chat::gemm_cuda: contiguous tensors expected (b may be a transposed contiguous matrix)");
    const int64_t rows = a.size(0), K = a.size(1), M = b.size(1);
    TORCH_CHECK(b.size(0) == K && c.size(0) == rows && c.size(1) == M, "rwkv_chat::gemm_cuda: shapes ",
                a.sizes(), " @ ", b.sizes(), " -> ", c.sizes(), " do not match");
    if (rows == 0 || M == 0) return;
    if (K == 0) { c.zero_(); return; }
    const at::cuda::OptionalCUDAGuard guard(a.device());
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
    const float alpha = 1.f, beta = 0.f;
    const cublasStatus_t st = cublasGemmEx(
        handle, b_t ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, (int)M, (int)rows, (int)K, &alpha, b.data_ptr(),
        cuda_type(b), b_t ? (int)K : (int)M,
        a.data_ptr(), cuda_type(a), (int)K, &beta, c.data_ptr(), cuda_type(c), (int)M, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT);
    TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "rwkv_chat::gemm_cuda: cublasGemmEx failed with status ", (int)st);
}

}  // namespace rwkv_chat
