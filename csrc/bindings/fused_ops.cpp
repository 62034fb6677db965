// Registration of the fused RWKV-7 layer ops (namespace rwkv_chat, suffix _cuda) and their checks.
// Every op writes into caller-allocated outputs and returns nothing. Shapes: rows = B*T tokens,
// C = H*N channels; per-token tensors are contiguous [.., C] with rows*C elements.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../fused/fused_launchers.h"
#include "checks.h"
#include "cuda_checks.h"

namespace rwkv_chat {
namespace {

using OptT = std::optional<at::Tensor>;

// A per-token tensor: CUDA, dtype F, contiguous, numel == n.
void tok(const at::Tensor& t, const char* op, const char* name, at::ScalarType F, int64_t n) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be on CUDA");
    TORCH_CHECK(t.scalar_type() == F, op, ": ", name, " must be ", F, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(t.numel() == n, op, ": ", name, " has ", t.numel(), " elements, expected ", n);
}

const void* opt_ptr(const OptT& t, const char* op, const char* name, at::ScalarType F, int64_t n) {
    if (!t.has_value() || !t->defined()) return nullptr;
    tok(*t, op, name, F, n);
    return t->data_ptr();
}

void v7_mix_cuda(const at::Tensor& x, const OptT& dx, const OptT& x_out, const at::Tensor& ln_w,
                 const at::Tensor& ln_b, const OptT& shift, const OptT& shift_out, const at::Tensor& mix,
                 const at::Tensor& out, int64_t T) {
    const char* op = "rwkv_chat::v7_mix_cuda";
    TORCH_CHECK(x.dim() >= 1 && T >= 1, op, ": bad x/T");
    const int64_t C = x.size(-1), rows = x.numel() / C;
    TORCH_CHECK(rows % T == 0, op, ": rows ", rows, " not a multiple of T ", T);
    const int64_t B = rows / T;
    const auto F = x.scalar_type();
    const int act = act_code(x, op);
    tok(x, op, "x", F, rows * C);
    tok(ln_w, op, "ln_w", F, C);
    tok(ln_b, op, "ln_b", F, C);
    TORCH_CHECK(mix.dim() == 2 && mix.size(1) == C, op, ": mix must be [n_mix, C]");
    tok(mix, op, "mix", F, mix.numel());
    const int64_t n_mix = mix.size(0);
    tok(out, op, "out", F, std::max<int64_t>(n_mix, 1) * rows * C);
    const void* dxp = opt_ptr(dx, op, "dx", F, rows * C);
    void* xo = const_cast<void*>(opt_ptr(x_out, op, "x_out", F, rows * C));
    const void* sp = opt_ptr(shift, op, "shift", F, B * C);
    void* so = const_cast<void*>(opt_ptr(shift_out, op, "shift_out", F, B * C));
    TORCH_CHECK(T == 1 || (xo != x.data_ptr() && (so == nullptr || so != sp)), op,
                ": x_out/shift_out may alias x/shift only when T == 1");
    const at::cuda::CUDAGuard guard(x.device());
    check_launch(v7_mix_launch(act, (int)rows, (int)T, (int)C, (int)n_mix, x.data_ptr(), dxp, xo, ln_w.data_ptr(),
                               ln_b.data_ptr(), sp, so, mix.data_ptr(), out.data_ptr(), (long)(rows * C),
                               c10::cuda::getCurrentCUDAStream()),
                 op);
}

void gemv_multi_cuda(at::TensorList xs, at::TensorList ws, at::TensorList ys, at::IntArrayRef acts,
                     const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef glus,
                     const c10::List<std::optional<at::Tensor>>& ups, const OptT& norm_residual,
                     const OptT& norm_weight, const OptT& h_out, double eps, const OptT& norm_bias, const OptT& shift,
                     const OptT& xn_out, const c10::List<std::optional<at::Tensor>>& mixes, const OptT& copy_src,
                     const OptT& copy_dst) {
    const char* op = "rwkv_chat::gemv_multi_cuda";
    const size_t n = xs.size();
    TORCH_CHECK(n >= 1 && n <= (size_t)kGemvMaxEntries && ws.size() == n && ys.size() == n && acts.size() == n, op,
                ": 1..", kGemvMaxEntries, " products with one x, w, y and act each");
    TORCH_CHECK((biases.size() == 0 || biases.size() == n) && (glus.size() == 0 || glus.size() == n) &&
                    (ups.size() == 0 || ups.size() == n), op, ": biases, glu and ups: empty or one per product");
    const auto F = xs[0].scalar_type();
    const int act = act_code(xs[0], op);
    const auto YF = ys[0].scalar_type();
    TORCH_CHECK(YF == F || YF == at::kFloat, op, ": y must be the activation dtype or float32");
    GemvBatch batch{};
    batch.n = (int)n;
    batch.rows = (int)xs[0].size(0);
    batch.out_f32 = YF == at::kFloat && F != at::kFloat;
    TORCH_CHECK(batch.rows >= 1 && batch.rows <= kGemvMaxRows, op, ": 1..", kGemvMaxRows, " rows");
    for (size_t i = 0; i < n; ++i) {
        const at::Tensor &x = xs[i], &w = ws[i], &y = ys[i];
        TORCH_CHECK(x.is_cuda() && w.is_cuda() && y.is_cuda() && x.device() == xs[0].device() &&
                        w.device() == x.device() && y.device() == x.device(), op, ": tensors on one CUDA device");
        TORCH_CHECK(x.scalar_type() == F && w.scalar_type() == F && y.scalar_type() == YF, op, ": dtypes differ");
        TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && y.dim() == 2, op, ": x [rows, N], w [M, N], y [rows, M]");
        TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous [M, N]");
        const int64_t glu = glus.size() > 0 ? glus[i] : 0;
        TORCH_CHECK(glu >= 0 && glu <= 2, op, ": glu must be 0 (none), 1 (rounded as the reference) or 2 (float32)");
        const std::optional<at::Tensor> up = ups.size() > 0 ? ups[i] : std::optional<at::Tensor>();
        TORCH_CHECK(!up.has_value() || glu, op, ": an up matrix belongs to a glu product");
        const int64_t M = glu && !up.has_value() ? w.size(0) / 2 : w.size(0);
        TORCH_CHECK(!glu || up.has_value() || w.size(0) % 2 == 0, op,
                    ": a glu weight is [2M, N] (gate rows, then up rows) without its own up matrix");
        TORCH_CHECK(!up.has_value() || (up->is_cuda() && up->device() == x.device() && up->scalar_type() == F &&
                                        up->is_contiguous() && up->sizes() == w.sizes()),
                    op, ": the up matrix must be a contiguous ", F, " tensor of w's shape on x's device");
        TORCH_CHECK(x.size(0) == batch.rows && y.size(0) == batch.rows && x.size(1) == w.size(1) && y.size(1) == M,
                    op, ": shapes ", x.sizes(), " ", w.sizes(), " ", y.sizes());
        TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, op, ": x and y rows must be contiguous");
        TORCH_CHECK(acts[i] >= 0 && acts[i] <= 15, op, ": act must be 0..15 (on x: act % 4, on y: act / 4)");
        TORCH_CHECK(!glu || acts[i] < 4, op, ": a glu product takes no activation on its output");
        const void* bias = nullptr;
        if (biases.size() > 0) {
            const std::optional<at::Tensor> b = biases[i];
            if (b.has_value()) {
                TORCH_CHECK(!glu, op, ": a glu product takes no bias");
                TORCH_CHECK(b->is_cuda() && b->device() == x.device() && b->scalar_type() == F && b->is_contiguous() &&
                                b->numel() == M, op, ": bias must be a contiguous [", M, "] ", F, " on x's device");
                bias = b->data_ptr();
            }
        }
        GemvEntry& E = batch.e[i];
        E.x = x.data_ptr(); E.w = w.data_ptr(); E.y = y.data_ptr(); E.bias = bias; E.glu = (int)glu;
        E.w_up = up.has_value() ? up->data_ptr() : nullptr;
        E.x_stride = (long)x.stride(0); E.y_stride = (long)y.stride(0);
        E.N = (int)w.size(1); E.M = (int)M; E.act = (int)(acts[i] % 4); E.out_act = (int)(acts[i] / 4);
    }
    if (norm_weight.has_value()) {   // RMSNorm(x + residual) is every product's input; x is xs[0] (all the same)
        const at::Tensor& x = xs[0];
        const int64_t C = x.size(1);
        TORCH_CHECK(x.is_contiguous(), op, ": the normed x must be contiguous [rows, C]");
        for (size_t i = 1; i < n; ++i)
            TORCH_CHECK(xs[i].data_ptr() == x.data_ptr() && xs[i].sizes() == x.sizes(), op,
                        ": with a norm every product takes the same x");
        GemvNorm& nm = batch.norm;
        nm.x = x.data_ptr();
        nm.w = opt_ptr(norm_weight, op, "norm_weight", F, C);
        nm.residual = opt_ptr(norm_residual, op, "norm_residual", F, batch.rows * C);
        nm.h_out = const_cast<void*>(opt_ptr(h_out, op, "h_out", F, batch.rows * C));
        TORCH_CHECK(nm.h_out == nullptr || (nm.h_out != nm.x && nm.h_out != nm.residual), op,
                    ": h_out must not alias x or the residual");
        nm.eps = (float)eps;
        nm.C = (int)C;
        nm.b = opt_ptr(norm_bias, op, "norm_bias", F, C);
        nm.kind = nm.b ? 2 : 1;                        // a bias: LayerNorm (RWKV-7); none: RMSNorm (Qwen2)
        nm.shift = opt_ptr(shift, op, "shift", F, batch.rows * C);
        nm.xn_out = const_cast<void*>(opt_ptr(xn_out, op, "xn_out", F, batch.rows * C));
        TORCH_CHECK(nm.kind == 2 || (nm.shift == nullptr && nm.xn_out == nullptr && mixes.size() == 0), op,
                    ": shift, xn_out and mixes belong to the LayerNorm (norm_bias)");
        for (const void* p : {nm.x, nm.residual, nm.shift, nm.w, nm.b})
            TORCH_CHECK(p == nullptr || (p != nm.h_out && p != nm.xn_out), op, ": h_out and xn_out must not alias an input");
        TORCH_CHECK(mixes.size() == 0 || mixes.size() == n, op, ": mixes: empty or one per product");
        for (size_t i = 0; i < mixes.size(); ++i) {
            const std::optional<at::Tensor> mx = mixes[i];
            batch.e[i].mix = mx.has_value() ? opt_ptr(mx, op, "mix", F, C) : nullptr;
        }
    } else {
        TORCH_CHECK(!norm_residual.has_value() && !h_out.has_value() && !norm_bias.has_value() && !shift.has_value() &&
                        !xn_out.has_value() && mixes.size() == 0,
                    op, ": a residual, h_out, norm_bias, shift, xn_out or mixes need norm_weight");
    }
    if (copy_src.has_value() || copy_dst.has_value()) {
        TORCH_CHECK(copy_src.has_value() && copy_dst.has_value(), op, ": copy_src and copy_dst go together");
        const int64_t cn = copy_src->numel();
        batch.copy_src = opt_ptr(copy_src, op, "copy_src", F, cn);
        batch.copy_dst = const_cast<void*>(opt_ptr(copy_dst, op, "copy_dst", F, cn));
        TORCH_CHECK(copy_src->device() == xs[0].device() && copy_dst->device() == xs[0].device(), op,
                    ": the side copy's tensors on x's device");
        batch.copy_n = cn;
    }
    const at::cuda::CUDAGuard guard(xs[0].device());
    check_launch(gemv_multi_launch(act, batch, c10::cuda::getCurrentCUDAStream()), op);
}

