// Fused CPU inference of a whole RWKV model (v4, v5/5.1/5.2, v6, v7) in one call per forward:
// embedding, every layer, ln_out and the head, for B sequences of T tokens, activations in float32,
// weights float32 or i8. Registered as the TorchBind class torch.classes.rwkv_chat.FusedCpuModel
// (built with the other CPU ops into one library). Formulas: the block functions of models/rwkv/v4.py ..
// models/rwkv/v7.py (ChatRWKV rwkv/model.py, pip 0.8.32); the Python side (models/backends/fused_cpu.py) packs the
// weights in the order read by the constructor below.
// The torch headers use C++20 bit-field initializers (warned about under -std=c++17); a build log
// shows only its last lines, so this unit stays quiet and a failure elsewhere remains readable.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpedantic"
#pragma GCC diagnostic ignored "-Wc++20-extensions"
#endif
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "fused_cpu.h"
#include "../common/wkv4_step.h"

namespace rwkv_chat {
namespace fused {

RWKV_FUSED_CLONES
void gemv_tiles(const float* x, int64_t N, const float* w, int64_t M, float* y, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemv_tile<8>(x, N, w + 64 * t, M, y + 64 * t);
}

namespace {

using Buf = std::unique_ptr<float[]>;
inline Buf buf(int64_t n) { return Buf(new float[std::max<int64_t>(n, 1)]); }

struct Layer {
    const float *ln1w, *ln1b, *ln2w, *ln2b;
    // time-mix vectors (meaning per generation, see the constructor)
    const float* v[16] = {};
    Mat lr[10];                 // low-rank / LoRA matrices (float32)
    Mat key, value, receptance, gate, output;
    const float *lnxw = nullptr, *lnxb = nullptr;
    const float *fk = nullptr, *fr = nullptr;   // channel-mix mixing vectors
    Mat fkey, fvalue, freceptance;
};

class Reader {
  public:
    explicit Reader(const std::vector<at::Tensor>& ts) : ts_(ts) {}
    const at::Tensor& next() {
        TORCH_CHECK(i_ < ts_.size(), "FusedCpuModel: too few weight tensors (", ts_.size(), ")");
        const at::Tensor& t = ts_[i_++];
        TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "FusedCpuModel: weight ", i_ - 1,
                    " must be a contiguous CPU tensor");
        return t;
    }
    const float* vec(int64_t n, bool optional = false) {
        const at::Tensor& t = next();
        if (optional && t.numel() == 0) return nullptr;
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == n, "FusedCpuModel: weight ", i_ - 1,
                    " must be float32 with ", n, " elements, got ", t.scalar_type(), " ", t.sizes());
        return t.data_ptr<float>();
    }
    // A float32 matrix [N, M] (M < 0: any width, read from the tensor; 3-D [K, N, M] allowed with K*N rows).
    Mat fmat(int64_t N, int64_t M = -1, bool optional = false) {
        const at::Tensor& t = next();
        Mat m;
        if (optional && t.numel() == 0) return m;
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() >= 2, "FusedCpuModel: weight ", i_ - 1,
                    " must be a float32 matrix, got ", t.scalar_type(), " ", t.sizes());
        m.M = t.size(-1);
        m.N = t.numel() / m.M;
        TORCH_CHECK(m.N == N && (M < 0 || m.M == M), "FusedCpuModel: weight ", i_ - 1, " has shape ", t.sizes(),
                    ", expected [", N, ", ", M, "]");
        m.w = t.data_ptr<float>();
        return m;
    }
    // A strategy matrix [N, M]: five tensors (w, mx, rx, my, ry); float32 w with empty scales, or uint8 w.
    Mat mat(int64_t N, int64_t M, bool optional = false) {
        const at::Tensor& w = next();
        const at::Tensor *s[4] = {&next(), &next(), &next(), &next()};
        Mat m;
        if (optional && w.numel() == 0) return m;
        TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == M, "FusedCpuModel: matrix ", i_ - 5,
                    " has shape ", w.sizes(), ", expected [", N, ", ", M, "]");
        m.N = N;
        m.M = M;
        if (w.scalar_type() == at::kFloat) {
            m.w = w.data_ptr<float>();
            return m;
        }
        TORCH_CHECK(w.scalar_type() == at::kByte, "FusedCpuModel: matrix ", i_ - 5, " must be float32 or uint8");
        const int64_t n[4] = {M, M, N, N};
        const float* p[4];
        for (int j = 0; j < 4; ++j) {
            TORCH_CHECK(s[j]->scalar_type() == at::kFloat && s[j]->numel() == n[j], "FusedCpuModel: i8 scale ", j,
                        " of matrix ", i_ - 5, " must be float32 with ", n[j], " elements");
            p[j] = s[j]->data_ptr<float>();
        }
        m.q = w.data_ptr<uint8_t>();
        m.mx = p[0]; m.rx = p[1]; m.my = p[2]; m.ry = p[3];
        return m;
    }
    size_t used() const { return i_; }

  private:
    const std::vector<at::Tensor>& ts_;
    size_t i_ = 0;
};

