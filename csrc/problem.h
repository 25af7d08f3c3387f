// Plain data shared by ffi.cc and the per-ISA kernel translation units. No inline functions
// here: the kernel TUs are compiled with different instruction sets and must not share code.
#pragma once
#include <cstdint>

#include "kernel_params.h"

namespace jaxconv {

// One canonical problem, always 3 spatial dims (missing ones have size 1): x (N, D, H, W, C),
// w (KD, KH, KW, I, O), out (N, OD, OH, OW, O), C = G * I, O = G * Og.
struct Geom {
  int64_t n, sp[3], c, k[3], i, o, g, os[3], stride[3], lo[3], ld[3], rd[3];
  int64_t has_pad;  // 0: identity padding (padded taps and lhs_dilation holes are skipped)
  float pad;        // the pad value when has_pad
};

// The built-in ops, listed once: X(enumerator, kernel functor, name, reduce). Their ids are
// their positions. The kernel switch (kernels.inc), the FFI's range check and the table that
// `jaxconv._native.kernels()` hands to Python (checked against native.KERNELS) expand it.
#define JAXCONV_BUILTIN_OPS(X)             \
  X(kMaxPlus, MaxPlus, "max_plus", "max")  \
  X(kMinPlus, MinPlus, "min_plus", "min")  \
  X(kMaxMin, MaxMin, "max_min", "max")     \
  X(kMinMax, MinMax, "min_max", "min")     \
  X(kAdder, Adder, "adder", "sum")         \
  X(kL1, L1, "l1", "sum")                  \
  X(kL2, L2, "l2_exact", "sum")            \
  X(kLog, LogPlus, "log", "logsumexp")     \
  X(kMaxMinus, MaxMinus, "max_minus", "max") \
  X(kMinMinus, MinMinus, "min_minus", "min")

#define JAXCONV_OP_ENUMERATOR(e, functor, name, reduce) e,
enum OpId : int64_t { JAXCONV_BUILTIN_OPS(JAXCONV_OP_ENUMERATOR) kNumBuiltinOps };
#undef JAXCONV_OP_ENUMERATOR

// Op ids from kUserBase up name user ops compiled at run time (registered by key in ffi.cc).
constexpr int64_t kUserBase = int64_t(1) << 40;

// The layout of Call and Geom: a compiled user op is loaded only if it was built against the
// same version.
constexpr int kAbiVersion = 2;

// A fork-join over `n` independent items, implemented on XLA's intra-op pool in ffi.cc.
struct Parallel {
  void (*run)(void* ctx, int64_t n, void (*fn)(void* arg, int64_t item), void* arg);
  void* ctx;
};

struct Call {
  int64_t op;
  Geom geom;
  int64_t batch;  // leading (vmap) batch: every operand holds `batch` problems
  const float* x;
  const float* w;
  const float* y;  // backward: the forward output
  const float* g;  // backward: the output cotangent
  float* out;      // forward: y; backward: dx
  float* out2;     // backward: dw
  int64_t parts;   // backward: bit 0 computes dx, bit 1 dw
  Parallel par;
  const Params* params;  // the tuning parameters (never null from ffi.cc; null: the defaults)
  // Dense max/min winner masks (kernel_dense_record.h), (batch, P, O): the recording forward
  // writes them (-1: not recorded), the backward reads them; null in every other call.
  int32_t* rec;
};

}  // namespace jaxconv
