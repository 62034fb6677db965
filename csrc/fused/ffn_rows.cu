// The channel-mix value product of RWKV decode steps, reading only the rows of the value matrix where relu(k)^2
// is not zero, CUDA:  y[m, :] = sum_f h[m, f] W[f, :]  for h [rows <= 4, F], W [F, C] input-major (row f: the C
// weights of input f, contiguous). Formula: ChatRWKV RWKV_x070_CMix_one / the channel-mix of every generation
// (pip rwkv 0.8.32): y = relu(x Wk)^2 Wv. BlinkDL's Albatross engine skips the same rows.
//
// h has many exact zeros (about half of relu(k)^2 on random weights, more on trained ones), and a decode step's
// product costs the bytes of W read, so rows f with h[m, f] == 0 for every m are left unread. Work split:
//   grid   = tiles (column tiles of TPR threads x 16 bytes) x slices (contiguous ranges of F);
//   block  = G groups of TPR threads; group g walks the g-th contiguous sub-range of the block's slice.
// A block first lists the rows of its slice to read with h at them (ballot + prefix over warps, ascending f;
// shared memory), then each thread streams its rows in batches of kRowsUnroll 16-byte loads (the next batch in
// flight while one is used) and accumulates in fp32 in ascending f. Groups add up in order in shared memory;
// slices meet in a float32 workspace, added by the last block of each tile (a per-tile counter, reset by that
// block) in a fixed order: group g sums slices g, g + G, ..., then the groups in order. Every sum has the same
// terms in the same order whether zero rows are skipped or not, and fmaf(0, w, acc) == acc for finite w unless acc
// is -0 (a negative product below 2^-149 rounded to -0: bf16 / fp32 inputs, an output that is exactly zero; fp16
// products are >= 2^-48), so skip = 0 (every row read) and skip = 1 give the same bits, up to that sign of zero.
//
// Weight kinds (template WK): 0, W in the act dtype F; 1, uint8 (the i8 format, models/formats/i8.py: w'[f, c] =
// (q + 0.5) ry[f] rx[c] + my[f] + mx[c], rx / ry already divided by 16), summed as rx[c] sum_f (h ry[f]) (q + 0.5)
// + sum_f h my[f] + mx[c] sum_f h, the two sums over every row of the block's slice (skipped ones add zero);
// 2, e4m3 (the f8 format, models/formats/f8.py: w' = e4m3(q) scale[c], scale float32), the scale applied to each
// block's sum. A 16-byte load holds 16 / sizeof(W) weights of a row. relu2: h is relu(k)^2 of the raw k given,
// rounded to F (the product the reference rounds), before the zero test.
// Programmatic dependent launch: nothing of h, the workspace or the counters is touched before pdl_wait.
#include <cuda_fp8.h>
#include <type_traits>

#include "../common/cuda_common.cuh"
#include "fused_launchers.h"

namespace rwkv_chat {
namespace {

constexpr int kRowsThreads = 256;
constexpr int kRowsMaxSlice = 512;    // rows of F per block (the shared-memory row list)
constexpr int kRowsUnroll = 8;        // rows of W per load batch (two batches in flight per thread)
constexpr int kTailUnroll = 4;        // slices' partials in flight per thread in the last block's sum

template <typename F>
struct RowVec {
    static constexpr int n = 16 / (int)sizeof(F);
    union { uint4 q; F v[n]; };
};

// The weights of a row, 16 bytes: V values of W (F itself, or one byte each for the uint8 / e4m3 kinds).
template <typename F, int WK>
using WeightT = typename std::conditional<WK == 0, F, uint8_t>::type;

// The groups' sums go through shared memory VC columns at a time (at most 8: 32 KiB for 4 rows of 256 threads).
template <int V>
__host__ __device__ constexpr int red_cols() { return V < 8 ? V : 8; }

// Dynamic shared memory: the row list (int [kRowsMaxSlice]) and h at those rows (float [R][kRowsMaxSlice]) while
// rows are streamed; afterwards the same bytes hold the groups' sums (float [G][TPR][R][VC]).
template <typename W, int R>
__host__ __device__ constexpr size_t ffn_rows_smem() {
    const size_t list = (size_t)kRowsMaxSlice * (1 + R) * 4,
                 red = (size_t)kRowsThreads * R * red_cols<16 / (int)sizeof(W)>() * 4;
    return list > red ? list : red;
}

// The value of weight u of a loaded row as float: F's value; uint8 q + 0.5 (2^23 + q - (2^23 - 0.5), exact);
// e4m3's value (pairs converted by one instruction on sm_89+).
template <typename F, int WK, int V>
__device__ __forceinline__ void weights_f32(const RowVec<WeightT<F, WK>>& wq, float (&out)[V]) {
    if constexpr (WK == 0) {
#pragma unroll
        for (int v = 0; v < V; ++v) out[v] = to_f32(wq.v[v]);
    } else if constexpr (WK == 1) {
#pragma unroll
        for (int v = 0; v < V; ++v) out[v] = __uint_as_float(0x4B000000u | wq.v[v]) - 8388607.5f;
    } else {
        const unsigned* u = reinterpret_cast<const unsigned*>(&wq.q);
#pragma unroll
        for (int j = 0; j < V / 4; ++j) {
            const __half2 lo(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[j] & 0xFFFFu), __NV_E4M3));
            const __half2 hi(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[j] >> 16), __NV_E4M3));
            const float2 a = __half22float2(lo), b = __half22float2(hi);
            out[4 * j] = a.x;
            out[4 * j + 1] = a.y;
            out[4 * j + 2] = b.x;
            out[4 * j + 3] = b.y;
        }
    }
}

