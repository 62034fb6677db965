// WKV-5/5.1/5.2 on the CPU: fixed decay w [H, N]. Kernel template: wkv5_cpu.h.
#include "wkv5_cpu.h"

namespace rwkv_chat {

void wkv5_cpu_kernel(int act, int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const void* k,
                     const void* v, const float* w, const float* u, const float* s, void* y, float* s_out) {
    RWKV_CHAT_CPU_DISPATCH_ACT(act, F,
        wkv5_cpu_impl<F, false>(B, T, H, N, static_cast<const F*>(r), static_cast<const F*>(k),
                                static_cast<const F*>(v), w, u, s, static_cast<F*>(y), s_out));
}

}  // namespace rwkv_chat
