// gemvq: weight-only GEMV y = x @ W for 1..kGemvqMaxRows rows (decode) with W quantized and stored
// output-major, each output's K weights contiguous (declarations and formulas: gemvq.h):
//   i4: models/formats/i4.py (GPTQ nibbles, v1 zeros), Int4Weight.output_major: qweight int32 [Np, K/8];
//   f8: models/formats/f8.py: w8 e4m3 [N, K], one fp32 scale per output.
//
// One launch serves 1..kGemvqMaxEntries products of one kind with the same rows (GemvqBatch: consecutive block
// ranges, one per product; the fused RWKV-7 decode's r, k, v), or one product.
// Layout of the work (256-thread blocks, 8 warps; a warp computes kOuts = 2 neighbouring outputs together):
//   * a "chunk" is 16 bytes of one output's weights: 32 int4 or 16 fp8 values along K; lane l of a warp
//     reads chunks l, l + 32, ... of both its outputs (each warp load is 512 contiguous bytes of a row);
//   * a step is kUnroll (2) chunks per lane and output, all loads issued before any is used; two steps are
//     in flight: the first two are issued before the programmatic-dependent-launch wait (weights never
//     change), with the i4 group scales and zero points of their chunks, and each step used issues the one
//     after next (a 16-byte streaming load per chunk, __ldcs);
//   * after the wait the block stages x (all rows, a tile of K: all of K unless rows * K * 4 bytes exceed
//     64 KB) in shared memory as fp32, laid out so the float4 reads of consecutive lanes (consecutive
//     chunks) fall in distinct banks; both outputs of a warp use each float4 read;
//   * fp32 products and accumulation, one warp-shuffle reduction per output and row at the end, each
//     result written once in the activation dtype. No workspace, no atomics, no split-K.
//
// int4 decode, exact and one logic op per value: with v the int32 of 8 nibbles (value e = bits 4e..4e+3),
// the float with bits 0x4B000000 | (v & (15 << 4p)) is 2^23 + q * 16^p (the nibble lands in the mantissa,
// p <= 4); subtracting the float 2^23 + z * 16^p (z: the group's zero point) gives (q - z) * 16^p exactly.
// Values 0..4 are read from v at p = e, values 5..7 from v >> 16 at p = e - 4, so x[k] is staged
// pre-multiplied by 16^-p(k % 8) (exact: a power of two) and one fp32 FMA per value and row gives
// x[k] * (q - z). Each chunk lies in one group (group % 32 == 0): its partial sum is multiplied by the
// group's scale once (sum_k x (q - z) s = s * sum_k x (q - z) over a group).
// fp8 decode: two e4m3 values to half2 by __nv_cvt_fp8x2_to_halfraw2 (cuda_fp8.h; one instruction on
// sm_89+), then fp32; the output's scale multiplies the finished sum.
// Instructions per weight in the inner loop at one row (sm_90 SASS, nvcc 13.0): int4 ~3.4 (LOP3, FADD, FFMA,
// an LDS.128 per 8 values shared by both outputs), fp8 ~2.6 (F2FP per 2, HADD2.F32, FFMA). Registers (ptxas
// -v, sm_90): int4 111-122 (one row) / 128 (2..4 rows), fp8 80-86 / 96; no spills; 2 blocks per multiprocessor.
#include <cuda_fp8.h>

#include <algorithm>

#include "../common/cuda_common.cuh"
#include "gemvq.h"

