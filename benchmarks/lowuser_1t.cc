// One thread's CPU time of a compiled user max / min op on a convolution under a gradient,
// bfloat16 / float16 operands (the low recording forward through the user's float32 library,
// kernel_bf16fuse_low.h with kernel_lowrec_mark.h, and the low recorded backward through its
// wide library, kernel_lowrec_backward.h) beside the same op in float32 (its recording forward
// and recorded backward, kernel_convrec_*.h), straight on the two generated libraries, without
// JAX: layer A, x(8, 32, 32, 64) w(3, 3, 64, 64) SAME (or N H C O from the environment),
// standard normal data, a cotangent of 1e-3 (G=clip: 1e-3 times the derivative of
// clip(y, -1, 1), as a user clip under max, whose clip runs once per output after the max
// (factoring.py), gives the product's backward: zero where y saturates, half at +-1;
// G=sparse: 1e-3 on about a third of the outputs, zero elsewhere).
// Prints per dtype the median and best of `reps` calls of: the recording forward, the backward
// on its record, their sum, the same three in float32, and the sums' ratio (medians), with
// a checksum, and (TIES=1, for a product x * w) the share of outputs that tie (two winners
// or more) and their mean winner count. DUMP=path writes y, dx and dw (raw, per dtype) for a bit-for-bit comparison of two
// builds; LOW_ONLY=1 runs float32 once (a profile of the low calls).
// The libraries are the generated sources of `python -m benchmarks.lowuser_src OP DIR` built
// against a checkout's csrc/ (old and new alike), e.g.:
//   python -m benchmarks.lowuser_src max_times /tmp/u
//   F="-O3 -mavx2 -mfma -mf16c -ffp-contract=off -fno-math-errno -std=c++17 -fPIC -shared"
//   g++ $F -Icsrc /tmp/u/f32.cc -o /tmp/u/f32.so && g++ $F -Icsrc /tmp/u/wide.cc -o /tmp/u/wide.so
//   g++ -O2 -std=c++17 -Icsrc benchmarks/lowuser_1t.cc -ldl -o /tmp/lowuser
//   /tmp/lowuser /tmp/u/f32.so /tmp/u/wide.so 1,2 9
// Alternate two builds' libraries (old, new) several times and compare medians; say the load.
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "denormals.h"
#include "problem.h"
#include "wide.h"
#include "harness_1t.h"

using RunF32 = int (*)(const jaxconv::Call*, int);
using RunWide = int (*)(const jaxconv::WideCall*, int);

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

// The float32 value of a bfloat16 (kind 1) or float16 (kind 2).
static float widen(int kind, uint16_t h) {
  if (kind == 1) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return float(v);
}

// Standard normal values from one linear congruential stream (Box-Muller), seeded 12345.
static void normal(std::vector<float>& a, uint32_t& s) {
  auto unif = [&s]() {
    s = s * 1664525u + 1013904223u;
    return (double(s >> 8) + 0.5) / 16777216.0;
  };
  for (auto& e : a) e = float(std::sqrt(-2.0 * std::log(unif())) * std::cos(6.283185307179586 * unif()));
}

