// Registration of the weight-only GEMV ops for int4, fp8 and uint8 (i8) weights (csrc/gemvq/gemvq_cuda.cu) and their
// argument checks. Each op writes into caller-allocated outputs and returns nothing. The _multi ops run
// 1..kGemvqMaxEntries products of one kind with the same rows in one launch, each with its input activation
// (acts: 0 none, 3 relu(x)^2 rounded to the activation dtype).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <stdint.h>

#include <utility>
#include <vector>

#include "../gemvq/gemvq.h"
#include "checks.h"
#include "cuda_checks.h"

namespace rwkv_chat {
namespace {

// x as the kernel reads it: a copy when it is not 16-byte aligned (a view at an odd offset), kept in `keep`.
const void* aligned_x(const at::Tensor& x, std::vector<at::Tensor>& keep) {
    if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0) return x.data_ptr();
    keep.push_back(x.clone());
    return keep.back().data_ptr();
}

// int4: x [rows, K] (activation dtype F); qweight int32 [Np, K/8] (the output-major storage of
// models/formats/i4.py, Int4Weight.output_major); qzeros int32 [K/group, Np/8] and scales float16 [K/group, Np]
// (GPTQ layout, v1 zeros); y [rows, N] (N <= Np). K % 32 == 0, group % 32 == 0.
GemvqEntry i4_entry(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                    const at::Tensor& scales, int64_t group, const at::Tensor& y, int64_t rows, at::ScalarType F,
                    std::vector<at::Tensor>& keep) {
    TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && qweight.dim() == 2, op, ": x, y and qweight must be 2-D");
    const int64_t K = x.size(1), N = y.size(1), Np = qweight.size(0);
    TORCH_CHECK(K >= 32 && K % 32 == 0, op, ": K must be a positive multiple of 32, got ", K);
    TORCH_CHECK(group >= 32 && group % 32 == 0 && K % group == 0, op,
                ": group must be a multiple of 32 dividing K, got ", group);
    TORCH_CHECK(Np % 8 == 0 && N <= Np, op, ": qweight rows ", Np, " must be a multiple of 8, at least N = ", N);
    TORCH_CHECK(K <= INT32_MAX && Np <= INT32_MAX, op, ": shapes beyond int32");
    check_tensor(x, op, "x", kCUDA, F, {rows, K});
    check_tensor(qweight, op, "qweight", kCUDA, at::kInt, {Np, K / 8});
    check_tensor(qzeros, op, "qzeros", kCUDA, at::kInt, {K / group, Np / 8});
    check_tensor(scales, op, "scales", kCUDA, at::kHalf, {K / group, Np});
    check_tensor(y, op, "y", kCUDA, F, {rows, N});
    check_same_device(op, {x, qweight, qzeros, scales, y});
    TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, op, ": qweight must be 16-byte aligned");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(scales.data_ptr()) % 4 == 0, op, ": scales must be 4-byte aligned");
    GemvqEntry E{};
    E.x = aligned_x(x, keep);
    E.w = qweight.data_ptr();
    E.scales = scales.data_ptr();
    E.zeros = qzeros.data_ptr();
    E.y = y.data_ptr();
    E.K = (int)K; E.N = (int)N; E.Np = (int)Np; E.group = (int)group;
    return E;
}

// fp8: x [rows, K] (activation dtype F); w8 the e4m3 bytes [N, K] (uint8 view of models/formats/f8.py's
// Float8Weight.w8); scale float32 [N]; y [rows, N]. K % 16 == 0.
GemvqEntry f8_entry(const char* op, const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale,
                    const at::Tensor& y, int64_t rows, at::ScalarType F, std::vector<at::Tensor>& keep) {
    TORCH_CHECK(x.dim() == 2 && w8.dim() == 2, op, ": x and w8 must be 2-D");
    const int64_t K = x.size(1), N = w8.size(0);
    TORCH_CHECK(K >= 16 && K % 16 == 0, op, ": K must be a positive multiple of 16, got ", K);
    TORCH_CHECK(K <= INT32_MAX && N <= INT32_MAX, op, ": shapes beyond int32");
    check_tensor(x, op, "x", kCUDA, F, {rows, K});
    check_tensor(w8, op, "w8", kCUDA, at::kByte, {N, K});
    check_tensor(scale, op, "scale", kCUDA, at::kFloat, {N});
    check_tensor(y, op, "y", kCUDA, F, {rows, N});
    check_same_device(op, {x, w8, scale, y});
    TORCH_CHECK(reinterpret_cast<uintptr_t>(w8.data_ptr()) % 16 == 0, op, ": w8 must be 16-byte aligned");
    GemvqEntry E{};
    E.x = aligned_x(x, keep);
    E.w = w8.data_ptr();
    E.fscale = scale.data_ptr<float>();
    E.y = y.data_ptr();
    E.K = (int)K; E.N = (int)N; E.Np = (int)N; E.group = 1;
    return E;
}