namespace rwkv_chat {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kOuts = 2;                 // outputs per warp, computed together
constexpr int kUnroll = 2;               // 16-byte weight loads per lane and output in a step
constexpr int kStepChunks = 32 * kUnroll;
constexpr int kSmemMax = 64 * 1024;      // staged x per block at most (bytes)
constexpr int kSmemDefault = 48 * 1024;

struct GemvqArgs {
    const void* x;           // [rows, K] activation dtype
    const uint4* w;          // i4: qweight [Np, K/8] int32; f8: w8 [N, K] bytes; rows of K/CE chunks
    const __half* scales;    // i4: [K/group, Np]
    const uint32_t* zeros;   // i4: [K/group, Np/8]
    const float* fscale;     // f8: [N]
    void* y;                 // [rows, N] activation dtype
    int K, N, Np, group;
    int group_shift;         // i4: log2(group) when the group is a power of two, else -1
    int tile, tiles;         // x elements per row staged at a time (a multiple of the chunk), ceil(K / tile)
};

// Up to kGemvqMaxEntries products with the same rows, one grid: entry e has blocks [block_begin[e], block_begin[e+1]).
struct GemvqBatch {
    GemvqArgs e[kGemvqMaxEntries];
    int block_begin[kGemvqMaxEntries];
    int n, rows;
};

template <bool I4>
struct Chunk {
    static constexpr int kElems = I4 ? 32 : 16;   // weights per 16 bytes
    static constexpr int kQuads = kElems / 4;     // float4 slots of staged x per chunk and row
};

// The weights of one step for one lane: kOuts outputs x kUnroll chunks (zeros past the tile or the outputs),
// and for i4 each chunk's group scale and zero point (0..15).
template <bool I4>
struct Step {
    uint4 q[kOuts][kUnroll];
    float s[kOuts][kUnroll];
    uint32_t z[kOuts][kUnroll];
};

template <typename F>
union Vec16 {
    uint4 q;
    F v[16 / sizeof(F)];
};

__device__ __forceinline__ uint32_t word(const uint4& q, int j) {
    return j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w;
}

// (v & MASK) | magic in one LOP3 (C++ `&` then `|` with two immediates compiles to two); magic in a register.
template <uint32_t MASK>
__device__ __forceinline__ float nibble_bits(uint32_t v, uint32_t magic) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(v), "n"(MASK), "r"(magic));
    return __uint_as_float(d);
}

// 16^-p for value e (0..7) of an int4 word, p = e for e <= 4, e - 4 above (the decode of the header).
__device__ __forceinline__ float nibble_prescale(int e) {
    const int p = e < 5 ? e : e - 4;
    return p == 0 ? 1.f : p == 1 ? 0.0625f : p == 2 ? 0.00390625f : p == 3 ? 0.000244140625f : 1.52587890625e-05f;
}

// Chunks in tile t (0 past the last tile).
__device__ __forceinline__ int tile_chunks(const GemvqArgs& a, int t, int ce) {
    return t < a.tiles ? min(a.tile, a.K - t * a.tile) / ce : 0;
}

// The load cursor (tile t, step c) moves to the next step.
template <bool I4>
__device__ __forceinline__ void advance(const GemvqArgs& a, int& t, int& c) {
    if (t >= a.tiles) return;
    const int steps = (tile_chunks(a, t, Chunk<I4>::kElems) + kStepChunks - 1) / kStepChunks;
    if (++c >= steps) { c = 0; ++t; }
}

// Step (t, c) of outputs n0, n0 + 1 for this lane: chunk c * kStepChunks + 32 u + lane of the tile.
template <bool I4>
__device__ __forceinline__ void load_step(Step<I4>& st, const GemvqArgs& a, int n0, int lane, int t, int c) {
    constexpr int CE = Chunk<I4>::kElems;
    const int nch = tile_chunks(a, t, CE);
    const long first = t < a.tiles ? (long)t * a.tile / CE : 0L;      // the tile's first chunk in a row
    const int row_chunks = a.K / CE;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int L = c * kStepChunks + 32 * u + lane;
        long g = 0;                                                    // i4: the chunk's group
        if constexpr (I4) {
            const long k = (first + L) * CE;
            g = a.group_shift >= 0 ? k >> a.group_shift : k / a.group;
        }
#pragma unroll
        for (int o = 0; o < kOuts; ++o) {
            const int n = n0 + o;
            const bool ok = n < a.N && L < nch;
            st.q[o][u] = ok ? __ldcs(a.w + (long)n * row_chunks + first + L) : make_uint4(0u, 0u, 0u, 0u);
            if constexpr (I4) {
                float s = 0.f;
                uint32_t z = 0u;
                if (ok) {
                    s = __half2float(__ldg(a.scales + g * a.Np + n));
                    z = ((__ldg(a.zeros + g * (a.Np / 8) + n / 8) >> (4 * (n % 8))) + 1u) & 15u;
                }
                st.s[o][u] = s;
                st.z[o][u] = z;
            }
        }
    }
}

