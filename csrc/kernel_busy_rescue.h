// Bringing a descheduled thread of a fork-join to the CPU of one that waits for it (run_parallel
// in ffi.cc; issue 23 item 1).
//
// Why: beside a busy process, a helper that shares its CPU with it runs in turns of a time
// slice (about 4 ms on a 250 Hz kernel). When it is switched out while it holds an item, the
// caller, out of items, would sleep for the rest of that slice with its own CPU idle: Linux
// does not move a task that ran in the last half millisecond ("cache hot") to an idle CPU,
// and a CPU that idles only briefly skips that search altogether. Measured on layer A beside
// a spinner on CPU 1, this wait was 0.2-0.9 ms per call on average, up to 4 ms.
//
// What: each thread of a fork-join (the caller too) registers in a Slot while it runs items.
// A thread that runs out of items while others still hold some reads their CPU clocks, spins
// briefly (a quiet machine finishes here), and reads them again: a thread whose clock did not
// move is descheduled, and is allowed only on the waiting thread's CPU, which that thread
// then leaves idle (the caller sleeps, a helper returns to the pool). Each thread puts its own
// CPU set back when it has run its last item, before it reports its items done, so no thread
// stays pinned after the fork-join. Results do not depend on it: an item runs the same code
// wherever it runs. Off Linux every call is a no-op.
#pragma once

#include <cstdint>
#include <ctime>
#include <mutex>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif

namespace jaxconv_busy {

// One thread's registration for one fork-join, shared with the other threads.
class Slot {
 public:
  // The thread itself, before its first item.
  void enter() {
#if defined(__linux__)
    static thread_local const pid_t tid = pid_t(syscall(SYS_gettid));
    std::lock_guard<std::mutex> lock(mu_);
    tid_ = tid;
    active_ = pthread_getcpuclockid(pthread_self(), &clock_) == 0;
#endif
  }

  // The thread itself, after its last item and before it reports its items done: its CPU set
  // back.
  void leave() {
#if defined(__linux__)
    std::lock_guard<std::mutex> lock(mu_);
    if (moved_) sched_setaffinity(0, sizeof(saved_), &saved_);
    active_ = moved_ = false;
#endif
  }

  // Another thread: this one's CPU time in ns, or -1 when it is not running items.
  int64_t cpu_ns() {
#if defined(__linux__)
    std::lock_guard<std::mutex> lock(mu_);
    timespec t;
    if (!active_ || clock_gettime(clock_, &t) != 0) return -1;
    return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
#else
    return -1;
#endif
  }

  // Another thread: allows this one (while it runs items) only on CPU `cpu`. Returns whether
  // it did.
  bool pull_to(int cpu) {
#if defined(__linux__)
    std::lock_guard<std::mutex> lock(mu_);
    if (!active_ || moved_ || cpu < 0 || cpu >= CPU_SETSIZE) return false;
    if (sched_getaffinity(tid_, sizeof(saved_), &saved_) != 0 || !CPU_ISSET(cpu, &saved_))
      return false;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    moved_ = sched_setaffinity(tid_, sizeof(one), &one) == 0;
    return moved_;
#else
    (void)cpu;
    return false;
#endif
  }

 private:
  std::mutex mu_;
  bool active_ = false, moved_ = false;
#if defined(__linux__)
  pid_t tid_ = 0;
  clockid_t clock_{};
  cpu_set_t saved_{};
#endif
};

inline int64_t monotonic_ns() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
}

// What wait_or_pull saw.
enum class Waited { kFinished, kStalled, kRunning };

// Thread `self` (or -1), out of items: waits up to `spin_ns` for `finished()`; if it is still
// false, moves each other registered thread (of the first 64) that ran for less than a
// quarter of that time to this thread's CPU, and calls `on_pull(slot)` for each. Returns
// kFinished when `finished()` became true during the spin, kStalled when a thread had not
// run (moved or not), else kRunning: every other thread kept running, so this one's CPU is
// not needed by them and a sleep would only add a wakeup (which Linux may place behind the
// competitor: a time slice).
template <class Finished, class OnPull>
Waited wait_or_pull(Slot* slots, int64_t registered, int64_t self, int64_t spin_ns,
                    Finished finished, OnPull on_pull) {
  constexpr int64_t kMax = 64;
  const int64_t m = registered < kMax ? registered : kMax;
  int64_t before[kMax];
  for (int64_t h = 0; h < m; ++h) before[h] = h == self ? -1 : slots[h].cpu_ns();
  const int64_t t0 = monotonic_ns();
  for (int spin = 0;; ++spin) {
    if (finished()) return Waited::kFinished;
    if (spin % 64 == 63 && monotonic_ns() - t0 > spin_ns) break;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_ia32_pause();
#endif
  }
  Waited seen = Waited::kRunning;
#if defined(__linux__)
  const int64_t wall = monotonic_ns() - t0;
  const int cpu = sched_getcpu();
  for (int64_t h = 0; h < m; ++h) {
    if (before[h] < 0) continue;
    const int64_t now = slots[h].cpu_ns();
    if (now < 0 || 4 * (now - before[h]) >= wall) continue;
    seen = Waited::kStalled;
    if (slots[h].pull_to(cpu)) on_pull(h);
  }
#else
  (void)on_pull;
  seen = Waited::kStalled;
#endif
  return seen;
}

}  // namespace jaxconv_busy
