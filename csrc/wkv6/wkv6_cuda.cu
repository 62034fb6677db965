// WKV-6: the decay w is data-dependent, one value per token ([B, T, H, N]); same recurrence as
// WKV-5 (csrc/wkv5/wkv5_kernel.cuh, ChatRWKV rwkv/cuda/rwkv6.cu).
#include <type_traits>
#include "../common/launchers.h"
#include "../wkv5/wkv5_kernel.cuh"

namespace rwkv_chat {

int wkv6_cuda_launch(int act, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                     const float* w, const float* u, const float* s, void* y, float* s_out,
                     cudaStream_t stream) {
    return wkv5_launch_impl<true>(act, B, T, H, N, r, k, v, w, u, s, y, s_out, stream);
}

}  // namespace rwkv_chat
