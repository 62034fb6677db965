// mm8: x @ dequantize(w) for the reference's i8 weights (uint8 w [N, M] with row/column offsets
// and scales), CUDA. Formula: ChatRWKV rwkv/cuda/operators.cu kernel_mm_one_* (pip rwkv 0.8.32):
//   y[r][m] = sum_n x[r][n] * ((w[n][m] + 0.5) * ry[n] * rx[m] + my[n] + mx[m])
// evaluated in fp32 as
//   y[r][m] = rx[m] * (sum_n xr[n] w[n][m] + 0.5 sum_n xr[n]) + sum_n x[n] my[n] + mx[m] sum_n x[n],
// xr[n] = x[r][n] ry[n], which reads each weight byte once and does one FMA per byte and row.
//
// GEMV kernel (rows <= kMm8MaxGemvRows): a block covers 128 columns (8 threads x 16 bytes, one
// uint4 load each) and 32 weight rows at a time (32 row groups), each thread keeping kUnroll loads
// in flight; the N rows are split into `split` slices (split-K) so that small matrices still put
// the whole weight in flight at once. The block reduces its 32 row groups in shared memory and
// writes its slice's full linear contribution (offsets and scales included) to an fp32 workspace;
// the last block of a column tile to finish (an atomic counter, reset afterwards) sums the slices
// and writes y in the activation dtype: one launch, no memset.
#include <algorithm>
#include "../common/cuda_common.cuh"
#include "../common/launchers.h"
#include "mm8_multi.h"

