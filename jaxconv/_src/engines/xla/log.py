"""The log semiring (``x + w`` under logsumexp) on the XLA engine: the core's exp-space
product (`jaxconv._src.core.log_products`) with the tap engine as its exact path."""

from __future__ import annotations

import dataclasses

import jax

from jaxconv._src.core import log_products
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.xla.backward import _hand_backward
from jaxconv._src.engines.xla.common import Config, grouped
from jaxconv._src.engines.xla.nan import _forward_dispatch

Array = jax.Array


def is_log_semiring(op: Op) -> bool:
    """Whether ``op`` is ``x + w`` under logsumexp with identity padding (``ops.log``).

    Args:
        op: the op.

    Returns:
        True for the log semiring.
    """
    return capabilities(op).log_semiring


def forward(problem: Problem, cfg: Config, x: Array, w: Array) -> Array:
    """``(N, *out_spatial, O)`` in the accumulation dtype: a standard convolution in exp
    space, or the exact tap engine (`_forward_dispatch`) where a window or an input needs it.

    Args:
        problem: the canonical problem.
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.

    Returns:
        The output.
    """
    out_shape = (x.shape[0], *cfg.geom.out_spatial, w.shape[-1])
    return log_products.forward(
        problem, x, w, lambda a, b: _forward_dispatch(cfg, a, b).reshape(out_shape))


def backward(problem: Problem, cfg: Config, x: Array, w: Array, y: Array,
             g: Array) -> tuple[Array, Array]:
    """The softmax rule through the exp-space convolution's transposes where the forward
    took it, else the exact tap backward (`_hand_backward`).

    Args:
        problem: the canonical problem.
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.
        y: the forward's output.
        g: its cotangent.

    Returns:
        ``(gx, gw)``.
    """
    out_shape = (x.shape[0], *cfg.geom.out_spatial, w.shape[-1])
    # The rare exact branch is compiled without unrolling (less code to compile).
    exact_cfg = dataclasses.replace(cfg, unroll=1)

    def exact(a: Array, b: Array, y_: Array, g_: Array) -> tuple[Array, Array]:
        return _hand_backward(exact_cfg, a, b, grouped(cfg, y_), grouped(cfg, g_))

    return log_products.backward(problem, x, w, y.reshape(out_shape), g.reshape(out_shape),
                                 exact)