// uint8, the reference's i8: x [rows, K] (activation dtype F); w the uint8 [N, K] (models/formats/i8.py,
// Int8Weight.output_major storage); mx, rx [N] and my, ry [K] in F (the reference's [K, 1] row vectors flattened);
// y [rows, N]. K % 16 == 0; F float16 or bfloat16.
GemvqEntry u8_entry(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& mx,
                    const at::Tensor& rx, const at::Tensor& my, const at::Tensor& ry, const at::Tensor& y,
                    int64_t rows, at::ScalarType F, std::vector<at::Tensor>& keep) {
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2, op, ": x and w must be 2-D");
    const int64_t K = x.size(1), N = w.size(0);
    TORCH_CHECK(K >= 16 && K % 16 == 0, op, ": K must be a positive multiple of 16, got ", K);
    TORCH_CHECK(K <= INT32_MAX && N <= INT32_MAX, op, ": shapes beyond int32");
    TORCH_CHECK(F == at::kHalf || F == at::kBFloat16, op, ": x must be float16 or bfloat16 (float32: mm8_multi_cuda)");
    check_tensor(x, op, "x", kCUDA, F, {rows, K});
    check_tensor(w, op, "w", kCUDA, at::kByte, {N, K});
    check_tensor(mx, op, "mx", kCUDA, F, {N});
    check_tensor(rx, op, "rx", kCUDA, F, {N});
    TORCH_CHECK(my.numel() == K && ry.numel() == K && my.is_contiguous() && ry.is_contiguous(), op,
                ": my and ry must be contiguous with K = ", K, " values");
    check_tensor(my.view({K}), op, "my", kCUDA, F, {K});
    check_tensor(ry.view({K}), op, "ry", kCUDA, F, {K});
    check_tensor(y, op, "y", kCUDA, F, {rows, N});
    check_same_device(op, {x, w, mx, rx, my, ry, y});
    TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, op, ": w must be 16-byte aligned");
    GemvqEntry E{};
    E.x = aligned_x(x, keep);
    E.w = w.data_ptr();
    E.mx = mx.data_ptr();
    E.rx = rx.data_ptr();
    E.my = aligned_x(my, keep);
    E.ry = aligned_x(ry, keep);
    E.y = y.data_ptr();
    E.K = (int)K; E.N = (int)N; E.Np = (int)N; E.group = 1;
    return E;
}

// The row count of x [rows, K] (1..kGemvqMaxRows) and its activation code.
int64_t gemv_rows(const char* op, const at::Tensor& x, int& act) {
    TORCH_CHECK(x.dim() == 2, op, ": x must be [rows, K], got ", x.sizes());
    act = act_code(x, op);
    const int64_t rows = x.size(0);
    TORCH_CHECK(rows >= 1 && rows <= kGemvqMaxRows, op, ": 1..", kGemvqMaxRows, " rows, got ", rows);
    return rows;
}

void run(const char* op, int kind, int act, int64_t rows, const std::vector<GemvqEntry>& entries,
         const at::Tensor& x0) {
    const at::cuda::CUDAGuard guard(x0.device());
    check_launch(gemvq_launch(kind, act, (int)rows, (int)entries.size(), entries.data(),
                              at::cuda::getCurrentCUDAStream()),
                 op);
}

void gemvq_i4_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                   int64_t group, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemvq_i4_cuda";
    int act = 0;
    const int64_t rows = gemv_rows(op, x, act);
    std::vector<at::Tensor> keep;
    const std::vector<GemvqEntry> entries{i4_entry(op, x, qweight, qzeros, scales, group, y, rows, x.scalar_type(),
                                                   keep)};
    run(op, kGemvqI4, act, rows, entries, x);
}

