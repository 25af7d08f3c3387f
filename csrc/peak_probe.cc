// The peak probe (peak_probe.h): register-tiled loops that mimic the forward kernel's inner
// step (MR broadcast rows x NV vectors of kernel columns) with nothing else in the loop; the
// exp-limited steps are the kernels' own loops (kernel_expfloor_probe.h), timed here.
#include "peak_probe.h"

#include <chrono>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXCONV_PROBE_X86 1
#else
#define JAXCONV_PROBE_X86 0
#endif

// The exp-limited loops, in each instruction set's copy of the kernels (kernels.inc).
namespace jaxconv_base { float exp_probe(int kind, int64_t iters, int* terms, int* lanes); }
#if JAXCONV_PROBE_X86
namespace jaxconv_avx2 { float exp_probe(int kind, int64_t iters, int* terms, int* lanes); }
namespace jaxconv_avx512 { float exp_probe(int kind, int64_t iters, int* terms, int* lanes); }
#endif

namespace jaxconv_probe {
namespace {

// The compiler must not hoist or fold the loop-invariant operands: an empty asm that
// "changes" them costs no instruction.
#if defined(__x86_64__) || defined(_M_X64)
#define JAXCONV_OPAQUE(v) __asm__ volatile("" : "+v"(v))
#elif defined(__aarch64__)
#define JAXCONV_OPAQUE(v) __asm__ volatile("" : "+w"(v))
#else
#define JAXCONV_OPAQUE(v) __asm__ volatile("" : "+m"(v))
#endif

// R rows x C columns of accumulators (registers); `iters` steps of R * C terms each. The sums
// are issued as the kernels issue them by default (`fma_add`: x + w as fma(x, 1, w), which
// keeps them off the ports the max/min use), so a rate is the limit of the kernels' own
// instruction mix. Returns a
// checksum, so that the work is not dead. The kind is a template parameter: one straight loop
// each.
#define JAXCONV_PROBE_BODY(V, SET1, ADD, MAX, MIN, FMA, SUM, R, C)                     \
  V acc[R][C], x[R], w[C], one = SET1(1.0f);                                               \
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) x[r] = SET1(0.001f * float(r + 1));  \
  _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) w[c] = SET1(-0.002f * float(c + 1)); \
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)                                      \
    _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) acc[r][c] = SET1(0.5f);           \
  for (int64_t it = 0; it < iters; ++it) {                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) JAXCONV_OPAQUE(x[r]);              \
    _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) JAXCONV_OPAQUE(w[c]);              \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)                                    \
      _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) {                                \
        if constexpr (K == kFma) acc[r][c] = FMA(x[r], w[c], acc[r][c]);                   \
        else if constexpr (K == kAddMax) acc[r][c] = MAX(acc[r][c], FMA(x[r], one, w[c])); \
        else acc[r][c] = FMA(MIN(x[r], w[c]), one, acc[r][c]);                             \
      }                                                                                    \
  }                                                                                        \
  float s = 0.0f;                                                                          \
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)                                      \
    _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) s += SUM(acc[r][c]);              \
  return s;

// The kind picked at run time, then the straight loop of that kind.
#define JAXCONV_PROBE_DISPATCH(name)                      \
  float name(int kind, int64_t iters) {                   \
    if (kind == kFma) return name##_k<kFma>(iters);       \
    if (kind == kAddMax) return name##_k<kAddMax>(iters); \
    return name##_k<kMinAdd>(iters);                      \
  }

#if JAXCONV_PROBE_X86
__attribute__((target("avx512f"))) inline float sum512(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float s = 0.0f;
  for (float f : t) s += f;
  return s;
}

template <int K>
__attribute__((target("avx512f"))) float loop512_k(int64_t iters) {
  JAXCONV_PROBE_BODY(__m512, _mm512_set1_ps, _mm512_add_ps, _mm512_max_ps, _mm512_min_ps,
                     _mm512_fmadd_ps, sum512, 5, 4)
}
JAXCONV_PROBE_DISPATCH(loop512)

