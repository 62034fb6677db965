// The whole RWKV-7 decode step of one token row, every layer, in one persistent launch: a cooperative grid of one
// block per multiprocessor runs the layers' stages in order and meets at a grid-wide barrier between them (five per
// layer), so a small model's step costs one launch instead of six per layer. Formulas: ChatRWKV rwkv/model.py
// (pip rwkv 0.8.32) RWKV_x070_TMix_one / RWKV_x070_CMix_one, as the per-piece kernels of v7_fused.cu compute them
// (the same roundings to the activation dtype; the sums of the products in another order).
//
// Stages of layer i (every block takes a share of each product's output rows, one warp per row, x from shared memory):
//   A  x = round(x + dx); ln1; the six token-shift lerps (every block, into shared memory); r, k, v = W x_{r,k,v},
//      the first low-rank products tanh(w1 x_w), a1 x_a, sigmoid(g1 x_g), v1 x_v
//   B  one block per head: the second low-rank products (wl, al, g, vl of the head's channels, 8 lanes each), the
//      WKV-7 inputs, one state step (state in place, through shared memory), group norm, bonus and gate -> y
//      (v7_tmix_one's math)
//   C  att = Wo y
//   D  x = round(x + att); ln2; the channel-mix lerp; hk = relu(round(Wk x_k))^2
//   E  dx = Wv hk
// The shift states take ln1 / ln2's output and the residual stream is written back by block 0 one stage later, once
// every block has read the old values. Before each barrier a block may request the weights of its rows of the next
// stage (V7StepArgs.prefetch): 1 into L2 (prefetch.global.L2), 2 the first chunk of each warp's first two rows into
// registers (and stage B's into L2). 3 (sm_90+) streams the products' weights through a ring of shared-memory tiles
// instead (weight_ring.cuh): each block takes a contiguous share of each stage's rows, and its next tiles, of this
// stage or the next ones, are in flight while it computes, norms and waits at the barriers.
#include <algorithm>
#include "../common/cuda_common.cuh"
#include "fused_launchers.h"
#include "v7_device.cuh"
#include "weight_ring.cuh"

namespace rwkv_chat {
namespace {

constexpr int kStepThreads = 512;
constexpr int kStepWarps = kStepThreads / 32;
constexpr int kStepN = 64;                   // head size
constexpr int kStepUnroll = 4;               // 16-byte weight loads per lane per row in flight
constexpr size_t kStepStaticSmem = 24 * 1024;   // above the kernel's static shared memory (ptxas: 21.4 KiB)
constexpr long kSpinLimit = 1L << 22;        // barrier polls before giving up (about a second; a broken launch)

template <typename F> __device__ __forceinline__ F ldcg_(const F* p) {
    const unsigned short u = __ldcg(reinterpret_cast<const unsigned short*>(p));
    return *reinterpret_cast<const F*>(&u);
}

// Grid-wide barrier on a counter that only grows: bar[0] counts every arrival of every launch, bar[1] holds its value
// at the end of the last launch (each launch starts from it: target = bar[1] + k * blocks at its k-th barrier, and
// block 0 writes the final target back). Arrival is one release add, the wait one acquire load in a loop, so the
// barrier costs about two trips to L2. Every block's writes before it are visible to every block after it (reads of
// data other blocks wrote go through L2: ld.global.cg). A wait past kSpinLimit polls sets *flag and lets its block go on
// (the step's output is then wrong, and the flag says so); a cooperative launch keeps every block resident, so it
// does not happen in a sound launch.
__device__ __forceinline__ unsigned grid_base(const unsigned* bar) {
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar + 1) : "memory");
    return v;
}

// flag: 0, or the marker (base | 1, nonzero) of a launch where a wait gave up; the later waits of that launch give up
// at once, and the flag stays set for the host (PersistentStep.timed_out) and the launch's end (V7StepArgs.x poisoned).
// The block's last thread: the ring's issuer (its warp takes a tile's rows last, so it is the one most often idle),
// which also runs grid_sync's idle work.
__device__ __forceinline__ bool ring_issuer() { return threadIdx.x == kStepThreads - 1; }

// idle(): run by the ring's issuer while thread 0 waits (work that would otherwise delay the block).
template <typename Idle>
__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned& target, int* flag, int marker, Idle&& idle) {
    __syncthreads();
    target += gridDim.x;
    if (ring_issuer()) idle();
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(bar), "r"(1u) : "memory");
        long spins = 0;
        while (true) {
            unsigned v;
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
            if ((int)(v - target) >= 0) break;
            if (++spins > kSpinLimit) { atomicExch(flag, marker); break; }
            if ((spins & 1023) == 0 && *reinterpret_cast<volatile int*>(flag) == marker) break;   // gave up before
        }
    }
    __syncthreads();
}

// A barrier of the head's 64 threads (threads 0..63 of the block), id 1 (0 is __syncthreads).
__device__ __forceinline__ void head_bar() { asm volatile("bar.sync 1, 64;" ::: "memory"); }

// Sum over the head's 64 threads, summed as block_sum<64> sums (the same bits as v7_tmix_one); sh: 2 floats.
__device__ __forceinline__ float head_sum(float v, float* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    head_bar();
    if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = v;
    head_bar();
    return sh[0] + sh[1];
}

