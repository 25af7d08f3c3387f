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
        from jaxconv._src.engines import adapters  # noqa: PLC0415

        return adapters.PALLAS
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
    if problem.op.native is None:
        return False
    native = _module("native")
    error = native.load_error()
    if error is not None:
        _warn_native_unavailable(error)
        return False
    return native.supports(problem, dtype, platform)


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
        raise ValueError(
            f"engine={name!r} does not serve op {problem.op.name!r} with {dtype} inputs and "
            "this geometry; use engine='auto' (which falls back to the XLA engine) or "
            "engine='xla'.")


def engine_for(problem: Any, platform: str, dtype: Any = None) -> types.ModuleType:
    """The engine module for `problem` on `platform` (see `engine_name`)."""
    if dtype is None:
        dtype = problem.acc_dtype if problem.dtype is None else problem.dtype
    name = engine_name(problem, dtype, platform)
    module = _module(name)
    if name != "xla" and not module.supports(problem, dtype, platform):
        raise ValueError(
            f"engine={name!r} does not serve op {problem.op.name!r} with {dtype} inputs on "
            f"platform {platform!r}; use engine='auto' or engine='xla'."
        )
    return module
