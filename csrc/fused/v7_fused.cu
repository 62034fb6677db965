// Fused RWKV-7 layer kernels, CUDA: the elementwise work of a layer in a few launches, and a
// grouped GEMV for decode. Formulas: ChatRWKV rwkv/model.py (pip rwkv 0.8.32) RWKV_x070_TMix_one/seq
// and RWKV_x070_CMix_one/seq; see models/rwkv/v7.py for the same math in torch.
//
//   v7_mix       residual add (x + dx, rounded to the activation dtype) + LayerNorm + token shift
//                + n_mix lerps  xm = xln + (prev - xln) * mix[m]; the shift state takes the last
//                token's xln. One block per token row; the previous row's LayerNorm is recomputed
//                in the same block (so T > 1 needs no second pass). Decode (T = 1, <= 4 rows):
//                v7_mix_one, each row over up to 16 blocks that each write one slice.
//   gemv_multi   up to 8 products y_e = act_e(x_e) @ W_e (+ bias_e) in one launch for 1..4 rows; W_e is
//                stored [M, N] (output-major, i.e. nn.Linear's layout), so each output is a contiguous dot
//                product: a group of lpr lanes per output row, 16-byte loads, shuffle reduction;
//                long rows with few outputs split over up to 4 warps (partials through shared memory).
//                act: 0 none, 1 tanh, 2 sigmoid, 3 relu^2 (applied to x as it is loaded; the same codes
//                on the results as they are written, for the ffn key's relu^2). SwiGLU entries (glu) read
//                a gate row and an up row per output (the up rows after the gate rows, or their own matrix);
//                a batch may carry an RMSNorm (GemvNorm) that each block applies to x + residual in shared
//                memory first (Qwen2's decode products).
//   v7_pre       per (token, head): decay w = exp(-e^-1/2 sigmoid(w0 + wl)), in-context rate
//                a = sigmoid(a0 + al), kk = normalize(k * k_k), k' = k (1 + (a - 1) k_a),
//                v' = v + (v_first - v) sigmoid(v0 + vl); writes the WKV inputs (w, k', v', -kk, kk a).
//   v7_post      per (token, head): group norm of the WKV output (eps 64e-5) + (sum r k' r_k) v',
//                times the gate g.
//   v7_tmix_one  decode (T = 1): v7_pre + one WKV-7 state step (state in registers) + v7_post in one
//                block per (batch row, head).
// v7_mix, gemv_multi and v7_tmix_one use programmatic dependent launch (pdl_wait / launch_pdl in
// csrc/common/cuda_common.cuh).
#include <algorithm>
#include <type_traits>
#include "../common/cuda_common.cuh"
#include "fused_launchers.h"
#include "v7_device.cuh"

namespace rwkv_chat {
namespace {

// ---------------------------------------------------------------------------------------------
// v7_mix
constexpr int kMixThreads = 1024;

// Sum of a float2 over the NT threads of a block (NT a multiple of 32); sh: >= NT / 32 float2 of shared
// memory. All threads get the result. Contains barriers: every thread of the block must call it.
template <int NT>
__device__ __forceinline__ float2 block_sum2(float2 v, float2* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float2 t = make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < NT / 32; ++i) { t.x += sh[i].x; t.y += sh[i].y; }
    return t;
}

template <typename F>
__global__ void __launch_bounds__(kMixThreads) v7_mix_kernel(
    int T, int C, int n_mix, const F* __restrict__ x, const F* __restrict__ dx, F* __restrict__ x_out,
    const F* __restrict__ ln_w, const F* __restrict__ ln_b, const F* __restrict__ shift, F* __restrict__ shift_out,
    const F* __restrict__ mix, F* __restrict__ out, long out_stride) {
    extern __shared__ float smem[];
    float* cur = smem;           // [C]
    float* prev = smem + C;      // [C]
    __shared__ float2 red[32];
    pdl_trigger();
    prefetch_l2(ln_w, (long)C * sizeof(F));
    prefetch_l2(ln_b, (long)C * sizeof(F));
    prefetch_l2(mix, (long)n_mix * C * sizeof(F));
    pdl_wait();
    const long row = blockIdx.x;
    const int b = (int)(row / T), t = (int)(row % T);
    const bool has_prev = t > 0;
    // pass 1: values and sums
    float2 s = make_float2(0.f, 0.f);
    for (int c = threadIdx.x; c < C; c += kMixThreads) {
        float v = to_f32(x[row * C + c]);
        if (dx) v = round_act<F>(v + to_f32(dx[row * C + c]));
        cur[c] = v;
        s.x += v;
        if (has_prev) {
            float p = to_f32(x[(row - 1) * C + c]);
            if (dx) p = round_act<F>(p + to_f32(dx[(row - 1) * C + c]));
            prev[c] = p;
            s.y += p;
        }
    }
    s = block_sum2<kMixThreads>(s, red);
    const float mc = s.x / C, mp = s.y / C;
    float2 q = make_float2(0.f, 0.f);
    for (int c = threadIdx.x; c < C; c += kMixThreads) {
        const float d = cur[c] - mc;
        q.x += d * d;
        if (has_prev) { const float e = prev[c] - mp; q.y += e * e; }
    }
    q = block_sum2<kMixThreads>(q, red);
    const float rc = rsqrtf(q.x / C + kLnEps), rp = rsqrtf(q.y / C + kLnEps);
    for (int c = threadIdx.x; c < C; c += kMixThreads) {
        if (dx && x_out) x_out[row * C + c] = from_f32<F>(cur[c]);
        const float w = to_f32(ln_w[c]), bb = to_f32(ln_b[c]);
        const float xl = round_act<F>((cur[c] - mc) * rc * w + bb);
        float pv = 0.f;
        if (has_prev) pv = round_act<F>((prev[c] - mp) * rp * w + bb);
        else if (shift) pv = to_f32(shift[(long)b * C + c]);
        if (n_mix == 0) {
            out[row * C + c] = from_f32<F>(xl);
        } else {
            const float d = pv - xl;
            for (int m = 0; m < n_mix; ++m)
                out[m * out_stride + row * C + c] = from_f32<F>(xl + d * to_f32(mix[(long)m * C + c]));
        }
        if (t == T - 1 && shift_out) cur[c] = xl;  // kept for the shift state, written below
    }
    if (t == T - 1 && shift_out) {
        __syncthreads();
        for (int c = threadIdx.x; c < C; c += kMixThreads) shift_out[(long)b * C + c] = from_f32<F>(cur[c]);
    }
}

// v7_mix for sequences, vectorized: one row (token) per block of kMixVecThreads threads, each thread
// holding up to kMixVecMaxIter 16-byte vectors of the row and of the previous row in registers (C <= 8192
// at fp16), one pass over global memory for the inputs; outputs written as 16-byte vectors. Same
// results as v7_mix_kernel (same rounding points), which serves the shapes this one does not.
constexpr int kMixVecThreads = 256;
constexpr int kMixVecMaxIter = 4;

template <typename F>
struct Vec16 {
    static constexpr int n = 16 / (int)sizeof(F);
    float v[n];
    __device__ __forceinline__ void load(const F* p) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const F* e = reinterpret_cast<const F*>(&u);
#pragma unroll
        for (int i = 0; i < n; ++i) v[i] = to_f32(e[i]);
    }
    __device__ __forceinline__ void store(F* p) const {
        uint4 u;
        F* e = reinterpret_cast<F*>(&u);
#pragma unroll
        for (int i = 0; i < n; ++i) e[i] = from_f32<F>(v[i]);
        *reinterpret_cast<uint4*>(p) = u;
    }
};