// One product of a stage: rows [M, K] output-major, x (K values in shared memory), y [M]; out_act as gemv_multi's
// (0 none, 1 tanh, 2 sigmoid, 3 relu^2, on the rounded sum).
template <typename F>
struct StepProd {
    const F* w;
    const F* x;
    F* y;
    int M;
    int act;
};

// Thread 0 puts the n (<= 7) products P into the block's table sp (barriers around: sp may still be read).
template <typename F, int NP>
__device__ __forceinline__ void publish(StepProd<F>* sp, const StepProd<F> (&P)[NP], int n) {
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < NP; ++i)
            if (i < n) sp[i] = P[i];
    }
    __syncthreads();
}

// The output rows of the n products P together.
template <typename F>
__device__ __forceinline__ int total_rows(const StepProd<F>* P, int n) {
    int total = 0;
    for (int e = 0; e < n; ++e) total += P[e].M;
    return total;
}

// Row m of product p from its sum: rounded to the activation dtype, then the product's activation.
template <typename F>
__device__ __forceinline__ void store_row(const StepProd<F>& p, int m, float sum) {
    float v = round_act<F>(sum);
    if (p.act != 0) v = act_apply(p.act, v);
    p.y[m] = from_f32<F>(v);
}

template <typename F>
__device__ __forceinline__ int find_prod(const StepProd<F>* P, int n, int& m) {
    int e = 0;
    while (e + 1 < n && m >= P[e].M) { m -= P[e].M; ++e; }
    return e;
}

// Ask L2 for the weights of the rows this warp takes in the products P (the same assignment as run_prods).
template <typename F>
__device__ __forceinline__ void prefetch_prods(const StepProd<F>* P, int n, int K) {
    const int total = total_rows(P, n);
    const int lane = threadIdx.x % 32;
    const int tw = gridDim.x * kStepWarps;
    const long bytes = (long)K * sizeof(F);
    for (int m0 = blockIdx.x * kStepWarps + threadIdx.x / 32; m0 < total; m0 += tw) {
        int m = m0;
        const int e = find_prod(P, n, m);
        const char* row = reinterpret_cast<const char*>(P[e].w + (long)m * K);
        for (long o = (long)lane * 128; o < bytes; o += 32 * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + o));
    }
}

// The first chunk of the weights of a warp's first two rows of the products P (see run_prods), loaded into registers
// ahead of time: before the grid barrier that precedes the stage (weights never change), so after it only the
// x-dependent work and the rest of longer rows remain.
template <typename F>
struct FirstChunk {
    uint4 a[kStepUnroll], b[kStepUnroll];
};

template <typename F>
__device__ __forceinline__ void first_chunk(const StepProd<F>* P, int n, int K, FirstChunk<F>& L) {
    constexpr int EPV = 16 / sizeof(F);
    const int total = total_rows(P, n);
    const int tw = gridDim.x * kStepWarps, lane = threadIdx.x % 32;
    int ma = blockIdx.x * kStepWarps + threadIdx.x / 32, mb = ma + tw;
    const bool ha = ma < total, hb = mb < total;
    const int ea = ha ? find_prod(P, n, ma) : 0;       // (find_prod moves ma / mb into their product)
    const int eb = hb ? find_prod(P, n, mb) : 0;
    const F* wa = ha ? P[ea].w + (long)ma * K : nullptr;
    const F* wb = hb ? P[eb].w + (long)mb * K : nullptr;
#pragma unroll
    for (int u = 0; u < kStepUnroll; ++u) {
        const int k = lane * EPV + u * 32 * EPV;
        L.a[u] = (ha && k < K) ? __ldcs(reinterpret_cast<const uint4*>(wa + k)) : make_uint4(0, 0, 0, 0);
        L.b[u] = (hb && k < K) ? __ldcs(reinterpret_cast<const uint4*>(wb + k)) : make_uint4(0, 0, 0, 0);
    }
}

