// gemmq: int4 (and uint8) weight-only GEMM on the tensor cores for decode batches: y [M, N] = x [M, K] @ W,
// W in the GPTQ nibbles of models/formats/i4.py held output-major (Int4Weight.output_major: qweight int32
// [Np, K/8], output n's K nibbles contiguous, eight per word along K, low nibble first), v1 zeros
// (qzeros int32 [K/group, Np/8]), scales float16 [K/group, Np]; declarations in gemvq.h.
//
// The weights are dequantized in registers straight into the operand layout of mma.sync m16n8k16 (the
// tensor cores' B fragment) without a shuffled copy of the weights: the product's k order is permuted
// instead, identically for x, which is cheap because x is small.
//   * A "unit" is 128 values of K. Lane (g, t) = (lane / 4, lane % 4) of a warp owns, in each 8-output tile,
//     output n = g and the four words 4t..4t+3 of the unit (k = 32t .. 32t+31): one 16-byte load. The
//     unit's eight mma steps j = 0..7 read, for the B fragment's two registers, word 4t + 2(j/4) + {0, 1}
//     shifted right by 4(j%4): `lop3` with 0x000F000F puts nibbles j%4 and j%4 + 4 into the mantissas of
//     two halves of magic 1024 (fp16: 0x6400; bf16: 128, 0x4300), exactly 1024 + q. Less 1024 + zero is
//     the exact integer q - z; times the group's scale, one rounding (for fp16 the values of
//     Int4Weight.dequantize; for bf16 the scale is rounded to bf16 first).
//   * So mma step j's k index m (0..15) stands for k = 32t + 16(j/4) + 8(m >= 8) + j%4 + 4(m & 1) with
//     t = (m & 7) / 2: x is staged in shared memory in that order (per row and t, four 16-byte slots;
//     slot 2(j/4) + h holds the pairs (x[.. + j%4], x[.. + j%4 + 4]) for j%4 = 0..3 of half h), made from
//     16-byte loads of x with four byte permutes each, laid out so that each A fragment is one ldmatrix.x4.
//   * A block is NW warps side by side along N (32 outputs each: four 8-output tiles) and MT 16-row tiles
//     of x; each warp's accumulators are [MT][4] mma tiles (float32). Weights (with the unit's scales and
//     zeros) stream through a cp.async ring in shared memory (StageLayout::stages deep); x is prefetched into
//     registers one unit ahead and staged into one of two buffers.
//   * K groups (KG = 1, 2 or 4; 4 warps along N): the block has KG x NW warps; the warps of group k take units
//     u0 + KG i + k of the block's range, each group with its own ring and x buffers, and groups 1..KG-1 add
//     their accumulators into group 0's through shared memory at the end, in group order (more warps a
//     multiprocessor without more K splits and their float32 partials).
//   * Stacks (G >= 1): G matrices of one shape, each with its own x, laid one after another (x [G, M, K], qweight
//     [G, Np, K/8], qzeros [G, K/group, Np/8], scales [G, K/group, Np], y [G, M, N]; an RWKV-7 layer's r, k, v):
//     grid.z runs over G x the row tiles, so one launch fills the GPU with all of them. The uint8 form's stacks:
//     w8 [G, N, K], mx, rx [G, N], my, ry [G, K].
//   * K splits: grid.y splits K into ranges of whole units; with one split the block writes y, with several
//     each writes float32 partials [splits, M, N] and the last split of a tile (a counter per tile, reset
//     by that last split) adds them in split order and writes y: no atomics on y, the sum order is fixed.
//   * relu2: x is taken as relu(x)^2, each value rounded to the activation dtype (the RWKV channel-mix value's
//     input), as it is staged.
//   * uint8 (U8; the reference's i8 weights of models/formats/i8.py, fp16 activations, gemmq_u8_launch): each
//     output's 128 bytes of a unit (ring rows padded to 144 bytes against bank conflicts); lane (g, t) reads bytes
//     32t..32t+31 and builds step (jh, jj)'s B fragment from byte jj of words (4jh, 4jh+1) and (4jh+2, 4jh+3):
//     the int4 k order, so x is staged alike. prmt + lop3 put a byte into the mantissa of fp16 1024; less 1023.5
//     it is q + 0.5 exactly. x is multiplied by ry (fp16) as it is staged and the row sums of x and x my are taken
//     alongside (float32); the epilogue makes acc rx + sum(x my) + sum(x) mx, the reference's
//     (q + 0.5) ry rx + my + mx factored (each K split's part of it, so the split sums add up).
// Requirements (checked by the binding, kUnsupported here): K % 128 == 0, 1 <= M, x rows contiguous; int4: group %
// 128 == 0 and group | K, Np % 8 == 0, N <= Np, x and qweight 16-byte aligned; uint8: x, w8, my, ry 16-byte aligned,
// 1 or 2 K groups.
#include "../common/cuda_common.cuh"
#include "gemvq.h"

