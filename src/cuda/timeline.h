// The TMA decode kernel's per-worker timeline: its layout and the host readers, in plain C++ for
// lutmm_bench (the recording side, on the device, is timeline.cuh).
#pragma once
#include <cstdint>

namespace lutmm {
namespace gpu {
namespace lut {

// A worker's row: %globaltimer (ns) at each event, then its SM's id.
enum TimelineEvent : int { kTlEntry, kTlDepWait, kTlFirstData, kTlLoopEnd, kTlExit, kTlSm, kTlEvents };
constexpr int kTimelineSlots = 4;
constexpr int kTimelineWorkers = 2048;  // per slot; workers past it are not recorded

}  // namespace lut

// Host, for lutmm_bench: copies the timeline of the last launch (`back` = 0) or the one before it
// (`back` = 1) into out ([max_workers][kTlEvents], rows of workers that did not record left 0) and
// returns the rows copied; 0 in builds without the timeline. Not part of the library's API.
int decode_timeline(uint64_t* out, int max_workers, int back);
// Host: zeroes every slot (between cases of different shapes, whose worker counts differ).
void decode_timeline_clear();

}  // namespace gpu
}  // namespace lutmm