void gemvq_f8_cuda(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemvq_f8_cuda";
    int act = 0;
    const int64_t rows = gemv_rows(op, x, act);
    std::vector<at::Tensor> keep;
    const std::vector<GemvqEntry> entries{f8_entry(op, x, w8, scale, y, rows, x.scalar_type(), keep)};
    run(op, kGemvqF8, act, rows, entries, x);
}

// int4 with the row's LayerNorm (ln_b optional) or RMSNorm (rms) applied to x as it is staged: y = norm(x) @ W,
// float32 statistics, norm(x) rounded to x's dtype. ln_w, ln_b [K] in x's dtype, 16-byte aligned; eps > 0.
void gemvq_i4_norm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                        const at::Tensor& scales, int64_t group, const at::Tensor& ln_w,
                        const c10::optional<at::Tensor>& ln_b, double eps, bool rms, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemvq_i4_norm_cuda";
    int act = 0;
    const int64_t rows = gemv_rows(op, x, act);
    std::vector<at::Tensor> keep;
    std::vector<GemvqEntry> entries{i4_entry(op, x, qweight, qzeros, scales, group, y, rows, x.scalar_type(), keep)};
    const int64_t K = x.size(1);
    check_tensor(ln_w, op, "ln_w", kCUDA, x.scalar_type(), {K});
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ln_w.data_ptr()) % 16 == 0, op, ": ln_w must be 16-byte aligned");
    TORCH_CHECK((float)eps > 0.f, op, ": eps must be positive in float32, got ", eps);
    GemvqEntry& E = entries.back();
    E.act = rms ? kGemvqActRmsNorm : kGemvqActLayerNorm;
    E.ln_w = ln_w.data_ptr();
    E.eps = (float)eps;
    if (ln_b.has_value() && ln_b->defined() && !rms) {
        check_tensor(*ln_b, op, "ln_b", kCUDA, x.scalar_type(), {K});
        TORCH_CHECK(reinterpret_cast<uintptr_t>(ln_b->data_ptr()) % 16 == 0, op, ": ln_b must be 16-byte aligned");
        E.ln_b = ln_b->data_ptr();
        check_same_device(op, {x, *ln_b});
    }
    check_same_device(op, {x, ln_w});
    run(op, kGemvqI4, act, rows, entries, x);
}

// The input activation of product i (kGemvqActNone or kGemvqActRelu2).
int entry_act(const char* op, at::IntArrayRef acts, size_t i) {
    const int64_t a = acts[i];
    TORCH_CHECK(a == kGemvqActNone || a == kGemvqActRelu2, op, ": act must be ", kGemvqActNone, " (none) or ",
                kGemvqActRelu2, " (relu(x)^2), got ", a);
    return (int)a;
}

void gemvq_i4_multi_cuda(at::TensorList xs, at::TensorList qweights, at::TensorList qzeros, at::TensorList scales,
                         at::IntArrayRef groups, at::IntArrayRef acts, at::TensorList ys) {
    const char* op = "rwkv_chat::gemvq_i4_multi_cuda";
    const size_t n = xs.size();
    TORCH_CHECK(n >= 1 && n <= (size_t)kGemvqMaxEntries && qweights.size() == n && qzeros.size() == n &&
                    scales.size() == n && groups.size() == n && acts.size() == n && ys.size() == n,
                op, ": 1..", kGemvqMaxEntries, " products with one x, qweight, qzeros, scales, group, act and y each");
    int act = 0;
    const int64_t rows = gemv_rows(op, xs[0], act);
    std::vector<at::Tensor> keep;
    keep.reserve(n);
    std::vector<GemvqEntry> entries;
    for (size_t i = 0; i < n; ++i) {
        entries.push_back(i4_entry(op, xs[i], qweights[i], qzeros[i], scales[i], groups[i], ys[i], rows,
                                   xs[0].scalar_type(), keep));
        entries.back().act = entry_act(op, acts, i);
    }
    check_same_device(op, {xs[0], xs[n - 1], ys[n - 1]});
    run(op, kGemvqI4, act, rows, entries, xs[0]);
}

