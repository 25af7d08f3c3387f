"""The static parameters of one Pallas convolution (hashable)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines.pallas.platforms import Backend, BlockSizes, _fit, _padded

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Config:
    """Static parameters of one Pallas convolution on one backend (hashable)."""

    op: Op
    geom: Geometry
    acc_dtype: Any
    backend: Backend
    max_block_bytes: int | None


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static parameters of one Pallas convolution on every platform (hashable)."""

    op: Op
    geom: Geometry
    acc_dtype: Any
    backends: tuple[tuple[str, Backend], ...]
    max_block_bytes: int | None

    def config(self, backend: Backend) -> Config:
        """The parameters on one platform's ``backend``.

        Args:
            backend: the platform's backend.

        Returns:
            The `Config`.
        """
        return Config(self.op, self.geom, self.acc_dtype, backend, self.max_block_bytes)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Canonical sizes: rows ``M = N * P``, ``K = I`` per group, ``N = Og`` per group."""

    n: int
    p: int
    g: int
    i: int
    og: int
    blocks: BlockSizes

    @property
    def m(self) -> int:
        """The rows of the product: examples times output positions."""
        return self.n * self.p

    @property
    def mp(self) -> int:
        """The rows, padded to the row tile."""
        return _padded(self.m, self.blocks.bm, self.blocks.pow2)

    @property
    def kp(self) -> int:
        """The input channels per group, padded to the contraction tile."""
        return _padded(self.i, self.blocks.bk, self.blocks.pow2)

    @property
    def np_(self) -> int:
        """The output features per group, padded to the column tile."""
        return _padded(self.og, self.blocks.bn, self.blocks.pow2)


def _problem(cfg: Config, x: Array, w: Array) -> _Problem:
    """The matrix extents and block sizes of one per-tap problem.

    Args:
        cfg: the call's configuration.
        x: the input.
        w: the kernel.

    Returns:
        The `_Problem`.
    """
    g = cfg.geom.groups
    n = x.shape[0]
    p = max(1, math.prod(cfg.geom.out_spatial))
    i = w.shape[-2]
    og = w.shape[-1] // g
    return _Problem(n, p, g, i, og, _fit(cfg.backend.blocks, n * p, og, i))