template <typename F, int R>
__device__ __forceinline__ void load_rows(RowVec<F> (&wq)[kRowsUnroll], const F* __restrict__ w, const int* idx,
                                          int i, int i1, int C, int c) {
#pragma unroll
    for (int u = 0; u < kRowsUnroll; ++u) {
        if (i + u < i1) wq[u].q = __ldcs(reinterpret_cast<const uint4*>(w + (long)idx[i + u] * C + c));
        else wq[u].q = make_uint4(0, 0, 0, 0);
    }
}

// Group 0's acc += the other groups' acc, in group order, through `red` ([G][TPR][R][VC] floats, VC columns at a
// time). Every thread of the block calls it (barriers inside); the caller makes `red` free first.
template <int R, int V>
__device__ __forceinline__ void sum_groups(float (&acc)[R][V], float* red, int g, int t, int tpr, int G) {
    constexpr int VC = red_cols<V>();
    float* mine = red + (long)(g * tpr + t) * R * VC;
#pragma unroll
    for (int v0 = 0; v0 < V; v0 += VC) {
        if (v0) __syncthreads();                       // group 0 has read the previous columns
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int v = 0; v < VC; ++v) mine[r * VC + v] = acc[r][v0 + v];
        __syncthreads();
        if (g == 0) {
            for (int k = 1; k < G; ++k) {
                const float* o = red + (long)(k * tpr + t) * R * VC;
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int v = 0; v < VC; ++v) acc[r][v0 + v] += o[r * VC + v];
            }
        }
    }
}

