// XLA FFI handlers for the semiring kernels and the `jaxconv._native` extension module.
//
// The handlers decode the canonical geometry, run the kernels that dispatch.h picks (the best
// instruction set this CPU has, or a user op's library) and share the work on XLA's intra-op
// thread pool; the module binds them with the tuning parameters (tune_probe.h) and the peak
// probe (peak_probe.h).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "denormals.h"
#include "dispatch.h"
#include "kernel_busy_rescue.h"
#include "kernel_busy_spread.h"
#include "kernel_busy_trace.h"
#include "peak_probe.h"
#include "problem.h"
#include "tune_probe.h"
#include "wide.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace jaxconv_wide_base {
int run(const jaxconv::WideCall& call);
int run_backward(const jaxconv::WideCall& call);
}  // namespace jaxconv_wide_base
#if JAXCONV_X86
namespace jaxconv_wide_avx2 {
int run(const jaxconv::WideCall& call);
int run_backward(const jaxconv::WideCall& call);
}  // namespace jaxconv_wide_avx2
namespace jaxconv_wide_avx512 {
int run(const jaxconv::WideCall& call);
int run_backward(const jaxconv::WideCall& call);
}  // namespace jaxconv_wide_avx512
#endif

#ifdef JAXCONV_BUSY_TRACE
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
namespace {
struct TraceEvent {
  int64_t ns, value;
  int32_t tid, cpu, kind;
};
constexpr int64_t kTraceCap = int64_t(1) << 20;
TraceEvent g_trace[kTraceCap];
std::atomic<int64_t> g_trace_n{0};
}  // namespace
extern "C" void jaxconv_busy_trace(int kind, int64_t value) {
  static thread_local const int32_t tid = int32_t(syscall(SYS_gettid));
  const int64_t i = g_trace_n.fetch_add(1, std::memory_order_relaxed);
  if (i >= kTraceCap) return;
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  g_trace[i] = {int64_t(t.tv_sec) * 1000000000 + t.tv_nsec, value, tid, sched_getcpu(), kind};
}
#endif

