// mm8 GEMV with the weights copied to shared memory in bulk (sm_90+), for one row whose block's weights
// fit in shared memory. Formula: the header comment of mm8_cuda.cu. Included by mm8_cuda.cu, whose
// mm8_multi_prepare picks this kernel (Mm8Batch.slab_outs > 0) and fills its geometry.
//
// Each warp owns `outs` (slab_outs) consecutive outputs: their rows of w, outs * N contiguous bytes
// (output-major), are one bulk asynchronous copy started by the warp's lane 0 on the warp's mbarrier. Shares
// up to kSlabPreAll are requested as the block starts, before the programmatic-dependent-launch wait, while
// the previous kernel finishes. Of larger shares, the first half of the block's warps request theirs so, and
// the other half once the block has staged x: requested right after the wait, their bytes queued ahead of
// x's loads (H100, 4096 x 4096: x staged 1.3-2.1 us after the wait; each warp's weights half before and half
// right after the wait 8.15 us a launch, half the warps before and the rest right after the wait 7.98, the
// rest after the staging 7.44; RWKV-7 7.2B layer 95.3 -> 94.8 us). The register
// kernel can keep only two steps in flight per lane and cannot start the next launch's loads while its
// own blocks hold the registers; these blocks hold <= 64 registers per thread and one block's weights
// plus its staged x in shared memory (<= kSlabSmemMax), so a block of the next launch fits next to two
// of this one at 2048 x 2048.
//
// The dependency wait: warp 0 waits and a block barrier releases the others (the previous kernel's
// writes are visible to the whole grid once the wait returns, PTX ISA griddepcontrol; fewer warps
// polling: 2048 x 2048 3.43 -> 3.29 us on an H100). The next launch is released right after it, not as the
// block starts: started early, its blocks' weight requests queue ahead of this launch's x and its
// staging (2048 x 2048 4.60 -> 3.41 us, 3 x 2048 x 2048 7.37 -> 6.04; released later still, after the
// staging, its weights arrive late: 4.00).
//
// After the wait the block stages xr = act(x) * ry (fp32, stage_pos order) and the row constants as the
// register kernel does; each warp then waits for its copy and walks its outputs together: per 16-element
// chunk, four float4 of xr from shared memory serve every output's 16 weight bytes (one 16-byte read
// each, consecutive lanes on consecutive chunks: no bank conflicts); warp-shuffle reduction, fp64
// combination with the row constants, one write per output.
#pragma once

#include "../common/bulk_copy.cuh"
#include "mm8_common.cuh"
#include "mm8_multi.h"

namespace rwkv_chat {
namespace mm8 {

constexpr int kSlabMaxOuts = 4;               // outputs per warp at most
constexpr int kSlabSmemMax = 112 * 1024 + 512; // dynamic shared memory per block at most (2 per multiprocessor)
// A warp's weights above this many bytes: only the first half of the block's warps request theirs before the
// dependency wait (measured on an H100, graph of launches over weight sets > 3x L2, every warp all before ->
// half the warps: 4096 x 4096 and 2048 x 7168 (8 KB a warp) 9.35 -> 7.44 and 7.31 -> 6.65 us; smaller
// shares lose: 3 x 2048 x 2048 (6 KB) 5.95 -> 6.85 with each warp's half after the wait).
constexpr int kSlabPreAll = 6144;
constexpr int kSlabMinN = 512;                 // a warp per output needs 32 lanes x 16 bytes

// Dynamic shared memory of a slab block (byte offsets): kWarps + 1 barriers, staged xr (fp32 [N]),
// ry and my ([N] each, activation dtype of `elem` bytes) and the warps' weight rows ([kWarps][outs][N]).
struct SlabLayout {
    int xr, ry, my, w, bytes;
    __host__ __device__ constexpr SlabLayout(int N, int outs, int elem)
        : xr(128), ry(128 + 4 * N), my(128 + 4 * N + elem * N), w(128 + 4 * N + 2 * elem * N),
          bytes(128 + 4 * N + 2 * elem * N + kWarps * outs * N) {}
};

// OUTS = batch.slab_outs, a compile-time count: every warp walks OUTS rows (those past M read bytes no
// copy wrote and are not written); H100, over a runtime count: 4096 x 4096 7.31 -> 6.95 us, RWKV-7 layer
// shapes 0.1B 13.9 -> 12.7, 1.5B 29.4 -> 28.0, 7.2B 94.6 -> 93.7 us (3 x 2048 x 2048 alone 5.83 -> 6.10).
template <typename F, int OUTS>
__global__ void __launch_bounds__(kThreads, 4) mm8_slab_kernel(Mm8Batch batch) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    int e = 0;
#pragma unroll 1
    while (e + 1 < batch.n && (int)blockIdx.x >= batch.e[e + 1].slab_begin) ++e;
    const Mm8Entry& E = batch.e[e];
    const int N = E.N, M = E.M, act = E.act, outs = OUTS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = ((blockIdx.x - E.slab_begin) * kWarps + warp) * outs;    // the warp's first output
    const int nv = max(0, min(outs, M - m0));                                // of them, those < M
    const int pre = batch.slab_split == 1 || warp < kWarps / 2 ? nv * N : 0;  // bytes copied before the wait

