"""The XLA engine on the core's protocol: `forward`, `backward`, `tangent`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxconv._src.core import algebra, products
from jaxconv._src.core import engine as registry
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.xla import forward_mode, log, popcount
from jaxconv._src.engines.xla.backward import _hand_backward
from jaxconv._src.engines.xla.common import Config, block_size, canonical_op, grouped
from jaxconv._src.engines.xla.forward import _forward
from jaxconv._src.engines.xla.nan import _forward_dispatch

Array = jax.Array


def _config(problem: Problem, x: Array, w: Array) -> Config:
    """The engine's static configuration of a problem: canonical op, batch blocks and the
    dtype the products are computed in.

    A sum's or logsumexp's products of narrower floats (bf16 / f16 accumulating in float32)
    are computed in the accumulation dtype, as the native engine computes them, not rounded to
    the operands' dtype first: a rounded product was an error of half its ulp in every term (1
    near 300 in bf16), within the result's own rounding for the output but a factor of up to e
    in logsumexp's gradient and tangent weights ``exp(c - y)`` (the log semiring's exact
    branches too: f16 weights off by up to e^2 near 5000). Max/min keep the dtype (their
    products round, exactly).

    Args:
        problem: the canonical problem.
        x: the input.
        w: the kernel.

    Returns:
        The `Config`.
    """
    op = canonical_op(problem.op)
    geom, mbb = problem.geom, problem.max_block_bytes
    acc = jnp.dtype(problem.acc_dtype)
    itemsize = max(jnp.dtype(x.dtype).itemsize, acc.itemsize)
    args = (geom, x.shape[0], w.shape[-2] * geom.groups, w.shape[-1] // geom.groups, itemsize)
    widen = op.reduce_name in ("sum", "logsumexp") and jnp.issubdtype(acc, jnp.floating)
    # Backward blocks stay small although the backward never holds a block's products:
    # measured, one image per block runs faster than the whole batch (cache locality).
    return Config(op, geom, acc, mbb, block_size(*args, mbb), block_size(*args, mbb // 4),
                  product_dtype=acc if widen else None)


def forward(problem: Problem, x: Array, w: Array) -> Array:
    """The product of canonical ``x`` and ``w``: ``(N, *out_spatial, O)`` in the
    accumulation dtype.

    Args:
        problem: the canonical problem.
        x: the input ``(N, *S, C)``.
        w: the kernel ``(*K, I, O)``.

    Returns:
        The output.
    """
    cfg = _config(problem, x, w)
    if cfg.op.rewrite is not None:
        return products.rewritten(problem, x, w)
    if capabilities(cfg.op).combine == popcount.KIND:
        return popcount.mismatches(cfg.op, cfg.geom, x, w).astype(cfg.acc_dtype)
    if log.is_log_semiring(cfg.op) and jnp.issubdtype(x.dtype, jnp.floating):
        y = log.forward(problem, cfg, *cfg.widen(x, w))
    elif cfg.op.reduce_name in algebra.HAND_VJP_REDUCES:
        y = _forward_dispatch(cfg, *cfg.widen(x, w))
    else:
        y = _forward(cfg, x, w)
    return y.reshape(x.shape[0], *cfg.geom.out_spatial, w.shape[-1]).astype(cfg.acc_dtype)


def backward(problem: Problem, x: Array, w: Array, y: Array, g: Array,
             need: tuple[bool, bool] = (True, True)) -> tuple[Array, Array]:
    """The input and kernel gradients given the output ``y`` and its cotangent ``g``.

    Args:
        problem: the canonical problem.
        x: the input.
        w: the kernel.
        y: the forward's output.
        g: the output's cotangent.
        need: which gradients are needed (both are computed).

    Returns:
        ``(gx, gw)``.
    """
    del need  # both gradients come out of the same passes
    cfg = _config(problem, x, w)
    y4, g4 = grouped(cfg, y), grouped(cfg, g)
    if cfg.op.rewrite is not None:
        _, vjp = jax.vjp(functools.partial(products.rewritten, problem), x, w)
        gx, gw = vjp(g.astype(cfg.acc_dtype))
    elif log.is_log_semiring(cfg.op) and jnp.issubdtype(x.dtype, jnp.floating):
        # Widened for the exact branch (|y| > 2^12, +inf / NaN inputs): its weights
        # exp(c - y) of f16-rounded products were off by up to e^2 near 5000.
        gx, gw = log.backward(problem, cfg, *cfg.widen(x, w), y, g)
    elif cfg.op.reduce_name in algebra.HAND_VJP_REDUCES:
        gx, gw = _hand_backward(cfg, *cfg.widen(x, w), y4, g4)
    else:
        _, vjp = jax.vjp(lambda a, b: _forward(cfg, a, b).astype(cfg.acc_dtype), x, w)
        gx, gw = vjp(g4.astype(cfg.acc_dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


def tangent(problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
            active: tuple[bool, bool] = (True, True)) -> Array:
    """The forward-mode tangent of the output, linear in ``(tx, tw)``.

    Args:
        problem: the canonical problem.
        x: the input.
        w: the kernel.
        y: the forward's output.
        tx: the input's tangent.
        tw: the kernel's tangent.
        active: which tangents are not zero.

    Returns:
        The output's tangent.
    """
    if problem.op.rewrite is not None:
        forward_mode.check_forward_mode(problem.op)
        return jax.jvp(functools.partial(products.rewritten, problem), (x, w), (tx, tw))[1]
    cfg = _config(problem, x, w)
    x, w, tx, tw = cfg.widen(x, w, tx, tw)
    return forward_mode.tangent(problem, cfg, x, w, y, tx, tw, active)


def describe(problem: Problem) -> tuple[str, ...]:
    """The path this engine takes for `problem` (one line, for `jaxconv.explain`).

    Args:
        problem: the canonical problem.

    Returns:
        The line, in a tuple.
    """
    op = problem.op
    caps = capabilities(op)
    if op.rewrite is not None:
        return ("a rewrite into standard lax products",)
    if caps.separable == "mul":
        return ("one standard lax convolution (a multiply-and-add)",)
    if caps.log_semiring:
        return ("the log-semiring in exp space (one lax convolution)",)
    if caps.reduce in ("max", "min"):
        return ("blocked products, the winner backward pass",)
    if caps.reduce == "custom":
        return ("a generic fold of the callable reduce, tap by tap (slow path: not recognised "
                "as sum, prod, max, min or logsumexp)",)
    return (f"blocked products under {caps.reduce!r}",)


class XlaEngine(registry.Engine):
    """The XLA engine on the core's protocol: serves every problem on every platform, in
    plain JAX code (which JAX can differentiate: the core's second-order rules use it)."""

    name = "xla"

    def refusal(self, problem: Problem, dtype: Any, platform: str | None) -> str | None:
        """None: the XLA engine serves every problem (the fallback)."""
        del problem, dtype, platform
        return None

    def forward(self, problem: Problem, x: Array, w: Array) -> Array:
        """The module's `forward`."""
        return forward(problem, x, w)

    def backward(self, problem: Problem, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool] = (True, True)) -> tuple[Array, Array]:
        """The module's `backward`."""
        return backward(problem, x, w, y, g, need)

    def tangent(self, problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool] = (True, True)) -> Array:
        """The module's `tangent`."""
        return tangent(problem, x, w, y, tx, tw, active)

    def describe(self, problem: Problem, dtype: Any) -> tuple[str, ...]:
        """The module's `describe`."""
        del dtype
        return describe(problem)

    def opaque_call(self, platform: str) -> bool:
        """On CPU the core partitions the engine's calls itself (each device's loops on its
        local shapes): left to the partitioner, the tap loops of the winner, `log` and
        AdderNet backward passes all-gather under a batch sharding. GPU/TPU programs are
        left to the partitioner: on TPU a `custom_partitioning` call fails to compile on
        several devices (jax#38196); on GPU it would work, but the partitioner already
        splits the engine's lax code with only scalar flag all-reduces (docs/engines.md),
        and wrapping this default GPU path would keep its sharded programs out of
        `jax.export` and the persistent compilation cache (the wrapper is a Python
        callback keyed by a process-local id)."""
        return platform == "cpu"

    def backward_reads_output(self, problem: Problem) -> bool:
        """A logsumexp's softmax weights are ``exp(c - y)`` with the `y` given (both the
        exp-space and the tap paths); max/min winners are found by index, not from `y`,
        and a rewrite's backward recomputes its own forward."""
        caps = capabilities(problem.op)
        return caps.reduce == "logsumexp" and problem.op.rewrite is None


ENGINE = XlaEngine()
registry.register(ENGINE.name, lambda: ENGINE)
