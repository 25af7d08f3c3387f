// One thread's CPU time of the dense max / min product on bfloat16 / float16 operands under a
// gradient (the low recording forward, kernel_bf16fuse_low.h with kernel_lowrec_mark.h and
// kernel_lowdense_record.h, and the low recorded backward, kernel_lowrec_backward.h /
// kernel_lowdense_backward.h) straight on the kernels, without JAX, beside the same op in
// float32 (the recording forward and recorded backward): x(256, 1024) w(1024, 1024) (or M K N
// from the environment), a cotangent of ones in the low dtype.
// Prints per op and dtype the median and best of `reps` calls of: the recording forward, the
// backward on its record, their sum, and the sum's ratio to float32's (medians), with a
// checksum. DUMP=path writes y, dx and dw (raw, per op and dtype) for a bit-for-bit comparison
// of two builds; TIES=1 draws small integers (many ties).
// Build against any checkout's csrc/ (e.g. main's via git archive) and run:
//   F="-O3 -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx2 -ffp-contract=off \
//      -fno-math-errno -std=c++17 -pthread -Icsrc"
//   g++ $F -c csrc/kernels_avx512.cc -o /tmp/k.o && g++ $F -c csrc/wide_avx512.cc -o /tmp/w.o
//   g++ $F benchmarks/lowdense_1t.cc /tmp/k.o /tmp/w.o -o /tmp/lowdense
//   /tmp/lowdense 0,1,2,3 1,2 15        (ops: csrc/problem.h's ids; dtypes: 1 bf16, 2 f16)
// Alternate two builds (old, new) several times and compare medians; say the load.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "denormals.h"
#include "problem.h"
#include "wide.h"
#include "harness_1t.h"

namespace jaxconv_avx512 {
int run(const jaxconv::Call& call, bool backward);
}
namespace jaxconv_wide_avx512 {
int run_backward(const jaxconv::WideCall& call);
}

// A float32 value rounded to bfloat16 (kind 1) or float16 (kind 2), nearest even (finite).
static uint16_t narrow(int kind, float f) {
  if (kind == 1) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

int main(int argc, char** argv) {
  const std::vector<int> ops = ints(argc > 1 ? argv[1] : "0,1");
  const std::vector<int> kinds = ints(argc > 2 ? argv[2] : "1,2");
  const int reps = argc > 3 ? atoi(argv[3]) : 15;
  const int M = env("M", 256), K = env("K", 1024), N = env("N", 1024);
  const bool ties = getenv("TIES") != nullptr;
  std::vector<float> x(size_t(M) * K), w(size_t(K) * N), y(size_t(M) * N), g(y.size(), 1.0f),
      dx(x.size()), dw(w.size());
  std::vector<int32_t> rec(y.size());
  draw(ties, x, w);
  std::vector<uint16_t> x16(x.size()), w16(w.size()), y16(y.size()), g16(y.size()),
      dx16(x.size()), dw16(w.size());
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv::Params prm;
  FILE* dump = getenv("DUMP") ? fopen(getenv("DUMP"), "wb") : nullptr;
  const jaxconv::Geom gm = dense_geom(M, K, N);
  for (int op : ops) {
    // float32: the recording forward and the recorded backward.
    jaxconv::Call call = forward_call(gm, op, x.data(), w.data(), &prm);
    std::vector<double> t32, r32;
    for (int r = 0; r <= reps; ++r) {
      const double t0 = now();
      call.out = y.data();
      call.rec = rec.data();
      jaxconv_avx512::run(call, false);
      const double t1 = now();
      jaxconv::Call b = backward_call(call, y.data(), g.data(), dx.data(), dw.data(), 3);
      std::memset(dx.data(), 0, sizeof(float) * dx.size());
      if (rec[0] < 0) std::memset(dw.data(), 0, sizeof(float) * dw.size());
      jaxconv_avx512::run(b, true);
      if (r > 0) t32.push_back(now() - t0), r32.push_back(t1 - t0);
    }
    for (int kind : kinds) {
      for (size_t i = 0; i < x.size(); ++i) x16[i] = narrow(kind, x[i]);
      for (size_t i = 0; i < w.size(); ++i) w16[i] = narrow(kind, w[i]);
      for (auto& v : g16) v = narrow(kind, 1.0f);
      jaxconv::LowIO io{kind, 1, x16.data(), w16.data(), y16.data(), -1};
      jaxconv::Call lc = call;
      lc.x = nullptr;
      lc.w = nullptr;
      lc.out = nullptr;
      lc.low = &io;
      lc.rec = rec.data();
      jaxconv::WideCall wc{};
      wc.op = op;
      wc.type = jaxconv::kWideF32;
      wc.geom = gm;
      wc.batch = 1;
      wc.x = x16.data();
      wc.w = w16.data();
      wc.y = y16.data();
      wc.g = g16.data();
      wc.out = dx16.data();
      wc.out2 = dw16.data();
      wc.round = kind == 1 ? jaxconv::kRoundBF16 : jaxconv::kRoundF16;
      wc.par = {serial, nullptr};
      wc.low_x = wc.low_y = wc.low_g = 1;
      wc.rec = rec.data();
      std::vector<double> tr, tb, tt;
      for (int r = 0; r <= reps; ++r) {
        const double t0 = now();
        jaxconv_avx512::run(lc, false);
        const double t1 = now();
        jaxconv_wide_avx512::run_backward(wc);
        const double t2 = now();
        if (r > 0) tr.push_back(t1 - t0), tb.push_back(t2 - t1), tt.push_back(t2 - t0);
      }
      double cs = 0;
      for (uint16_t v : dx16) cs += v;
      for (uint16_t v : dw16) cs += v;
      printf("op %d %s  rec %.3f (%.3f)  bwd %.3f (%.3f)  rec+bwd %.3f (%.3f) ms  f32 %.3f "
             "(rec %.3f)  ratio %.3f  chk %.17g\n",
             op, kind == 1 ? "bf16" : "f16 ", med(tr), best(tr), med(tb), best(tb), med(tt),
             best(tt), med(t32), med(r32), med(tt) / med(t32), cs);
      if (dump) {
        fwrite(y16.data(), 2, y16.size(), dump);
        fwrite(dx16.data(), 2, dx16.size(), dump);
        fwrite(dw16.data(), 2, dw16.size(), dump);
      }
    }
  }
  if (dump) fclose(dump);
}
