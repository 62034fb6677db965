// gemvq: weight-only GEMV y = act(x) @ W for 1..kGemvqMaxRows rows (decode) with W quantized and stored
// output-major, each output's K weights contiguous (declarations and formulas: gemvq.h):
//   i4: models/formats/i4.py (GPTQ nibbles, v1 zeros), Int4Weight.output_major: qweight int32 [Np, K/8];
//   f8: models/formats/f8.py: w8 e4m3 [N, K], one fp32 scale per output;
//   u8: models/formats/i8.py (the reference's i8), Int8Weight.output_major: uint8 [N, K] with the reference's four
//   scale vectors, read through its identity (gemvq.h): the per-input scale ry applied to x as it is staged, the
//   row sums of x, x * my and x * ry gathered by the block while staging, the per-output rx, mx in the epilogue.
//
// One launch serves 1..kGemvqMaxEntries products of one kind with the same rows (GemvqBatch: consecutive block
// ranges, one per product, sized by the product's share of the weights; the fused RWKV-7 decode's r, k, v), or
// one product.
// Layout of the work (256-thread blocks, 8 warps; the one-tile products of a launch share about kBlocksPerSm
// blocks per multiprocessor, a product with several tiles takes one block per 8 items):
//   * an "item" is kOuts = 2 neighbouring outputs over all of K, computed by one warp; the warps of a product
//     take its items in a grid-stride loop (warp w: items w, w + W, ..., W the product's warps), so each block
//     stages x once and every warp keeps weight loads in flight across its items (no block waits for a new
//     wave to start: a block lives as long as the product);
//   * a "chunk" is 16 bytes of one output's weights: 32 int4 or 16 fp8 values along K; lane l of a warp
//     reads chunks l, l + 32, ... of both outputs of its item (each warp load is 512 contiguous bytes of a row);
//   * a step is kUnroll (2) chunks per lane and output; two steps are in flight (the first two issued before
//     the programmatic-dependent-launch wait: weights never change); each step used issues the one after next,
//     which runs on into the warp's next item (a 16-byte streaming load per chunk, __ldcs, and for i4 the
//     chunk's group scale and zero point);
//   * after the wait the block stages act(x) (all rows, a tile of K: all of K unless it exceeds 64 KB, else
//     tiles of whole steps, and a warp takes one item) in shared memory, laid out so the 16-byte reads of consecutive
//     lanes (consecutive chunks) fall in distinct banks; both outputs of an item use each read;
//   * one warp-shuffle reduction per output and row at the end of an item, each result written once in the
//     activation dtype. No workspace, no atomics, no split-K.
//
// int4 with fp16 activations (the decode of `cuda fp16i4`): half2 arithmetic, two weights per instruction.
// With v the int32 of 8 nibbles (value e = bits 4e..4e+3) and h = v >> 8, one LOP3 each gives the half2 pairs
// 0x6400 | nibble: (1024 + q0, 1024 + q4) from v & 0x000F000F, (1024 + 16 q1, 1024 + 16 q5) from v & 0x00F000F0,
// and (q2, q6), (16 q3, 16 q7) from h the same way; one HSUB2 of (1024 + z) or (1024 + 16 z) (z: the group's
// zero point) leaves (q - z) or 16 (q - z) exactly, and one HFMA2 per pair and row multiplies by x, staged as
// the matching half2 pairs, odd positions pre-divided by 16 (exact). A chunk's 32 products add up in half2
// (16 per half), then in fp32 times the group's scale (each chunk lies in one group, group % 32 == 0). So that
// fp16 neither overflows nor loses x, each staged chunk of x is multiplied by its own 2^e, a power of two taking
// the chunk's largest |act(x)| into [32, 64) (computed as the chunk is staged: no pass over the row before it):
// a half2 partial stays below 16 * 15 * 64 = 15,360, and the chunk's partial is multiplied by 2^-e (exact) with
// the group's scale: per 8 weights 4 LOP3, 1 shift and 4 HSUB2, and 4 HFMA2 per row.
// int4, bf16 / fp32 activations: fp32 arithmetic. The float with bits 0x4B000000 | (v & (15 << 4p)) is
// 2^23 + q * 16^p (the nibble lands in the mantissa, p <= 4); subtracting the float 2^23 + z * 16^p gives
// (q - z) * 16^p exactly. Values 0..4 are read from v at p = e, values 5..7 from v >> 16 at p = e - 4, so x[k]
// is staged pre-multiplied by 16^-p(k % 8) (exact) and one fp32 FMA per value and row gives x[k] * (q - z);
// a chunk's partial sum is multiplied by the group's scale once.
// uint8: one PRMT per two bytes builds the half2 (1024 + w0, 1024 + w1), one HSUB2 of 1152 leaves w - 128 exactly;
// with fp16 activations one HFMA2 per pair and row, a chunk's 16 products in half2 (x staged times its 2^e, its
// largest |x * ry| in [8, 16): a partial stays below 8 * 128 * 16 = 16,384), then fp32; bf16 activations: fp32
// arithmetic on the float 2^23 + w (one PRMT) less 2^23 + 128. Float32 activations are refused (csrc/mm8's GEMV
// serves them): the row sums' terms cancel where x is all positive (relu(x)^2), beyond float32's 1e-5 over
// K = 16,384 (H100: 1.15e-5).
// fp8: two e4m3 values to half2 by __nv_cvt_fp8x2_to_halfraw2 (cuda_fp8.h; one instruction on sm_89+); with fp16
// activations one HFMA2 per pair and row, a chunk's 16 products summed in half2 (the chunk of x staged times its
// 2^e, its largest |act(x)| in [4, 8): a partial stays below 8 * 448 * 8 = 28,672), then in fp32; else fp32
// arithmetic.
// The output's scale multiplies the finished sum.
// act (GemvqAct): kGemvqActRelu2 stages relu(x)^2 rounded to the activation dtype (the reference rounds it so),
// the RWKV channel-mix value's input, so its product needs no separate launch.
// Instructions per weight in the streaming loop at one row (sm_90 SASS, nvcc 13.0, bookkeeping and loads
// included): int4 half2 ~3.0 (the per-step design before this one: ~6.7), fp8 half2 ~2.0 (fp32: ~4.1).
// Registers (ptxas -v, sm_90): int4 120-128, fp8 86-102, uint8 110-123; no spills, except the norm-serving 2..4-row
// instantiations (a few dozen bytes, in the prologue); 2 blocks per multiprocessor.
#include <cuda_fp8.h>

