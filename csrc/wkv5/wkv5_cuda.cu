// WKV-5/5.1/5.2: the decay w is fixed per head and key index ([H, N]). Kernel: wkv5_kernel.cuh.
#include <type_traits>
#include "../common/launchers.h"
#include "wkv5_kernel.cuh"

namespace rwkv_chat {

int wkv5_cuda_launch(int act, bool per_token, int B, int T, int H, int N, const void* r, const void* k,
                     const void* v, const float* w, const float* u, const float* s, void* y,
                     float* s_out, cudaStream_t stream) {
    if (per_token) return kUnsupported;  // served by wkv6_cuda.cu
    return wkv5_launch_impl<false>(act, B, T, H, N, r, k, v, w, u, s, y, s_out, stream);
}

}  // namespace rwkv_chat
