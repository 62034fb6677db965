// Chunked WKV-7 for prefill, CUDA: T tokens in three launches whose work is parallel over chunks.
//
// The math is models/rwkv/chunked.py's wkv7_chunked (the WY form of the generalized delta rule: Yang et al.
// 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", and
// flash-linear-attention's chunked DPLR delta rule). State S [V, K] ([value i, key j]), per token
// S <- S (diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ, y_t = S r_t. Per chunk of L tokens, with the in-chunk decay
// products Γ (log Γ summed directly, never as a difference of large sums):
//   1. prep (one block per batch x head x chunk, all chunks at once): the L x L products
//      M_ab, M_ak (strictly lower) and M_rb, M_rk (lower), the unit-triangular solve
//      (I - M_ab) [W | U_v] = [Γ_{t-1} a | M_ak V], and the chunk's affine transition
//      S_next = S P + D with P = diag(Γ_L) + Wᵀ B', D = U_vᵀ B' + Vᵀ K'; and the output terms
//      Q = Γ r + M_rb W, Y_v = M_rb U_v + M_rk V, so that y = Q S_chunk_startᵀ + Y_v.
//   2. scan (one block per batch x head x 16 value rows; rows of S are independent): the only
//      sequential part, one [16, N] x [N, N] product per chunk; stores each chunk's start state.
//   3. out (one block per batch x head x chunk): y = Q Sᵀ + Y_v.
// All arithmetic in fp32 on the CUDA cores (the sequential kernel's precision class: ~1e-7 relative
// against float64). RWKV-7's decay w = exp(-e^{-1/2} sigmoid(.)) >= 0.545 keeps 1/Γ <= e^{19.4} over
// a chunk of 32, far inside fp32.
#include "../common/cuda_common.cuh"
#include "wkv7_chunk.h"