void gemvq_f8_multi_cuda(at::TensorList xs, at::TensorList w8s, at::TensorList scales, at::IntArrayRef acts,
                         at::TensorList ys) {
    const char* op = "rwkv_chat::gemvq_f8_multi_cuda";
    const size_t n = xs.size();
    TORCH_CHECK(n >= 1 && n <= (size_t)kGemvqMaxEntries && w8s.size() == n && scales.size() == n &&
                    acts.size() == n && ys.size() == n,
                op, ": 1..", kGemvqMaxEntries, " products with one x, w8, scale, act and y each");
    int act = 0;
    const int64_t rows = gemv_rows(op, xs[0], act);
    std::vector<at::Tensor> keep;
    keep.reserve(n);
    std::vector<GemvqEntry> entries;
    for (size_t i = 0; i < n; ++i) {
        entries.push_back(f8_entry(op, xs[i], w8s[i], scales[i], ys[i], rows, xs[0].scalar_type(), keep));
        entries.back().act = entry_act(op, acts, i);
    }
    check_same_device(op, {xs[0], xs[n - 1], ys[n - 1]});
    run(op, kGemvqF8, act, rows, entries, xs[0]);
}

void gemvq_u8_multi_cuda(at::TensorList xs, at::TensorList ws, at::TensorList mxs, at::TensorList rxs,
                         at::TensorList mys, at::TensorList rys, at::IntArrayRef acts, at::TensorList ys) {
    const char* op = "rwkv_chat::gemvq_u8_multi_cuda";
    const size_t n = xs.size();
    TORCH_CHECK(n >= 1 && n <= (size_t)kGemvqMaxEntries && ws.size() == n && mxs.size() == n && rxs.size() == n &&
                    mys.size() == n && rys.size() == n && acts.size() == n && ys.size() == n,
                op, ": 1..", kGemvqMaxEntries, " products with one x, w, mx, rx, my, ry, act and y each");
    int act = 0;
    const int64_t rows = gemv_rows(op, xs[0], act);
    std::vector<at::Tensor> keep;
    keep.reserve(3 * n);
    std::vector<GemvqEntry> entries;
    for (size_t i = 0; i < n; ++i) {
        check_same_device(op, {xs[0], xs[i]});
        entries.push_back(u8_entry(op, xs[i], ws[i], mxs[i], rxs[i], mys[i], rys[i], ys[i], rows,
                                   xs[0].scalar_type(), keep));
        entries.back().act = entry_act(op, acts, i);
    }
    check_same_device(op, {xs[0], xs[n - 1], ys[n - 1]});
    run(op, kGemvqU8, act, rows, entries, xs[0]);
}


// The K-split buffers of a tensor-core GEMM launch (csrc/gemvq/gemmq_cuda.cu): with more than one split, work float32
// (contiguous, 8-byte aligned, at least splits x G x rows x N values) and counters int32 (one per tile: G x
// ceil(N / (32 warps)) x ceil(rows / 16)); null pointers with one split.
std::pair<float*, int*> split_buffers(const char* op, const at::Tensor& x, const at::Tensor& work,
                                      const at::Tensor& counters, int64_t splits, int64_t G, int64_t rows, int64_t N,
                                      int64_t warps) {
    if (splits <= 1) return {nullptr, nullptr};
    const int64_t tiles = G * ((N + 32 * warps - 1) / (32 * warps)) * ((rows + 15) / 16);
    TORCH_CHECK(work.is_cuda() && work.scalar_type() == at::kFloat && work.is_contiguous() &&
                    work.numel() >= splits * G * rows * N && reinterpret_cast<uintptr_t>(work.data_ptr()) % 8 == 0,
                op, ": work must be a contiguous, 8-byte aligned float32 CUDA tensor of at least splits x G x rows x N "
                "values");
    TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.is_contiguous() &&
                    counters.numel() >= tiles,
                op, ": counters must be a contiguous int32 CUDA tensor of at least ", tiles, " values");
    check_same_device(op, {x, work, counters});
    return {work.data_ptr<float>(), counters.data_ptr<int>()};
}

