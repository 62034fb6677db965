// Bulk asynchronous copies from global to shared memory, completed on a shared-memory mbarrier
// (sm_90+, PTX ISA 8.0: cp.async.bulk, mbarrier expect_tx / try_wait.parity; CUDA C++ Programming
// Guide, "Asynchronous Data Copies using the Tensor Memory Accelerator"). One thread starts a copy of
// up to 2^20 - 1 bytes (16-byte aligned addresses, a multiple of 16 bytes) and the copy engine writes
// shared memory while the threads go on; threads that need the bytes wait on the barrier's phase.
// Device functions are no-ops below sm_90: callers check `bulk_copy_supported()` on the host.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_common.cuh"

namespace rwkv_chat {

// Whether the current device runs bulk asynchronous copies (compute capability 9.0+).
inline bool bulk_copy_supported() { return pdl_supported(); }

__device__ __forceinline__ unsigned shared_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Initialise a barrier that completes a phase after one arrival and the bytes it was told to expect;
// visible to the copy engine after the fence.
__device__ __forceinline__ void mbarrier_init_one(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_addr(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Arrive on the barrier and expect `bytes` of copies to complete on it before its phase ends.
__device__ __forceinline__ void mbarrier_arrive_expect(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_addr(bar)), "r"(bytes)
                 : "memory");
#endif
}

// Copy `bytes` from global `src` to shared `dst`, completing on `bar`; the lines are marked first to
// be evicted from L2 (streamed weights are read once per step).
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
        ::"r"(shared_addr(dst)), "l"(src), "r"(bytes), "r"(shared_addr(bar)), "l"(policy)
        : "memory");
#endif
}

// Order this thread's (and, after a block barrier, the block's) earlier shared-memory accesses before the bulk copies
// it starts next (the copy engine is another proxy: PTX ISA "Proxies").
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// Wait until the barrier's phase `parity` (0 for the first) has completed; the copied bytes are then
// visible to the waiting thread.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned done = 0;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(shared_addr(bar)), "r"(parity)
            : "memory");
    } while (!done);
#endif
}

// Ask L2 to fetch the 128-byte line holding p (no data returned; a hint).
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

}  // namespace rwkv_chat
