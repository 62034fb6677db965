// One step of the RWKV-4 WKV recurrence with the numerically stable (aa, bb, pp) state, shared by the
// CPU, fused-CPU and CUDA kernels. Formula: ChatRWKV rwkv/cuda/operators.cu kernel_wkv_forward
// (pip rwkv 0.8.32); models/rwkv/wkv.py wkv4_torch is the reference path.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define RWKV_CHAT_HD __host__ __device__ __forceinline__
#else
#define RWKV_CHAT_HD inline
#endif

namespace rwkv_chat {

// w: -exp(time_decay), u: time_first, (kk, vv): this token's key and value (float32).
// Returns y_t and advances (aa, bb, pp) in place.
RWKV_CHAT_HD float wkv4_step(float w, float u, float kk, float vv, float& aa, float& bb, float& pp) {
    float ww = u + kk;
    float p = fmaxf(pp, ww);
    float e1 = expf(pp - p);
    float e2 = expf(ww - p);
    const float y = (e1 * aa + e2 * vv) / (e1 * bb + e2);
    ww = w + pp;
    p = fmaxf(ww, kk);
    e1 = expf(ww - p);
    e2 = expf(kk - p);
    aa = e1 * aa + e2 * vv;
    bb = e1 * bb + e2;
    pp = p;
    return y;
}

}  // namespace rwkv_chat
