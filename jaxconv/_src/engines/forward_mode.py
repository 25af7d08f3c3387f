"""Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) of the generic engine.

The engine's hand-written backward passes are ``jax.custom_vjp`` rules, which JAX cannot
differentiate forward. When an operand of a generic product is being differentiated forward
(a JVP tracer), the front end routes the product here instead: the same forward computation
under a ``jax.custom_jvp`` whose tangent is

- ``sum`` / ``logsumexp`` / a callable reduce: the exact JVP of the tap loop (for
  ``logsumexp``, the softmax-weighted tangents of the terms);
- ``max`` / ``min``: the tangent of the winning term, averaged over tied terms -- the rule of
  ``jax.jvp(jnp.max)`` and the forward twin of the engine's reverse rule (so
  ``jacfwd == jacrev``).

The tangent of each term is the JVP of the op's ``combine``. Ops whose combine (or reduce)
defines only a reverse-mode rule -- ``xnor`` and ``adder``, whose straight-through /
AdderNet gradients are ``custom_vjp`` -- have no forward-mode rule: a clear ``TypeError``
says so. Apply ``jax.jit`` around (not inside) ``jax.jvp``: a product traced under ``jit``
first and differentiated forward afterwards has already chosen the reverse-mode path. For
the same reason ``jax.linearize`` (which traces like reverse mode) is not supported; use
``jax.jvp``. ``jax.hessian`` (forward over reverse) works.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core
from jax._src.interpreters import ad

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op
from jaxconv._src.engines import taps
from jaxconv._src.engines import xla as engine_xla

Array = jax.Array


def has_jvp_tracer(*arrays: Any) -> bool:
    """Whether an array is being differentiated forward (a JVP tracer, possibly batched)."""
    for a in arrays:
        t = a
        while isinstance(t, core.Tracer):
            if isinstance(t, ad.JVPTracer):
                return True
            t = getattr(t, "val", None)  # a vmap tracer wraps its value
    return False


def _reverse_only(e: Exception) -> bool:
    msg = str(e)
    return "custom_vjp" in msg or "forward-mode" in msg


def check_op(op: Op, lhs: Any, rhs: Any) -> None:
    """Raises a clear ``TypeError`` if ``op`` has no forward-mode rule and is jvp'd.

    Args:
      op: the product.
      lhs: the left operand (possibly a tracer).
      rhs: the right operand.
    """
    if not has_jvp_tracer(lhs, rhs):
        return
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return
    problem = _reverse_only_part(op, jnp.dtype(dtype))
    if problem is not None:
        raise TypeError(
            f"op {op.name!r} cannot be differentiated in forward mode (jax.jvp, jax.jacfwd): "
            f"its `{problem}` defines only a reverse-mode rule (a custom VJP, e.g. a "
            "straight-through or AdderNet gradient). Use reverse mode (jax.grad, jax.vjp, "
            f"jax.jacrev) or an op with a differentiable `{problem}`."
        )


@functools.lru_cache(maxsize=256)
def _reverse_only_part(op: Op, dtype: Any) -> str | None:
    """``"combine"`` / ``"reduce"`` if that part of ``op`` has only a custom VJP, else None.

    Probed eagerly on two small concrete arrays (once per op and dtype).
    """
    a = np.ones((2,), dtype)
    fns = [("combine", op.combine)]
    if callable(op.reduce):
        fns.append(("reduce", op.reduce))
    for what, fn in fns:
        try:
            with jax.ensure_compile_time_eval():
                jax.jvp(fn, (a, a), (a, a))
        except TypeError as e:
            if _reverse_only(e):
                return what
            raise
    return None


class _Plain:
    """A plain (autodiff-friendly) tap loop over one block of images, for tangents."""

    def __init__(self, cfg: _Cfg, wt: Array):
        self.cfg, self.wt = cfg, wt
        geom = cfg.geom
        self.mask = geom.valid_mask() if cfg.op.pad_value is None else None
        self.p = max(1, math.prod(geom.out_spatial))
        self.taps = [
            (t, tap, geom.tap_mask(self.mask, tap)) for t, tap in enumerate(geom.taps())
        ]
        self.taps = [(t, tap, m) for t, tap, m in self.taps if m is None or m.any()]

    def terms(self, xb: Array, wk: Array, tap: tuple[int, ...]) -> Array:
        """``combine`` of one tap: ``(Nb, P, G, Og, I)``."""
        g, og, i = wk.shape
        xs = taps.tap_input(xb, self.cfg.geom, tap, g)  # (Nb, P, G, I)
        shape = (xs.shape[0], self.p, g, og, i)
        return self.cfg.op.combine(jnp.broadcast_to(xs[:, :, :, None, :], shape),
                                   jnp.broadcast_to(wk[None, None], shape))

    def in_bounds(self, m: Any) -> Array | None:
        if m is None or m.all():
            return None
        return jnp.asarray(m.reshape(1, self.p, 1, 1, 1))

    def forward(self, xb: Array, wt: Array) -> Array:
        op, acc = self.cfg.op, self.cfg.acc_dtype
        ident = algebra.identity_value(op, acc)
        # algebra.logaddexp: jnp.logaddexp's JVP is NaN where a window's first taps are padding.
        binary = algebra.logaddexp if op.reduce == "logsumexp" else algebra.binary(op)
        out = None
        for t, tap, m in self.taps:
            part = algebra.reduce_last(op, self.terms(xb, wt[t], tap), acc)
            mk = self.in_bounds(m)
            if mk is not None:  # padded positions of this tap contribute the identity
                part = jnp.where(mk[..., 0], part, ident)
            out = part if out is None else binary(out, part)
        if out is None:
            out = jnp.broadcast_to(ident, (xb.shape[0], self.p, *wt.shape[1:3]))
        return out

    def tangent_max_min(self, xb: Array, txb: Array, yb: Array, twt: Array) -> Array:
        acc = self.cfg.acc_dtype
        count = jnp.zeros(yb.shape, acc)
        num = jnp.zeros(yb.shape, acc)
        for t, tap, m in self.taps:
            c, tc = jax.jvp(lambda a, b, tap=tap: self.terms(a, b, tap), (xb, self.wt[t]),
                            (txb, twt[t]))
            eq = c == yb[..., None]
            mk = self.in_bounds(m)
            if mk is not None:
                eq = eq & mk
            count = count + jnp.sum(eq, axis=-1, dtype=acc)
            num = num + jnp.sum(jnp.where(eq, tc, 0), axis=-1, dtype=acc)
        return jnp.where(count > 0, num / jnp.maximum(count, 1), 0)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    op: Op
    geom: Any
    acc_dtype: Any
    block: int
    engine_kwargs: tuple


def _primal(cfg: _Cfg, x: Array, w: Array) -> Array:
    """The engine's own forward pass: ``(N, P, G, Og)`` in the accumulation dtype."""
    y = engine_xla.generic_conv(x, w, cfg.geom, cfg.op.replace(post=None),
                                preferred_element_type=cfg.acc_dtype, **dict(cfg.engine_kwargs))
    g = cfg.geom.groups
    return y.reshape(x.shape[0], -1, g, w.shape[-1] // g)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _conv_fwd_mode(cfg: _Cfg, x: Array, w: Array) -> Array:
    return _primal(cfg, x, w)


@_conv_fwd_mode.defjvp
def _conv_fwd_mode_jvp(cfg: _Cfg, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    x, w = primals
    tx, tw = tangents
    op = cfg.op
    g = cfg.geom.groups
    xb, n = taps.blocks(taps.pad_input(x, op, cfg.geom), cfg.block)
    txb, _ = taps.blocks(taps.pad_input(tx, op, cfg.geom, fill=0), cfg.block)
    wt, twt = taps.taps_major(w, g), taps.taps_major(tw, g)
    plain = _Plain(cfg, wt)
    if op.reduce in ("max", "min"):
        y = _conv_fwd_mode(cfg, x, w)
        yb, _ = taps.blocks(y, cfg.block)
        ty = lax.map(lambda a: plain.tangent_max_min(a[0], a[1], a[2], twt), (xb, txb, yb))
        return y, taps.unblock(ty, n).astype(y.dtype)

    def blockwise(xb_: Array, wt_: Array) -> Array:
        return lax.map(lambda a: plain.forward(a, wt_), xb_)

    y, ty = jax.jvp(blockwise, (xb, wt), (txb, twt))
    return taps.unblock(y, n), taps.unblock(ty, n)


def generic_conv(
    x: Array,
    w: Array,
    geom: Any,
    op: Op,
    *,
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
) -> Array:
    """The engine's canonical generalized convolution, differentiable in forward mode.

    Args:
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, C // groups, O)`` kernel.
      geom: the engine's static geometry.
      op: the product.
      preferred_element_type: accumulation / output dtype.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      ``(N, *out_spatial, O)``.
    """
    x, w, out_dtype, acc_dtype = taps.resolve_dtypes(x, w, op, preferred_element_type)
    n, o = x.shape[0], w.shape[-1]
    if n == 0 or o == 0:
        return jnp.zeros((n, *geom.out_spatial, o), out_dtype)
    mbb = engine_xla.DEFAULT_MAX_BLOCK_BYTES if max_block_bytes is None else int(max_block_bytes)
    # A quarter of the bound: a block's terms, their tangents and their JVP live at once.
    block = engine_xla.block_size(geom, n, w.shape[-2] * geom.groups, o // geom.groups,
                                  max(x.dtype.itemsize, acc_dtype.itemsize), mbb // 4)
    kwargs = () if max_block_bytes is None else (("max_block_bytes", int(max_block_bytes)),)
    cfg = _Cfg(op, geom, acc_dtype, block, kwargs)
    y = _conv_fwd_mode(cfg, x, w).reshape(n, *geom.out_spatial, o)
    return taps.finish(y, op, out_dtype)
