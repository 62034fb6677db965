// gemm_tuned: c = a @ b through cuBLASLt with the algorithm chosen per shape by timing, for the products of
// decode steps of many rows (batch > 4), where cuBLAS's heuristic pick reads the weights well below the copy
// bandwidth (H100, RWKV-7 7.2B at batch 64: the 4096 x 4096 products at ~65% of copy with one 64x32-tile CTA
// per multiprocessor). The same idea as BlinkDL's Albatross engine ("cuBLASLt tuned per shape").
//
// a [batch, rows, K] or [rows, K] (contiguous, fp16/bf16); b [batch, K, M] / [K, M] of a's dtype, each matrix
// row-major or the transpose of a row-major [M, K] (a weight stored [out, in] viewed with .t()); c [batch, rows,
// M] / [rows, M] contiguous in a's dtype or fp32. fp32 accumulation (CUBLAS_COMPUTE_32F), alpha 1, beta 0.
// Row-major C = A B is computed as column-major C^T = B^T A^T (as gemm_cuda.cpp).
//
// The first call of a shape (per device, dtypes, layout and buffer alignments) outside CUDA-graph capture asks
// cuBLASLt for up to kCandidates algorithms that fit PyTorch's cuBLASLt workspace of this stream, and times each
// (the fastest of kTimedRuns runs after kWarmRuns untimed ones), the L2 cache flushed before every timed run (a
// weight that fits in L2 would otherwise time as if it streamed from L2); another algorithm replaces the
// heuristic's first pick only when it is kMinGain faster. Later calls, and calls inside a capture, run the kept
// choice; a first call inside a capture takes the heuristic's first pick and keeps nothing. Where cuBLASLt offers
// nothing, or its algorithm fails, plain cuBLAS (gemm_cuda.cpp) computes the product. gemm_tuned_stats_cuda()
// reports every kept choice.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/version.h>

#include <stdint.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace rwkv_chat {

void gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);  // gemm_cuda.cpp

namespace {

constexpr int kCandidates = 32;
constexpr int kWarmRuns = 3;
constexpr int kTimedRuns = 5;
constexpr float kMinGain = 0.03f;             // another algorithm must beat the heuristic's first pick by 3%
constexpr size_t kFlushBytes = 128u << 20;   // > 2x the L2 of an H100 (50 MiB) or H200

// dev, batch, rows, K, M, b_t, a's and c's data types, the pointers' alignments (bytes, <= 256, as one number)
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, bool, int, int, uint32_t>;

struct Choice {
    cublasLtMatmulAlgo_t algo;
    float us_first;   // the heuristic's first pick (us per call; < 0: not timed)
    float us_best;    // the kept algorithm
    int index;        // of the kept algorithm in the heuristic's list
    int count;        // algorithms timed
    bool cublas;      // every candidate failed: plain cuBLAS (gemm_cuda) serves this shape
};

std::mutex g_mu;
std::map<Key, Choice> g_choices;

cudaDataType_t dtype_of(const at::Tensor& t) {
    switch (t.scalar_type()) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
    }
}

#define LT_OK(expr) (static_cast<cublasStatus_t>(expr) == CUBLAS_STATUS_SUCCESS)