// Two blocks a multiprocessor for the one-row uint8 / e4m3 kinds (114-125 registers, no spills); the others as ptxas
// chooses (fp16 / bf16: 92 at one row, 128 at four).
template <typename F, int WK, int R>
__global__ void __launch_bounds__(kRowsThreads, WK != 0 && R == 1 ? 2 : 0) ffn_rows_kernel(
    const F* __restrict__ h, long h_stride, const WeightT<F, WK>* __restrict__ w, FfnRowsQuant qs,
    void* __restrict__ y, long y_stride, float* __restrict__ part, int* __restrict__ counters, int rows, int Fdim,
    int C, int per, int slices, int tiles, int tpr, int skip, int relu2, int out_f32) {
    using W = WeightT<F, WK>;
    constexpr int V = RowVec<W>::n;
    extern __shared__ float smem[];
    int* idx = reinterpret_cast<int*>(smem);           // [kRowsMaxSlice]
    float* hs = smem + kRowsMaxSlice;                  // [R][kRowsMaxSlice]
    float* red = smem;                                 // [G][TPR][R][V], after the rows are streamed
    __shared__ int warp_n[kRowsThreads / 32];
    __shared__ float sums[2][R][kRowsThreads / 32];    // uint8 kind: each warp's sum of h and of h my
    __shared__ int last;
    pdl_trigger();
    const int tile = blockIdx.x % tiles, slice = blockIdx.x / tiles;
    const int nthreads = blockDim.x, G = nthreads / tpr;
    const int tid = threadIdx.x, g = tid / tpr, t = tid % tpr;
    const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads / 32;
    const int f0 = slice * per, f1 = min(Fdim, f0 + per), n = max(0, f1 - f0);
    const int c = (tile * tpr + t) * V;
    const bool col_ok = c < C;
    pdl_wait();
    // 1. the rows of [f0, f1) to read, ascending, with h at them (uint8 kind: h ry, and the sums of h and h my)
    int count = 0;
    float t0[R], t1[R];
#pragma unroll
    for (int r = 0; r < R; ++r) t0[r] = t1[r] = 0.f;
    for (int base = 0; base < n; base += nthreads) {
        const int i = base + tid;
        float hv[R];
        bool nz = false;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            hv[r] = (i < n && r < rows) ? to_f32(h[(long)r * h_stride + f0 + i]) : 0.f;
            if (relu2) {
                const float k = fmaxf(hv[r], 0.f);
                hv[r] = to_f32(from_f32<F>(k * k));
            }
            nz = nz || hv[r] != 0.f;
        }
        if constexpr (WK == 1) {
            const float ry = i < n ? to_f32(static_cast<const F*>(qs.ry)[f0 + i]) : 0.f;
            const float my = i < n ? to_f32(static_cast<const F*>(qs.my)[f0 + i]) : 0.f;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                t0[r] += hv[r];
                t1[r] = fmaf(hv[r], my, t1[r]);
                hv[r] *= ry;
            }
        }
        const bool keep = i < n && (nz || !skip);
        const unsigned ball = __ballot_sync(0xffffffffu, keep);
        if (lane == 0) warp_n[warp] = __popc(ball);
        __syncthreads();
        int off = count;
        for (int k = 0; k < warp; ++k) off += warp_n[k];
        if (keep) {
            const int at = off + __popc(ball & ((1u << lane) - 1u));
            idx[at] = f0 + i;
#pragma unroll
            for (int r = 0; r < R; ++r) hs[r * kRowsMaxSlice + at] = hv[r];
        }
        for (int k = 0; k < nwarps; ++k) count += warp_n[k];
        __syncthreads();
    }
    if constexpr (WK == 1) {                           // the block's sums of h and h my, warps in order
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                t0[r] += __shfl_xor_sync(0xffffffffu, t0[r], o);
                t1[r] += __shfl_xor_sync(0xffffffffu, t1[r], o);
            }
            if (lane == 0) {
                sums[0][r][warp] = t0[r];
                sums[1][r][warp] = t1[r];
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r) {
            t0[r] = t1[r] = 0.f;
            for (int k = 0; k < nwarps; ++k) {
                t0[r] += sums[0][r][k];
                t1[r] += sums[1][r][k];
            }
        }
    }
    // 2. group g: the listed rows in [f0 + g * pg, f0 + (g + 1) * pg), two batches of rows in flight
    const int pg = (n + G - 1) / G;
    auto lower = [&](int f) {
        int lo = 0, hi = count;
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (idx[mid] < f) lo = mid + 1; else hi = mid;
        }
        return lo;
    };
    const int i0 = lower(f0 + g * pg), i1 = lower(f0 + (g + 1) * pg);
    float acc[R][V];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[r][v] = 0.f;
    if (col_ok && i0 < i1) {
        RowVec<W> wq[kRowsUnroll];
        load_rows<W, R>(wq, w, idx, i0, i1, C, c);
        for (int i = i0; i < i1; i += kRowsUnroll) {
            RowVec<W> wn[kRowsUnroll];
            load_rows<W, R>(wn, w, idx, i + kRowsUnroll, i1, C, c);
#pragma unroll
            for (int u = 0; u < kRowsUnroll; ++u) {
                if (i + u < i1) {
                    float wf[V];
                    weights_f32<F, WK, V>(wq[u], wf);
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        if (r < rows) {
                            const float hv = hs[r * kRowsMaxSlice + i + u];
#pragma unroll
                            for (int v = 0; v < V; ++v) acc[r][v] = fmaf(hv, wf[v], acc[r][v]);
                        }
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < kRowsUnroll; ++u) wq[u] = wn[u];
        }
    }
    // 3. groups in order (shared memory), then slices (the last block of the tile)
    __syncthreads();                                   // the row list is done with: its bytes become `red`
    sum_groups<R, V>(acc, red, g, t, tpr, G);
    if constexpr (WK != 0) {                           // the block's sum of w' h from its sum of q h
        if (g == 0 && col_ok) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
                if constexpr (WK == 1) {
                    const float rx = to_f32(static_cast<const F*>(qs.rx)[c + v]);
                    const float mx = to_f32(static_cast<const F*>(qs.mx)[c + v]);
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r][v] = fmaf(rx, acc[r][v], fmaf(mx, t0[r], t1[r]));
                } else {
                    const float sc = qs.scale[c + v];
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r][v] *= sc;
                }
            }
        }
    }
    auto store = [&](int r, const float* s) {
        if (out_f32) {
            float* o = static_cast<float*>(y) + (long)r * y_stride + c;
#pragma unroll
            for (int v = 0; v < V; ++v) o[v] = s[v];
        } else {
            F* o = static_cast<F*>(y) + (long)r * y_stride + c;
#pragma unroll
            for (int v0 = 0; v0 < V; v0 += RowVec<F>::n) {
                RowVec<F> ov;
#pragma unroll
                for (int v = 0; v < RowVec<F>::n; ++v) ov.v[v] = from_f32<F>(s[v0 + v]);
                *reinterpret_cast<uint4*>(o + v0) = ov.q;
            }
        }
    };
    if (slices == 1) {
        if (g == 0 && col_ok)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (r < rows) store(r, acc[r]);
        return;
    }
    if (g == 0 && col_ok) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                float4* p = reinterpret_cast<float4*>(part + ((long)slice * rows + r) * C + c);