// The products P (n of them, each K wide) over the grid's warps: warp gw takes rows gw, gw + TW, ... of their
// concatenation, two at a time (their weights in flight together), one lane group of 16-byte loads per row.
// use_pre: take the first chunk from first_chunk's registers pre (loaded for these products).
template <typename F>
__device__ __forceinline__ void run_prods(const StepProd<F>* P, int n, int K, const FirstChunk<F>& pre,
                                          bool use_pre) {
    constexpr int EPV = 16 / sizeof(F);
    union V { uint4 q; F v[EPV]; };
    const int total = total_rows(P, n);
    const int lane = threadIdx.x % 32;
    const int tw = gridDim.x * kStepWarps;
    bool first = true;
    for (int m0 = blockIdx.x * kStepWarps + threadIdx.x / 32; m0 < total; m0 += 2 * tw) {
        int ma = m0, mb = m0 + tw;
        const bool hb = mb < total;
        const int ea = find_prod(P, n, ma);
        const int eb = hb ? find_prod(P, n, mb) : ea;
        if (!hb) mb = ma;
        const F* wa = P[ea].w + (long)ma * K;
        const F* wb = P[eb].w + (long)mb * K;
        const F* xa = P[ea].x;
        const F* xb = P[eb].x;
        float a = 0.f, b = 0.f;
        for (int n0 = lane * EPV; n0 < K; n0 += 32 * EPV * kStepUnroll) {
            V qa[kStepUnroll], qb[kStepUnroll];
            if (first && use_pre) {
#pragma unroll
                for (int u = 0; u < kStepUnroll; ++u) { qa[u].q = pre.a[u]; qb[u].q = pre.b[u]; }
            } else {
#pragma unroll
                for (int u = 0; u < kStepUnroll; ++u) {
                    const int k = n0 + u * 32 * EPV;
                    qa[u].q = k < K ? __ldcs(reinterpret_cast<const uint4*>(wa + k)) : make_uint4(0, 0, 0, 0);
                    qb[u].q = (hb && k < K) ? __ldcs(reinterpret_cast<const uint4*>(wb + k))
                                            : make_uint4(0, 0, 0, 0);
                }
            }
            first = false;
#pragma unroll
            for (int u = 0; u < kStepUnroll; ++u) {
                const int k = n0 + u * 32 * EPV;
                if (k < K) {
                    V x1, x2;
                    x1.q = *reinterpret_cast<const uint4*>(xa + k);
                    x2.q = *reinterpret_cast<const uint4*>(xb + k);
#pragma unroll
                    for (int c = 0; c < EPV; ++c) {
                        a = fmaf(to_f32(x1.v[c]), to_f32(qa[u].v[c]), a);
                        b = fmaf(to_f32(x2.v[c]), to_f32(qb[u].v[c]), b);
                    }
                }
            }
        }
        first = false;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_xor_sync(0xffffffffu, a, o);
            b += __shfl_xor_sync(0xffffffffu, b, o);
        }
        if (lane == 0) {
            store_row(P[ea], ma, a);
            if (hb) store_row(P[eb], mb, b);
        }
    }
}

// x = round(x + dx) (dx nullable) into cur (float, C), its LayerNorm xl = round((x - mean) rstd w + b) into xl, and
// the n_mix lerps round(xl + (shift - xl) mix[m]) into xm[m * C + c]: as v7_mix_one computes them. Every thread.
template <typename F>
__device__ __forceinline__ void norm_mix(const F* x, const F* dx, const F* lnw, const F* lnb, const F* shift,
                                         const F* mix, int n_mix, int C, float* cur, F* xl, F* xm, float* red) {
    const float2 st = residual_ln_stats<F, kStepThreads>(x, dx, C, cur, red, [](const F* p) { return ldcg_(p); });
    const float mean = st.x, rstd = st.y;
    for (int c = threadIdx.x; c < C; c += kStepThreads) {
        const float l = round_act<F>((cur[c] - mean) * rstd * to_f32(lnw[c]) + to_f32(lnb[c]));
        xl[c] = from_f32<F>(l);
        const float d = to_f32(ldcg_(shift + c)) - l;
        for (int m = 0; m < n_mix; ++m) xm[(long)m * C + c] = from_f32<F>(l + d * to_f32(mix[(long)m * C + c]));
    }
    __syncthreads();
}

// Ask L1 for a norm's weight, bias and n_mix lerp vectors ([C] each, the lerps [n_mix, C]) ahead of norm_mix.
template <typename F>
__device__ __forceinline__ void prefetch_norm(const F* lnw, const F* lnb, const F* mix, int n_mix, int C) {
    const long bytes = (long)C * sizeof(F);
    for (long o = (long)threadIdx.x * 128; o < bytes; o += (long)kStepThreads * 128) {
        asm volatile("prefetch.global.L1 [%0];" ::"l"(reinterpret_cast<const char*>(lnw) + o));
        asm volatile("prefetch.global.L1 [%0];" ::"l"(reinterpret_cast<const char*>(lnb) + o));
        for (int m = 0; m < n_mix; ++m)
            asm volatile("prefetch.global.L1 [%0];" ::"l"(reinterpret_cast<const char*>(mix + (long)m * C) + o));
    }
}

// n values of global memory other blocks wrote -> shared memory (every thread; a barrier after).
template <typename F>
__device__ __forceinline__ void stage_in(const F* src, F* dst, int n) {
    for (int i = threadIdx.x; i < n; i += kStepThreads) dst[i] = ldcg_(src + i);
    __syncthreads();
}

template <typename F>
__device__ __forceinline__ const F* slot(const long long* t, int i) { return reinterpret_cast<const F*>(t[i]); }

// Where a layer's products read and write: xm (the stage's input, shared memory) and the scratch buffers.
template <typename F>
struct StepBufs {
    F *xm, *r, *k, *v, *low1, *att, *hk, *dx;
};

