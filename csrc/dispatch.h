// Which kernels run a call: the built-in ops' kernels for the best instruction set this CPU
// has (picked once per process) or a user op's compiled library, by op id (dispatch.cc).
#pragma once
#include <cstdint>

#include "problem.h"

namespace jaxconv_dispatch {

// A loaded user-op library's entry point (`jaxconv_user_run`).
using UserFn = int (*)(const jaxconv::Call*, int);

// The instruction set whose kernels this process runs: "avx512", "avx2" or "base".
const char* isa_name();

// Runs the kernels of `call.op`: 0, or 1 (unknown op), 2 (out of memory), 3 (a user op id not
// registered in this process).
int run_kernels(const jaxconv::Call& call, bool backward);

// Registers a user op's entry point under its id (ids from jaxconv::kUserBase).
void register_user_kernel(int64_t op, UserFn fn);

// The entry point registered under a user op id, or nullptr. A library built for the wide
// kernels (userop_wide.h) registers `int (*)(const jaxconv::WideCall*, int)` here, cast.
UserFn user_kernel(int64_t op);

}  // namespace jaxconv_dispatch
