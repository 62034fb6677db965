// Grouped mm8 GEMV launchers (csrc/mm8/mm8_cuda.cu), for the fused decode path.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/launchers.h"

namespace rwkv_chat {

// Grouped mm8 GEMV: up to kMm8MaxEntries products y_e = act_e(x_e) @ dequantize(w_e) in one launch,
// rows 1..kMm8MaxGemvRows shared by all entries (act 0 none, 3 relu^2 on x). mm8_multi_prepare fills
// split, rows_per_split, block_begin and the workspace offsets (returns -1 for unsupported shapes);
// the caller then passes an fp32 workspace of partial_floats floats and counter_count zeroed
// counters (left zeroed) to mm8_multi_launch.
constexpr int kMm8MaxEntries = 4;
struct Mm8Entry {
    const void* x;
    const uint8_t* w;
    const void* mx;
    const void* rx;
    const void* my;
    const void* ry;
    void* y;
    float* partial;
    unsigned* counters;
    int N, M, act;
    int split, rows_per_split, block_begin, partial_offset, counter_offset;
};
struct Mm8Batch {
    Mm8Entry e[kMm8MaxEntries];
    int n, rows, blocks, partial_floats, counter_count;
};
int mm8_multi_prepare(Mm8Batch& batch, int sm_count);
int mm8_multi_launch(int act, Mm8Batch batch, float* partial, unsigned* counters, cudaStream_t stream);
}  // namespace rwkv_chat