// The products of stage s of layer l that stream weights (0: A's r, k, v and first low-rank products, 1: C's output,
// 2: D's channel-mix key, 3: E's value) into P; returns their count and their width K.
template <typename F>
__device__ __forceinline__ int stage_prods(const V7StepArgs& a, const StepBufs<F>& B, int l, int s, StepProd<F>* P,
                                           int& K) {
    const long long* t = a.table + (long)l * kStepSlots;
    const int C = a.C;
    K = s == 3 ? a.ffn : C;
    switch (s) {
        case 0:
            P[0] = {slot<F>(t, kStepWr), B.xm, B.r, C, 0};
            P[1] = {slot<F>(t, kStepWk), B.xm + 2 * C, B.k, C, 0};
            P[2] = {slot<F>(t, kStepWv), B.xm + 3 * C, B.v, C, 0};
            P[3] = {slot<F>(t, kStepW1), B.xm + C, B.low1, a.dw, 1};
            P[4] = {slot<F>(t, kStepA1), B.xm + 4 * C, B.low1 + a.dw, a.da, 0};
            P[5] = {slot<F>(t, kStepG1), B.xm + 5 * C, B.low1 + a.dw + a.da, a.dg, 2};
            P[6] = {slot<F>(t, kStepV1), B.xm + 3 * C, B.low1 + a.dw + a.da + a.dg, a.dv, 0};
            return l > 0 ? 7 : 6;
        case 1: P[0] = {slot<F>(t, kStepWo), B.xm, B.att, C, 0}; return 1;
        case 2: P[0] = {slot<F>(t, kStepFk), B.xm, B.hk, a.ffn, 3}; return 1;
        default: P[0] = {slot<F>(t, kStepFv), B.xm, B.dx, C, 0}; return 1;
    }
}

// This block's contiguous share [lo, hi) of a stage's rows (the products' rows one after another).
__device__ __forceinline__ void block_rows(int total, int& lo, int& hi) {
    lo = (int)((unsigned)total * blockIdx.x / gridDim.x);
    hi = (int)((unsigned)total * (blockIdx.x + 1) / gridDim.x);
}

// The ring tile at row g of a stage's rows: rows m .. m + rows of product e, at most hi - g, as many as a slot holds.
template <typename F>
struct RingTile {
    const F* w;
    int e, m, rows;
};

template <typename F>
__device__ __forceinline__ RingTile<F> tile_at(const StepProd<F>* P, int n, int K, int g, int hi, int slot_bytes) {
    int m = g;
    const int e = find_prod(P, n, m);
    const int per = max(1, slot_bytes / (K * (int)sizeof(F)));
    const int rows = min(min(P[e].M - m, per), hi - g);
    return {P[e].w + (long)m * K, e, m, rows};
}

// The issuer's place in the step's sequence of tiles: layer, stage (0..3 as stage_prods), the stage's products (read
// from the table once, as the cursor enters the stage), the next row of the block's share and its end.
template <typename F>
struct RingCursor {
    int layer, stage, g, hi, n, K;
    bool entered;
    StepProd<F> P[7];
};

// The issuer: the step's next tile, if any is left, into the ring.
template <typename F>
__device__ __forceinline__ void ring_feed(WeightRing& R, RingCursor<F>& c, const V7StepArgs& a, const StepBufs<F>& B) {
    while (c.layer < a.L) {
        if (!c.entered) {
            c.n = stage_prods(a, B, c.layer, c.stage, c.P, c.K);
            int lo;
            block_rows(total_rows(c.P, c.n), lo, c.hi);
            c.g = lo;
            c.entered = true;
        }
        if (c.g < c.hi) {
            const RingTile<F> T = tile_at(c.P, c.n, c.K, c.g, c.hi, R.slot_bytes);
            ring_issue(R, T.w, (unsigned)(T.rows * c.K * (int)sizeof(F)));
            c.g += T.rows;
            return;
        }
        c.entered = false;
        if (++c.stage == 4) { c.stage = 0; ++c.layer; }
    }
}