// int4 GEMM on the tensor cores for decode batches (csrc/gemvq/gemmq_cuda.cu): x [rows, K] fp16/bf16 (any rows >= 1),
// qweight int32 [Np, K/8] output-major, qzeros int32 [K/group, Np/8], scales float16 [K/group, Np] (16-byte
// aligned), y [rows, N]; or a stack of G such products, each its own x and y: x [G, rows, K], qweight [G, Np, K/8],
// qzeros [G, K/group, Np/8], scales [G, K/group, Np], y [G, rows, N], all contiguous. K and group multiples of 128,
// group | K. splits >= 1 ranges of K; with more than one, work float32 holding at least [splits, G, rows, N] and
// counters int32 with one zero entry per tile (G x ceil(N / (32 warps)) x ceil(rows / 16)), left zero. warps: 4 or
// 8; k_groups: 1, 2 (4 warps) or 4 (4 warps, rows <= 32). relu2: x taken as relu(x)^2 rounded to its dtype.
void gemmq_i4_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                   int64_t group, int64_t splits, int64_t warps, int64_t k_groups, bool relu2, const at::Tensor& work,
                   const at::Tensor& counters, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemmq_i4_cuda";
    const int64_t d = x.dim();
    TORCH_CHECK((d == 2 || d == 3) && y.dim() == d && qweight.dim() == d && qzeros.dim() == d && scales.dim() == d,
                op, ": x, y, qweight, qzeros and scales must all be 2-D (one product) or all 3-D (a stack)");
    const int act = act_code(x, op);
    TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op, ": x must be float16 or bfloat16");
    const int64_t G = d == 3 ? x.size(0) : 1, rows = x.size(d - 2), K = x.size(d - 1), N = y.size(d - 1),
                  Np = qweight.size(d - 2);
    TORCH_CHECK(G >= 1 && G <= 64, op, ": a stack of 1..64 matrices, got ", G);
    TORCH_CHECK(rows >= 1 && rows <= INT32_MAX / 2, op, ": rows must be positive, got ", rows);
    TORCH_CHECK(K >= 128 && K % 128 == 0, op, ": K must be a positive multiple of 128, got ", K);
    TORCH_CHECK(group >= 128 && group % 128 == 0 && K % group == 0, op,
                ": group must be a multiple of 128 dividing K, got ", group);
    TORCH_CHECK(Np % 8 == 0 && N >= 1 && N <= Np, op, ": qweight rows ", Np, " must be a multiple of 8, at least N = ", N);
    TORCH_CHECK(K <= INT32_MAX && Np <= INT32_MAX && N <= INT32_MAX, op, ": shapes beyond int32");
    TORCH_CHECK(warps == 4 || warps == 8, op, ": warps must be 4 or 8, got ", warps);
    TORCH_CHECK(k_groups == 1 || (k_groups == 2 && warps == 4) || (k_groups == 4 && warps == 4 && rows <= 32), op,
                ": k_groups must be 1, 2 (4 warps) or 4 (4 warps, at most 32 rows); got ", k_groups);
    TORCH_CHECK(splits >= 1 && splits <= K / 128, op, ": splits must be 1..K/128, got ", splits);
    if (d == 2) {
        check_tensor(x, op, "x", kCUDA, x.scalar_type(), {rows, K});
        check_tensor(qweight, op, "qweight", kCUDA, at::kInt, {Np, K / 8});
        check_tensor(qzeros, op, "qzeros", kCUDA, at::kInt, {K / group, Np / 8});
        check_tensor(scales, op, "scales", kCUDA, at::kHalf, {K / group, Np});
        check_tensor(y, op, "y", kCUDA, x.scalar_type(), {rows, N});
    } else {
        check_tensor(x, op, "x", kCUDA, x.scalar_type(), {G, rows, K});
        check_tensor(qweight, op, "qweight", kCUDA, at::kInt, {G, Np, K / 8});
        check_tensor(qzeros, op, "qzeros", kCUDA, at::kInt, {G, K / group, Np / 8});
        check_tensor(scales, op, "scales", kCUDA, at::kHalf, {G, K / group, Np});
        check_tensor(y, op, "y", kCUDA, x.scalar_type(), {G, rows, N});
    }
    check_same_device(op, {x, qweight, qzeros, scales, y});
    TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, op, ": qweight must be 16-byte aligned");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(scales.data_ptr()) % 16 == 0, op, ": scales must be 16-byte aligned");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(qzeros.data_ptr()) % 4 == 0, op, ": qzeros must be 4-byte aligned");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(y.data_ptr()) % 4 == 0, op, ": y must be 4-byte aligned");
    const auto [wp, cp] = split_buffers(op, x, work, counters, splits, G, rows, N, warps);
    std::vector<at::Tensor> keep;
    const void* xp = aligned_x(x, keep);
    const at::cuda::CUDAGuard guard(x.device());
    check_launch(gemmq_i4_launch(act, (int)G, (int)rows, (int)K, (int)N, (int)Np, (int)group, (int)splits, (int)warps,
                                 (int)k_groups, relu2 ? 1 : 0, xp, reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                                 reinterpret_cast<const uint32_t*>(qzeros.data_ptr()), scales.data_ptr(), y.data_ptr(),
                                 wp, cp, at::cuda::getCurrentCUDAStream()),
                 op);
}

