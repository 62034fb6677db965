// A ring of weight tiles in shared memory, fed by bulk asynchronous copies (csrc/common/bulk_copy.cuh; sm_90+):
// one thread (the issuer) starts the copy of the next tile into the slot the block has just finished with, so a block
// that runs through a known sequence of weight tiles keeps `slots` of them in flight ahead of its compute, across
// whatever it waits for in between (a grid barrier, a norm). Tiles are consumed in the order they were issued.
#pragma once

#include "../common/bulk_copy.cuh"

namespace rwkv_chat {

constexpr int kRingMaxSlots = 8;

struct WeightRing {
    unsigned char* buf;   // slots * slot_bytes of 128-byte aligned shared memory
    uint64_t* full;       // one mbarrier per slot (shared memory)
    int slots, slot_bytes;
    unsigned taken;       // tiles consumed so far (the same in every thread)
    unsigned issued;      // tiles issued so far (the issuer's count)
};

// Thread 0 initialises the slots' barriers; the caller synchronises the block before any issue or wait.
__device__ __forceinline__ void ring_init(WeightRing& R) {
    if (threadIdx.x == 0)
        for (int s = 0; s < R.slots; ++s) mbarrier_init_one(R.full + s);
}

// The issuer: copy `bytes` (a multiple of 16, 16-byte aligned src) into the next slot. That slot's previous
// tile must have been consumed by every thread (ring_release after a block barrier).
__device__ __forceinline__ void ring_issue(WeightRing& R, const void* src, unsigned bytes) {
    const int s = (int)(R.issued % (unsigned)R.slots);
    fence_proxy_async_shared();   // the slot's reads by the threads before the copy's writes
    mbarrier_arrive_expect(R.full + s, bytes);
    bulk_copy_to_shared(R.buf + (long)s * R.slot_bytes, src, bytes, R.full + s);
    ++R.issued;
}

// Every thread: wait for the next tile to arrive; returns its bytes.
__device__ __forceinline__ const unsigned char* ring_wait(const WeightRing& R) {
    const unsigned s = R.taken % (unsigned)R.slots;
    mbarrier_wait(R.full + s, (R.taken / (unsigned)R.slots) & 1u);
    return R.buf + (long)s * R.slot_bytes;
}

}  // namespace rwkv_chat
