// The forward's claims in lanes (the `lanes` tuning parameter): the work of a forward whose
// kernel blocks are each one panel is a list of claims (a few tiles of one block), handed out
// dynamically; the blocks are cut into `lanes` contiguous runs, each with its own counter.
//
// Why: a worker packs the kernel block of its claim unless it already holds it. On one counter
// the threads' claims alternate within a block, so every thread packs every block: on a dense
// 1024 x 1024 (16 blocks of 64 columns, rows 4 KiB apart, a read the prefetchers do not
// follow) packing took ~8% of the single-threaded forward and each of two threads paid all of
// it again. With a lane per thread each packs only its own blocks. A worker that runs out of
// its lane takes the others' remaining claims in turn, one at a time, so a descheduled thread
// still holds back at most one claim; the result of a tile never depends on who runs it.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace (once
// per instruction set), before kernel_forward.h, never on its own.
#pragma once

class ClaimLanes {
 public:
  // `lanes` runs (at most kMax, at most one per block) over `blocks` blocks of `per` claims.
  ClaimLanes(int64_t lanes, int64_t blocks, int64_t per) : per_(per), blocks_(blocks) {
    n_ = lanes < 1 ? 1 : lanes > kMax ? kMax : lanes;
    if (n_ > blocks) n_ = blocks > 0 ? blocks : 1;
  }

  // The next claim (block * per + tile chunk) for worker `i`, or -1 when none is left: its
  // own lane's first, then each other lane's in turn.
  int64_t claim(int64_t i) {
    for (int64_t j = 0; j < n_; ++j) {
      const int64_t l = (i + j) % n_;
      const int64_t b0 = l * blocks_ / n_, b1 = (l + 1) * blocks_ / n_;
      Counter& ctr = next_[l];
      if (ctr.v.load(std::memory_order_relaxed) >= (b1 - b0) * per_) continue;
      const int64_t u = ctr.v.fetch_add(1, std::memory_order_relaxed);
      if (u < (b1 - b0) * per_) return b0 * per_ + u;
    }
    return -1;
  }

 private:
  static constexpr int64_t kMax = 16;
  struct alignas(64) Counter {  // one cache line each: the threads claim from different ones
    std::atomic<int64_t> v{0};
  };
  Counter next_[kMax];
  int64_t per_, blocks_, n_;
};