namespace rwkv_chat {
namespace {

constexpr int kUnit = 128;                    // K per unit
constexpr int kRowBytes = 4 * 64 + 16;        // one row of staged x: 4 slots x 4 jj x 16 B; +16: ldmatrix rows
                                              // 8 apart fall in distinct bank groups

template <typename F> struct Magic;
template <> struct Magic<__half> {
    static constexpr uint32_t bits = 0x64006400u;   // fp16 1024.0 in both halves
    static constexpr float base = 1024.f;
};
template <> struct Magic<__nv_bfloat16> {
    static constexpr uint32_t bits = 0x43004300u;   // bf16 128.0 in both halves
    static constexpr float base = 128.f;
};

// relu(x)^2 of the two values of `w` (F x 2 bits), each rounded to F once as torch's relu(x).square() rounds it; a NaN
// stays NaN (torch.relu keeps it).
template <typename F> __device__ __forceinline__ uint32_t relu2_pair(uint32_t w) {
    using F2 = typename std::conditional<std::is_same<F, __half>::value, __half2, __nv_bfloat162>::type;
    F2 h = *reinterpret_cast<const F2*>(&w);
    h = __hmax2_nan(h, F2{});
    h = __hmul2(h, h);
    return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename F> __device__ __forceinline__ uint32_t pack2(float v);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float v) {
    const __half2 h = __float2half2_rn(v);
    return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float v) {
    const __nv_bfloat162 h = __float2bfloat162_rn(v);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// (q_lo - z, q_hi - z) * s for the nibble pair (v & 0xF, (v >> 16) & 0xF) of `v`, in F x 2 bits; zz is 1024 + z
// (fp16; for bf16 the negated 128 + z), ss the scale in both halves.
template <typename F>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t v, uint32_t zz, uint32_t ss) {
    uint32_t h;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(h) : "r"(v), "n"(0x000F000F), "n"(Magic<F>::bits));
    uint32_t d;
    if constexpr (std::is_same<F, __half>::value) {
        asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(h), "r"(zz));
        asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(d), "r"(ss));
    } else {   // sm_80 has bf16x2 fma only: h * 1 - (128 + z), then d * s + (-0), each exact or one rounding
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(h), "r"(0x3F803F80u), "r"(zz));
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(d), "r"(ss), "r"(0x80008000u));
    }
    return d;
}

// The pair (a, b) of columns n, n + 1 at p: one paired store where N is even (p then 4- / 8-byte aligned), else one
// by one, b only where `two` (n + 1 < N). F outputs round to F; float partials go to L2 (another block reads them).
template <typename F>
__device__ __forceinline__ void store_pair(F* p, float a, float b, bool even, bool two) {
    if (even) {
        typename std::conditional<std::is_same<F, __half>::value, __half2, __nv_bfloat162>::type v;
        v.x = from_f32<F>(a);
        v.y = from_f32<F>(b);
        *reinterpret_cast<decltype(v)*>(p) = v;
    } else {
        p[0] = from_f32<F>(a);
        if (two) p[1] = from_f32<F>(b);
    }
}
__device__ __forceinline__ void store_pair(float* p, float a, float b, bool even, bool two) {
    if (even) {
        __stcg(reinterpret_cast<float2*>(p), make_float2(a, b));
    } else {
        __stcg(p, a);
        if (two) __stcg(p + 1, b);
    }
}

