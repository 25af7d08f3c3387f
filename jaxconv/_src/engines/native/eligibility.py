"""Whether the native engine serves a problem: the one decision, with its reason.

`refusal` is the only eligibility function of the native engine: the planner reads its
verdict, ``engine="native"`` raises it as an error, and `jaxconv.explain` prints it. It is
static and compiles nothing: a user op is translated to C++ (`codegen.functor`, cached), and
its kernels are compiled when the engine first lowers it (`user_kernels.user_kernel`); a compile
failure seen there is remembered and read here from then on.
"""

from __future__ import annotations

import math

import numpy as np
from jax.typing import DTypeLike

from jaxconv._src.core import engine as registry
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.native import ffi, user_kernels
from jaxconv._src.engines.native.translation import Refusal, translation

# The operands' dtypes the kernels serve.
DTYPES = (np.dtype(np.float32),)


def _op_refusal(op: Op, auto: bool) -> str | None:
    if op.native is not None:
        if ffi.kernel_id(op) is None:
            return f"no kernel {op.native!r} with reduce {op.reduce_name!r}"
        return None
    got = translation(op)
    if isinstance(got, Refusal):
        return got.reason
    built = user_kernels.built(op)
    if isinstance(built, Refusal):
        return built.reason
    if auto and got.scalar:
        return "its kernel would evaluate libm lane by lane (slower than XLA)"
    return None


def refusal(problem: Problem, dtype: DTypeLike, platform: str | None) -> str | None:
    """Why the native kernels do not serve `problem` (``None``: they do).

    Under ``engine="auto"`` a user op whose kernel would evaluate libm lane by lane is also
    refused (the XLA engine's vectorized math is faster); ``engine="native"`` runs it.

    Args:
      problem: the canonical problem.
      dtype: the operands' common dtype.
      platform: the platform lowered for (``None``: not known yet).

    Returns:
      ``None``, or the reason as text.

    Example:
      >>> import numpy as np
      >>> from jaxconv import ops
      >>> from jaxconv._src.core.geometry import Geometry
      >>> from jaxconv._src.core.problem import Problem
      >>> g = Geometry((5,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
      >>> p = Problem(ops.max_plus, g, "auto", np.dtype("float32"), 2**20)
      >>> refusal(p, "float32", "cpu") is None or ffi.load_error() is not None
      True
      >>> refusal(p, "float64", "cpu")
      'dtype float64 is not served (float32 only)'
    """
    op, geom = problem.op, problem.geom
    dtype = np.dtype(dtype)
    if platform not in (None, "cpu"):
        return f"it runs on CPU only, not on {platform!r}"
    if op.rewrite is not None:
        return "it is a rewrite into standard lax products"
    if dtype not in DTYPES:
        return f"dtype {dtype.name} is not served (float32 only)"
    if np.dtype(problem.acc_dtype) != dtype:
        return (f"it accumulates in the operands' dtype, not {np.dtype(problem.acc_dtype)}")
    if len(geom.window) > 3:
        return "more than 3 spatial dimensions"
    if op.pad_value is not None and not isinstance(op.pad_value, int | float):
        return "a non-numeric pad_value"
    if math.prod(geom.in_spatial) * geom.groups >= 2**31 // 4096:
        return "the image is too large for the kernels' 32-bit indexing"
    error = ffi.load_error()
    if error is not None:
        return f"the native library could not be loaded ({error})"
    return _op_refusal(op, problem.engine == registry.AUTO)
