// Grouped mm8 GEMV launchers (csrc/mm8/mm8_cuda.cu): the decode products of i8 weights stored
// output-major, one launch for several weights.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/launchers.h"

namespace rwkv_chat {

// Up to kMm8MaxEntries products y_e = act_e(x_e) @ dequantize(w_e) in one launch, all with the same
// row count (1..kMm8MaxGemvRows). Per entry (raw device pointers of contiguous tensors, activation
// dtype unless said otherwise):
//   x [rows, N]; w uint8 [M, N] (output-major: output m's N weights contiguous; N % 16 == 0);
//   mx, rx [M]; my, ry [N]; y [rows, M]; act 0 (none) or 3 (relu^2 applied to x as it is loaded).
// mm8_multi_prepare fills the launch geometry (returns 0, or kUnsupported for a shape with no
// kernel); mm8_multi_launch then runs every entry in one grid. No workspace, no atomics.
constexpr int kMm8MaxEntries = 4;
struct Mm8Entry {
    const void* x;
    const uint8_t* w;
    const void* mx;
    const void* rx;
    const void* my;
    const void* ry;
    void* y;
    int N, M, act;
    // filled by mm8_multi_prepare
    int lanes_log2;   // lanes per output (a group of 1 << lanes_log2 lanes of one warp)
    int outs;         // outputs per lane group, one after the other (1..64: the grid fits one wave)
    int tile;         // x elements per row staged in shared memory at a time (multiple of 16)
    int tiles;        // ceil(N / tile)
    int block_begin;  // first block of this entry in the grid
    int slab_begin;   // first block of this entry in the slab kernel's grid
};
struct Mm8Batch {
    Mm8Entry e[kMm8MaxEntries];
    int n, rows;
    int blocks, smem_bytes;   // filled by mm8_multi_prepare
    int blocks_per_sm;        // filled by mm8_multi_prepare: the kernel variant (2 or 3 resident blocks)
    // filled by mm8_multi_prepare: > 0 runs the bulk-copy kernel (mm8_slab.cuh) with this many outputs per
    // warp and slab_blocks blocks; slab_split 1: every warp requests its weights before the dependency wait,
    // 2: the first half of a block's warps before it, the others once the block has staged x; 0 the register kernel
    int slab_outs, slab_blocks, slab_split;
};
int mm8_multi_prepare(Mm8Batch& batch, int sm_count);
int mm8_multi_launch(int act, const Mm8Batch& batch, cudaStream_t stream);
}  // namespace rwkv_chat