// Stage rows x [rows, K] of the tile [t0, t0 + len) in shared memory as fp32: chunk L of row r, quad d at
// float4 xs4[(r * kQuads + d) * cap + L] (cap: chunks of a full tile), i4 values pre-multiplied by
// nibble_prescale. One thread per chunk and row (16-byte loads of x).
template <typename F, bool I4>
__device__ __forceinline__ void stage_tile(const F* __restrict__ x, int K, int rows, int t0, int len, int cap,
                                           float4* xs4) {
    constexpr int CE = Chunk<I4>::kElems, QD = Chunk<I4>::kQuads, V = 16 / sizeof(F);
    const int nch = len / CE;
#pragma unroll 1
    for (int i = threadIdx.x; i < rows * nch; i += kThreads) {
        const int r = i / nch, L = i - r * nch;
        const uint4* src = reinterpret_cast<const uint4*>(x + (long)r * K + t0 + (long)L * CE);
        float v[CE];
#pragma unroll
        for (int c = 0; c < CE / V; ++c) {
            Vec16<F> u;
            u.q = __ldcg(src + c);
#pragma unroll
            for (int e = 0; e < V; ++e) v[c * V + e] = to_f32(u.v[e]);
        }
        if constexpr (I4) {
#pragma unroll
            for (int e = 0; e < CE; ++e) v[e] *= nibble_prescale(e & 7);
        }
#pragma unroll
        for (int d = 0; d < QD; ++d)
            xs4[(r * QD + d) * cap + L] = make_float4(v[4 * d], v[4 * d + 1], v[4 * d + 2], v[4 * d + 3]);
    }
}