#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "../common/cuda_common.cuh"
#include "gemvq.h"

namespace rwkv_chat {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kOuts = 2;                 // outputs per warp item, computed together (loader_step: one half2 of
                                         // scales and one word of zero points serve both)
constexpr int kUnroll = 2;               // 16-byte weight loads per lane and output in a step
constexpr int kStepChunks = 32 * kUnroll;
constexpr int kBlocksPerSm = 2;          // __launch_bounds__ and the grid size
constexpr int kSmemMax = 64 * 1024;      // staged x per block at most (bytes)
constexpr int kSmemDefault = 48 * 1024;

struct GemvqArgs {
    const void* x;           // [rows, K] activation dtype
    const uint4* w;          // i4: qweight [Np, K/8] int32; f8: w8 [N, K] bytes; rows of K/CE chunks
    const __half* scales;    // i4: [K/group, Np]
    const uint32_t* zeros;   // i4: [K/group, Np/8]
    const float* fscale;     // f8: [N]
    const void* rx;          // u8: [N] activation dtype (rx, mx) and [K] (ry, my; 16-byte aligned)
    const void* mx;
    const void* ry;
    const void* my;
    void* y;                 // [rows, N] activation dtype
    int K, N, Np, group;
    int group_shift;         // i4: log2(group) when the group is a power of two, else -1
    int act;                 // GemvqAct applied to x as it is staged
    const void* ln_w;        // the norms' weight and bias (activation dtype; ln_b may be null), epsilon
    const void* ln_b;
    float eps;
    int tile, tiles;         // x elements per row staged at a time (a multiple of the chunk), ceil(K / tile)
    int items;               // ceil(N / kOuts)
    int stride;              // warps of this product (kWarps * its blocks): a warp's step from item to item
};

// Up to kGemvqMaxEntries products with the same rows, one grid: entry e has blocks [block_begin[e], block_begin[e+1]).
struct GemvqBatch {
    GemvqArgs e[kGemvqMaxEntries];
    int block_begin[kGemvqMaxEntries];
    int n, rows;
};

template <int Q>
constexpr bool kIsI4 = Q == kGemvqI4;
template <int Q>
constexpr bool kIsU8 = Q == kGemvqU8;

template <int Q>
struct Chunk {
    static constexpr int kElems = kIsI4<Q> ? 32 : 16;   // weights per 16 bytes
    static constexpr int kQuads = kElems / 4;     // float4 slots of staged fp32 x per chunk and row
};

// Whether a product takes the half2 form: fp16 activations.
template <typename F>
constexpr bool kHalf2 = std::is_same<F, __half>::value;

// Half2 form: the largest |x| staged (times 2^e) is in [2^kTop / 2, 2^kTop), so that a chunk's partial sums stay
// far below 65,504: int4 16 products of |q - z| <= 15 per half (< 16 * 15 * 64), fp8 8 of |w| <= 448 (< 8 * 448 * 8),
// uint8 8 of |w - 128| <= 128 (< 8 * 128 * 16).
template <int Q>
constexpr int kTop = kIsI4<Q> ? 6 : kIsU8<Q> ? 4 : 3;

// The weights of one step for one lane: kOuts outputs x kUnroll chunks (zeros past the tile, the outputs or the
// warp's items), and for i4 each chunk's group scale and zero point (0..15).
template <int Q>
struct Step {
    uint4 q[kOuts][kUnroll];
    float s[kOuts][kUnroll];
    uint32_t z[kOuts][kUnroll];
};

template <typename T>
union Vec16 {
    uint4 q;
    T v[16 / sizeof(T)];
};

__device__ __forceinline__ uint32_t word(const uint4& q, int j) {
    return j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w;
}

// (v & MASK) | magic in one LOP3 (C++ `&` then `|` with two immediates compiles to two); magic in a register.
template <uint32_t MASK>
__device__ __forceinline__ uint32_t lop_bits(uint32_t v, uint32_t magic) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(v), "n"(MASK), "r"(magic));
    return d;
}

__device__ __forceinline__ __half2 as_half2(uint32_t u) {
    union { uint32_t u; __half2 h; } c;
    c.u = u;
    return c.h;
}

__device__ __forceinline__ uint32_t half2_bits(__half2 h) {
    union { uint32_t u; __half2 h; } c;
    c.h = h;
    return c.u;
}

// 16^-p for value e (0..7) of an int4 word in the fp32 form, p = e for e <= 4, e - 4 above (the header).
__device__ __forceinline__ float nibble_prescale(int e) {
    const int p = e < 5 ? e : e - 4;
    return p == 0 ? 1.f : p == 1 ? 0.0625f : p == 2 ? 0.00390625f : p == 3 ? 0.000244140625f : 1.52587890625e-05f;
}

// act(x) for one value, rounded to the activation dtype as the reference rounds relu(x)^2.
template <typename F>
__device__ __forceinline__ float apply_act(float v, int act) {
    if (act == kGemvqActRelu2) {
        v = v < 0.f ? 0.f : v;                // NaN stays NaN, as torch.relu keeps it
        v = to_f32(from_f32<F>(v * v));
    }
    return v;
}

