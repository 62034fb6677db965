// Host-side launchers of the fused RWKV-7 kernels (csrc/fused/v7_fused.cu). Pointers are raw device
// pointers of contiguous tensors; `act` is an ActType code (0 fp32, 1 fp16, 2 bf16) naming the
// activation dtype behind the `void*` arguments. Each launcher returns a cudaError_t value (0 on
// success) or kUnsupported when the shape has no kernel.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/launchers.h"

namespace rwkv_chat {

constexpr int kGemvMaxEntries = 8;
constexpr int kGemvMaxRows = 4;

// One product y = act(x) @ W of a grouped GEMV. W is stored [M, N] (row m = output m's weights);
// x [rows, N] with row stride x_stride, y [rows, M] with row stride y_stride (elements).
// act: 0 none, 1 tanh, 2 sigmoid, 3 relu^2, applied to x; out_act: the same codes applied to each result
// after it is rounded to y's dtype (relu^2 there gives the reference's relu(k) ** 2 of the ffn key,
// rounded as it rounds, so the next product needs no activation on load). bias (nullable, [M] in the activation
// dtype) is added to each sum before it is rounded (nn.Linear's bias, as a GEMM epilogue adds it). glu (SwiGLU,
// y = silu(x @ gate^T) * (x @ up^T); no bias, no out_act): W holds the gate rows [M, N] and the up rows are w_up
// [M, N] (nullable: W is [2M, N], the gate rows then the up rows). glu 1 rounds each product and the silu to the
// activation dtype first (as transformers' Qwen2MLP computes it in that dtype); glu 2 keeps both products and the
// silu in float32 and rounds once (ops.fused_gated_mlp's contract).
// lpr_log2 (lanes per output), ks_log2 (warps sharing one output's dot product, split over N) and block_begin are set
// by the launcher.
struct GemvEntry {
    const void* x;
    const void* w;
    const void* w_up;  // glu entries: the up rows [M, N] (nullable: they follow the gate rows in w)
    const void* bias;
    const void* mix;   // GemvNorm kind 2: this product's token-shift lerp vector [C] (nullable)
    void* y;
    long x_stride;
    long y_stride;
    int N;
    int M;
    int act;
    int out_act;
    int glu;
    int lpr_log2;
    int ks_log2;
    int block_begin;
};

// The norm in front of a grouped GEMV (GemvBatch.norm), used when x != nullptr; every entry's N must be C and its own
// x is then ignored. h = round(x + residual) (h = x without a residual), then by kind:
//   1 RMSNorm (transformers' Qwen2RMSNorm rounding): xn = round(w * round(h * rsqrt(mean(h^2) + eps)));
//   2 LayerNorm + token shift (RWKV-7, as v7_mix): xl = round((h - mean) * rsqrt(var + eps) * w + b), and an entry
//     with a mix vector takes round(xl + (shift - xl) * mix) (shift: the previous token's xl [rows, C], nullable =
//     zeros), one without takes xl.
// x, residual, shift, h_out, xn_out [rows, C] contiguous rows (stride C), w, b, mix [C], all in the activation dtype.
// Each block normalizes the rows itself into shared memory (no extra launch); the first block writes h to h_out and
// (kind 2) xl to xn_out (both nullable; they must not alias any input of the launch: a later launch copies xl into
// the shift state, GemvBatch.copy_*). Needs C % (16 / element size) == 0, 16-byte aligned rows and vectors, every
// product non-empty, and rows * C elements within kGemvNormStageBytes: else gemv_multi_launch returns kUnsupported.
constexpr int kGemvNormStageBytes = 40 * 1024;
struct GemvNorm {
    const void* x;
    const void* residual;
    const void* w;
    const void* b;
    const void* shift;
    void* h_out;
    void* xn_out;
    float eps;
    int C;
    int kind;
};

// copy_n elements (activation dtype) from copy_src to copy_dst, done by the launch's threads after pdl_wait (a side
// job: the shift state a previous launch's norm left in xn_out). Nothing else in the launch may touch either.
struct GemvBatch {
    GemvEntry e[kGemvMaxEntries];
    GemvNorm norm;  // used when norm.x != nullptr (every entry's x is then ignored; its N must be norm.C)
    const void* copy_src;
    void* copy_dst;
    long copy_n;
    int n;          // entries in use
    int rows;       // 1..kGemvMaxRows
    int out_f32;    // y is float32 (else the activation dtype)
};

// x, dx, x_out: [rows = B*T, C]; dx (nullable) is added (rounded to the act dtype) and written to
// x_out (nullable; must not alias x when T > 1). LayerNorm (ln_w, ln_b [C], eps 1e-5) then the token
// shift against shift [B, C] (nullable: zeros) and n_mix lerps with mix [n_mix, C] into out
// [n_mix] x [rows, C] (planes out_stride elements apart); n_mix == 0 writes the LayerNorm itself.
// shift_out [B, C] (nullable; may alias shift only when T == 1) gets the last token's LayerNorm.
int v7_mix_launch(int act, int rows, int T, int C, int n_mix, const void* x, const void* dx, void* x_out,
                  const void* ln_w, const void* ln_b, const void* shift, void* shift_out, const void* mix, void* out,
                  long out_stride, cudaStream_t stream);

int gemv_multi_launch(int act, GemvBatch batch, cudaStream_t stream);

// Per (row, head) of [rows, H*N] tensors: see v7_fused.cu. vl and v_first null for the first layer.
int v7_pre_launch(int act, int rows, int H, int N, const void* k, const void* v, const void* wl, const void* al,
                  const void* vl, const void* v_first, const float* w0, const void* a0, const void* k_k,
                  const void* k_a, const void* v0, float* w_out, void* k_out, void* v_out, void* a_out, void* b_out,
                  cudaStream_t stream);
int v7_post_launch(int act, int rows, int H, int N, const float* y, const void* r, const void* k, const void* v,
                   const void* g, const void* r_k, const void* lnw, const void* lnb, void* out, cudaStream_t stream);
// Decode: s [B, H, N, N] fp32 updated in place; out [B, H*N] act. staged: move the state through shared
// memory in coalesced rows (many rows; head sizes <= 64, others ignore it).
int v7_tmix_one_launch(int act, int B, int H, int N, const void* r, const void* k, const void* v, const void* wl,
                       const void* al, const void* g, const void* vl, const void* v_first, const float* w0,
                       const void* a0, const void* k_k, const void* k_a, const void* v0, const void* r_k,
                       const void* lnw, const void* lnb, float* s, void* out, bool staged, cudaStream_t stream);

// The channel-mix value product y = h @ W of decode steps for h [rows <= kGemvMaxRows, F] (row stride h_stride)
// and W [F, C] input-major (contiguous; also uint8 / e4m3 with their scales, below), reading only the rows f of W
// where some h[m, f] != 0 (skip) or every row
// (same bits): csrc/fused/ffn_rows.cu. y [rows, C] in the act dtype or float32 (y_f32), row stride y_stride.
// ffn_rows_plan sizes the grid; part: float32 workspace of plan.workspace elements (none when 0); counters: int32,
// at least plan.tiles, zero (left zero).
struct FfnRowsPlan {
    int tpr;          // threads per column tile (16 bytes of W each)
    int tiles;        // column tiles
    int slices;       // ranges of F, `per` rows each
    int per;
    int threads;      // per block
    size_t smem;      // dynamic shared memory per block
    long workspace;   // float32 elements of `part`
};
// Weight kinds (wkind): 0, W in the act dtype; 1, uint8 (the i8 format; mx, rx [C] and my, ry [F] in the act dtype);
// 2, e4m3 bytes (the f8 format; scale float32 [C]). Kinds 1 and 2 take fp16 / bf16 activations. relu2: h holds the
// raw k, and relu(k)^2 rounded to the act dtype is used.
struct FfnRowsQuant {
    const void* mx = nullptr;
    const void* rx = nullptr;
    const void* my = nullptr;
    const void* ry = nullptr;
    const float* scale = nullptr;
};
FfnRowsPlan ffn_rows_plan(int act, int wkind, int rows, int F, int C, int blocks_per_sm, int sm_count,
                          int tile_threads = 0);
int ffn_rows_launch(int act, int wkind, const FfnRowsPlan& plan, int rows, int F, int C, const void* h,
                    long h_stride, const void* w, const FfnRowsQuant& qs, void* y, long y_stride, bool y_f32,
                    float* part, int* counters, bool skip, bool relu2, cudaStream_t stream);

// The whole decode step of one token row through every layer of an RWKV-7 model in one persistent launch
// (csrc/fused/v7_step.cu). table [L, kStepSlots]: each layer's device pointers in V7StepSlot order (matrices
// output-major [M, K] in the activation dtype, fp16 or bf16: r, k, v, output [C, C]; w1, a1, g1, v1 [D, C]; w2, a2,
// g2, v2 [C, D]; ffn key [ffn, C]; ffn value [C, ffn]; mix6 [6, C] in r w k v a g order; w0 float32 [C]; v1, v2, v0
// null in layer 0). x [C]: the embedding row on entry, the last layer's residual stream on exit; dx [C]: its last
// channel-mix output (the caller adds it before ln_out; x is NaN where a barrier gave up). scratch: 6 C +
// kStepMaxLow + ffn values. bar: two
// unsigned counters (the grid barrier's arrivals and their count at the end of the last launch), zero before the
// first launch, kept between launches; flag: nonzero once a barrier wait gave up (it stays so). The states att_x [C], s float32 [H, 64, 64] and ffn_x [C] of each layer are updated in place. Head size 64.
constexpr int kStepMaxLayers = 64;
constexpr int kStepMaxLow = 1024;   // dw + da + dg + dv
enum V7StepSlot : int {
    kStepWr, kStepWk, kStepWv, kStepW1, kStepA1, kStepG1, kStepV1, kStepW2, kStepA2, kStepG2, kStepV2, kStepWo,
    kStepFk, kStepFv, kStepLn1W, kStepLn1B, kStepLn2W, kStepLn2B, kStepMix6, kStepMixK, kStepW0, kStepA0, kStepKk,
    kStepKa, kStepV0, kStepRk, kStepLnxW, kStepLnxB, kStepSlots
};
struct V7StepArgs {
    const long long* table;
    int L, C, H, ffn, dw, da, dg, dv;
    void* x;
    void* dx;
    void* scratch;
    unsigned* bar;
    int* flag;
    int prefetch;   // before each barrier, the next stage's weights: 0 not requested, 1 into L2, 2 into registers;
                    // 3 (sm_90+): every product's weights through a ring of shared-memory tiles (bulk copies)
    int ring_slots, ring_slot_bytes;   // set by v7_step_launch (the ring's slots and their size, bytes)
    unsigned long long* times;   // nullable: the global timer (ns) at the start and after each barrier, 1 + 5 L values
    void* att_x[kStepMaxLayers];
    float* s[kStepMaxLayers];
    void* ffn_x[kStepMaxLayers];
};
// act: 1 fp16, 2 bf16. blocks: the grid (0: one block per multiprocessor; at most that). grid_out (nullable): the
// blocks launched.
int v7_step_launch(int act, const V7StepArgs& args, int blocks, int* grid_out, cudaStream_t stream);

}  // namespace rwkv_chat
