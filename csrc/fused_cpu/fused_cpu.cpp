// Fused CPU inference of a whole RWKV model (v4, v5/5.1/5.2, v6, v7) in one call per forward:
// embedding, every layer, ln_out and the head, for B sequences of T tokens, activations in float32,
// weights float32 or i8. Registered as the TorchBind class torch.classes.rwkv_chat.FusedCpuModel
// (built with the other CPU ops into one library). Formulas: the block functions of models/rwkv/v4.py ..
// models/rwkv/v7.py (ChatRWKV rwkv/model.py, pip 0.8.32); the Python side (models/backends/fused_cpu.py) passes the
// weights as name -> tensor dicts (checkpoint names, see the constructor), looked up once into struct Layer.
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
#include <string>
#include <unordered_set>
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

// Token-shift mixing vectors of the time-mix: Layer::mix[...] by generation (the layer functions loop
// over runs of them in this order).
enum MixV45 { MixK = 0, MixV, MixR, MixG };              // v4, v5: att.time_mix_{k,v,r,g}
enum MixV6 { MaaX = 0, MaaW, MaaK, MaaV, MaaR, MaaG };   // v6: att.time_maa_{x,w,k,v,r,g}
enum MixV7 { Xr = 0, Xw, Xk, Xv, Xa, Xg };               // v7: att.x_{r,w,k,v,a,g}

// One layer's weights: raw pointers into the tensors of its name -> tensor dict (filled once by the
// constructor; an absent optional weight is nullptr / !present()).
struct Layer {
    const float *ln1w = nullptr, *ln1b = nullptr, *ln2w = nullptr, *ln2b = nullptr;
    const float* mix[6] = {};                                // see MixV45 / MixV6 / MixV7
    const float *time_decay = nullptr, *time_first = nullptr; // v4-v6 ([A]; v5/v6 [H, N] flat)
    Mat maa_w1, maa_w2, decay_w1, decay_w2;                  // v6 low-rank (float32)
    const float *w0 = nullptr, *a0 = nullptr, *v0 = nullptr; // v7 (v0: absent on layer 0)
    const float *k_k = nullptr, *k_a = nullptr, *r_k = nullptr;
    Mat w1, w2, a1, a2, v1, v2, g1, g2;                      // v7 low-rank (float32; v1, v2: absent on layer 0)
    Mat key, value, receptance, gate, output;                // gate: v5.1+ and v6 (absent in v5.0)
    const float *lnxw = nullptr, *lnxb = nullptr;
    const float *fk = nullptr, *fr = nullptr;                // channel-mix mixing vectors (fr: v4-v6)
    Mat fkey, fvalue, freceptance;                           // freceptance: v4-v6
};

using WeightDict = c10::Dict<std::string, at::Tensor>;

// The weights of one scope ("the model" or "layer i") looked up by checkpoint name, with dtype/shape
// checks; records the names read so that finish() can reject the names nothing reads.
class Named {
  public:
    Named(const WeightDict& d, std::string scope) : d_(d), scope_(std::move(scope)) {}