// Half2 form: 2^e for one staged chunk of n values v (after the activation), taking its largest |v| into
// [2^(TOP-1), 2^TOP) (e clamped to [-30, 30]: a chunk of zeros gets 2^30); *unscale = 2^-e.
template <int TOP, int n>
__device__ __forceinline__ float chunk_scale(const float* v, float* unscale) {
    float m = 0.f;
#pragma unroll
    for (int e = 0; e < n; ++e) m = fmaxf(m, fabsf(v[e]));
    const int E = (int)((__float_as_uint(m) >> 23) & 255u);             // m in [2^(E-127), 2^(E-126))
    const int e = max(-30, min(30, 126 + TOP - E));
    *unscale = __uint_as_float((uint32_t)(127 - e) << 23);
    return __uint_as_float((uint32_t)(127 + e) << 23);
}

__host__ __device__ __forceinline__ bool is_norm(int act) {
    return act == kGemvqActLayerNorm || act == kGemvqActRmsNorm;
}

// The norms (kGemvqActLayerNorm / kGemvqActRmsNorm): per row r the mean (0 for RMSNorm) and 1 / sqrt(var + eps)
// (RMSNorm: 1 / sqrt(mean(x^2) + eps)) in float32 from one pass over the row (sums of x - x[0], shifted against
// cancellation; a fixed-order reduction: the same bits every run). Every thread of the block takes part (barriers).
template <typename F, int R>
__device__ __forceinline__ void norm_stats(const F* __restrict__ x, const GemvqArgs& a, int rows, float* nmean,
                                           float* nrstd) {
    constexpr int V = 16 / sizeof(F);
    __shared__ float red[kWarps][R][2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, K = a.K;
    const bool rms = a.act == kGemvqActRmsNorm;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r < rows) {
            const float shift = rms ? 0.f : to_f32(x[(long)r * K]);
            float s1 = 0.f, s2 = 0.f;
            const uint4* src = reinterpret_cast<const uint4*>(x + (long)r * K);
#pragma unroll 1
            for (int i = threadIdx.x; i < K / V; i += kThreads) {
                Vec16<F> u;
                u.q = __ldcg(src + i);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float v = to_f32(u.v[e]), d = v - shift;
                    s1 += d;
                    s2 = fmaf(d, d, s2);
                }
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                s1 += __shfl_xor_sync(0xffffffffu, s1, off);
                s2 += __shfl_xor_sync(0xffffffffu, s2, off);
            }
            if (lane == 0) {
                red[warp][r][0] = s1;
                red[warp][r][1] = s2;
            }
        }
    }
    __syncthreads();
    const int r = threadIdx.x;
    if (r < R && r < rows) {
        float s1 = 0.f, s2 = 0.f;
        for (int k = 0; k < kWarps; ++k) {
            s1 += red[k][r][0];
            s2 += red[k][r][1];
        }
        if (rms) {
            nmean[r] = 0.f;
            nrstd[r] = rsqrtf(s2 / K + a.eps);
        } else {
            const float m1 = s1 / K;
            nmean[r] = to_f32(x[(long)r * K]) + m1;
            nrstd[r] = rsqrtf(fmaxf(s2 / K - m1 * m1, 0.f) + a.eps);
        }
    }
    __syncthreads();
}

// Half2 form: the per-chunk 2^-e of the staged tile, float [rows, cap] after the staged x in shared memory.
template <int Q>
__device__ __forceinline__ float* chunk_unscales(uint4* xs, int rows, int cap) {
    return reinterpret_cast<float*>(xs + rows * (kIsI4<Q> ? 4 : 2) * cap);
}

template <int Q>
__device__ __forceinline__ const float* chunk_unscales(const uint4* xs, int rows, int cap) {
    return reinterpret_cast<const float*>(xs + rows * (kIsI4<Q> ? 4 : 2) * cap);
}