// The tensor-core GEMM for the reference's uint8 weights (csrc/gemvq/gemmq_cuda.cu, gemmq_u8_launch): x [rows, K]
// fp16, w uint8 [N, K] (output-major storage), mx, rx fp16 [N], my, ry fp16 [K] (or [K, 1]), y [rows, N] fp16; or a
// stack of G such products, each its own x and y: x [G, rows, K], w [G, N, K], mx, rx [G, N] (or [G, N, 1]), my, ry
// [G, K] (or [G, K, 1]), y [G, rows, N]. K a multiple of 128; splits, work, counters, warps and relu2 as for
// gemmq_i4_cuda; k_groups 1 or 2 (4 warps).
void gemmq_u8_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mx, const at::Tensor& rx,
                   const at::Tensor& my, const at::Tensor& ry, int64_t splits, int64_t warps, int64_t k_groups,
                   bool relu2, const at::Tensor& work, const at::Tensor& counters, const at::Tensor& y) {
    const char* op = "rwkv_chat::gemmq_u8_cuda";
    const int64_t d = x.dim();
    TORCH_CHECK((d == 2 || d == 3) && w.dim() == d && y.dim() == d, op,
                ": x, w and y must all be 2-D (one product) or all 3-D (a stack)");
    TORCH_CHECK(x.scalar_type() == at::kHalf, op, ": x must be float16, got ", x.scalar_type());
    const int64_t G = d == 3 ? x.size(0) : 1, rows = x.size(d - 2), K = x.size(d - 1), N = w.size(d - 2);
    TORCH_CHECK(G >= 1 && G <= 64, op, ": a stack of 1..64 matrices, got ", G);
    TORCH_CHECK(rows >= 1 && rows <= INT32_MAX / 2, op, ": rows must be positive, got ", rows);
    TORCH_CHECK(K >= 128 && K % 128 == 0 && K <= INT32_MAX && N >= 1 && N <= INT32_MAX, op,
                ": K must be a positive multiple of 128 and N positive; got K = ", K, ", N = ", N);
    TORCH_CHECK(warps == 4 || warps == 8, op, ": warps must be 4 or 8, got ", warps);
    TORCH_CHECK(k_groups == 1 || (k_groups == 2 && warps == 4), op, ": k_groups must be 1 or 2 (4 warps); got ",
                k_groups);
    TORCH_CHECK(splits >= 1 && splits <= K / 128, op, ": splits must be 1..K/128, got ", splits);
    if (d == 2) {
        check_tensor(x, op, "x", kCUDA, at::kHalf, {rows, K});
        check_tensor(w, op, "w", kCUDA, at::kByte, {N, K});
        check_tensor(y, op, "y", kCUDA, at::kHalf, {rows, N});
    } else {
        check_tensor(x, op, "x", kCUDA, at::kHalf, {G, rows, K});
        check_tensor(w, op, "w", kCUDA, at::kByte, {G, N, K});
        check_tensor(y, op, "y", kCUDA, at::kHalf, {G, rows, N});
    }
    for (const auto* t : {&mx, &rx})
        TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == G * N, op,
                    ": mx and rx must be contiguous float16 CUDA tensors of G x N = ", G * N, " values");
    for (const auto* t : {&my, &ry})
        TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == G * K &&
                        reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                    op, ": my and ry must be contiguous, 16-byte aligned float16 CUDA tensors of G x K = ", G * K,
                    " values");
    check_same_device(op, {x, w, mx, rx, my, ry, y});
    TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, op, ": w must be 16-byte aligned");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(y.data_ptr()) % 4 == 0, op, ": y must be 4-byte aligned");
    const auto [wp, cp] = split_buffers(op, x, work, counters, splits, G, rows, N, warps);
    std::vector<at::Tensor> keep;
    const void* xp = aligned_x(x, keep);
    const at::cuda::CUDAGuard guard(x.device());
    check_launch(gemmq_u8_launch(1, (int)G, (int)rows, (int)K, (int)N, (int)splits, (int)warps, (int)k_groups,
                                 relu2 ? 1 : 0, xp, w.data_ptr<uint8_t>(), mx.data_ptr(), rx.data_ptr(), my.data_ptr(),
                                 ry.data_ptr(), y.data_ptr(), wp, cp, at::cuda::getCurrentCUDAStream()),
                 op);
}

