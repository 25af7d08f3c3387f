"""The planner: which engine computes a problem on a platform, decided statically.

Every engine module implements one small protocol on canonical problems
(`jaxconv._src.core.primitive.Problem`):

- `supports(problem, dtype, platform) -> bool`: whether it serves the problem there;
- `forward(problem, x, w) -> y`;
- `backward(problem, x, w, y, g, need) -> (gx, gw)` (`need`: which of the two are used);
- `tangent(problem, x, w, y, tx, tw, active) -> ty` (`active`: which tangents are nonzero).

The choice depends only on the platform being lowered for, the engine asked for, the op's
declared capabilities, the shapes and the dtypes -- never on values, so one compiled function
has one path.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Any

ENGINES = ("auto", "xla", "native", "pallas")


def _module(name: str) -> types.ModuleType:
    if name == "xla":
        from jaxconv._src.engines import xla  # noqa: PLC0415 - engines import the core

        return xla
    if name == "pallas":
        from jaxconv._src.engines import pallas  # noqa: PLC0415 - Pallas loads on first use

        return pallas
    from jaxconv._src.engines import adapters  # noqa: PLC0415

    return adapters.NATIVE


def engine_name(problem: Any, dtype: Any, platform: str) -> str:
    """The engine that computes `problem` (inputs of `dtype`) when lowered for `platform`.

    `"auto"` picks the native CPU engine on CPU where it serves the op, dtype and geometry
    (and its library loads), else the XLA engine; on GPU and TPU the XLA engine, until the
    Pallas kernels are measured faster there (`python -m benchmarks.device_check`).
    """
    asked = problem.engine
    if problem.op.rewrite is not None:
        return "xla"  # a rewrite is a native lax product: the best code on every platform
    if asked != "auto":
        return asked
    if platform == "cpu" and _native_serves(problem, dtype, platform):
        return "native"
    return "xla"


def _native_serves(problem: Any, dtype: Any, platform: str) -> bool:
    native = _module("native")
    if problem.op.native is not None:
        error = native.load_error()
        if error is not None:
            _warn_native_unavailable(error)
            return False
    elif native.load_error() is not None:
        return False
    refusal = native.refusal(problem, dtype)
    if refusal is not None and refusal.compile_failed:
        _warn_compile_failed(problem.op.display_name, refusal.reason)
    if refusal is None and problem.op.native is None and native.scalar_math(problem.op):
        return False  # libm lane by lane: slower than the XLA engine's vectorized math
    return refusal is None and native.supports(problem, dtype, platform)


@functools.cache
def _warn_compile_failed(name: str, reason: str) -> None:
    """Warns once per op that `engine="auto"` runs a user op on the XLA engine because its
    native kernels could not be compiled."""
    warnings.warn(f"jaxconv: op {name!r} runs on the XLA engine: {reason}", RuntimeWarning,
                  stacklevel=2)


@functools.cache
def _warn_native_unavailable(error: str) -> None:
    """Warns once per process that `engine="auto"` cannot use the native kernels."""
    warnings.warn(f"jaxconv: the native CPU engine could not be loaded ({error}); "
                  "engine='auto' uses the XLA engine.", RuntimeWarning, stacklevel=2)


def check_engine(problem: Any, dtype: Any) -> None:
    """Raises a clear error, before any tracing, when the engine asked for cannot serve."""
    name = problem.engine
    if problem.op.rewrite is not None:
        return
    try:
        module = _module(name)
    except ImportError as e:
        raise RuntimeError(
            f"engine={name!r} is not available ({e}); use engine='auto' or engine='xla'."
        ) from None
    load_error = getattr(module, "load_error", lambda: None)()
    if load_error is not None:
        raise RuntimeError(
            f"engine={name!r} cannot be used: {load_error}. Use engine='auto' or engine='xla'.")
    if not module.supports(problem, dtype, None):
        why = getattr(module, "why_not", lambda *a: None)(problem, dtype)
        raise ValueError(
            f"engine={name!r} does not serve op {problem.op.display_name!r} with {dtype} inputs "
            f"and this geometry{f' ({why})' if why else ''}; use engine='auto' (which falls back "
            "to the XLA engine) or engine='xla'.")


def engine_for(problem: Any, platform: str, dtype: Any = None) -> types.ModuleType:
    """The engine module for `problem` on `platform` (see `engine_name`)."""
    if dtype is None:
        dtype = problem.acc_dtype if problem.dtype is None else problem.dtype
    name = engine_name(problem, dtype, platform)
    module = _module(name)
    if name != "xla" and not module.supports(problem, dtype, platform):
        raise ValueError(
            f"engine={name!r} does not serve op {problem.op.display_name!r} with {dtype} inputs on "
            f"platform {platform!r}; use engine='auto' or engine='xla'."
        )
    return module


# --- explain ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """How an op is computed: the engine the planner picks and the path inside it.

    Attributes:
      op: the op's name.
      platform: the platform planned for.
      engine: ``"native"``, ``"xla"`` or ``"pallas"``.
      details: one line per fact (the path, why another engine was not taken, where a
        compiled user kernel lives).
    """

    op: str
    platform: str
    engine: str
    details: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"op {self.op!r} on {self.platform}: engine {self.engine!r}"]
        return "\n".join(lines + [f"  - {d}" for d in self.details])


def explain(op: Any, *, dtype: Any = "float32", platform: str | None = None,
            engine: str = "auto") -> Plan:
    """Which engine and path compute ``op`` (a convolution or dense product with it).

    For a user op on CPU this compiles its native kernels (once, as the first call would) and
    says where they are cached, or why it is not compiled.

    Args:
      op: an `Op` or the name of a built-in op.
      dtype: the operands' dtype.
      platform: ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"``; default: JAX's default backend.
      engine: the engine asked for (``"auto"`` lets the planner choose).

    Returns:
      A `Plan` (``print`` it for a report).

    Example:
      >>> import jaxconv
      >>> plan = jaxconv.explain("max_plus", platform="cpu")
      >>> plan.engine in ("native", "xla")
      True
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jaxconv._src.core import algebra, ops, primitive  # noqa: PLC0415
    from jaxconv._src.core.geometry import Geometry  # noqa: PLC0415

    op = ops.get(op)
    platform = platform or jax.default_backend()
    dtype = jnp.dtype(dtype)
    details: list[str] = []
    form = algebra.factored_form(op.replace(post=None), dtype)
    inner = op.replace(post=None) if form is None else form.inner
    if form is not None:
        details.extend(form.describe())
    rule = algebra.per_product_rule(op.replace(post=None), dtype)
    if rule is not None:
        details.append(rule)
    if callable(op.reduce) and algebra.capabilities(op).reduce != "custom":
        details.append(f"the callable reduce is {algebra.capabilities(op).reduce!r} "
                       "(recognised from its traced program)")
    geom = Geometry((8, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)
    acc = np.dtype(algebra.accumulation_dtype(inner, dtype, None))
    problem = primitive.Problem(inner, geom, engine, acc, primitive.DEFAULT_MAX_BLOCK_BYTES,
                                None, dtype)
    chosen = engine_name(problem, dtype, platform)
    caps = algebra.capabilities(inner)
    if chosen == "native":
        native = _module("native")._module()
        if inner.native is not None:
            details.append(f"built-in kernel {inner.native!r} ({native.isa()})")
        else:
            kernel = native.user_kernel(inner)
            how = (f"compiled now in {kernel.seconds:.2f} s" if kernel.compiled
                   else "loaded from the cache")
            details.append(f"compiled user kernel ({native.isa()}, {how}): {kernel.path}")
            details.append(f"primitives: {', '.join(kernel.functor.primitives)}")
            if kernel.functor.scalar:
                details.append("lane by lane with libm (not vectorized): "
                               + ", ".join(kernel.functor.scalar))
    else:
        if platform == "cpu" and inner.rewrite is None:
            why = _module("native").why_not(problem, dtype)
            if why is None and inner.native is None:
                why = "its kernel would evaluate libm lane by lane (slower than XLA)"
            details.append(f"not native: {why}")
        if inner.rewrite is not None:
            details.append("a rewrite into standard lax products")
        elif caps.separable == "mul":
            details.append("one standard lax convolution (a multiply-and-add)")
        elif caps.log_semiring:
            details.append("the log-semiring in exp space (one lax convolution)")
        elif caps.reduce in ("max", "min"):
            details.append("blocked products, the winner backward pass")
        elif caps.reduce == "custom":
            details.append("a generic fold of the callable reduce, tap by tap (slow path: "
                           "not recognised as sum, prod, max, min or logsumexp)")
        else:
            details.append(f"blocked products under {caps.reduce!r}")
    return Plan(op.display_name, platform, chosen, tuple(details))