// Scratch of one forward: R rows.
struct Work {
    int64_t R;
    Buf x, xx, xs, m[6], r, k, v, a, g, w, y, t1, t2, vfirst, h;
};

}  // namespace

class FusedCpuModel : public torch::CustomClassHolder {
  public:
    // dims: [version (4, 5, 6, 7), n_layer, C, A, F, H, N, vocab, rescale_layer]
    FusedCpuModel(std::vector<int64_t> dims, std::vector<at::Tensor> weights) : keep_(std::move(weights)) {
        TORCH_CHECK(dims.size() == 9, "FusedCpuModel: dims must have 9 entries");
        ver_ = dims[0]; L_ = dims[1]; C_ = dims[2]; A_ = dims[3]; F_ = dims[4]; H_ = dims[5]; N_ = dims[6];
        V_ = dims[7]; rescale_ = dims[8];
        TORCH_CHECK(ver_ == 4 || ver_ == 5 || ver_ == 6 || ver_ == 7, "FusedCpuModel: version ", ver_);
        TORCH_CHECK(L_ > 0 && C_ > 0 && A_ > 0 && F_ > 0 && V_ > 0, "FusedCpuModel: bad dims");
        TORCH_CHECK(ver_ == 4 || H_ * N_ == A_, "FusedCpuModel: n_head * head_size != n_att");
        TORCH_CHECK(ver_ != 7 || N_ <= 512, "FusedCpuModel: head size above 512");
        Reader rd(keep_);
        const int64_t C = C_, A = A_, F = F_;
        emb_ = rd.vec(V_ * C);
        lnw_ = rd.vec(C);
        lnb_ = rd.vec(C);
        head_ = rd.mat(C, V_);
        layers_.resize(L_);
        for (int64_t i = 0; i < L_; ++i) {
            Layer& l = layers_[i];
            l.ln1w = rd.vec(C); l.ln1b = rd.vec(C); l.ln2w = rd.vec(C); l.ln2b = rd.vec(C);
            if (ver_ == 4 || ver_ == 5) {
                // v: time_decay, time_first, mix_k, mix_v, mix_r, mix_g (v5.1+)
                const int64_t wn = ver_ == 4 ? A : H_ * N_;
                l.v[0] = rd.vec(wn); l.v[1] = rd.vec(wn);
                l.v[2] = rd.vec(C); l.v[3] = rd.vec(C); l.v[4] = rd.vec(C);
                if (ver_ == 5) {
                    l.v[5] = rd.vec(C, true);
                    l.lnxw = rd.vec(A); l.lnxb = rd.vec(A);
                }
                l.key = rd.mat(C, A); l.value = rd.mat(C, A); l.receptance = rd.mat(C, A);
                if (ver_ == 5) l.gate = rd.mat(C, A, true);
                l.output = rd.mat(A, C);
                l.fk = rd.vec(C); l.fr = rd.vec(C);
                l.fkey = rd.mat(C, F); l.fvalue = rd.mat(F, C); l.freceptance = rd.mat(C, C);
            } else if (ver_ == 6) {
                // v: maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, time_decay, time_first
                for (int j = 0; j < 6; ++j) l.v[j] = rd.vec(C);
                l.lr[0] = rd.fmat(C);                       // maa_w1 [C, 5D]
                TORCH_CHECK(l.lr[0].M % 5 == 0, "FusedCpuModel: time_maa_w1 width must be 5*D");
                l.lr[1] = rd.fmat(l.lr[0].M, C);            // maa_w2 [5, D, C] as [5D, C]
                l.v[6] = rd.vec(A);
                l.lr[2] = rd.fmat(C);                       // decay_w1 [C, Dw]
                l.lr[3] = rd.fmat(l.lr[2].M, A);            // decay_w2 [Dw, A]
                l.v[7] = rd.vec(A);
                l.lnxw = rd.vec(A); l.lnxb = rd.vec(A);
                l.key = rd.mat(C, A); l.value = rd.mat(C, A); l.receptance = rd.mat(C, A);
                l.gate = rd.mat(C, A); l.output = rd.mat(A, C);
                l.fk = rd.vec(C); l.fr = rd.vec(C);
                l.fkey = rd.mat(C, F); l.fvalue = rd.mat(F, C); l.freceptance = rd.mat(C, C);
            } else {
                // v: x_r, x_w, x_k, x_v, x_a, x_g, w0, a0, v0, k_k, k_a, r_k
                for (int j = 0; j < 6; ++j) l.v[j] = rd.vec(C);
                l.v[6] = rd.vec(A); l.lr[0] = rd.fmat(C); l.lr[1] = rd.fmat(l.lr[0].M, A);
                l.v[7] = rd.vec(A); l.lr[2] = rd.fmat(C); l.lr[3] = rd.fmat(l.lr[2].M, A);
                l.v[8] = rd.vec(A, true); l.lr[4] = rd.fmat(C, -1, true);
                l.lr[5] = l.lr[4].present() ? rd.fmat(l.lr[4].M, A) : rd.fmat(0, -1, true);
                TORCH_CHECK(i == 0 || (l.v[8] && l.lr[4].present()), "FusedCpuModel: layer ", i, " lacks v0/v1/v2");
                l.lr[6] = rd.fmat(C); l.lr[7] = rd.fmat(l.lr[6].M, A);
                l.v[9] = rd.vec(A); l.v[10] = rd.vec(A); l.v[11] = rd.vec(A);
                l.lnxw = rd.vec(A); l.lnxb = rd.vec(A);
                l.key = rd.mat(C, A); l.value = rd.mat(C, A); l.receptance = rd.mat(C, A); l.output = rd.mat(A, C);
                l.fk = rd.vec(C);
                l.fkey = rd.mat(C, F); l.fvalue = rd.mat(F, C);
            }
        }
        TORCH_CHECK(rd.used() == keep_.size(), "FusedCpuModel: ", keep_.size() - rd.used(), " weight tensors left over");
        for (const Layer& l : layers_)
            for (const Mat& m : l.lr) lr_max_ = std::max(lr_max_, m.M);
    }