template <typename F, int kMixVecIter>
__global__ void __launch_bounds__(kMixVecThreads) v7_mix_vec_kernel(
    int T, int C, int n_mix, const F* __restrict__ x, const F* __restrict__ dx, F* __restrict__ x_out,
    const F* __restrict__ ln_w, const F* __restrict__ ln_b, const F* __restrict__ shift, F* __restrict__ shift_out,
    const F* __restrict__ mix, F* __restrict__ out, long out_stride) {
    constexpr int V = Vec16<F>::n;
    __shared__ float2 red[kMixVecThreads / 32];
    pdl_trigger();
    pdl_wait();
    const long row = blockIdx.x;
    const int b = (int)(row / T), t = (int)(row % T);
    const bool has_prev = t > 0;
    Vec16<F> cur[kMixVecIter], prv[kMixVecIter];
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int it = 0; it < kMixVecIter; ++it) {
        const int c = (it * kMixVecThreads + threadIdx.x) * V;
        if (c >= C) break;
        cur[it].load(x + row * C + c);
        if (dx) {
            Vec16<F> d;
            d.load(dx + row * C + c);
#pragma unroll
            for (int i = 0; i < V; ++i) cur[it].v[i] = round_act<F>(cur[it].v[i] + d.v[i]);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) s.x += cur[it].v[i];
        if (has_prev) {
            prv[it].load(x + (row - 1) * C + c);
            if (dx) {
                Vec16<F> d;
                d.load(dx + (row - 1) * C + c);
#pragma unroll
                for (int i = 0; i < V; ++i) prv[it].v[i] = round_act<F>(prv[it].v[i] + d.v[i]);
            }
#pragma unroll
            for (int i = 0; i < V; ++i) s.y += prv[it].v[i];
        }
    }
    s = block_sum2<kMixVecThreads>(s, red);
    const float mc = s.x / C, mp = s.y / C;
    float2 q = make_float2(0.f, 0.f);
#pragma unroll
    for (int it = 0; it < kMixVecIter; ++it) {
        const int c = (it * kMixVecThreads + threadIdx.x) * V;
        if (c >= C) break;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const float d = cur[it].v[i] - mc;
            q.x += d * d;
            if (has_prev) { const float e = prv[it].v[i] - mp; q.y += e * e; }
        }
    }
    q = block_sum2<kMixVecThreads>(q, red);
    const float rc = rsqrtf(q.x / C + kLnEps), rp = rsqrtf(q.y / C + kLnEps);
#pragma unroll
    for (int it = 0; it < kMixVecIter; ++it) {
        const int c = (it * kMixVecThreads + threadIdx.x) * V;
        if (c >= C) break;
        if (dx && x_out) cur[it].store(x_out + row * C + c);
        Vec16<F> w, bb, xl, pv;
        w.load(ln_w + c);
        bb.load(ln_b + c);
        if (!has_prev && shift) pv.load(shift + (long)b * C + c);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            xl.v[i] = round_act<F>((cur[it].v[i] - mc) * rc * w.v[i] + bb.v[i]);
            if (has_prev) pv.v[i] = round_act<F>((prv[it].v[i] - mp) * rp * w.v[i] + bb.v[i]);
            else if (!shift) pv.v[i] = 0.f;
        }
        if (n_mix == 0) {
            xl.store(out + row * C + c);
        } else {
            for (int m = 0; m < n_mix; ++m) {
                Vec16<F> mx, o;
                mx.load(mix + (long)m * C + c);
#pragma unroll
                for (int i = 0; i < V; ++i) o.v[i] = xl.v[i] + (pv.v[i] - xl.v[i]) * mx.v[i];
                o.store(out + m * out_stride + row * C + c);
            }
        }
        if (t == T - 1 && shift_out) xl.store(shift_out + (long)b * C + c);
    }
}