    extern __shared__ __align__(128) unsigned char slab_smem[];
    const SlabLayout lay(N, outs, (int)sizeof(F));
    uint64_t* bars = reinterpret_cast<uint64_t*>(slab_smem);               // [kWarps + 1]
    float4* xs4 = reinterpret_cast<float4*>(slab_smem + lay.xr);            // [N] fp32, stage_pos order
    const F* ry = reinterpret_cast<const F*>(slab_smem + lay.ry);           // [N]
    const F* my = reinterpret_cast<const F*>(slab_smem + lay.my);           // [N]
    const unsigned char* ws = slab_smem + lay.w + (size_t)warp * outs * N;  // [outs][N]
    if (lane == 0) {
        mbarrier_init_one(&bars[warp]);
        mbarrier_arrive_expect(&bars[warp], (unsigned)(nv * N));
        if (pre > 0) bulk_copy_to_shared((void*)ws, E.w + (long)m0 * N, (unsigned)pre, &bars[warp]);
        if (warp == 0) {
            const unsigned bytes = (unsigned)(N * sizeof(F));
            mbarrier_init_one(&bars[kWarps]);
            mbarrier_arrive_expect(&bars[kWarps], 2 * bytes);
            bulk_copy_to_shared((void*)ry, E.ry, bytes, &bars[kWarps]);
            bulk_copy_to_shared((void*)my, E.my, bytes, &bars[kWarps]);
        }
    }
    // lane o keeps output m0 + o's column scales
    float rxm = 0.f, mxm = 0.f;
    if (lane < nv) {
        rxm = to_f32(__ldg(static_cast<const F*>(E.rx) + m0 + lane));
        mxm = to_f32(__ldg(static_cast<const F*>(E.mx) + m0 + lane));
    }
    const F* __restrict__ x = static_cast<const F*>(E.x);
    __syncthreads();                                                          // barriers initialised
    if (warp == 0) pdl_wait();
    __syncthreads();                                                          // the previous kernel is done
    pdl_trigger();                                                            // the next launch, now
    mbarrier_wait(&bars[kWarps], 0);                                          // ry, my in shared memory

    __shared__ double red[kWarps][3];
    float psr[1] = {0.f}, pmy[1] = {0.f}, px[1] = {0.f};
    stage_tile<F, 1, true>(x, ry, my, N, 1, act, 0, N, N, xs4, psr, pmy, px);
    if (lane == 0 && pre < nv * N)                                            // the other half of the warps
        bulk_copy_to_shared((void*)ws, E.w + (long)m0 * N, (unsigned)(nv * N), &bars[warp]);
    reduce_row_constants<1>(psr, pmy, px, red[warp], lane);
    __syncthreads();
    double s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma unroll
    for (int wp = 0; wp < kWarps; ++wp) { s1 += red[wp][0]; s2 += red[wp][1]; s3 += red[wp][2]; }

