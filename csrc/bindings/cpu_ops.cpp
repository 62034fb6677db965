// Registration of the CPU ops (namespace rwkv_chat, suffix _cpu) and their argument checks.
// Every op writes into caller-allocated outputs and returns nothing.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/cpu_kernels.h"
#include "checks.h"

namespace rwkv_chat {
namespace {

constexpr auto kCPU = at::DeviceType::CPU;

void wkv4_cpu(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& aa, const at::Tensor& bb, const at::Tensor& pp, const at::Tensor& y,
              const at::Tensor& aa_out, const at::Tensor& bb_out, const at::Tensor& pp_out) {
    const char* op = "rwkv_chat::wkv4_cpu";
    TORCH_CHECK(k.dim() == 3, op, ": k must be [B, T, C], got ", k.sizes());
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    const auto F = k.scalar_type();
    const int act = act_code(k, op);
    check_tensor(w, op, "w", kCPU, at::kFloat, {C});
    check_tensor(u, op, "u", kCPU, at::kFloat, {C});
    check_tensor(k, op, "k", kCPU, F, {B, T, C});
    check_tensor(v, op, "v", kCPU, F, {B, T, C});
    check_tensor(y, op, "y", kCPU, F, {B, T, C});
    for (const auto* t : {&aa, &bb, &pp, &aa_out, &bb_out, &pp_out}) check_tensor(*t, op, "state", kCPU, at::kFloat, {B, C});
    wkv4_cpu_kernel(act, B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                    aa.data_ptr<float>(), bb.data_ptr<float>(), pp.data_ptr<float>(), y.data_ptr(),
                    aa_out.data_ptr<float>(), bb_out.data_ptr<float>(), pp_out.data_ptr<float>());
}

void wkv56_cpu(bool per_token, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
               const at::Tensor& u, const at::Tensor& s, const at::Tensor& y, const at::Tensor& s_out) {
    const char* op = per_token ? "rwkv_chat::wkv6_cpu" : "rwkv_chat::wkv5_cpu";
    TORCH_CHECK(r.dim() == 4, op, ": r must be [B, T, H, N], got ", r.sizes());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const auto F = r.scalar_type();
    const int act = act_code(r, op);
    for (const auto* t : {&r, &k, &v, &y}) check_tensor(*t, op, "r/k/v/y", kCPU, F, {B, T, H, N});
    if (per_token) check_tensor(w, op, "w", kCPU, at::kFloat, {B, T, H, N});
    else check_tensor(w, op, "w", kCPU, at::kFloat, {H, N});
    check_tensor(u, op, "u", kCPU, at::kFloat, {H, N});
    check_tensor(s, op, "s", kCPU, at::kFloat, {B, H, N, N});
    check_tensor(s_out, op, "s_out", kCPU, at::kFloat, {B, H, N, N});
    (per_token ? wkv6_cpu_kernel : wkv5_cpu_kernel)(act, B, T, H, N, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                                    w.data_ptr<float>(), u.data_ptr<float>(), s.data_ptr<float>(),
                                                    y.data_ptr(), s_out.data_ptr<float>());
}

void wkv5_cpu(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
              const at::Tensor& u, const at::Tensor& s, const at::Tensor& y, const at::Tensor& s_out) {
    wkv56_cpu(false, r, k, v, w, u, s, y, s_out);
}

void wkv6_cpu(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
              const at::Tensor& u, const at::Tensor& s, const at::Tensor& y, const at::Tensor& s_out) {
    wkv56_cpu(true, r, k, v, w, u, s, y, s_out);
}

void wkv7_cpu(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& a, const at::Tensor& b, const at::Tensor& s, const at::Tensor& y,
              const at::Tensor& s_out) {
    const char* op = "rwkv_chat::wkv7_cpu";
    TORCH_CHECK(r.dim() == 4, op, ": r must be [B, T, H, N], got ", r.sizes());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const auto F = r.scalar_type();
    const int act = act_code(r, op);
    for (const auto* t : {&r, &k, &v, &a, &b}) check_tensor(*t, op, "r/k/v/a/b", kCPU, F, {B, T, H, N});
    check_tensor(w, op, "w", kCPU, at::kFloat, {B, T, H, N});
    check_tensor(y, op, "y", kCPU, at::kFloat, {B, T, H, N});
    check_tensor(s, op, "s", kCPU, at::kFloat, {B, H, N, N});
    check_tensor(s_out, op, "s_out", kCPU, at::kFloat, {B, H, N, N});
    wkv7_cpu_kernel(act, B, T, H, N, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(), v.data_ptr(), a.data_ptr(),
                    b.data_ptr(), s.data_ptr<float>(), y.data_ptr<float>(), s_out.data_ptr<float>());
}

void mm8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mx, const at::Tensor& rx,
             const at::Tensor& my, const at::Tensor& ry, const at::Tensor& y, int64_t split) {
    const char* op = "rwkv_chat::mm8_cpu";
    TORCH_CHECK(x.dim() == 2, op, ": x must be [rows, N], got ", x.sizes());
    TORCH_CHECK(w.dim() == 2, op, ": w must be [N, M], got ", w.sizes());
    const int64_t rows = x.size(0), N = x.size(1), M = w.size(1);
    const auto F = x.scalar_type();
    const int act = act_code(x, op);
    (void)split;  // the CPU kernel needs no split-K
    check_tensor(x, op, "x", kCPU, F, {rows, N});
    check_tensor(w, op, "w", kCPU, at::kByte, {N, M});
    check_tensor(mx, op, "mx", kCPU, F, {M});
    check_tensor(rx, op, "rx", kCPU, F, {M});
    check_tensor(my, op, "my", kCPU, F, {N, 1});
    check_tensor(ry, op, "ry", kCPU, F, {N, 1});
    check_tensor(y, op, "y", kCPU, F, {rows, M});
    mm8_cpu_kernel(act, rows, N, M, x.data_ptr(), w.data_ptr<uint8_t>(), mx.data_ptr(), rx.data_ptr(), my.data_ptr(),
                   ry.data_ptr(), y.data_ptr());
}

void gemvq_i4_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                  int64_t group, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemvq_i4_cpu";
    TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && y.dim() == 2, op, ": x [rows, K], qweight [Kp/8, Np], y [rows, N]");
    const int64_t rows = x.size(0), K = x.size(1), Kp = qweight.size(0) * 8, Np = qweight.size(1), N = y.size(1);
    const auto F = x.scalar_type();
    const int act = act_code(x, op), st = act_code(scales, op);
    TORCH_CHECK(group > 0 && group % 8 == 0 && Kp % group == 0, op, ": group must be a positive multiple of 8 dividing ",
                Kp, ", got ", group);
    TORCH_CHECK(K <= Kp && N <= Np && Np % 8 == 0, op, ": x has ", K, " columns and y ", N, " for qweight ",
                qweight.sizes());
    check_tensor(x, op, "x", kCPU, F, {rows, K});
    check_tensor(qweight, op, "qweight", kCPU, at::kInt, {Kp / 8, Np});
    check_tensor(qzeros, op, "qzeros", kCPU, at::kInt, {Kp / group, Np / 8});
    check_tensor(scales, op, "scales", kCPU, scales.scalar_type(), {Kp / group, Np});
    check_tensor(y, op, "y", kCPU, F, {rows, N});
    gemvq_i4_cpu_kernel(act, st, rows, K, Kp, N, Np, group, x.data_ptr(), qweight.data_ptr<int32_t>(),
                        qzeros.data_ptr<int32_t>(), scales.data_ptr(), y.data_ptr());
}