// v7_mix for T = 1 and few rows: a row's work spread over `slices` blocks of kMix1Threads. Each block
// reads the whole row (x + dx, from L2) for the LayerNorm statistics (two passes, as v7_mix_kernel)
// and writes only its slice of the outputs, so no block reduction spans more than 256 threads and
// the writes and parameter reads are spread over several SMs. x_out must not alias x or dx.
constexpr int kMix1Threads = 256;
constexpr int kMixOneMaxRows = 4;
constexpr int kMixOneMaxSlices = 16;

template <typename F>
__global__ void __launch_bounds__(kMix1Threads) v7_mix_one_kernel(
    int C, int n_mix, int slices, const F* __restrict__ x, const F* __restrict__ dx, F* __restrict__ x_out,
    const F* __restrict__ ln_w, const F* __restrict__ ln_b, const F* shift, F* shift_out,
    const F* __restrict__ mix, F* __restrict__ out, long out_stride) {
    extern __shared__ float cur[];   // [C]
    __shared__ float red[kMix1Threads / 32];
    const long row = blockIdx.x / slices;
    const int sl = blockIdx.x % slices, per = (C + slices - 1) / slices;
    const int c0 = min(C, sl * per), c1 = min(C, c0 + per);
    pdl_trigger();
    prefetch_l2(ln_w + c0, (long)(c1 - c0) * sizeof(F));
    prefetch_l2(ln_b + c0, (long)(c1 - c0) * sizeof(F));
    for (int m = 0; m < n_mix; ++m) prefetch_l2(mix + (long)m * C + c0, (long)(c1 - c0) * sizeof(F));
    pdl_wait();
    const F* xr = x + row * C;
    const F* dr = dx ? dx + row * C : nullptr;
    const float2 st = residual_ln_stats<F, kMix1Threads>(xr, dr, C, cur, red, [](const F* p) { return *p; });
    const float mean = st.x, rstd = st.y;
    for (int c = c0 + threadIdx.x; c < c1; c += kMix1Threads) {
        const long o = row * C + c;
        const float v = cur[c];
        if (dr && x_out) x_out[o] = from_f32<F>(v);
        const float xl = round_act<F>((v - mean) * rstd * to_f32(ln_w[c]) + to_f32(ln_b[c]));
        const float pv = shift ? to_f32(shift[o]) : 0.f;
        if (n_mix == 0) {
            out[o] = from_f32<F>(xl);
        } else {
            const float d = pv - xl;
            for (int m = 0; m < n_mix; ++m) out[m * out_stride + o] = from_f32<F>(xl + d * to_f32(mix[(long)m * C + c]));
        }
        if (shift_out) shift_out[o] = from_f32<F>(xl);
    }
}

// ---------------------------------------------------------------------------------------------
// gemv_multi
constexpr int kGemvThreads = 128;   // 4 warps: finer blocks than 256 threads (measured 1-3.5% faster per step)
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvUnroll = 2;   // 16-byte loads per lane per chunk (2 chunks in flight); 4 was slower: fewer resident warps
// Split a dot product over warps (ks) while the grid stays under this many warps: ~ one wave of 32 resident
// warps on 132 SMs. Measured on an H100 (graph of launches over weights > 3x L2, RWKV-7 decode shapes):
// 4096 vs 8192 vs 16384 per layer of 1.5B 40.5 / 43.0 / 43.4 us, of 7.2B 143.1 / 142.4 / 143.2 us.
constexpr long kGemvTargetWarps = 4096;


// The norm of GemvBatch.norm (see fused_launchers.h: kind 1 RMSNorm, kind 2 LayerNorm) into xs [rows, C] in shared
// memory; every thread of the block calls it after pdl_wait. red: >= kGemvWarps * R floats of shared memory.
// lerp (kind 2, nullable): the token-shift lerp vector [C] of the block's product (one product per block), applied as
// the LayerNorm is staged, xs = round(xl + (shift - xl) * lerp) (as v7_mix writes it; xn_out still gets xl), so the
// product's loop reads x from shared memory alone.
template <typename F, int R>
__device__ __forceinline__ void gemv_norm_stage(const GemvNorm& nm, int rows, F* xs, float* red, const F* lerp) {
    constexpr int EPV = 16 / sizeof(F);
    union V { uint4 q; F v[EPV]; };
    const int C = nm.C, nv = C / EPV;
    const bool first = blockIdx.x == 0;
    const uint4* x = static_cast<const uint4*>(nm.x);
    const uint4* res = static_cast<const uint4*>(nm.residual);
    uint4* hout = first ? static_cast<uint4*>(nm.h_out) : nullptr;
    uint4* xq = reinterpret_cast<uint4*>(xs);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    // block sums of the R rows' per-thread values (every thread gets them); two barriers
    auto row_sums = [&](float (&v)[R]) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v[r] += __shfl_xor_sync(0xffffffffu, v[r], o);
        }
        __syncthreads();                                 // red may still be read by a previous call
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < R; ++r) red[warp * R + r] = v[r];
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float t = 0.f;
            for (int j = 0; j < warps; ++j) t += red[j * R + r];
            v[r] = t;
        }
    };
    float s1[R];                                         // sum of h (kind 2) or of h^2 (kind 1)
