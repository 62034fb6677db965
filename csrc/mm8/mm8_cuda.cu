// mm8: y = x @ dequantize(w) for the reference's i8 weights on CUDA, the uint8 matrix stored
// output-major (w [M, N]: output m's N weights contiguous; models/formats/i8.py, Int8Weight.output_major).
// Formula: ChatRWKV rwkv/cuda/operators.cu kernel_mm_one_* (pip rwkv 0.8.32):
//   y[r][m] = sum_n x[r][n] * ((w[m][n] + 0.5) * ry[n] * rx[m] + my[n] + mx[m])
// evaluated as
//   y[r][m] = rx[m] * (sum_n xr[r][n] (w[m][n] - 128) + 128.5 S1[r]) + S2[r] + mx[m] S3[r],
//   xr[r][n] = x[r][n] ry[n],  S1 = sum_n xr[r][n],  S2 = sum_n x[r][n] my[n],  S3 = sum_n x[r][n]:
// one fp32 FMA per weight byte and row; w - 128 is exact from one byte permute and one subtraction
// (the float with bits 0x4B0000bb is 2^23 + b). The row constants are large next to y (x >= 0 after
// relu^2 makes S3 ~ N), so they are reduced across threads and combined in fp64, and the bytes are
// centred at 128 so the fp32 sum stays small: about 1e-6 relative error in fp32 at N = 16384 (fp32
// partial sums per thread, fp32 lanes).
//
// GEMV (rows <= kMm8MaxGemvRows), one grid over the outputs of 1..kMm8MaxEntries weights, 256-thread blocks:
//   * each output is the dot product of one lane group: 32 lanes of a warp (fewer for N < 512), so a
//     block serves 8 outputs at a time (more for small N);
//   * a step of a lane group is kLoads (4) 16-byte loads per lane, 2 KB per warp, all issued before any
//     is used; two steps are in flight: the first two are issued before the programmatic-dependent-
//     launch wait (weights never change), with the first output's column scales, and each step used
//     issues the one after next;
//   * after the wait the block stages xr = act(x) * ry for a tile of N (all of N unless rows * N * 4
//     bytes exceed 64 KB) in shared memory as fp32 (16-byte loads of x, ry, my), laid out so the float4
//     reads of consecutive lanes fall in distinct banks, and sums x * my and x for the row constants
//     (one block reduction);
//   * a lane group serves `outs` outputs one after the other (1 when N needs several tiles), the fewest
//     that fit the grid in one wave of resident blocks; warp-shuffle reduction, fp32 throughout,
//     each result written once in the activation dtype. No workspace, no atomics, no split-K.
// One row whose blocks' weights fit in shared memory, on sm_90+, takes the bulk-copy kernel of
// mm8_slab.cuh instead (same arithmetic, same results; the weights land in shared memory by bulk
// asynchronous copies started before the dependency wait).
// x, w, my, ry must be 16-byte aligned (the binding copies a tensor that is not). Registers: <= 80 at
// one row with many outputs (3 blocks per multiprocessor), else <= 128 (2 blocks, kFewOutputs); no spills
// (ptxas -v, sm_90).
// act 3 applies relu^2 to x as it is staged (rounded to the activation dtype, as the unfused path
// stores relu(x)^2 before the product).
#include <algorithm>
#include "../common/cuda_common.cuh"
#include "../common/launchers.h"
#include "mm8_common.cuh"
#include "mm8_multi.h"
#include "mm8_slab.cuh"