namespace rwkv_chat {
namespace {

constexpr int kThreads = 256;   // every kernel: 16 x 16 threads

// acc[i][j] += sum_{p<K} A(m, p) B(p, n) for the thread's outputs m = ty + 16 i, n = tx + 16 j.
// A(m, p) = TA ? A[p * lda + m] : A[m * lda + p];  B(p, n) = TB ? B[n * ldb + p] : B[p * ldb + n].
// Shared-memory row strides of 1 (mod 32) words keep every pattern free of bank conflicts.
template <int M, int NN, int K, bool TA, bool TB>
__device__ __forceinline__ void mm_acc(float (&acc)[M / 16][NN / 16], const float* A, int lda, const float* B,
                                       int ldb) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 8
    for (int p = 0; p < K; ++p) {
        float av[M / 16], bv[NN / 16];
#pragma unroll
        for (int i = 0; i < M / 16; ++i) {
            const int m = ty + 16 * i;
            av[i] = TA ? A[p * lda + m] : A[m * lda + p];
        }
#pragma unroll
        for (int j = 0; j < NN / 16; ++j) {
            const int n = tx + 16 * j;
            bv[j] = TB ? B[n * ldb + p] : B[p * ldb + n];
        }
#pragma unroll
        for (int i = 0; i < M / 16; ++i)
#pragma unroll
            for (int j = 0; j < NN / 16; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

template <int M, int NN>
__device__ __forceinline__ void zero(float (&acc)[M / 16][NN / 16]) {
#pragma unroll
    for (int i = 0; i < M / 16; ++i)
#pragma unroll
        for (int j = 0; j < NN / 16; ++j) acc[i][j] = 0.f;
}

template <int L, int N>
constexpr int prep_smem_floats() {
    return 7 * L * (N + 1) + L * (2 * N + 1) + 4 * L * (L + 1) + N;
}

template <typename F, int L, int N>
__global__ void __launch_bounds__(kThreads) wkv7_chunk_prep(int T, int H, int nc, const F* __restrict__ r_,
                                                            const float* __restrict__ w_, const F* __restrict__ k_,
                                                            const F* __restrict__ v_, const F* __restrict__ a_,
                                                            const F* __restrict__ b_, float* __restrict__ P_,
                                                            float* __restrict__ D_, float* __restrict__ Q_,
                                                            float* __restrict__ Yv_) {
    constexpr int SP = N + 1, XP = 2 * N + 1, LP = L + 1;
    extern __shared__ float sm[];
    float* at = sm;               // [L][SP] Γ_{t-1} a_t   (at, rt adjacent: one [2L][SP] operand)
    float* rt = at + L * SP;      //         Γ_t r_t
    float* bh = rt + L * SP;      //         b_t / Γ_t    (bh, kh adjacent)
    float* kh = bh + L * SP;      //         k_t / Γ_t
    float* bp = kh + L * SP;      //         b_t Γ_L / Γ_t
    float* kp = bp + L * SP;      //         k_t Γ_L / Γ_t
    float* vv = kp + L * SP;      //         v_t
    float* X = vv + L * SP;       // [L][XP] [W | U_v] (log w while loading)
    float* Mab = X + L * XP;      // [L][LP]
    float* Mak = Mab + L * LP;
    float* Mrb = Mak + L * LP;
    float* Mrk = Mrb + L * LP;
    float* gL = Mrk + L * LP;     // [N] Γ_L
    const int blk = blockIdx.x, c = blk % nc, bhi = blk / nc, h = bhi % H, b = bhi / H;
    const int tid = threadIdx.x;

    for (int e = tid; e < L * N; e += kThreads) {
        const int t = e / N, j = e % N, tg = c * L + t;
        float rr = 0.f, ww = 1.f, kk = 0.f, vx = 0.f, aa = 0.f, bb = 0.f;   // padding: w = 1, zeros
        if (tg < T) {
            const long o = (((long)b * T + tg) * H + h) * N + j;
            rr = to_f32(r_[o]); ww = w_[o]; kk = to_f32(k_[o]);
            vx = to_f32(v_[o]); aa = to_f32(a_[o]); bb = to_f32(b_[o]);
        }
        const int s = t * SP + j;
        X[s] = logf(ww); rt[s] = rr; kp[s] = kk; vv[s] = vx; at[s] = aa; bp[s] = bb;
    }
    __syncthreads();
    if (tid < N) {   // one key column per thread: prefix and suffix sums of log w, then the scalings
        const int j = tid;
        float lw[L], suf[L];
#pragma unroll
        for (int t = 0; t < L; ++t) lw[t] = X[t * SP + j];
        float acc = 0.f;
#pragma unroll
        for (int t = L - 1; t >= 0; --t) { suf[t] = acc; acc += lw[t]; }
        float pre = 0.f;
#pragma unroll
        for (int t = 0; t < L; ++t) {
            const int s = t * SP + j;
            const float ge = pre, gi = pre + lw[t];
            pre = gi;
            at[s] *= expf(ge);
            rt[s] *= expf(gi);
            const float ei = expf(-gi), et = expf(suf[t]), bb = bp[s], kk = kp[s];
            bh[s] = bb * ei; kh[s] = kk * ei;
            bp[s] = bb * et; kp[s] = kk * et;
        }
        gL[j] = expf(pre);
    }
    __syncthreads();
    const int tx = tid & 15, ty = tid >> 4;
    {   // [at; rt] [bh; kh]ᵀ -> M_ab, M_ak (strict), M_rb, M_rk (inclusive)
        float acc[2 * L / 16][2 * L / 16];
        zero<2 * L, 2 * L>(acc);
        mm_acc<2 * L, 2 * L, N, false, true>(acc, at, SP, bh, SP);
#pragma unroll
        for (int i = 0; i < 2 * L / 16; ++i)
#pragma unroll
            for (int jj = 0; jj < 2 * L / 16; ++jj) {
                const int m = ty + 16 * i, n = tx + 16 * jj, t = m % L, s = n % L;
                const bool a_row = m < L, b_col = n < L;
                const bool keep = a_row ? (s < t) : (s <= t);
                float* M = a_row ? (b_col ? Mab : Mak) : (b_col ? Mrb : Mrk);
                M[t * LP + s] = keep ? acc[i][jj] : 0.f;
            }
    }
    __syncthreads();
    {   // X = [Γ a | M_ak V]
        float acc[L / 16][N / 16];
        zero<L, N>(acc);
        mm_acc<L, N, L, false, false>(acc, Mak, LP, vv, SP);
#pragma unroll
        for (int i = 0; i < L / 16; ++i)
#pragma unroll
            for (int jj = 0; jj < N / 16; ++jj) {
                const int t = ty + 16 * i, n = tx + 16 * jj;
                X[t * XP + N + n] = acc[i][jj];
                X[t * XP + n] = at[t * SP + n];
            }
    }
    __syncthreads();
    if (tid < 2 * N) {   // (I - M_ab) X' = X, forward substitution; columns are independent
        const int col = tid;
        for (int s = 1; s < L; ++s) {
            float x0 = X[s * XP + col], x1 = 0.f;
            int j = 0;
            for (; j + 1 < s; j += 2) {
                x0 = fmaf(Mab[s * LP + j], X[j * XP + col], x0);
                x1 = fmaf(Mab[s * LP + j + 1], X[(j + 1) * XP + col], x1);
            }
            if (j < s) x0 = fmaf(Mab[s * LP + j], X[j * XP + col], x0);
            X[s * XP + col] = x0 + x1;
        }
    }
    __syncthreads();
    const long chunk = (long)bhi * nc + c;
    {   // P = diag(Γ_L) + Wᵀ B'   [K, K]
        float acc[N / 16][N / 16];
        zero<N, N>(acc);
        mm_acc<N, N, L, true, false>(acc, X, XP, bp, SP);
        float* P = P_ + chunk * N * N;
#pragma unroll
        for (int i = 0; i < N / 16; ++i)
#pragma unroll
            for (int jj = 0; jj < N / 16; ++jj) {
                const int m = ty + 16 * i, n = tx + 16 * jj;
                P[m * N + n] = acc[i][jj] + (m == n ? gL[m] : 0.f);
            }
    }
    {   // D = U_vᵀ B' + Vᵀ K'   [V, K]
        float acc[N / 16][N / 16];
        zero<N, N>(acc);
        mm_acc<N, N, L, true, false>(acc, X + N, XP, bp, SP);
        mm_acc<N, N, L, true, false>(acc, vv, SP, kp, SP);
        float* D = D_ + chunk * N * N;
#pragma unroll
        for (int i = 0; i < N / 16; ++i)
#pragma unroll
            for (int jj = 0; jj < N / 16; ++jj) D[(ty + 16 * i) * N + tx + 16 * jj] = acc[i][jj];
    }
    {   // Q = Γ r + M_rb W   [L, K];  Y_v = M_rb U_v + M_rk V   [L, V]
        float q[L / 16][N / 16], yv[L / 16][N / 16];
        zero<L, N>(q);
        zero<L, N>(yv);
        mm_acc<L, N, L, false, false>(q, Mrb, LP, X, XP);
        mm_acc<L, N, L, false, false>(yv, Mrb, LP, X + N, XP);
        mm_acc<L, N, L, false, false>(yv, Mrk, LP, vv, SP);
        float* Q = Q_ + chunk * L * N;
        float* Y = Yv_ + chunk * L * N;
#pragma unroll
        for (int i = 0; i < L / 16; ++i)
#pragma unroll
            for (int jj = 0; jj < N / 16; ++jj) {
                const int t = ty + 16 * i, n = tx + 16 * jj;
                Q[t * N + n] = q[i][jj] + rt[t * SP + n];
                Y[t * N + n] = yv[i][jj];
            }
    }
}

// S <- S P_c + D_c over the chunks, 16 value rows per block; writes each chunk's start state.
template <int N>
__global__ void __launch_bounds__(kThreads) wkv7_chunk_scan(int nc, const float* __restrict__ P_,
                                                            const float* __restrict__ D_, const float* s_,
                                                            float* __restrict__ S_, float* s_out) {
    constexpr int R = 16, SP = N + 1, PER = N * N / kThreads / 4;   // float4 loads of P per thread
    static_assert(PER >= 1, "head size too small for the scan kernel");
    __shared__ __align__(16) float Ps[N * N];
    __shared__ float Ss[R * SP];
    const int bhi = blockIdx.x, row0 = blockIdx.y * R, tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;
    const float* s0 = s_ + ((long)bhi * N + row0) * N;
    for (int e = tid; e < R * N; e += kThreads) Ss[(e / N) * SP + e % N] = s0[e];
    float4 pre[PER];
    const float4* P4 = reinterpret_cast<const float4*>(P_ + (long)bhi * nc * N * N);
#pragma unroll
    for (int q = 0; q < PER; ++q) pre[q] = P4[q * kThreads + tid];
    for (int c = 0; c < nc; ++c) {
        __syncthreads();   // Ss written; the previous product has read Ps
        float4* Pd = reinterpret_cast<float4*>(Ps);
#pragma unroll
        for (int q = 0; q < PER; ++q) Pd[q * kThreads + tid] = pre[q];
        float* Sc = S_ + (((long)bhi * nc + c) * N + row0) * N;
        for (int e = tid; e < R * N; e += kThreads) Sc[e] = Ss[(e / N) * SP + e % N];
        __syncthreads();
        if (c + 1 < nc) {
            const float4* Pn = P4 + (long)(c + 1) * (N * N / 4);
#pragma unroll
            for (int q = 0; q < PER; ++q) pre[q] = Pn[q * kThreads + tid];
        }
        // this chunk's D: loaded before the product, so its latency hides behind the arithmetic
        const float* D = D_ + (((long)bhi * nc + c) * N + row0) * N;
        float acc[R / 16][N / 16];
#pragma unroll
        for (int jj = 0; jj < N / 16; ++jj) acc[0][jj] = D[ty * N + tx + 16 * jj];
        mm_acc<R, N, N, false, false>(acc, Ss, SP, Ps, N);
        __syncthreads();   // every thread has read Ss
#pragma unroll
        for (int jj = 0; jj < N / 16; ++jj) Ss[ty * SP + tx + 16 * jj] = acc[0][jj];
    }
    __syncthreads();
    float* so = s_out + ((long)bhi * N + row0) * N;
    for (int e = tid; e < R * N; e += kThreads) so[e] = Ss[(e / N) * SP + e % N];
}

// y = Q S_cᵀ + Y_v for one chunk.
template <int L, int N>
__global__ void __launch_bounds__(kThreads) wkv7_chunk_out(int T, int H, int nc, const float* __restrict__ Q_,
                                                           const float* __restrict__ Yv_,
                                                           const float* __restrict__ S_, float* __restrict__ y_) {
    constexpr int SP = N + 1;
    __shared__ float Qs[L * SP], Ss[N * SP];
    const int blk = blockIdx.x, c = blk % nc, bhi = blk / nc, h = bhi % H, b = bhi / H, tid = threadIdx.x;
    const long chunk = (long)bhi * nc + c;
    const float* Q = Q_ + chunk * L * N;
    const float* S = S_ + chunk * N * N;
    for (int e = tid; e < L * N; e += kThreads) Qs[(e / N) * SP + e % N] = Q[e];
    for (int e = tid; e < N * N; e += kThreads) Ss[(e / N) * SP + e % N] = S[e];
    __syncthreads();
    float acc[L / 16][N / 16];
    zero<L, N>(acc);
    mm_acc<L, N, N, false, true>(acc, Qs, SP, Ss, SP);
    const float* Y = Yv_ + chunk * L * N;
    const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < L / 16; ++i) {
        const int t = ty + 16 * i, tg = c * L + t;
        if (tg >= T) continue;
        float* yo = y_ + (((long)b * T + tg) * H + h) * N;
#pragma unroll
        for (int jj = 0; jj < N / 16; ++jj) {
            const int n = tx + 16 * jj;
            yo[n] = acc[i][jj] + Y[t * N + n];
        }
    }
}

template <typename F, int L, int N>
int launch(int B, int T, int H, const void* r, const float* w, const void* k, const void* v, const void* a,
           const void* b, const float* s, float* y, float* s_out, float* work, cudaStream_t stream) {
    const int nc = (T + L - 1) / L, BH = B * H;
    float* P = work;
    float* D = P + (long)BH * nc * N * N;
    float* S = D + (long)BH * nc * N * N;
    float* Q = S + (long)BH * nc * N * N;
    float* Yv = Q + (long)BH * nc * L * N;
    constexpr int smem = prep_smem_floats<L, N>() * (int)sizeof(float);
    static bool attr_set = false;   // per instantiation; the attribute is per function, not per stream
    if (!attr_set) {
        const cudaError_t e = cudaFuncSetAttribute(wkv7_chunk_prep<F, L, N>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess) return (int)e;
        attr_set = true;
    }
    wkv7_chunk_prep<F, L, N><<<BH * nc, kThreads, smem, stream>>>(
        T, H, nc, static_cast<const F*>(r), w, static_cast<const F*>(k), static_cast<const F*>(v),
        static_cast<const F*>(a), static_cast<const F*>(b), P, D, Q, Yv);
    wkv7_chunk_scan<N><<<dim3(BH, N / 16), kThreads, 0, stream>>>(nc, P, D, s, S, s_out);
    wkv7_chunk_out<L, N><<<BH * nc, kThreads, 0, stream>>>(T, H, nc, Q, Yv, S, y);
    return (int)cudaGetLastError();
}

}  // namespace

long wkv7_chunk_workspace_floats(int B, int T, int H, int N, int L) {
    const long nc = (T + L - 1) / L;
    return (long)B * H * nc * (3L * N * N + 2L * L * N);
}

int wkv7_chunk_cuda_launch(int act, int B, int T, int H, int N, int L, const void* r, const float* w, const void* k,
                           const void* v, const void* a, const void* b, const float* s, float* y, float* s_out,
                           float* work, cudaStream_t stream) {
    if (B * H == 0 || T == 0) return 0;
    if (N != 64 || (L != 16 && L != 32)) return kUnsupported;
    auto go = [&](auto l_tag) {
        constexpr int LL = decltype(l_tag)::value;
        int rc = 0;
        RWKV_CHAT_DISPATCH_ACT(static_cast<ActType>(act), F,
            rc = (launch<F, LL, 64>(B, T, H, r, w, k, v, a, b, s, y, s_out, work, stream)));
        return rc;
    };
    return L == 16 ? go(std::integral_constant<int, 16>{}) : go(std::integral_constant<int, 32>{});
}

}  // namespace rwkv_chat
