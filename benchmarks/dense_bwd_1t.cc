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
  uint32_t s = 12345;
  auto next = [&s, ties] {
    s = s * 1664525u + 1013904223u;
    return ties ? float(int((s >> 8) % 7) - 3) : float(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
  };
  for (auto& v : x) v = next();
  for (auto& v : w) v = next();
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv::Params prm;
  FILE* dump = getenv("DUMP") ? fopen(getenv("DUMP"), "wb") : nullptr;
  for (int op : ops) {
    jaxconv::Call call{};
    jaxconv::Geom& gm = call.geom;
    gm.n = M;
    gm.sp[0] = gm.sp[1] = gm.sp[2] = 1;
    gm.c = gm.i = K;
    gm.o = N;
    gm.g = 1;
    gm.k[0] = gm.k[1] = gm.k[2] = 1;
    gm.os[0] = gm.os[1] = gm.os[2] = 1;
    for (int d = 0; d < 3; ++d) gm.stride[d] = gm.ld[d] = gm.rd[d] = 1, gm.lo[d] = 0;
    call.op = op;
    call.batch = 1;
    call.x = x.data();
    call.w = w.data();
    call.par = {serial, nullptr};
    call.params = &prm;
    auto fwd = [&](bool record) {
      call.out = y.data();
      call.rec = record ? rec.data() : nullptr;
      jaxconv_avx512::run(call, false);
    };
    auto bwd = [&] {
      jaxconv::Call b = call;
      b.y = y.data();
      b.g = g.data();
      b.out = dx.data();
      b.out2 = dw.data();
      b.parts = 3;
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
    auto med = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2] * 1e3;
    };
    auto best = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()) * 1e3; };
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