// Stage act(x) rows [rows, K] of the tile [t0, t0 + len) in shared memory. fp32 form: chunk L of row r, quad d
// at float4 xs4[(r * kQuads + d) * cap + L] (cap: chunks of a full tile), i4 values pre-multiplied by
// nibble_prescale. Half2 form, each chunk times its own power of two (chunk_scale; its inverse at chunk_unscales):
// int4, word j of chunk L at uint4 [(r * 4 + j) * cap + L]
// holding the half2 pairs (x0, x4), (x1, x5) / 16, (x2, x6), (x3, x7) / 16 of its 8 values; fp8, the chunk's 16
// values in order at uint4 [(r * 2 + h) * cap + L], h = 0, 1. One thread per chunk and row (16-byte loads of x).
template <typename F, int R, int Q, bool NORM>
__device__ __forceinline__ void stage_tile(const F* __restrict__ x, int K, int rows, int act, int t0, int len,
                                           int cap, uint4* xs, const GemvqArgs& a, const float* nmean,
                                           const float* nrstd, float (&cs)[R][3]) {
    constexpr int CE = Chunk<Q>::kElems, QD = Chunk<Q>::kQuads, V = 16 / sizeof(F);
    const int nch = len / CE;
    const bool norm = NORM && is_norm(act);
    const F* lb = act == kGemvqActLayerNorm ? static_cast<const F*>(a.ln_b) : nullptr;
    // u8: each thread stages the same chunks of every row, so that a row's sums (cs) add the same terms in the
    // same order whatever its slot in the batch (a conversation's logits do not depend on its slot)
#pragma unroll 1
    for (int i = threadIdx.x; i < (kIsU8<Q> ? nch : rows * nch); i += kThreads)
#pragma unroll 1
    for (int rr = 0; rr < (kIsU8<Q> ? rows : 1); ++rr) {
        const int r = kIsU8<Q> ? rr : i / nch, L = kIsU8<Q> ? i : i - r * nch;
        const uint4* src = reinterpret_cast<const uint4*>(x + (long)r * K + t0 + (long)L * CE);
        float v[CE];
        if constexpr (NORM) {
          if (norm) {                          // (x - mean) * rstd * w + b, rounded to F as the reference rounds it
            const float mean = nmean[r], rstd = nrstd[r];
            const uint4* wsrc = reinterpret_cast<const uint4*>(static_cast<const F*>(a.ln_w) + t0 + (long)L * CE);
            const uint4* bsrc = lb ? reinterpret_cast<const uint4*>(lb + t0 + (long)L * CE) : nullptr;
#pragma unroll
            for (int c = 0; c < CE / V; ++c) {
                Vec16<F> u, w, b;
                u.q = __ldcg(src + c);
                w.q = __ldg(wsrc + c);
                b.q = bsrc ? __ldg(bsrc + c) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                for (int e = 0; e < V; ++e)
                    v[c * V + e] = to_f32(from_f32<F>(fmaf((to_f32(u.v[e]) - mean) * rstd, to_f32(w.v[e]),
                                                           to_f32(b.v[e]))));
            }
          }
        }
        if (!norm) {
#pragma unroll
            for (int c = 0; c < CE / V; ++c) {
                Vec16<F> u;
                u.q = __ldcg(src + c);
#pragma unroll
                for (int e = 0; e < V; ++e) v[c * V + e] = apply_act<F>(to_f32(u.v[e]), act);
            }
        }
        if constexpr (kIsU8<Q>) {      // a' = a * ry staged; this thread's part of the row's sums in cs[r]
            const uint4* rsrc = reinterpret_cast<const uint4*>(static_cast<const F*>(a.ry) + t0 + (long)L * CE);
            const uint4* msrc = reinterpret_cast<const uint4*>(static_cast<const F*>(a.my) + t0 + (long)L * CE);
            float sa = 0.f, sm = 0.f, sx = 0.f;
#pragma unroll
            for (int c = 0; c < CE / V; ++c) {
                Vec16<F> ry, my;
                ry.q = __ldg(rsrc + c);
                my.q = __ldg(msrc + c);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float u = v[c * V + e];
                    sx += u;
                    sm = fmaf(u, to_f32(my.v[e]), sm);
                    v[c * V + e] = u * to_f32(ry.v[e]);
                    sa += v[c * V + e];
                }
            }
#pragma unroll
            for (int q = 0; q < R; ++q) {
                if (q == r) {
                    cs[q][0] += sa;
                    cs[q][1] += sm;
                    cs[q][2] += sx;
                }
            }
        }
        if constexpr (kHalf2<F> && !kIsI4<Q>) {
            const float s = chunk_scale<kTop<Q>, CE>(v, chunk_unscales<Q>(xs, rows, cap) + r * cap + L);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float* w = v + 8 * h;
                uint4 o;
                o.x = half2_bits(__floats2half2_rn(w[0] * s, w[1] * s));
                o.y = half2_bits(__floats2half2_rn(w[2] * s, w[3] * s));
                o.z = half2_bits(__floats2half2_rn(w[4] * s, w[5] * s));
                o.w = half2_bits(__floats2half2_rn(w[6] * s, w[7] * s));
                xs[(r * 2 + h) * cap + L] = o;
            }
        } else if constexpr (kHalf2<F>) {
            const float s = chunk_scale<kTop<Q>, CE>(v, chunk_unscales<Q>(xs, rows, cap) + r * cap + L);
            const float s16 = s * 0.0625f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float* w = v + 8 * j;
                uint4 o;
                o.x = half2_bits(__floats2half2_rn(w[0] * s, w[4] * s));
                o.y = half2_bits(__floats2half2_rn(w[1] * s16, w[5] * s16));
                o.z = half2_bits(__floats2half2_rn(w[2] * s, w[6] * s));
                o.w = half2_bits(__floats2half2_rn(w[3] * s16, w[7] * s16));
                xs[(r * 4 + j) * cap + L] = o;
            }
        } else {
            if constexpr (kIsI4<Q>) {
#pragma unroll
                for (int e = 0; e < CE; ++e) v[e] *= nibble_prescale(e & 7);
            }
            float4* xs4 = reinterpret_cast<float4*>(xs);
#pragma unroll
            for (int d = 0; d < QD; ++d)
                xs4[(r * QD + d) * cap + L] = make_float4(v[4 * d], v[4 * d + 1], v[4 * d + 2], v[4 * d + 3]);
        }
    }
}

// u8: the row sums over the block, cst[r] = (sum a', sum a * my, sum a) of row r from every thread's cs (all of
// K: called once every tile is staged). Every thread of the block takes part (barriers).
template <int R>
__device__ __forceinline__ void reduce_row_sums(const float (&cs)[R][3], float (*cst)[3]) {
    __shared__ float red[kWarps][R][3];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < 3; ++j) {
            float v = cs[r][j];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0) red[warp][r][j] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < R * 3) {
        const int r = threadIdx.x / 3, j = threadIdx.x - 3 * r;
        float v = 0.f;
        for (int k = 0; k < kWarps; ++k) v += red[k][r][j];
        cst[r][j] = v;
    }
    __syncthreads();
}