// The matmul and layout descriptors of one shape; destroyed with the object.
struct Descs {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t A = nullptr, B = nullptr, C = nullptr;
    bool ok = false;
    Descs(int64_t batch, int64_t rows, int64_t K, int64_t M, bool b_t, cudaDataType_t ta, cudaDataType_t tc) {
        const cublasOperation_t opa = b_t ? CUBLAS_OP_T : CUBLAS_OP_N, opb = CUBLAS_OP_N;
        ok = LT_OK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F)) &&
             LT_OK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa))) &&
             LT_OK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb))) &&
             // "A" = b in column-major terms: [M, K] (ld M) as stored, or [K, M] (ld K) transposed
             LT_OK(cublasLtMatrixLayoutCreate(&A, ta, b_t ? K : M, b_t ? M : K, b_t ? K : M)) &&
             LT_OK(cublasLtMatrixLayoutCreate(&B, ta, K, rows, K)) &&      // "B" = a: [K, rows], ld K
             LT_OK(cublasLtMatrixLayoutCreate(&C, tc, M, rows, M));        // c: [M, rows], ld M
        if (ok && batch > 1) {
            const int32_t n = static_cast<int32_t>(batch);
            const int64_t sa = K * M, sb = rows * K, sc = rows * M;
            ok = LT_OK(cublasLtMatrixLayoutSetAttribute(A, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &n, sizeof(n))) &&
                 LT_OK(cublasLtMatrixLayoutSetAttribute(A, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sa, sizeof(sa))) &&
                 LT_OK(cublasLtMatrixLayoutSetAttribute(B, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &n, sizeof(n))) &&
                 LT_OK(cublasLtMatrixLayoutSetAttribute(B, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sb, sizeof(sb))) &&
                 LT_OK(cublasLtMatrixLayoutSetAttribute(C, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &n, sizeof(n))) &&
                 LT_OK(cublasLtMatrixLayoutSetAttribute(C, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sc, sizeof(sc)));
        }
    }
    ~Descs() {
        if (C) cublasLtMatrixLayoutDestroy(C);
        if (B) cublasLtMatrixLayoutDestroy(B);
        if (A) cublasLtMatrixLayoutDestroy(A);
        if (op) cublasLtMatmulDescDestroy(op);
    }
    Descs(const Descs&) = delete;
    Descs& operator=(const Descs&) = delete;
};

cublasStatus_t run(cublasLtHandle_t h, const Descs& d, const cublasLtMatmulAlgo_t* algo, const at::Tensor& a,
                   const at::Tensor& b, const at::Tensor& c, void* ws, size_t ws_bytes, cudaStream_t stream) {
    const float alpha = 1.f, beta = 0.f;
    return cublasLtMatmul(h, d.op, &alpha, b.data_ptr(), d.A, a.data_ptr(), d.B, &beta, c.data_ptr(), d.C,
                          c.data_ptr(), d.C, algo, ws, ws_bytes, stream);
}

// The fastest of kTimedRuns runs of `algo` (us), each after an L2 flush, after kWarmRuns untimed ones; < 0 when
// anything fails (the CUDA errors it caused are cleared; the caller checked that none was pending before).
float time_algo(cublasLtHandle_t h, const Descs& d, const cublasLtMatmulAlgo_t& algo, const at::Tensor& a,
                const at::Tensor& b, const at::Tensor& c, void* ws, size_t ws_bytes, const at::Tensor& flush,
                cudaStream_t stream) {
    for (int i = 0; i < kWarmRuns; ++i)
        if (run(h, d, &algo, a, b, c, ws, ws_bytes, stream) != CUBLAS_STATUS_SUCCESS) {
            cudaGetLastError();
            return -1.f;
        }
    cudaEvent_t ev[2 * kTimedRuns];
    int made = 0;
    bool ok = true;
    for (; made < 2 * kTimedRuns && ok; ++made) ok = cudaEventCreate(&ev[made]) == cudaSuccess;
    if (!ok) --made;
    for (int i = 0; i < kTimedRuns && ok; ++i) {
        ok = cudaMemsetAsync(flush.data_ptr(), i, flush.numel(), stream) == cudaSuccess &&
             cudaEventRecord(ev[2 * i], stream) == cudaSuccess &&
             run(h, d, &algo, a, b, c, ws, ws_bytes, stream) == CUBLAS_STATUS_SUCCESS &&
             cudaEventRecord(ev[2 * i + 1], stream) == cudaSuccess;
    }
    float best = -1.f;
    if (ok && cudaStreamSynchronize(stream) == cudaSuccess) {
        for (int i = 0; i < kTimedRuns && ok; ++i) {
            float ms = 0.f;
            ok = cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]) == cudaSuccess && ms > 0.f;
            if (ok && (best < 0.f || ms < best)) best = ms;
        }
    } else {
        ok = false;
    }
    for (int i = 0; i < made; ++i) cudaEventDestroy(ev[i]);
    if (!ok) {
        cudaGetLastError();
        return -1.f;
    }
    return best * 1000.f;
}

