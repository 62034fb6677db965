// mm8: x @ dequantize(w) for the reference's i8 weights (uint8 w [N, M] with row/column offsets
// and scales), CUDA. Formula: ChatRWKV rwkv/cuda/operators.cu kernel_mm_one_* (pip rwkv 0.8.32):
//   y[r][m] = sum_n x[r][n] * ((w[n][m] + 0.5) * ry[n] * rx[m] + my[n] + mx[m])
// evaluated in fp32 as
//   y[r][m] = rx[m] * (sum_n xr[n] w[n][m] + 0.5 sum_n xr[n]) + sum_n x[n] my[n] + mx[m] sum_n x[n],
// xr[n] = x[r][n] ry[n], which reads each weight byte once and does one FMA per byte and row.
//
// GEMV kernel (rows <= kMm8MaxGemvRows): a warp reads 512 consecutive bytes of a weight row
// (16 bytes per lane, one uint4 load), 8 warps take interleaved rows; the N rows are split into
// `split` slices (split-K) so that small matrices still fill the GPU. Each block writes its
// slice's full linear contribution (offsets and scales included) for its 512 columns to an fp32
// workspace; the last block of a column tile to finish (an atomic counter, reset afterwards)
// sums the slices and writes y in the activation dtype: one launch, no memset.
#include <algorithm>
#include "../common/cuda_common.cuh"
#include "../common/launchers.h"

namespace rwkv_chat {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileCols = 512;   // 32 lanes x 16 bytes
constexpr int kUnroll = 4;       // weight rows in flight per warp

__device__ __forceinline__ void unpack16(const uint4 q, float f[16]) {
    const unsigned words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
        for (int c = 0; c < 4; ++c) f[4 * e + c] = (float)((words[e] >> (8 * c)) & 0xffu);
    }
}

template <typename F, int R>
__global__ void __launch_bounds__(kThreads) mm8_gemv_kernel(
    int rows, int N, int M, const F* __restrict__ x, const uint8_t* __restrict__ w, const F* __restrict__ mx,
    const F* __restrict__ rx, const F* __restrict__ my, const F* __restrict__ ry, int split, int rows_per_split,
    float* __restrict__ partial, unsigned* __restrict__ counters, F* __restrict__ y) {
    const int tile = blockIdx.x;
    const int s = blockIdx.y;
    const int r0 = blockIdx.z * R;              // first x row of this block
    const int nr = min(R, rows - r0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int col = tile * kTileCols + lane * 16;
    const bool col_ok = col < M;                // M % 16 == 0 is checked by the caller
    const int n0 = s * rows_per_split;
    const int n1 = min(N, n0 + rows_per_split);

    float acc[R][16];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < 16; ++c) acc[r][c] = 0.f;
    float sxr[R], sxmy[R], sx[R];
#pragma unroll
    for (int r = 0; r < R; ++r) sxr[r] = sxmy[r] = sx[r] = 0.f;

    for (int nb = n0 + warp; nb < n1; nb += kWarps * kUnroll) {
        uint4 q[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int n = nb + u * kWarps;
            q[u] = (col_ok && n < n1) ? __ldg(reinterpret_cast<const uint4*>(w + (long)n * M + col))
                                      : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int n = nb + u * kWarps;
            if (n < n1) {
                float f[16];
                unpack16(q[u], f);
                const float ryn = to_f32(ry[n]), myn = to_f32(my[n]);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (r < nr) {
                        const float xv = to_f32(x[(long)(r0 + r) * N + n]);
                        const float xr = xv * ryn;
                        sxr[r] += xr;
                        sxmy[r] += xv * myn;
                        sx[r] += xv;
#pragma unroll
                        for (int c = 0; c < 16; ++c) acc[r][c] = fmaf(xr, f[c], acc[r][c]);
                    }
                }
            }
        }
    }

    // Reduce the 8 warps: per x row, each warp stores its 512 columns, then each thread sums 2 columns.
    __shared__ float red[kWarps][kTileCols];
    __shared__ float scal[kWarps][3];
    __shared__ bool is_last;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r >= nr) break;   // uniform across the block
        __syncthreads();
#pragma unroll
        for (int c = 0; c < 16; ++c) red[warp][lane * 16 + c] = acc[r][c];
        if (lane == 0) { scal[warp][0] = sxr[r]; scal[warp][1] = sxmy[r]; scal[warp][2] = sx[r]; }
        __syncthreads();
        float a = 0.f, b = 0.f, c = 0.f;
