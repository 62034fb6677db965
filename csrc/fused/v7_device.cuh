// Device helpers shared by the fused RWKV-7 kernels (v7_fused.cu: one kernel per piece of a layer; v7_step.cu: the
// whole decode step in one persistent launch). Formulas: ChatRWKV rwkv/model.py (pip rwkv 0.8.32)
// RWKV_x070_TMix_one; models/rwkv/v7.py has the same math in torch. Included by .cu files only; everything here lives
// in an anonymous namespace, so each translation unit has its own copy.
#pragma once

#include "../common/cuda_common.cuh"

namespace rwkv_chat {
namespace {

constexpr float kDecayScale = 0.606531f;  // exp(-0.5), as in the reference
constexpr float kLnEps = 1e-5f;
constexpr float kGnEps = 64e-5f;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename F> __device__ __forceinline__ float round_act(float x) { return to_f32(from_f32<F>(x)); }

// Ask L2 for the 128-byte lines of [p, p + bytes), spread over the block's threads (safe before
// pdl_wait: L2 is the point of coherence, a prefetch never returns stale data to the SM).
__device__ __forceinline__ void prefetch_l2(const void* p, long bytes) {
    if (p == nullptr) return;
    const char* c = static_cast<const char*>(p);
    for (long o = (long)threadIdx.x * 128; o < bytes; o += (long)blockDim.x * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c + o));
}
// Sum over the NT threads of a block (NT <= 1024); sh: >= 32 floats of shared memory. All threads
// get the result. Contains barriers: every thread of the block must call it.
template <int NT>
__device__ __forceinline__ float block_sum(float v, float* sh) {
    constexpr int W = NT < 32 ? NT : 32;
    constexpr unsigned mask = NT < 32 ? ((1u << NT) - 1u) : 0xffffffffu;
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, W);
    if (NT <= 32) return v;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < (NT + 31) / 32; ++i) t += sh[i];
    return t;
}

// The residual add and LayerNorm statistics of one row over NT threads: cur[c] = round(x[c] + dx[c]) (dx nullable:
// x[c]) as float, and (mean, rstd) with rstd = 1 / sqrt(var + 1e-5), the variance about the mean (two passes).
// load(p) reads one value of x or dx. red: >= 32 floats of shared memory; contains barriers (every thread calls it).
template <typename F, int NT, typename Load>
__device__ __forceinline__ float2 residual_ln_stats(const F* x, const F* dx, int C, float* cur, float* red,
                                                    Load&& load) {
    float sum = 0.f;
    for (int c = threadIdx.x; c < C; c += NT) {
        float v = to_f32(load(x + c));
        if (dx) v = round_act<F>(v + to_f32(load(dx + c)));
        cur[c] = v;
        sum += v;
    }
    const float mean = block_sum<NT>(sum, red) / C;
    float sq = 0.f;
    for (int c = threadIdx.x; c < C; c += NT) { const float d = cur[c] - mean; sq += d * d; }
    return make_float2(mean, rsqrtf(block_sum<NT>(sq, red) / C + kLnEps));
}

// gemv_multi's activation codes: 0 none, 1 tanh, 2 sigmoid, 3 relu^2.
__device__ __forceinline__ float act_apply(int act, float v) {
    switch (act) {
    case 1: return tanhf(v);
    case 2: return sigmoidf_(v);
    case 3: { const float r = fmaxf(v, 0.f); return r * r; }
    default: return v;
    }
}

struct PreOut { float w, k, v, a, b; };

