// XLA FFI handlers for the semiring kernels and the `jaxconv._native` extension module.
//
// The handlers decode the canonical geometry, pick the kernels built for the best instruction
// set this CPU has (once per process) and share the work on XLA's intra-op thread pool.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "problem.h"
#include "wide.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace jaxconv_base { int run(const jaxconv::Call& call, bool backward); }
namespace jaxconv_wide_base { int run(const jaxconv::WideCall& call); }
#if JAXCONV_X86
namespace jaxconv_wide_avx2 { int run(const jaxconv::WideCall& call); }
namespace jaxconv_wide_avx512 { int run(const jaxconv::WideCall& call); }
namespace jaxconv_avx2 { int run(const jaxconv::Call& call, bool backward); }
namespace jaxconv_avx512 { int run(const jaxconv::Call& call, bool backward); }
#endif

namespace {

using RunFn = int (*)(const jaxconv::Call&, bool);

struct Isa {
  RunFn fn;
  const char* name;
};

// JAXCONV_NATIVE_ISA=base|avx2|avx512 forces a lower instruction set (tests, benchmarks).
Isa pick_isa() {
  const char* env = std::getenv("JAXCONV_NATIVE_ISA");
  const std::string want = env ? env : "";
#if JAXCONV_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "avx512")) return {jaxconv_avx512::run, "avx512"};
  if (avx2 && want != "base") return {jaxconv_avx2::run, "avx2"};
#endif
  return {jaxconv_base::run, "base"};
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

// User ops compiled at run time (jaxconv/_src/engines/user_kernels.py), by op id.
using UserFn = int (*)(const jaxconv::Call*, int);

struct UserKernels {
  std::shared_mutex mu;
  std::unordered_map<int64_t, UserFn> fns;
};

UserKernels& user_kernels() {
  static UserKernels* table = new UserKernels();  // never destroyed: handlers may outlive exit
  return *table;
}

// Runs the kernels of `call.op`: 3 when a user op id is not registered in this process.
int run_kernels(const jaxconv::Call& call, bool backward) {
  if (call.op < jaxconv::kUserBase) return isa().fn(call, backward);
  UserFn fn = nullptr;
  {
    UserKernels& t = user_kernels();
    std::shared_lock<std::shared_mutex> lock(t.mu);
    auto it = t.fns.find(call.op);
    if (it != t.fns.end()) fn = it->second;
  }
  return fn ? fn(&call, backward ? 1 : 0) : 3;
}

// Denormal inputs read as zero and denormal results flush to zero (both keeping their sign),
// on every thread a call runs on: XLA's CPU runtime does the same, and the engines must agree
// (DESIGN.md, "Engines agree"). Restores the caller's mode on exit.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    fpcr |= uint64_t(1) << 24;  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ~FlushDenormals() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(static_cast<unsigned>(saved_));
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  uint64_t saved_ = 0;
};

// JAXCONV_NATIVE_THREADS=k caps the threads a call uses (results never depend on it).
int64_t thread_cap() {
  static const int64_t cap = [] {
    const char* env = std::getenv("JAXCONV_NATIVE_THREADS");
    return env ? std::atoll(env) : int64_t(0);
  }();
  return cap;
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  void (*fn)(void*, int64_t) = nullptr;
  void* arg = nullptr;
};

void work(Shared& s) {
  FlushDenormals flush;
  for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.n;) {
    s.fn(s.arg, i);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// Items are handed out dynamically; the caller works too and returns once all are done.
// A task that starts late finds no item left and touches only the shared state it owns.
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
  for (int64_t h = 0; h < helpers; ++h) pool->Schedule([shared] { work(*shared); });
  work(*shared);
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
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

ffi::Error forward_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y, ForwardAttrs attrs, ffi::ThreadPool pool) {
  jaxconv::Call call{};
  if (auto e = decode(attrs, call.geom); e.failure()) return e;
  call.op = attrs.op;
  call.batch = batch_of(x.dimensions());
  call.x = x.typed_data();
  call.w = w.typed_data();
  call.out = y->typed_data();
  call.par = {run_parallel, &pool};
  FlushDenormals flush;
  return finish(run_kernels(call, false));
}

// The wide kernels (kernel_wide.h): built-in ops on float64 / int32 / int64, by the
// instruction set the float32 kernels use.
ffi::Error wide_forward_impl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                             ForwardAttrs attrs, ffi::ThreadPool pool) {
  jaxconv::WideCall call{};
  if (auto e = decode(attrs, call.geom); e.failure()) return e;
  if (attrs.op < 0 || attrs.op >= jaxconv::kNumBuiltinOps)
    return ffi::Error::InvalidArgument("jaxconv: the wide kernels serve built-in ops only");
  const auto t = x.element_type();
  if (w.element_type() != t || y->element_type() != t)
    return ffi::Error::InvalidArgument("jaxconv: operands of different dtypes");
  call.type = t == ffi::DataType::F64 ? jaxconv::kWideF64
              : t == ffi::DataType::S32 ? jaxconv::kWideS32
              : t == ffi::DataType::S64 ? jaxconv::kWideS64 : -1;
  if (call.type < 0) return ffi::Error::InvalidArgument("jaxconv: a dtype the wide kernels lack");
  call.op = attrs.op;
  call.batch = batch_of(x.dimensions());
  call.x = x.untyped_data();
  call.w = w.untyped_data();
  call.out = y->untyped_data();
  call.par = {run_parallel, &pool};
  FlushDenormals flush;
  const std::string name = isa().name;
  int (*run)(const jaxconv::WideCall&) = jaxconv_wide_base::run;
#if JAXCONV_X86
  if (name == "avx512") run = jaxconv_wide_avx512::run;
  if (name == "avx2") run = jaxconv_wide_avx2::run;
#endif
  return finish(run(call));
}