namespace rwkv_chat {
namespace {

constexpr int kThreads = 256;
constexpr int kColThreads = 8;                    // threads across a row segment
constexpr int kTileCols = kColThreads * 16;       // 128 columns per block
constexpr int kRowGroups = kThreads / kColThreads;  // 32 rows in parallel
constexpr int kUnroll = 4;                        // weight loads in flight per thread

__device__ __forceinline__ void unpack16(const uint4 q, float f[16]) {
    const unsigned words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
        for (int c = 0; c < 4; ++c) f[4 * e + c] = (float)((words[e] >> (8 * c)) & 0xffu);
    }
}

// Shared-memory position of column c (0..127) of a row group: the q-th float4 of column group cg
// goes to q*32 + cg*4, so that 8 threads storing one float4 each hit 8 distinct bank quads.
__device__ __forceinline__ int red_pos(int c) { return ((c & 15) >> 2) * 32 + (c >> 4) * 4 + (c & 3); }

// One block's work: column tile `tile`, split-K slice `s`, x rows [blockIdx.z * R, +R); `act` 3 applies
// relu^2 to x as it is loaded (rounded to the activation dtype, as the unfused path stores it).
template <typename F, int R>
__device__ __forceinline__ void mm8_gemv_body(
    int rows, int N, int M, const F* __restrict__ x, const uint8_t* __restrict__ w, const F* __restrict__ mx,
    const F* __restrict__ rx, const F* __restrict__ my, const F* __restrict__ ry, int split, int rows_per_split,
    float* __restrict__ partial, unsigned* __restrict__ counters, F* __restrict__ y, int tile, int s, int act,
    int n_tiles) {
    const int r0 = blockIdx.z * R;              // first x row of this block
    const int nr = min(R, rows - r0);
    const int cg = threadIdx.x % kColThreads, rg = threadIdx.x / kColThreads;
    const int col = tile * kTileCols + cg * 16;
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

    for (int nb = n0 + rg; nb < n1; nb += kRowGroups * kUnroll) {
        // Issue every load of this step (weights, x, row scales) before the first use.
        uint4 q[kUnroll];
        float ryv[kUnroll], myv[kUnroll], xv_[kUnroll][R];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int n = nb + u * kRowGroups;
            const bool ok = n < n1;
            q[u] = (col_ok && ok) ? __ldcs(reinterpret_cast<const uint4*>(w + (long)n * M + col))
                                  : make_uint4(0, 0, 0, 0);
            ryv[u] = ok ? to_f32(ry[n]) : 0.f;
            myv[u] = ok ? to_f32(my[n]) : 0.f;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float xv = (ok && r < nr) ? to_f32(x[(long)(r0 + r) * N + n]) : 0.f;
                if (act == 3) { xv = fmaxf(xv, 0.f); xv = to_f32(from_f32<F>(xv * xv)); }
                xv_[u][r] = xv;
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int n = nb + u * kRowGroups;
            if (n < n1) {
                float f[16];
                unpack16(q[u], f);
                const float ryn = ryv[u], myn = myv[u];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (r < nr) {
                        const float xv = xv_[u][r];
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

    // Reduce the 32 row groups per x row: each thread stores its 16 columns, 128 threads sum a column.
    __shared__ __align__(16) float red[kRowGroups][kTileCols];
    __shared__ float scal[kRowGroups][3];
    __shared__ float tot[3];
    __shared__ bool is_last;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r >= nr) break;   // uniform across the block
        __syncthreads();
#pragma unroll
        for (int qd = 0; qd < 4; ++qd)
            *reinterpret_cast<float4*>(&red[rg][qd * 32 + cg * 4]) =
                make_float4(acc[r][4 * qd], acc[r][4 * qd + 1], acc[r][4 * qd + 2], acc[r][4 * qd + 3]);
        if (cg == 0) { scal[rg][0] = sxr[r]; scal[rg][1] = sxmy[r]; scal[rg][2] = sx[r]; }
        __syncthreads();
        if (threadIdx.x < 3) {
            float t = 0.f;
            for (int g = 0; g < kRowGroups; ++g) t += scal[g][threadIdx.x];
            tot[threadIdx.x] = t;
        }
        __syncthreads();
        if (threadIdx.x < kTileCols) {
            const int c = threadIdx.x;
            const int m = tile * kTileCols + c;
            if (m < M) {
                const int pos = red_pos(c);
                float d = 0.f;
#pragma unroll 8
                for (int g = 0; g < kRowGroups; ++g) d += red[g][pos];
                const float contrib = to_f32(rx[m]) * (d + 0.5f * tot[0]) + tot[1] + to_f32(mx[m]) * tot[2];
                if (split == 1) y[(long)(r0 + r) * M + m] = from_f32<F>(contrib);
                else partial[((long)s * rows + r0 + r) * M + m] = contrib;
            }
        }
    }
    if (split == 1) return;

    // Split-K: the last block of this (tile, row group) to finish sums the slices.
    __threadfence();
    __syncthreads();
    unsigned* counter = counters + blockIdx.z * n_tiles + tile;
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == (unsigned)(split - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int e = threadIdx.x; e < nr * kTileCols; e += kThreads) {
        const int r = e / kTileCols, m = tile * kTileCols + e % kTileCols;
        if (m < M) {
            float t = 0.f;
#pragma unroll 4
            for (int ss = 0; ss < split; ++ss) t += __ldcg(partial + ((long)ss * rows + r0 + r) * M + m);
            y[(long)(r0 + r) * M + m] = from_f32<F>(t);
        }
    }
    if (threadIdx.x == 0) *counter = 0u;
}

template <typename F, int R>
__global__ void __launch_bounds__(kThreads) mm8_gemv_kernel(
    int rows, int N, int M, const F* __restrict__ x, const uint8_t* __restrict__ w, const F* __restrict__ mx,
    const F* __restrict__ rx, const F* __restrict__ my, const F* __restrict__ ry, int split, int rows_per_split,
    float* __restrict__ partial, unsigned* __restrict__ counters, F* __restrict__ y) {
    mm8_gemv_body<F, R>(rows, N, M, x, w, mx, rx, my, ry, split, rows_per_split, partial, counters, y, blockIdx.x,
                        blockIdx.y, 0, gridDim.x);
}

// Grouped: blockIdx.x runs over every entry's (slice, tile) blocks, entry e from block_begin.
template <typename F, int R>
__global__ void __launch_bounds__(kThreads) mm8_multi_kernel(Mm8Batch batch) {
    int e = 0;
#pragma unroll 1
    while (e + 1 < batch.n && (int)blockIdx.x >= batch.e[e + 1].block_begin) ++e;
    const Mm8Entry& E = batch.e[e];
    const int local = blockIdx.x - E.block_begin;
    const int tiles = (E.M + kTileCols - 1) / kTileCols;
    mm8_gemv_body<F, R>(batch.rows, E.N, E.M, static_cast<const F*>(E.x), E.w, static_cast<const F*>(E.mx),
                        static_cast<const F*>(E.rx), static_cast<const F*>(E.my), static_cast<const F*>(E.ry),
                        E.split, E.rows_per_split, E.partial, E.counters, static_cast<F*>(E.y), local % tiles,
                        local / tiles, E.act, tiles);
}

// Dequantize 16 consecutive bytes of a row per thread (M % 16 == 0) or one byte (any M).
template <typename F, bool VEC>
__global__ void mm8_dequant_kernel(int N, int M, const uint8_t* __restrict__ w, const F* __restrict__ mx,
                                   const F* __restrict__ rx, const F* __restrict__ my, const F* __restrict__ ry,
                                   F* __restrict__ out) {
    const int per = VEC ? 16 : 1;
    const long chunks = (long)N * M / per;
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < chunks; e += (long)gridDim.x * blockDim.x) {
        const long first = e * per;
        const int n = (int)(first / M), m0 = (int)(first % M);
        const float ryn = to_f32(ry[n]), myn = to_f32(my[n]);
        if (VEC) {
            float f[16];
            unpack16(__ldcs(reinterpret_cast<const uint4*>(w + first)), f);
            // Build the 16 outputs in registers and store them as 16-byte vectors.
            union { F v[16]; uint4 q[16 * sizeof(F) / 16]; } o;
#pragma unroll
            for (int c = 0; c < 16; ++c)
                o.v[c] = from_f32<F>((f[c] + 0.5f) * ryn * to_f32(rx[m0 + c]) + myn + to_f32(mx[m0 + c]));
            uint4* dst = reinterpret_cast<uint4*>(out + first);
#pragma unroll
            for (int qd = 0; qd < (int)(16 * sizeof(F) / 16); ++qd) dst[qd] = o.q[qd];
        } else {
            out[first] = from_f32<F>(((float)w[first] + 0.5f) * ryn * to_f32(rx[m0]) + myn + to_f32(mx[m0]));
        }
    }
}

int row_group(int rows) { return rows == 1 ? 1 : 4; }

}  // namespace