// acc[o][r] += the products of step c's chunks (tile of nch chunks, staged x in xs4).
template <int R, bool I4>
__device__ __forceinline__ void compute_step(const Step<I4>& st, const float4* xs4, int cap, int nch, int c,
                                             int lane, int rows, float (&acc)[kOuts][R]) {
    constexpr int QD = Chunk<I4>::kQuads;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int L = c * kStepChunks + 32 * u + lane;
        if (L >= nch) continue;
        if constexpr (I4) {
            const uint32_t magic = 0x4B000000u;       // the bits of the float 2^23
            float cz[kOuts][5];                       // 2^23 + z * 16^p: the zero point at each nibble place
#pragma unroll
            for (int o = 0; o < kOuts; ++o)
#pragma unroll
                for (int p = 0; p < 5; ++p) cz[o][p] = __uint_as_float(0x4B000000u | (st.z[o][u] << (4 * p)));
            float part[kOuts][R];
#pragma unroll
            for (int o = 0; o < kOuts; ++o)
#pragma unroll
                for (int r = 0; r < R; ++r) part[o][r] = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float f[kOuts][8];
#pragma unroll
                for (int o = 0; o < kOuts; ++o) {
                    const uint32_t v = word(st.q[o][u], j), h = v >> 16;
                    f[o][0] = nibble_bits<0x0000000Fu>(v, magic) - cz[o][0];
                    f[o][1] = nibble_bits<0x000000F0u>(v, magic) - cz[o][1];
                    f[o][2] = nibble_bits<0x00000F00u>(v, magic) - cz[o][2];
                    f[o][3] = nibble_bits<0x0000F000u>(v, magic) - cz[o][3];
                    f[o][4] = nibble_bits<0x000F0000u>(v, magic) - cz[o][4];
                    f[o][5] = nibble_bits<0x000000F0u>(h, magic) - cz[o][1];
                    f[o][6] = nibble_bits<0x00000F00u>(h, magic) - cz[o][2];
                    f[o][7] = nibble_bits<0x0000F000u>(h, magic) - cz[o][3];
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (r < rows) {
                        const float4 xa = xs4[(r * QD + 2 * j) * cap + L];
                        const float4 xb = xs4[(r * QD + 2 * j + 1) * cap + L];
#pragma unroll
                        for (int o = 0; o < kOuts; ++o) {
                            float s = part[o][r];
                            s = fmaf(xa.x, f[o][0], s);
                            s = fmaf(xa.y, f[o][1], s);
                            s = fmaf(xa.z, f[o][2], s);
                            s = fmaf(xa.w, f[o][3], s);
                            s = fmaf(xb.x, f[o][4], s);
                            s = fmaf(xb.y, f[o][5], s);
                            s = fmaf(xb.z, f[o][6], s);
                            s = fmaf(xb.w, f[o][7], s);
                            part[o][r] = s;
                        }
                    }
                }
            }
#pragma unroll
            for (int o = 0; o < kOuts; ++o)
#pragma unroll
                for (int r = 0; r < R; ++r) acc[o][r] = fmaf(st.s[o][u], part[o][r], acc[o][r]);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float f[kOuts][4];
#pragma unroll
                for (int o = 0; o < kOuts; ++o) {
                    const uint32_t v = word(st.q[o][u], j);
                    const __half2 lo(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v & 0xFFFFu), __NV_E4M3));
                    const __half2 hi(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v >> 16), __NV_E4M3));
                    const float2 a = __half22float2(lo), b = __half22float2(hi);
                    f[o][0] = a.x;
                    f[o][1] = a.y;
                    f[o][2] = b.x;
                    f[o][3] = b.y;
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (r < rows) {
                        const float4 xv = xs4[(r * QD + j) * cap + L];
#pragma unroll
                        for (int o = 0; o < kOuts; ++o) {
                            float s = acc[o][r];
                            s = fmaf(xv.x, f[o][0], s);
                            s = fmaf(xv.y, f[o][1], s);
                            s = fmaf(xv.z, f[o][2], s);
                            s = fmaf(xv.w, f[o][3], s);
                            acc[o][r] = s;
                        }
                    }
                }
            }
        }
    }
}

// R: rows the registers are laid out for (1, or kGemvqMaxRows serving 2..4 rows).
template <typename F, int R, bool I4>
__global__ void __launch_bounds__(kThreads, 2) gemvq_kernel(GemvqBatch batch) {
    pdl_trigger();
    constexpr int CE = Chunk<I4>::kElems;
    int e = 0;                                             // this block's product
#pragma unroll 1
    while (e + 1 < batch.n && (int)blockIdx.x >= batch.block_begin[e + 1]) ++e;
    const GemvqArgs& a = batch.e[e];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n0 = (((int)blockIdx.x - batch.block_begin[e]) * kWarps + warp) * kOuts;
    const int cap = a.tile / CE;

    // Weights first (they never change): the first two steps, before waiting for the previous kernel.
    Step<I4> cur, nxt;
    int lt = 0, lc = 0;
    load_step<I4>(cur, a, n0, lane, lt, lc);
    advance<I4>(a, lt, lc);
    load_step<I4>(nxt, a, n0, lane, lt, lc);
    advance<I4>(a, lt, lc);
    pdl_wait();

    extern __shared__ float4 xs4[];
    float acc[kOuts][R];
#pragma unroll
    for (int o = 0; o < kOuts; ++o)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[o][r] = 0.f;
    const F* __restrict__ x = static_cast<const F*>(a.x);
    const int rows = R == 1 ? 1 : batch.rows;

#pragma unroll 1
    for (int t = 0; t < a.tiles; ++t) {
        const int t0 = t * a.tile, len = min(a.tile, a.K - t0), nch = len / CE;
        if (t > 0) __syncthreads();                        // everyone is done with tile t-1
        stage_tile<F, I4>(x, a.K, rows, t0, len, cap, xs4);
        __syncthreads();
        const int steps = (nch + kStepChunks - 1) / kStepChunks;
#pragma unroll 1
        for (int c = 0; c < steps; ++c) {
            compute_step<R, I4>(cur, xs4, cap, nch, c, lane, rows, acc);
            cur = nxt;                                     // the step after next goes in flight
            load_step<I4>(nxt, a, n0, lane, lt, lc);
            advance<I4>(a, lt, lc);
        }
    }

    F* __restrict__ y = static_cast<F*>(a.y);
#pragma unroll
    for (int o = 0; o < kOuts; ++o) {
        const int n = n0 + o;
        float sc = 1.f;
        if constexpr (!I4) sc = n < a.N ? __ldg(a.fscale + n) : 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                float v = acc[o][r];
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                if (lane == 0 && n < a.N) y[(long)r * a.N + n] = from_f32<F>(v * sc);
            }
        }
    }
}

