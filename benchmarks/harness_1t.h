// What every one-thread kernel harness in benchmarks/ (fwd_1t.cc, dense_bwd_1t.cc,
// sumbwd_1t.cc, lowdense_1t.cc) needs besides the kernels: a serial stand-in for XLA's thread
// pool, the calling thread's CPU time, integer settings from the environment and the command
// line's comma-separated op ids. Included after the kernels (they define nothing of these).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <vector>

// The kernels' parallel-for, run on this thread: items 0..n-1 in order.
static void serial(void*, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  for (int64_t i = 0; i < n; ++i) fn(arg, i);
}

// Seconds of this thread's CPU time (other processes on the machine do not count).
static double now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// The environment variable `name` as an integer, or `d` where it is unset.
static int env(const char* name, int d) { return getenv(name) ? atoi(getenv(name)) : d; }

// "0,1,5" -> {0, 1, 5}.
static std::vector<int> ints(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(atoi(p));
    while (*p && *p != ',') ++p;
    if (*p) ++p;
  }
  return v;
}