#pragma unroll
    for (int r = 0; r < R; ++r) {
        s1[r] = 0.f;
        if (r < rows) {
            for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                const long o = (long)r * nv + i;
                V a;
                a.q = __ldg(x + o);
                if (res) {
                    V b;
                    b.q = __ldg(res + o);
#pragma unroll
                    for (int c = 0; c < EPV; ++c) a.v[c] = from_f32<F>(to_f32(a.v[c]) + to_f32(b.v[c]));
                }
                if (hout) hout[o] = a.q;
#pragma unroll
                for (int c = 0; c < EPV; ++c) {
                    const float f = to_f32(a.v[c]);
                    s1[r] = nm.kind == 1 ? fmaf(f, f, s1[r]) : s1[r] + f;
                }
                xq[o] = a.q;
            }
        }
    }
    row_sums(s1);
    const uint4* w = static_cast<const uint4*>(nm.w);
    if (nm.kind == 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                const float inv = rsqrtf(s1[r] / C + nm.eps);
                for (int i = threadIdx.x; i < nv; i += blockDim.x) {   // the elements this thread staged
                    const long o = (long)r * nv + i;
                    V a, g;
                    a.q = xq[o];
                    g.q = __ldg(w + i);
#pragma unroll
                    for (int c = 0; c < EPV; ++c)
                        a.v[c] = from_f32<F>(to_f32(g.v[c]) * round_act<F>(to_f32(a.v[c]) * inv));
                    xq[o] = a.q;
                }
            }
        }
    } else {                                             // LayerNorm: the variance about the mean (two passes)
        float s2[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            s2[r] = 0.f;
            if (r < rows) {
                const float mean = s1[r] / C;
                for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                    V a;
                    a.q = xq[(long)r * nv + i];
#pragma unroll
                    for (int c = 0; c < EPV; ++c) { const float d = to_f32(a.v[c]) - mean; s2[r] = fmaf(d, d, s2[r]); }
                }
            }
        }
        row_sums(s2);
        const uint4* bias = static_cast<const uint4*>(nm.b);
        uint4* xnout = first ? static_cast<uint4*>(nm.xn_out) : nullptr;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                const float mean = s1[r] / C, rstd = rsqrtf(s2[r] / C + nm.eps);
                for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                    const long o = (long)r * nv + i;
                    V a, g, bb;
                    a.q = xq[o];
                    g.q = __ldg(w + i);
                    bb.q = __ldg(bias + i);
#pragma unroll
                    for (int c = 0; c < EPV; ++c)
                        a.v[c] = from_f32<F>((to_f32(a.v[c]) - mean) * rstd * to_f32(g.v[c]) + to_f32(bb.v[c]));
                    if (xnout) xnout[o] = a.q;
                    if (lerp) {
                        V mq, pq;
                        mq.q = __ldg(reinterpret_cast<const uint4*>(lerp) + i);
                        pq.q = nm.shift ? __ldg(static_cast<const uint4*>(nm.shift) + o) : make_uint4(0, 0, 0, 0);
#pragma unroll
                        for (int c = 0; c < EPV; ++c) {
                            const float xf = to_f32(a.v[c]);
                            a.v[c] = from_f32<F>(xf + (to_f32(pq.v[c]) - xf) * to_f32(mq.v[c]));
                        }
                    }
                    xq[o] = a.q;
                }
            }
        }
    }
    __syncthreads();
}