static void* sym(const char* lib, const char* name) {
  void* h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
  void* f = h ? dlsym(h, name) : nullptr;
  if (!f) {
    fprintf(stderr, "%s: %s\n", lib, dlerror());
    exit(2);
  }
  return f;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s f32.so wide.so [kinds] [reps]\n", argv[0]);
    return 2;
  }
  const auto run32 = reinterpret_cast<RunF32>(sym(argv[1], "jaxconv_user_run"));
  const auto runw = reinterpret_cast<RunWide>(sym(argv[2], "jaxconv_user_run"));
  const std::vector<int> kinds = ints(argc > 3 ? argv[3] : "1,2");
  const int reps = argc > 4 ? atoi(argv[4]) : 9;
  const int N = env("N", 8), H = env("H", 32), C = env("C", 64), O = env("O", 64);
  const jaxconv::Geom gm = conv_geom(N, H, H, C, 3, O);
  std::vector<float> x(size_t(N) * H * H * C), w(size_t(9) * C * O), y(size_t(N) * H * H * O),
      g(y.size(), 1.0f), dx(x.size()), dw(w.size());
  std::vector<int32_t> rec(y.size());
  uint32_t seed = 12345;
  normal(x, seed);
  normal(w, seed);
  std::vector<uint16_t> x16(x.size()), w16(w.size()), y16(y.size()), g16(y.size()),
      dx16(x.size()), dw16(w.size());
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv::Params prm;
  FILE* dump = getenv("DUMP") ? fopen(getenv("DUMP"), "wb") : nullptr;
  for (int kind : kinds) {
    // Both dtypes run on the low dtype's values (float32 on the widened copies).
    for (size_t i = 0; i < x.size(); ++i) x16[i] = narrow(kind, x[i]);
    for (size_t i = 0; i < w.size(); ++i) w16[i] = narrow(kind, w[i]);
    std::vector<float> xl(x.size()), wl(w.size());
    for (size_t i = 0; i < x.size(); ++i) xl[i] = widen(kind, x16[i]);
    for (size_t i = 0; i < w.size(); ++i) wl[i] = widen(kind, w16[i]);
    jaxconv::Call call = forward_call(gm, 0, xl.data(), wl.data(), &prm);
    const bool clip = getenv("G") && std::strcmp(getenv("G"), "clip") == 0;
    const bool sparse = getenv("G") && std::strcmp(getenv("G"), "sparse") == 0;
    auto cot = [clip, sparse](float yv) {
      const float a = std::fabs(yv);
      if (sparse) return std::fmod(a * 64.0f, 3.0f) < 1.0f ? 1e-3f : 0.0f;  // a third
      return clip ? (a < 1.0f ? 1e-3f : a == 1.0f ? 0.5e-3f : 0.0f) : 1e-3f;
    };
    call.out = y.data();
    call.rec = rec.data();
    if (run32(&call, 0) != 0) return 3;
    for (size_t i = 0; i < y.size(); ++i) g[i] = cot(y[i]);
    std::vector<double> f32, r32, b32;
    for (int r = 0; r <= (getenv("LOW_ONLY") ? 1 : reps); ++r) {  // LOW_ONLY: one call
      const double t0 = now();
      call.out = y.data();
      call.rec = rec.data();
      if (run32(&call, 0) != 0) return 3;
      const double t1 = now();
      jaxconv::Call b = backward_call(call, y.data(), g.data(), dx.data(), dw.data(), 3);
      std::memset(dx.data(), 0, sizeof(float) * dx.size());
      std::memset(dw.data(), 0, sizeof(float) * dw.size());
      if (run32(&b, 1) != 0) return 3;
      const double t2 = now();
      if (r > 0) f32.push_back(t2 - t0), r32.push_back(t1 - t0), b32.push_back(t2 - t1);
    }
    jaxconv::LowIO io{kind, 1, x16.data(), w16.data(), y16.data(), -1};
    jaxconv::Call lc = call;
    lc.x = nullptr;
    lc.w = nullptr;
    lc.out = nullptr;
    lc.low = &io;
    lc.rec = rec.data();
    if (run32(&lc, 0) != 0) return 3;
    for (size_t i = 0; i < y.size(); ++i) g16[i] = narrow(kind, cot(widen(kind, y16[i])));
    jaxconv::WideCall wc{};
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
      if (run32(&lc, 0) != 0) return 3;
      const double t1 = now();
      std::memset(dx16.data(), 0, 2 * dx16.size());
      std::memset(dw16.data(), 0, 2 * dw16.size());
      if (runw(&wc, 1) != 0) return 3;
      const double t2 = now();
      if (r > 0) tr.push_back(t1 - t0), tb.push_back(t2 - t1), tt.push_back(t2 - t0);
    }
    // Ties: the outputs with two winners or more (products rounding to y), counted here.
    int64_t tied = 0, wins = 0;
    if (getenv("TIES")) {
      for (int n = 0; n < N; ++n)
        for (int p = 0; p < H * H; ++p)
          for (int o = 0; o < O; ++o) {
            const float yv = widen(kind, y16[(size_t(n) * H * H + p) * O + o]);
            int c = 0;
            for (int t = 0; t < 9; ++t) {
              const int hi = p / H + t / 3 - 1, wi = p % H + t % 3 - 1;
              if (hi < 0 || hi >= H || wi < 0 || wi >= H) continue;
              for (int i = 0; i < C; ++i) {
                const float a = xl[((size_t(n) * H + hi) * H + wi) * C + i];
                c += widen(kind, narrow(kind, a * wl[(size_t(t) * C + i) * O + o])) == yv;
              }
            }
            tied += c > 1;
            wins += c > 1 ? c : 0;
          }
    }
    double cs = 0;
    for (uint16_t v : dx16) cs += v;
    for (uint16_t v : dw16) cs += v;
    printf("%s  rec %.2f (%.2f)  bwd %.2f (%.2f)  f+b %.2f  | f32 rec %.2f  bwd %.2f  f+b %.2f "
           "| ratio rec %.3f bwd %.3f f+b %.3f  chk %.17g",
           kind == 1 ? "bf16" : "f16 ", med(tr), best(tr), med(tb), best(tb), med(tt), med(r32),
           med(b32), med(f32), med(tr) / med(r32), med(tb) / med(b32), med(tt) / med(f32), cs);
    if (tied)
      printf("  ties %.4f of outputs, %.1f winners each", double(tied) / double(y.size()),
             double(wins) / double(tied));
    printf("\n");
    if (dump) {
      fwrite(y16.data(), 2, y16.size(), dump);
      fwrite(dx16.data(), 2, dx16.size(), dump);
      fwrite(dw16.data(), 2, dw16.size(), dump);
    }
  }
  if (dump) fclose(dump);
}