// The largest power of two (<= 256) dividing the address: cuBLASLt's heuristic assumes 256-byte aligned buffers
// unless told otherwise (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES).
uint32_t alignment(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    uint32_t al = 256;
    while (al > 1 && (a % al) != 0) al >>= 1;
    return al;
}

// Whether `stream` is capturing a CUDA graph (an error asking counts as capturing: no timing then).
bool capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &st) != cudaSuccess) {
        cudaGetLastError();
        return true;
    }
    return st != cudaStreamCaptureStatusNone;
}

// Plain cuBLAS, one matrix at a time: where cuBLASLt has no algorithm, or the one kept fails.
void fallback(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    if (a.dim() == 2) {
        gemm_cuda(a, b, c);
        return;
    }
    for (int64_t i = 0; i < a.size(0); ++i) gemm_cuda(a[i], b[i], c[i]);
}

// The candidates cuBLASLt's heuristic offers for `d` (at most kCandidates), for buffers of these alignments and a
// workspace of ws_bytes; empty where it offers none.
std::vector<cublasLtMatmulHeuristicResult_t> candidates(cublasLtHandle_t h, const Descs& d, size_t ws_bytes,
                                                        uint32_t al_a, uint32_t al_b, uint32_t al_c) {
    cublasLtMatmulPreference_t pref = nullptr;
    std::vector<cublasLtMatmulHeuristicResult_t> res(kCandidates);
    int n = 0;
    const uint64_t ws64 = ws_bytes;
    const bool found = LT_OK(cublasLtMatmulPreferenceCreate(&pref)) &&
        LT_OK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws64, sizeof(ws64))) &&
        LT_OK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a))) &&
        LT_OK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b))) &&
        LT_OK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c))) &&
        LT_OK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c))) &&
        LT_OK(cublasLtMatmulAlgoGetHeuristic(h, d.op, d.A, d.B, d.C, d.C, pref, kCandidates, res.data(), &n));
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    res.resize(found ? std::max(n, 0) : 0);
    std::vector<cublasLtMatmulHeuristicResult_t> ok;
    for (const auto& r : res)
        if (r.state == CUBLAS_STATUS_SUCCESS && r.workspaceSize <= ws_bytes) ok.push_back(r);
    return ok;
}

}  // namespace

void gemm_tuned_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    const char* op = "rwkv_chat::gemm_tuned_cuda";
    TORCH_CHECK(a.is_cuda() && b.is_cuda() && c.is_cuda(), op, ": tensors must be on CUDA");
    TORCH_CHECK(a.get_device() == b.get_device() && a.get_device() == c.get_device(), op, ": tensors on different devices");
    TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16, op, ": a must be fp16 or bf16, got ",
                a.scalar_type());
    TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b dtype ", b.scalar_type(), " differs from a's ", a.scalar_type());
    TORCH_CHECK(c.scalar_type() == a.scalar_type() || c.scalar_type() == at::kFloat, op, ": c must be a's dtype or fp32");
    TORCH_CHECK((a.dim() == 2 || a.dim() == 3) && b.dim() == a.dim() && c.dim() == a.dim(), op,
                ": a, b, c must all be 2-D or all 3-D (batched)");
    const bool batched = a.dim() == 3;
    const int64_t batch = batched ? a.size(0) : 1;
    const int64_t rows = a.size(-2), K = a.size(-1), M = b.size(-1);
    TORCH_CHECK(b.size(-2) == K && c.size(-2) == rows && c.size(-1) == M && (!batched || (b.size(0) == batch &&
                c.size(0) == batch)), op, ": shapes ", a.sizes(), " @ ", b.sizes(), " -> ", c.sizes(), " do not match");
    // b: each matrix row-major [K, M] or the transpose of a row-major [M, K], the batch stride one matrix
    const bool b_rm = b.stride(-1) == 1 && b.stride(-2) == M;
    const bool b_t = !b_rm && b.stride(-2) == 1 && b.stride(-1) == K;
    TORCH_CHECK(a.is_contiguous() && c.is_contiguous() && (b_rm || b_t) && (!batched || b.stride(0) == K * M), op,
                ": contiguous a and c expected, and b row-major or a transposed row-major matrix per batch entry");
    if (rows == 0 || M == 0 || batch == 0) return;
    if (K == 0) { c.zero_(); return; }
    const at::cuda::OptionalCUDAGuard guard(a.device());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    cublasLtHandle_t h = at::cuda::getCurrentCUDABlasLtHandle();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
    // PyTorch's own cuBLASLt workspace for this handle and stream (safe under graph capture, never shared with
    // another stream's work in flight)
    void* ws = at::cuda::getCUDABlasLtWorkspace();
    const size_t ws_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