ffi::Error backward_impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> g,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                         BackwardAttrs attrs, ffi::ThreadPool pool) {
  jaxconv::Call call{};
  if (auto e = decode(attrs, call.geom); e.failure()) return e;
  call.op = attrs.op;
  call.batch = batch_of(x.dimensions());
  call.x = x.typed_data();
  call.w = w.typed_data();
  call.y = y.typed_data();
  call.g = g.typed_data();
  call.out = dx->typed_data();
  call.out2 = dw->typed_data();
  call.parts = attrs.parts;
  std::memset(call.out, 0, sizeof(float) * dx->element_count());
  std::memset(call.out2, 0, sizeof(float) * dw->element_count());
  call.par = {run_parallel, &pool};
  FlushDenormals flush;
  return finish(run_kernels(call, true));
}

}  // namespace

#define JAXCONV_ATTR_MEMBER(type, name) , ::xla::ffi::StructMember<type>(#name)
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(ForwardAttrs, ::xla::ffi::StructMember<int64_t>("op")
                                      JAXCONV_CALL_ATTRS_AFTER_OP(JAXCONV_ATTR_MEMBER));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(BackwardAttrs, ::xla::ffi::StructMember<int64_t>("op")
                                      JAXCONV_CALL_ATTRS_AFTER_OP(JAXCONV_ATTR_MEMBER),
                                      ::xla::ffi::StructMember<int64_t>("parts"));
#undef JAXCONV_ATTR_MEMBER

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvForward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attrs<ForwardAttrs>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvWideForward, wide_forward_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<ForwardAttrs>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvBackward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attrs<BackwardAttrs>()
                                  .Ctx<ffi::ThreadPool>());

NB_MODULE(_native, m) {
  m.doc() = "jaxconv's compiled CPU kernels (XLA FFI handlers).";
  m.def("registrations", []() {
    nb::dict d;
    d["jaxconv_forward"] = nb::capsule(reinterpret_cast<void*>(JaxconvForward));
    d["jaxconv_wide_forward"] = nb::capsule(reinterpret_cast<void*>(JaxconvWideForward));
    d["jaxconv_backward"] = nb::capsule(reinterpret_cast<void*>(JaxconvBackward));
    return d;
  });
  m.def("isa", []() { return std::string(isa().name); },
        "The instruction set whose kernels this process runs.");
  m.def("abi", []() { return jaxconv::kAbiVersion; },
        "The Call/Geom layout version a compiled user op must be built against.");
  m.def(
      "register_user_kernel",
      [](int64_t op, uintptr_t address) {
        if (op < jaxconv::kUserBase) throw nb::value_error("user op ids start at kUserBase");
        UserKernels& t = user_kernels();
        std::unique_lock<std::shared_mutex> lock(t.mu);
        t.fns[op] = reinterpret_cast<UserFn>(address);
      },
      "Registers `jaxconv_user_run` of a loaded user-op library under op id `op`.");
  m.def("user_base", []() { return jaxconv::kUserBase; });
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
