// Per-worker timeline of the TMA decode kernel (lut_stream.cu), in the instrumentation builds
// LUTMM_EXPERIMENT 200 and 201 (LUTMM_TIMELINE, common.cuh) only; in every other build the marks
// compile to nothing and the buffer does not exist. Each worker (a warp group: a CTA in the default
// builds) records, on %globaltimer (ns), when it entered, passed griddepcontrol.wait, saw its first
// stage land, ended its k-block loop and exited, and on which SM it ran. lutmm_bench prints the
// spreads (LUTMM_BENCH_TIMELINE=1): where a call's fixed cost goes (launch, first loads, the tail),
// which the ablations of item 91 could only bound.
//
// Consecutive calls overlap (programmatic dependent launch: call i + 1's CTAs start as call i's
// leave their SMs), so each launch writes to the next of kTimelineSlots buffers (Params::timeline_slot,
// set on the host per launch) and the reader takes the last launch's slot and the one before it.
#pragma once
#include <cstdint>

#include "timeline.h"  // the layout and the host readers

namespace lutmm {
namespace gpu {
namespace lut {

#if LUTMM_TIMELINE
namespace {
__device__ uint64_t g_timeline[kTimelineSlots][kTimelineWorkers][kTlEvents];
int g_timeline_launches = 0;  // host: launches so far (the slot of launch n is n % kTimelineSlots)
}  // namespace
#endif

// Records `event` (or, for kTlSm, the SM's id) for `worker` in `slot`; one thread per worker calls it.
__device__ __forceinline__ void timeline_mark(int slot, int worker, int event) {
#if LUTMM_TIMELINE && defined(__CUDA_ARCH__)
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  if (worker < kTimelineWorkers) {
    g_timeline[slot][worker][event] = t;
    if (event == kTlEntry) {
      uint32_t sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      g_timeline[slot][worker][kTlSm] = sm;
    }
  }
#else
  (void)slot; (void)worker; (void)event;
#endif
}

}  // namespace lut
}  // namespace gpu
}  // namespace lutmm
