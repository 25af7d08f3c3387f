// The tuning parameters of this process and the timing probe of their search (tune_probe.h).
#include "tune_probe.h"

#include <ctime>
#include <memory>

#include "denormals.h"
#include "dispatch.h"

namespace jaxconv_tune {
namespace {

void serial(void*, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  for (int64_t i = 0; i < n; ++i) fn(arg, i);
}

}  // namespace

// The process's parameters. A set, once published, is never freed: a call in flight on
// another thread may still read the one it loaded (a process sets a handful at most).
std::atomic<const jaxconv::Params*>& current_params() {
  static std::atomic<const jaxconv::Params*> p{new jaxconv::Params()};
  return p;
}

// {name: (default, lowest, highest)} of every parameter (kernel_params.h's one list).
nb::dict param_fields() {
  nb::dict d;
#define JAXCONV_PARAM_ENTRY(name, dflt, lo, hi) \
  d[#name] = nb::make_tuple(int64_t(dflt), int64_t(lo), int64_t(hi));
  JAXCONV_PARAM_FIELDS(JAXCONV_PARAM_ENTRY)
#undef JAXCONV_PARAM_ENTRY
  return d;
}

nb::dict params_dict(const jaxconv::Params& p) {
  nb::dict d;
#define JAXCONV_PARAM_ENTRY(name, dflt, lo, hi) d[#name] = p.name;
  JAXCONV_PARAM_FIELDS(JAXCONV_PARAM_ENTRY)
#undef JAXCONV_PARAM_ENTRY
  return d;
}

// A complete parameter set from a dict naming every field once, each within its range.
jaxconv::Params params_from(const nb::dict& d) {
  jaxconv::Params p;
  size_t seen = 0;
#define JAXCONV_PARAM_ENTRY(name, dflt, lo, hi)                                              \
  if (!d.contains(#name)) throw nb::value_error("jaxconv: parameter '" #name "' is missing"); \
  p.name = nb::cast<int64_t>(d[#name]);                                                     \
  if (p.name < (lo) || p.name > (hi))                                                       \
    throw nb::value_error("jaxconv: parameter '" #name "' must be in [" #lo ", " #hi "]");  \
  ++seen;
  JAXCONV_PARAM_FIELDS(JAXCONV_PARAM_ENTRY)
#undef JAXCONV_PARAM_ENTRY
  if (seen != d.size()) throw nb::value_error("jaxconv: unknown tuning parameter");
  return p;
}

// The best of `reps` single-threaded forward runs (seconds of this thread's CPU time, so that
// time the thread spends descheduled on a busy machine does not count) of built-in op `op` with the
// parameters `d` on x (n, h, w, c) * w (k, k, c, o), VALID, on fixed pseudo-random data in
// [-1, 1) (`shift` added to x: the min form's and the direct loop's cost do not depend on
// it). Negative when the kernels refuse the call.
double time_forward(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k,
                    int64_t o, int64_t reps, const nb::dict& d) {
  if (op < 0 || op >= jaxconv::kNumBuiltinOps) throw nb::value_error("jaxconv: unknown op id");
  if (n < 1 || h < k || wd < k || c < 1 || k < 1 || o < 1 || reps < 1 ||
      n * h * wd * c > (int64_t(1) << 24) || k * k * c * o > (int64_t(1) << 24))
    throw nb::value_error("jaxconv: time_forward's problem must be small and non-empty");
  const jaxconv::Params p = params_from(d);
  jaxconv::Call call{};
  jaxconv::Geom& g = call.geom;
  g.n = n;
  g.sp[0] = 1, g.sp[1] = h, g.sp[2] = wd;
  g.c = c, g.i = c, g.o = o, g.g = 1;
  g.k[0] = 1, g.k[1] = k, g.k[2] = k;
  g.os[0] = 1, g.os[1] = h - k + 1, g.os[2] = wd - k + 1;
  for (int a = 0; a < 3; ++a) g.stride[a] = 1, g.lo[a] = 0, g.ld[a] = 1, g.rd[a] = 1;
  std::unique_ptr<float[]> x(new float[size_t(n * h * wd * c)]);
  std::unique_ptr<float[]> w(new float[size_t(k * k * c * o)]);
  std::unique_ptr<float[]> y(new float[size_t(n * g.os[1] * g.os[2] * o)]);
  uint32_t s = 12345;
  auto next = [&s] {
    s = s * 1664525u + 1013904223u;
    return float(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
  };
  for (int64_t j = 0; j < n * h * wd * c; ++j) x[j] = next();
  for (int64_t j = 0; j < k * k * c * o; ++j) w[j] = next();
  call.op = op;
  call.batch = 1;
  call.x = x.get();
  call.w = w.get();
  call.out = y.get();
  call.par = {serial, nullptr};
  call.params = &p;
  jaxconv_dispatch::FlushDenormals flush;
  double best = -1.0;
  for (int64_t r = 0; r < reps; ++r) {
    timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    if (jaxconv_dispatch::run_kernels(call, false) != 0) return -1.0;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    const double dt = double(t1.tv_sec - t0.tv_sec) + 1e-9 * double(t1.tv_nsec - t0.tv_nsec);
    if (best < 0 || dt < best) best = dt;
  }
  return best;
}

}  // namespace jaxconv_tune