    mbarrier_wait(&bars[warp], 0);
    float acc[kSlabMaxOuts];
#pragma unroll
    for (int o = 0; o < kSlabMaxOuts; ++o) acc[o] = 0.f;
    const int nch = N >> 4, q4 = N >> 4;
#pragma unroll 2
    for (int L = lane; L < nch; L += 32) {
        float4 xv[4];
#pragma unroll
        for (int qd = 0; qd < 4; ++qd) xv[qd] = xs4[qd * q4 + L];
#pragma unroll
        for (int o = 0; o < kSlabMaxOuts; ++o) {
            if (o < OUTS) {
                const uint4 q = reinterpret_cast<const uint4*>(ws + (size_t)o * N)[L];
                const unsigned wd[4] = {q.x, q.y, q.z, q.w};
                float a = acc[o];
#pragma unroll
                for (int qd = 0; qd < 4; ++qd) {
                    a = fmaf(xv[qd].x, byte_centered(wd[qd], 0), a);
                    a = fmaf(xv[qd].y, byte_centered(wd[qd], 1), a);
                    a = fmaf(xv[qd].z, byte_centered(wd[qd], 2), a);
                    a = fmaf(xv[qd].w, byte_centered(wd[qd], 3), a);
                }
                acc[o] = a;
            }
        }
    }
    F* __restrict__ y = static_cast<F*>(E.y);
#pragma unroll
    for (int o = 0; o < kSlabMaxOuts; ++o) {
        if (o < nv) {
            float v = acc[o];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            const float rx_o = __shfl_sync(0xffffffffu, rxm, o), mx_o = __shfl_sync(0xffffffffu, mxm, o);
            if (lane == 0)
                y[m0 + o] = from_f32<F>((float)((double)rx_o * ((double)v + 128.5 * s1) + s2 + (double)mx_o * s3));
        }
    }
#endif
}

// Slab geometry for a one-row batch: the fewest outputs per warp (<= kSlabMaxOuts) that fit the grid in
// one wave of 2 blocks per multiprocessor with the block's shared memory <= kSlabSmemMax. Sets
// slab_outs, slab_blocks and each entry's slab_begin (entries' outs are the register
// kernel's and stay); leaves slab_outs 0 where no geometry fits or the device has no bulk copies.
inline void slab_prepare(Mm8Batch& batch, int sm_count) {
    batch.slab_outs = 0;
    if (batch.rows != 1 || !bulk_copy_supported()) return;
    int max_n = 0;
    for (int i = 0; i < batch.n; ++i) {
        if (batch.e[i].N < kSlabMinN) return;
        max_n = batch.e[i].N > max_n ? batch.e[i].N : max_n;
    }
    for (int outs = 1; outs <= kSlabMaxOuts; ++outs) {
        if (SlabLayout(max_n, outs, 4).bytes > kSlabSmemMax) return;   // fp32 activations: the widest
        long blocks = 0;
        for (int i = 0; i < batch.n; ++i) blocks += (batch.e[i].M + (long)kWarps * outs - 1) / ((long)kWarps * outs);
        if (blocks > 2L * (sm_count > 0 ? sm_count : 1)) continue;
        batch.slab_outs = outs;
        batch.slab_blocks = (int)blocks;
        batch.slab_split = outs * max_n > kSlabPreAll ? 2 : 1;
        int begin = 0;
        for (int i = 0; i < batch.n; ++i) {
            batch.e[i].slab_begin = begin;
            begin += (batch.e[i].M + kWarps * outs - 1) / (kWarps * outs);
        }
        return;
    }
}

}  // namespace mm8
}  // namespace rwkv_chat