namespace {

// JAXCONV_NATIVE_THREADS=k caps the threads a call uses (results never depend on it).
int64_t thread_cap() {
  static const int64_t cap = [] {
    const char* env = std::getenv("JAXCONV_NATIVE_THREADS");
    return env ? std::atoll(env) : int64_t(0);
  }();
  return cap;
}

// JAXCONV_NATIVE_SPREAD=0 lets a helper run on its caller's CPU (kernel_busy_spread.h),
// leaves a descheduled thread where it is and has the caller sleep after 20 us of spinning
// whatever the helpers do (kernel_busy_rescue.h).
bool spread() {
  static const bool on = [] {
    const char* env = std::getenv("JAXCONV_NATIVE_SPREAD");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return on;
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  void (*fn)(void*, int64_t) = nullptr;
  void* arg = nullptr;
  int caller_cpu = -1;  // where the caller ran when it woke the helpers (kernel_busy_spread.h)
  std::unique_ptr<jaxconv_busy::Slot[]> slots;  // one per helper task (kernel_busy_rescue.h)
  std::atomic<int64_t> next_slot{0};
  std::mutex mu;  // with `all_done`: wakes a caller that sleeps on a straggler
  std::condition_variable all_done;
};

// Runs items until none is left; returns how many this thread ran. With slots (kernel_busy_
// rescue.h), `self` is this thread's: registered while it runs items, then, while others
// still hold items, a short wait that moves a descheduled one to this thread's CPU.
int64_t work(Shared& s, int64_t self = -1) {
  jaxconv_dispatch::FlushDenormals flush;
  jaxconv_busy::Slot* slot = self >= 0 ? &s.slots[self] : nullptr;
  if (slot) slot->enter();
  int64_t mine = 0;
  for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.n; ++mine) {
    JAXCONV_TRACE(kTraceItem, i);
    s.fn(s.arg, i);
  }
  JAXCONV_TRACE(kTraceEnd, mine);
  if (slot) slot->leave();  // before the count: the caller may return right after it
  // One count per thread, not per item; whoever completes the last item wakes the caller.
  const int64_t done = s.done.fetch_add(mine, std::memory_order_acq_rel) + mine;
  if (mine > 0 && done == s.n) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.all_done.notify_all();
  }
  return done;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// Waits up to 20 us for the other threads' items (which covers a quiet machine's last item),
// then moves any of them that did not run meanwhile to this thread's CPU
// (kernel_busy_rescue.h: kStalled), or reports that all kept running (kRunning).
jaxconv_busy::Waited wait_briefly(Shared& s, int64_t self) {
  auto finished = [&s] { return s.done.load(std::memory_order_acquire) == s.n; };
  if (!s.slots) {
    const int64_t t0 = jaxconv_busy::monotonic_ns();
    for (int spin = 0;; ++spin) {
      if (finished()) return jaxconv_busy::Waited::kFinished;
      if (spin % 64 == 63 && jaxconv_busy::monotonic_ns() - t0 > 20000)
        return jaxconv_busy::Waited::kStalled;
      cpu_relax();
    }
  }
  return jaxconv_busy::wait_or_pull(
      s.slots.get(), s.next_slot.load(std::memory_order_acquire), self, 20000, finished,
      [](int64_t h) { JAXCONV_TRACE(kTracePull, h); });
}

// Items are handed out dynamically, one at a time; the caller works too and returns once all
// are done. A task that starts late finds no item left and touches only the shared state it
// owns, so the caller never waits for a helper that has not started. Once the caller has run
// out of items it spins briefly, then sleeps: on a busy machine the helper still holding an
// item may be descheduled, and a spinning (or yielding) caller would keep a core from it.
// Beside a busy process the threads are kept on different CPUs (kernel_busy_spread.h), and a
// thread that waits for a descheduled one lets it run on its own CPU (kernel_busy_rescue.h).
void run_parallel(void* ctx, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  auto* pool = static_cast<ffi::ThreadPool*>(ctx);
  int64_t threads = pool ? pool->num_threads() : 1;
  if (thread_cap() > 0 && threads > thread_cap()) threads = thread_cap();
  const int64_t helpers = (threads < n ? threads : n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(arg, i);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->n = n;
  shared->fn = fn;
  shared->arg = arg;
#ifdef JAXCONV_PROFILE
  const auto t0 = std::chrono::steady_clock::now();
#endif
  JAXCONV_TRACE(kTraceFork, n);
  int64_t self = -1;
  if (spread()) {
    shared->caller_cpu = jaxconv_busy::current_cpu();
    shared->slots.reset(new jaxconv_busy::Slot[size_t(helpers + 1)]);
    self = shared->next_slot.fetch_add(1, std::memory_order_relaxed);
  }
  for (int64_t h = 0; h < helpers; ++h)
    pool->Schedule([shared] {
      Shared& s = *shared;
      // A helper that starts late finds nothing to do: it neither moves nor registers.
      if (s.next.load(std::memory_order_relaxed) >= s.n) return;
      int64_t me = -1;
      if (s.slots) {
        jaxconv_busy::move_off(s.caller_cpu);
        me = s.next_slot.fetch_add(1, std::memory_order_relaxed);
      }
      JAXCONV_TRACE(kTraceStart, 1);
      if (work(s, me) < s.n && me >= 0) wait_briefly(s, me);
    });
  JAXCONV_TRACE(kTraceStart, 0);
  const int64_t done = work(*shared, self);
  Shared& s = *shared;
#ifdef JAXCONV_PROFILE
  const auto t1 = std::chrono::steady_clock::now();
  struct Report {  // the caller's share, and how long it then waited for the helpers
    const std::chrono::steady_clock::time_point t0, t1;
    int64_t n;
    bool slept = false;
    ~Report() {
      const auto t2 = std::chrono::steady_clock::now();
      auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
      std::fprintf(stderr, "run_parallel n=%ld caller %.3f ms, wait %.3f ms%s\n", long(n),
                   ms(t1 - t0), ms(t2 - t1), slept ? " (slept)" : "");
    }
  } report{t0, t1, n};
#endif
  JAXCONV_TRACE(kTraceWaitBeg, n - done);
  // While every helper keeps running, keep spinning (up to 2 ms): they need no CPU of ours.
  for (int round = 0; done < n && round < 100; ++round) {
    const jaxconv_busy::Waited seen = wait_briefly(s, self);
    if (seen == jaxconv_busy::Waited::kFinished) break;
    if (seen == jaxconv_busy::Waited::kStalled) break;
  }
  if (s.done.load(std::memory_order_acquire) == n) {
    JAXCONV_TRACE(kTraceJoin, 0);
    return;
  }
#ifdef JAXCONV_PROFILE
  report.slept = true;
#endif
  std::unique_lock<std::mutex> lock(s.mu);
  s.all_done.wait(lock, [&s, n] { return s.done.load(std::memory_order_acquire) == n; });
  JAXCONV_TRACE(kTraceJoin, 1);
}

// The geometry and the op cross the FFI as named attributes (jaxconv/_src/engines/native.py,
// `_Call.attrs`), one list here: X(type, name). Spatial triples are int64 arrays (D, H, W).
using Triple = ffi::Span<const int64_t>;
// The struct decoder takes its members as a list with a leading one, hence op apart.
#define JAXCONV_CALL_ATTRS_AFTER_OP(X)                                                     \
  X(float, pad) X(int64_t, has_pad) X(int64_t, n) X(Triple, spatial) X(int64_t, c)          \
  X(Triple, window) X(int64_t, i) X(int64_t, o) X(int64_t, groups) X(Triple, out_spatial)   \
  X(Triple, strides) X(Triple, pad_lo) X(Triple, lhs_dilation) X(Triple, rhs_dilation)
#define JAXCONV_CALL_ATTRS(X) X(int64_t, op) JAXCONV_CALL_ATTRS_AFTER_OP(X)
#define JAXCONV_ATTR_FIELD(type, name) type name;

struct ForwardAttrs {
  JAXCONV_CALL_ATTRS(JAXCONV_ATTR_FIELD)
};
struct BackwardAttrs {
  JAXCONV_CALL_ATTRS(JAXCONV_ATTR_FIELD)
  int64_t parts;  // bit 0 computes dx, bit 1 dw
};
struct WideBackwardAttrs {
  JAXCONV_CALL_ATTRS(JAXCONV_ATTR_FIELD)
  int64_t round_to;  // float32 copies of bfloat16 / float16 operands: jaxconv::WideRound
};
#undef JAXCONV_ATTR_FIELD

template <class A>
ffi::Error decode(const A& a, jaxconv::Geom& g) {
  if (a.op < 0 || (a.op >= jaxconv::kNumBuiltinOps && a.op < jaxconv::kUserBase))
    return ffi::Error::InvalidArgument("jaxconv: unknown native op id");
  const Triple* triples[] = {&a.spatial, &a.window, &a.out_spatial, &a.strides,
                             &a.pad_lo, &a.lhs_dilation, &a.rhs_dilation};
  for (const Triple* t : triples)
    if (t->size() != 3) return ffi::Error::InvalidArgument("jaxconv: a spatial attribute is not 3 long");
  g.n = a.n;
  g.c = a.c;
  g.i = a.i;
  g.o = a.o;
  g.g = a.groups;
  for (int d = 0; d < 3; ++d) {
    g.sp[d] = a.spatial[d];
    g.k[d] = a.window[d];
    g.os[d] = a.out_spatial[d];
    g.stride[d] = a.strides[d];
    g.lo[d] = a.pad_lo[d];
    g.ld[d] = a.lhs_dilation[d];
    g.rd[d] = a.rhs_dilation[d];
  }
  g.has_pad = a.has_pad;
  g.pad = a.pad;
  return ffi::Error::Success();
}

// The leading (vmap) batch: the dimensions in front of x's canonical five (N, D, H, W, C).
// Read from the shape, not divided out of the element count: an input with an empty
// spatial dimension (every window padding) still has a batch.
int64_t batch_of(ffi::Span<const int64_t> dims) {
  int64_t b = 1;
  for (size_t d = 0; d + 5 < dims.size(); ++d) b *= dims[d];
  return b;
}

ffi::Error finish(int rc) {
  if (rc == 0) return ffi::Error::Success();
  if (rc == 2) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jaxconv: out of memory");
  if (rc == 3)
    return ffi::Error::InvalidArgument(
        "jaxconv: this user op's compiled kernel is not registered in this process");
  return ffi::Error::InvalidArgument("jaxconv: native kernel refused the call");
}

// Runs a float32-kernel call (jaxconv::Call) on XLA's pool with this process's tuning
// parameters, denormals flushed.
ffi::Error run_call(jaxconv::Call& call, ffi::ThreadPool& pool, bool backward) {
  call.par = {run_parallel, &pool};
  call.params = jaxconv_tune::current_params().load(std::memory_order_acquire);
  jaxconv_dispatch::FlushDenormals flush;
  return finish(jaxconv_dispatch::run_kernels(call, backward));
}

// bfloat16 / float16: jaxconv::kRoundBF16 / kRoundF16 (1 / 2, LowIO::kind's values); 0 for
// any other dtype.
int low_kind(ffi::DataType t) {
  return t == ffi::DataType::BF16 ? jaxconv::kRoundBF16
         : t == ffi::DataType::F16 ? jaxconv::kRoundF16 : 0;
}

// The leading batch of operands that come in their own ranks (the low-precision calls: a
// size-1 spatial dimension added in front of H would cost XLA a copy of x), from the element
// counts of x and y.
int64_t batch_of_counts(const jaxconv::Geom& g, int64_t x_count, int64_t y_count) {
  const int64_t px = g.n * g.sp[0] * g.sp[1] * g.sp[2] * g.c;
  const int64_t py = g.n * g.os[0] * g.os[1] * g.os[2] * g.o;
  return px > 0 ? x_count / px : py > 0 ? y_count / py : 0;
}

// The float32 kernels' call on x and w: the geometry, the op, the batch and the operands.
template <class A>
ffi::Error f32_call(const A& attrs, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    jaxconv::Call& call) {
  if (auto e = decode(attrs, call.geom); e.failure()) return e;
  call.op = attrs.op;
  call.batch = batch_of(x.dimensions());
  call.x = x.typed_data();
  call.w = w.typed_data();
  return ffi::Error::Success();
}

// The float32 forward; rec (the recording forward's winner masks) or nullptr.
ffi::Error forward_call(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, float* y,
                        int32_t* rec, const ForwardAttrs& attrs, ffi::ThreadPool& pool) {
  jaxconv::Call call{};
  if (auto e = f32_call(attrs, x, w, call); e.failure()) return e;
  call.out = y;
  call.rec = rec;
  return run_call(call, pool, false);
}

ffi::Error forward_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y, ForwardAttrs attrs, ffi::ThreadPool pool) {
  return forward_call(x, w, y->typed_data(), nullptr, attrs, pool);
}

// The forward on bfloat16 / float16 operands (kernel_bf16fuse_low.h) of a built-in op or of a
// user op's float32 library (whose run_op is the same template's): the kernels widen x and w
// themselves and write y in the operands' dtype, or in float32 when y is.
// rec: the recording forward's block masks (kernel_lowrec_mark.h), or nullptr.
ffi::Error low_forward_call(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer>& y,
                            int32_t* rec, const ForwardAttrs& attrs, ffi::ThreadPool& pool) {
  const auto t = x.element_type();
  const int64_t kind = low_kind(t);
  if (kind == 0 || w.element_type() != t ||
      (y->element_type() != t && y->element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("jaxconv: the low-precision forward takes bf16 / f16");
  const bool low_y = y->element_type() == t;
  jaxconv::LowIO io{kind, 1, static_cast<const uint16_t*>(x.untyped_data()),
                    static_cast<const uint16_t*>(w.untyped_data()),
                    low_y ? static_cast<uint16_t*>(y->untyped_data()) : nullptr, -1};
  jaxconv::Call call{};
  if (auto e = decode(attrs, call.geom); e.failure()) return e;
  call.op = attrs.op;
  call.batch = batch_of_counts(call.geom, x.element_count(), y->element_count());
  call.out = low_y ? nullptr : static_cast<float*>(y->untyped_data());
  call.low = &io;
  call.rec = rec;
  return run_call(call, pool, false);
}

ffi::Error low_forward_impl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                            ForwardAttrs attrs, ffi::ThreadPool pool) {
  return low_forward_call(x, w, y, nullptr, attrs, pool);
}

// The low forward that also records, per output, the blocks of kernel rows that may hold its
// winners (the products rounding to y): the low recorded backward's masks.
ffi::Error low_forward_record_impl(ffi::AnyBuffer x, ffi::AnyBuffer w,
                                   ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::S32> rec,
                                   ForwardAttrs attrs, ffi::ThreadPool pool) {
  if (rec->element_count() != y->element_count())
    return ffi::Error::InvalidArgument("jaxconv: the masks are not y's shape");
  return low_forward_call(x, w, y, rec->typed_data(), attrs, pool);
}

// The wide kernels (kernel_wide.h, kernel_wide_backward.h): built-in ops on float64 /
// int32 / int64, by the instruction set the float32 kernels use.
template <class A>
ffi::Error wide_call(const A& attrs, ffi::AnyBuffer x, ffi::AnyBuffer w,
                     ffi::DataType out_type, ffi::ThreadPool& pool, jaxconv::WideCall& call) {
  if (auto e = decode(attrs, call.geom); e.failure()) return e;  // also refuses unknown op ids
  const auto t = x.element_type();
  if (w.element_type() != t || out_type != t)
    return ffi::Error::InvalidArgument("jaxconv: operands of different dtypes");
  call.type = t == ffi::DataType::F64 ? jaxconv::kWideF64
              : t == ffi::DataType::S32 ? jaxconv::kWideS32
              : t == ffi::DataType::S64 ? jaxconv::kWideS64
              : t == ffi::DataType::F32 ? jaxconv::kWideF32 : -1;
  if (call.type < 0) return ffi::Error::InvalidArgument("jaxconv: a dtype the wide kernels lack");
  call.op = attrs.op;
  call.batch = batch_of(x.dimensions());
  call.x = x.untyped_data();
  call.w = w.untyped_data();
  call.par = {run_parallel, &pool};
  return ffi::Error::Success();
}

using WideRun = int (*)(const jaxconv::WideCall&);

WideRun wide_run(bool backward) {
  const std::string name = jaxconv_dispatch::isa_name();
#if JAXCONV_X86
  if (name == "avx512")
    return backward ? jaxconv_wide_avx512::run_backward : jaxconv_wide_avx512::run;
  if (name == "avx2") return backward ? jaxconv_wide_avx2::run_backward : jaxconv_wide_avx2::run;
#endif
  return backward ? jaxconv_wide_base::run_backward : jaxconv_wide_base::run;
}

// A built-in op by the wide kernels of this CPU's instruction set, or a user op by its
// library built for them (userop_wide.h: registered under its id, taking a WideCall);
// denormals flushed.
ffi::Error run_wide_call(const jaxconv::WideCall& call, bool backward) {
  jaxconv_dispatch::FlushDenormals flush;
  if (call.op < jaxconv::kUserBase) return finish(wide_run(backward)(call));
  using WideUserFn = int (*)(const jaxconv::WideCall*, int);
  auto fn = reinterpret_cast<WideUserFn>(jaxconv_dispatch::user_kernel(call.op));
  return finish(fn ? fn(&call, backward ? 1 : 0) : 3);
}

ffi::Error wide_forward_impl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                             ForwardAttrs attrs, ffi::ThreadPool pool) {
  jaxconv::WideCall call{};
  if (auto e = wide_call(attrs, x, w, y->element_type(), pool, call); e.failure()) return e;
  if (call.type == jaxconv::kWideF32)
    return ffi::Error::InvalidArgument("jaxconv: float32 runs the float32 kernels");
  call.out = y->untyped_data();
  return run_wide_call(call, false);
}

ffi::Error wide_backward_impl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y,
                              ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dx,
                              ffi::Result<ffi::AnyBuffer> dw, WideBackwardAttrs attrs,
                              ffi::ThreadPool pool) {
  jaxconv::WideCall call{};
  if (auto e = wide_call(attrs, x, w, y.element_type(), pool, call); e.failure()) return e;
  call.round = int(attrs.round_to);
  if (g.element_type() != y.element_type() || dx->element_type() != y.element_type() ||
      dw->element_type() != y.element_type())
    return ffi::Error::InvalidArgument("jaxconv: operands of different dtypes");
  call.y = y.untyped_data();
  call.g = g.untyped_data();
  call.out = dx->untyped_data();
  call.out2 = dw->untyped_data();
  call.zero_dx = call.zero_dw = true;  // zeroed by the kernels, as a float32 op's (wide.h)
  return run_wide_call(call, true);
}