__device__ __forceinline__ float vadd(float a, float b) { return a + b; }
__device__ __forceinline__ float4 vadd(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
// p[0] + p[step] + ... + p[(splits - 1) step] added in split order (so the sum does not depend on which split came
// last); the loads are issued four at a time, ahead of their additions (the partials are in L2).
template <typename V>
__device__ __forceinline__ V sum_splits(const V* p, long step, int splits) {
    V s = __ldcg(p);
    int sp = 1;
    for (; sp + 4 <= splits; sp += 4) {
        const V a = __ldcg(p + sp * step), b = __ldcg(p + (sp + 1) * step), c = __ldcg(p + (sp + 2) * step),
                d = __ldcg(p + (sp + 3) * step);
        s = vadd(vadd(vadd(vadd(s, a), b), c), d);
    }
    for (; sp < splits; ++sp) s = vadd(s, __ldcg(p + sp * step));
    return s;
}

template <typename F>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same<F, __half>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// cp.async, ldmatrix and the bf16 mma need sm_80: below it the kernel body is empty and the launcher refuses.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define GEMMQ_ARCH_OK 1
#else
#define GEMMQ_ARCH_OK 0
#endif

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
#if GEMMQ_ARCH_OK
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    const int n = pred ? 16 : 0;   // 0 bytes read: the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
#endif
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
#if GEMMQ_ARCH_OK
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    const int n = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(s), "l"(gmem), "r"(n));
#endif
}
__device__ __forceinline__ void cp_commit() {
#if GEMMQ_ARCH_OK
    asm volatile("cp.async.commit_group;");
#endif
}
template <int N> __device__ __forceinline__ void cp_wait() {
#if GEMMQ_ARCH_OK
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

// Shared memory of one block: the weight ring (per stage, int4: words [NW*32 outputs][16], scales [NW*32] fp16,
// zero words [NW*4]; uint8: bytes [NW*32 outputs][128], rows 144 bytes apart) and two x buffers
// [MT*16 rows][kRowBytes].
template <int NW, bool U8 = false> struct StageLayout {
    // cp.async ring depth (units of weights in flight per block): 4, or 3 for 8-warp blocks, whose 4-stage ring with
    // 64 rows of x (102,928 bytes) exceeds the 101,376 bytes a block may have on sm_86 / sm_89 / sm_120, and for
    // uint8 (twice the bytes a unit: 4-warp blocks of one K group then fit those devices at every row tile)
    static constexpr int stages = NW == 8 || U8 ? 3 : 4;
    static constexpr int outs = NW * 32;
    static constexpr int out_bytes = U8 ? 128 : 64;   // one output's weights of a unit
    // their stride in the ring: uint8 rows padded by 16 bytes, so the 16-byte loads of lanes (g, t) at
    // g * 144 + t * 32 fall in distinct banks
    static constexpr int out_stride = U8 ? 144 : 64;
    static constexpr int w_bytes = outs * out_stride;
    static constexpr int s_bytes = U8 ? 0 : outs * 2;
    static constexpr int z_bytes = U8 ? 0 : NW * 4 * 4;
    static constexpr int bytes = w_bytes + s_bytes + z_bytes;   // a multiple of 16
};
template <int NW, int MT, int KG, bool U8 = false> constexpr int gemmq_smem_bytes() {
    return KG * (StageLayout<NW, U8>::stages * StageLayout<NW, U8>::bytes + 2 * MT * 16 * kRowBytes);
}

// uint8: (q_a + 0.5, q_b + 0.5) in fp16 x 2 for byte jj of a and of b (exact: 1024 + q less 1023.5)
template <int JJ> __device__ __forceinline__ uint32_t dequant_u8_pair(uint32_t a, uint32_t b) {
    constexpr uint32_t sel = JJ | (JJ << 4) | ((4 + JJ) << 8) | ((4 + JJ) << 12);   // bytes (a_jj, -, b_jj, -)
    const uint32_t v = __byte_perm(a, b, sel);
    uint32_t h, d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(h) : "r"(v), "n"(0x00FF00FF), "n"(0x64006400));
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(h), "r"(0x63FF63FFu));   // 1023.5 in both halves
    return d;
}