namespace rwkv_chat {
namespace {

using mm8::kThreads;
using mm8::kWarps;
using mm8::byte_centered;
using mm8::byte_plus_half;
using mm8::stage_pos;
using mm8::stage_tile;
using mm8::reduce_row_constants;
constexpr int kLoads = 4;              // 16-byte weight loads per lane per step (2 steps in flight)
constexpr int kMaxOuts = 64;           // outputs per lane group (one after the other) at most

constexpr int kSmemMax = 64 * 1024;    // staged xr per block at most (bytes)
constexpr int kSmemDefault = 48 * 1024;
// One row with at most this many outputs in all: blocks budgeted for 2 per multiprocessor (128 registers, the
// staging of x unrolled deeper), else 3 (80 registers, more warps). Measured on an H100 (graph of launches over
// weight sets > 3x L2), 2 vs 3 per multiprocessor: 2048x2048 4.44 / 4.87 us, 4096x4096 10.5 / 11.9,
// 16384x4096 32.5 / 39.6, 3 x 2048x2048 9.1 / 9.3; and 3 vs 2 above it: 4096x16384 30.6 / 31.4,
// 3 x 4096x4096 21.9 / 24.2, 4096x65536 101 / 114.
constexpr long kFewOutputs = 8192;

// The order in which a lane group walks its work: tile t (outer), output o, step c of the tile.
struct Cursor {
    int t, o, c;
};
__device__ __forceinline__ void advance(Cursor& k, int O, int KT, int N, int step) {
    const int len = min(KT, N - k.t * KT);
    if (++k.c == (len + step - 1) / step) {
        k.c = 0;
        if (++k.o == O) { k.o = 0; ++k.t; }
    }
}

// The loads of step k for lane l of a group of G lanes: load j covers tile elements 16 (l + G (c kLoads + j)).
// Zeros past the row, for outputs >= M and once the cursor is past the last tile.
__device__ __forceinline__ void load_step(uint4 (&q)[kLoads], const uint8_t* __restrict__ w, int N, int M,
                                          int KT, int T, int m0, int gpb, int G, int l, const Cursor& k) {
    const int m = m0 + k.o * gpb, t0 = k.t * KT;
    const bool ok = k.t < T && m < M;
    const int len = ok ? min(KT, N - t0) : 0;
    const uint8_t* row = w + (ok ? (long)m * N + t0 : 0L);
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
        const int e0 = 16 * (l + G * (k.c * kLoads + j));
        q[j] = e0 < len ? __ldcs(reinterpret_cast<const uint4*>(row + e0)) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// BPS: resident blocks per multiprocessor the registers are budgeted for (3: <= 80 registers, 2: <= 128).
template <typename F, int R, int BPS>
__global__ void __launch_bounds__(kThreads, BPS) mm8_gemv_kernel(Mm8Batch batch) {
    pdl_trigger();
    int e = 0;
#pragma unroll 1
    while (e + 1 < batch.n && (int)blockIdx.x >= batch.e[e + 1].block_begin) ++e;
    const Mm8Entry& E = batch.e[e];
    const int N = E.N, M = E.M, rows = batch.rows, act = E.act;
    const int lg = E.lanes_log2, G = 1 << lg, O = E.outs, KT = E.tile, T = E.tiles;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int l = lane & (G - 1);
    const int gpb = kThreads >> lg;                                   // lane groups per block
    const int m0 = (blockIdx.x - E.block_begin) * O * gpb + (threadIdx.x >> lg);   // output o: m0 + o * gpb
    const uint8_t* __restrict__ w = E.w;
    const F* __restrict__ x = static_cast<const F*>(E.x);
    const F* __restrict__ mx = static_cast<const F*>(E.mx);
    const F* __restrict__ rx = static_cast<const F*>(E.rx);
    const F* __restrict__ my = static_cast<const F*>(E.my);
    const F* __restrict__ ry = static_cast<const F*>(E.ry);
    const int step = 16 * G * kLoads;                                 // row elements per step

    // Weights first (they never change): the first two steps' loads and the outputs' column scales,
    // before waiting for the previous kernel.
    uint4 cur[kLoads], nxt[kLoads];
    Cursor ld{0, 0, 0};
    load_step(cur, w, N, M, KT, T, m0, gpb, G, l, ld);
    advance(ld, O, KT, N, step);
    load_step(nxt, w, N, M, KT, T, m0, gpb, G, l, ld);
    advance(ld, O, KT, N, step);
    // column scales of the first output (the next output's are read while this one is computed)
    float rxm = 0.f, mxm = 0.f;
    if (m0 < M) { rxm = to_f32(__ldg(rx + m0)); mxm = to_f32(__ldg(mx + m0)); }
    pdl_wait();

    extern __shared__ float4 xs4[];                                   // [rows][KT] fp32, stage_pos order
    __shared__ double red[kWarps][3 * R];                            // per warp: S1, S2, S3 of each row
    float acc[R], psr[R], pmy[R], px[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = psr[r] = pmy[r] = px[r] = 0.f;
    F* __restrict__ y = static_cast<F*>(E.y);

#pragma unroll 1
    for (int t = 0; t < T; ++t) {
        const int t0 = t * KT, len = min(KT, N - t0);
        if (t > 0) __syncthreads();                                   // everyone is done with tile t-1
        stage_tile<F, R>(x, ry, my, N, rows, act, t0, len, KT, xs4, psr, pmy, px);
        if (t == T - 1) reduce_row_constants<R>(psr, pmy, px, red[warp], lane);   // across warps at the end
        __syncthreads();

        // The lane group's outputs in turn (O > 1 only with a single tile); each output's sum stays in
        // acc until its last tile, then is reduced over the group and written.
        const int steps = (len + step - 1) / step;
#pragma unroll 1
        for (int o = 0; o < O; ++o) {
#pragma unroll 1
            for (int c = 0; c < steps; ++c) {
#pragma unroll
                for (int j = 0; j < kLoads; ++j) {
                    const int L = l + G * (c * kLoads + j);               // 16-element chunk of the tile
                    if (16 * L < len) {
                        const unsigned wd[4] = {cur[j].x, cur[j].y, cur[j].z, cur[j].w};
#pragma unroll
                        for (int qd = 0; qd < 4; ++qd) {
                            float f[4];
#pragma unroll
                            for (int b = 0; b < 4; ++b) f[b] = byte_centered(wd[qd], b);
#pragma unroll
                            for (int r = 0; r < R; ++r) {
                                if (r < rows) {
                                    const float4 xv = xs4[r * (KT >> 2) + qd * (KT >> 4) + L];
                                    float a = acc[r];
                                    a = fmaf(xv.x, f[0], a);
                                    a = fmaf(xv.y, f[1], a);
                                    a = fmaf(xv.z, f[2], a);
                                    a = fmaf(xv.w, f[3], a);
                                    acc[r] = a;
                                }
                            }
                        }
                    }
                }
                // The step after next goes in flight (next chunk, next output or next tile).
#pragma unroll
                for (int j = 0; j < kLoads; ++j) cur[j] = nxt[j];
                load_step(nxt, w, N, M, KT, T, m0, gpb, G, l, ld);
                advance(ld, O, KT, N, step);
            }
            if (t == T - 1) {
                const int m = m0 + o * gpb;
                float rxn = 0.f, mxn = 0.f;                           // the next output's column scales
                if (o + 1 < O && m + gpb < M) { rxn = to_f32(__ldg(rx + m + gpb)); mxn = to_f32(__ldg(mx + m + gpb)); }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (r < rows) {
                        float v = acc[r];
#pragma unroll
                        for (int off = 16; off > 0; off >>= 1)
                            if (off < G) v += __shfl_xor_sync(0xffffffffu, v, off);
                        if (l == 0 && m < M) {
                            double s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma unroll
                            for (int wp = 0; wp < kWarps; ++wp) {
                                s1 += red[wp][r];
                                s2 += red[wp][R + r];
                                s3 += red[wp][2 * R + r];
                            }
                            const double yv = (double)rxm * ((double)v + 128.5 * s1) + s2 + (double)mxm * s3;
                            y[(long)r * M + m] = from_f32<F>((float)yv);
                        }
                        acc[r] = 0.f;
                    }
                }
                rxm = rxn;
                mxm = mxn;
            }
        }
    }
}

// Dequantize the output-major w [M, N]: 16 consecutive bytes of a row per thread (N % 16 == 0) or one.
template <typename F, bool VEC>
__global__ void mm8_dequant_kernel(int M, int N, const uint8_t* __restrict__ w, const F* __restrict__ mx,
                                   const F* __restrict__ rx, const F* __restrict__ my, const F* __restrict__ ry,
                                   F* __restrict__ out) {
    constexpr int per = VEC ? 16 : 1;
    const long chunks = (long)M * N / per;
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < chunks; e += (long)gridDim.x * blockDim.x) {
        const long first = e * per;
        const int m = (int)(first / N), n0 = (int)(first % N);
        const float rxm = to_f32(rx[m]), mxm = to_f32(mx[m]);
        if (VEC) {
            const uint4 q = __ldcs(reinterpret_cast<const uint4*>(w + first));
            const unsigned wd[4] = {q.x, q.y, q.z, q.w};
            union { F v[16]; uint4 q[16 * sizeof(F) / 16]; } o;
#pragma unroll
            for (int c = 0; c < 16; ++c)
                o.v[c] = from_f32<F>(byte_plus_half(wd[c >> 2], c & 3) * to_f32(ry[n0 + c]) * rxm + to_f32(my[n0 + c]) +
                                     mxm);
            uint4* dst = reinterpret_cast<uint4*>(out + first);
#pragma unroll
            for (int qd = 0; qd < (int)(16 * sizeof(F) / 16); ++qd) dst[qd] = o.q[qd];
        } else {
            out[first] = from_f32<F>(((float)w[first] + 0.5f) * to_f32(ry[n0]) * rxm + to_f32(my[n0]) + mxm);
        }
    }
}

// Launch with programmatic stream serialization (the kernel waits with pdl_wait before touching
// data of earlier kernels), so it may start while the previous kernel in the stream finishes; a
// CUDA graph captured from the stream keeps the edge programmatic.
template <typename F, int R, int BPS>
cudaError_t launch_gemv(const Mm8Batch& batch, cudaStream_t stream) {
    void (*kernel)(Mm8Batch) = mm8_gemv_kernel<F, R, BPS>;
    if (batch.smem_bytes > kSmemDefault) {
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemMax);
        if (err != cudaSuccess) return err;
    }
    return launch_pdl(kernel, batch.blocks, kThreads, batch.smem_bytes, stream, batch);
}

template <typename F>
cudaError_t launch_slab(const Mm8Batch& batch, cudaStream_t stream) {
    void (*kernel)(Mm8Batch) = batch.slab_outs == 1   ? mm8::mm8_slab_kernel<F, 1>
                               : batch.slab_outs == 2 ? mm8::mm8_slab_kernel<F, 2>
                               : batch.slab_outs == 3 ? mm8::mm8_slab_kernel<F, 3>
                                                      : mm8::mm8_slab_kernel<F, 4>;
    int max_n = 0;
    for (int i = 0; i < batch.n; ++i) max_n = std::max(max_n, batch.e[i].N);
    const int smem = mm8::SlabLayout(max_n, batch.slab_outs, (int)sizeof(F)).bytes;
    if (smem > kSmemDefault) {
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     mm8::kSlabSmemMax);
        if (err != cudaSuccess) return err;
    }
    return launch_pdl(kernel, batch.slab_blocks, kThreads, smem, stream, batch);
}