#pragma unroll
                for (int v = 0; v < V / 4; ++v) p[v] = make_float4(acc[r][4 * v], acc[r][4 * v + 1], acc[r][4 * v + 2],
                                                                   acc[r][4 * v + 3]);
            }
        }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counters + tile, 1) == slices - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the last block: group g sums the slices k = g, g + G, ... (kTailUnroll loads in flight), then the groups
    // add up in order
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[r][v] = 0.f;
    if (col_ok) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                for (int k = g; k < slices; k += G * kTailUnroll) {
                    float4 q[kTailUnroll][V / 4];
#pragma unroll
                    for (int u = 0; u < kTailUnroll; ++u) {
                        const int kk = k + u * G;
#pragma unroll
                        for (int v = 0; v < V / 4; ++v)
                            q[u][v] = kk < slices ? __ldcg(reinterpret_cast<const float4*>(
                                                        part + ((long)kk * rows + r) * C + c) + v)
                                                  : make_float4(0.f, 0.f, 0.f, 0.f);
                    }
#pragma unroll
                    for (int u = 0; u < kTailUnroll; ++u)
#pragma unroll
                        for (int v = 0; v < V / 4; ++v) {
                            acc[r][4 * v] += q[u][v].x;
                            acc[r][4 * v + 1] += q[u][v].y;
                            acc[r][4 * v + 2] += q[u][v].z;
                            acc[r][4 * v + 3] += q[u][v].w;
                        }
                }
            }
        }
    }
    __syncthreads();
    sum_groups<R, V>(acc, red, g, t, tpr, G);
    if (g == 0 && col_ok) {
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (r < rows) store(r, acc[r]);
    }
    if (tid == 0) counters[tile] = 0;
}

}  // namespace

FfnRowsPlan ffn_rows_plan(int act, int wkind, int rows, int Fdim, int C, int blocks_per_sm, int sm_count,
                          int tile_threads) {
    FfnRowsPlan p{};
    const int esize = wkind != 0 ? 1 : act == 0 ? 4 : 2, V = 16 / esize;
    const int lanes = (C + V - 1) / V;
    // threads per column tile (16 bytes each): tile_threads where given (16, 32, 64, 128 or 256), else 64 for rows
    // of >= 8 KiB and 32 below (H100, bench/sparse_ffn.py grid sweep: C = 4096 fp16 fastest at 64, C = 2048 at 32)
    p.tpr = tile_threads > 0 ? tile_threads : lanes >= 512 ? 64 : 32;
    p.tiles = (lanes + p.tpr - 1) / p.tpr;
    p.threads = kRowsThreads;
    // the uint8 / e4m3 kinds at 2..4 rows need 160-167 registers a thread (ptxas, sm_90): one block per
    // multiprocessor is resident, so a grid sized for more would run in waves; at one row they are held to two
    if (wkind != 0 && rows > 1) blocks_per_sm = 1;
    const int want = max(1, blocks_per_sm * sm_count / p.tiles);
    // >= 256 rows of F per block where F allows (fewer partials for the last block to add; H100, 1.5B shapes:
    // 128 rows per block ran 20-25% slower)
    int slices = min(want, max(1, Fdim / 256));
    slices = max(slices, (Fdim + kRowsMaxSlice - 1) / kRowsMaxSlice);
    p.per = (Fdim + slices - 1) / slices;
    p.slices = (Fdim + p.per - 1) / p.per;
    const bool many = rows > 1;
    p.smem = wkind != 0 ? (many ? ffn_rows_smem<uint8_t, kGemvMaxRows>() : ffn_rows_smem<uint8_t, 1>())
             : act == 0 ? (many ? ffn_rows_smem<float, kGemvMaxRows>() : ffn_rows_smem<float, 1>())
                        : (many ? ffn_rows_smem<__half, kGemvMaxRows>() : ffn_rows_smem<__half, 1>());
    p.workspace = p.slices > 1 ? (long)p.slices * rows * C : 0;
    return p;
}