#else
    // older torch exposes no cuBLASLt workspace: algorithms that need none
    void* ws = nullptr;
    const size_t ws_bytes = 0;
#endif
    const cudaDataType_t ta = dtype_of(a), tc = dtype_of(c);
    const Descs d(batch, rows, K, M, b_t, ta, tc);
    if (!d.ok) return fallback(a, b, c);
    const uint32_t al_a = alignment(b.data_ptr()), al_b = alignment(a.data_ptr()), al_c = alignment(c.data_ptr());
    const Key key{a.get_device(), batch, rows, K, M, b_t, (int)ta, (int)tc, al_a | (al_b << 9) | (al_c << 18)};

    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_choices.find(key);
    if (it == g_choices.end()) {
        const auto res = candidates(h, d, ws_bytes, al_a, al_b, al_c);
        const bool tune = !res.empty() && !capturing(stream) && cudaPeekAtLastError() == cudaSuccess;
        if (!tune) {                  // nothing offered, a capture, or someone's error pending: decide nothing now
            if (res.empty() || run(h, d, &res[0].algo, a, b, c, ws, ws_bytes, stream) != CUBLAS_STATUS_SUCCESS)
                fallback(a, b, c);
            return;
        }
        at::Tensor flush;
        try {
            flush = at::empty({(int64_t)kFlushBytes}, at::TensorOptions().dtype(at::kByte).device(a.device()));
        } catch (const c10::Error&) {  // no room to flush the L2: keep the heuristic's first pick untimed
        }
        Choice best{res[0].algo, -1.f, -1.f, 0, 0, false};
        for (int i = 0; flush.defined() && i < (int)res.size(); ++i) {
            const float us = time_algo(h, d, res[i].algo, a, b, c, ws, ws_bytes, flush, stream);
            if (us < 0.f) continue;
            ++best.count;
            if (i == 0) best.us_first = us;
            // another algorithm replaces the first pick only when it is kMinGain faster
            const float bar = best.index == 0 && best.us_best >= 0.f ? best.us_best * (1.f - kMinGain) : best.us_best;
            if (best.us_best < 0.f || us < bar) {
                best.algo = res[i].algo;
                best.us_best = us;
                best.index = i;
            }
        }
        if (best.count == 0 && flush.defined()) best.cublas = true;   // every candidate failed: plain cuBLAS
        it = g_choices.emplace(key, best).first;
    }
    if (it->second.cublas || run(h, d, &it->second.algo, a, b, c, ws, ws_bytes, stream) != CUBLAS_STATUS_SUCCESS)
        fallback(a, b, c);
}

// Every kept choice as float64 [n, 9]: device, batch, rows, K, M, us of the heuristic's first pick, us of the kept
// algorithm, its index in the heuristic's list, algorithms timed.
at::Tensor gemm_tuned_stats_cuda() {
    std::lock_guard<std::mutex> lock(g_mu);
    at::Tensor out = at::empty({(int64_t)g_choices.size(), 9}, at::TensorOptions().dtype(at::kDouble));
    auto o = out.accessor<double, 2>();
    int64_t r = 0;
    for (const auto& [k, ch] : g_choices) {
        o[r][0] = std::get<0>(k); o[r][1] = (double)std::get<1>(k); o[r][2] = (double)std::get<2>(k);
        o[r][3] = (double)std::get<3>(k); o[r][4] = (double)std::get<4>(k);
        o[r][5] = ch.us_first; o[r][6] = ch.us_best; o[r][7] = ch.index; o[r][8] = ch.count;
        ++r;
    }
    return out;
}

}  // namespace rwkv_chat