// Half2 form: part[o][r] += the four half2 products of w[o] with the staged uint4 of row r at
// xs[(r * per + slot) * cap + L] (per: uint4 per chunk and row).
template <int R>
__device__ __forceinline__ void hfma_rows(const __half2 (&w)[kOuts][4], const uint4* xs, int per, int slot, int cap,
                                          int L, int rows, __half2 (&part)[kOuts][R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r < rows) {
            const uint4 xv = xs[(r * per + slot) * cap + L];
            const __half2 x0 = as_half2(xv.x), x1 = as_half2(xv.y), x2 = as_half2(xv.z), x3 = as_half2(xv.w);
#pragma unroll
            for (int o = 0; o < kOuts; ++o) {
                __half2 t = part[o][r];
                t = __hfma2(w[o][0], x0, t);
                t = __hfma2(w[o][1], x1, t);
                t = __hfma2(w[o][2], x2, t);
                t = __hfma2(w[o][3], x3, t);
                part[o][r] = t;
            }
        }
    }
}

// Half2 form, a chunk done: acc[o][r] += s[o] * 2^-e(chunk, r) * (both halves of part[o][r]) in fp32; us: the
// chunk's unscale of row 0 (rows cap apart).
template <int R>
__device__ __forceinline__ void finish_chunk(const float (&s)[kOuts], const float* us, int cap, int rows,
                                             const __half2 (&part)[kOuts][R], float (&acc)[kOuts][R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r < rows) {
            const float u = us[r * cap];
#pragma unroll
            for (int o = 0; o < kOuts; ++o) {
                const float2 f = __half22float2(part[o][r]);
                acc[o][r] = fmaf(s[o] * u, f.x + f.y, acc[o][r]);
            }
        }
    }
}

// acc[o][r] += the products of step c's chunks (tile of nch chunks, staged x in xs), half2 form.
template <int R>
__device__ __forceinline__ void compute_step_half(const Step<kGemvqI4>& st, const uint4* xs, int cap, int nch, int c,
                                                  int lane, int rows, float (&acc)[kOuts][R]) {
    const uint32_t magic = 0x64006400u;                // the half2 (1024, 1024)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int L = c * kStepChunks + 32 * u + lane;
        if (L >= nch) continue;
        __half2 zl[kOuts], zh[kOuts], part[kOuts][R];
#pragma unroll
        for (int o = 0; o < kOuts; ++o) {
            zl[o] = as_half2(magic | (st.z[o][u] * 0x00010001u));          // (1024 + z, 1024 + z)
            zh[o] = as_half2(magic | ((st.z[o][u] << 4) * 0x00010001u));   // (1024 + 16 z, 1024 + 16 z)
#pragma unroll
            for (int r = 0; r < R; ++r) part[o][r] = as_half2(0u);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            __half2 w[kOuts][4];
#pragma unroll
            for (int o = 0; o < kOuts; ++o) {
                const uint32_t v = word(st.q[o][u], j), h = v >> 8;
                w[o][0] = __hsub2(as_half2(lop_bits<0x000F000Fu>(v, magic)), zl[o]);
                w[o][1] = __hsub2(as_half2(lop_bits<0x00F000F0u>(v, magic)), zh[o]);
                w[o][2] = __hsub2(as_half2(lop_bits<0x000F000Fu>(h, magic)), zl[o]);
                w[o][3] = __hsub2(as_half2(lop_bits<0x00F000F0u>(h, magic)), zh[o]);
            }
            hfma_rows<R>(w, xs, 4, j, cap, L, rows, part);
        }
        const float sc[kOuts] = {st.s[0][u], st.s[1][u]};
        finish_chunk<R>(sc, chunk_unscales<kGemvqI4>(xs, rows, cap) + L, cap, rows, part, acc);
    }
}

// acc[o][r] += the products of step c's chunks (tile of nch chunks, staged x in xs), one byte per weight (fp8 or
// uint8), half2 form: two bytes to a half2 (fp8: one conversion; uint8: one PRMT makes (1024 + w0, 1024 + w1), bits
// 0x64 above each byte, and one HSUB2 of 1152 leaves w - 128 exactly), one HFMA2 per pair and row, a chunk's 16
// products summed in half2 then in fp32 (the output's scales applied to the finished sum).
template <int Q, int R>
__device__ __forceinline__ void compute_step_half_bytes(const Step<Q>& st, const uint4* xs, int cap, int nch, int c,
                                                        int lane, int rows, float (&acc)[kOuts][R]) {
    const __half2 bias = as_half2(0x64806480u);         // uint8: (1152, 1152)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int L = c * kStepChunks + 32 * u + lane;
        if (L >= nch) continue;
        __half2 part[kOuts][R];
#pragma unroll
        for (int o = 0; o < kOuts; ++o)
#pragma unroll
            for (int r = 0; r < R; ++r) part[o][r] = as_half2(0u);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            __half2 w[kOuts][4];
#pragma unroll
            for (int o = 0; o < kOuts; ++o)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const uint32_t v = word(st.q[o][u], 2 * h + j);
                    if constexpr (kIsU8<Q>) {
                        w[o][2 * j] = __hsub2(as_half2(__byte_perm(v, 0x64646464u, 0x4140u)), bias);
                        w[o][2 * j + 1] = __hsub2(as_half2(__byte_perm(v, 0x64646464u, 0x4342u)), bias);
                    } else {
                        const auto lo = (__nv_fp8x2_storage_t)(v & 0xFFFFu), hi = (__nv_fp8x2_storage_t)(v >> 16);
                        w[o][2 * j] = __half2(__nv_cvt_fp8x2_to_halfraw2(lo, __NV_E4M3));
                        w[o][2 * j + 1] = __half2(__nv_cvt_fp8x2_to_halfraw2(hi, __NV_E4M3));
                    }
                }
            hfma_rows<R>(w, xs, 2, h, cap, L, rows, part);
        }
        const float one[kOuts] = {1.f, 1.f};
        finish_chunk<R>(one, chunk_unscales<Q>(xs, rows, cap) + L, cap, rows, part, acc);
    }
}