template <typename F, int NW, int MT, int KG, bool U8>
__global__ void __launch_bounds__(NW * 32 * KG) gemmq_kernel(const F* __restrict__ x, const uint32_t* __restrict__ qw,
                                                           const uint32_t* __restrict__ qz,
                                                           const __half* __restrict__ sc, const __half* __restrict__ mxp,
                                                           const __half* __restrict__ rxp,
                                                           const __half* __restrict__ myp,
                                                           const __half* __restrict__ ryp, F* __restrict__ y,
                                                           float* __restrict__ work, int* __restrict__ counters,
                                                           int M, int K, int N, int Np, int group, int units_per_split,
                                                           int G, int relu2) {
#if GEMMQ_ARCH_OK
    static_assert(!U8 || std::is_same<F, __half>::value, "uint8 weights take fp16 activations");
    using L = StageLayout<NW, U8>;
    constexpr int kGroupThreads = NW * 32, kThreads = kGroupThreads * KG, kRows = MT * 16, kStages = L::stages;
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int kg = KG == 1 ? 0 : (tid >> 5) / NW;          // the warp's K group
    const int warp = KG == 1 ? tid >> 5 : (tid >> 5) % NW;  // its place along N
    const int gtid = KG == 1 ? tid : tid % kGroupThreads;   // the thread's index in its group
    unsigned char* ring = smem + kg * (kStages * L::bytes);
    unsigned char* xbuf = smem + KG * kStages * L::bytes + kg * (2 * kRows * kRowBytes);
    // the block's matrix of the stack and its row tile; every pointer moved to that matrix
    const int row_tiles = gridDim.z / G, gm = blockIdx.z / row_tiles;
    x += (long)gm * M * K;
    y += (long)gm * M * N;
    if constexpr (U8) {   // w [G, N, K] bytes, mx / rx [G, N], my / ry [G, K]
        qw += (long)gm * N * (K / 4);
        mxp += (long)gm * N;
        rxp += (long)gm * N;
        myp += (long)gm * K;
        ryp += (long)gm * K;
    } else {
        const long groups = K / group;
        qw += (long)gm * Np * (K / 8);
        qz += (long)gm * groups * (Np / 8);
        sc += (long)gm * groups * Np;
    }
    const int n0 = blockIdx.x * L::outs, row0 = (blockIdx.z - gm * row_tiles) * kRows;
    const int units = K / kUnit, u0 = blockIdx.y * units_per_split;
    const int u1 = min(units, u0 + units_per_split);
    const int kw = K / (U8 ? 4 : 8);             // words per output
    constexpr int kUnitWords = U8 ? kUnit / 4 : kUnit / 8;   // words per output and unit
    constexpr int kOutChunks = L::out_bytes / 16;            // 16-byte chunks per output and unit

    // Per-thread addresses, computed once: thread gtid of a group copies weight chunks c = gtid + i kGroupThreads
    // (output o = c / kOutChunks, 16-byte part c % kOutChunks of the unit's 64 (int4) or 128 (uint8) bytes) and loads
    // x chunks c = gtid + i kGroupThreads (row c / 16, 16-byte chunk c % 16 of the unit's 256 bytes); both strides
    // are constants.
    constexpr int kWChunks = L::outs * kOutChunks / kGroupThreads, kWRowStep = kGroupThreads / kOutChunks;
    constexpr int kXChunks = kRows * 16 / kGroupThreads, kXRowStep = kGroupThreads / 16;
    static_assert(kWChunks * kGroupThreads == L::outs * kOutChunks && kXChunks * kGroupThreads == kRows * 16,
                  "tile and block differ");
    const int w_out = gtid / kOutChunks, w_part = gtid % kOutChunks, x_row = gtid >> 4, x_ch = gtid & 15;
    const uint32_t* wsrc = qw + (long)(n0 + w_out) * kw + w_part * 4;
    const long w_step = (long)kWRowStep * kw;
    const int w_dst = w_out * L::out_stride + w_part * 16;
    const F* xsrc = x + (long)(row0 + x_row) * K + x_ch * 8;
    const int x_dst = x_row * kRowBytes + (x_ch & 3) * 64 + (x_ch >> 2) * 4;
    // the group of unit u: u >> shift where the units per group are a power of two, else a division
    const int upg = group / kUnit, upg_shift = (upg & (upg - 1)) == 0 ? __ffs(upg) - 1 : -1;

    // cp.async of unit u into stage st: the block's outputs' unit slices, and for int4 the scales and zero words.
    auto load_unit = [&](int u, int st) {
        unsigned char* base = ring + st * L::bytes;
#pragma unroll
        for (int i = 0; i < kWChunks; ++i) {
            const bool ok = n0 + w_out + i * kWRowStep < Np;
            cp_async16(base + w_dst + i * kWRowStep * L::out_stride, ok ? wsrc + i * w_step + u * kUnitWords : qw, ok);
        }
        if (!U8 && gtid < L::outs / 8 + NW * 4) {
            const int gi = upg_shift >= 0 ? u >> upg_shift : u / upg;
            if (gtid < L::outs / 8) {            // scales: 8 fp16 per 16 bytes
                const int n = n0 + gtid * 8;
                const bool ok = n < Np;
                cp_async16(base + L::w_bytes + gtid * 16, sc + (ok ? (long)gi * Np + n : 0), ok);
            } else {                             // zero words: 8 outputs each
                const int zi = gtid - L::outs / 8, n = n0 + zi * 8;
                const bool ok = n < Np;
                cp_async4(base + L::w_bytes + L::s_bytes + zi * 4, qz + (ok ? (long)gi * (Np / 8) + n / 8 : 0), ok);
            }
        }
    };

    // x of unit u, this thread's 16-byte chunks, into registers; zero beyond M. uint8: also the chunk's ry and my
    // (one per k, the same for every row of the thread).
    uint4 xr[kXChunks], ry8, my8;
    float rs_x[U8 ? kXChunks : 1], rs_my[U8 ? kXChunks : 1];   // uint8: sums of x and x my of the thread's rows
#pragma unroll
    for (int i = 0; i < (U8 ? kXChunks : 1); ++i) rs_x[i] = rs_my[i] = 0.f;
    auto load_x = [&](int u) {
#pragma unroll
        for (int i = 0; i < kXChunks; ++i) {
            xr[i] = make_uint4(0u, 0u, 0u, 0u);
            if (row0 + x_row + i * kXRowStep < M)
                xr[i] = __ldg(reinterpret_cast<const uint4*>(xsrc + (long)i * kXRowStep * K + u * kUnit));
        }
        if constexpr (U8) {
            ry8 = __ldg(reinterpret_cast<const uint4*>(ryp + u * kUnit + x_ch * 8));
            my8 = __ldg(reinterpret_cast<const uint4*>(myp + u * kUnit + x_ch * 8));
        }
    };
    // Stage the registers into buffer b in the permuted order: chunk ch = 4 t' + slot holds x[32 t' + 8 slot + e],
    // e = 0..7, written as the pairs (e, e + 4), e = jj = 0..3, each at [row][slot][jj][t'] (4 bytes): a 16-byte
    // row of an 8 x 8 ldmatrix tile is the four lanes t' of one (row, slot, jj).
    auto store_x = [&](int b) {
        unsigned char* base = xbuf + b * kRows * kRowBytes + x_dst;
#pragma unroll
        for (int i = 0; i < kXChunks; ++i) {
            uint4 v = xr[i];
            if (relu2) v = make_uint4(relu2_pair<F>(v.x), relu2_pair<F>(v.y), relu2_pair<F>(v.z), relu2_pair<F>(v.w));
            if constexpr (U8) {   // the row sums of x and x my (float32), then x ry staged in fp16
                const uint32_t xs[4] = {v.x, v.y, v.z, v.w}, ms[4] = {my8.x, my8.y, my8.z, my8.w},
                               rs[4] = {ry8.x, ry8.y, ry8.z, ry8.w};
                uint32_t ps[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const __half2 xh = *reinterpret_cast<const __half2*>(&xs[e]);
                    const float2 xf = __half22float2(xh);
                    const float2 mf = __half22float2(*reinterpret_cast<const __half2*>(&ms[e]));
                    rs_x[i] += xf.x + xf.y;
                    rs_my[i] += xf.x * mf.x + xf.y * mf.y;
                    const __half2 p = __hmul2(xh, *reinterpret_cast<const __half2*>(&rs[e]));
                    ps[e] = *reinterpret_cast<const uint32_t*>(&p);
                }
                v = make_uint4(ps[0], ps[1], ps[2], ps[3]);
            }
            uint32_t* o = reinterpret_cast<uint32_t*>(base + i * kXRowStep * kRowBytes);
            o[0] = __byte_perm(v.x, v.z, 0x5410);
            o[4] = __byte_perm(v.x, v.z, 0x7632);
            o[8] = __byte_perm(v.y, v.w, 0x5410);
            o[12] = __byte_perm(v.y, v.w, 0x7632);
        }
    };

    float acc[MT][4][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;

    // group kg takes units u0 + KG it + kg, it = 0 .. iters - 1; every thread passes every barrier (a group whose
    // last unit is past u1 skips that iteration's work only)
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (u0 + s * KG + kg < u1) load_unit(u0 + s * KG + kg, s);
        cp_commit();
    }
    if (u0 + kg < u1) load_x(u0 + kg);

    const float magic = Magic<F>::base;
    const int iters = (u1 - u0 + KG - 1) / KG;
    for (int it = 0; it < iters; ++it) {
        const int u = u0 + it * KG + kg;
        if (KG == 1 || u < u1) store_x(it & 1);
        if (u + KG < u1) load_x(u + KG);
        cp_wait<kStages - 2>();
        __syncthreads();
        if (u + (kStages - 1) * KG < u1) load_unit(u + (kStages - 1) * KG, (it + kStages - 1) % kStages);
        cp_commit();
        if (KG > 1 && u >= u1) continue;

        const unsigned char* st = ring + (it % kStages) * L::bytes;
        const unsigned char* xb = xbuf + (it & 1) * kRows * kRowBytes;
        // int4: this lane's words, zero and scale for each of the warp's four 8-output tiles
        uint4 wq[4];
        uint32_t zz[4], ss[4];
        if constexpr (!U8) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int o = warp * 32 + nt * 8 + g;
                wq[nt] = *reinterpret_cast<const uint4*>(st + o * 64 + t * 16);
                const uint32_t zw =
                    *reinterpret_cast<const uint32_t*>(st + L::w_bytes + L::s_bytes + (warp * 4 + nt) * 4);
                const float z = (float)(((zw >> (4 * g)) + 1u) & 15u);
                const float s = __half2float(*reinterpret_cast<const __half*>(st + L::w_bytes + o * 2));
                zz[nt] = pack2<F>(std::is_same<F, __half>::value ? magic + z : -(magic + z));
                ss[nt] = pack2<F>(s);
            }
        }