int mm8_choose_split(int rows, int N, int M, int sm_count) {
    const int tiles = (M + kTileCols - 1) / kTileCols;
    const int groups = (rows + row_group(rows) - 1) / row_group(rows);
    const int target = 2 * std::max(sm_count, 1);   // blocks: about two per multiprocessor
    int split = (target + tiles * groups - 1) / (tiles * groups);
    split = std::max(1, std::min(split, std::max(1, N / kRowGroups)));
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
    rows_per_split = (rows_per_split + kRowGroups - 1) / kRowGroups * kRowGroups;
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

int mm8_multi_prepare(Mm8Batch& batch, int sm_count) {
    if (batch.n < 1 || batch.n > kMm8MaxEntries || batch.rows < 1 || batch.rows > kMm8MaxGemvRows) return -1;
    const int R = row_group(batch.rows);
    const int groups = (batch.rows + R - 1) / R;
    int tiles_all = 0;
    for (int i = 0; i < batch.n; ++i) {
        if (batch.e[i].M % 16 != 0 || batch.e[i].N < 1) return -1;
        tiles_all += (batch.e[i].M + kTileCols - 1) / kTileCols;
    }
    // about two blocks per multiprocessor over the whole group; each entry gets the same split
    const int target = 2 * std::max(sm_count, 1);
    const int want = std::max(1, (target + tiles_all * groups - 1) / (tiles_all * groups));
    int blocks = 0, partial = 0, counters = 0;
    for (int i = 0; i < batch.n; ++i) {
        Mm8Entry& E = batch.e[i];
        const int tiles = (E.M + kTileCols - 1) / kTileCols;
        int split = std::max(1, std::min(want, std::max(1, E.N / kRowGroups)));
        int rps = (E.N + split - 1) / split;
        rps = (rps + kRowGroups - 1) / kRowGroups * kRowGroups;
        E.split = std::max(1, (E.N + rps - 1) / rps);
        E.rows_per_split = rps;
        E.block_begin = blocks;
        blocks += tiles * E.split;
        E.partial_offset = partial;
        E.counter_offset = counters;
        if (E.split > 1) {
            partial += E.split * batch.rows * E.M;
            counters += tiles * groups;
        }
    }
    batch.blocks = blocks;
    batch.partial_floats = partial;
    batch.counter_count = counters;
    return 0;
}

int mm8_multi_launch(int act, Mm8Batch batch, float* partial, unsigned* counters, cudaStream_t stream) {
    if (batch.blocks == 0) return 0;
    for (int i = 0; i < batch.n; ++i) {
        Mm8Entry& E = batch.e[i];
        E.partial = E.split > 1 ? partial + E.partial_offset : nullptr;
        E.counters = E.split > 1 ? counters + E.counter_offset : nullptr;
    }
    const int R = row_group(batch.rows);
    const dim3 grid(batch.blocks, 1, (batch.rows + R - 1) / R);
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        if (R == 1) mm8_multi_kernel<F, 1><<<grid, kThreads, 0, stream>>>(batch);
        else mm8_multi_kernel<F, 4><<<grid, kThreads, 0, stream>>>(batch););
    return (int)cudaGetLastError();
}

int mm8_dequant_launch(int act, int N, int M, const uint8_t* w, const void* mx, const void* rx,
                       const void* my, const void* ry, void* out, cudaStream_t stream) {
    const long total = (long)N * M;
    if (total == 0) return 0;
    const bool vec = M % 16 == 0;
    const long chunks = vec ? total / 16 : total;
    const int threads = 256;
    const unsigned blocks = (unsigned)std::min<long>((chunks + threads - 1) / threads, 132L * 16);
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        if (vec) {
            mm8_dequant_kernel<F, true><<<blocks, threads, 0, stream>>>(N, M, w, static_cast<const F*>(mx),
                static_cast<const F*>(rx), static_cast<const F*>(my), static_cast<const F*>(ry), static_cast<F*>(out));
        } else {
            mm8_dequant_kernel<F, false><<<blocks, threads, 0, stream>>>(N, M, w, static_cast<const F*>(mx),
                static_cast<const F*>(rx), static_cast<const F*>(my), static_cast<const F*>(ry), static_cast<F*>(out));
        });
    return (int)cudaGetLastError();
}

}  // namespace rwkv_chat
