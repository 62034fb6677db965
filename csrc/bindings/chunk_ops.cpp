// Registration of the chunked WKV-7 prefill op (csrc/wkv7/wkv7_chunk_cuda.cu) and its argument checks.
// Writes into caller-allocated outputs; the fp32 workspace comes from torch's caching allocator.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../wkv7/wkv7_chunk.h"
#include "checks.h"
#include "cuda_checks.h"

namespace rwkv_chat {
namespace {

// Same tensors as wkv7_cuda; chunk: tokens per chunk (16 or 32). Head size 64 only.
void wkv7_chunk_cuda(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& a, const at::Tensor& b, const at::Tensor& s, const at::Tensor& y,
                     const at::Tensor& s_out, int64_t chunk) {
    const char* op = "rwkv_chat::wkv7_chunk_cuda";
    int64_t B, T, H, N;
    const int act = check_wkv7_cuda(op, r, w, k, v, a, b, s, y, s_out, B, T, H, N);
    TORCH_CHECK(N == 64, op, ": head size must be 64, got ", N);
    TORCH_CHECK(chunk == 16 || chunk == 32, op, ": chunk must be 16 or 32, got ", chunk);
    const at::cuda::CUDAGuard guard(r.device());
    const long n = wkv7_chunk_workspace_floats((int)B, (int)T, (int)H, (int)N, (int)chunk);
    at::Tensor work = at::empty({n}, r.options().dtype(at::kFloat));
    check_launch(wkv7_chunk_cuda_launch(act, (int)B, (int)T, (int)H, (int)N, (int)chunk, r.data_ptr(),
                                        w.data_ptr<float>(), k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(),
                                        s.data_ptr<float>(), y.data_ptr<float>(), s_out.data_ptr<float>(),
                                        work.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
                 op);
}

}  // namespace
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.def("wkv7_chunk_cuda(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s, Tensor(a!) y, "
          "Tensor(b!) s_out, int chunk=32) -> ()",
          &rwkv_chat::wkv7_chunk_cuda);
}