#pragma unroll
        for (int jh = 0; jh < 2; ++jh) {
            // B fragments of steps j = 4 jh + jj. int4: (word 2 jh, word 2 jh + 1) >> 4 jj of the lane's four; uint8:
            // bytes jj of words (4 jh, 4 jh + 1) and (4 jh + 2, 4 jh + 3) of its eight (k = 32 t + 4 word + byte, so
            // the k order is the int4 one and x is staged alike)
            uint32_t bf[4][4][2];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                if constexpr (U8) {
                    const int o = warp * 32 + nt * 8 + g;
                    const uint4 w8 = *reinterpret_cast<const uint4*>(st + o * L::out_stride + t * 32 + jh * 16);
                    bf[nt][0][0] = dequant_u8_pair<0>(w8.x, w8.y);
                    bf[nt][0][1] = dequant_u8_pair<0>(w8.z, w8.w);
                    bf[nt][1][0] = dequant_u8_pair<1>(w8.x, w8.y);
                    bf[nt][1][1] = dequant_u8_pair<1>(w8.z, w8.w);
                    bf[nt][2][0] = dequant_u8_pair<2>(w8.x, w8.y);
                    bf[nt][2][1] = dequant_u8_pair<2>(w8.z, w8.w);
                    bf[nt][3][0] = dequant_u8_pair<3>(w8.x, w8.y);
                    bf[nt][3][1] = dequant_u8_pair<3>(w8.z, w8.w);
                } else {
                    const uint32_t w0 = jh ? wq[nt].z : wq[nt].x, w1 = jh ? wq[nt].w : wq[nt].y;
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj) {
                        bf[nt][jj][0] = dequant_pair<F>(w0 >> (4 * jj), zz[nt], ss[nt]);
                        bf[nt][jj][1] = dequant_pair<F>(w1 >> (4 * jj), zz[nt], ss[nt]);
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                // the A fragment of step (jh, jj), tile m, in one ldmatrix.x4: matrix i = lane / 8 is rows
                // m*16 + 8(i & 1) + 0..7 of slot 2 jh + i / 2; lane (g, t) receives word t of row g of each
                const int i = lane >> 3;
                const unsigned char* ra = xb + (m * 16 + (lane & 7) + 8 * (i & 1)) * kRowBytes + (2 * jh + (i >> 1)) * 64;
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    uint32_t a[4];
                    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(ra + jj * 16));
                    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                                 : "r"(addr));
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) mma16816<F>(acc[m][nt], a, bf[nt][jj][0], bf[nt][jj][1]);
                }
            }
        }
    }
    cp_wait<0>();
    // uint8: the row sums of x and x my over this block's K range, per row of the tile and K group, into the first
    // x buffer (every warp is past its last read of it at the barrier)
    float* row_sums = reinterpret_cast<float*>(smem + KG * kStages * L::bytes);   // [KG][2][kRows]
    if constexpr (U8) {
#pragma unroll
        for (int i = 0; i < kXChunks; ++i)
#pragma unroll
            for (int d = 1; d < 16; d <<= 1) {   // the 16 lanes of a row: x_ch = lane % 16
                rs_x[i] += __shfl_xor_sync(0xffffffffu, rs_x[i], d);
                rs_my[i] += __shfl_xor_sync(0xffffffffu, rs_my[i], d);
            }
        static_assert(KG * 2 * kRows * 4 <= 2 * kRows * kRowBytes, "the x buffers hold the row sums");
        __syncthreads();
        if (x_ch == 0) {
#pragma unroll
            for (int i = 0; i < kXChunks; ++i) {
                row_sums[(kg * 2) * kRows + x_row + i * kXRowStep] = rs_x[i];
                row_sums[(kg * 2 + 1) * kRows + x_row + i * kXRowStep] = rs_my[i];
            }
        }
        __syncthreads();
    }
    if constexpr (KG > 1) {   // groups 1..KG-1's accumulators into group 0's, through the (now idle) rings
        __syncthreads();
        constexpr int kAcc = NW * MT * 16 * 32;   // floats of one group's accumulators
        static_assert((KG - 1) * kAcc * 4 <= KG * kStages * L::bytes, "the rings hold the accumulators");
        float* red = reinterpret_cast<float*>(smem) + warp * (MT * 16 * 32) + lane;
        float* flat = &acc[0][0][0];   // [MT][4][4] in order; unrolled, every index is a register
        if (kg > 0) {
#pragma unroll
            for (int i = 0; i < MT * 16; ++i) red[(kg - 1) * kAcc + i * 32] = flat[i];
        }
        __syncthreads();
        if (kg == 0) {
#pragma unroll
            for (int k = 1; k < KG; ++k)
#pragma unroll
                for (int i = 0; i < MT * 16; ++i) flat[i] += red[(k - 1) * kAcc + i * 32];
        }
    }

    // Accumulator element e of tile (m, nt): row m*16 + g + 8 (e >= 2), column nt*8 + 2t + (e & 1). One split
    // writes y; several write float32 partials of their split. With K groups, group 0 holds the sums.
    const int splits = gridDim.y;
    const bool even = (N & 1) == 0;
    // partials [splits, G, M, N]: this block's split and matrix
    float* part = work + ((long)blockIdx.y * G + gm) * M * N;
    if (kg == 0) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    const int r = row0 + m * 16 + g + 8 * hr, n = n0 + warp * 32 + nt * 8 + 2 * t;
                    if (r >= M || n >= N) continue;
                    const long off = (long)r * N + n;
                    float a = acc[m][nt][2 * hr], b = acc[m][nt][2 * hr + 1];
                    if constexpr (U8) {   // the reference's i8 identity: (x ry) @ (q + 0.5) * rx + x @ my + sum(x) mx
                        const int rl = m * 16 + g + 8 * hr;
                        float sx = 0.f, smy = 0.f;
#pragma unroll
                        for (int k = 0; k < KG; ++k) {
                            sx += row_sums[(k * 2) * kRows + rl];
                            smy += row_sums[(k * 2 + 1) * kRows + rl];
                        }
                        a = a * __half2float(rxp[n]) + smy + __half2float(mxp[n]) * sx;
                        if (n + 1 < N) b = b * __half2float(rxp[n + 1]) + smy + __half2float(mxp[n + 1]) * sx;
                    }
                    if (splits == 1)
                        store_pair(y + off, a, b, even, n + 1 < N);
                    else
                        store_pair(part + off, a, b, even, n + 1 < N);
                }
    }
    if (splits == 1) return;
    __threadfence();
    __syncthreads();
    __shared__ int last;
    const int tile = blockIdx.z * gridDim.x + blockIdx.x;
    if (tid == 0) last = atomicAdd(counters + tile, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the tile's outputs, kRows rows x L::outs columns: four columns per thread and step (16-byte loads of the
    // partials) where N % 4 == 0, else one
    const long wg = (long)gm * M * N;   // the matrix's partials of split 0
    if ((N & 3) == 0 && (reinterpret_cast<uintptr_t>(work) & 15) == 0) {
        constexpr int kQuads = kRows * L::outs / 4;
        for (int i = tid; i < kQuads; i += kThreads) {
            const int r = row0 + i / (L::outs / 4), n = n0 + 4 * (i % (L::outs / 4));
            if (r >= M || n >= N) continue;   // N % 4 == 0: n < N holds n + 3 < N too
            const long off = (long)r * N + n;
            const float4 v = sum_splits(reinterpret_cast<const float4*>(work + wg + off), (long)G * M * N / 4, splits);
            store_pair(y + off, v.x, v.y, true, true);
            store_pair(y + off + 2, v.z, v.w, true, true);
        }
    } else {
        constexpr int kOuts = kRows * L::outs;
        for (int i = tid; i < kOuts; i += kThreads) {
            const int r = row0 + i / L::outs, n = n0 + i % L::outs;
            if (r >= M || n >= N) continue;
            const long off = (long)r * N + n;
            y[off] = from_f32<F>(sum_splits(work + wg + off, (long)G * M * N, splits));
        }
    }
    if (tid == 0) counters[tile] = 0;
#endif
}

