// The exp-limited peak: the peak probe's loops (peak_probe.cc) for the steps whose term needs
// an exponential, written with the kernels' own exponentials so that a rate is what this
// instruction set's copy of them can do, with nothing else in the loop:
//   kind 3 ("exp2"): s += lse_exp2(x L + w) -- the logsumexp kernels' term (kernel_logsum.h:
//     one FMA for the exponent, simd_exp.h's 2^u, one add);
//   kind 4 ("exp"): s += exp_(x - w) -- a user combine's exp (vmath.h, what a generated
//     kernel calls for jnp.exp) between one subtraction and the sum's add.
// Register-resident data, RxC independent accumulators per step (enough chains to cover the
// exponentials' latency); returns a checksum so that the work is not dead.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace (once per
// instruction set, after simd.h, vmath.h and kernel_logsum.h); kernels.inc exports
// `exp_probe` from its JAXCONV_NS (built-in kernels only, not in user-op sources).
#pragma once

// Keeps the compiler from hoisting or folding the loop-invariant operands (no instruction).
#if defined(__x86_64__) || defined(_M_X64)
#define JAXCONV_EXPFLOOR_OPAQUE(v) __asm__ volatile("" : "+v"(v))
#elif defined(__aarch64__)
#define JAXCONV_EXPFLOOR_OPAQUE(v) __asm__ volatile("" : "+w"(v))
#else
#define JAXCONV_EXPFLOOR_OPAQUE(v) __asm__ volatile("" : "+m"(v))
#endif

// Rows and columns of the probe's accumulators: 8 chains with 32 vector registers (AVX-512),
// 4 with 16 (their constants then partly come from memory, as in the kernels).
constexpr int kExpProbeR = 2, kExpProbeC = W >= 16 ? 4 : 2;

template <int K>
float exp_probe_k(int64_t iters) {
  using V = S::V;
  constexpr int R = kExpProbeR, C = kExpProbeC;
  V acc[R][C], x[R], w[C];
  const V L = S::set1(kLog2e);
  for (int r = 0; r < R; ++r) x[r] = S::set1(-0.01f * float(r + 1));
  for (int c = 0; c < C; ++c) w[c] = S::set1(0.013f * float(c + 1));
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = S::zero();
  for (int64_t it = 0; it < iters; ++it) {
    for (int r = 0; r < R; ++r) JAXCONV_EXPFLOOR_OPAQUE(x[r]);
    for (int c = 0; c < C; ++c) JAXCONV_EXPFLOOR_OPAQUE(w[c]);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        if constexpr (K == 3) acc[r][c] = S::add(acc[r][c], lse_exp2<S>(S::fma(x[r], L, w[c])));
        else acc[r][c] = S::add(acc[r][c], exp_<S>(S::sub(x[r], w[c])));
      }
  }
  float s = 0.0f;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) s += S::hsum(acc[r][c]);
  return s;
}
