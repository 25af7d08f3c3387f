"""Whether the native engine serves a problem: the one decision, with its reason.

`refusal` is the only eligibility function of the native engine: the planner reads its
verdict, ``engine="native"`` raises it as an error, and `jaxconv.explain` prints it. It is
static and compiles nothing: a user op is translated to C++ (`codegen.functor`, cached), and
its kernels are compiled when the engine first lowers it (`user_kernels.user_kernel`); a compile
failure seen there is remembered and read here from then on.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxconv._src.core import engine as registry
from jaxconv._src.core import scalar_program as sp
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.native import ffi, user_kernels
from jaxconv._src.engines.native.translation import Refusal, translation

FLOAT32 = np.dtype(np.float32)
# Low-precision operands: run on the float32 kernels (widened inside the forward call,
# kinds.low_in_call, or next to it), a max/min result rounded once.
LOW_PRECISION = (np.dtype(jnp.bfloat16), np.dtype(np.float16))
# The wide kernels' dtypes (built-in and user ops with a max, min or sum reduce; the backward
# of float64; integers have no gradient).
WIDE = (np.dtype(np.float64), np.dtype(np.int32), np.dtype(np.int64))
# The operands' dtypes the kernels serve.
DTYPES = (FLOAT32, *LOW_PRECISION, *WIDE)
SERVED = "float32, bfloat16, float16, float64, int32 and int64"

# Primitives that commute with rounding to a lower precision when every argument is exact
# (a value of the dtype) or once rounded: round(max(a, b)) = max(round(a), round(b)) since
# rounding is monotone, round(-a) = -round(a) since it is symmetric; a select whose predicate
# reads only exact values picks the same branch either way.
_COMMUTING = frozenset({"max", "min", "clamp", "neg", "abs", "select_n"})
# Primitives that are exact on values of the dtype (comparisons, logic, conversions to bool).
_EXACT = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor",
                    "is_finite", "sign", "floor", "ceil", "round"})


def _midpoint(v: float, dtype: np.dtype) -> bool:
    """Whether float32 `v` may round to `dtype` otherwise than the literal it came from: a
    halfway point between two `dtype` values (then double rounding can differ), or, for
    float16, outside its normal range (where the halfway test below does not hold).

    Args:
        v: the float32 value.
        dtype: ``float16`` or ``bfloat16``.

    Returns:
        True where rounding may differ.
    """
    bits = int(np.asarray(v, np.float32).view(np.uint32))
    if dtype == np.dtype(np.float16):
        return not 2.0**-14 <= abs(v) <= 65504.0 or bits & 0x1FFF == 0x1000
    return bits & 0xFFFF == 0x8000


def rounds_once(op: Op, dtype: DTypeLike) -> str | None:
    """Why ``op``'s max/min combine in `dtype` is not float32's rounded once (``None``: it is).

    The XLA engine evaluates a combine in the operands' dtype, rounding after each of its
    operations; the native kernels compute in float32 and round the reduced result once. The
    two agree bit for bit when every rounding operation reads exact values (operands,
    constants, or exact functions of them) and only `_COMMUTING` operations follow it.

    Args:
      op: a user op with a max or min reduce.
      dtype: the operands' low-precision dtype.

    Returns:
      ``None``, or the reason as text.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> rounds_once(jaxconv.Op(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "max"), "bfloat16")
      >>> rounds_once(jaxconv.Op(lambda x, w: x * w + x, "max"), "bfloat16")
      "in bfloat16 its combine rounds 'add' of a rounded value"
    """
    dtype = np.dtype(dtype)
    try:
        # The primal's roundings (a custom-VJP function's rule is the backward's business).
        program = sp.primal_program(op.combine, dtype)
        kernel = sp.primal_program(op.combine, FLOAT32)
    except sp.Untranslatable as e:
        return f"it is not translated: {e}"
    # The kernel's constants are float32: each must be the dtype's own value, except a
    # bound of a max / min, which only needs to round as the literal does (`_midpoint`).
    for k in kernel.live():
        node = kernel.nodes[k]
        for r in node.args:
            if isinstance(r, sp.Const) and not isinstance(r.value, bool):
                v = float(r.value)
                if v == v and float(np.asarray(v, np.float32).astype(dtype)) != v and (
                        node.name not in ("max", "min", "clamp") or _midpoint(v, dtype)):
                    return f"its constant {v!r} is not a {dtype.name} value"
    exact, once = 0, 1

    def kind(r: sp.Ref, state: dict[int, int]) -> int:
        return state[r] if isinstance(r, int) else exact

    state: dict[int, int] = {}
    for k in program.live():
        node = program.nodes[k]
        args = [kind(r, state) for r in node.args]
        name = node.name
        if name == "integer_pow" and abs(int(node.params["y"])) > 2:
            name = "pow"  # more than one multiplication
        if name == "convert_element_type" and node.dtype in (dtype, np.dtype(bool)):
            name = "abs" if node.dtype == dtype else "sign"
        if name in _COMMUTING:
            if name == "select_n" and args[0] != exact:
                return f"in {dtype.name} its combine selects on a rounded value"
            state[k] = max(args, default=exact)
        elif once in args:
            return f"in {dtype.name} its combine rounds {node.name!r} of a rounded value"
        else:
            state[k] = exact if name in _EXACT else once
    return None


def _wide_refusal(op: Op, dtype: np.dtype, acc: np.dtype, auto: bool) -> str | None:
    """Why a float64 / int32 / int64 call is not served by the wide kernels (built-in ops,
    and user ops compiled for them; the XLA engine's order of a float sum may differ from
    theirs: within rounding).

    Args:
        op: the op.
        dtype: the operands' dtype.
        acc: the accumulation dtype.
        auto: whether the engine was not named (`_op_refusal`).

    Returns:
        The reason, or ``None``.
    """
    if op.native is not None and (op.native not in ffi.WIDE_KERNELS
                                  or ffi.kernel_id(op) is None):
        return (f"on {dtype.name} the built-in ops with kernels are "
                f"{', '.join(ffi.WIDE_KERNELS)}")
    if op.native is None:
        why = _op_refusal(op, auto, dtype.name)
        if why is not None:
            return why
    if acc != dtype:
        return f"it accumulates in the operands' dtype, not {acc}"
    if op.pad_value is not None:
        v = float(op.pad_value)
        exact = float(np.float32(v)) == v or math.isnan(v)
        if dtype.kind == "i":
            info = np.iinfo(dtype)
            exact = exact and v.is_integer() and info.min <= v <= info.max
        if not exact:
            return f"its pad_value {v!r} is not exact in the kernels' attribute"
    if not ffi.has_wide():
        return "the native library has no wide kernels (built from older sources)"
    return None


def _low_precision_refusal(op: Op, dtype: np.dtype, acc: np.dtype) -> str | None:
    """Why a bf16 / f16 call is not served by the float32 kernels (``None``: it is).

    Args:
        op: the op.
        dtype: the operands' dtype.
        acc: the accumulation dtype.

    Returns:
        The reason, or ``None``.
    """
    reduce = capabilities(op).reduce if op.native is None else op.reduce_name
    if reduce in ("max", "min"):
        if acc not in (dtype, FLOAT32):
            return f"a max/min op on {dtype.name} with result dtype {acc.name}"
        if op.native is None:
            return rounds_once(op, dtype)
        return None
    if acc != FLOAT32:
        return (f"it accumulates {dtype.name} in {acc.name} (the kernels accumulate in "
                "float32)")
    return None


def _op_refusal(op: Op, auto: bool, kernel_dtype: str = "float32") -> str | None:
    """Why the native engine has no kernel for ``op`` (``None``: it has one).

    Args:
        op: the op.
        auto: whether the engine was not named (then a kernel that evaluates libm lane by lane
            is refused: XLA is faster).
        kernel_dtype: the dtype a user op's kernels compute in (float32, or a wide dtype).

    Returns:
        The reason, or ``None``.
    """
    if op.native is not None:
        if ffi.kernel_id(op) is None:
            return f"no kernel {op.native!r} with reduce {op.reduce_name!r}"
        return None
    got = translation(op, kernel_dtype)
    if isinstance(got, Refusal):
        return got.reason
    built = user_kernels.built(op, kernel_dtype)
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
      >>> refusal(p, "complex64", "cpu")
      'dtype complex64 is not served (float32, bfloat16, float16, float64, int32 and int64 only)'
    """
    op, geom = problem.op, problem.geom
    dtype = np.dtype(dtype)
    if platform not in (None, "cpu"):
        return f"it runs on CPU only, not on {platform!r}"
    if op.rewrite is not None:
        return "it is a rewrite into standard lax products"
    if dtype not in DTYPES:
        return f"dtype {dtype.name} is not served ({SERVED} only)"
    acc = np.dtype(problem.acc_dtype)
    if dtype == FLOAT32 and acc != dtype:
        return f"it accumulates in the operands' dtype, not {acc}"
    if len(geom.window) > 3:
        return "more than 3 spatial dimensions"
    if op.pad_value is not None and not isinstance(op.pad_value, int | float):
        return "a non-numeric pad_value"
    if math.prod(geom.in_spatial) * geom.groups >= 2**31 // 4096:
        return "the image is too large for the kernels' 32-bit indexing"
    error = ffi.load_error()
    if error is not None:
        return f"the native library could not be loaded ({error})"
    if dtype in WIDE:
        return _wide_refusal(op, dtype, acc, problem.engine == registry.AUTO)
    why = _op_refusal(op, problem.engine == registry.AUTO)
    if why is None and dtype in LOW_PRECISION:
        why = _low_precision_refusal(op, dtype, acc)
    return why