// The WKV-7 inputs of channel c from its projections (kf, vf), low-rank outputs (wl, al; vl and the first layer's
// value vfirst where later is true) and parameters: decay w = exp(-e^-1/2 sigmoid(w0 + wl)), in-context rate
// a = sigmoid(a0 + al), kk = normalize(k * k_k) over the head, k' = k (1 + (a - 1) k_a),
// v' = v + (vfirst - v) sigmoid(v0 + vl). sum(x): the sum of x over the head's N channels (every thread of the head
// calls it; it contains barriers).
template <typename F, typename Sum>
__device__ __forceinline__ PreOut pre_vals(float kf, float vf, float wl, float al, bool later, float vfirst, float vl,
                                           int c, const float* w0, const F* a0, const F* k_k, const F* k_a,
                                           const F* v0, Sum&& sum) {
    PreOut p;
    p.w = __expf(-kDecayScale * sigmoidf_(w0[c] + wl));
    const float a = sigmoidf_(to_f32(a0[c]) + al);
    const float kk = kf * to_f32(k_k[c]);
    const float nrm = sqrtf(sum(kk * kk));
    const float kkn = kk / fmaxf(nrm, 1e-12f);
    p.k = kf * (1.f + (a - 1.f) * to_f32(k_a[c]));
    p.v = later ? vf + (vfirst - vf) * sigmoidf_(to_f32(v0[c]) + vl) : vf;
    p.a = -kkn;
    p.b = kkn * a;
    return p;
}

// pre_vals with the inputs read at index o of token tensors (vl, v_first nullable: the first layer), a block of N
// threads per head.
template <typename F, int N>
__device__ __forceinline__ PreOut pre_elem(long o, int c, const F* k, const F* v, const F* wl, const F* al,
                                           const F* vl, const F* v_first, const float* w0, const F* a0,
                                           const F* k_k, const F* k_a, const F* v0, float* sh) {
    const bool later = v_first != nullptr;
    return pre_vals<F>(to_f32(k[o]), to_f32(v[o]), to_f32(wl[o]), to_f32(al[o]), later,
                       later ? to_f32(v_first[o]) : 0.f, later ? to_f32(vl[o]) : 0.f, c, w0, a0, k_k, k_a, v0,
                       [sh](float x) { return block_sum<N>(x, sh); });
}

// The head's output of channel c from its WKV-7 output y: group norm over the head (eps 64e-5, weight lnw, bias
// lnb) + (sum over the head of r k' r_k) v', times the gate g. sum as in pre_vals.
template <typename F, int N, typename Sum>
__device__ __forceinline__ float post_vals(float y, float rf, float kf, float vf, float g, int c, const F* r_k,
                                           const F* lnw, const F* lnb, Sum&& sum) {
    const float mean = sum(y) / N;
    const float d = y - mean;
    const float var = sum(d * d) / N;
    const float yn = round_act<F>(d * rsqrtf(var + kGnEps) * to_f32(lnw[c]) + to_f32(lnb[c]));
    const float bonus = sum(rf * kf * to_f32(r_k[c]));
    return (yn + round_act<F>(bonus * vf)) * g;
}

template <typename F, int N>
__device__ __forceinline__ float post_elem(float y, float rf, float kf, float vf, float g, int c, const F* r_k,
                                           const F* lnw, const F* lnb, float* sh) {
    return post_vals<F, N>(y, rf, kf, vf, g, c, r_k, lnw, lnb, [sh](float x) { return block_sum<N>(x, sh); });
}

// One WKV-7 step of state row S (value index i of a head, N floats, in registers):
// S = S diag(w) + (S a) b^T + v k^T, y = S r; the head's vectors w, k, a, b, r (N floats each) in shared memory.
// Returns y (not rounded).
template <int N>
__device__ __forceinline__ float wkv7_row_step(float (&S)[N], const float* sw, const float* sk, const float* sa,
                                               const float* sb, const float* sr, float vv) {
    float p0 = 0.f, p1 = 0.f;
#pragma unroll
    for (int j = 0; j < N; j += 2) { p0 += sa[j] * S[j]; p1 += sa[j + 1] * S[j + 1]; }
    const float sab = p0 + p1;
    float y0 = 0.f, y1 = 0.f;
#pragma unroll
    for (int j = 0; j < N; j += 2) {
        S[j] = S[j] * sw[j] + sab * sb[j] + vv * sk[j];
        S[j + 1] = S[j + 1] * sw[j + 1] + sab * sb[j + 1] + vv * sk[j + 1];
        y0 += S[j] * sr[j];
        y1 += S[j + 1] * sr[j + 1];
    }
    return y0 + y1;
}

}  // namespace
}  // namespace rwkv_chat
