"""The native engine on the core's protocol: a pair of FFI calls on the canonical problem,
loaded lazily. Forward-mode tangents come from the XLA engine's formulas.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxconv._src.core import algebra, products
from jaxconv._src.core import engine as registry
from jaxconv._src.core.problem import Problem

Array = jax.Array


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


class NativeEngine(registry.Engine):
    """The compiled CPU kernels (`jaxconv._src.engines.native`) on the protocol: the
    forward and backward FFI calls on the canonical problem, tangents from the XLA engine."""

    name = "native"

    @staticmethod
    def _module() -> Any:
        from jaxconv._src.engines import native  # noqa: PLC0415 - loads the library lazily

        return native

    def load_error(self) -> str | None:
        return self._module().load_error()

    def refusal(self, problem: Problem, dtype: DTypeLike, platform: str | None) -> str | None:
        native = self._module()
        op, geom, auto = problem.op, problem.geom, problem.engine == registry.AUTO
        if platform not in (None, "cpu"):
            return f"it runs on CPU only, not on {platform!r}"
        error = native.load_error()
        if error is not None:
            if auto and op.native is not None:
                _warn_native_unavailable(error)
            return f"the native library could not be loaded ({error})"
        if np.dtype(problem.acc_dtype) != np.dtype(dtype):
            return (f"it accumulates in the operands' dtype, not {np.dtype(problem.acc_dtype)}"
                    f" from {np.dtype(dtype)}")
        why = native.why_not(op, geom, dtype)
        if why is not None:
            got = native.user_kernel(op) if op.native is None else None
            if auto and isinstance(got, native.Refusal) and got.compile_failed:
                _warn_compile_failed(op.name or repr(op), got.reason)
            return why
        if math.prod(geom.in_spatial) * geom.groups >= 2**31 // 4096:
            return "the image is too large for the kernels' 32-bit indexing"
        if auto and op.native is None and native.scalar_math(op):
            return "its kernel would evaluate libm lane by lane (slower than XLA)"
        return None

    def describe(self, problem: Problem, dtype: DTypeLike) -> tuple[str, ...]:
        native = self._module()
        op = problem.op
        if op.native is not None:
            return (f"built-in kernel {op.native!r} ({native.isa()})",)
        kernel = native.user_kernel(op)
        how = (f"compiled now in {kernel.seconds:.2f} s" if kernel.compiled
               else "loaded from the cache")
        lines = [f"compiled user kernel ({native.isa()}, {how}): {kernel.path}",
                 f"primitives: {', '.join(kernel.functor.primitives)}"]
        if kernel.functor.scalar:
            lines.append("lane by lane with libm (not vectorized): "
                         + ", ".join(kernel.functor.scalar))
        return tuple(lines)

    def _spec(self, problem: Problem, x: Array, w: Array) -> Any:
        native = self._module()
        native._register()
        return native._call_spec(problem.op, problem.geom, x.shape, w.shape)

    def forward(self, problem: Problem, x: Array, w: Array) -> Array:
        spec = self._spec(problem, x, w)
        y = self._module()._forward_call(spec, x.reshape(spec.x_shape), w.reshape(spec.w_shape))
        return y.reshape(x.shape[0], *problem.geom.out_spatial, w.shape[-1])

    def backward(self, problem: Problem, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        """The FFI backward kernel, and standard products where those are faster: the
        kernel gradient of a ``x - w`` sum (AdderNet) and both gradients of l2's."""
        del need
        op, geom = problem.op, problem.geom
        spec = self._spec(problem, x, w)
        g = g.astype(jnp.float32)
        # Built-in kernels only: a user op's compiled backward computes both sides itself.
        kind = algebra.capabilities(op).separable if op.native is not None else None
        if kind == "sqdiff":
            gx = -2.0 * products.difference_input_gradient(op, geom, x, w, g)
            gw = products.separable_kernel_gradient(problem, kind, x, w, g)
            return gx.astype(x.dtype), gw.astype(w.dtype)
        parts = 1 if kind == "adder" else 3
        gx, gw = self._module()._backward_call(
            spec, x.reshape(spec.x_shape), w.reshape(spec.w_shape), y.reshape(spec.y_shape),
            g.reshape(spec.y_shape), parts=parts)
        if kind == "adder":
            gw = products.separable_kernel_gradient(problem, kind, x, w, g)
        return gx.reshape(x.shape).astype(x.dtype), gw.reshape(w.shape).astype(w.dtype)

    def tangent(self, problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        return registry.get("xla").tangent(problem, x, w, y, tx, tw, active)


NATIVE = NativeEngine()
registry.register(NATIVE.name, lambda: NATIVE)