// GemvBatch's side copy (copy_src -> copy_dst), spread over every thread of the launch; after pdl_wait.
template <typename F>
__device__ __forceinline__ void gemv_side_copy(const GemvBatch& batch) {
    if (batch.copy_n <= 0) return;
    const F* src = static_cast<const F*>(batch.copy_src);
    F* dst = static_cast<F*>(batch.copy_dst);
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < batch.copy_n; i += (long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

// GLU: the kernel of batches with a SwiGLU entry (E.glu): a second accumulator per row for the up row m + M, loaded
// beside the gate row m (the other entries of such a batch run as in the plain kernel). NORM: the batch's RMSNorm
// (batch.norm) staged in shared memory is every entry's x (VEC only).
template <typename F, int R, bool VEC, bool GLU, bool NORM>
__global__ void __launch_bounds__(kGemvThreads) gemv_multi_kernel(GemvBatch batch) {
    static_assert(!NORM || VEC, "the RMSNorm stage needs the vector path");
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    pdl_trigger();
    int e = 0;
#pragma unroll 1
    while (e + 1 < batch.n && (int)blockIdx.x >= batch.e[e + 1].block_begin) ++e;
    const GemvEntry& E = batch.e[e];
    const int lpr = 1 << E.lpr_log2, rpw = 32 / lpr;
    const int S = 1 << E.ks_log2;                      // warps per output group, each a slice of N
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / lpr, l = lane % lpr;
    const int ks = warp & (S - 1), wg = warp >> E.ks_log2;
    const int m = ((blockIdx.x - E.block_begin) * (kGemvWarps >> E.ks_log2) + wg) * rpw + sub;
    const int L = ks * lpr + l, TL = S * lpr;          // this lane's index along N, lanes along N
    const bool active = m < E.M;
    const bool glu = GLU && E.glu != 0;
    const int N = E.N, rows = batch.rows, act = E.act;
    const F* __restrict__ w = static_cast<const F*>(E.w) + (long)(active ? m : 0) * N;
    const F* __restrict__ w2 = !glu ? w                            // the up row (GLU entries)
                               : E.w_up ? static_cast<const F*>(E.w_up) + (long)(active ? m : 0) * N
                                        : w + (long)E.M * N;
    const F* __restrict__ x = NORM ? reinterpret_cast<const F*>(gemv_smem) : static_cast<const F*>(E.x);
    const long x_stride = NORM ? (long)batch.norm.C : E.x_stride;
    float acc[R], acc2[GLU ? R : 1];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll
    for (int r = 0; r < (GLU ? R : 1); ++r) acc2[r] = 0.f;
    if (VEC) {
        constexpr int EPV = 16 / sizeof(F);
        union V { uint4 q; F v[EPV]; };
        const int step = TL * EPV, chunk = step * kGemvUnroll;
        // software pipeline: the next chunk's weights are in flight while this chunk is used; the
        // first chunk is requested before pdl_wait (weights never change), overlapping the previous kernel
        V wq[kGemvUnroll], wq2[GLU ? kGemvUnroll : 1];
        int n0 = L * EPV;
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
            const int n = n0 + u * step;
            wq[u].q = (active && n < N) ? __ldcs(reinterpret_cast<const uint4*>(w + n)) : make_uint4(0, 0, 0, 0);
            if constexpr (GLU)
                wq2[u].q = (glu && active && n < N) ? __ldcs(reinterpret_cast<const uint4*>(w2 + n))
                                                    : make_uint4(0, 0, 0, 0);
        }
        pdl_wait();
        gemv_side_copy<F>(batch);
        if constexpr (NORM) {
            __shared__ float red[kGemvWarps * R];
            gemv_norm_stage<F, R>(batch.norm, rows, reinterpret_cast<F*>(gemv_smem), red,
                                  batch.norm.kind == 2 ? static_cast<const F*>(E.mix) : nullptr);
        }
        for (; n0 < N; n0 += chunk) {
            V wn[kGemvUnroll], wn2[GLU ? kGemvUnroll : 1];
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u) {
                const int n = n0 + chunk + u * step;
                wn[u].q = (active && n < N) ? __ldcs(reinterpret_cast<const uint4*>(w + n)) : make_uint4(0, 0, 0, 0);
                if constexpr (GLU)
                    wn2[u].q = (glu && active && n < N) ? __ldcs(reinterpret_cast<const uint4*>(w2 + n))
                                                        : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u) {
                const int n = n0 + u * step;
                if (n < N) {
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        if (r < rows) {
                            V xq;
                            if constexpr (NORM) xq.q = *reinterpret_cast<const uint4*>(x + (long)r * x_stride + n);
                            else xq.q = __ldg(reinterpret_cast<const uint4*>(x + (long)r * x_stride + n));
                            float xf[EPV];
#pragma unroll
                            for (int c = 0; c < EPV; ++c) xf[c] = to_f32(xq.v[c]);
                            if (act != 0) {
#pragma unroll
                                for (int c = 0; c < EPV; ++c) xf[c] = act_apply(act, xf[c]);
                            }
#pragma unroll
                            for (int c = 0; c < EPV; ++c) acc[r] = fmaf(xf[c], to_f32(wq[u].v[c]), acc[r]);
                            if constexpr (GLU) {
#pragma unroll
                                for (int c = 0; c < EPV; ++c) acc2[r] = fmaf(xf[c], to_f32(wq2[u].v[c]), acc2[r]);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u) {
                wq[u] = wn[u];
                if constexpr (GLU) wq2[u] = wn2[u];
            }
        }
    } else {
        pdl_wait();
        gemv_side_copy<F>(batch);
        for (int n = L; n < N; n += TL) {
            const float wv = active ? to_f32(w[n]) : 0.f;
            const float wv2 = (GLU && glu && active) ? to_f32(w2[n]) : 0.f;
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (r < rows) {
                    const float xv = act_apply(act, to_f32(x[(long)r * x_stride + n]));
                    acc[r] = fmaf(xv, wv, acc[r]);
                    if constexpr (GLU) acc2[r] = fmaf(xv, wv2, acc2[r]);
                }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            if (o < lpr) {
                acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
                if constexpr (GLU) acc2[r] += __shfl_xor_sync(0xffffffffu, acc2[r], o);
            }
    }
    if (S > 1) {                                       // uniform in the block (one entry per block)
        __shared__ float part[kGemvWarps * 32 * R * (GLU ? 2 : 1)];
        if (l == 0) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                part[(warp * 32 + sub) * R + r] = acc[r];
                if constexpr (GLU) part[(kGemvWarps * 32 + warp * 32 + sub) * R + r] = acc2[r];
            }
        }
        __syncthreads();
        if (ks == 0 && l == 0) {
            for (int j = 1; j < S; ++j) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    acc[r] += part[((warp + j) * 32 + sub) * R + r];
                    if constexpr (GLU) acc2[r] += part[(kGemvWarps * 32 + (warp + j) * 32 + sub) * R + r];
                }
            }
        }
    }
    if (active && l == 0 && ks == 0) {
        const float bias = E.bias ? to_f32(static_cast<const F*>(E.bias)[m]) : 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                const long o = (long)r * E.y_stride + m;
                float v = acc[r] + bias;
                if constexpr (GLU) {
                    if (glu && E.glu == 2) {           // silu(gate) * up in float32, rounded once below
                        v = v * sigmoidf_(v) * acc2[r];
                    } else if (glu) {                  // silu(gate) * up, each rounded as the reference rounds it
                        const float gate = round_act<F>(v);
                        v = round_act<F>(gate * sigmoidf_(gate)) * round_act<F>(acc2[r]);
                    }
                }
                if (E.out_act != 0) v = act_apply(E.out_act, batch.out_f32 ? v : round_act<F>(v));
                if (batch.out_f32) static_cast<float*>(E.y)[o] = v;
                else static_cast<F*>(E.y)[o] = from_f32<F>(v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// v7_pre / v7_post / v7_tmix_one: one block of N threads per (row, head); thread i = channel h*N+i.

template <typename F, int N>
__global__ void __launch_bounds__(N) v7_pre_kernel(int H, const F* __restrict__ k, const F* __restrict__ v,
                                                   const F* __restrict__ wl, const F* __restrict__ al,
                                                   const F* __restrict__ vl, const F* __restrict__ v_first,
                                                   const float* __restrict__ w0, const F* __restrict__ a0,
                                                   const F* __restrict__ k_k, const F* __restrict__ k_a,
                                                   const F* __restrict__ v0, float* __restrict__ w_out,
                                                   F* __restrict__ k_out, F* __restrict__ v_out, F* __restrict__ a_out,
                                                   F* __restrict__ b_out) {
    __shared__ float sh[32];
    const long row = blockIdx.x / H;
    const int h = blockIdx.x % H;
    const int c = h * N + threadIdx.x;
    const long o = row * H * N + c;
    const PreOut p = pre_elem<F, N>(o, c, k, v, wl, al, vl, v_first, w0, a0, k_k, k_a, v0, sh);
    w_out[o] = p.w;
    k_out[o] = from_f32<F>(p.k);
    v_out[o] = from_f32<F>(p.v);
    a_out[o] = from_f32<F>(p.a);
    b_out[o] = from_f32<F>(p.b);
}

template <typename F, int N>
__global__ void __launch_bounds__(N) v7_post_kernel(int H, const float* __restrict__ y, const F* __restrict__ r,
                                                    const F* __restrict__ k, const F* __restrict__ v,
                                                    const F* __restrict__ g, const F* __restrict__ r_k,
                                                    const F* __restrict__ lnw, const F* __restrict__ lnb,
                                                    F* __restrict__ out) {
    __shared__ float sh[32];
    const long row = blockIdx.x / H;
    const int h = blockIdx.x % H;
    const int c = h * N + threadIdx.x;
    const long o = row * H * N + c;
    out[o] = from_f32<F>(post_elem<F, N>(round_act<F>(y[o]), to_f32(r[o]), to_f32(k[o]), to_f32(v[o]),
                                         to_f32(g[o]), c, r_k, lnw, lnb, sh));
}

// STAGE: the state moves between global and shared memory in coalesced float4 rows (thread i then
// takes row i from a padded tile, N + 1 floats per row, no bank conflicts); without it each thread
// reads its own 4*N-byte row directly (fine for few blocks, strided for many: batch > 4).
template <typename F, int N, bool STAGE>
__global__ void __launch_bounds__(N) v7_tmix_one_kernel(
    int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ wl,
    const F* __restrict__ al, const F* __restrict__ g, const F* __restrict__ vl, const F* __restrict__ v_first,
    const float* __restrict__ w0, const F* __restrict__ a0, const F* __restrict__ k_k, const F* __restrict__ k_a,
    const F* __restrict__ v0, const F* __restrict__ r_k, const F* __restrict__ lnw, const F* __restrict__ lnb,
    float* __restrict__ s, F* __restrict__ out) {
    __shared__ float sh[32];
    __shared__ __align__(16) float sw[N], sk[N], sa[N], sb[N], sr[N];
    pdl_trigger();
    {
        const long c0 = (long)(blockIdx.x % H) * N;
        prefetch_l2(s + (long)blockIdx.x * N * N, (long)N * N * sizeof(float));
        prefetch_l2(w0 + c0, N * sizeof(float));
        for (const F* q : {a0, k_k, k_a, v0, r_k, lnw, lnb}) prefetch_l2(q ? q + c0 : nullptr, N * sizeof(F));
    }
    pdl_wait();
    const long bh = blockIdx.x;
    const long row = bh / H;
    const int h = bh % H, i = threadIdx.x;
    const int c = h * N + i;
    const long o = row * H * N + c;
    // state row i (value index) into registers while the inputs are computed
    float S[N];
    float4* srow = reinterpret_cast<float4*>(s + (bh * N + i) * N);
    extern __shared__ float stile[];                 // STAGE: [N][N + 1]
    float4* g4 = reinterpret_cast<float4*>(s + bh * N * N);
    if (STAGE) {
#pragma unroll
        for (int u = 0; u < N / 4; ++u) {            // N*N/4 float4 over N threads, consecutive per warp
            const int e = i + N * u;
            const float4 q = g4[e];
            float* d = stile + (e / (N / 4)) * (N + 1) + (e % (N / 4)) * 4;
            d[0] = q.x; d[1] = q.y; d[2] = q.z; d[3] = q.w;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < N; ++j) S[j] = stile[i * (N + 1) + j];
    } else {
#pragma unroll
        for (int j = 0; j < N / 4; ++j) {
            const float4 q = srow[j];
            S[4 * j] = q.x; S[4 * j + 1] = q.y; S[4 * j + 2] = q.z; S[4 * j + 3] = q.w;
        }
    }
    const PreOut p = pre_elem<F, N>(o, c, k, v, wl, al, vl, v_first, w0, a0, k_k, k_a, v0, sh);
    // the WKV inputs in the activation dtype, as the sequence path passes them
    const float rf = to_f32(r[o]);
    sw[i] = p.w; sk[i] = round_act<F>(p.k); sa[i] = round_act<F>(p.a); sb[i] = round_act<F>(p.b); sr[i] = rf;
    const float vv = round_act<F>(p.v);
    __syncthreads();
    const float yw = wkv7_row_step<N>(S, sw, sk, sa, sb, sr, vv);
    if (STAGE) {
        __syncthreads();
#pragma unroll
        for (int j = 0; j < N; ++j) stile[i * (N + 1) + j] = S[j];
        __syncthreads();
#pragma unroll
        for (int u = 0; u < N / 4; ++u) {
            const int e = i + N * u;
            const float* d = stile + (e / (N / 4)) * (N + 1) + (e % (N / 4)) * 4;
            g4[e] = make_float4(d[0], d[1], d[2], d[3]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < N / 4; ++j) srow[j] = make_float4(S[4 * j], S[4 * j + 1], S[4 * j + 2], S[4 * j + 3]);
    }
    const float y = round_act<F>(yw);
    out[o] = from_f32<F>(post_elem<F, N>(y, rf, sk[i], vv, to_f32(g[o]), c, r_k, lnw, lnb, sh));
}

}  // namespace

int v7_mix_launch(int act, int rows, int T, int C, int n_mix, const void* x, const void* dx, void* x_out,
                  const void* ln_w, const void* ln_b, const void* shift, void* shift_out, const void* mix, void* out,
                  long out_stride, cudaStream_t stream) {
    if (rows == 0) return 0;
    const size_t smem = 2 * (size_t)C * sizeof(float);
    if (smem > 48 * 1024) return kUnsupported;
    cudaError_t err = cudaSuccess;
    if (T == 1 && rows <= kMixOneMaxRows && (x_out == nullptr || (x_out != x && x_out != dx))) {   // decode
        const int slices = std::max(1, std::min(kMixOneMaxSlices, C / kMix1Threads));
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
            err = launch_pdl(v7_mix_one_kernel<F>, rows * slices, kMix1Threads, (size_t)C * sizeof(float), stream, C,
                n_mix, slices, static_cast<const F*>(x), static_cast<const F*>(dx), static_cast<F*>(x_out),
                static_cast<const F*>(ln_w), static_cast<const F*>(ln_b), static_cast<const F*>(shift),
                static_cast<F*>(shift_out), static_cast<const F*>(mix), static_cast<F*>(out), out_stride));
        return launch_rc(err);
    }
    const int vec = act == 0 ? 4 : 8;
    const int iters = (C + kMixVecThreads * vec - 1) / (kMixVecThreads * vec);
    auto al16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
    if (C % vec == 0 && iters <= kMixVecMaxIter && out_stride % vec == 0 &&
        al16(x) && al16(dx) && al16(x_out) && al16(ln_w) && al16(ln_b) && al16(shift) && al16(shift_out) &&
        al16(mix) && al16(out) && (x_out == nullptr || (x_out != x && x_out != dx))) {
        auto go = [&](auto it_tag) {
            constexpr int IT = decltype(it_tag)::value;
            RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
                err = launch_pdl(v7_mix_vec_kernel<F, IT>, rows, kMixVecThreads, 0, stream, T, C, n_mix,
                    static_cast<const F*>(x), static_cast<const F*>(dx), static_cast<F*>(x_out),
                    static_cast<const F*>(ln_w), static_cast<const F*>(ln_b), static_cast<const F*>(shift),
                    static_cast<F*>(shift_out), static_cast<const F*>(mix), static_cast<F*>(out), out_stride));
        };
        if (iters == 1) go(std::integral_constant<int, 1>{});
        else if (iters == 2) go(std::integral_constant<int, 2>{});
        else go(std::integral_constant<int, 4>{});
        return launch_rc(err);
    }
    RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
        err = launch_pdl(v7_mix_kernel<F>, rows, kMixThreads, smem, stream, T, C, n_mix, static_cast<const F*>(x),
            static_cast<const F*>(dx), static_cast<F*>(x_out), static_cast<const F*>(ln_w),
            static_cast<const F*>(ln_b), static_cast<const F*>(shift), static_cast<F*>(shift_out),
            static_cast<const F*>(mix), static_cast<F*>(out), out_stride));
    return launch_rc(err);
}

