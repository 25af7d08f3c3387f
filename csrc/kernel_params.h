// The forward kernels' run-time tuning parameters: plain data shared by ffi.cc (which holds
// the process's set, chosen by jaxconv/_src/engines/native/tuning.py) and the kernel template
// (which reads it through Call::params). No parameter changes a max/min result's bits; only
// `min_form` changes a sum's rounding (within the documented bound, see kernel_ops.h).
#pragma once
#include <cstdint>

namespace jaxconv {

// The fields, listed once: X(name, default, lowest, highest). Python reads the list through
// `jaxconv._native.param_fields()`; JAXCONV_NATIVE_PARAMS uses these names.
#define JAXCONV_PARAM_FIELDS(X)                                                              \
  /* KiB of a kernel panel when a kernel block is cut into panels (rows = KiB * 256 / NR) */ \
  X(panel_kib, 16, 4, 1024)                                                                  \
  /* a kernel block up to this many KiB is one panel (its tiles run all taps at once) */     \
  X(block_kib, 192, 0, 65536)                                                                \
  /* the forward shrinks its tiles per item (64 .. 8) until at least this many items */      \
  X(items, 16, 1, 4096)                                                                      \
  /* max_min / min_max on integer keys (1) or on float min / max (0): the same bits */       \
  X(keyed, 1, 0, 1)                                                                          \
  /* adder / l1 forward in the min form (1) or the direct |x - w| loop (0) */                \
  X(min_form, 1, 0, 1)                                                                       \
  /* max_plus / min_plus and the min form add by fma(a, 1, b) (1) or add (0): same bits */   \
  X(fma_add, 1, 0, 1)                                                                        \
  /* the forward's register tile: the instruction set's (0) or kernel_variants.h's (1) */     \
  X(tile, 0, 0, 1)                                                                           \
  /* AVX-512: the combine reads x as an embedded broadcast (1) or from a broadcast (0); */  \
  /* so does the dense sums backward its cotangent (kernel_densebwd_memcot.h) */              \
  X(bcast, 1, 0, 1)                                                                          \
  /* the forward's kernel blocks in this many runs, a claim counter each (kernel_lanes.h) */ \
  X(lanes, 2, 1, 16)                                                                         \
  /* AVX-512, bcast = 1: l1's dense backward takes 2 terms in 3 as g sign(x - w) (1) or */   \
  /* every term as two fused multiply-adds (0): the same bits (kernel_densebwd_memcot.h) */  \
  X(l1_split, 1, 0, 1)

#define JAXCONV_PARAM_MEMBER(name, dflt, lo, hi) int64_t name = dflt;
struct Params {
  JAXCONV_PARAM_FIELDS(JAXCONV_PARAM_MEMBER)
};
#undef JAXCONV_PARAM_MEMBER

}  // namespace jaxconv
