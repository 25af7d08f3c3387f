// A peak probe: how many product terms per second this CPU's vector units can do for the
// inner steps the kernels use (FMA; add then max; min then add; an exponential and a sum), on
// 1 or more threads.
// Each table of benchmarks/native.py divides an op's term rate by it (a fraction of the
// machine's limit). Not part of the kernels: compiled in ffi.cc's library, x86 ISAs chosen
// by function attributes at run time.
#pragma once
#include <cstdint>

namespace jaxconv_probe {

// kExp2, kExp: the exp-limited steps, run by the kernels' own exponentials (compiled with the
// kernels of each instruction set, kernel_expfloor_probe.h): s += 2^(x L + w) as the logsumexp
// kernels form a term (simd_exp.h), s += exp(x - w) with vmath.h's exp (user combines).
enum Kind : int { kFma = 0, kAddMax = 1, kMinAdd = 2, kExp2 = 3, kExp = 4 };

struct Result {
  double gterms_per_s;  // terms (one lane of one step) per second over all threads, / 1e9
  const char* isa;      // the instruction set that ran: avx512, avx2 or base
  int64_t lanes;        // floats per vector
  // Whether every thread of every timed repeat ran pinned to a CPU of its own (and was on
  // it when it started and when it ended); false where the process has fewer CPUs than
  // threads, where pinning failed, or off Linux. Without it two threads may share one CPU
  // for a whole repeat (Linux wakes a new thread on its creator's CPU when no CPU is idle).
  bool distinct_cpus;
  // The best repeat's CPU time over all threads / (threads x its wall time): near 1 when the
  // threads ran side by side the whole time, lower when they were descheduled.
  double overlap;
  // The sum over threads of each one's rate in its own CPU time (best repeat): what the
  // CPUs do while the probe's threads run on them, which time slices lost to other
  // processes do not lower. With the threads on CPUs of their own (and no two on one core)
  // it is the machine's limit on a busy machine too.
  double gterms_per_s_cpu;
};

// Runs `threads` threads on the `kind` step (register-resident data), five repeats of about
// `seconds` / 5 each, and returns the best aggregate rate. `isa` ("", "avx512", "avx2",
// "base") caps the instruction set. On Linux, when the calling thread may run on at least
// `threads` CPUs, each thread is pinned to its own one of them for the probe (the calling
// thread's CPU set is put back before it returns).
Result peak(int kind, int threads, double seconds, const char* isa);

}  // namespace jaxconv_probe
