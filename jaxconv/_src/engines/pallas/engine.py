"""The Pallas engine on the core's protocol."""

from __future__ import annotations

from typing import Any

import jax

from jaxconv._src.core import algebra
from jaxconv._src.core import engine as registry
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.pallas.autodiff import _conv_hand_bwd, _conv_xla_bwd, _forward_all
from jaxconv._src.engines.pallas.config import Spec
from jaxconv._src.engines.pallas.platforms import platform_backends

Array = jax.Array


def _spec_of(problem: Problem) -> Spec:
    return Spec(problem.op, problem.geom, problem.acc_dtype, platform_backends(),
                problem.max_block_bytes)


def forward(problem: Problem, x: Array, w: Array) -> Array:
    """The product of canonical ``x`` and ``w`` in the accumulation dtype."""
    return _forward_all(_spec_of(problem), x, w).astype(problem.acc_dtype)


def backward(problem: Problem, x: Array, w: Array, y: Array, g: Array,
             need: tuple[bool, bool]) -> tuple[Array, Array]:
    """The input and kernel gradients from the forward's ``y`` (not recomputed)."""
    del need
    spec = _spec_of(problem)
    if problem.op.reduce_name in algebra.HAND_VJP_REDUCES:
        return _conv_hand_bwd(spec, (x, w, y), g.astype(problem.acc_dtype))
    return _conv_xla_bwd(spec, (x, w), g)


class PallasEngine(registry.Engine):
    """The Pallas kernels on the core's protocol: every problem on every platform
    (interpret mode on CPU); forward-mode tangents are the XLA engine's formulas."""

    name = "pallas"

    def refusal(self, problem: Problem, dtype: Any, platform: str | None) -> str | None:
        del problem, dtype, platform
        return None

    def forward(self, problem: Problem, x: Array, w: Array) -> Array:
        return forward(problem, x, w)

    def backward(self, problem: Problem, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        return backward(problem, x, w, y, g, need)

    def tangent(self, problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        return registry.get("xla").tangent(problem, x, w, y, tx, tw, active)

    def describe(self, problem: Problem, dtype: Any) -> tuple[str, ...]:
        del dtype
        return (f"Pallas kernels under {algebra.capabilities(problem.op).reduce!r} "
                "(interpret mode on CPU, Triton on GPU, Mosaic on TPU)",)


ENGINE = PallasEngine()
