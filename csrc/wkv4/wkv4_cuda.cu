// WKV-4 (RWKV-4 time-mix recurrence with the stable (aa, bb, pp) state), CUDA.
// Formula: ChatRWKV rwkv/cuda/operators.cu kernel_wkv_forward (pip rwkv 0.8.32), batched here
// with separate input and output state. One thread per (batch, channel); loads of k and v are
// coalesced across channels; the next token's k, v are fetched before the current one is used.
#include "../common/cuda_common.cuh"
#include "../common/launchers.h"
#include "../common/wkv4_step.h"

namespace rwkv_chat {
namespace {

template <typename F>
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
    float kn = to_f32(k[0]), vn = to_f32(v[0]);
    for (int t = 0; t < T; ++t) {
        const float kk = kn, vv = vn;
        if (t + 1 < T) {
            kn = to_f32(k[(long)(t + 1) * C]);
            vn = to_f32(v[(long)(t + 1) * C]);
        }
        y[(long)t * C] = from_f32<F>(wkv4_step(w, u, kk, vv, aa, bb, pp));
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
        wkv4_kernel<F><<<blocks, threads, 0, stream>>>(B, T, C, w, u, static_cast<const F*>(k),
            static_cast<const F*>(v), aa, bb, pp, static_cast<F*>(y), aa_out, bb_out, pp_out));
    return (int)cudaGetLastError();
}

}  // namespace rwkv_chat
