// WKV-5/5.1/5.2 and WKV-6 (matrix-state linear attention), CUDA kernel template.
// Formula: ChatRWKV rwkv/cuda/rwkv5.cu and rwkv6.cu (pip rwkv 0.8.32):
//   y_t[i] = sum_j r_t[j] * (u[j] * k_t[j] * v_t[i] + S[j][i]),  S[j][i] <- S[j][i] * w_t[j] + k_t[j] * v_t[i]
// with S indexed [key j, value i]. Differences from the reference: batch support (the reference
// indexes the state without the batch), separate input/output state, inputs staged in shared
// memory kTC tokens at a time (two barriers per kTC tokens instead of two per token), the next
// kTC tokens' loads in flight while the current ones are computed, kept in the activation dtype until
// they are stored to shared memory (as in csrc/wkv7/wkv7_cuda.cu: converted as they arrived, each chunk
// waited for its loads before its first token).
// One block per (batch, head), one thread per value index i holding column i of S in registers;
// state loads and stores are coalesced (consecutive threads read consecutive values).
#pragma once

#include "../common/cuda_common.cuh"

namespace rwkv_chat {

template <typename F, int N, bool PER_TOKEN>
__global__ void __launch_bounds__(N) wkv5_kernel(int T, int H, const F* __restrict__ r_, const F* __restrict__ k_,
                                                 const F* __restrict__ v_, const float* __restrict__ w_,
                                                 const float* __restrict__ u_, const float* __restrict__ s_,
                                                 F* __restrict__ y_, float* s_out) {
    constexpr int kTC = N >= 128 ? 4 : (N >= 64 ? 8 : 16);
    const int bh = blockIdx.x;
    const int b = bh / H, h = bh % H;
    const int i = threadIdx.x;
    __shared__ float sr[kTC][N], sk[kTC][N], sw[PER_TOKEN ? kTC : 1][N], su[N], sw0[N];
    __shared__ float sv[kTC][N];

    float S[N];
    const float* s_in = s_ + (long)bh * N * N;
#pragma unroll
    for (int j = 0; j < N; ++j) S[j] = s_in[j * N + i];
    su[i] = u_[h * N + i];
    if (!PER_TOKEN) sw0[i] = w_[h * N + i];

    const long C = (long)H * N;
    const long base = (long)b * T * C + (long)h * N + i;
    // The next chunk's inputs are loaded into registers while the current chunk is computed.
    F pr[kTC], pk[kTC], pv[kTC];
    float pw[kTC];
#pragma unroll
    for (int tt = 0; tt < kTC; ++tt) {
        if (tt < T) {
            const long o = base + (long)tt * C;
            pr[tt] = r_[o]; pk[tt] = k_[o]; pv[tt] = v_[o];
            if (PER_TOKEN) pw[tt] = w_[o];
        }
    }
    for (int t0 = 0; t0 < T; t0 += kTC) {
        const int n = min(kTC, T - t0);
        __syncthreads();
#pragma unroll
        for (int tt = 0; tt < kTC; ++tt) {
            sr[tt][i] = to_f32(pr[tt]); sk[tt][i] = to_f32(pk[tt]); sv[tt][i] = to_f32(pv[tt]);
            if (PER_TOKEN) sw[tt][i] = pw[tt];
        }
        __syncthreads();
#pragma unroll
        for (int tt = 0; tt < kTC; ++tt) {
            const int t = t0 + kTC + tt;
            if (t < T) {
                const long o = base + (long)t * C;
                pr[tt] = r_[o]; pk[tt] = k_[o]; pv[tt] = v_[o];
                if (PER_TOKEN) pw[tt] = w_[o];
            }
        }
        for (int tt = 0; tt < n; ++tt) {
            const float v = sv[tt][i];
            const float* w = PER_TOKEN ? sw[tt] : sw0;
            float y0 = 0.f, y1 = 0.f;
#pragma unroll
            for (int j = 0; j < N; j += 2) {
                const float x0 = sk[tt][j] * v, x1 = sk[tt][j + 1] * v;
                y0 += sr[tt][j] * (su[j] * x0 + S[j]);
                y1 += sr[tt][j + 1] * (su[j + 1] * x1 + S[j + 1]);
                S[j] = S[j] * w[j] + x0;
                S[j + 1] = S[j + 1] * w[j + 1] + x1;
            }
            y_[base + (long)(t0 + tt) * C] = from_f32<F>(y0 + y1);
        }
    }
    float* so = s_out + (long)bh * N * N;
#pragma unroll
    for (int j = 0; j < N; ++j) so[j * N + i] = S[j];
}

template <bool PER_TOKEN>
int wkv5_launch_impl(int act, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                     const float* w, const float* u, const float* s, void* y, float* s_out, cudaStream_t stream) {
    if (B * H == 0) return 0;
    auto go = [&](auto n_tag) {
        constexpr int NN = decltype(n_tag)::value;
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
            wkv5_kernel<F, NN, PER_TOKEN><<<B * H, NN, 0, stream>>>(T, H, static_cast<const F*>(r),
                static_cast<const F*>(k), static_cast<const F*>(v), w, u, s, static_cast<F*>(y), s_out));
    };
    if (!dispatch_head_size(N, go)) return kUnsupported;
    return (int)cudaGetLastError();
}

}  // namespace rwkv_chat
