// One thread's CPU time of a compiled user op's forward and backward (both gradients) straight
// on the kernel template, without JAX: layer A (x(8, 32, 32, 64) w(3, 3, 64, 64) SAME,
// identity padding; 302 M terms), or with DENSE=1 layer E (x(256, 1024) w(1024, 1024)).
// Written for the logsumexp ops (the seed op, the tempered logsumexp: kernel_logsum.h,
// kernel_lsebwd_ivec.h) but any float32 user op's generated source serves. Prints the median
// and best of `reps` calls of each pass and checksums of y, dx and dw; DUMP=path writes y, dx
// and dw (raw) for comparing two builds.
// The functor source: `python -m benchmarks.lsebwd_functor seed > /tmp/seed.cc` (or
// `tempered`), then build against any checkout's csrc/ (e.g. an old commit's via git archive):
//   g++ -O3 -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx2 -ffp-contract=off \
//       -fno-math-errno -std=c++17 -pthread -Icsrc -DFUNCTOR='"/tmp/seed.cc"' \
//       benchmarks/lsebwd_1t.cc -o /tmp/lse_new
//   /tmp/lse_new 15
// Alternate two builds (old, new) several times and compare medians; say the load.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include FUNCTOR
#include "denormals.h"
#include "harness_1t.h"

int main(int argc, char** argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 15;
  const bool dense = getenv("DENSE") != nullptr;
  const int N = dense ? 256 : 8, H = dense ? 1 : 32, Wd = dense ? 1 : 32, C = dense ? 1024 : 64,
            K = dense ? 1 : 3, O = dense ? 1024 : 64;
  std::vector<float> x(size_t(N) * H * Wd * C), w(size_t(K) * K * C * O),
      y(size_t(N) * H * Wd * O), g(y.size()), dx(x.size()), dw(w.size());
  draw(false, x, w, g);
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv::Params prm;
  jaxconv::Call call = forward_call(conv_geom(N, H, Wd, C, K, O), 0, x.data(), w.data(), &prm);
  call.out = y.data();
  auto fwd = [&] { jaxconv_user_run(&call, 0); };
  auto bwd = [&] {
    jaxconv::Call b = backward_call(call, y.data(), g.data(), dx.data(), dw.data(), 3);
    b.zero_dx = b.zero_dw = true;
    jaxconv_user_run(&b, 1);
  };
  std::vector<double> tf, tb;
  fwd(), bwd();
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
    fwd();
    const double t1 = now();
    bwd();
    const double t2 = now();
    tf.push_back(t1 - t0), tb.push_back(t2 - t1);
  }
  double cy = 0, cx = 0, cw = 0;
  for (float v : y) cy += v;
  for (float v : dx) cx += v;
  for (float v : dw) cw += v;
  printf("fwd %.3f (%.3f)  bwd %.3f (%.3f) ms  chk y %.9g dx %.9g dw %.9g\n", med(tf), best(tf),
         med(tb), best(tb), cy, cx, cw);
  if (getenv("DUMP")) {
    FILE* f = fopen(getenv("DUMP"), "wb");
    fwrite(y.data(), sizeof(float), y.size(), f);
    fwrite(dx.data(), sizeof(float), dx.size(), f);
    fwrite(dw.data(), sizeof(float), dw.size(), f);
    fclose(f);
  }
}