// The channel-mix value product by the row kernel (csrc/fused/ffn_rows.cu). w: [F, C] input-major in h's dtype, or
// uint8 with mx, rx [C] and my, ry [F] (or [F, 1]) in h's dtype (the i8 format), or float8_e4m3fn / uint8 bytes
// with scale float32 [C] (the f8 format). relu2: h holds the raw k (relu(k)^2 is taken as it loads).
void ffn_rows_cuda(const at::Tensor& h, const at::Tensor& w, const OptT& mx, const OptT& rx, const OptT& my,
                   const OptT& ry, const OptT& scale, const at::Tensor& y, const at::Tensor& counters, bool relu2,
                   bool skip_zeros, int64_t blocks_per_sm, int64_t tile_threads) {
    const char* op = "rwkv_chat::ffn_rows_cuda";
    const auto F = h.scalar_type();
    const int act = act_code(h, op);
    TORCH_CHECK(h.is_cuda() && w.device() == h.device() && y.device() == h.device() && counters.device() == h.device(),
                op, ": tensors on one CUDA device");
    TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && y.dim() == 2 && h.size(1) == w.size(0) && y.size(0) == h.size(0) &&
                    y.size(1) == w.size(1), op, ": h [rows, F], w [F, C], y [rows, C]; got ", h.sizes(), " ",
                w.sizes(), " ", y.sizes());
    TORCH_CHECK(h.size(0) >= 1 && h.size(0) <= kGemvMaxRows, op, ": 1..", kGemvMaxRows, " rows");
    const int rows = (int)h.size(0), Fd = (int)w.size(0), C = (int)w.size(1);
    const bool i8 = mx.has_value() || rx.has_value() || my.has_value() || ry.has_value();
    const bool f8 = scale.has_value();
    TORCH_CHECK(!(i8 && f8), op, ": either the i8 scales (mx, rx, my, ry) or the f8 scale");
    const int wkind = i8 ? 1 : f8 ? 2 : 0;
    FfnRowsQuant qs;
    if (wkind == 0) {
        TORCH_CHECK(w.scalar_type() == F, op, ": w must be ", F);
    } else {
        TORCH_CHECK(F != at::kFloat, op, ": uint8 / e4m3 weights take float16 or bfloat16 h");
        TORCH_CHECK(w.element_size() == 1 && (w.scalar_type() == at::kByte || w.scalar_type() == at::kFloat8_e4m3fn),
                    op, ": w must be uint8 or float8_e4m3fn");
    }
    if (wkind == 1) {
        TORCH_CHECK(mx && rx && my && ry, op, ": the i8 format needs mx, rx, my and ry");
        for (const at::Tensor* t : {&*mx, &*rx}) TORCH_CHECK(t->scalar_type() == F && t->is_contiguous() &&
                                                                 t->numel() == C && t->device() == h.device(),
                                                             op, ": mx, rx contiguous [C] in h's dtype");
        for (const at::Tensor* t : {&*my, &*ry}) TORCH_CHECK(t->scalar_type() == F && t->is_contiguous() &&
                                                                 t->numel() == Fd && t->device() == h.device(),
                                                             op, ": my, ry contiguous [F] in h's dtype");
        qs.mx = mx->data_ptr();
        qs.rx = rx->data_ptr();
        qs.my = my->data_ptr();
        qs.ry = ry->data_ptr();
    } else if (wkind == 2) {
        TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == C &&
                        scale->device() == h.device(), op, ": scale float32 contiguous [C]");
        qs.scale = scale->data_ptr<float>();
    }
    TORCH_CHECK(y.scalar_type() == F || y.scalar_type() == at::kFloat, op, ": y must be ", F, " or float32");
    TORCH_CHECK(w.is_contiguous() && h.stride(1) == 1 && y.stride(1) == 1, op,
                ": w contiguous [F, C], rows of h and y contiguous");
    TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous(), op, ": counters int32, contiguous");
    TORCH_CHECK(blocks_per_sm >= 1 && blocks_per_sm <= 16, op, ": blocks_per_sm 1..16");
    TORCH_CHECK(tile_threads == 0 || tile_threads == 16 || tile_threads == 32 || tile_threads == 64 ||
                    tile_threads == 128 || tile_threads == 256, op, ": tile_threads 0 (auto), 16, 32, 64, 128 or 256");
    const at::cuda::CUDAGuard guard(h.device());
    if (Fd == 0 || C == 0) {   // an empty sum: zeros (nothing to launch)
        y.zero_();
        return;
    }
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const FfnRowsPlan plan = ffn_rows_plan(act, wkind, rows, Fd, C, (int)blocks_per_sm, sms, (int)tile_threads);
    TORCH_CHECK(counters.numel() >= plan.tiles, op, ": counters must hold ", plan.tiles, " entries");
    at::Tensor part;
    if (plan.workspace > 0) part = at::empty({plan.workspace}, h.options().dtype(at::kFloat));
    check_launch(ffn_rows_launch(act, wkind, plan, rows, Fd, C, h.data_ptr(), (long)h.stride(0), w.data_ptr(), qs,
                                 y.data_ptr(), (long)y.stride(0), y.scalar_type() == at::kFloat && F != at::kFloat,
                                 plan.workspace > 0 ? part.data_ptr<float>() : nullptr, counters.data_ptr<int>(),
                                 skip_zeros, relu2, c10::cuda::getCurrentCUDAStream()),
                 op);
}

