// The kernels a call runs (dispatch.h): the instruction set's built-in kernels, picked once per
// process, or a registered user op.
#include "dispatch.h"

#include <cstdlib>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>

namespace jaxconv_base { int run(const jaxconv::Call& call, bool backward); }
#if JAXCONV_X86
namespace jaxconv_avx2 { int run(const jaxconv::Call& call, bool backward); }
namespace jaxconv_avx512 { int run(const jaxconv::Call& call, bool backward); }
#endif

namespace jaxconv_dispatch {
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

// User ops compiled at run time (jaxconv/_src/engines/native/user_kernels.py), by op id.
struct UserKernels {
  std::shared_mutex mu;
  std::unordered_map<int64_t, UserFn> fns;
};

UserKernels& user_kernels() {
  static UserKernels* table = new UserKernels();  // never destroyed: handlers may outlive exit
  return *table;
}

}  // namespace

const char* isa_name() { return isa().name; }

int run_kernels(const jaxconv::Call& call, bool backward) {
  if (call.op < jaxconv::kUserBase) return isa().fn(call, backward);
  UserFn fn = user_kernel(call.op);
  return fn ? fn(&call, backward ? 1 : 0) : 3;
}

UserFn user_kernel(int64_t op) {
  UserKernels& t = user_kernels();
  std::shared_lock<std::shared_mutex> lock(t.mu);
  auto it = t.fns.find(op);
  return it != t.fns.end() ? it->second : nullptr;
}

void register_user_kernel(int64_t op, UserFn fn) {
  UserKernels& t = user_kernels();
  std::unique_lock<std::shared_mutex> lock(t.mu);
  t.fns[op] = fn;
}

}  // namespace jaxconv_dispatch
