// One thread's CPU time of the sums' backward (adder, l1, l2_exact: kernel_sums*.h) straight on
// the kernel template, without JAX: layer A (x(8, 32, 32, 64) w(3, 3, 64, 64) SAME; adder pads
// with 0) or, with DENSE=1, layer E (x(256, 1024) w(1024, 1024); or M K N from the environment). Prints per op the median and
// best of `reps` calls of the forward and of the backward (both gradients, parts = 3; dx
// zeroed first, as the FFI does), with checksums of dx and dw. DUMP=path writes dx and dw
// (raw) for a bit-for-bit comparison of two builds; PARTS=1 or 2 times one gradient.
// Build (against any checkout's csrc/, e.g. an old commit's via git archive) and run:
//   g++ -O3 -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx2 -ffp-contract=off \
//       -fno-math-errno -std=c++17 -pthread -Icsrc benchmarks/sumbwd_1t.cc -o /tmp/sbwd
//   /tmp/sbwd 4,5,6 15            (ops: csrc/problem.h's ids)
// Alternate two builds (old, new) several times and compare medians; say the load.
#include <immintrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "denormals.h"
#define JAXCONV_NS jaxconv_avx512
#include "kernels.inc"
#include "harness_1t.h"


int main(int argc, char** argv) {
  const std::vector<int> ops = ints(argc > 1 ? argv[1] : "4,5,6");
  const int reps = argc > 2 ? atoi(argv[2]) : 15;
  const bool dense = getenv("DENSE") != nullptr;
  const int parts = getenv("PARTS") ? atoi(getenv("PARTS")) : 3;
  const int N = dense ? env("M", 256) : 8, H = dense ? 1 : 32, Wd = dense ? 1 : 32,
            C = dense ? env("K", 1024) : 64, K = dense ? 1 : 3, O = dense ? env("N", 1024) : 64;
  std::vector<float> x(size_t(N) * H * Wd * C), w(size_t(K) * K * C * O), y(size_t(N) * H * Wd * O),
      g(y.size()), dx(x.size()), dw(w.size());
  uint32_t s = 12345;
  auto next = [&s] {
    s = s * 1664525u + 1013904223u;
    return float(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
  };
  for (auto& v : x) v = next();
  for (auto& v : w) v = next();
  for (auto& v : g) v = next();
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv::Params prm;
  FILE* dump = getenv("DUMP") ? fopen(getenv("DUMP"), "wb") : nullptr;
  for (int op : ops) {
    jaxconv::Call call{};
    jaxconv::Geom& gm = call.geom;
    gm.n = N;
    gm.sp[0] = 1, gm.sp[1] = H, gm.sp[2] = Wd;
    gm.c = gm.i = C;
    gm.o = O;
    gm.g = 1;
    gm.k[0] = 1, gm.k[1] = gm.k[2] = K;
    gm.os[0] = 1, gm.os[1] = H, gm.os[2] = Wd;
    for (int d = 0; d < 3; ++d) gm.stride[d] = gm.ld[d] = gm.rd[d] = 1, gm.lo[d] = d && !dense;
    gm.has_pad = op == 4 && !dense;  // adder pads with 0
    gm.pad = 0.0f;
    call.op = op;
    call.batch = 1;
    call.x = x.data();
    call.w = w.data();
    call.par = {serial, nullptr};
    call.params = &prm;
    auto fwd = [&] {
      call.out = y.data();
      jaxconv_avx512::run(call, false);
    };
    auto bwd = [&] {
      jaxconv::Call b = call;
      b.y = y.data();
      b.g = g.data();
      b.out = dx.data();
      b.out2 = dw.data();
      b.parts = parts;
      std::memset(dx.data(), 0, sizeof(float) * dx.size());
      std::memset(dw.data(), 0, sizeof(float) * dw.size());
      jaxconv_avx512::run(b, true);
    };
    std::vector<double> tf, tb;
    fwd(), bwd();
    for (int r = 0; r < reps; ++r) {
      double t0 = now();
      fwd();
      double t1 = now();
      bwd();
      double t2 = now();
      tf.push_back(t1 - t0), tb.push_back(t2 - t1);
    }
    auto med = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2] * 1e3;
    };
    auto best = [](const std::vector<double>& v) {
      return *std::min_element(v.begin(), v.end()) * 1e3;
    };
    double cx = 0, cw = 0;
    for (float v : dx) cx += v;
    for (float v : dw) cw += v;
    printf("op %d  fwd %.3f (%.3f)  bwd %.3f (%.3f) ms  chk dx %.9g dw %.9g\n", op, med(tf),
           best(tf), med(tb), best(tb), cx, cw);
    if (dump) {
      fwrite(dx.data(), sizeof(float), dx.size(), dump);
      fwrite(dw.data(), sizeof(float), dw.size(), dump);
    }
  }
  if (dump) fclose(dump);
}
