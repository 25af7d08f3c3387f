// A development-only timeline of the work sharing (issue 23 item 1): with the CMake option
// JAXCONV_BUSY_TRACE, run_parallel (ffi.cc) and the forward's claim lanes record, per thread,
// when a fork-join starts, when each thread starts and ends its share, each claim, and how the
// caller's wait at the join ended, each with the CPU it ran on (sched_getcpu). Python reads and
// clears the events with `jaxconv._native.busy_trace_take()` (present only in such a build).
// Without the option every macro here expands to nothing: the shipped build records nothing.
//
// Included both by ffi.cc and (through kernels.inc, inside its anonymous namespace) by the
// kernel template; the hook has C linkage so that every translation unit names one function.
#pragma once
#include <cstdint>

#ifdef JAXCONV_BUSY_TRACE
extern "C" void jaxconv_busy_trace(int kind, int64_t value);
#define JAXCONV_TRACE(kind, value) jaxconv_busy_trace(int(kind), int64_t(value))
#else
#define JAXCONV_TRACE(kind, value) ((void)0)
#endif

// The event kinds (values: see each).
enum JaxconvTraceKind : int {
  kTraceFork = 0,    // caller: a fork-join of `value` items starts
  kTraceStart = 1,   // any thread: starts taking items (value: 0 caller, 1 helper)
  kTraceItem = 2,    // any thread: takes item `value`
  kTraceEnd = 3,     // any thread: found no item left (value: items it ran)
  kTraceJoin = 4,    // caller: all items done (value: 1 when it slept on the condition)
  kTraceClaim = 5,   // forward lanes: claim `value`
  kTracePack = 6,    // forward: packs kernel block `value`
  kTraceWaitBeg = 7,  // caller: starts waiting for the helpers' items (value: items left)
  kTracePull = 8      // caller: moves stalled helper `value` to its CPU (kernel_busy_rescue.h)
};