// Blocks of gemmq_i4_cuda's (u8: gemmq_u8_cuda's) kernel for `rows` rows of `x_dtype` activations, `warps` and
// `k_groups` that one multiprocessor of `device` holds at once (the split rule of models/kernels/gemmq.py fills
// them); 0 where it cannot run there.
int64_t gemmq_i4_occupancy(int64_t device, bool bf16, int64_t rows, int64_t warps, int64_t k_groups, bool u8) {
    const char* op = "rwkv_chat::gemmq_i4_occupancy";
    TORCH_CHECK(rows >= 1 && rows <= INT32_MAX, op, ": rows must be positive, got ", rows);
    TORCH_CHECK(warps == 4 || warps == 8, op, ": warps must be 4 or 8, got ", warps);
    TORCH_CHECK(k_groups == 1 || k_groups == 2 || k_groups == 4, op, ": k_groups must be 1, 2 or 4, got ", k_groups);
    TORCH_CHECK(device >= 0 && device < at::cuda::device_count(), op, ": no CUDA device ", device);
    const at::cuda::CUDAGuard guard((c10::DeviceIndex)device);
    const int act = bf16 ? 2 : 1;   // act_code of bfloat16 / float16
    return gemmq_blocks_per_sm(act, (int)rows, (int)warps, (int)k_groups, u8);
}

}  // namespace
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.def("gemvq_i4_cuda(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group, Tensor(a!) y) -> ()",
          &rwkv_chat::gemvq_i4_cuda);
    m.def("gemvq_f8_cuda(Tensor x, Tensor w8, Tensor scale, Tensor(a!) y) -> ()", &rwkv_chat::gemvq_f8_cuda);
    m.def("gemvq_i4_multi_cuda(Tensor[] xs, Tensor[] qweights, Tensor[] qzeros, Tensor[] scales, int[] groups, "
          "int[] acts, Tensor(a!)[] ys) -> ()",
          &rwkv_chat::gemvq_i4_multi_cuda);
    m.def("gemvq_i4_norm_cuda(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group, Tensor ln_w, "
          "Tensor? ln_b, float eps, bool rms, Tensor(a!) y) -> ()",
          &rwkv_chat::gemvq_i4_norm_cuda);
    m.def("gemvq_f8_multi_cuda(Tensor[] xs, Tensor[] w8s, Tensor[] scales, int[] acts, Tensor(a!)[] ys) -> ()",
          &rwkv_chat::gemvq_f8_multi_cuda);
    m.def("gemvq_u8_multi_cuda(Tensor[] xs, Tensor[] ws, Tensor[] mxs, Tensor[] rxs, Tensor[] mys, Tensor[] rys, "
          "int[] acts, Tensor(a!)[] ys) -> ()",
          &rwkv_chat::gemvq_u8_multi_cuda);
    m.def("gemmq_i4_cuda(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group, int splits, int warps, "
          "int k_groups, bool relu2, Tensor work, Tensor counters, Tensor(a!) y) -> ()",
          &rwkv_chat::gemmq_i4_cuda);
    m.def("gemmq_u8_cuda(Tensor x, Tensor w, Tensor mx, Tensor rx, Tensor my, Tensor ry, int splits, int warps, "
          "int k_groups, bool relu2, Tensor work, Tensor counters, Tensor(a!) y) -> ()",
          &rwkv_chat::gemmq_u8_cuda);
    m.def("gemmq_i4_occupancy(int device, bool bf16, int rows, int warps, int k_groups, bool u8=False) -> int",
          &rwkv_chat::gemmq_i4_occupancy);
}