// The weight tensors of a launch: int4 (qw words, qz, sc) or uint8 (qw the bytes, mx, rx, my, ry fp16).
struct Weights {
    const uint32_t* qw;
    const uint32_t* qz;
    const __half* sc;
    const __half *mx, *rx, *my, *ry;
};

template <typename F, int NW, int MT, int KG, bool U8>
int launch(int G, int M, int K, int N, int Np, int group, int splits, int relu2, const void* x, const Weights& w,
           void* y, float* work, int* counters, cudaStream_t stream) {
    constexpr int smem = gemmq_smem_bytes<NW, MT, KG, U8>();
    if (smem + 16 > device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>()) return kUnsupported;   // + `last`
    // per launch: the attribute belongs to the current device's copy of the function
    const cudaError_t e =
        cudaFuncSetAttribute(gemmq_kernel<F, NW, MT, KG, U8>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
    const int units = K / kUnit;
    const int per = (units + splits - 1) / splits;
    const int used = (units + per - 1) / per;      // every split has at least one unit
    const long tiles_z = (long)G * ((M + MT * 16 - 1) / (MT * 16));
    if (tiles_z > 65535) return kUnsupported;
    const dim3 grid((N + NW * 32 - 1) / (NW * 32), used, (unsigned)tiles_z);
    gemmq_kernel<F, NW, MT, KG, U8><<<grid, NW * 32 * KG, smem, stream>>>(
        static_cast<const F*>(x), w.qw, w.qz, w.sc, w.mx, w.rx, w.my, w.ry, static_cast<F*>(y), work, counters, M, K, N,
        Np, group, per, G, relu2);
    return (int)cudaGetLastError();
}

// Calls f(F{}, NW, MT, KG) with the kernel's instantiation for act, M rows, warps (along N) and K groups: MT = 1,
// 2 or 4 16-row tiles (M <= 16, M <= 32, else); K groups 1 (4 or 8 warps), 2 (4 warps) or 4 (4 warps, up to 32
// rows: four groups of 64-row tiles would need 275 KB of shared memory). kUnsupported for anything else.
template <typename Fn> int with_instance(int act, int M, int warps, int k_groups, Fn&& f) {
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using I4 = std::integral_constant<int, 4>;
    using I8 = std::integral_constant<int, 8>;
    auto by_mt = [&](auto f_tag, auto nw_tag, auto kg_tag) {
        if (M <= 16) return f(f_tag, nw_tag, I1{}, kg_tag);
        if (M <= 32) return f(f_tag, nw_tag, I2{}, kg_tag);
        return f(f_tag, nw_tag, I4{}, kg_tag);
    };
    auto by_nw = [&](auto f_tag) {
        if (warps == 8) return k_groups == 1 ? by_mt(f_tag, I8{}, I1{}) : (int)kUnsupported;
        if (warps != 4) return (int)kUnsupported;
        if (k_groups == 1) return by_mt(f_tag, I4{}, I1{});
        if (k_groups == 2) return by_mt(f_tag, I4{}, I2{});
        if (k_groups != 4 || M > 32) return (int)kUnsupported;
        return M <= 16 ? f(f_tag, I4{}, I1{}, I4{}) : f(f_tag, I4{}, I2{}, I4{});
    };
    if (act == static_cast<int>(ActType::F16)) return by_nw(__half{});
    if (act == static_cast<int>(ActType::BF16)) return by_nw(__nv_bfloat16{});
    return kUnsupported;
}

}  // namespace