int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

}  // namespace

int mm8_multi_prepare(Mm8Batch& batch, int sm_count) {
    if (batch.n < 1 || batch.n > kMm8MaxEntries || batch.rows < 1 || batch.rows > kMm8MaxGemvRows) return kUnsupported;
    const int max_tile = (kSmemMax / 4 / batch.rows) / 16 * 16;
    for (int i = 0; i < batch.n; ++i) {
        Mm8Entry& E = batch.e[i];
        if (E.N < 16 || E.N % 16 != 0 || E.M < 0 || (E.act != 0 && E.act != 3)) return kUnsupported;
        for (const void* p : {E.x, static_cast<const void*>(E.w), E.my, E.ry})
            if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return kUnsupported;   // 16-byte loads
        int lg = 0;
        while ((1 << lg) < E.N / 16 && lg < 5) ++lg;
        E.lanes_log2 = lg;
        E.tiles = ceil_div(E.N, max_tile);
        E.tile = (ceil_div(E.N, E.tiles) + 15) / 16 * 16;   // <= max_tile (a multiple of 16)
    }
    // Outputs per lane group: the fewest that fit the grid in one wave of resident blocks (blocks_per_sm
    // per multiprocessor), so no block starts late after another has finished
    // (measured on an H100, graph of launches over weight sets > 3x L2: 4096x4096 13.4 -> 12.0 us, 4096x16384 33.7 -> 30.8 us,
    // 4096x65536 111 -> 101 us; one output per group where one already fits: 2048x2048 unchanged).
    // Several outputs per group need N in one tile (always at one row: N <= 16384).
    long outputs = 0;
    for (int i = 0; i < batch.n; ++i) outputs += batch.e[i].M;
    batch.blocks_per_sm = batch.rows == 1 && outputs > kFewOutputs ? 3 : 2;
    const int wave = batch.blocks_per_sm;
    int outs = 1;
    bool one_tile = true;
    for (int i = 0; i < batch.n; ++i) one_tile = one_tile && batch.e[i].tiles == 1;
    while (one_tile && outs < kMaxOuts) {
        long blocks = 0;
        for (int i = 0; i < batch.n; ++i)
            blocks += ceil_div(batch.e[i].M, (long)(kThreads >> batch.e[i].lanes_log2) * outs);
        if (blocks <= (long)wave * std::max(sm_count, 1)) break;
        ++outs;
    }
    int blocks = 0, smem = 0;
    for (int i = 0; i < batch.n; ++i) {
        Mm8Entry& E = batch.e[i];
        E.outs = outs;
        E.block_begin = blocks;
        blocks += ceil_div(E.M, (long)(kThreads >> E.lanes_log2) * E.outs);
        smem = std::max(smem, batch.rows * E.tile * (int)sizeof(float));
    }
    batch.blocks = blocks;
    batch.smem_bytes = smem;
    mm8::slab_prepare(batch, sm_count);
    return 0;
}

