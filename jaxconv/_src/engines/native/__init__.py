"""The native CPU engine: compiled semiring kernels behind the XLA FFI, as one package.

- `engine`: the engine on the core's protocol (registered here as ``"native"``);
- `eligibility`: the one decision of what it serves (`eligibility.refusal`);
- `records`: which max/min calls record their winners in the forward (`records.records_op`),
  and why not (`records.refusal`);
- `ffi`: the library's loading (the one importer of ``jaxconv._native``) and the FFI calls;
- `translation`, `codegen`: a user op's C++ source; `user_kernels`: its kernels compiled at
  first use (`user_kernel`) and their cache.

Importing the package loads no library: that happens on first use.
"""

from jaxconv._src.core import engine as _registry
from jaxconv._src.engines.native.engine import ENGINE as ENGINE
from jaxconv._src.engines.native.ffi import available as available
from jaxconv._src.engines.native.ffi import isa as isa
from jaxconv._src.engines.native.ffi import load_error as load_error
from jaxconv._src.engines.native.user_kernels import user_kernel as user_kernel

_registry.register(ENGINE.name, lambda: ENGINE)
