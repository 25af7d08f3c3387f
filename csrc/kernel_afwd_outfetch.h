// The forward tile asks for its output rows' cache lines, for writing, before it computes them.
//
// Why: a tile stores its MR x NR results at its end; on a layer whose output does not stay in
// cache (layer A: 2 MiB written per call) each of those stores first fetched its line, and the
// tile waited on them at its end. Asked for at the tile's start, the lines arrive while its
// loop runs. Zen 4, one thread, layer A forward (best of 7 x 8 alternated runs, thread CPU
// time, load 13-14): max_plus 5.82 -> 5.71 ms, max_min 5.95 -> 5.76, adder 6.08 -> 5.93,
// l2_exact 5.79 -> 5.58 (the stores' share measured alone on a copy of the loop: ~3.5%).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), before kernel_forward.h, never on its own.
#pragma once

// A prefetch for writing of the cache line holding p (a hint: never faults, changes no value).
inline void prefetch_for_write(const float* p) {
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
  // Every AVX-512 CPU has PREFETCHW; the compiler emits it only under -mprfchw.
  __asm__ volatile("prefetchw %0" : : "m"(*reinterpret_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1, 3);
#endif
}

// Prefetches for writing the first `n` floats of each live row of a tile's output block:
// row r at dst + r * stride.
template <int R>
inline void prefetch_rows(float* dst, int64_t stride, int64_t n, const bool (&live)[R]) {
  for (int r = 0; r < R; ++r) {
    if (!live[r]) continue;
    for (int64_t l = 0; l < n; l += 64 / int64_t(sizeof(float)))
      prefetch_for_write(dst + r * stride + l);
  }
}