    // The tensor called name; undefined when absent (an error unless optional).
    at::Tensor get(const std::string& name, bool optional = false) {
        auto it = d_.find(name);
        if (it == d_.end()) {
            TORCH_CHECK(optional, "FusedCpuModel: ", scope_, " lacks '", name, "'");
            return at::Tensor();
        }
        read_.insert(name);
        at::Tensor t = it->value();
        TORCH_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous(), "FusedCpuModel: ", scope_, " '", name,
                    "' must be a contiguous CPU tensor");
        return t;
    }
    // A float32 vector of n elements (any shape).
    const float* vec(const std::string& name, int64_t n, bool optional = false) {
        const at::Tensor t = get(name, optional);
        if (!t.defined()) return nullptr;
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == n, "FusedCpuModel: ", scope_, " '", name,
                    "' must be float32 with ", n, " elements, got ", t.scalar_type(), " ", t.sizes());
        return t.data_ptr<float>();
    }
    // A float32 matrix [N, M] (M < 0: any width, read from the tensor; 3-D [K, N', M] allowed with K*N' = N).
    Mat fmat(const std::string& name, int64_t N, int64_t M = -1, bool optional = false) {
        const at::Tensor t = get(name, optional);
        Mat m;
        if (!t.defined()) return m;
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() >= 2, "FusedCpuModel: ", scope_, " '", name,
                    "' must be a float32 matrix, got ", t.scalar_type(), " ", t.sizes());
        m.M = t.size(-1);
        m.N = t.numel() / m.M;
        TORCH_CHECK(m.N == N && (M < 0 || m.M == M), "FusedCpuModel: ", scope_, " '", name, "' has shape ",
                    t.sizes(), ", expected [", N, ", ", M, "]");
        m.w = t.data_ptr<float>();
        return m;
    }
    // A strategy matrix [N, M]: float32 name, or uint8 name with float32 scales name.mx, name.rx [M] and
    // name.my, name.ry [N, 1] (models/formats/i8.py), or int32 name = qweight [Kp/8, Np] of the GPTQ layout with
    // name.qzeros int32 [Kp/group, Np/8] and name.scales float32/float16/bfloat16 [Kp/group, Np] (Kp, Np: N, M
    // rounded up to multiples of 8; the group a multiple of 8; models/formats/i4.py), or float8_e4m3fn name
    // [M, N] (output-major) with name.scale float32 [M] (models/formats/f8.py).
    Mat mat(const std::string& name, int64_t N, int64_t M, bool optional = false) {
        const at::Tensor w = get(name, optional);
        Mat m;
        if (!w.defined()) return m;
        if (w.scalar_type() == at::kInt) return i4(name, w, N, M);
        if (w.scalar_type() == at::kFloat8_e4m3fn) return f8(name, w, N, M);
        TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == M, "FusedCpuModel: ", scope_, " '", name,
                    "' has shape ", w.sizes(), ", expected [", N, ", ", M, "]");
        m.N = N;
        m.M = M;
        if (w.scalar_type() == at::kFloat) {
            m.w = w.data_ptr<float>();
            return m;
        }
        TORCH_CHECK(w.scalar_type() == at::kByte, "FusedCpuModel: ", scope_, " '", name,
                    "' must be float32 or uint8, got ", w.scalar_type());
        const char* part[4] = {".mx", ".rx", ".my", ".ry"};
        const int64_t n[4] = {M, M, N, N};
        const float* p[4];
        for (int j = 0; j < 4; ++j) {
            const std::string sn = name + part[j];
            const at::Tensor s = get(sn);
            TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == n[j], "FusedCpuModel: ", scope_, " '", sn,
                        "' (i8 scale) must be float32 with ", n[j], " elements, got ", s.scalar_type(), " ",
                        s.sizes());
            p[j] = s.data_ptr<float>();
        }
        m.q = w.data_ptr<uint8_t>();
        m.mx = p[0]; m.rx = p[1]; m.my = p[2]; m.ry = p[3];
        return m;
    }
    Mat i4(const std::string& name, const at::Tensor& w, int64_t N, int64_t M) {
        Mat m;
        m.N = N;
        m.M = M;
        m.Kp = (N + 7) / 8 * 8;
        m.Np = (M + 7) / 8 * 8;
        TORCH_CHECK(w.dim() == 2 && w.size(0) * 8 == m.Kp && w.size(1) == m.Np, "FusedCpuModel: ", scope_, " '", name,
                    "' (int4 qweight) has shape ", w.sizes(), ", expected [", m.Kp / 8, ", ", m.Np, "]");
        const at::Tensor z = get(name + ".qzeros"), s = get(name + ".scales");
        const int64_t groups = z.dim() == 2 ? z.size(0) : 0;
        m.group = groups > 0 ? m.Kp / groups : 0;
        TORCH_CHECK(z.scalar_type() == at::kInt && groups > 0 && m.group * groups == m.Kp && m.group % 8 == 0 &&
                        z.size(1) * 8 == m.Np,
                    "FusedCpuModel: ", scope_, " '", name, ".qzeros' must be int32 [Kp/group, ", m.Np / 8,
                    "] with the group a multiple of 8 dividing ", m.Kp, ", got ", z.scalar_type(), " ", z.sizes());
        const auto st = s.scalar_type();
        TORCH_CHECK((st == at::kFloat || st == at::kHalf || st == at::kBFloat16) && s.dim() == 2 &&
                        s.size(0) == groups && s.size(1) == m.Np,
                    "FusedCpuModel: ", scope_, " '", name, ".scales' must be float32/float16/bfloat16 [", groups, ", ",
                    m.Np, "], got ", st, " ", s.sizes());
        m.qw = w.data_ptr<int32_t>();
        m.qz = z.data_ptr<int32_t>();
        m.sc = s.data_ptr();
        m.sc_type = st == at::kFloat ? 0 : st == at::kHalf ? 1 : 2;
        return m;
    }
    Mat f8(const std::string& name, const at::Tensor& w, int64_t N, int64_t M) {
        Mat m;
        m.N = N;
        m.M = M;
        TORCH_CHECK(w.dim() == 2 && w.size(0) == M && w.size(1) == N, "FusedCpuModel: ", scope_, " '", name,
                    "' (fp8, output-major) has shape ", w.sizes(), ", expected [", M, ", ", N, "]");
        const at::Tensor s = get(name + ".scale");
        TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == M, "FusedCpuModel: ", scope_, " '", name,
                    ".scale' must be float32 with ", M, " elements, got ", s.scalar_type(), " ", s.sizes());
        m.w8 = static_cast<const uint8_t*>(w.data_ptr());
        m.fscale = s.data_ptr<float>();
        return m;
    }
    // Raises for the names nothing has read (a weight of a layout this class does not implement).
    void finish(int64_t version) const {
        std::string extra;
        for (const auto& e : d_)
            if (read_.count(e.key()) == 0) extra += (extra.empty() ? "'" : ", '") + e.key() + "'";
        TORCH_CHECK(extra.empty(), "FusedCpuModel: ", scope_, " has weights the RWKV-", version,
                    " fused path does not read: ", extra);
    }

  private:
    const WeightDict& d_;
    std::string scope_;
    std::unordered_set<std::string> read_;
};