int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

// Tile each product's staged x (rows * tile * 4 bytes <= kSmemMax) and launch every product in one grid with
// programmatic stream serialization (the kernel waits with pdl_wait before touching data of earlier kernels).
template <bool I4>
int launch(int act, GemvqBatch b, cudaStream_t stream) {
    constexpr int CE = Chunk<I4>::kElems;
    if (b.n < 1 || b.n > kGemvqMaxEntries || b.rows < 1 || b.rows > kGemvqMaxRows) return kUnsupported;
    const int max_tile = (kSmemMax / 4 / b.rows) / CE * CE;
    long blocks = 0;
    int smem = 0;
    for (int i = 0; i < b.n; ++i) {
        GemvqArgs& a = b.e[i];
        if (a.K < CE || a.K % CE != 0 || a.N < 0) return kUnsupported;
        for (const void* p : {a.x, static_cast<const void*>(a.w)})
            if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return kUnsupported;   // 16-byte loads
        a.tiles = ceil_div(a.K, max_tile);
        a.tile = (ceil_div(a.K, a.tiles) + CE - 1) / CE * CE;   // <= max_tile
        b.block_begin[i] = (int)blocks;
        blocks += ceil_div(a.N, (long)kWarps * kOuts);
        smem = std::max(smem, b.rows * a.tile * (int)sizeof(float));
    }
    if (blocks == 0) return 0;
    cudaError_t err = cudaSuccess;
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F, {
        void (*kernel)(GemvqBatch) = b.rows == 1 ? gemvq_kernel<F, 1, I4> : gemvq_kernel<F, kGemvqMaxRows, I4>;
        if (smem > kSmemDefault)
            err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemMax);
        if (err == cudaSuccess) err = launch_pdl(kernel, (unsigned)blocks, kThreads, (size_t)smem, stream, b);
    });
    return (int)(err != cudaSuccess ? err : cudaGetLastError());
}

}  // namespace

int gemvq_launch(bool i4, int act, int rows, int n, const GemvqEntry* entries, cudaStream_t stream) {
    if (n < 1 || n > kGemvqMaxEntries) return kUnsupported;
    GemvqBatch b{};
    b.n = n;
    b.rows = rows;
    for (int i = 0; i < n; ++i) {
        const GemvqEntry& E = entries[i];
        GemvqArgs& a = b.e[i];
        a.x = E.x;
        a.w = static_cast<const uint4*>(E.w);
        a.y = E.y;
        a.K = E.K; a.N = E.N;
        if (i4) {
            if (E.group < 32 || E.group % 32 != 0 || E.K % E.group != 0 || E.Np < E.N || E.Np % 8 != 0)
                return kUnsupported;
            a.scales = static_cast<const __half*>(E.scales);
            a.zeros = static_cast<const uint32_t*>(E.zeros);
            a.Np = E.Np; a.group = E.group;
            a.group_shift = -1;
            if ((E.group & (E.group - 1)) == 0)
                for (a.group_shift = 0; (1 << a.group_shift) < E.group;) ++a.group_shift;
        } else {
            a.fscale = E.fscale;
            a.Np = E.N; a.group = 1; a.group_shift = 0;
        }
    }
    return i4 ? launch<true>(act, b, stream) : launch<false>(act, b, stream);
}

}  // namespace rwkv_chat