// A max / min op's backward on bfloat16 / float16 operands in one call
// (kernel_lowrec_backward.h; a built-in op, or a user op's wide library): x, w and y (y and g may be float32) widened inside, the scan
// limited to the blocks that the low recording forward's masks name (rec: all -1 when it did
// not record, or empty: the full scan), dx and dw written in the operands' dtype.
ffi::Error low_backward_recorded_impl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y,
                                      ffi::Buffer<ffi::S32> rec, ffi::AnyBuffer g,
                                      ffi::Result<ffi::AnyBuffer> dx,
                                      ffi::Result<ffi::AnyBuffer> dw, ForwardAttrs attrs,
                                      ffi::ThreadPool pool) {
  const auto t = x.element_type();
  const int kind = low_kind(t);
  auto low_or_f32 = [t](ffi::DataType u) { return u == t || u == ffi::DataType::F32; };
  if (kind == 0 || w.element_type() != t || dx->element_type() != t ||
      dw->element_type() != t || !low_or_f32(y.element_type()) || !low_or_f32(g.element_type()))
    return ffi::Error::InvalidArgument("jaxconv: the low-precision backward takes bf16 / f16");
  // A user op's id names its library built for the wide kernels on float32 (userop_wide.h),
  // which refuses (1) an op that is not max / min.
  if (attrs.op < jaxconv::kUserBase && attrs.op != jaxconv::kMaxPlus &&
      attrs.op != jaxconv::kMinPlus && attrs.op != jaxconv::kMaxMin &&
      attrs.op != jaxconv::kMinMax)
    return ffi::Error::InvalidArgument("jaxconv: the low-precision backward runs max/min ops");
  if ((rec.element_count() != y.element_count() && rec.element_count() != 0) ||
      g.element_count() != y.element_count() ||
      dx->element_count() != x.element_count() || dw->element_count() != w.element_count())
    return ffi::Error::InvalidArgument("jaxconv: operands of mismatched sizes");
  jaxconv::WideCall call{};
  if (auto e = decode(attrs, call.geom); e.failure()) return e;
  call.op = attrs.op;
  call.type = jaxconv::kWideF32;
  call.round = kind;
  call.batch = batch_of_counts(call.geom, x.element_count(), y.element_count());
  call.x = x.untyped_data();
  call.w = w.untyped_data();
  call.y = y.untyped_data();
  call.g = g.untyped_data();
  call.out = dx->untyped_data();
  call.out2 = dw->untyped_data();
  call.low_x = 1;
  call.low_y = y.element_type() == t;
  call.low_g = g.element_type() == t;
  call.rec = rec.element_count() > 0 ? rec.typed_data() : nullptr;
  call.par = {run_parallel, &pool};
  call.zero_dx = call.zero_dw = true;  // kernel_lowrec_backward.h writes every entry anyway
  return run_wide_call(call, true);
}

