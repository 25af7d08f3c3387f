// What every one-thread kernel harness in benchmarks/ (fwd_1t.cc, dense_bwd_1t.cc,
// sumbwd_1t.cc, lowdense_1t.cc) needs besides the kernels: a serial stand-in for XLA's thread
// pool, the calling thread's CPU time and its median / best, integer settings from the
// environment and the command line's comma-separated op ids, the operands' data, and the
// kernel calls' setup (geometry, forward call, backward call). Included after the kernels
// (they define nothing of these; problem.h's types are theirs).
#pragma once

#include <algorithm>
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

// The median and the best of `v` (seconds), in milliseconds.
static double med(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2] * 1e3;
}
static double best(const std::vector<double>& v) {
  return *std::min_element(v.begin(), v.end()) * 1e3;
}

// Fills `v...` in order from one linear congruential stream seeded 12345 (every harness and
// build draws the same data): uniform in [-1, 1), or with `ties` the integers -3..3 (many
// ties between products).
template <class... V>
static void draw(bool ties, V&... v) {
  uint32_t s = 12345;
  auto fill = [&s, ties](std::vector<float>& a) {
    for (auto& e : a) {
      s = s * 1664525u + 1013904223u;
      e = ties ? float(int((s >> 8) % 7) - 3) : float(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
    }
  };
  (fill(v), ...);
}

// The geometry of x(n, h, wd, c) convolved with w(k, k, c, o): stride 1, SAME padding (k odd),
// no dilation, one group, identity padding; h = wd = k = 1 is the dense product x(n, c) w(c, o).
static jaxconv::Geom conv_geom(int n, int h, int wd, int c, int k, int o) {
  jaxconv::Geom gm{};
  gm.n = n;
  gm.sp[0] = 1, gm.sp[1] = h, gm.sp[2] = wd;
  gm.c = gm.i = c;
  gm.o = o;
  gm.g = 1;
  gm.k[0] = 1, gm.k[1] = gm.k[2] = k;
  gm.os[0] = 1, gm.os[1] = h, gm.os[2] = wd;
  for (int d = 0; d < 3; ++d) gm.stride[d] = gm.ld[d] = gm.rd[d] = 1, gm.lo[d] = d ? k / 2 : 0;
  return gm;
}

// The dense product's geometry: x(M, K) w(K, N).
static jaxconv::Geom dense_geom(int M, int K, int N) { return conv_geom(M, 1, 1, K, 1, N); }

// The forward call of op `op` (csrc/problem.h's ids) on x and w over `gm`: one problem, the
// serial pool, the tuning parameters `prm`; out and rec left null for the harness to set.
static jaxconv::Call forward_call(const jaxconv::Geom& gm, int op, const float* x,
                                  const float* w, const jaxconv::Params* prm) {
  jaxconv::Call call{};
  call.geom = gm;
  call.op = op;
  call.batch = 1;
  call.x = x;
  call.w = w;
  call.par = {serial, nullptr};
  call.params = prm;
  return call;
}

// The backward call of the forward `call`: its result y and cotangent g in, dx and dw out,
// `parts` (bit 0 dx, bit 1 dw); rec as the forward's. The caller zeroes dx (and dw where the
// kernels accumulate it), as the FFI does.
static jaxconv::Call backward_call(const jaxconv::Call& call, const float* y, const float* g,
                                   float* dx, float* dw, int parts) {
  jaxconv::Call b = call;
  b.y = y;
  b.g = g;
  b.out = dx;
  b.out2 = dw;
  b.parts = parts;
  return b;
}
