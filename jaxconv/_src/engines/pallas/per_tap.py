"""A convolution as one kernel call per tap (TPU): tap tables and per-tap contraction."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.engines import taps
from jaxconv._src.engines.pallas.config import Config, _Problem, _problem
from jaxconv._src.engines.pallas.matmul import _contract
from jaxconv._src.engines.pallas.platforms import _pad_to

Array = jax.Array


def _tap_tables(
    cfg: Config, pr: _Problem
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static per-tap tables over the taps that see at least one real input cell.

    Returns ``(used, offsets, rows)``: the used taps' indices ``(T_used,)``, their offsets in
    the padded input ``(T_used, nsd)`` and their row masks ``(T_used, Mp, 1)`` (1 where the
    output row's tap reads a real cell, 0 for padding, ``lhs_dilation`` holes and the rows
    that only pad M to a block multiple).

    Args:
        cfg: the call's configuration.
        pr: the problem's extents.

    Returns:
        ``(used, offsets, rows)``, as above.
    """
    geom, op = cfg.geom, cfg.op
    mask = geom.valid_mask() if op.pad_value is None else None
    used, offsets, rows = [], [], []
    for t, tap in enumerate(geom.taps()):
        m = geom.tap_mask(mask, tap)
        if m is not None and not m.any():
            continue  # a tap that only ever sees padding contributes the identity
        valid = np.ones((pr.n, pr.p), bool) if m is None else np.broadcast_to(
            m.reshape(1, pr.p), (pr.n, pr.p))
        r = np.zeros((pr.mp, 1), np.int32)
        r[: pr.m, 0] = valid.reshape(-1)
        used.append(t)
        offsets.append(taps.tap_offset(geom, tap))
        rows.append(r)
    nsd = len(geom.window)
    t = len(used)
    return (np.asarray(used, np.int32), np.asarray(offsets, np.int32).reshape(t, nsd),
            np.asarray(rows, np.int32).reshape(t, pr.mp, 1))


def _tap_lhs(cfg: Config, pr: _Problem, xp: Array, off: Array) -> Array:
    """The tap at (traced) offset ``off``: padded input slice -> ``a (G, Mp, Kp)``."""
    xs = taps.tap_slice_at(xp, cfg.geom, off)  # (N, *Os, C)
    a = xs.reshape(pr.m, pr.g, pr.i).transpose(1, 0, 2)
    return _pad_to(a, (pr.g, pr.mp, pr.kp))


def _weights_taps(w: Array, pr: _Problem) -> Array:
    """(*K, I, O) -> padded ``(T, G, Kp, Np)`` (the matmul's ``b`` operand is K-major)."""
    *k, i, o = w.shape
    wt = w.reshape(math.prod(k), i, pr.g, pr.og).transpose(0, 2, 1, 3)
    return _pad_to(wt, (wt.shape[0], pr.g, pr.kp, pr.np_))


def _contract_taps(
    cfg: Config, x: Array, w: Array, *, term: Callable[..., Array],
    binary: Callable[[Array, Array], Array], ident: Any, y: Array | None = None,
) -> Array:
    """Accumulates ``term(combine)`` over every tap and channel: ``(G, Mp, Np)`` padded.

    The taps are a ``lax.scan`` (the kernel is traced once); each step is one kernel call
    whose accumulator input is the running result.

    Args:
        cfg: the call's configuration.
        x: the input.
        w: the kernel.
        term: ``term(x, w, y)``, the value each product contributes.
        binary: the reduce of two partial results.
        ident: the reduce's identity.
        y: the forward's output, or ``None``.

    Returns:
        The padded result ``(G, Mp, Np)``.
    """
    op = cfg.op
    pr = _problem(cfg, x, w)
    xp = taps.pad_input(x, op, cfg.geom)
    used, offsets, rows = _tap_tables(cfg, pr)
    acc0 = jnp.full((pr.g, pr.mp, pr.np_), ident, cfg.acc_dtype)
    if used.size == 0:
        return acc0
    w_taps = _weights_taps(w, pr)[jnp.asarray(used)]

    def step(acc: Array, tap: tuple[Array, Array, Array]) -> tuple[Array, None]:
        off, r, b = tap
        acc = _contract(
            _tap_lhs(cfg, pr, xp, off), b, backend=cfg.backend, term=term, binary=binary,
            ident=ident, acc_dtype=cfg.acc_dtype, blocks=pr.blocks, k_total=pr.i, y=y,
            acc=acc, mask=r)
        return acc, None

    acc, _ = lax.scan(step, acc0, (jnp.asarray(offsets), jnp.asarray(rows), w_taps))
    return acc
