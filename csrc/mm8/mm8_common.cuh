// Shared pieces of the mm8 GEMV kernels (mm8_cuda.cu: weights streamed through registers; mm8_slab.cuh:
// weights copied to shared memory in bulk): the byte decoding, the shared-memory layout of the staged
// activations and their staging. Formula and layout: the header comment of mm8_cuda.cu.
#pragma once

#include "../common/cuda_common.cuh"

namespace rwkv_chat {
namespace mm8 {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// w - 128 for byte c (0..3) of v, exact: (2^23 + w) - (2^23 + 128).
__device__ __forceinline__ float byte_centered(unsigned v, int c) {
    return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7540u + c)) - 8388736.f;
}

// w + 0.5 for byte c (0..3) of v, exact: (2^23 + w) - (2^23 - 0.5).
__device__ __forceinline__ float byte_plus_half(unsigned v, int c) {
    return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7540u + c)) - 8388607.5f;
}

// Shared-memory float index of tile element i (tile: elements per row, a multiple of 16): the 16
// elements of chunk L = i / 16 go to 4 float4 slots q * tile/16 + L (q = (i % 16) / 4), so the lanes
// of a warp reading consecutive chunks read consecutive float4s (no bank conflicts).
__device__ __forceinline__ int stage_pos(int i, int tile) {
    return ((i & 15) >> 2) * (tile >> 2) + (i >> 4) * 4 + (i & 3);
}

template <typename F>
union Vec16 {
    uint4 q;
    F v[16 / sizeof(F)];
};

// Stage xr = act(x) * ry for the tile [t0, t0 + len) of each of `rows` rows (R >= rows) in shared
// memory (fp32, stage_pos order, row r at float r * KT) and add this thread's part of the row sums
// S1 = sum xr, S2 = sum act(x) my, S3 = sum act(x) to psr, pmy, px. 16-byte loads of x, ry and my
// (V elements per chunk, kChunks chunks per thread in flight); len % V == 0. act 3 applies relu^2,
// rounded to the activation dtype as the unfused path stores it. ry and my are read through the
// read-only global path, or as shared memory when kScalesShared.
template <typename F, int R, bool kScalesShared = false>
__device__ __forceinline__ void stage_tile(const F* __restrict__ x, const F* __restrict__ ry,
                                           const F* __restrict__ my, int N, int rows, int act, int t0, int len,
                                           int KT, float4* xs4, float (&psr)[R], float (&pmy)[R], float (&px)[R]) {
    constexpr int V = 16 / sizeof(F);
    constexpr int kChunks = R == 1 ? 2 : 1;
    const int nch = len / V;
#pragma unroll 1
    for (int c0 = threadIdx.x; c0 < nch; c0 += kThreads * kChunks) {
        Vec16<F> xq[kChunks][R], rq[kChunks], mq[kChunks];
#pragma unroll
        for (int u = 0; u < kChunks; ++u) {
            const int ch = c0 + u * kThreads;
            const bool ok = ch < nch;
            const long n = t0 + (long)ch * V;
            const uint4* rp = reinterpret_cast<const uint4*>(ry + n);
            const uint4* mp = reinterpret_cast<const uint4*>(my + n);
            rq[u].q = !ok ? make_uint4(0u, 0u, 0u, 0u) : kScalesShared ? *rp : __ldg(rp);
            mq[u].q = !ok ? make_uint4(0u, 0u, 0u, 0u) : kScalesShared ? *mp : __ldg(mp);
#pragma unroll
            for (int r = 0; r < R; ++r)
                xq[u][r].q = (ok && r < rows) ? __ldcg(reinterpret_cast<const uint4*>(x + (long)r * N + n))
                                              : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kChunks; ++u) {
            const int ch = c0 + u * kThreads;
            if (ch < nch) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (r < rows) {
#pragma unroll
                        for (int g4 = 0; g4 < V / 4; ++g4) {
                            float o4[4];
#pragma unroll
                            for (int cc = 0; cc < 4; ++cc) {
                                const int el = 4 * g4 + cc;
                                float v = to_f32(xq[u][r].v[el]);
                                if (act == 3) { v = fmaxf(v, 0.f); v = to_f32(from_f32<F>(v * v)); }
                                pmy[r] = fmaf(v, to_f32(mq[u].v[el]), pmy[r]);
                                px[r] += v;
                                o4[cc] = v * to_f32(rq[u].v[el]);
                                psr[r] += o4[cc];
                            }
                            xs4[(r * KT + stage_pos(ch * V + 4 * g4, KT)) >> 2] = make_float4(o4[0], o4[1], o4[2], o4[3]);
                        }
                    }
                }
            }
        }
    }
}

// Reduce this thread's row sums over the warp in fp64 and store them (lane 0) as red[r], red[R + r],
// red[2R + r] for S1, S2, S3 of row r; the block sums red over its warps after a barrier.
template <int R>
__device__ __forceinline__ void reduce_row_constants(const float (&psr)[R], const float (&pmy)[R], const float (&px)[R],
                                                     double* red, int lane) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        double a = psr[r], b = pmy[r], c = px[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            a += __shfl_xor_sync(0xffffffffu, a, off);
            b += __shfl_xor_sync(0xffffffffu, b, off);
            c += __shfl_xor_sync(0xffffffffu, c, off);
        }
        if (lane == 0) { red[r] = a; red[R + r] = b; red[2 * R + r] = c; }
    }
}

}  // namespace mm8
}  // namespace rwkv_chat