// Stage s of layer l from the ring: the block's share of the stage's rows, tile by tile, with x from shared memory;
// P: the stage's n products (the block's table, published before the barrier), each K wide. Once every thread is done
// with a slot, the issuer refills it at once while its cursor is still in this stage, else (the next tile belongs to a
// later stage) counts it in `pending`, for the wait at the next grid barrier. A tile of at least 16 rows takes a warp
// per row; a shorter one splits each row's K over 16 / rows warps and sums their parts in a fixed order (part: 16
// floats).
template <typename F>
__device__ __forceinline__ void ring_stage(WeightRing& R, RingCursor<F>& c, int& pending, const V7StepArgs& a,
                                           const StepBufs<F>& B, int l, int s, const StepProd<F>* P, int n, int K,
                                           float* part) {
    constexpr int EPV = 16 / sizeof(F);
    union V { uint4 q; F v[EPV]; };
    int g, hi;
    block_rows(total_rows(P, n), g, hi);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto dot = [&](const F* x, const F* wr, int k0, int step) {
        float acc0 = 0.f, acc1 = 0.f;
        int k = k0;
        for (; k + step < K; k += 2 * step) {
            V x0, w0, x1, w1;
            x0.q = *reinterpret_cast<const uint4*>(x + k);
            w0.q = *reinterpret_cast<const uint4*>(wr + k);
            x1.q = *reinterpret_cast<const uint4*>(x + k + step);
            w1.q = *reinterpret_cast<const uint4*>(wr + k + step);
#pragma unroll
            for (int q = 0; q < EPV; ++q) {
                acc0 = fmaf(to_f32(x0.v[q]), to_f32(w0.v[q]), acc0);
                acc1 = fmaf(to_f32(x1.v[q]), to_f32(w1.v[q]), acc1);
            }
        }
        if (k < K) {
            V x0, w0;
            x0.q = *reinterpret_cast<const uint4*>(x + k);
            w0.q = *reinterpret_cast<const uint4*>(wr + k);
#pragma unroll
            for (int q = 0; q < EPV; ++q) acc0 = fmaf(to_f32(x0.v[q]), to_f32(w0.v[q]), acc0);
        }
        float acc = acc0 + acc1;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        return acc;
    };
    while (g < hi) {
        const RingTile<F> T = tile_at(P, n, K, g, hi, R.slot_bytes);
        const F* w = reinterpret_cast<const F*>(ring_wait(R));
        const StepProd<F> p = P[T.e];
        if (T.rows >= kStepWarps) {
            for (int r = warp; r < T.rows; r += kStepWarps) {
                const float acc = dot(p.x, w + (long)r * K, lane * EPV, 32 * EPV);
                if (lane == 0) store_row(p, T.m + r, acc);
            }
        } else {
            const int parts = kStepWarps / T.rows, r = warp / parts, q = warp % parts;
            if (r < T.rows) {
                const float acc = dot(p.x, w + (long)r * K, (q * 32 + lane) * EPV, parts * 32 * EPV);
                if (lane == 0) part[warp] = acc;
            }
            __syncthreads();
            if (threadIdx.x < T.rows) {
                float acc = 0.f;
                for (int u = 0; u < parts; ++u) acc += part[threadIdx.x * parts + u];
                store_row(p, T.m + threadIdx.x, acc);
            }
        }
        __syncthreads();
        ++R.taken;
        if (ring_issuer()) {
            if (c.layer == l && c.stage == s) ring_feed(R, c, a, B);
            else ++pending;
        }
        g += T.rows;
    }
}

constexpr int kLowLanes = 8;     // lanes per channel in the second low-rank products (64 channels x 8 = 512 threads)
constexpr int kLowChunks = 4;    // 16-byte loads per lane per product issued together (widths up to 256 at once)
constexpr int kTileStride = kStepN + 1;   // the state tile's padded row (no bank conflicts)