// acc[o][r] += the products of step c's chunks (tile of nch chunks, staged fp32 x in xs4), fp32 form.
template <int R, int Q>
__device__ __forceinline__ void compute_step_f32(const Step<Q>& st, const float4* xs4, int cap, int nch, int c,
                                                 int lane, int rows, float (&acc)[kOuts][R]) {
    constexpr int QD = Chunk<Q>::kQuads;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int L = c * kStepChunks + 32 * u + lane;
        if (L >= nch) continue;
        if constexpr (kIsI4<Q>) {
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
                    f[o][0] = __uint_as_float(lop_bits<0x0000000Fu>(v, magic)) - cz[o][0];
                    f[o][1] = __uint_as_float(lop_bits<0x000000F0u>(v, magic)) - cz[o][1];
                    f[o][2] = __uint_as_float(lop_bits<0x00000F00u>(v, magic)) - cz[o][2];
                    f[o][3] = __uint_as_float(lop_bits<0x0000F000u>(v, magic)) - cz[o][3];
                    f[o][4] = __uint_as_float(lop_bits<0x000F0000u>(v, magic)) - cz[o][4];
                    f[o][5] = __uint_as_float(lop_bits<0x000000F0u>(h, magic)) - cz[o][1];
                    f[o][6] = __uint_as_float(lop_bits<0x00000F00u>(h, magic)) - cz[o][2];
                    f[o][7] = __uint_as_float(lop_bits<0x0000F000u>(h, magic)) - cz[o][3];
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
                    if constexpr (kIsU8<Q>) {      // the float 2^23 + w (bits 0x4B0000ww) less 2^23 + 128
#pragma unroll
                        for (int b = 0; b < 4; ++b)
                            f[o][b] = __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7440u + b)) - 8388736.f;
                        continue;
                    }
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

// The finished item m of this warp: one warp-shuffle reduction per output and row, written by lane 0.
// u8: y = rx[n] * (sum + 128.5 * sum a') + sum a * my + mx[n] * sum a (the row sums in cst).
template <typename F, int R, int Q>
__device__ __forceinline__ void write_item(const GemvqArgs& a, int first, int m, int lane, int rows,
                                           float (&acc)[kOuts][R], const float (*cst)[3]) {
    F* __restrict__ y = static_cast<F*>(a.y);
    const int n0 = (first + m * a.stride) * kOuts;
#pragma unroll
    for (int o = 0; o < kOuts; ++o) {
        const int n = n0 + o;
        float sc = 1.f, mxn = 0.f;
        if constexpr (kIsU8<Q>) {
            if (n < a.N) {
                sc = to_f32(static_cast<const F*>(a.rx)[n]);
                mxn = to_f32(static_cast<const F*>(a.mx)[n]);
            }
        } else if constexpr (!kIsI4<Q>) {
            sc = n < a.N ? __ldg(a.fscale + n) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                float v = acc[o][r];
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                if constexpr (kIsU8<Q>)
                    v = fmaf(sc, fmaf(128.5f, cst[r][0], v), fmaf(mxn, cst[r][2], cst[r][1]));
                else
                    v *= sc;
                if (lane == 0 && n < a.N) y[(long)r * a.N + n] = from_f32<F>(v);
            }
            acc[o][r] = 0.f;
        }
    }
}

// The load side of a warp's sequence: its item m (the m-th), step c of the item (over all of K, whatever the
// tiles: a tile is a whole number of steps), and the item's addresses (outputs n0, n0 + 1): the weights of
// output n0 from this lane's first chunk, and for i4 the half2 of both scales and the word of both zero
// points (nibble shift) of group 0.
template <int Q>
struct Loader {
    const uint4* w;
    const __half2* sc;
    const uint32_t* zw;
    int shift, n0, m, c;
};

template <int Q>
__device__ __forceinline__ void loader_item(Loader<Q>& ld, const GemvqArgs& a, int first, int lane) {
    ld.n0 = (first + ld.m * a.stride) * kOuts;
    ld.w = a.w + ld.n0 * (a.K / Chunk<Q>::kElems) + lane;
    if constexpr (kIsI4<Q>) {
        ld.sc = reinterpret_cast<const __half2*>(a.scales + ld.n0);
        ld.zw = a.zeros + (ld.n0 >> 3);
        ld.shift = 4 * (ld.n0 & 7);
    }
}

// st = the step at ld (zeros past the warp's items, the row or the outputs; nch chunks per row, spi steps per
// item); ld moves to the next step.
template <int Q>
__device__ __forceinline__ void loader_step(Step<Q>& st, Loader<Q>& ld, const GemvqArgs& a, int first, int count,
                                            int lane, int nch, int spi) {
    constexpr int CE = Chunk<Q>::kElems;
    const bool live = ld.m < count && ld.n0 < a.N, second = ld.n0 + 1 < a.N;
    const int row_chunks = a.K / CE;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int L = ld.c * kStepChunks + 32 * u;                     // this lane's chunk: L + lane
        const bool in = live && L + lane < nch;
        st.q[0][u] = in ? __ldcs(ld.w + L) : make_uint4(0u, 0u, 0u, 0u);
        st.q[1][u] = in && second ? __ldcs(ld.w + row_chunks + L) : make_uint4(0u, 0u, 0u, 0u);
        if constexpr (kIsI4<Q>) {
            float2 s = make_float2(0.f, 0.f);
            uint32_t zw = 0u;
            if (in) {
                const int k = (L + lane) * CE;
                const int g = a.group_shift >= 0 ? k >> a.group_shift : k / a.group;
                s = __half22float2(__ldg(ld.sc + g * (a.Np >> 1)));
                zw = __ldg(ld.zw + g * (a.Np >> 3)) >> ld.shift;
            }
            st.s[0][u] = s.x;
            st.s[1][u] = s.y;
            st.z[0][u] = (zw + 1u) & 15u;
            st.z[1][u] = ((zw >> 4) + 1u) & 15u;
        }
    }
    if (live && ++ld.c >= spi) {
        ld.c = 0;
        ++ld.m;
        if (ld.m < count) loader_item<Q>(ld, a, first, lane);
    }
}