int gemv_multi_launch(int act, GemvBatch batch, cudaStream_t stream) {
    if (batch.n < 1 || batch.n > kGemvMaxEntries || batch.rows < 1 || batch.rows > kGemvMaxRows) return kUnsupported;
    const int esize = act == 0 ? 4 : 2;
    const int epv = 16 / esize;
    bool vec = true, glu = false;
    int blocks = 0;
    for (int i = 0; i < batch.n; ++i) {
        GemvEntry& E = batch.e[i];
        glu = glu || E.glu != 0;
        const int lanes = (E.N + epv - 1) / epv;
        int lg = 0;
        while ((1 << lg) < lanes && lg < 5) ++lg;
        E.lpr_log2 = lg;
        const int rpw = 32 >> lg;
        const int groups = (E.M + rpw - 1) / rpw;
        // few outputs with long rows: split each dot product over 2..kGemvWarps warps of a block (partial sums
        // through shared memory) while the grid stays under kGemvTargetWarps warps and every warp keeps
        // at least one 16-byte load per lane
        int ks = 0;
        while ((2 << ks) <= kGemvWarps && ((long)groups << (ks + 1)) <= kGemvTargetWarps &&
               (E.N >> (ks + 1)) >= (epv << lg) * kGemvUnroll / 2)
            ++ks;
        E.ks_log2 = ks;
        const int per_block = (kGemvWarps >> ks) * rpw;
        E.block_begin = blocks;
        blocks += (E.M + per_block - 1) / per_block;
        // (with the norm, x comes from shared memory with row stride C: its own pointer and stride do not matter)
        vec = vec && E.N % epv == 0 && reinterpret_cast<uintptr_t>(E.w) % 16 == 0 &&
              (batch.norm.x != nullptr || (E.x_stride % epv == 0 && reinterpret_cast<uintptr_t>(E.x) % 16 == 0)) &&
              (E.glu == 0 ||
               reinterpret_cast<uintptr_t>(E.w_up ? E.w_up : static_cast<const char*>(E.w) + (long)E.M * E.N * esize) %
                       16 == 0);
    }
    const GemvNorm& nm = batch.norm;
    const bool norm = nm.x != nullptr;
    size_t smem = 0;
    if (norm) {
        auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
        smem = (size_t)batch.rows * nm.C * esize;
        // the static arrays (partial sums, the norm's reduction) take up to ~5 KiB of the 48 KiB a launch gets
        // without opting in to more
        bool ok = vec && blocks > 0 && nm.C > 0 && nm.C % epv == 0 && smem <= kGemvNormStageBytes &&
                  (nm.kind == 1 || nm.kind == 2) && (nm.kind == 1 || nm.b != nullptr) && nm.w != nullptr &&
                  aligned(nm.x) && aligned(nm.residual) && aligned(nm.w) && aligned(nm.b) && aligned(nm.shift) &&
                  aligned(nm.h_out) && aligned(nm.xn_out);
        for (int i = 0; i < batch.n; ++i)
            ok = ok && batch.e[i].N == nm.C && batch.e[i].M > 0 && aligned(batch.e[i].mix);
        if (!ok) return kUnsupported;
    }
    if (blocks == 0) return 0;
    cudaError_t err = cudaSuccess;
    auto go = [&](auto glu_tag, auto norm_tag) {
        constexpr bool G = decltype(glu_tag)::value, NM = decltype(norm_tag)::value;
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
            if (NM) {
                err = batch.rows == 1
                          ? launch_pdl(gemv_multi_kernel<F, 1, true, G, true>, blocks, kGemvThreads, smem, stream, batch)
                          : launch_pdl(gemv_multi_kernel<F, kGemvMaxRows, true, G, true>, blocks, kGemvThreads, smem,
                                       stream, batch);
            } else if (batch.rows == 1) {
                err = vec ? launch_pdl(gemv_multi_kernel<F, 1, true, G, false>, blocks, kGemvThreads, 0, stream, batch)
                          : launch_pdl(gemv_multi_kernel<F, 1, false, G, false>, blocks, kGemvThreads, 0, stream, batch);
            } else {
                err = vec ? launch_pdl(gemv_multi_kernel<F, kGemvMaxRows, true, G, false>, blocks, kGemvThreads, 0,
                                       stream, batch)
                          : launch_pdl(gemv_multi_kernel<F, kGemvMaxRows, false, G, false>, blocks, kGemvThreads, 0,
                                       stream, batch);
            });
    };
    if (glu && norm) go(std::true_type{}, std::true_type{});
    else if (glu) go(std::true_type{}, std::false_type{});
    else if (norm) go(std::false_type{}, std::true_type{});
    else go(std::false_type{}, std::false_type{});
    return launch_rc(err);
}