// Stage B for head h, every thread of the block (the loop over heads is uniform in the block). The state moves through
// shared memory in coalesced float4 rows; the second low-rank products of the head's 64 channels take 8 lanes per
// channel with all their weights in flight together; threads 0..63 then run v7_tmix_one's math for channel h*64 + i.
// lr: [4][64] floats, tile: [64][65] floats (shared memory).
template <typename F>
__device__ __forceinline__ void head_stage(const V7StepArgs& a, const long long* t, int layer, int h, F* low,
                                           float* lr, float* tile, float* sh, float* sw, float* sk, float* sa,
                                           float* sb, float* sr) {
    constexpr int N = kStepN, EPV = 16 / sizeof(F);
    union V { uint4 q; F v[EPV]; };
    const int tid = threadIdx.x, C = a.C;
    const bool later = layer > 0;
    const int nlow = a.dw + a.da + a.dg + (later ? a.dv : 0);
    F* scr = static_cast<F*>(a.scratch);
    const F* low1 = scr + 3 * C;
    F* vfirst = scr + 3 * C + kStepMaxLow;
    F* y = vfirst + C;
    const int c0 = h * N;
    // the state (N*N floats = N*N/4 float4, kStepThreads threads) and the channel's inputs, requested first
    float4* g4 = reinterpret_cast<float4*>(a.s[layer] + (long)c0 * N);
    constexpr int kStateVec = N * N / 4 / kStepThreads;
    float4 sreg[kStateVec];
#pragma unroll
    for (int u = 0; u < kStateVec; ++u) sreg[u] = __ldcg(g4 + tid + u * kStepThreads);
    float rf = 0.f, kf = 0.f, vfirst_f = 0.f;
    F vraw = from_f32<F>(0.f);
    if (tid < N) {
        const int c = c0 + tid;
        rf = to_f32(ldcg_(scr + c));
        kf = to_f32(ldcg_(scr + C + c));
        vraw = ldcg_(scr + 2 * C + c);
        if (later) vfirst_f = to_f32(ldcg_(vfirst + c));
        for (int sl : {kStepW0, kStepA0, kStepKk, kStepKa, kStepV0, kStepRk, kStepLnxW, kStepLnxB}) {
            const char* q = reinterpret_cast<const char*>(t[sl]);
            if (q) asm volatile("prefetch.global.L1 [%0];" ::"l"(q + (long)c * (sl == kStepW0 ? 4 : (int)sizeof(F))));
        }
    }
    for (int j = tid; j < nlow; j += kStepThreads) low[j] = ldcg_(low1 + j);
    __syncthreads();
    {   // wl, al, g, vl of channel c0 + i: lanes l of 8 split each row
        const int i = tid / kLowLanes, l = tid % kLowLanes;
        const long c = c0 + i;
        const F* w[4] = {slot<F>(t, kStepW2) + c * a.dw, slot<F>(t, kStepA2) + c * a.da,
                         slot<F>(t, kStepG2) + c * a.dg, later ? slot<F>(t, kStepV2) + c * a.dv : nullptr};
        const int d[4] = {a.dw, a.da, a.dg, later ? a.dv : 0};
        const int off[4] = {0, a.dw, a.dw + a.da, a.dw + a.da + a.dg};
        V q[4][kLowChunks];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
#pragma unroll
            for (int u = 0; u < kLowChunks; ++u) {
                const int k = (l + u * kLowLanes) * EPV;
                q[m][u].q = k < d[m] ? __ldg(reinterpret_cast<const uint4*>(w[m] + k)) : make_uint4(0, 0, 0, 0);
            }
        }
        float acc[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            acc[m] = 0.f;
#pragma unroll
            for (int u = 0; u < kLowChunks; ++u) {
                const int k = (l + u * kLowLanes) * EPV;
                if (k < d[m]) {
                    V xq;
                    xq.q = *reinterpret_cast<const uint4*>(low + off[m] + k);
#pragma unroll
                    for (int e = 0; e < EPV; ++e) acc[m] = fmaf(to_f32(xq.v[e]), to_f32(q[m][u].v[e]), acc[m]);
                }
            }
            for (int k = (l + kLowChunks * kLowLanes) * EPV; k < d[m]; k += kLowLanes * EPV) {   // wider rows
                V wq, xq;
                wq.q = __ldg(reinterpret_cast<const uint4*>(w[m] + k));
                xq.q = *reinterpret_cast<const uint4*>(low + off[m] + k);
#pragma unroll
                for (int e = 0; e < EPV; ++e) acc[m] = fmaf(to_f32(xq.v[e]), to_f32(wq.v[e]), acc[m]);
            }
#pragma unroll
            for (int o = kLowLanes / 2; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
        }
        if (l == 0) {
#pragma unroll
            for (int m = 0; m < 4; ++m) lr[m * N + i] = round_act<F>(acc[m]);
        }
    }
#pragma unroll
    for (int u = 0; u < kStateVec; ++u) {
        const int e = tid + u * kStepThreads;
        float* d = tile + (e / (N / 4)) * kTileStride + (e % (N / 4)) * 4;
        d[0] = sreg[u].x; d[1] = sreg[u].y; d[2] = sreg[u].z; d[3] = sreg[u].w;
    }
    __syncthreads();
    if (tid < N) {
        const int i = tid, c = c0 + i;
        if (!later) vfirst[c] = vraw;
        const float vf = to_f32(vraw);
        float S[N];
#pragma unroll
        for (int j = 0; j < N; ++j) S[j] = tile[i * kTileStride + j];
        auto sum = [sh](float x) { return head_sum(x, sh); };
        const PreOut p = pre_vals<F>(kf, vf, lr[i], lr[N + i], later, vfirst_f, later ? lr[3 * N + i] : 0.f, c,
                                     reinterpret_cast<const float*>(t[kStepW0]), slot<F>(t, kStepA0),
                                     slot<F>(t, kStepKk), slot<F>(t, kStepKa), later ? slot<F>(t, kStepV0) : nullptr,
                                     sum);
        sw[i] = p.w; sk[i] = round_act<F>(p.k); sa[i] = round_act<F>(p.a); sb[i] = round_act<F>(p.b); sr[i] = rf;
        const float vv = round_act<F>(p.v);
        head_bar();
        const float yw = round_act<F>(wkv7_row_step<N>(S, sw, sk, sa, sb, sr, vv));
#pragma unroll
        for (int j = 0; j < N; ++j) tile[i * kTileStride + j] = S[j];
        y[c] = from_f32<F>(post_vals<F, N>(yw, rf, sk[i], vv, lr[2 * N + i], c, slot<F>(t, kStepRk),
                                           slot<F>(t, kStepLnxW), slot<F>(t, kStepLnxB), sum));
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kStateVec; ++u) {
        const int e = tid + u * kStepThreads;
        const float* d = tile + (e / (N / 4)) * kTileStride + (e % (N / 4)) * 4;
        g4[e] = make_float4(d[0], d[1], d[2], d[3]);
    }
}