template <typename F, int R, int Q>
__device__ __forceinline__ void compute_step(const Step<Q>& st, const uint4* xs, int cap, int nch, int c, int lane,
                                             int rows, float (&acc)[kOuts][R]) {
    if constexpr (kHalf2<F> && kIsI4<Q>)
        compute_step_half<R>(st, xs, cap, nch, c, lane, rows, acc);
    else if constexpr (kHalf2<F>)
        compute_step_half_bytes<Q, R>(st, xs, cap, nch, c, lane, rows, acc);
    else
        compute_step_f32<R, Q>(st, reinterpret_cast<const float4*>(xs), cap, nch, c, lane, rows, acc);
}

// One step of a one-tile sequence: multiply the weights in st (the warp's item m, step c), write the item at
// its last step; st takes the step after next from ld.
template <typename F, int R, int Q>
__device__ __forceinline__ void stream_step(Step<Q>& st, Loader<Q>& ld, const GemvqArgs& a, int& m, int& c,
                                            int first, int count, int lane, int rows, int nch, int spi,
                                            const uint4* xs, float (&acc)[kOuts][R], const float (*cst)[3]) {
    compute_step<F, R, Q>(st, xs, nch, nch, c, lane, rows, acc);
    loader_step<Q>(st, ld, a, first, count, lane, nch, spi);
    if (++c >= spi) {
        c = 0;
        write_item<F, R, Q>(a, first, m, lane, rows, acc, cst);
        ++m;
    }
}

// R: rows the registers are laid out for (1, or kGemvqMaxRows serving 2..4 rows). NORM: a kernel that also serves
// the norms (int4 only; its staging needs registers the others keep for weights in flight).
template <typename F, int R, int Q, bool NORM>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) gemvq_kernel(GemvqBatch batch) {
    pdl_trigger();
    constexpr int CE = Chunk<Q>::kElems;
    int e = 0;                                             // this block's product
#pragma unroll 1
    while (e + 1 < batch.n && (int)blockIdx.x >= batch.block_begin[e + 1]) ++e;
    const GemvqArgs& a = batch.e[e];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int first = ((int)blockIdx.x - batch.block_begin[e]) * kWarps + warp;   // this warp's first item
    // the warp's items: first, first + stride, ... (one with several tiles: every warp meets every barrier)
    const int count = a.tiles > 1 ? 1 : first < a.items ? (a.items - first + a.stride - 1) / a.stride : 0;
    const int cap = a.tile / CE;
    const int nch = a.K / CE, spi = (nch + kStepChunks - 1) / kStepChunks;   // chunks and steps per item

    // Weights first (they never change): the first two steps, before waiting for the previous kernel.
    Step<Q> s0, s1;                                       // one tile: steps 2i and 2i + 1 (no copies)
    Loader<Q> ld{};
    if (count > 0) loader_item<Q>(ld, a, first, lane);
    loader_step<Q>(s0, ld, a, first, count, lane, nch, spi);
    loader_step<Q>(s1, ld, a, first, count, lane, nch, spi);
    pdl_wait();

    extern __shared__ uint4 xs[];
    __shared__ float nmean[R], nrstd[R];
    __shared__ float cst[R][3];                            // u8: the rows' sums (reduce_row_sums)
    float cs[R][3];
#pragma unroll
    for (int r = 0; r < R; ++r) cs[r][0] = cs[r][1] = cs[r][2] = 0.f;
    const F* __restrict__ x = static_cast<const F*>(a.x);
    const int rows = R == 1 ? 1 : batch.rows;
    if constexpr (NORM)
        if (is_norm(a.act)) norm_stats<F, R>(x, a, rows, nmean, nrstd);   // uniform in the block (one product)
    float acc[kOuts][R];
#pragma unroll
    for (int o = 0; o < kOuts; ++o)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[o][r] = 0.f;

    if (a.tiles == 1) {
        stage_tile<F, R, Q, NORM>(x, a.K, rows, a.act, 0, a.K, cap, xs, a, nmean, nrstd, cs);
        __syncthreads();
        if constexpr (kIsU8<Q>) reduce_row_sums<R>(cs, cst);
        const int total = count * spi;
        int m = 0, c = 0;
#pragma unroll 1
        for (int i = 0; i < total; i += 2) {
            stream_step<F, R, Q>(s0, ld, a, m, c, first, count, lane, rows, nch, spi, xs, acc, cst);
            if (i + 1 < total)
                stream_step<F, R, Q>(s1, ld, a, m, c, first, count, lane, rows, nch, spi, xs, acc, cst);
        }
        return;
    }
    // Several tiles (count == 1): stage each tile, multiply its steps (the item's steps in order: a tile is a
    // whole number of steps), the weights two steps ahead.
#pragma unroll 1
    for (int t = 0; t < a.tiles; ++t) {
        const int t0 = t * a.tile, len = min(a.tile, a.K - t0), tch = len / CE;
        if (t > 0) __syncthreads();                        // everyone is done with tile t-1
        stage_tile<F, R, Q, NORM>(x, a.K, rows, a.act, t0, len, cap, xs, a, nmean, nrstd, cs);
        __syncthreads();
        const int steps = (tch + kStepChunks - 1) / kStepChunks;
#pragma unroll 1
        for (int c = 0; c < steps; ++c) {
            compute_step<F, R, Q>(s0, xs, cap, tch, c, lane, rows, acc);
            s0 = s1;
            loader_step<Q>(s1, ld, a, first, count, lane, nch, spi);
        }
    }
    if constexpr (kIsU8<Q>) reduce_row_sums<R>(cs, cst);   // every tile staged: the rows' sums are whole
    write_item<F, R, Q>(a, first, 0, lane, rows, acc, cst);
}

