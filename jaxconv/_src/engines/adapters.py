"""The Pallas and native engines on the planner's protocol.

The Pallas engine computes its forward and backward passes in kernels behind a
`jax.custom_vjp`; the native engine is a pair of FFI calls. Forward-mode tangents come from
the XLA engine's formulas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxconv._src.engines import xla

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CustomVjpEngine:
    """An engine whose `generic_conv(x, w, geom, op, *, preferred_element_type,
    max_block_bytes)` carries its own `custom_vjp`."""

    load: Callable[[], Callable[..., Array]]

    def supports(self, problem: Any, dtype: Any, platform: str | None) -> bool:
        del problem, dtype, platform
        return True

    def _conv(self, problem: Any, x: Array, w: Array) -> Array:
        return self.load()(x, w, problem.geom, problem.op,
                           preferred_element_type=problem.acc_dtype,
                           max_block_bytes=problem.max_block_bytes)

    def forward(self, problem: Any, x: Array, w: Array) -> Array:
        return self._conv(problem, x, w).astype(problem.acc_dtype)

    def backward(self, problem: Any, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        del y, need
        _, vjp = jax.vjp(lambda a, b: self._conv(problem, a, b), x, w)
        gx, gw = vjp(g.astype(problem.acc_dtype))
        return gx.astype(x.dtype), gw.astype(w.dtype)

    def tangent(self, problem: Any, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        return xla.tangent(problem, x, w, y, tx, tw, active)


def _pallas_conv() -> Callable[..., Array]:
    from jaxconv._src.engines import pallas  # noqa: PLC0415 - Pallas loads on first use

    return pallas.generic_conv


PALLAS = CustomVjpEngine(_pallas_conv)


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
        res = (x.reshape(spec.x_shape), w.reshape(spec.w_shape), y.reshape(spec.y_shape))
        gx, gw = self._module()._conv_bwd(spec, res, g.reshape(spec.y_shape))
        return gx.reshape(x.shape).astype(x.dtype), gw.reshape(w.shape).astype(w.dtype)

    def tangent(self, problem: Any, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        return xla.tangent(problem, x, w, y, tx, tw, active)


NATIVE = NativeEngine()
