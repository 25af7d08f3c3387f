// Single-thread (or two-thread) forward of the built-in ops straight on the kernel template,
// without JAX: layer A (x(8, 32, 32, 64) w(3, 3, 64, 64) SAME; adder pads with 0) or, with
// DENSE=1, layer E (x(256, 1024) w(1024, 1024)). Prints per op the best and the median of
// `reps` calls: this thread's CPU time (one thread) or wall time (TWO=1: this thread and one
// helper share the items), G terms/s and a checksum. Tuning parameters as name=value. With
// REC=1 it times the recording forward of the max / min ops (call.rec: y and the winner block
// masks, kernel_dense_record.h / kernel_convrec_forward.h); the checksum adds the masks.
// Build (against any checkout's csrc/, e.g. an old commit's via git archive) and run:
//   g++ -O3 -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx2 -ffp-contract=off \
//       -fno-math-errno -std=c++17 -pthread -Icsrc benchmarks/fwd_1t.cc -o /tmp/fwd_1t
//   /tmp/fwd_1t 0,1,2,3,4,5,6 15 [fma_add=0 ...]     (ops: csrc/problem.h's ids)
// Alternate two builds (old, new) several times and compare medians; say the load.
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>
#include <algorithm>
#include <string>
#include "denormals.h"
#define JAXCONV_NS jaxconv_avx512
#include "kernels.inc"
#include "harness_1t.h"

#include <atomic>
#include <thread>
// Two threads (this one and a helper) taking items from one counter.
static void two(void*, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  std::atomic<int64_t> next{0};
  auto work = [&] { jaxconv_dispatch::FlushDenormals f; for (int64_t i; (i = next.fetch_add(1)) < n;) fn(arg, i); };
  std::thread t(work);
  work();
  t.join();
}
static double wall() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

int main(int argc, char** argv) {
  // usage: bench ops(comma ids) reps [name=val ...]
  const std::vector<int> ops = ints(argc > 1 ? argv[1] : "0,1,2,3,4,5,6");
  int reps = argc > 2 ? atoi(argv[2]) : 15;
  jaxconv::Params prm;
  for (int a = 3; a < argc; ++a) {
    char name[64]; long v;
    if (sscanf(argv[a], "%63[^=]=%ld", name, &v) != 2) continue;
#define SETP(n, d, lo, hi) if (!strcmp(name, #n)) prm.n = v;
    JAXCONV_PARAM_FIELDS(SETP)
  }
  const bool dense = getenv("DENSE") != nullptr, thr2 = getenv("TWO") != nullptr;
  const int N = dense ? 256 : getenv("BN") ? atoi(getenv("BN")) : 8, H = dense ? 1 : 32, Wd = dense ? 1 : 32, C = dense ? 1024 : 64, K = dense ? 1 : 3, O = dense ? 1024 : 64;
  std::vector<float> x(N * H * Wd * C), w(K * K * C * O), y(N * H * Wd * O);
  std::vector<int32_t> rec(getenv("REC") ? y.size() : 0);
  draw(false, x, w);
  jaxconv_dispatch::FlushDenormals flush;
  for (int op : ops) {
    jaxconv::Call call =
        forward_call(conv_geom(N, H, Wd, C, K, O), op, x.data(), w.data(), &prm);
    call.geom.has_pad = op == 4 && !dense;  // adder pads with 0
    call.out = y.data();
    call.rec = rec.empty() ? nullptr : rec.data();
    if (thr2) call.par = {two, nullptr};
    std::vector<double> ts;
    jaxconv_avx512::run(call, false);
    for (int r = 0; r < reps; ++r) { double t0 = thr2 ? wall() : now(); jaxconv_avx512::run(call, false); ts.push_back((thr2 ? wall() : now()) - t0); }
    std::sort(ts.begin(), ts.end());
    double terms = double(N) * H * Wd * O * K * K * C;
    double chk = 0; for (float v : y) chk += v;
    for (int32_t m : rec) chk += m;
    printf("op %d  min %.3f ms  med %.3f ms  %.1f G/s(min) %.1f G/s(med)  chk %.6g\n", op, ts[0] * 1e3,
           ts[ts.size() / 2] * 1e3, terms / ts[0] * 1e-9, terms / ts[ts.size() / 2] * 1e-9, chk);
  }
}
