"""Engines given as a custom-VJP `generic_conv`, adapted to the planner's protocol.

The Pallas engine computes its forward and backward passes in kernels behind a
`jax.custom_vjp`; forward-mode tangents come from the XLA engine's formulas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

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