int gemmq_i4_launch(int act, int G, int M, int K, int N, int Np, int group, int splits, int warps, int k_groups,
                    int relu2, const void* x, const uint32_t* qweight, const uint32_t* qzeros, const void* scales,
                    void* y, float* work, int* counters, cudaStream_t stream) {
    if (M < 1 || N < 1 || G < 1) return 0;
    if (K % kUnit || group % kUnit || K % group || Np % 8 || N > Np || splits < 1) return kUnsupported;
    if (device_attribute<cudaDevAttrComputeCapabilityMajor>() < 8) return kUnsupported;   // see GEMMQ_ARCH_OK
    const Weights w{qweight, qzeros, static_cast<const __half*>(scales), nullptr, nullptr, nullptr, nullptr};
    return with_instance(act, M, warps, k_groups, [&](auto f_tag, auto nw_tag, auto mt_tag, auto kg_tag) {
        return launch<decltype(f_tag), decltype(nw_tag)::value, decltype(mt_tag)::value, decltype(kg_tag)::value,
                      false>(G, M, K, N, Np, group, splits, relu2, x, w, y, work, counters, stream);
    });
}

int gemmq_u8_launch(int act, int G, int M, int K, int N, int splits, int warps, int k_groups, int relu2, const void* x,
                    const uint8_t* w8, const void* mx, const void* rx, const void* my, const void* ry, void* y,
                    float* work, int* counters, cudaStream_t stream) {
    if (M < 1 || N < 1 || G < 1) return 0;
    if (act != static_cast<int>(ActType::F16) || K % kUnit || splits < 1) return kUnsupported;
    if (device_attribute<cudaDevAttrComputeCapabilityMajor>() < 8) return kUnsupported;   // see GEMMQ_ARCH_OK
    const Weights w{reinterpret_cast<const uint32_t*>(w8), nullptr, nullptr, static_cast<const __half*>(mx),
                    static_cast<const __half*>(rx), static_cast<const __half*>(my), static_cast<const __half*>(ry)};
    return with_instance(act, M, warps, k_groups, [&](auto f_tag, auto nw_tag, auto mt_tag, auto kg_tag) {
        using F = decltype(f_tag);
        constexpr int KG = decltype(kg_tag)::value;
        if constexpr (std::is_same<F, __half>::value && KG <= 2)
            return launch<F, decltype(nw_tag)::value, decltype(mt_tag)::value, KG, true>(
                G, M, K, N, N, K, splits, relu2, x, w, y, work, counters, stream);
        else
            return (int)kUnsupported;
    });
}

