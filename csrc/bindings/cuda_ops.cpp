// Registration of the CUDA ops (namespace rwkv_chat, suffix _cuda) and their argument checks.
// Every op writes into caller-allocated outputs and returns nothing.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <stdint.h>

#include <vector>

#include "../common/launchers.h"
#include "../mm8/mm8_multi.h"
#include "checks.h"
#include "cuda_checks.h"

namespace rwkv_chat {

void gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);  // gemm/gemm_cuda.cpp
void gemm_tuned_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);  // gemm/gemm_lt.cpp
at::Tensor gemm_tuned_stats_cuda();                                                    // gemm/gemm_lt.cpp

namespace {

void wkv4_cuda(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& aa, const at::Tensor& bb, const at::Tensor& pp, const at::Tensor& y,
               const at::Tensor& aa_out, const at::Tensor& bb_out, const at::Tensor& pp_out) {
    const char* op = "rwkv_chat::wkv4_cuda";
    TORCH_CHECK(k.dim() == 3, op, ": k must be [B, T, C], got ", k.sizes());
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    const auto F = k.scalar_type();
    const int act = act_code(k, op);
    check_tensor(w, op, "w", kCUDA, at::kFloat, {C});
    check_tensor(u, op, "u", kCUDA, at::kFloat, {C});
    check_tensor(k, op, "k", kCUDA, F, {B, T, C});
    check_tensor(v, op, "v", kCUDA, F, {B, T, C});
    check_tensor(y, op, "y", kCUDA, F, {B, T, C});
    for (const auto* t : {&aa, &bb, &pp, &aa_out, &bb_out, &pp_out}) check_tensor(*t, op, "state", kCUDA, at::kFloat, {B, C});
    check_same_device(op, {w, u, k, v, aa, bb, pp, y, aa_out, bb_out, pp_out});
    const at::cuda::CUDAGuard guard(k.device());
    check_launch(wkv4_cuda_launch(act, (int)B, (int)T, (int)C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
                                  v.data_ptr(), aa.data_ptr<float>(), bb.data_ptr<float>(), pp.data_ptr<float>(),
                                  y.data_ptr(), aa_out.data_ptr<float>(), bb_out.data_ptr<float>(),
                                  pp_out.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
                 op);
}

void wkv56_cuda(bool per_token, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                const at::Tensor& u, const at::Tensor& s, const at::Tensor& y, const at::Tensor& s_out) {
    const char* op = per_token ? "rwkv_chat::wkv6_cuda" : "rwkv_chat::wkv5_cuda";
    TORCH_CHECK(r.dim() == 4, op, ": r must be [B, T, H, N], got ", r.sizes());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const auto F = r.scalar_type();
    const int act = act_code(r, op);
    for (const auto* t : {&r, &k, &v, &y}) check_tensor(*t, op, "r/k/v/y", kCUDA, F, {B, T, H, N});
    if (per_token) check_tensor(w, op, "w", kCUDA, at::kFloat, {B, T, H, N});
    else check_tensor(w, op, "w", kCUDA, at::kFloat, {H, N});
    check_tensor(u, op, "u", kCUDA, at::kFloat, {H, N});
    check_tensor(s, op, "s", kCUDA, at::kFloat, {B, H, N, N});
    check_tensor(s_out, op, "s_out", kCUDA, at::kFloat, {B, H, N, N});
    check_same_device(op, {r, k, v, w, u, s, y, s_out});
    const at::cuda::CUDAGuard guard(r.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    const int rc = per_token
        ? wkv6_cuda_launch(act, (int)B, (int)T, (int)H, (int)N, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                           w.data_ptr<float>(), u.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr(),
                           s_out.data_ptr<float>(), stream)
        : wkv5_cuda_launch(act, false, (int)B, (int)T, (int)H, (int)N, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                           w.data_ptr<float>(), u.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr(),
                           s_out.data_ptr<float>(), stream);
    check_launch(rc, op);
}

void wkv5_cuda(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
               const at::Tensor& u, const at::Tensor& s, const at::Tensor& y, const at::Tensor& s_out) {
    wkv56_cuda(false, r, k, v, w, u, s, y, s_out);
}

void wkv6_cuda(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
               const at::Tensor& u, const at::Tensor& s, const at::Tensor& y, const at::Tensor& s_out) {
    wkv56_cuda(true, r, k, v, w, u, s, y, s_out);
}

void wkv7_cuda(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& a, const at::Tensor& b, const at::Tensor& s, const at::Tensor& y,
               const at::Tensor& s_out) {
    const char* op = "rwkv_chat::wkv7_cuda";
    int64_t B, T, H, N;
    const int act = check_wkv7_cuda(op, r, w, k, v, a, b, s, y, s_out, B, T, H, N);
    const at::cuda::CUDAGuard guard(r.device());
    check_launch(wkv7_cuda_launch(act, (int)B, (int)T, (int)H, (int)N, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(),
                                  v.data_ptr(), a.data_ptr(), b.data_ptr(), s.data_ptr<float>(), y.data_ptr<float>(),
                                  s_out.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
                 op);
}

// The GEMV reads x, w, my and ry with 16-byte loads: a tensor at an unaligned address (a view at an
// odd offset) is copied first.
at::Tensor aligned16(const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// mm8 with the weight stored output-major: w uint8 [M, N] (models/formats/i8.py, Int8Weight.output_major),
// mx, rx [M], my, ry [N, 1], x [rows, N], y [rows, M] (activation dtype). 1..kMm8MaxGemvRows rows and
// N % 16 == 0: the GEMV kernel; otherwise dequantize to [M, N] once and one cuBLAS product with its
// transpose (fp32 accumulation).
void mm8_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mx, const at::Tensor& rx,
              const at::Tensor& my, const at::Tensor& ry, const at::Tensor& y) {
    const char* op = "rwkv_chat::mm8_cuda";
    TORCH_CHECK(x.dim() == 2, op, ": x must be [rows, N], got ", x.sizes());
    const int64_t rows = x.size(0), N = x.size(1);
    TORCH_CHECK(w.dim() == 2, op, ": w must be output-major [M, N], got ", w.sizes());
    const int64_t M = w.size(0);
    const auto F = x.scalar_type();
    const int act = act_code(x, op);
    check_tensor(x, op, "x", kCUDA, F, {rows, N});
    check_tensor(w, op, "w", kCUDA, at::kByte, {M, N});
    check_tensor(mx, op, "mx", kCUDA, F, {M});
    check_tensor(rx, op, "rx", kCUDA, F, {M});
    check_tensor(my, op, "my", kCUDA, F, {N, 1});
    check_tensor(ry, op, "ry", kCUDA, F, {N, 1});
    check_tensor(y, op, "y", kCUDA, F, {rows, M});
    check_same_device(op, {x, w, mx, rx, my, ry, y});
    TORCH_CHECK(rows <= INT32_MAX && N <= INT32_MAX && M <= INT32_MAX, op, ": shapes beyond int32");
    if (rows == 0 || M == 0) return;
    const at::cuda::CUDAGuard guard(x.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    if (N == 0) {
        const_cast<at::Tensor&>(y).zero_();
        return;
    }
    if (rows <= kMm8MaxGemvRows && N % 16 == 0) {
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const at::Tensor xa = aligned16(x), wa = aligned16(w), mya = aligned16(my), rya = aligned16(ry);
        check_launch(mm8_gemv_launch(act, (int)rows, (int)N, (int)M, xa.data_ptr(), wa.data_ptr<uint8_t>(),
                                     mx.data_ptr(), rx.data_ptr(), mya.data_ptr(), rya.data_ptr(), y.data_ptr(), sms,
                                     stream),
                     op);
        return;
    }
    // Many rows: dequantize once into the activation dtype ([M, N]), then y = x @ wf^T with cuBLAS.
    at::Tensor wf = at::empty({M, N}, x.options());
    check_launch(mm8_dequant_launch(act, (int)M, (int)N, w.data_ptr<uint8_t>(), mx.data_ptr(), rx.data_ptr(),
                                    my.data_ptr(), ry.data_ptr(), wf.data_ptr(), stream),
                 op);
    if (F == at::kFloat) at::mm_out(const_cast<at::Tensor&>(y), x, wf.t());
    else gemm_cuda(x, wf.t(), y);
}

// Grouped mm8 GEMV (decode): entries share the row count (1..kMm8MaxGemvRows); w_e uint8 output-major
// [M_e, N_e] with N_e % 16 == 0; act_e 0 (none) or 3 (relu^2 on x_e). One launch.
void mm8_multi_cuda(at::TensorList xs, at::TensorList ws, at::TensorList mxs, at::TensorList rxs,
                    at::TensorList mys, at::TensorList rys, at::TensorList ys, at::IntArrayRef acts) {
    const char* op = "rwkv_chat::mm8_multi_cuda";
    const size_t n = xs.size();
    TORCH_CHECK(n >= 1 && n <= (size_t)kMm8MaxEntries && ws.size() == n && mxs.size() == n && rxs.size() == n &&
                    mys.size() == n && rys.size() == n && ys.size() == n && acts.size() == n,
                op, ": 1..", kMm8MaxEntries, " products with one x, w, mx, rx, my, ry, y and act each");
    const auto F = xs[0].scalar_type();
    const int act = act_code(xs[0], op);
    TORCH_CHECK(xs[0].dim() == 2, op, ": x must be [rows, N]");
    Mm8Batch batch{};
    batch.n = (int)n;
    batch.rows = (int)xs[0].size(0);
    TORCH_CHECK(batch.rows >= 1 && batch.rows <= kMm8MaxGemvRows, op, ": 1..", kMm8MaxGemvRows, " rows");
    std::vector<at::Tensor> keep;   // x, w, my, ry of every entry (16-byte aligned copies where needed)
    keep.reserve(4 * n);
    for (size_t i = 0; i < n; ++i) {
        TORCH_CHECK(ws[i].dim() == 2, op, ": w must be output-major [M, N]");
        const int64_t M = ws[i].size(0), N = ws[i].size(1);
        check_tensor(xs[i], op, "x", kCUDA, F, {batch.rows, N});
        check_tensor(ws[i], op, "w", kCUDA, at::kByte, {M, N});
        check_tensor(mxs[i], op, "mx", kCUDA, F, {M});
        check_tensor(rxs[i], op, "rx", kCUDA, F, {M});
        check_tensor(mys[i], op, "my", kCUDA, F, {N, 1});
        check_tensor(rys[i], op, "ry", kCUDA, F, {N, 1});
        check_tensor(ys[i], op, "y", kCUDA, F, {batch.rows, M});
        check_same_device(op, {xs[0], xs[i], ws[i], mxs[i], rxs[i], mys[i], rys[i], ys[i]});
        TORCH_CHECK(acts[i] == 0 || acts[i] == 3, op, ": act must be 0 or 3");
        TORCH_CHECK(N >= 16 && N % 16 == 0 && N <= INT32_MAX && M <= INT32_MAX, op,
                    ": N must be a positive multiple of 16, got w ", ws[i].sizes());
        for (const at::Tensor* t : {&xs[i], &ws[i], &mys[i], &rys[i]}) keep.push_back(aligned16(*t));
        const at::Tensor *xa = &keep[keep.size() - 4], *wa = xa + 1, *mya = xa + 2, *rya = xa + 3;
        Mm8Entry& E = batch.e[i];
        E.x = xa->data_ptr(); E.w = wa->data_ptr<uint8_t>(); E.mx = mxs[i].data_ptr(); E.rx = rxs[i].data_ptr();
        E.my = mya->data_ptr(); E.ry = rya->data_ptr(); E.y = ys[i].data_ptr();
        E.N = (int)N; E.M = (int)M; E.act = (int)acts[i];
    }
    const at::cuda::CUDAGuard guard(xs[0].device());
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    TORCH_CHECK(mm8_multi_prepare(batch, sms) == 0, op, ": unsupported shapes");
    check_launch(mm8_multi_launch(act, batch, at::cuda::getCurrentCUDAStream()), op);
}

}  // namespace
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.def("wkv4_cuda(Tensor w, Tensor u, Tensor k, Tensor v, Tensor aa, Tensor bb, Tensor pp, Tensor(a!) y, "
          "Tensor(b!) aa_out, Tensor(c!) bb_out, Tensor(d!) pp_out) -> ()",
          &rwkv_chat::wkv4_cuda);
    m.def("wkv5_cuda(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s, Tensor(a!) y, Tensor(b!) s_out) -> ()",
          &rwkv_chat::wkv5_cuda);
    m.def("wkv6_cuda(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s, Tensor(a!) y, Tensor(b!) s_out) -> ()",
          &rwkv_chat::wkv6_cuda);
    m.def("wkv7_cuda(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s, Tensor(a!) y, "
          "Tensor(b!) s_out) -> ()",
          &rwkv_chat::wkv7_cuda);
    m.def("mm8_cuda(Tensor x, Tensor w, Tensor mx, Tensor rx, Tensor my, Tensor ry, Tensor(a!) y) -> ()",
          &rwkv_chat::mm8_cuda);
    m.def("gemm_cuda(Tensor a, Tensor b, Tensor(a!) c) -> ()", &rwkv_chat::gemm_cuda);
    m.def("gemm_tuned_cuda(Tensor a, Tensor b, Tensor(a!) c) -> ()", &rwkv_chat::gemm_tuned_cuda);
    m.def("gemm_tuned_stats_cuda() -> Tensor", &rwkv_chat::gemm_tuned_stats_cuda);
    m.def("mm8_multi_cuda(Tensor[] xs, Tensor[] ws, Tensor[] mxs, Tensor[] rxs, Tensor[] mys, Tensor[] rys, "
          "Tensor(a!)[] ys, int[] acts) -> ()",
          &rwkv_chat::mm8_multi_cuda);
}