int v7_pre_launch(int act, int rows, int H, int N, const void* k, const void* v, const void* wl, const void* al,
                  const void* vl, const void* v_first, const float* w0, const void* a0, const void* k_k,
                  const void* k_a, const void* v0, float* w_out, void* k_out, void* v_out, void* a_out, void* b_out,
                  cudaStream_t stream) {
    if (rows * H == 0) return 0;
    const bool ok = dispatch_head_size(N, [&](auto n_tag) {
        constexpr int NN = decltype(n_tag)::value;
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
            v7_pre_kernel<F, NN><<<rows * H, NN, 0, stream>>>(H, static_cast<const F*>(k), static_cast<const F*>(v),
                static_cast<const F*>(wl), static_cast<const F*>(al), static_cast<const F*>(vl),
                static_cast<const F*>(v_first), w0, static_cast<const F*>(a0), static_cast<const F*>(k_k),
                static_cast<const F*>(k_a), static_cast<const F*>(v0), w_out, static_cast<F*>(k_out),
                static_cast<F*>(v_out), static_cast<F*>(a_out), static_cast<F*>(b_out)));
    });
    return ok ? (int)cudaGetLastError() : kUnsupported;
}

int v7_post_launch(int act, int rows, int H, int N, const float* y, const void* r, const void* k, const void* v,
                   const void* g, const void* r_k, const void* lnw, const void* lnb, void* out, cudaStream_t stream) {
    if (rows * H == 0) return 0;
    const bool ok = dispatch_head_size(N, [&](auto n_tag) {
        constexpr int NN = decltype(n_tag)::value;
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
            v7_post_kernel<F, NN><<<rows * H, NN, 0, stream>>>(H, y, static_cast<const F*>(r),
                static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(g),
                static_cast<const F*>(r_k), static_cast<const F*>(lnw), static_cast<const F*>(lnb),
                static_cast<F*>(out)));
    });
    return ok ? (int)cudaGetLastError() : kUnsupported;
}