__attribute__((target("avx2,fma"))) inline float sum256(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

template <int K>
__attribute__((target("avx2,fma"))) float loop256_k(int64_t iters) {
  JAXCONV_PROBE_BODY(__m256, _mm256_set1_ps, _mm256_add_ps, _mm256_max_ps, _mm256_min_ps,
                     _mm256_fmadd_ps, sum256, 3, 3)
}
JAXCONV_PROBE_DISPATCH(loop256)
#endif

// The portable loop: 4-wide GCC vectors (SSE on x86, NEON on arm64); its "FMA" is a multiply
// and an add (the library is built without contraction).
typedef float v4 __attribute__((vector_size(16)));
inline v4 set1_4(float a) { return v4{a, a, a, a}; }
inline v4 add4(v4 a, v4 b) { return a + b; }
inline v4 max4(v4 a, v4 b) { return a > b ? a : b; }
inline v4 min4(v4 a, v4 b) { return a < b ? a : b; }
inline v4 fma4(v4 a, v4 b, v4 c) { return a * b + c; }
inline float sum4(v4 a) { return a[0] + a[1] + a[2] + a[3]; }

template <int K>
float loop_base_k(int64_t iters) {
  JAXCONV_PROBE_BODY(v4, set1_4, add4, max4, min4, fma4, sum4, 3, 3)
}
JAXCONV_PROBE_DISPATCH(loop_base)

struct Loop {
  float (*fn)(int, int64_t);
  const char* isa;
  int64_t lanes;
  int64_t terms;  // per iteration and lane: R * C
};

// The exp-limited loops: the kernels' exp_probe of one instruction set, kind passed through.
template <float (*F)(int, int64_t, int*, int*)>
float exp_loop(int kind, int64_t iters) {
  int terms, lanes;
  return F(kind, iters, &terms, &lanes);
}
template <float (*F)(int, int64_t, int*, int*)>
Loop exp_shape(const char* isa) {
  int terms, lanes;
  F(kExp2, 0, &terms, &lanes);
  return {exp_loop<F>, isa, lanes, terms};
}

Loop pick(const std::string& want, int kind) {
  const bool exp = kind == kExp2 || kind == kExp;
#if JAXCONV_PROBE_X86
  __builtin_cpu_init();
  // The exp loops run the kernels' copies, which need what dispatch.cc asks of each.
  const bool avx512 = __builtin_cpu_supports("avx512f") &&
                      (!exp || (__builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl")));
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "avx512"))
    return exp ? exp_shape<jaxconv_avx512::exp_probe>("avx512") : Loop{loop512, "avx512", 16, 20};
  if (avx2 && want != "base")
    return exp ? exp_shape<jaxconv_avx2::exp_probe>("avx2") : Loop{loop256, "avx2", 8, 9};
#endif
  (void)want;
  return exp ? exp_shape<jaxconv_base::exp_probe>("base") : Loop{loop_base, "base", 4, 9};
}

volatile float g_sink;

// The CPUs the probe's threads run on: on Linux, one of the calling thread's CPUs per
// thread, the calling thread on the first, when it has enough; pinned for the probe and put
// back afterwards. Elsewhere (or with fewer CPUs than threads) nothing is pinned.
class Placement {
 public:
  explicit Placement(int threads) {
#if defined(__linux__)
    if (sched_getaffinity(0, sizeof(saved_), &saved_) != 0) return;
    have_saved_ = true;
    for (int c = 0; c < CPU_SETSIZE && int(cpus_.size()) < threads; ++c)
      if (CPU_ISSET(c, &saved_)) cpus_.push_back(c);
    if (int(cpus_.size()) < threads) cpus_.clear();
#else
    (void)threads;
#endif
  }
  ~Placement() {
#if defined(__linux__)
    if (have_saved_) sched_setaffinity(0, sizeof(saved_), &saved_);
#endif
  }
  Placement(const Placement&) = delete;
  Placement& operator=(const Placement&) = delete;

  // Whether there is a CPU for every thread.
  bool planned() const { return !cpus_.empty(); }

  // Pins the calling thread to thread `k`'s CPU; returns whether it now runs there.
  bool pin(int k) const {
#if defined(__linux__)
    if (cpus_.empty()) return false;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpus_[size_t(k)], &one);
    return sched_setaffinity(0, sizeof(one), &one) == 0 && on(k);
#else
    (void)k;
    return false;
#endif
  }

  // Whether the calling thread runs on thread `k`'s CPU now.
  bool on(int k) const {
#if defined(__linux__)
    return !cpus_.empty() && sched_getcpu() == cpus_[size_t(k)];
#else
    (void)k;
    return false;
#endif
  }

 private:
#if defined(__linux__)
  cpu_set_t saved_;
  bool have_saved_ = false;
#endif
  std::vector<int> cpus_;
};