#pragma unroll
        for (int v = 0; v < kWarps; ++v) { a += scal[v][0]; b += scal[v][1]; c += scal[v][2]; }
        for (int cc = threadIdx.x; cc < kTileCols; cc += kThreads) {
            const int m = tile * kTileCols + cc;
            if (m < M) {
                float d = 0.f;
#pragma unroll
                for (int v = 0; v < kWarps; ++v) d += red[v][cc];
                const float contrib = to_f32(rx[m]) * (d + 0.5f * a) + b + to_f32(mx[m]) * c;
                if (split == 1) y[(long)(r0 + r) * M + m] = from_f32<F>(contrib);
                else partial[((long)s * rows + r0 + r) * M + m] = contrib;
            }
        }
    }
    if (split == 1) return;

    // Split-K: the last block of this (tile, row group) to finish sums the slices.
    __threadfence();
    __syncthreads();
    unsigned* counter = counters + blockIdx.z * gridDim.x + tile;
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == (unsigned)(split - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int r = 0; r < nr; ++r) {
        for (int cc = threadIdx.x; cc < kTileCols; cc += kThreads) {
            const int m = tile * kTileCols + cc;
            if (m < M) {
                float t = 0.f;
                for (int ss = 0; ss < split; ++ss) t += __ldcg(partial + ((long)ss * rows + r0 + r) * M + m);
                y[(long)(r0 + r) * M + m] = from_f32<F>(t);
            }
        }
    }
    if (threadIdx.x == 0) *counter = 0u;
}

template <typename F>
__global__ void mm8_dequant_kernel(int N, int M, const uint8_t* __restrict__ w, const F* __restrict__ mx,
                                   const F* __restrict__ rx, const F* __restrict__ my, const F* __restrict__ ry,
                                   F* __restrict__ out) {
    const long total = (long)N * M;
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        const int n = (int)(e / M), m = (int)(e % M);
        out[e] = from_f32<F>(((float)w[e] + 0.5f) * to_f32(ry[n]) * to_f32(rx[m]) + to_f32(my[n]) + to_f32(mx[m]));
    }
}

int row_group(int rows) { return rows == 1 ? 1 : 4; }

}  // namespace

int mm8_choose_split(int rows, int N, int M, int sm_count) {
    const int tiles = (M + kTileCols - 1) / kTileCols;
    const int groups = (rows + row_group(rows) - 1) / row_group(rows);
    const int target = 2 * std::max(sm_count, 1);   // blocks: about two per multiprocessor
    int split = (target + tiles * groups - 1) / (tiles * groups);
    split = std::max(1, std::min(split, std::max(1, N / (kWarps * 2))));
    return split;
}

int mm8_counter_count(int rows, int M) {
    const int tiles = (M + kTileCols - 1) / kTileCols;
    const int groups = (rows + row_group(rows) - 1) / row_group(rows);
    return tiles * groups;
}

int mm8_gemv_launch(int act, int rows, int N, int M, const void* x, const uint8_t* w, const void* mx,
                    const void* rx, const void* my, const void* ry, int split, float* partial,
                    unsigned* counters, void* y, cudaStream_t stream) {
    if (rows < 1 || rows > kMm8MaxGemvRows || M % 16 != 0 || split < 1) return kUnsupported;
    if (M == 0) return 0;
    const int tiles = (M + kTileCols - 1) / kTileCols;
    const int R = row_group(rows);
    const int groups = (rows + R - 1) / R;
    int rows_per_split = (N + split - 1) / split;
    rows_per_split = (rows_per_split + kWarps - 1) / kWarps * kWarps;
    const int eff_split = std::max(1, (N + rows_per_split - 1) / rows_per_split);
    const dim3 grid(tiles, eff_split, groups);
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        if (R == 1) {
            mm8_gemv_kernel<F, 1><<<grid, kThreads, 0, stream>>>(rows, N, M, static_cast<const F*>(x), w,
                static_cast<const F*>(mx), static_cast<const F*>(rx), static_cast<const F*>(my),
                static_cast<const F*>(ry), eff_split, rows_per_split, partial, counters, static_cast<F*>(y));
        } else {
            mm8_gemv_kernel<F, 4><<<grid, kThreads, 0, stream>>>(rows, N, M, static_cast<const F*>(x), w,
                static_cast<const F*>(mx), static_cast<const F*>(rx), static_cast<const F*>(my),
                static_cast<const F*>(ry), eff_split, rows_per_split, partial, counters, static_cast<F*>(y));
        });
    return (int)cudaGetLastError();
}

int mm8_dequant_launch(int act, int N, int M, const uint8_t* w, const void* mx, const void* rx,
                       const void* my, const void* ry, void* out, cudaStream_t stream) {
    const long total = (long)N * M;
    if (total == 0) return 0;
    const int threads = 256;
    const unsigned blocks = (unsigned)std::min<long>((total + threads - 1) / threads, 65535L * 8);
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        mm8_dequant_kernel<F><<<blocks, threads, 0, stream>>>(N, M, w, static_cast<const F*>(mx),
            static_cast<const F*>(rx), static_cast<const F*>(my), static_cast<const F*>(ry), static_cast<F*>(out)));
    return (int)cudaGetLastError();
}

}  // namespace rwkv_chat