int v7_tmix_one_launch(int act, int B, int H, int N, const void* r, const void* k, const void* v, const void* wl,
                       const void* al, const void* g, const void* vl, const void* v_first, const float* w0,
                       const void* a0, const void* k_k, const void* k_a, const void* v0, const void* r_k,
                       const void* lnw, const void* lnb, float* s, void* out, bool staged, cudaStream_t stream) {
    if (B * H == 0) return 0;
    cudaError_t err = cudaSuccess;
    const bool ok = dispatch_head_size(N, [&](auto n_tag) {
        constexpr int NN = decltype(n_tag)::value;
        constexpr bool kCanStage = NN >= 4 && NN <= 64;   // tile <= 16.3 KB of shared memory
        if (staged && kCanStage) {
            RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
                err = launch_pdl(v7_tmix_one_kernel<F, NN, kCanStage>, B * H, NN, NN * (NN + 1) * sizeof(float), stream, H,
                    static_cast<const F*>(r), static_cast<const F*>(k), static_cast<const F*>(v),
                    static_cast<const F*>(wl), static_cast<const F*>(al), static_cast<const F*>(g),
                    static_cast<const F*>(vl), static_cast<const F*>(v_first), w0, static_cast<const F*>(a0),
                    static_cast<const F*>(k_k), static_cast<const F*>(k_a), static_cast<const F*>(v0),
                    static_cast<const F*>(r_k), static_cast<const F*>(lnw), static_cast<const F*>(lnb), s,
                    static_cast<F*>(out)));
            return;
        }
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
            err = launch_pdl(v7_tmix_one_kernel<F, NN, false>, B * H, NN, 0, stream, H, static_cast<const F*>(r),
                static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(wl),
                static_cast<const F*>(al), static_cast<const F*>(g), static_cast<const F*>(vl),
                static_cast<const F*>(v_first), w0, static_cast<const F*>(a0), static_cast<const F*>(k_k),
                static_cast<const F*>(k_a), static_cast<const F*>(v0), static_cast<const F*>(r_k),
                static_cast<const F*>(lnw), static_cast<const F*>(lnb), s, static_cast<F*>(out)));
    });
    return ok ? launch_rc(err) : kUnsupported;
}

}  // namespace rwkv_chat