// The float32 backward into dx and dw; rec (the recorded winner masks, read only) or
// nullptr.
ffi::Error backward_call(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> g, const int32_t* rec,
                         ffi::ResultBuffer<ffi::F32>& dx, ffi::ResultBuffer<ffi::F32>& dw,
                         const BackwardAttrs& attrs, ffi::ThreadPool& pool) {
  jaxconv::Call call{};
  if (auto e = f32_call(attrs, x, w, call); e.failure()) return e;
  call.y = y.typed_data();
  call.g = g.typed_data();
  call.rec = const_cast<int32_t*>(rec);
  call.out = dx->typed_data();
  call.out2 = dw->typed_data();
  call.parts = attrs.parts;
  // dx and dw are zeroed by the kernels, where their pass needs it (kernels.inc's run_op: the
  // dense sums backward writes every entry, so E skips 5 MiB of serial memset; kernel_fold.h's
  // run_fold_op, whose sums write every entry, zeroes an empty problem's). A user op's library
  // runs the same template: its cache key hashes every kernel header and kAbiVersion
  // (user_kernels.py `_key`), so a loaded library honours the flags.
  // A record (rec[0] != -1: masks or exact codes): the dense backward
  // (kernel_dense_backward.h, kernel_densebwd_exact.h) runs and writes every entry of dw from
  // its blocks' columns, so dw is not zeroed first (4 MiB for a 1024 x 1024 kernel).
  call.zero_dx = true;
  call.zero_dw = rec == nullptr || rec[0] == -1;
  return run_call(call, pool, true);
}

