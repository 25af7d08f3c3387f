// One thread's CPU time of the sums' backward (adder, l1, l2_exact: kernel_sums*.h) straight on
// the kernel template, without JAX: layer A (x(8, 32, 32, 64) w(3, 3, 64, 64) SAME; adder pads
// with 0) or, with DENSE=1, layer E (x(256, 1024) w(1024, 1024); or M K N from the environment). Prints per op the median and
// best of `reps` calls of the forward and of the backward (both gradients, parts = 3), with checksums of dx and dw. DUMP=path writes dx and dw
// (raw) for a bit-for-bit comparison of two builds; PARTS=1 or 2 times one gradient. The
// timed backward includes the zeroing of dx and dw where the kernel does it (Call::zero_dx;
// before 2026-12-07 the FFI did, and this harness timed its memsets).
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
  draw(false, x, w, g);
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv::Params prm;
  FILE* dump = getenv("DUMP") ? fopen(getenv("DUMP"), "wb") : nullptr;
  for (int op : ops) {
    jaxconv::Call call =
        forward_call(conv_geom(N, H, Wd, C, K, O), op, x.data(), w.data(), &prm);
    call.geom.has_pad = op == 4 && !dense;  // adder pads with 0
    auto fwd = [&] {
      call.out = y.data();
      jaxconv_avx512::run(call, false);
    };
    // dx and dw left to the kernel to zero, as the FFI leaves them (Call::zero_dx); poisoned
    // first (untimed), so a pass that skipped an entry would show.
    auto poison = [&] {
      std::memset(dx.data(), 0xff, sizeof(float) * dx.size());
      std::memset(dw.data(), 0xff, sizeof(float) * dw.size());
    };
    auto bwd = [&] {
      jaxconv::Call b = backward_call(call, y.data(), g.data(), dx.data(), dw.data(), parts);
      b.zero_dx = b.zero_dw = true;
      jaxconv_avx512::run(b, true);
    };
    std::vector<double> tf, tb;
    fwd(), poison(), bwd();
    for (int r = 0; r < reps; ++r) {
      double t0 = now();
      fwd();
      poison();
      double t1 = now();
      bwd();
      double t2 = now();
      tf.push_back(t1 - t0), tb.push_back(t2 - t1);
    }
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