// MODE: V7StepArgs.prefetch when it is 2 (the first weights of each stage in registers before its barrier) or 3 (the
// weights through the shared-memory ring); 0 for 0 and 1 (nothing, or L2 prefetches, chosen at run time).
template <typename F, int MODE>
__global__ void __launch_bounds__(kStepThreads, 1) v7_step_kernel(const __grid_constant__ V7StepArgs a) {
    extern __shared__ __align__(128) unsigned char step_smem[];
    constexpr bool pre = MODE == 2, ring = MODE == 3;
    const int C = a.C, Fd = a.ffn;
    float* cur = reinterpret_cast<float*>(step_smem);                 // [C] the residual stream, float
    F* xl = reinterpret_cast<F*>(cur + C);                            // [C] ln1 / ln2 output
    F* xm = xl + C;                                                   // [6, C] lerps; later y or hk staged
    __shared__ float red[32];
    __shared__ float hsh[2];
    __shared__ StepProd<F> sp[7];
    __shared__ __align__(16) F low[kStepMaxLow];
    __shared__ __align__(16) float sw[kStepN], sk[kStepN], sa[kStepN], sb[kStepN], sr[kStepN];
    __shared__ __align__(16) float lr[4 * kStepN];
    __shared__ __align__(16) float tile[kStepN * kTileStride];
    __shared__ uint64_t ring_full[kRingMaxSlots];
    __shared__ float ring_part[kStepWarps];
    unsigned long long* times = (blockIdx.x == 0 && threadIdx.x == 0) ? a.times : nullptr;
    int mark = 0;
    auto stamp = [&]() {
        if (times) {
            unsigned long long ns;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
            times[mark] = ns;
        }
        ++mark;
    };
    stamp();
    F* x = static_cast<F*>(a.x);
    F* scr = static_cast<F*>(a.scratch);
    F* y = scr + 3 * C + kStepMaxLow + C;
    const StepBufs<F> B = {xm, scr, scr + C, scr + 2 * C, scr + 3 * C, y + C, y + 2 * C, static_cast<F*>(a.dx)};
    const bool first_block = blockIdx.x == 0;
    FirstChunk<F> fc;
    // The products of a stage go into the block's table sp before the barrier that precedes the stage (without the
    // ring, with their first weights requested: into L2 with prefetch 1, into registers with 2).
    auto publish_stage = [&](int l, int st) {
        StepProd<F> P[7];
        int K;
        const int n = stage_prods(a, B, l, st, P, K);
        publish(sp, P, n);
        if constexpr (!ring) {
            if (a.prefetch == 1) prefetch_prods<F>(sp, n, K);
            else if (pre) first_chunk<F>(sp, n, K, fc);
        }
    };
    WeightRing R = {nullptr, ring_full, a.ring_slots, a.ring_slot_bytes, 0u, 0u};
    RingCursor<F> rc;
    rc.layer = rc.stage = 0;
    rc.entered = false;
    int pending = 0;                                                  // the issuer's deferred refills
    auto idle = [&]() {
        if constexpr (ring)
            for (; pending > 0; --pending) ring_feed(R, rc, a, B);
    };
    auto products = [&](int l, int st, int K) {
        const int n = st == 0 ? (l > 0 ? 7 : 6) : 1;
        if constexpr (ring) ring_stage<F>(R, rc, pending, a, B, l, st, sp, n, K, ring_part);
        else run_prods<F>(sp, n, K, fc, pre);
    };
    if constexpr (ring) {
        const size_t base = (size_t)C * sizeof(float) + (size_t)C * sizeof(F) + (size_t)max(6 * C, Fd) * sizeof(F);
        R.buf = step_smem + ((base + 127) & ~(size_t)127);
        ring_init(R);
        __syncthreads();
        if (ring_issuer())
            for (int i = 0; i < R.slots; ++i) ring_feed(R, rc, a, B);
    }
    unsigned target = grid_base(a.bar);
    const int marker = (int)(target | 1u);
    publish_stage(0, 0);
    for (int layer = 0; layer < a.L; ++layer) {
        const long long* t = a.table + (long)layer * kStepSlots;
        const bool later = layer > 0;
        F* att_x = static_cast<F*>(a.att_x[layer]);
        F* ffn_x = static_cast<F*>(a.ffn_x[layer]);
        // A: ln1 + lerps; r, k, v and the first low-rank products
        norm_mix<F>(x, later ? B.dx : nullptr, slot<F>(t, kStepLn1W), slot<F>(t, kStepLn1B), att_x,
                    slot<F>(t, kStepMix6), 6, C, cur, xl, xm, red);
        products(layer, 0, C);
        if (a.prefetch) {                                             // B's rows: the head's low-rank rows + state
            for (int h = blockIdx.x; h < a.H; h += gridDim.x) {
                const long c0 = (long)h * kStepN;
                prefetch_l2(slot<F>(t, kStepW2) + c0 * a.dw, (long)kStepN * a.dw * sizeof(F));
                prefetch_l2(slot<F>(t, kStepA2) + c0 * a.da, (long)kStepN * a.da * sizeof(F));
                prefetch_l2(slot<F>(t, kStepG2) + c0 * a.dg, (long)kStepN * a.dg * sizeof(F));
                if (later) prefetch_l2(slot<F>(t, kStepV2) + c0 * a.dv, (long)kStepN * a.dv * sizeof(F));
                prefetch_l2(a.s[layer] + c0 * kStepN, (long)kStepN * kStepN * sizeof(float));
            }
        }
        grid_sync(a.bar, target, a.flag, marker, idle);
        stamp();
        // B: per head; block 0 puts ln1's output in the shift state and the residual stream in place
        if (first_block) {
            for (int c = threadIdx.x; c < C; c += kStepThreads) { att_x[c] = xl[c]; x[c] = from_f32<F>(cur[c]); }
        }
        for (int h = blockIdx.x; h < a.H; h += gridDim.x)
            head_stage<F>(a, t, layer, h, low, lr, tile, hsh, sw, sk, sa, sb, sr);
        publish_stage(layer, 1);
        grid_sync(a.bar, target, a.flag, marker, idle);
        stamp();
        // C: att = Wo y
        stage_in<F>(y, xm, C);
        products(layer, 1, C);
        publish_stage(layer, 2);
        prefetch_norm(slot<F>(t, kStepLn2W), slot<F>(t, kStepLn2B), slot<F>(t, kStepMixK), 1, C);
        grid_sync(a.bar, target, a.flag, marker, idle);
        stamp();
        // D: ln2 + the channel-mix lerp; hk = relu(Wk x_k)^2
        norm_mix<F>(x, B.att, slot<F>(t, kStepLn2W), slot<F>(t, kStepLn2B), ffn_x, slot<F>(t, kStepMixK), 1, C,
                    cur, xl, xm, red);
        products(layer, 2, C);
        publish_stage(layer, 3);
        grid_sync(a.bar, target, a.flag, marker, idle);
        stamp();
        // E: dx = Wv hk; block 0 puts ln2's output in the shift state and the residual stream in place
        if (first_block) {
            for (int c = threadIdx.x; c < C; c += kStepThreads) { ffn_x[c] = xl[c]; x[c] = from_f32<F>(cur[c]); }
        }
        stage_in<F>(B.hk, xm, Fd);
        products(layer, 3, Fd);
        if (layer + 1 < a.L) {
            publish_stage(layer + 1, 0);
            const long long* tn = t + kStepSlots;
            prefetch_norm(slot<F>(tn, kStepLn1W), slot<F>(tn, kStepLn1B), slot<F>(tn, kStepMix6), 6, C);
        }
        grid_sync(a.bar, target, a.flag, marker, idle);
        stamp();
    }
    if (first_block) {
        if (threadIdx.x == 0) a.bar[1] = target;                    // every block read bar[1] before barrier 1
        if (*reinterpret_cast<volatile int*>(a.flag) == marker)      // a wait gave up: make the output non-finite
            for (int c = threadIdx.x; c < C; c += kStepThreads) x[c] = from_f32<F>(__int_as_float(0x7fc00000));
    }
}

}  // namespace