ffi::Error backward_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> g,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                         BackwardAttrs attrs, ffi::ThreadPool pool) {
  return backward_call(x, w, y, g, nullptr, dx, dw, attrs, pool);
}

// The recording forward (csrc/kernel_dense_record.h): y and the dense winner masks, which
// the recorded backward takes back as an operand.
ffi::Error forward_record_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                               ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S32> rec,
                               ForwardAttrs attrs, ffi::ThreadPool pool) {
  return forward_call(x, w, y->typed_data(), rec->typed_data(), attrs, pool);
}

ffi::Error backward_recorded_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                  ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::S32> rec,
                                  ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                                  ffi::ResultBuffer<ffi::F32> dw, BackwardAttrs attrs,
                                  ffi::ThreadPool pool) {
  if (rec.element_count() != y.element_count())
    return ffi::Error::InvalidArgument("jaxconv: the recorded masks are not y's shape");
  return backward_call(x, w, y, g, rec.typed_data(), dx, dw, attrs, pool);
}

}  // namespace

#define JAXCONV_ATTR_MEMBER(type, name) , ::xla::ffi::StructMember<type>(#name)
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(ForwardAttrs, ::xla::ffi::StructMember<int64_t>("op")
                                      JAXCONV_CALL_ATTRS_AFTER_OP(JAXCONV_ATTR_MEMBER));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(BackwardAttrs, ::xla::ffi::StructMember<int64_t>("op")
                                      JAXCONV_CALL_ATTRS_AFTER_OP(JAXCONV_ATTR_MEMBER),
                                      ::xla::ffi::StructMember<int64_t>("parts"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(WideBackwardAttrs, ::xla::ffi::StructMember<int64_t>("op")
                                      JAXCONV_CALL_ATTRS_AFTER_OP(JAXCONV_ATTR_MEMBER),
                                      ::xla::ffi::StructMember<int64_t>("round_to"));
#undef JAXCONV_ATTR_MEMBER

// The handlers' bindings: their operands, their results, the attributes A and XLA's pool.
template <class... T>
struct Operands {};
template <class... T>
struct Results {};

template <class A, class B>
auto bound(B b, Operands<>, Results<>) {
  return std::move(b).template Attrs<A>().template Ctx<ffi::ThreadPool>();
}
template <class A, class B, class T, class... Ts, class... Rs>
auto bound(B b, Operands<T, Ts...>, Results<Rs...> rets) {
  return bound<A>(std::move(b).template Arg<T>(), Operands<Ts...>{}, rets);
}
template <class A, class B, class R, class... Rs>
auto bound(B b, Operands<>, Results<R, Rs...>) {
  return bound<A>(std::move(b).template Ret<R>(), Operands<>{}, Results<Rs...>{});
}
template <class A, class... Ts, class... Rs>
auto binding(Operands<Ts...> args, Results<Rs...> rets) {
  return bound<A>(ffi::Ffi::Bind(), args, rets);
}

using F32 = ffi::Buffer<ffi::F32>;   // float32 operands
using Any = ffi::AnyBuffer;          // operands of the dtypes the handler checks
using Masks = ffi::Buffer<ffi::S32>;  // the recording forwards' winner records

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvForward, forward_impl,
                              binding<ForwardAttrs>(Operands<F32, F32>{}, Results<F32>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvLowForward, low_forward_impl,
                              binding<ForwardAttrs>(Operands<Any, Any>{}, Results<Any>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvLowForwardRecord, low_forward_record_impl,
                              binding<ForwardAttrs>(Operands<Any, Any>{},
                                                    Results<Any, Masks>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvLowBackwardRecorded, low_backward_recorded_impl,
                              binding<ForwardAttrs>(Operands<Any, Any, Any, Masks, Any>{},
                                                    Results<Any, Any>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvWideForward, wide_forward_impl,
                              binding<ForwardAttrs>(Operands<Any, Any>{}, Results<Any>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvWideBackward, wide_backward_impl,
                              binding<WideBackwardAttrs>(Operands<Any, Any, Any, Any>{},
                                                         Results<Any, Any>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvBackward, backward_impl,
                              binding<BackwardAttrs>(Operands<F32, F32, F32, F32>{},
                                                     Results<F32, F32>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvForwardRecord, forward_record_impl,
                              binding<ForwardAttrs>(Operands<F32, F32>{},
                                                    Results<F32, Masks>{}));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvBackwardRecorded, backward_recorded_impl,
                              binding<BackwardAttrs>(Operands<F32, F32, F32, Masks, F32>{},
                                                     Results<F32, F32>{}));

NB_MODULE(_native, m) {
  m.doc() = "jaxconv's compiled CPU kernels (XLA FFI handlers).";
  m.def("registrations", []() {
    nb::dict d;
    auto add = [&d](const char* name, XLA_FFI_Error* (*handler)(XLA_FFI_CallFrame*)) {
      d[name] = nb::capsule(reinterpret_cast<void*>(handler));
    };
    add("jaxconv_forward", JaxconvForward);
    add("jaxconv_wide_forward", JaxconvWideForward);
    add("jaxconv_low_forward", JaxconvLowForward);
    add("jaxconv_low_forward_record", JaxconvLowForwardRecord);
    add("jaxconv_low_backward_recorded", JaxconvLowBackwardRecorded);
    add("jaxconv_wide_backward", JaxconvWideBackward);
    add("jaxconv_backward", JaxconvBackward);
    add("jaxconv_forward_record", JaxconvForwardRecord);
    add("jaxconv_backward_recorded", JaxconvBackwardRecorded);
    return d;
  });
  m.def("isa", []() { return std::string(jaxconv_dispatch::isa_name()); },
        "The instruction set whose kernels this process runs.");
  m.def("abi", []() { return jaxconv::kAbiVersion; },
        "The Call/Geom layout version a compiled user op must be built against.");
  m.def(
      "register_user_kernel",
      [](int64_t op, uintptr_t address) {
        if (op < jaxconv::kUserBase) throw nb::value_error("user op ids start at kUserBase");
        jaxconv_dispatch::register_user_kernel(
            op, reinterpret_cast<jaxconv_dispatch::UserFn>(address));
      },
      "Registers `jaxconv_user_run` of a loaded user-op library under op id `op`.");
  m.def("user_base", []() { return jaxconv::kUserBase; });
  m.attr("pair_channels") = jaxconv::kPairChannels;
  m.attr("record_block_rows") = jaxconv::kRecordBlockRows;
#ifdef JAXCONV_BUSY_TRACE
  m.def(
      "busy_trace_take",
      []() {
        const int64_t n = std::min(g_trace_n.load(), kTraceCap);
        nb::list out;
        for (int64_t i = 0; i < n; ++i) {
          const TraceEvent& e = g_trace[i];
          out.append(nb::make_tuple(e.ns, e.tid, e.cpu, e.kind, e.value));
        }
        g_trace_n.store(0);
        return out;
      },
      "The work-sharing timeline since the last call (kernel_busy_trace.h), then cleared.");
#endif
  // Tuning (csrc/kernel_params.h, tune_probe.h; jaxconv/_src/engines/native/tuning.py).
  m.def("param_fields", &jaxconv_tune::param_fields,
        "{name: (default, lowest, highest)} of each parameter.");
  m.def("params",
        []() { return jaxconv_tune::params_dict(*jaxconv_tune::current_params().load()); },
        "The tuning parameters this process's calls run with.");
  m.def(
      "set_params",
      [](const nb::dict& d) {
        jaxconv_tune::current_params().store(new jaxconv::Params(jaxconv_tune::params_from(d)));
      },
      "Sets the tuning parameters of later calls (every field, each within its range).");
  m.def("time_forward", &jaxconv_tune::time_forward,
        "The best single-threaded time of a small forward.");
  m.def("time_backward", &jaxconv_tune::time_backward,
        "The best single-threaded time of a small backward (both gradients).");
  m.def("release_probes", &jaxconv_tune::release_probes,
        "Frees the timing probes' problems kept by this thread; returns how many.");
  m.def(
      "peak_probe",
      [](const std::string& kind, int threads, double seconds, const std::string& isa) {
        int k;
        if (kind == "fma") k = jaxconv_probe::kFma;
        else if (kind == "add_max") k = jaxconv_probe::kAddMax;
        else if (kind == "min_add") k = jaxconv_probe::kMinAdd;
        else if (kind == "exp2") k = jaxconv_probe::kExp2;
        else if (kind == "exp") k = jaxconv_probe::kExp;
        else throw nb::value_error("kind must be 'fma', 'add_max', 'min_add', 'exp2' or 'exp'");
        if (threads < 1 || threads > 1024) throw nb::value_error("threads must be 1..1024");
        if (!(seconds > 0.0 && seconds <= 60.0))
          throw nb::value_error("seconds must be in (0, 60]");
        if (!isa.empty() && isa != "avx512" && isa != "avx2" && isa != "base")
          throw nb::value_error("isa must be '', 'avx512', 'avx2' or 'base'");
        jaxconv_probe::Result r;
        {
          nb::gil_scoped_release release;
          r = jaxconv_probe::peak(k, threads, seconds, isa.c_str());
        }
        nb::dict d;
        d["gterms_per_s"] = r.gterms_per_s;
        d["isa"] = std::string(r.isa);
        d["lanes"] = r.lanes;
        d["threads"] = threads;
        d["distinct_cpus"] = r.distinct_cpus;
        d["overlap"] = r.overlap;
        d["gterms_per_s_cpu"] = r.gterms_per_s_cpu;
        return d;
      },
      nb::arg("kind"), nb::arg("threads") = 1, nb::arg("seconds") = 0.1, nb::arg("isa") = "",
      "The machine's peak rate of one kernel step, in G terms/s over `threads` threads: "
      "kind 'fma' (x * w + acc), 'add_max' (max(acc, x + w)), 'min_add' (acc + min(x, w)), the "
        "sums issued as fma(a, 1, b) as the kernels issue them; 'exp2' (acc + 2^(x L + w), the "
        "logsumexp kernels' term and exponential) and 'exp' (acc + exp(x - w), the exp of "
        "compiled user combines), run by the kernels' own code for the instruction set; "
      "`isa` caps the instruction set. Best of five runs of about seconds / 5, each thread "
      "pinned to a CPU of its own where the process has enough (`distinct_cpus` says whether "
      "every thread ran on its own CPU; `overlap`: the best run's CPU time / (threads x wall); "
      "`gterms_per_s_cpu`: the sum of the threads' rates in their own CPU time).");
  m.def(
      "kernels",
      []() {
        nb::dict d;
#define JAXCONV_OP_ENTRY(e, functor, name, reduce) \
  d[name] = nb::make_tuple(int64_t(jaxconv::e), reduce);
        JAXCONV_BUILTIN_OPS(JAXCONV_OP_ENTRY)
#undef JAXCONV_OP_ENTRY
        return d;
      },
      "The built-in kernels: {name: (op id, reduce)}, from csrc/problem.h's one list.");
}
