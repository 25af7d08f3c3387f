"""The native engine on the planner's protocol: a pair of FFI calls on the canonical
problem, loaded lazily. Forward-mode tangents come from the XLA engine's formulas.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxconv._src.engines import xla

Array = jax.Array


class NativeEngine:
    """The compiled CPU kernels (`jaxconv._src.engines.native`) on the protocol: the
    forward and backward FFI calls on the canonical problem, tangents from the XLA engine."""

    @staticmethod
    def _module() -> Any:
        from jaxconv._src.engines import native  # noqa: PLC0415 - loads the library lazily

        return native

    def load_error(self) -> str | None:
        return self._module().load_error()

    def supports(self, problem: Any, dtype: Any, platform: str | None) -> bool:
        native = self._module()
        geom = problem.geom
        image = math.prod(geom.in_spatial) * geom.groups
        return (platform in (None, "cpu") and native.available()
                and np.dtype(problem.acc_dtype) == np.dtype(dtype)
                and native.supports(problem.op, geom, dtype) and image < 2**31 // 4096)

    def refusal(self, problem: Any, dtype: Any) -> Any:
        """Why a user op (no built-in kernel) has no compiled kernels, or ``None``."""
        native = self._module()
        if problem.op.native is not None or np.dtype(dtype) not in native.DTYPES:
            return None
        got = native.user_kernel(problem.op)
        return got if isinstance(got, native.Refusal) else None

    def scalar_math(self, op: Any) -> bool:
        """Whether a compiled user op evaluates some function with libm lane by lane."""
        return self._module().scalar_math(op)

    def why_not(self, problem: Any, dtype: Any) -> str | None:
        """Why the native engine does not serve `problem` (``None``: it does)."""
        native = self._module()
        if not native.available():
            return f"the native library could not be loaded ({native.load_error()})"
        return native.why_not(problem.op, problem.geom, dtype)

    def _spec(self, problem: Any, x: Array, w: Array) -> Any:
        native = self._module()
        native._register()
        return native._call_spec(problem.op, problem.geom, x.shape, w.shape)

    def forward(self, problem: Any, x: Array, w: Array) -> Array:
        spec = self._spec(problem, x, w)
        y = self._module()._forward_call(spec, x.reshape(spec.x_shape), w.reshape(spec.w_shape))
        return y.reshape(x.shape[0], *problem.geom.out_spatial, w.shape[-1])

    def backward(self, problem: Any, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        del need
        spec = self._spec(problem, x, w)
        gx, gw = self._module().gradients(spec, x.reshape(spec.x_shape),
                                          w.reshape(spec.w_shape), y.reshape(spec.y_shape),
                                          g.reshape(spec.y_shape))
        return gx.reshape(x.shape).astype(x.dtype), gw.reshape(w.shape).astype(w.dtype)

    def tangent(self, problem: Any, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        return xla.tangent(problem, x, w, y, tx, tw, active)


NATIVE = NativeEngine()
