// The tuning parameters of this process and the timing probe of their search (tune_probe.h).
#include "tune_probe.h"

#include <array>
#include <cstring>
#include <ctime>
#include <map>
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

namespace {

// Whether x (n, h, w, c) * w (k, k, c, o) is a probe problem: a built-in op, small, non-empty.
void check(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k, int64_t o,
           int64_t reps, const char* what) {
  if (op < 0 || op >= jaxconv::kNumBuiltinOps) throw nb::value_error("jaxconv: unknown op id");
  if (n < 1 || h < k || wd < k || c < 1 || k < 1 || o < 1 || reps < 1 ||
      n * h * wd * c > (int64_t(1) << 24) || k * k * c * o > (int64_t(1) << 24))
    throw nb::value_error(what);
}

// Fills `n` floats with pseudo-random values in [-1, 1) from the generator's state `s`;
// returns the state after them.
uint32_t fill(float* v, int64_t n, uint32_t s) {
  for (int64_t j = 0; j < n; ++j) {
    s = s * 1664525u + 1013904223u;
    v[j] = float(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
  }
  return s;
}

// One probe problem (`check`): x (n, h, w, c) * w (k, k, c, o), VALID, on fixed pseudo-random
// data, with a cotangent of the same kind and the forward output (default parameters) for
// the backward, made at its first backward; single-threaded.
struct Probe {
  jaxconv::Call call{};
  std::unique_ptr<float[]> x, w, yf, y, g, dx, dw;
  int64_t nx = 0, nw = 0, ny = 0;
  bool backward_ready = false;

  Probe(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k, int64_t o) {
    jaxconv::Geom& gm = call.geom;
    gm.n = n;
    gm.sp[0] = 1, gm.sp[1] = h, gm.sp[2] = wd;
    gm.c = c, gm.i = c, gm.o = o, gm.g = 1;
    gm.k[0] = 1, gm.k[1] = k, gm.k[2] = k;
    gm.os[0] = 1, gm.os[1] = h - k + 1, gm.os[2] = wd - k + 1;
    for (int a = 0; a < 3; ++a) gm.stride[a] = 1, gm.lo[a] = 0, gm.ld[a] = 1, gm.rd[a] = 1;
    nx = n * h * wd * c, nw = k * k * c * o, ny = n * gm.os[1] * gm.os[2] * o;
    x.reset(new float[size_t(nx)]);
    w.reset(new float[size_t(nw)]);
    yf.reset(new float[size_t(ny)]);
    fill(w.get(), nw, fill(x.get(), nx, 12345));
    call.op = op;
    call.batch = 1;
    call.x = x.get();
    call.w = w.get();
    call.par = {serial, nullptr};
  }

  // Makes the backward's operands once: the forward output y (default parameters), the
  // cotangent g, the gradients' buffers. Returns false when the kernels refuse the forward.
  bool to_backward() {
    if (backward_ready) return true;
    y.reset(new float[size_t(ny)]);
    call.out = y.get();
    call.params = nullptr;  // the defaults
    jaxconv_dispatch::FlushDenormals flush;
    if (jaxconv_dispatch::run_kernels(call, false) != 0) return false;
    g.reset(new float[size_t(ny)]);
    fill(g.get(), ny, 54321);
    dx.reset(new float[size_t(nx)]);
    dw.reset(new float[size_t(nw)]);
    backward_ready = true;
    return true;
  }

  // The best of `reps` runs (seconds of this thread's CPU time, so that time the thread
  // spends descheduled on a busy machine does not count) under `p`; negative when the kernels
  // refuse the call. The forward writes yf (never y, the backward's operand); the backward's
  // gradients are zeroed before each run, outside the timing (as the FFI does).
  double time(const jaxconv::Params& p, int64_t reps, bool backward) {
    if (backward) {
      call.y = y.get(), call.g = g.get(), call.out = dx.get(), call.out2 = dw.get();
      call.parts = 3;
    } else {
      call.y = nullptr, call.g = nullptr, call.out = yf.get(), call.out2 = nullptr;
      call.parts = 0;
    }
    call.params = &p;
    jaxconv_dispatch::FlushDenormals flush;
    double best = -1.0;
    for (int64_t r = 0; r < reps; ++r) {
      if (backward) {
        std::memset(dx.get(), 0, sizeof(float) * size_t(nx));
        std::memset(dw.get(), 0, sizeof(float) * size_t(nw));
      }
      timespec t0, t1;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
      const int rc = jaxconv_dispatch::run_kernels(call, backward);
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
      if (rc != 0) return -1.0;
      const double dt = double(t1.tv_sec - t0.tv_sec) + 1e-9 * double(t1.tv_nsec - t0.tv_nsec);
      if (best < 0 || dt < best) best = dt;
    }
    call.params = nullptr;
    return best;
  }
};

// This thread's probe problems, kept from one call to the next until `release_probes`: a
// search times each a few dozen times, and making its data (and a backward's forward output)
// took more CPU than the timed runs (Zen 4: 2.35 ms per call of the dense adder backward
// probe, of which 1.04 ms were its two runs). At most kMaxProbes are kept.
using ProbeKey = std::array<int64_t, 7>;
constexpr size_t kMaxProbes = 16;
thread_local std::map<ProbeKey, std::unique_ptr<Probe>> t_probes;

Probe& probe(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k, int64_t o) {
  const ProbeKey key{op, n, h, wd, c, k, o};
  auto it = t_probes.find(key);
  if (it == t_probes.end()) {
    if (t_probes.size() >= kMaxProbes) t_probes.clear();
    it = t_probes.emplace(key, std::make_unique<Probe>(op, n, h, wd, c, k, o)).first;
  }
  return *it->second;
}

}  // namespace

// The best of `reps` single-threaded forward runs of built-in op `op` with the parameters `d`
// on x (n, h, w, c) * w (k, k, c, o), VALID (Probe). Negative when the kernels refuse the call.
double time_forward(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k,
                    int64_t o, int64_t reps, const nb::dict& d) {
  const jaxconv::Params p = params_from(d);
  check(op, n, h, wd, c, k, o, reps,
        "jaxconv: time_forward's problem must be small and non-empty");
  return probe(op, n, h, wd, c, k, o).time(p, reps, false);
}

// The same for the backward (both gradients, no winner record: max / min rescan) of the
// problem's forward output (made once with the default parameters) and a fixed cotangent.
double time_backward(int64_t op, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t k,
                     int64_t o, int64_t reps, const nb::dict& d) {
  const jaxconv::Params p = params_from(d);
  check(op, n, h, wd, c, k, o, reps,
        "jaxconv: time_backward's problem must be small and non-empty");
  Probe& pr = probe(op, n, h, wd, c, k, o);
  if (!pr.to_backward()) return -1.0;
  return pr.time(p, reps, true);
}

// Frees this thread's probe problems (`probe`); returns how many there were.
int64_t release_probes() {
  const int64_t n = int64_t(t_probes.size());
  t_probes.clear();
  return n;
}

}  // namespace jaxconv_tune