int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

// Tile each product's staged x (<= kSmemMax bytes), give each product a share of at most kBlocksPerSm blocks
// per multiprocessor by its weights (at least one block, at most one per kWarps items; a product with several
// tiles: one item per warp) and launch every product in one grid with programmatic stream serialization (the
// kernel waits with pdl_wait before touching data of earlier kernels).
template <int Q>
int launch(int act, GemvqBatch b, cudaStream_t stream) {
    constexpr int CE = Chunk<Q>::kElems;
    if (b.n < 1 || b.n > kGemvqMaxEntries || b.rows < 1 || b.rows > kGemvqMaxRows) return kUnsupported;
    if (kIsU8<Q> && act == static_cast<int>(ActType::F32)) return kUnsupported;   // float32: csrc/mm8's GEMV
    const bool half = act == static_cast<int>(ActType::F16);
    const int per_chunk = half ? CE * 2 + 4 : CE * 4;          // staged bytes per chunk and row (half2: + 2^-e)
    const int max_tile = (kSmemMax / b.rows / per_chunk) * CE;
    double work = 0;
    int smem = 0;
    bool norm = false;
    for (int i = 0; i < b.n; ++i) {
        GemvqArgs& a = b.e[i];
        if (a.K < CE || a.K % CE != 0 || a.N < 0) return kUnsupported;
        if (a.act != kGemvqActNone && a.act != kGemvqActRelu2 && !is_norm(a.act)) return kUnsupported;
        if (is_norm(a.act) && (!kIsI4<Q> || a.ln_w == nullptr || !(a.eps > 0.f))) return kUnsupported;
        norm = norm || is_norm(a.act);
        for (const void* p : {a.x, static_cast<const void*>(a.w), a.ln_w, a.ln_b, a.ry, a.my})
            if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return kUnsupported;   // 16-byte loads (null passes)
        if ((long)a.Np * (a.K / CE) > INT32_MAX || (kIsI4<Q> && (long)a.Np * (a.K / a.group) > INT32_MAX))
            return kUnsupported;                                 // 32-bit offsets in the kernel
        if (kIsI4<Q> && reinterpret_cast<uintptr_t>(a.scales) % 4 != 0) return kUnsupported;   // half2 loads
        if (kIsU8<Q> && (!a.rx || !a.mx || !a.ry || !a.my)) return kUnsupported;
        // one tile, or tiles of whole steps (the loader walks the row's steps across tiles)
        a.tile = a.K <= max_tile ? a.K : max_tile / (kStepChunks * CE) * (kStepChunks * CE);
        if (a.tile < CE) return kUnsupported;
        a.tiles = ceil_div(a.K, a.tile);
        a.items = ceil_div(a.N, kOuts);
        smem = std::max(smem, b.rows * (a.tile / CE) * per_chunk);
        if (a.tiles == 1) work += (double)a.N * a.K;
    }
    const int slots = device_sm_count() * kBlocksPerSm;
    long blocks = 0;
    for (int i = 0; i < b.n; ++i) {
        GemvqArgs& a = b.e[i];
        const int most = ceil_div(a.items, kWarps);
        int nb = most;
        if (a.tiles == 1 && work > 0)
            nb = std::max(1, std::min(most, (int)((double)slots * a.N * a.K / work + 0.5)));
        a.stride = nb * kWarps;
        b.block_begin[i] = (int)blocks;
        blocks += nb;
    }
    if (blocks == 0) return 0;
    cudaError_t err = cudaSuccess;
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F, {
      if constexpr (kIsU8<Q> && std::is_same<F, float>::value) {
        err = cudaErrorNotSupported;     // not reached: refused above
      } else {
        void (*kernel)(GemvqBatch) =
            norm ? (b.rows == 1 ? gemvq_kernel<F, 1, Q, kIsI4<Q>> : gemvq_kernel<F, kGemvqMaxRows, Q, kIsI4<Q>>)
                 : (b.rows == 1 ? gemvq_kernel<F, 1, Q, false> : gemvq_kernel<F, kGemvqMaxRows, Q, false>);
        if (smem > kSmemDefault)
            err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemMax);
        if (err == cudaSuccess) err = launch_pdl(kernel, (unsigned)blocks, kThreads, (size_t)smem, stream, b);
      }
    });
    return (int)(err != cudaSuccess ? err : cudaGetLastError());
}

}  // namespace

int gemvq_launch(int kind, int act, int rows, int n, const GemvqEntry* entries, cudaStream_t stream) {
    if (n < 1 || n > kGemvqMaxEntries || kind < kGemvqF8 || kind > kGemvqU8) return kUnsupported;
    const bool i4 = kind == kGemvqI4;
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
        a.act = E.act;
        a.ln_w = E.ln_w;
        a.ln_b = E.ln_b;
        a.eps = E.eps;
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
            a.rx = E.rx; a.mx = E.mx; a.ry = E.ry; a.my = E.my;
            a.Np = E.N; a.group = 1; a.group_shift = 0;
        }
    }
    return i4 ? launch<kGemvqI4>(act, b, stream)
              : kind == kGemvqU8 ? launch<kGemvqU8>(act, b, stream) : launch<kGemvqF8>(act, b, stream);
}

}  // namespace rwkv_chat