int mm8_multi_launch(int act, const Mm8Batch& batch, cudaStream_t stream) {
    if (batch.blocks == 0) return 0;
    cudaError_t err = cudaSuccess;
    if (batch.slab_outs > 0) {
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F, err = launch_slab<F>(batch, stream));
        return (int)(err != cudaSuccess ? err : cudaGetLastError());
    }
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        err = batch.rows > 1 ? launch_gemv<F, kMm8MaxGemvRows, 2>(batch, stream)
              : batch.blocks_per_sm == 3 ? launch_gemv<F, 1, 3>(batch, stream) : launch_gemv<F, 1, 2>(batch, stream));
    return (int)(err != cudaSuccess ? err : cudaGetLastError());
}

int mm8_gemv_launch(int act, int rows, int N, int M, const void* x, const uint8_t* w, const void* mx,
                    const void* rx, const void* my, const void* ry, void* y, int sm_count, cudaStream_t stream) {
    Mm8Batch batch{};
    batch.n = 1;
    batch.rows = rows;
    batch.e[0] = Mm8Entry{x, w, mx, rx, my, ry, y, N, M, 0};
    if (mm8_multi_prepare(batch, sm_count) != 0) return kUnsupported;
    return mm8_multi_launch(act, batch, stream);
}

int mm8_dequant_launch(int act, int M, int N, const uint8_t* w, const void* mx, const void* rx,
                       const void* my, const void* ry, void* out, cudaStream_t stream) {
    const long total = (long)M * N;
    if (total == 0) return 0;
    const bool vec = N % 16 == 0;
    const long chunks = vec ? total / 16 : total;
    const int threads = 256;
    const unsigned blocks = (unsigned)std::min<long>((chunks + threads - 1) / threads, 132L * 16);
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        if (vec) {
            mm8_dequant_kernel<F, true><<<blocks, threads, 0, stream>>>(M, N, w, static_cast<const F*>(mx),
                static_cast<const F*>(rx), static_cast<const F*>(my), static_cast<const F*>(ry), static_cast<F*>(out));
        } else {
            mm8_dequant_kernel<F, false><<<blocks, threads, 0, stream>>>(M, N, w, static_cast<const F*>(mx),
                static_cast<const F*>(rx), static_cast<const F*>(my), static_cast<const F*>(ry), static_cast<F*>(out));
        });
    return (int)cudaGetLastError();
}

}  // namespace rwkv_chat