int v7_step_launch(int act, const V7StepArgs& args_in, int blocks, int* grid_out, cudaStream_t stream) {
    V7StepArgs args = args_in;
    if (args.L < 1 || args.L > kStepMaxLayers || args.C % kStepN != 0 || args.H * kStepN != args.C ||
        args.ffn % 8 != 0 || args.dw % 8 || args.da % 8 || args.dg % 8 || args.dv % 8 || args.dw < 8 || args.da < 8 ||
        args.dg < 8 || args.dv < 8 || args.dw + args.da + args.dg + args.dv > kStepMaxLow || act == 0 ||
        args.prefetch < 0 || args.prefetch > 3)
        return kUnsupported;
    const size_t esize = 2;
    size_t smem = (size_t)args.C * sizeof(float) + (size_t)args.C * esize +
                  std::max((size_t)6 * args.C, (size_t)args.ffn) * esize;
    cudaError_t err = cudaSuccess;
    int dev = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return (int)err;
    int coop = 0, optin = 0;
    cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (!coop || smem + kStepStaticSmem > (size_t)optin) return kUnsupported;
    args.ring_slots = args.ring_slot_bytes = 0;
    if (args.prefetch == 3) {   // the ring: what shared memory is left, in slots of whole rows (a row fits a slot)
        if (!bulk_copy_supported()) return kUnsupported;
        smem = (smem + 127) & ~(size_t)127;
        if (smem + kStepStaticSmem >= (size_t)optin) return kUnsupported;
        const size_t left = (size_t)optin - kStepStaticSmem - smem;
        const size_t row = (size_t)std::max(args.C, args.ffn) * esize;
        const size_t slot = row * std::max<size_t>(1, left / 4 / row);
        const size_t slots = std::min<size_t>(kRingMaxSlots, left / slot);
        if (slots < 2) return kUnsupported;
        args.ring_slots = (int)slots;
        args.ring_slot_bytes = (int)slot;
        smem += slots * slot;
    }
    auto go = [&](auto kernel) -> int {
        if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)) != cudaSuccess)
            return (int)err;
        int per_sm = 0;
        if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kStepThreads, smem)) != cudaSuccess)
            return (int)err;
        if (per_sm < 1) return kUnsupported;
        const int grid = blocks > 0 ? std::min(blocks, device_sm_count()) : device_sm_count();
        if (grid_out) *grid_out = grid;
        return launch_rc(launch_cooperative(kernel, grid, kStepThreads, smem, stream, args));
    };
    if (act == 1) {
        switch (args.prefetch) {
            case 2: return go(v7_step_kernel<__half, 2>);
            case 3: return go(v7_step_kernel<__half, 3>);
            default: return go(v7_step_kernel<__half, 0>);
        }
    }
    switch (args.prefetch) {
        case 2: return go(v7_step_kernel<__nv_bfloat16, 2>);
        case 3: return go(v7_step_kernel<__nv_bfloat16, 3>);
        default: return go(v7_step_kernel<__nv_bfloat16, 0>);
    }
}

}  // namespace rwkv_chat
