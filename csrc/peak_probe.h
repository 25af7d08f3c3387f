// A peak probe: how many product terms per second this CPU's vector units can do for the
// inner steps the kernels use (FMA; add then max; min then add), on 1 or more threads.
// Each table of benchmarks/native.py divides an op's term rate by it (a fraction of the
// machine's limit). Not part of the kernels: compiled in ffi.cc's library, x86 ISAs chosen
// by function attributes at run time.
#pragma once
#include <cstdint>

namespace jaxconv_probe {

enum Kind : int { kFma = 0, kAddMax = 1, kMinAdd = 2 };

struct Result {
  double gterms_per_s;  // terms (one lane of one step) per second over all threads, / 1e9
  const char* isa;      // the instruction set that ran: avx512, avx2 or base
  int64_t lanes;        // floats per vector
};

// Runs `threads` threads on the `kind` step (register-resident data), five repeats of about
// `seconds` / 5 each, and returns the best aggregate rate. `isa` ("", "avx512", "avx2",
// "base") caps the instruction set.
Result peak(int kind, int threads, double seconds, const char* isa);

}  // namespace jaxconv_probe