void gemvq_f8_cpu(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemvq_f8_cpu";
    TORCH_CHECK(x.dim() == 2 && w8.dim() == 2 && y.dim() == 2, op, ": x [rows, K], w8 [N, K], y [rows, N]");
    const int64_t rows = x.size(0), K = x.size(1), N = w8.size(0);
    const auto F = x.scalar_type();
    const int act = act_code(x, op);
    check_tensor(x, op, "x", kCPU, F, {rows, K});
    check_tensor(w8, op, "w8", kCPU, at::kByte, {N, K});
    check_tensor(scale, op, "scale", kCPU, at::kFloat, {N});
    check_tensor(y, op, "y", kCPU, F, {rows, N});
    gemvq_f8_cpu_kernel(act, rows, K, N, x.data_ptr(), w8.data_ptr<uint8_t>(), scale.data_ptr<float>(), y.data_ptr());
}

}  // namespace
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.def("wkv4_cpu(Tensor w, Tensor u, Tensor k, Tensor v, Tensor aa, Tensor bb, Tensor pp, Tensor(a!) y, "
          "Tensor(b!) aa_out, Tensor(c!) bb_out, Tensor(d!) pp_out) -> ()",
          &rwkv_chat::wkv4_cpu);
    m.def("wkv5_cpu(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s, Tensor(a!) y, Tensor(b!) s_out) -> ()",
          &rwkv_chat::wkv5_cpu);
    m.def("wkv6_cpu(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s, Tensor(a!) y, Tensor(b!) s_out) -> ()",
          &rwkv_chat::wkv6_cpu);
    m.def("wkv7_cpu(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s, Tensor(a!) y, "
          "Tensor(b!) s_out) -> ()",
          &rwkv_chat::wkv7_cpu);
    m.def("mm8_cpu(Tensor x, Tensor w, Tensor mx, Tensor rx, Tensor my, Tensor ry, Tensor(a!) y, int split=0) -> ()",
          &rwkv_chat::mm8_cpu);
    m.def("gemvq_i4_cpu(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group, Tensor(a!) y) -> ()",
          &rwkv_chat::gemvq_i4_cpu);
    m.def("gemvq_f8_cpu(Tensor x, Tensor w8, Tensor scale, Tensor(a!) y) -> ()", &rwkv_chat::gemvq_f8_cpu);
}
