"""The XLA engine's static configuration and the helpers its passes share."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.geometry import Geometry

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Config:
    """Static parameters of one XLA-engine convolution (hashable).

    Attributes:
      op: the product.
      geom: the geometry.
      acc_dtype: the accumulation (and output) dtype.
      max_block_bytes: the bound on one block's intermediate bytes.
      block: images per block in the forward pass.
      block_bwd: images per block in the backward pass.
      unroll: steps of the input gradient's loop over output channels per iteration.
      product_dtype: the dtype each product is computed in where it is wider than the
        operands' (a sum's or logsumexp's bf16 / f16 operands: the accumulation dtype), else
        None. One decision for the forward, the backward and the tangent (`widen`).
    """

    op: Op
    geom: Geometry
    acc_dtype: Any
    max_block_bytes: int
    block: int  # images (rows) per block in the forward pass
    block_bwd: int  # images per block in the backward pass (several products live at once)
    unroll: int = 8  # steps of the input gradient's loop over output channels per iteration
    product_dtype: Any = None

    def widen(self, *operands: Array) -> tuple[Array, ...]:
        """The operands (and tangents) in `product_dtype` where they are narrower floats.

        Args:
            *operands: the operands (and tangents).

        Returns:
            The operands, widened where that applies.

        Example:
            >>> x, w = cfg.widen(x, w)  # doctest: +SKIP
        """
        if self.product_dtype is None:
            return operands
        bits = jnp.finfo(self.product_dtype).bits
        return tuple(a.astype(self.product_dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                     and jnp.finfo(a.dtype).bits < bits else a for a in operands)


def block_size(
    geom: Geometry, n: int, in_features: int, out_per_group: int, itemsize: int,
    max_block_bytes: int,
) -> int:
    """Images per block so that one tap's ``(block, P, G, Og, I)`` products fit the bound.

    Args:
        geom: the product's geometry.
        n: the number of images.
        in_features: the input features (all groups).
        out_per_group: the output features per group.
        itemsize: the bytes of one product.
        max_block_bytes: the bound.

    Returns:
        The images per block, at least one.
    """
    per_image = max(1, math.prod(geom.out_spatial)) * in_features * out_per_group * itemsize
    return int(max(1, min(n, max_block_bytes // max(per_image, 1))))


def canonical_op(op: Op) -> Op:
    """``op`` as the engine computes it (`capabilities.Capabilities.canonical`).

    Args:
        op: the op.

    Returns:
        The canonical op.
    """
    return capabilities(op).canonical


def dominated_fill(op: Op) -> float | None:
    """A padding value no real term beats (`capabilities.Capabilities.dominated_fill`).

    Args:
        op: the op.

    Returns:
        The value, or ``None``.
    """
    return capabilities(op).dominated_fill


def separable_kind(op: Op) -> str | None:
    """``"mul"`` or ``"adder"`` when a sum's kernel gradient is a native product (declared
    or inferred: `jaxconv._src.core.capabilities.Capabilities.separable`).

    Args:
        op: the op.

    Returns:
        The kind, or ``None``.
    """
    return capabilities(op).separable


def grouped(cfg: Config, a: Array) -> Array:
    """``(N, *out_spatial, O) -> (N, P, G, Og)``: an output as the tap passes hold it.

    Args:
        cfg: the engine's configuration.
        a: the output.

    Returns:
        The output, positions flattened and features grouped.
    """
    return a.reshape(a.shape[0], max(1, math.prod(cfg.geom.out_spatial)), cfg.geom.groups, -1)


def _div(a: Any, m: int) -> Array:
    """``a // m`` for nonnegative integers ``a`` (lax's division: no floor correction)."""
    a = jnp.asarray(a)
    return lax.div(a, jnp.asarray(m, a.dtype))


def _rem(a: Any, m: int) -> Array:
    """``a % m`` for nonnegative integers ``a``."""
    a = jnp.asarray(a)
    return lax.rem(a, jnp.asarray(m, a.dtype))


def interleaved_steps(n: int, per_step: int) -> int:
    """Steps over ``n`` images, at most about ``per_step`` each: a divisor of ``n`` where one
    is near (no padding rows), else ``ceil(n / per_step)``.

    Args:
        n: the images.
        per_step: the images one step should hold.

    Returns:
        The number of steps.
    """
    k = -(-n // max(1, per_step))
    for d in range(k, min(n, 2 * k) + 1):
        if n % d == 0:
            return d
    return k


def interleave(a: Array, steps: int) -> tuple[Array, int]:
    """``(N, ...) -> (steps, nb, ...)`` with step ``b`` holding rows ``b, b + steps, ...``
    (zero rows pad ``N`` up to ``steps * nb``), and ``N``.

    Interleaved, not consecutive: the batch stays the outer axis of each step's block, so
    that under a mesh that splits the batch the SPMD partitioner splits every block the
    same way and no step reads another device's rows (consecutive blocks of a sharded batch
    straddle devices and each step gathers one). Undo with `deinterleave`.

    Args:
        a: an array ``(N, ...)``.
        steps: the number of steps.

    Returns:
        The blocks and ``N``.

    Example:
        >>> import jax.numpy as jnp
        >>> interleave(jnp.arange(6), 2)[0].tolist()
        [[0, 2, 4], [1, 3, 5]]
    """
    n = a.shape[0]
    nb = -(-n // steps)
    if nb * steps != n:
        a = jnp.concatenate([a, jnp.zeros((nb * steps - n, *a.shape[1:]), a.dtype)])
    if steps == 1:
        return a[None], n
    return a.reshape(nb, steps, *a.shape[1:]).swapaxes(0, 1), n
