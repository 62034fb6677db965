// WKV-4 (RWKV-4 time-mix recurrence with the stable (aa, bb, pp) state), CUDA.
// Formula: ChatRWKV rwkv/cuda/operators.cu kernel_wkv_forward (pip rwkv 0.8.32), batched here
// with separate input and output state. One thread per (batch, channel); loads of k and v are
// coalesced across channels; k and v of the next kAhead tokens (8 for sequences of 16+ tokens, else 1)
// are in flight while the current kAhead are computed (H100, fp16, C = 2048, T = 1024: 237 -> 141 us).
#include "../common/cuda_common.cuh"
#include "../common/launchers.h"
#include "../common/wkv4_step.h"

namespace rwkv_chat {
namespace {

template <typename F, int kAhead>
__global__ void wkv4_kernel(int B, int T, int C, const float* __restrict__ w_, const float* __restrict__ u_,
                            const F* __restrict__ k_, const F* __restrict__ v_, const float* __restrict__ aa_,
                            const float* __restrict__ bb_, const float* __restrict__ pp_, F* __restrict__ y_,
                            float* __restrict__ aa_out, float* __restrict__ bb_out, float* __restrict__ pp_out) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)B * C) return;
    const int b = (int)(idx / C);
    const int c = (int)(idx % C);
    const float w = w_[c];
    const float u = u_[c];
    const long base = (long)b * T * C + c;
    const F* k = k_ + base;
    const F* v = v_ + base;
    F* y = y_ + base;
    float aa = aa_[idx], bb = bb_[idx], pp = pp_[idx];
    // k and v of the next kAhead tokens are loaded (raw, in the activation dtype) while the current
    // kAhead tokens are computed: a step alone is far shorter than a load.
    F kq[kAhead], vq[kAhead];
#pragma unroll
    for (int tt = 0; tt < kAhead; ++tt)
        if (tt < T) { kq[tt] = k[(long)tt * C]; vq[tt] = v[(long)tt * C]; }
    for (int t0 = 0; t0 < T; t0 += kAhead) {
        F kn[kAhead], vn[kAhead];
#pragma unroll
        for (int tt = 0; tt < kAhead; ++tt) {
            const int t = t0 + kAhead + tt;
            if (t < T) { kn[tt] = k[(long)t * C]; vn[tt] = v[(long)t * C]; }
        }
#pragma unroll
        for (int tt = 0; tt < kAhead; ++tt) {
            const int t = t0 + tt;
            if (t < T) y[(long)t * C] = from_f32<F>(wkv4_step(w, u, to_f32(kq[tt]), to_f32(vq[tt]), aa, bb, pp));
        }
#pragma unroll
        for (int tt = 0; tt < kAhead; ++tt) { kq[tt] = kn[tt]; vq[tt] = vn[tt]; }
    }
    aa_out[idx] = aa;
    bb_out[idx] = bb;
    pp_out[idx] = pp;
}

}  // namespace

int wkv4_cuda_launch(int act, int B, int T, int C, const float* w, const float* u, const void* k,
                     const void* v, const float* aa, const float* bb, const float* pp, void* y,
                     float* aa_out, float* bb_out, float* pp_out, cudaStream_t stream) {
    const long n = (long)B * C;
    if (n == 0 || T == 0) return 0;
    const int threads = 128;
    const unsigned blocks = (unsigned)((n + threads - 1) / threads);
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        auto kernel = T >= 16 ? wkv4_kernel<F, 8> : wkv4_kernel<F, 1>;
        kernel<<<blocks, threads, 0, stream>>>(B, T, C, w, u, static_cast<const F*>(k),
            static_cast<const F*>(v), aa, bb, pp, static_cast<F*>(y), aa_out, bb_out, pp_out));
    return (int)cudaGetLastError();
}

}  // namespace rwkv_chat