int gemmq_blocks_per_sm(int act, int M, int warps, int k_groups, bool u8) {
    if (M < 1 || device_attribute<cudaDevAttrComputeCapabilityMajor>() < 8) return 0;
    if (u8 && act != static_cast<int>(ActType::F16)) return 0;
    const int n = with_instance(act, M, warps, k_groups, [&](auto f_tag, auto nw_tag, auto mt_tag, auto kg_tag) {
        using F = decltype(f_tag);
        constexpr int NW = decltype(nw_tag)::value, MT = decltype(mt_tag)::value, KG = decltype(kg_tag)::value;
        auto query = [&](auto kernel, int smem) {
            if (smem + 16 > device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>()) return 0;
            if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) return 0;
            int blocks = 0;
            if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, NW * 32 * KG, smem) != cudaSuccess)
                return 0;
            return blocks;
        };
        if (!u8) return query(gemmq_kernel<F, NW, MT, KG, false>, gemmq_smem_bytes<NW, MT, KG, false>());
        if constexpr (std::is_same<F, __half>::value && KG <= 2)
            return query(gemmq_kernel<F, NW, MT, KG, true>, gemmq_smem_bytes<NW, MT, KG, true>());
        return 0;
    });
    return n > 0 ? n : 0;
}

}  // namespace rwkv_chat