void v7_pre_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& wl, const at::Tensor& al,
                 const OptT& vl, const OptT& v_first, const at::Tensor& w0, const at::Tensor& a0,
                 const at::Tensor& k_k, const at::Tensor& k_a, const OptT& v0, const at::Tensor& w_out,
                 const at::Tensor& k_out, const at::Tensor& v_out, const at::Tensor& a_out, const at::Tensor& b_out,
                 int64_t H) {
    const char* op = "rwkv_chat::v7_pre_cuda";
    const int64_t C = w0.numel(), rows = k.numel() / C, N = C / H;
    const auto F = k.scalar_type();
    const int act = act_code(k, op);
    TORCH_CHECK(H >= 1 && C % H == 0 && rows * C == k.numel(), op, ": bad shapes");
    for (const at::Tensor* t : {&k, &v, &wl, &al, &k_out, &v_out, &a_out, &b_out}) tok(*t, op, "token tensor", F, rows * C);
    for (const at::Tensor* t : {&a0, &k_k, &k_a}) tok(*t, op, "parameter", F, C);
    tok(w0, op, "w0", at::kFloat, C);
    tok(w_out, op, "w_out", at::kFloat, rows * C);
    const void* vlp = opt_ptr(vl, op, "vl", F, rows * C);
    const void* vfp = opt_ptr(v_first, op, "v_first", F, rows * C);
    const void* v0p = opt_ptr(v0, op, "v0", F, C);
    TORCH_CHECK((vlp == nullptr) == (vfp == nullptr) && (vfp == nullptr) == (v0p == nullptr), op,
                ": vl, v_first and v0 go together");
    const at::cuda::CUDAGuard guard(k.device());
    check_launch(v7_pre_launch(act, (int)rows, (int)H, (int)N, k.data_ptr(), v.data_ptr(), wl.data_ptr(), al.data_ptr(),
                               vlp, vfp, w0.data_ptr<float>(), a0.data_ptr(), k_k.data_ptr(), k_a.data_ptr(), v0p,
                               w_out.data_ptr<float>(), k_out.data_ptr(), v_out.data_ptr(), a_out.data_ptr(),
                               b_out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 op);
}

void v7_post_cuda(const at::Tensor& y, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& g, const at::Tensor& r_k, const at::Tensor& lnw, const at::Tensor& lnb,
                  const at::Tensor& out, int64_t H) {
    const char* op = "rwkv_chat::v7_post_cuda";
    const int64_t C = r_k.numel(), rows = r.numel() / C, N = C / H;
    const auto F = r.scalar_type();
    const int act = act_code(r, op);
    TORCH_CHECK(H >= 1 && C % H == 0 && rows * C == r.numel(), op, ": bad shapes");
    for (const at::Tensor* t : {&r, &k, &v, &g, &out}) tok(*t, op, "token tensor", F, rows * C);
    for (const at::Tensor* t : {&r_k, &lnw, &lnb}) tok(*t, op, "parameter", F, C);
    tok(y, op, "y", at::kFloat, rows * C);
    const at::cuda::CUDAGuard guard(r.device());
    check_launch(v7_post_launch(act, (int)rows, (int)H, (int)N, y.data_ptr<float>(), r.data_ptr(), k.data_ptr(),
                            v.data_ptr(), g.data_ptr(), r_k.data_ptr(), lnw.data_ptr(), lnb.data_ptr(),
                            out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 op);
}

void v7_tmix_one_cuda(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& wl,
                      const at::Tensor& al, const at::Tensor& g, const OptT& vl, const OptT& v_first,
                      const at::Tensor& w0, const at::Tensor& a0, const at::Tensor& k_k, const at::Tensor& k_a,
                      const OptT& v0, const at::Tensor& r_k, const at::Tensor& lnw, const at::Tensor& lnb,
                      const at::Tensor& s, const at::Tensor& out, int64_t H, bool staged) {
    const char* op = "rwkv_chat::v7_tmix_one_cuda";
    const int64_t C = w0.numel(), B = r.numel() / C, N = C / H;
    const auto F = r.scalar_type();
    const int act = act_code(r, op);
    TORCH_CHECK(H >= 1 && C % H == 0 && B * C == r.numel(), op, ": bad shapes");
    for (const at::Tensor* t : {&r, &k, &v, &wl, &al, &g, &out}) tok(*t, op, "token tensor", F, B * C);
    for (const at::Tensor* t : {&a0, &k_k, &k_a, &r_k, &lnw, &lnb}) tok(*t, op, "parameter", F, C);
    tok(w0, op, "w0", at::kFloat, C);
    tok(s, op, "s", at::kFloat, B * H * N * N);
    const void* vlp = opt_ptr(vl, op, "vl", F, B * C);
    const void* vfp = opt_ptr(v_first, op, "v_first", F, B * C);
    const void* v0p = opt_ptr(v0, op, "v0", F, C);
    TORCH_CHECK((vlp == nullptr) == (vfp == nullptr) && (vfp == nullptr) == (v0p == nullptr), op,
                ": vl, v_first and v0 go together");
    const at::cuda::CUDAGuard guard(r.device());
    check_launch(v7_tmix_one_launch(act, (int)B, (int)H, (int)N, r.data_ptr(), k.data_ptr(), v.data_ptr(), wl.data_ptr(),
                                al.data_ptr(), g.data_ptr(), vlp, vfp, w0.data_ptr<float>(), a0.data_ptr(),
                                k_k.data_ptr(), k_a.data_ptr(), v0p, r_k.data_ptr(), lnw.data_ptr(), lnb.data_ptr(),
                                s.data_ptr<float>(), out.data_ptr(), staged, c10::cuda::getCurrentCUDAStream()),
                 op);
}

int64_t v7_step_cuda(const at::Tensor& table, at::TensorList att_x, at::TensorList s, at::TensorList ffn_x,
                     const at::Tensor& x, const at::Tensor& dx, const at::Tensor& scratch, const at::Tensor& bar,
                     int64_t H, int64_t ffn, at::IntArrayRef dims, int64_t prefetch, const OptT& times,
                     int64_t blocks) {
    const char* op = "rwkv_chat::v7_step_cuda";
    const int64_t L = table.dim() == 2 ? table.size(0) : -1, C = x.numel();
    const auto F = x.scalar_type();
    const int act = act_code(x, op);
    TORCH_CHECK(table.is_cuda() && table.scalar_type() == at::kLong && table.is_contiguous() && L >= 1 &&
                    L <= kStepMaxLayers && table.size(1) == kStepSlots,
                op, ": table must be a contiguous int64 CUDA tensor [L, ", (int)kStepSlots, "], 1 <= L <= ",
                kStepMaxLayers);
    TORCH_CHECK((int64_t)att_x.size() == L && (int64_t)s.size() == L && (int64_t)ffn_x.size() == L, op,
                ": one att_x, s and ffn_x per layer of the table");
    TORCH_CHECK(dims.size() == 4, op, ": dims must be [dw, da, dg, dv]");
    TORCH_CHECK(H >= 1 && C == H * 64, op, ": C must be H * 64 (head size 64)");
    tok(x, op, "x", F, C);
    tok(dx, op, "dx", F, C);
    tok(scratch, op, "scratch", F, 6 * C + kStepMaxLow + ffn);
    tok(bar, op, "bar", at::kInt, 3);
    V7StepArgs a = {};
    a.table = reinterpret_cast<const long long*>(table.data_ptr<int64_t>());
    a.L = (int)L; a.C = (int)C; a.H = (int)H; a.ffn = (int)ffn;
    a.dw = (int)dims[0]; a.da = (int)dims[1]; a.dg = (int)dims[2]; a.dv = (int)dims[3];
    a.x = x.data_ptr(); a.dx = dx.data_ptr(); a.scratch = scratch.data_ptr();
    a.bar = reinterpret_cast<unsigned*>(bar.data_ptr<int>());
    a.flag = bar.data_ptr<int>() + 2;
    TORCH_CHECK(prefetch >= 0 && prefetch <= 3, op,
                ": prefetch must be 0 (none), 1 (L2), 2 (registers) or 3 (shared-memory ring, sm_90+)");
    a.prefetch = (int)prefetch;
    if (times.has_value() && times->defined()) {
        tok(*times, op, "times", at::kLong, 1 + 5 * L);
        TORCH_CHECK(times->device() == x.device(), op, ": every tensor on x's device");
        a.times = reinterpret_cast<unsigned long long*>(times->data_ptr<int64_t>());
    }
    for (int64_t i = 0; i < L; ++i) {
        tok(att_x[i], op, "att_x", F, C);
        tok(ffn_x[i], op, "ffn_x", F, C);
        tok(s[i], op, "s", at::kFloat, C * 64);
        TORCH_CHECK(reinterpret_cast<uintptr_t>(s[i].data_ptr()) % 16 == 0, op, ": s must be 16-byte aligned");
        TORCH_CHECK(att_x[i].device() == x.device() && s[i].device() == x.device() && ffn_x[i].device() == x.device(),
                    op, ": every tensor on x's device");
        a.att_x[i] = att_x[i].data_ptr(); a.s[i] = s[i].data_ptr<float>(); a.ffn_x[i] = ffn_x[i].data_ptr();
    }
    TORCH_CHECK(table.device() == x.device() && dx.device() == x.device() && scratch.device() == x.device() &&
                    bar.device() == x.device(), op, ": every tensor on x's device");
    const at::cuda::CUDAGuard guard(x.device());
    int grid = 0;
    TORCH_CHECK(blocks >= 0, op, ": blocks must be >= 0");
    check_launch(v7_step_launch(act, a, (int)blocks, &grid, c10::cuda::getCurrentCUDAStream()), op);
    return grid;
}

}  // namespace
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.def("v7_mix_cuda(Tensor x, Tensor? dx, Tensor(a!)? x_out, Tensor ln_w, Tensor ln_b, Tensor? shift, "
          "Tensor(b!)? shift_out, Tensor mix, Tensor(c!) out, int T) -> ()",
          &rwkv_chat::v7_mix_cuda);
    m.def("gemv_multi_cuda(Tensor[] xs, Tensor[] ws, Tensor(a!)[] ys, int[] acts, Tensor?[] biases, int[] glu, "
          "Tensor?[] ups, Tensor? norm_residual, Tensor? norm_weight, Tensor(b!)? h_out, float eps, Tensor? norm_bias, "
          "Tensor? shift, Tensor(c!)? xn_out, Tensor?[] mixes, Tensor? copy_src, Tensor(d!)? copy_dst) -> ()",
          &rwkv_chat::gemv_multi_cuda);
    m.def("ffn_rows_cuda(Tensor h, Tensor w, Tensor? mx, Tensor? rx, Tensor? my, Tensor? ry, Tensor? scale, "
          "Tensor(a!) y, Tensor(b!) counters, bool relu2, bool skip_zeros, int blocks_per_sm=2, "
          "int tile_threads=0) -> ()", &rwkv_chat::ffn_rows_cuda);
    m.def("v7_pre_cuda(Tensor k, Tensor v, Tensor wl, Tensor al, Tensor? vl, Tensor? v_first, Tensor w0, Tensor a0, "
          "Tensor k_k, Tensor k_a, Tensor? v0, Tensor(a!) w_out, Tensor(b!) k_out, Tensor(c!) v_out, "
          "Tensor(d!) a_out, Tensor(e!) b_out, int H) -> ()",
          &rwkv_chat::v7_pre_cuda);
    m.def("v7_post_cuda(Tensor y, Tensor r, Tensor k, Tensor v, Tensor g, Tensor r_k, Tensor lnw, Tensor lnb, "
          "Tensor(a!) out, int H) -> ()",
          &rwkv_chat::v7_post_cuda);
    m.def("v7_tmix_one_cuda(Tensor r, Tensor k, Tensor v, Tensor wl, Tensor al, Tensor g, Tensor? vl, "
          "Tensor? v_first, Tensor w0, Tensor a0, Tensor k_k, Tensor k_a, Tensor? v0, Tensor r_k, Tensor lnw, "
          "Tensor lnb, Tensor(a!) s, Tensor(b!) out, int H, bool staged=False) -> ()",
          &rwkv_chat::v7_tmix_one_cuda);
    m.def("v7_step_cuda(Tensor table, Tensor(a!)[] att_x, Tensor(b!)[] s, Tensor(c!)[] ffn_x, Tensor(d!) x, "
          "Tensor(e!) dx, Tensor(f!) scratch, Tensor(g!) bar, int H, int ffn, int[] dims, int prefetch, "
          "Tensor(h!)? times=None, int blocks=0) -> int",
          &rwkv_chat::v7_step_cuda);
}
