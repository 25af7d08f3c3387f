// Keeping a fork-join's helper off its caller's CPU (run_parallel in ffi.cc; issue 23 item 1).
//
// Why: beside one busy process on a 2-CPU machine (three runnable threads on two CPUs), Linux
// wakes the helper on the CPU of the thread that woke it (the caller), since no CPU is idle;
// two threads on one CPU and one on the other is balanced by count, so the balancer leaves
// it. The call's two threads then share one CPU for the whole fork-join and run no faster
// than one thread, while the competitor keeps the other CPU to itself (measured on layer A:
// in most busy calls both threads stayed on CPU 0 for the whole 5.7 ms pass).
//
// What: the caller notes its CPU before it wakes the helper; a helper that starts on that CPU
// moves itself to another CPU of its set (leaving its caller's out, then putting its set back
// at once: the kernel moves a running thread only when its set forces it, so it stays). On a
// quiet machine a helper wakes on an idle CPU and never moves. Results do not depend on it:
// an item runs the same code wherever it runs. Off Linux both calls are no-ops.
#pragma once

#if defined(__linux__)
#include <sched.h>
#endif

namespace jaxconv_busy {

// The CPU the calling thread runs on, or -1 where unknown.
inline int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Moves the calling thread off CPU `avoid` when it runs there and its CPU set has another
// CPU; its set is the same afterwards. Returns whether it moved.
inline bool move_off(int avoid) {
#if defined(__linux__)
  if (avoid < 0 || avoid >= CPU_SETSIZE || sched_getcpu() != avoid) return false;
  cpu_set_t mine;
  if (sched_getaffinity(0, sizeof(mine), &mine) != 0 || !CPU_ISSET(avoid, &mine) ||
      CPU_COUNT(&mine) < 2)
    return false;
  cpu_set_t away = mine;
  CPU_CLR(avoid, &away);
  if (sched_setaffinity(0, sizeof(away), &away) != 0) return false;
  sched_setaffinity(0, sizeof(mine), &mine);
  return true;
#else
  (void)avoid;
  return false;
#endif
}

}  // namespace jaxconv_busy