namespace {

template <typename F, int WK>
cudaError_t ffn_rows_start(const FfnRowsPlan& p, unsigned blocks, int rows, int Fdim, int C, const void* h,
                           long h_stride, const void* w, const FfnRowsQuant& qs, void* y, long y_stride, bool y_f32,
                           float* part, int* counters, bool skip, bool relu2, cudaStream_t stream) {
    auto kernel = rows == 1 ? ffn_rows_kernel<F, WK, 1> : ffn_rows_kernel<F, WK, kGemvMaxRows>;
    return launch_pdl(kernel, blocks, (unsigned)p.threads, p.smem, stream, static_cast<const F*>(h), h_stride,
                      static_cast<const WeightT<F, WK>*>(w), qs, y, y_stride, part, counters, rows, Fdim, C, p.per,
                      p.slices, p.tiles, p.tpr, skip ? 1 : 0, relu2 ? 1 : 0, y_f32 ? 1 : 0);
}

}  // namespace

int ffn_rows_launch(int act, int wkind, const FfnRowsPlan& p, int rows, int Fdim, int C, const void* h,
                    long h_stride, const void* w, const FfnRowsQuant& qs, void* y, long y_stride, bool y_f32,
                    float* part, int* counters, bool skip, bool relu2, cudaStream_t stream) {
    const int esize = wkind != 0 ? 1 : act == 0 ? 4 : 2, V = 16 / esize;
    const int ysize = y_f32 || act == 0 ? 4 : 2;
    if (rows < 1 || rows > kGemvMaxRows || C % V || (rows > 1 && h_stride < Fdim) || reinterpret_cast<uintptr_t>(w) % 16 ||
        (!y_f32 && (y_stride % (16 / ysize) || reinterpret_cast<uintptr_t>(y) % 16)) || p.per > kRowsMaxSlice ||
        p.tpr < 16 || kRowsThreads % p.tpr || wkind < 0 || wkind > 2 || (wkind != 0 && act == 0) ||
        (wkind == 1 && !(qs.mx && qs.rx && qs.my && qs.ry)) || (wkind == 2 && !qs.scale))
        return kUnsupported;
    if (Fdim == 0 || C == 0) return 0;
    const unsigned blocks = (unsigned)(p.tiles * p.slices);
    cudaError_t err = cudaSuccess;
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        if constexpr (std::is_same<F, float>::value) {
            err = ffn_rows_start<F, 0>(p, blocks, rows, Fdim, C, h, h_stride, w, qs, y, y_stride, y_f32, part,
                                       counters, skip, relu2, stream);
        } else {
            if (wkind == 0)
                err = ffn_rows_start<F, 0>(p, blocks, rows, Fdim, C, h, h_stride, w, qs, y, y_stride, y_f32, part,
                                           counters, skip, relu2, stream);
            else if (wkind == 1)
                err = ffn_rows_start<F, 1>(p, blocks, rows, Fdim, C, h, h_stride, w, qs, y, y_stride, y_f32, part,
                                           counters, skip, relu2, stream);
            else
                err = ffn_rows_start<F, 2>(p, blocks, rows, Fdim, C, h, h_stride, w, qs, y, y_stride, y_f32, part,
                                           counters, skip, relu2, stream);
        });
    return launch_rc(err);
}

}  // namespace rwkv_chat