// Scratch of one forward: R rows.
struct Work {
    int64_t R;
    Buf x, xx, xs, m[6], r, k, v, a, g, w, y, t1, t2, vfirst, h;
};

}  // namespace

class FusedCpuModel : public torch::CustomClassHolder {
  public:
    // dims: [version (4, 5, 6, 7), n_layer, C, A, F, H, N, vocab, rescale_layer].
    // model: the model-level weights by checkpoint name: "emb.weight" float32 [vocab, C], "ln_out.weight",
    //   "ln_out.bias" float32 [C], "head.weight" [C, vocab].
    // layers: n_layer dicts, layer i's weights by their checkpoint names without "blocks.i." ("ln1.weight",
    //   "att.time_decay", "att.key.weight", ...; the names read per generation are in the constructor body).
    // Vectors are float32 with the layer's element count (any shape). A matrix "X.weight" [in, out] is
    // float32, or uint8 with its i8 scales as four more entries "X.weight.mx", "X.weight.rx" float32 [out]
    // and "X.weight.my", "X.weight.ry" float32 [in, 1], or int32 (int4: the GPTQ qweight) with "X.weight.qzeros"
    // and "X.weight.scales", or float8_e4m3fn [out, in] (output-major) with "X.weight.scale" float32 [out]
    // (Named::mat). Every tensor is contiguous on the CPU; the object
    // keeps the dicts (references, no copies). Optional: v5 "att.gate.weight" (from 5.1; "att.time_mix_g"
    // is required with it), v7 layer 0's "att.v0", "att.v1", "att.v2". Raises (c10::Error, RuntimeError in
    // Python) naming the weight: a required name absent, a wrong dtype/shape/device/layout, or a name the
    // constructor does not read (a weight of a layout it does not implement).
    FusedCpuModel(std::vector<int64_t> dims, WeightDict model, std::vector<WeightDict> layers)
        : model_w_(std::move(model)), layer_w_(std::move(layers)) {
        TORCH_CHECK(dims.size() == 9, "FusedCpuModel: dims must have 9 entries");
        ver_ = dims[0]; L_ = dims[1]; C_ = dims[2]; A_ = dims[3]; F_ = dims[4]; H_ = dims[5]; N_ = dims[6];
        V_ = dims[7]; rescale_ = dims[8];
        TORCH_CHECK(ver_ == 4 || ver_ == 5 || ver_ == 6 || ver_ == 7, "FusedCpuModel: version ", ver_);
        TORCH_CHECK(L_ > 0 && C_ > 0 && A_ > 0 && F_ > 0 && V_ > 0, "FusedCpuModel: bad dims");
        TORCH_CHECK(ver_ == 4 || H_ * N_ == A_, "FusedCpuModel: n_head * head_size != n_att");
        TORCH_CHECK(ver_ != 7 || N_ <= 512, "FusedCpuModel: head size above 512");
        TORCH_CHECK((int64_t)layer_w_.size() == L_, "FusedCpuModel: ", layer_w_.size(), " layer weight dicts for ",
                    L_, " layers");
        const int64_t C = C_, A = A_, F = F_;
        Named g(model_w_, "the model");
        emb_ = g.vec("emb.weight", V_ * C);
        lnw_ = g.vec("ln_out.weight", C);
        lnb_ = g.vec("ln_out.bias", C);
        head_ = g.mat("head.weight", C, V_);
        g.finish(ver_);
        layers_.resize(L_);
        for (int64_t i = 0; i < L_; ++i) {
            Layer& l = layers_[i];
            Named w(layer_w_[i], "layer " + std::to_string(i));
            l.ln1w = w.vec("ln1.weight", C); l.ln1b = w.vec("ln1.bias", C);
            l.ln2w = w.vec("ln2.weight", C); l.ln2b = w.vec("ln2.bias", C);
            if (ver_ == 4 || ver_ == 5) {
                const int64_t wn = ver_ == 4 ? A : H_ * N_;
                l.time_decay = w.vec("att.time_decay", wn);
                l.time_first = w.vec("att.time_first", wn);
                l.mix[MixK] = w.vec("att.time_mix_k", C);
                l.mix[MixV] = w.vec("att.time_mix_v", C);
                l.mix[MixR] = w.vec("att.time_mix_r", C);
                if (ver_ == 5) {
                    l.gate = w.mat("att.gate.weight", C, A, true);
                    l.mix[MixG] = w.vec("att.time_mix_g", C, !l.gate.present());
                    l.lnxw = w.vec("att.ln_x.weight", A); l.lnxb = w.vec("att.ln_x.bias", A);
                }
                l.key = w.mat("att.key.weight", C, A);
                l.value = w.mat("att.value.weight", C, A);
                l.receptance = w.mat("att.receptance.weight", C, A);
                l.output = w.mat("att.output.weight", A, C);
                l.fk = w.vec("ffn.time_mix_k", C); l.fr = w.vec("ffn.time_mix_r", C);
            } else if (ver_ == 6) {
                l.mix[MaaX] = w.vec("att.time_maa_x", C);
                l.mix[MaaW] = w.vec("att.time_maa_w", C);
                l.mix[MaaK] = w.vec("att.time_maa_k", C);
                l.mix[MaaV] = w.vec("att.time_maa_v", C);
                l.mix[MaaR] = w.vec("att.time_maa_r", C);
                l.mix[MaaG] = w.vec("att.time_maa_g", C);
                l.maa_w1 = w.fmat("att.time_maa_w1", C);                   // [C, 5D]
                TORCH_CHECK(l.maa_w1.M % 5 == 0, "FusedCpuModel: layer ", i, " 'att.time_maa_w1' width must be 5*D");
                l.maa_w2 = w.fmat("att.time_maa_w2", l.maa_w1.M, C);      // [5, D, C] as [5D, C]
                l.time_decay = w.vec("att.time_decay", A);
                l.decay_w1 = w.fmat("att.time_decay_w1", C);                // [C, Dw]
                l.decay_w2 = w.fmat("att.time_decay_w2", l.decay_w1.M, A);  // [Dw, A]
                l.time_first = w.vec("att.time_first", A);
                l.lnxw = w.vec("att.ln_x.weight", A); l.lnxb = w.vec("att.ln_x.bias", A);
                l.key = w.mat("att.key.weight", C, A);
                l.value = w.mat("att.value.weight", C, A);
                l.receptance = w.mat("att.receptance.weight", C, A);
                l.gate = w.mat("att.gate.weight", C, A);
                l.output = w.mat("att.output.weight", A, C);
                l.fk = w.vec("ffn.time_maa_k", C); l.fr = w.vec("ffn.time_maa_r", C);
            } else {
                l.mix[Xr] = w.vec("att.x_r", C);
                l.mix[Xw] = w.vec("att.x_w", C);
                l.mix[Xk] = w.vec("att.x_k", C);
                l.mix[Xv] = w.vec("att.x_v", C);
                l.mix[Xa] = w.vec("att.x_a", C);
                l.mix[Xg] = w.vec("att.x_g", C);
                l.w0 = w.vec("att.w0", A); l.w1 = w.fmat("att.w1", C); l.w2 = w.fmat("att.w2", l.w1.M, A);
                l.a0 = w.vec("att.a0", A); l.a1 = w.fmat("att.a1", C); l.a2 = w.fmat("att.a2", l.a1.M, A);
                const bool first = i == 0;                       // layer 0 makes v_first: no v0/v1/v2
                l.v0 = w.vec("att.v0", A, first); l.v1 = w.fmat("att.v1", C, -1, first);
                l.v2 = w.fmat("att.v2", l.v1.M, A, !l.v1.present());
                l.g1 = w.fmat("att.g1", C); l.g2 = w.fmat("att.g2", l.g1.M, A);
                l.k_k = w.vec("att.k_k", A); l.k_a = w.vec("att.k_a", A); l.r_k = w.vec("att.r_k", A);
                l.lnxw = w.vec("att.ln_x.weight", A); l.lnxb = w.vec("att.ln_x.bias", A);
                l.key = w.mat("att.key.weight", C, A);
                l.value = w.mat("att.value.weight", C, A);
                l.receptance = w.mat("att.receptance.weight", C, A);
                l.output = w.mat("att.output.weight", A, C);
                l.fk = w.vec("ffn.x_k", C);
            }
            l.fkey = w.mat("ffn.key.weight", C, F);
            l.fvalue = w.mat("ffn.value.weight", F, C);
            if (ver_ != 7) l.freceptance = w.mat("ffn.receptance.weight", C, C);
            w.finish(ver_);
        }
        for (const Layer& l : layers_)
            for (const Mat* m : {&l.maa_w1, &l.maa_w2, &l.decay_w1, &l.decay_w2, &l.w1, &l.w2, &l.a1, &l.a2, &l.v1,
                                 &l.v2, &l.g1, &l.g2})
                lr_max_ = std::max(lr_max_, m->M);
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
                kx[o] = xx[o] * l.mix[MixK][c] + sx[o] * (1 - l.mix[MixK][c]);
                vx[o] = xx[o] * l.mix[MixV][c] + sx[o] * (1 - l.mix[MixV][c]);
                rx[o] = xx[o] * l.mix[MixR][c] + sx[o] * (1 - l.mix[MixR][c]);
            }
        float *rr = s.r.get(), *k = s.k.get(), *v = s.v.get(), *y = s.y.get();
        gemm(rx, C, R, l.receptance, rr);
        gemm(kx, C, R, l.key, k);
        gemm(vx, C, R, l.value, v);
        const float *w = l.time_decay, *u = l.time_first;
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
        const bool gate = l.gate.present() && l.mix[MixG] != nullptr;
        for (int j = 0; j < (gate ? 4 : 3); ++j) {     // k, v, r (, g) -> m[0..3]
            const float* m = l.mix[MixK + j];
            float* d = s.m[j].get();
            for (int64_t r = 0; r < R; ++r)
                for (int64_t c = 0; c < C; ++c) d[r * C + c] = xx[r * C + c] * m[c] + sx[r * C + c] * (1 - m[c]);
        }
        gemm(s.m[2].get(), C, R, l.receptance, s.r.get());
        gemm(s.m[0].get(), C, R, l.key, s.k.get());
        gemm(s.m[1].get(), C, R, l.value, s.v.get());
        wkv56(s, B, T, l.time_decay, false, l.time_first, st[1]);
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
        for (int64_t j = 0; j < R * C; ++j) t0[j] = xx[j] + sx[j] * l.mix[MaaX][j % C];
        const int64_t D5 = l.maa_w1.M, D = D5 / 5;
        float* xxx = s.h.get();
        gemm(t0, C, R, l.maa_w1, xxx);
        for (int64_t j = 0; j < R * D5; ++j) xxx[j] = std::tanh(xxx[j]);
        // mw, mk, mv, mr, mg -> wx, kx, vx, rx, gx in m[0..4]
        float* mm = s.t2.get();
        for (int q = 0; q < 5; ++q) {
            Mat w2 = l.maa_w2;
            w2.N = D;
            w2.w += q * D * C;
            gemm(xxx + q * D, D5, R, w2, mm);
            float* d = s.m[q].get();
            const float* base = l.mix[MaaW + q];
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
        gemm(s.m[0].get(), C, R, l.decay_w1, t1);
        for (int64_t j = 0; j < R * l.decay_w1.M; ++j) t1[j] = std::tanh(t1[j]);
        gemm(t1, l.decay_w1.M, R, l.decay_w2, w);
        for (int64_t j = 0; j < R * A; ++j) w[j] = std::exp(-std::exp(l.time_decay[j % A] + w[j]));
        wkv56(s, B, T, w, true, l.time_first, st[1]);
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
            const float* m = l.mix[Xr + q];
            for (int64_t r = 0; r < R; ++r)
                for (int64_t c = 0; c < C; ++c) d[r * C + c] = xx[r * C + c] + xs[r * C + c] * m[c];
        }
        float *r = s.r.get(), *w = s.w.get(), *k = s.k.get(), *v = s.v.get(), *a = s.a.get(), *g = s.g.get();
        float *t1 = s.t1.get(), *t2 = s.t2.get();
        gemm(s.m[0].get(), C, R, l.receptance, r);
        gemm(s.m[1].get(), C, R, l.w1, t1);
        for (int64_t j = 0; j < R * l.w1.M; ++j) t1[j] = std::tanh(t1[j]);
        gemm(t1, l.w1.M, R, l.w2, w);
        gemm(s.m[2].get(), C, R, l.key, k);
        gemm(s.m[3].get(), C, R, l.value, v);
        gemm(s.m[4].get(), C, R, l.a1, t1);
        gemm(t1, l.a1.M, R, l.a2, a);
        for (int64_t j = 0; j < R * A; ++j) a[j] = sigmoid(l.a0[j % A] + a[j]);
        gemm(s.m[5].get(), C, R, l.g1, t1);
        for (int64_t j = 0; j < R * l.g1.M; ++j) t1[j] = sigmoid(t1[j]);
        gemm(t1, l.g1.M, R, l.g2, g);
        // kk = normalize(k * k_k) per head (into t2); k = k * (1 + (a - 1) * k_a)
        for (int64_t rr = 0; rr < R; ++rr)
            for (int64_t h = 0; h < H; ++h) {
                const int64_t o = rr * A + h * N;
                float n2 = 0.f;
                for (int64_t j = 0; j < N; ++j) { t2[o + j] = k[o + j] * l.k_k[h * N + j]; n2 += t2[o + j] * t2[o + j]; }
                const float inv = 1.f / std::max(std::sqrt(n2), 1e-12f);
                for (int64_t j = 0; j < N; ++j) t2[o + j] *= inv;
            }
        for (int64_t j = 0; j < R * A; ++j) k[j] = k[j] * (1 + (a[j] - 1) * l.k_a[j % A]);
        float* vf = s.vfirst.get();
        if (i == 0) {
            std::memcpy(vf, v, sizeof(float) * R * A);
        } else {
            gemm(s.m[3].get(), C, R, l.v1, t1);
            float* vv = s.y.get();
            gemm(t1, l.v1.M, R, l.v2, vv);
            for (int64_t j = 0; j < R * A; ++j) v[j] = v[j] + (vf[j] - v[j]) * sigmoid(l.v0[j % A] + vv[j]);
        }
        for (int64_t j = 0; j < R * A; ++j) w[j] = std::exp(-0.606531f * sigmoid(l.w0[j % A] + w[j]));
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
                for (int64_t j = 0; j < N; ++j) sum += r[o + j] * k[o + j] * l.r_k[h * N + j];
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

    WeightDict model_w_;                 // the weights the pointers below point into
    std::vector<WeightDict> layer_w_;
    int64_t ver_, L_, C_, A_, F_, H_, N_, V_, rescale_, lr_max_ = 0;
    const float *emb_, *lnw_, *lnb_;
    Mat head_;
    std::vector<Layer> layers_;
};

}  // namespace fused
}  // namespace rwkv_chat

TORCH_LIBRARY_FRAGMENT(rwkv_chat, m) {
    m.class_<rwkv_chat::fused::FusedCpuModel>("FusedCpuModel")
        .def(torch::init<std::vector<int64_t>, rwkv_chat::fused::WeightDict,
                         std::vector<rwkv_chat::fused::WeightDict>>())
        .def("forward", &rwkv_chat::fused::FusedCpuModel::forward);
}