    int64_t n_state() const { return ver_ == 4 ? 5 : 3; }

    // ids: int64 [B, T]; state_in/state_out: n_layer * n_state float32 tensors (see models/state.py);
    // state_out may be state_in (updated in place), or empty (new tensors are made; state_in is not
    // modified). Returns (logits float32 [B, T or 1, vocab], state_out).
    std::tuple<at::Tensor, std::vector<at::Tensor>> forward(at::Tensor ids, std::vector<at::Tensor> state_in,
                                                            std::vector<at::Tensor> state_out, bool full_output) {
        c10::InferenceMode guard;
        TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.device().is_cpu(),
                    "FusedCpuModel: ids must be int64 [B, T] on the CPU");
        ids = ids.contiguous();
        const int64_t B = ids.size(0), T = ids.size(1), R = B * T;
        TORCH_CHECK(B > 0 && T > 0, "FusedCpuModel: empty ids");
        const int64_t ns = n_state();
        const bool fresh = state_out.empty();
        if (fresh)
            for (const at::Tensor& t : state_in) state_out.push_back(at::empty(t.sizes(), t.options()));
        TORCH_CHECK((int64_t)state_in.size() == L_ * ns && state_out.size() == state_in.size(),
                    "state: expected ", L_ * ns, " tensors, got ", state_in.size(), " and ", state_out.size());
        for (size_t j = 0; j < state_in.size(); ++j) {
            const int64_t kind = j % ns;
            std::vector<int64_t> shp;
            if (kind == 0 || kind == ns - 1) shp = {B, C_};
            else if (ver_ == 4) shp = {B, A_};
            else shp = {B, H_, N_, N_};
            for (const at::Tensor* t : {&state_in[j], &state_out[j]}) {
                TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                                t->sizes() == at::IntArrayRef(shp),
                            "state tensor ", j, " (layer ", j / ns, ") must be contiguous float32 ",
                            at::IntArrayRef(shp),
                            " on the CPU, got ", t->scalar_type(), " ", t->sizes());
            }
            if (!state_out[j].is_same(state_in[j]))
                std::memmove(state_out[j].data_ptr<float>(), state_in[j].data_ptr<float>(),
                             sizeof(float) * state_in[j].numel());
        }
        const int64_t* id = ids.data_ptr<int64_t>();
        for (int64_t r = 0; r < R; ++r)
            TORCH_CHECK(id[r] >= 0 && id[r] < V_, "FusedCpuModel: token ", id[r], " outside [0, ", V_, ")");

        const int64_t W = std::max({C_, A_, lr_max_});
        Work s;
        s.R = R;
        s.x = buf(R * C_); s.xx = buf(R * C_); s.xs = buf(R * C_);
        for (auto& m : s.m) m = buf(R * C_);
        for (Buf* b : {&s.r, &s.k, &s.v, &s.a, &s.g, &s.w, &s.y, &s.t1, &s.t2, &s.vfirst}) *b = buf(R * W);
        s.h = buf(R * std::max(F_, 5 * W));
        for (int64_t r = 0; r < R; ++r) std::memcpy(s.x.get() + r * C_, emb_ + id[r] * C_, sizeof(float) * C_);

        for (int64_t i = 0; i < L_; ++i) {
            float* st[5];
            for (int64_t j = 0; j < ns; ++j) st[j] = state_out[i * ns + j].data_ptr<float>();
            switch (ver_) {
            case 4: layer_v4(layers_[i], s, B, T, st); break;
            case 5: layer_v5(layers_[i], s, B, T, st); break;
            case 6: layer_v6(layers_[i], s, B, T, st); break;
            default: layer_v7(layers_[i], i, s, B, T, st); break;
            }
            if (rescale_ > 0 && (i + 1) % rescale_ == 0)
                for (int64_t c = 0; c < R * C_; ++c) s.x[c] *= 0.5f;
        }
        const int64_t To = full_output ? T : 1;
        at::Tensor logits = at::empty({B, To, V_}, at::TensorOptions().dtype(at::kFloat));
        head(s, B, T, To, logits.data_ptr<float>());
        return std::make_tuple(logits, state_out);
    }

  private:
    // ln_out and the head for the last To positions of each sequence -> logits [B, To, vocab].
    RWKV_FUSED_CLONES
    void head(Work& s, int64_t B, int64_t T, int64_t To, float* logits) {
        for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < To; ++t)
                layer_norm(s.x.get() + (b * T + (T - To) + t) * C_, 1, C_, lnw_, lnb_, s.xx.get() + (b * To + t) * C_);
        gemm(s.xx.get(), C_, B * To, head_, logits);
    }

    // The time-mix output projection and residual: x += y @ W_output (y: [R, A] -> [R, C]).
    RWKV_FUSED_CLONES
    void add_output(const Layer& l, Work& s, const float* y) {
        float* out = s.m[0].get();
        gemm(y, A_, s.R, l.output, out);
        float* x = s.x.get();
        for (int64_t j = 0; j < s.R * C_; ++j) x[j] += out[j];
    }

    // The v4/v5 channel-mix (mode 0: x*m + prev*(1-m)) or the v6 one (mode 1: x + (prev-x)*m).
    RWKV_FUSED_CLONES
    void channel_mix(const Layer& l, Work& s, int64_t B, int64_t T, float* ffn_x, int mode) {
        const int64_t R = s.R, C = C_, F = F_;
        float *xx = s.xx.get(), *xs = s.xs.get(), *kx = s.m[0].get(), *rx = s.m[1].get();
        layer_norm(s.x.get(), R, C, l.ln2w, l.ln2b, xx);
        time_shift(xx, ffn_x, B, T, C, xs, mode);
        for (int64_t r = 0; r < R; ++r)
            for (int64_t c = 0; c < C; ++c) {
                const int64_t o = r * C + c;
                if (mode == 0) {
                    kx[o] = xx[o] * l.fk[c] + xs[o] * (1 - l.fk[c]);
                    rx[o] = xx[o] * l.fr[c] + xs[o] * (1 - l.fr[c]);
                } else {
                    kx[o] = xx[o] + xs[o] * l.fk[c];
                    rx[o] = xx[o] + xs[o] * l.fr[c];
                }
            }
        float *rr = s.r.get(), *h = s.h.get(), *o = s.m[2].get();
        gemm(rx, C, R, l.freceptance, rr);
        gemm(kx, C, R, l.fkey, h);
        for (int64_t j = 0; j < R * F; ++j) { const float z = h[j] > 0.f ? h[j] : 0.f; h[j] = z * z; }
        gemm(h, F, R, l.fvalue, o);
        float* x = s.x.get();
        for (int64_t j = 0; j < R * C; ++j) x[j] += sigmoid(rr[j]) * o[j];
    }

    // WKV-5/6: S [key j, value i]; w per channel (w_tok = false: [H, N] fixed) or per token [R, A].
    RWKV_FUSED_CLONES
    void wkv56(Work& s, int64_t B, int64_t T, const float* w, bool w_tok, const float* u, float* S0) {
        const int64_t H = H_, N = N_, A = A_;
        const float *r = s.r.get(), *k = s.k.get(), *v = s.v.get();
        float* y = s.y.get();
        for (int64_t b = 0; b < B; ++b)
            for (int64_t h = 0; h < H; ++h) {
                float* S = S0 + (b * H + h) * N * N;
                for (int64_t t = 0; t < T; ++t) {
                    const int64_t o = (b * T + t) * A + h * N;
                    const float* wt = w_tok ? w + o : w + h * N;
                    float* yo = y + o;
                    std::fill(yo, yo + N, 0.f);
                    for (int64_t j = 0; j < N; ++j) {
                        const float kj = k[o + j], rj = r[o + j], uj = u[h * N + j], wj = wt[j];
                        float* Sj = S + j * N;
#pragma omp simd
                        for (int64_t i = 0; i < N; ++i) {
                            const float kv = kj * v[o + i];
                            yo[i] += rj * (uj * kv + Sj[i]);
                            Sj[i] = kv + wj * Sj[i];
                        }
                    }
                }
            }
    }

    RWKV_FUSED_CLONES
    void layer_v4(const Layer& l, Work& s, int64_t B, int64_t T, float** st) {
        const int64_t R = s.R, C = C_, A = A_;
        float *xx = s.xx.get(), *sx = s.xs.get();
        layer_norm(s.x.get(), R, C, l.ln1w, l.ln1b, xx);
        time_shift(xx, st[0], B, T, C, sx, 0);
        float *kx = s.m[0].get(), *vx = s.m[1].get(), *rx = s.m[2].get();
        for (int64_t r = 0; r < R; ++r)
            for (int64_t c = 0; c < C; ++c) {
                const int64_t o = r * C + c;
                kx[o] = xx[o] * l.v[2][c] + sx[o] * (1 - l.v[2][c]);
                vx[o] = xx[o] * l.v[3][c] + sx[o] * (1 - l.v[3][c]);
                rx[o] = xx[o] * l.v[4][c] + sx[o] * (1 - l.v[4][c]);
            }
        float *rr = s.r.get(), *k = s.k.get(), *v = s.v.get(), *y = s.y.get();
        gemm(rx, C, R, l.receptance, rr);
        gemm(kx, C, R, l.key, k);
        gemm(vx, C, R, l.value, v);
        const float *w = l.v[0], *u = l.v[1];
        float *aa = st[1], *bb = st[2], *pp = st[3];
        for (int64_t b = 0; b < B; ++b)
            for (int64_t c = 0; c < A; ++c) {
                float a_ = aa[b * A + c], b_ = bb[b * A + c], p_ = pp[b * A + c];
                for (int64_t t = 0; t < T; ++t) {
                    const int64_t o = (b * T + t) * A + c;
                    const float kk = k[o], vv = v[o];
                    y[o] = sigmoid(rr[o]) * wkv4_step(w[c], u[c], kk, vv, a_, b_, p_);
                }
                aa[b * A + c] = a_; bb[b * A + c] = b_; pp[b * A + c] = p_;
            }
        add_output(l, s, y);
        channel_mix(l, s, B, T, st[4], 0);
    }

    RWKV_FUSED_CLONES
    void layer_v5(const Layer& l, Work& s, int64_t B, int64_t T, float** st) {
        const int64_t R = s.R, C = C_, A = A_;
        float *xx = s.xx.get(), *sx = s.xs.get();
        layer_norm(s.x.get(), R, C, l.ln1w, l.ln1b, xx);
        time_shift(xx, st[0], B, T, C, sx, 0);
        const bool gate = l.gate.present() && l.v[5] != nullptr;
        for (int j = 0; j < (gate ? 4 : 3); ++j) {
            const float* m = l.v[2 + j];
            float* d = s.m[j].get();
            for (int64_t r = 0; r < R; ++r)
                for (int64_t c = 0; c < C; ++c) d[r * C + c] = xx[r * C + c] * m[c] + sx[r * C + c] * (1 - m[c]);
        }
        gemm(s.m[2].get(), C, R, l.receptance, s.r.get());
        gemm(s.m[0].get(), C, R, l.key, s.k.get());
        gemm(s.m[1].get(), C, R, l.value, s.v.get());
        wkv56(s, B, T, l.v[0], false, l.v[1], st[1]);
        float* y = s.y.get();
        head_group_norm(y, R, H_, N_, l.lnxw, l.lnxb);
        if (gate) {
            float* g = s.g.get();
            gemm(s.m[3].get(), C, R, l.gate, g);
            for (int64_t j = 0; j < R * A; ++j) y[j] *= g[j] * sigmoid(g[j]);
        }
        add_output(l, s, y);
        channel_mix(l, s, B, T, st[2], 0);
    }

    RWKV_FUSED_CLONES
    void layer_v6(const Layer& l, Work& s, int64_t B, int64_t T, float** st) {
        const int64_t R = s.R, C = C_, A = A_;
        float *xx = s.xx.get(), *sx = s.xs.get();
        layer_norm(s.x.get(), R, C, l.ln1w, l.ln1b, xx);
        time_shift(xx, st[0], B, T, C, sx, 1);
        float* t0 = s.m[5].get();
        for (int64_t j = 0; j < R * C; ++j) t0[j] = xx[j] + sx[j] * l.v[0][j % C];
        const int64_t D5 = l.lr[0].M, D = D5 / 5;
        float* xxx = s.h.get();
        gemm(t0, C, R, l.lr[0], xxx);
        for (int64_t j = 0; j < R * D5; ++j) xxx[j] = std::tanh(xxx[j]);
        // mw, mk, mv, mr, mg -> wx, kx, vx, rx, gx in m[0..4]
        float* mm = s.t2.get();
        for (int q = 0; q < 5; ++q) {
            Mat w2 = l.lr[1];
            w2.N = D;
            w2.w += q * D * C;
            gemm(xxx + q * D, D5, R, w2, mm);
            float* d = s.m[q].get();
            const float* base = l.v[1 + q];
            for (int64_t r = 0; r < R; ++r)
                for (int64_t c = 0; c < C; ++c) {
                    const int64_t o = r * C + c;
                    d[o] = xx[o] + sx[o] * (base[c] + mm[o]);
                }
        }
        gemm(s.m[3].get(), C, R, l.receptance, s.r.get());
        gemm(s.m[1].get(), C, R, l.key, s.k.get());
        gemm(s.m[2].get(), C, R, l.value, s.v.get());
        float *g = s.g.get(), *w = s.w.get(), *t1 = s.t1.get();
        gemm(s.m[4].get(), C, R, l.gate, g);
        for (int64_t j = 0; j < R * A; ++j) g[j] *= sigmoid(g[j]);
        gemm(s.m[0].get(), C, R, l.lr[2], t1);
        for (int64_t j = 0; j < R * l.lr[2].M; ++j) t1[j] = std::tanh(t1[j]);
        gemm(t1, l.lr[2].M, R, l.lr[3], w);
        for (int64_t j = 0; j < R * A; ++j) w[j] = std::exp(-std::exp(l.v[6][j % A] + w[j]));
        wkv56(s, B, T, w, true, l.v[7], st[1]);
        float* y = s.y.get();
        head_group_norm(y, R, H_, N_, l.lnxw, l.lnxb);
        for (int64_t j = 0; j < R * A; ++j) y[j] *= g[j];
        add_output(l, s, y);
        channel_mix(l, s, B, T, st[2], 1);
    }

    RWKV_FUSED_CLONES
    void layer_v7(const Layer& l, int64_t i, Work& s, int64_t B, int64_t T, float** st) {
        const int64_t R = s.R, C = C_, A = A_, H = H_, N = N_;
        float *xx = s.xx.get(), *xs = s.xs.get();
        layer_norm(s.x.get(), R, C, l.ln1w, l.ln1b, xx);
        time_shift(xx, st[0], B, T, C, xs, 1);
        for (int q = 0; q < 6; ++q) {          // xr, xw, xk, xv, xa, xg
            float* d = s.m[q].get();
            const float* m = l.v[q];
            for (int64_t r = 0; r < R; ++r)
                for (int64_t c = 0; c < C; ++c) d[r * C + c] = xx[r * C + c] + xs[r * C + c] * m[c];
        }
        float *r = s.r.get(), *w = s.w.get(), *k = s.k.get(), *v = s.v.get(), *a = s.a.get(), *g = s.g.get();
        float *t1 = s.t1.get(), *t2 = s.t2.get();
        gemm(s.m[0].get(), C, R, l.receptance, r);
        gemm(s.m[1].get(), C, R, l.lr[0], t1);
        for (int64_t j = 0; j < R * l.lr[0].M; ++j) t1[j] = std::tanh(t1[j]);
        gemm(t1, l.lr[0].M, R, l.lr[1], w);
        gemm(s.m[2].get(), C, R, l.key, k);
        gemm(s.m[3].get(), C, R, l.value, v);
        gemm(s.m[4].get(), C, R, l.lr[2], t1);
        gemm(t1, l.lr[2].M, R, l.lr[3], a);
        for (int64_t j = 0; j < R * A; ++j) a[j] = sigmoid(l.v[7][j % A] + a[j]);
        gemm(s.m[5].get(), C, R, l.lr[6], t1);
        for (int64_t j = 0; j < R * l.lr[6].M; ++j) t1[j] = sigmoid(t1[j]);
        gemm(t1, l.lr[6].M, R, l.lr[7], g);
        // kk = normalize(k * k_k) per head (into t2); k = k * (1 + (a - 1) * k_a)
        for (int64_t rr = 0; rr < R; ++rr)
            for (int64_t h = 0; h < H; ++h) {
                const int64_t o = rr * A + h * N;
                float n2 = 0.f;
                for (int64_t j = 0; j < N; ++j) { t2[o + j] = k[o + j] * l.v[9][h * N + j]; n2 += t2[o + j] * t2[o + j]; }
                const float inv = 1.f / std::max(std::sqrt(n2), 1e-12f);
                for (int64_t j = 0; j < N; ++j) t2[o + j] *= inv;
            }
        for (int64_t j = 0; j < R * A; ++j) k[j] = k[j] * (1 + (a[j] - 1) * l.v[10][j % A]);
        float* vf = s.vfirst.get();
        if (i == 0) {
            std::memcpy(vf, v, sizeof(float) * R * A);
        } else {
            gemm(s.m[3].get(), C, R, l.lr[4], t1);
            float* vv = s.y.get();
            gemm(t1, l.lr[4].M, R, l.lr[5], vv);
            for (int64_t j = 0; j < R * A; ++j) v[j] = v[j] + (vf[j] - v[j]) * sigmoid(l.v[8][j % A] + vv[j]);
        }
        for (int64_t j = 0; j < R * A; ++j) w[j] = std::exp(-0.606531f * sigmoid(l.v[6][j % A] + w[j]));
        // WKV-7: S [value i, key j]; a = -kk, b = kk * a_gate
        float* y = s.y.get();
        for (int64_t b = 0; b < B; ++b)
            for (int64_t h = 0; h < H; ++h) {
                float* S = st[1] + (b * H + h) * N * N;
                for (int64_t t = 0; t < T; ++t) {
                    const int64_t o = (b * T + t) * A + h * N;
                    const float *kk = t2 + o, *ag = a + o, *wt = w + o, *kt = k + o, *rt = r + o;
                    float bt[512];
                    for (int64_t j = 0; j < N; ++j) bt[j] = kk[j] * ag[j];
                    for (int64_t ii = 0; ii < N; ++ii) {
                        float* Si = S + ii * N;
                        float sa = 0.f;
#pragma omp simd reduction(+ : sa)
                        for (int64_t j = 0; j < N; ++j) sa += -kk[j] * Si[j];
                        const float vi = v[o + ii];
                        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t j = 0; j < N; ++j) {
                            Si[j] = Si[j] * wt[j] + sa * bt[j] + vi * kt[j];
                            acc += Si[j] * rt[j];
                        }
                        y[o + ii] = acc;
                    }
                }
            }
        head_group_norm(y, R, H, N, l.lnxw, l.lnxb);
        for (int64_t rr = 0; rr < R; ++rr)
            for (int64_t h = 0; h < H; ++h) {
                const int64_t o = rr * A + h * N;
                float sum = 0.f;
                for (int64_t j = 0; j < N; ++j) sum += r[o + j] * k[o + j] * l.v[11][h * N + j];
                for (int64_t j = 0; j < N; ++j) y[o + j] = (y[o + j] + sum * v[o + j]) * g[o + j];
            }
        add_output(l, s, y);
        // channel-mix: k = relu((x + (prev - x) * x_k) @ Wk)^2; x += k @ Wv
        float *x = s.x.get(), *out = s.m[0].get();
        layer_norm(x, R, C, l.ln2w, l.ln2b, xx);
        time_shift(xx, st[2], B, T, C, xs, 1);
        float* kx = s.m[1].get();
        for (int64_t j = 0; j < R * C; ++j) kx[j] = xx[j] + xs[j] * l.fk[j % C];
        float* h = s.h.get();
        gemm(kx, C, R, l.fkey, h);
        for (int64_t j = 0; j < R * F_; ++j) { const float z = h[j] > 0.f ? h[j] : 0.f; h[j] = z * z; }
        gemm(h, F_, R, l.fvalue, out);
        for (int64_t j = 0; j < R * C; ++j) x[j] += out[j];
    }

    std::vector<at::Tensor> keep_;
    int64_t ver_, L_, C_, A_, F_, H_, N_, V_, rescale_, lr_max_ = 0;
    const float *emb_, *lnw_, *lnb_;
    Mat head_;
    std::vector<Layer> layers_;
};

}  // namespace fused
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.class_<rwkv_chat::fused::FusedCpuModel>("FusedCpuModel")
        .def(torch::init<std::vector<int64_t>, std::vector<at::Tensor>>())
        .def("forward", &rwkv_chat::fused::FusedCpuModel::forward);
}
