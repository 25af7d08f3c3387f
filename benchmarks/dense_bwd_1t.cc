// One thread's CPU time of the dense max / min product's recording forward and recorded
// backward (kernel_dense_record.h, kernel_dense_backward.h) straight on the kernel template,
// without JAX: x(256, 1024) w(1024, 1024) (or M K N from the environment), cotangent of ones.
// Prints per op the median and best of `reps` calls of: the plain forward, the recording
// forward, the backward on its record (dx zeroed first, as the FFI does), and their sum, with
// a checksum of y, dx and dw. DUMP=path writes y, the record, dx and dw (raw, in that order)
// for a bit-for-bit comparison of two builds. TIES=1 draws small integers (many ties).
// Build (against any checkout's csrc/, e.g. an old commit's via git archive) and run:
//   g++ -O3 -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx2 -ffp-contract=off \
//       -fno-math-errno -std=c++17 -pthread -Icsrc benchmarks/dense_bwd_1t.cc -o /tmp/dbwd
//   /tmp/dbwd 0,1 15            (ops: csrc/problem.h's ids)
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
  const std::vector<int> ops = ints(argc > 1 ? argv[1] : "0,1");
  const int reps = argc > 2 ? atoi(argv[2]) : 15;
  const int M = env("M", 256), K = env("K", 1024), N = env("N", 1024);
  const bool ties = getenv("TIES") != nullptr;
  std::vector<float> x(size_t(M) * K), w(size_t(K) * N), y(size_t(M) * N), g(size_t(M) * N, 1.0f),
      dx(x.size()), dw(w.size());
  std::vector<int32_t> rec(y.size());
  draw(ties, x, w);
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv::Params prm;
  FILE* dump = getenv("DUMP") ? fopen(getenv("DUMP"), "wb") : nullptr;
  for (int op : ops) {
    jaxconv::Call call = forward_call(dense_geom(M, K, N), op, x.data(), w.data(), &prm);
    auto fwd = [&](bool record) {
      call.out = y.data();
      call.rec = record ? rec.data() : nullptr;
      jaxconv_avx512::run(call, false);
    };
    auto bwd = [&] {
      jaxconv::Call b = backward_call(call, y.data(), g.data(), dx.data(), dw.data(), 3);
      b.rec = rec.data();
      std::memset(dx.data(), 0, sizeof(float) * dx.size());
      if (rec[0] < 0) std::memset(dw.data(), 0, sizeof(float) * dw.size());
      jaxconv_avx512::run(b, true);
    };
    std::vector<double> tf, tr, tb, tt;
    fwd(false), fwd(true), bwd();
    for (int r = 0; r < reps; ++r) {
      double t0 = now();
      fwd(false);
      double t1 = now();
      fwd(true);
      double t2 = now();
      bwd();
      double t3 = now();
      tf.push_back(t1 - t0), tr.push_back(t2 - t1), tb.push_back(t3 - t2), tt.push_back(t3 - t1);
    }
    double cy = 0, cx = 0, cw = 0;
    for (float v : y) cy += v;
    for (float v : dx) cx += v;
    for (float v : dw) cw += v;
    printf("op %d  fwd %.3f (%.3f)  rec %.3f (%.3f)  bwd %.3f (%.3f)  rec+bwd %.3f (%.3f) ms  "
           "chk y %.6g dx %.6g dw %.6g\n",
           op, med(tf), best(tf), med(tr), best(tr), med(tb), best(tb), med(tt), best(tt), cy, cx,
           cw);
    if (dump) {
      fwrite(y.data(), sizeof(float), y.size(), dump);
      fwrite(rec.data(), sizeof(int32_t), rec.size(), dump);
      fwrite(dx.data(), sizeof(float), dx.size(), dump);
      fwrite(dw.data(), sizeof(float), dw.size(), dump);
    }
  }
  if (dump) fclose(dump);
}
