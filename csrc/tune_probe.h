// The tuning parameters of this process and the timing probe of their search (the search
// itself, its cache and the JAXCONV_NATIVE_PARAMS override: jaxconv/_src/engines/native/
// tuning.py). Defined in tune_probe.cc; ffi.cc binds them in `jaxconv._native`.
#pragma once
#include <nanobind/nanobind.h>

#include <atomic>
#include <cstdint>

#include "problem.h"

namespace jaxconv_tune {

namespace nb = nanobind;

// The process's parameters. A set, once published, is never freed: a call in flight on
// another thread may still read the one it loaded (a process sets a handful at most).
std::atomic<const jaxconv::Params*>& current_params();

// {name: (default, lowest, highest)} of every parameter (kernel_params.h's one list).
nb::dict param_fields();

// The parameters of `p` as {name: value}.
nb::dict params_dict(const jaxconv::Params& p);

// A complete parameter set from a dict naming every field once, each within its range.
jaxconv::Params params_from(const nb::dict& d);

// The best of `reps` single-threaded forward runs (seconds of this thread's CPU time) of
// built-in op `op` with the parameters `d` on x (n, h, w, c) * w (k, k, c, o), VALID, on fixed
// pseudo-random data; negative when the kernels refuse the call.
double time_forward(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k,
                    int64_t o, int64_t reps, const nb::dict& d);

// The same for the backward of that problem (both gradients; max / min without a winner
// record, so they rescan) at its forward output and a fixed pseudo-random cotangent.
double time_backward(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k,
                     int64_t o, int64_t reps, const nb::dict& d);

// The probes keep their problems' data (per thread) from one call to the next; this frees
// them (the search calls it when it ends). Returns how many problems were kept.
int64_t release_probes();

}  // namespace jaxconv_tune