double thread_cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

}  // namespace

Result peak(int kind, int threads, double seconds, const char* isa) {
  const Loop lp = pick(isa ? isa : "", kind);
  if (threads < 1) threads = 1;
  using clock = std::chrono::steady_clock;
  Placement place(threads);
  bool distinct = place.planned() && place.pin(0);
  auto run_once = [&lp, kind](int64_t iters) {
    const auto t0 = clock::now();
    g_sink = lp.fn(kind, iters);
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  // Calibrate on this thread: double the count until one run takes a tenth of the budget.
  int64_t iters = 1 << 10;
  double t = run_once(iters);
  while (t < seconds * 0.02 && iters < (int64_t(1) << 40)) t = run_once(iters *= 2);
  iters = int64_t(double(iters) * seconds * 0.2 / (t > 0 ? t : 1e-9));
  if (iters < 1) iters = 1;
  // Five timed repeats; the best is the peak (a busy machine only ever slows a repeat). Each
  // thread checks that it is on its own CPU when it starts and when it ends its loop.
  double best = 0.0, best_overlap = 0.0, best_cpu = 0.0;
  std::vector<double> cpu_s(size_t(threads), 0.0);
  std::vector<char> placed(size_t(threads), 0);
  auto probe_thread = [&](int k) {
    const bool there = distinct && (k == 0 ? place.on(0) : place.pin(k));
    const double c0 = thread_cpu_seconds();
    g_sink = lp.fn(kind, iters);
    cpu_s[size_t(k)] = thread_cpu_seconds() - c0;
    placed[size_t(k)] = there && place.on(k);
  };
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = clock::now();
    std::vector<std::thread> pool;
    for (int k = 1; k < threads; ++k) pool.emplace_back(probe_thread, k);
    probe_thread(0);
    for (auto& th : pool) th.join();
    const double wall = std::chrono::duration<double>(clock::now() - t0).count();
    const double rate = double(threads) * double(iters) * double(lp.terms * lp.lanes) /
                        (wall > 0 ? wall : 1e-9) * 1e-9;
    double cpu = 0.0, cpu_rate = 0.0;
    for (int k = 0; k < threads; ++k) {
      cpu += cpu_s[size_t(k)];
      cpu_rate += double(iters) * double(lp.terms * lp.lanes) /
                  (cpu_s[size_t(k)] > 0 ? cpu_s[size_t(k)] : 1e-9) * 1e-9;
      distinct = distinct && placed[size_t(k)];
    }
    if (rate > best) best = rate, best_overlap = cpu / (double(threads) * (wall > 0 ? wall : 1e-9));
    if (cpu_rate > best_cpu) best_cpu = cpu_rate;
  }
  return {best, lp.isa, lp.lanes, distinct, best_overlap, best_cpu};
}

}  // namespace jaxconv_probe
