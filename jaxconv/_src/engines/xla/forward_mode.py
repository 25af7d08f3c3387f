"""Forward-mode tangents (`jax.jvp`, `jax.linearize`, `jax.jacfwd`) of generic products.

The tangent of a product is linear in the operands' tangents `(tx, tw)`:

- `sum` / `logsumexp` / a callable reduce: the exact JVP of the tap loop (for `logsumexp`,
  the softmax-weighted tangents of the terms);
- `max` / `min`: the tangent of the winning term, averaged over tied terms -- the rule of
  `jax.jvp(jnp.max)` and the forward twin of the engines' reverse rule (so
  `jacfwd == jacrev`). The winners are found together with a recomputed max, from one
  computation of the terms, never as terms equal to the forward's output (another compiled
  computation, which may round a user's combine differently).

The tangent of each term is the JVP of the op's `combine`. It is the `conv_tangent`
primitive's XLA lowering (`jaxconv._src.core.lowering`), whose transpose is the
engines' hand-written backward pass: reverse mode never differentiates this code. Ops whose
`combine` (or `reduce`) defines only a reverse-mode rule -- `xnor` and `adder`, whose
straight-through / AdderNet gradients are custom VJPs -- have no forward-mode rule: a clear
`TypeError` names the op.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines import taps
from jaxconv._src.engines.xla import winner
from jaxconv._src.engines.xla.common import Config

Array = jax.Array


def check_forward_mode(op: Op) -> None:
    """Raises a `TypeError` naming `op` when it has no forward-mode rule.

    Args:
      op: the product.
    """
    caps = capabilities(op)
    if not caps.forward_mode:
        part = caps.reverse_only_part or "combine"
        raise TypeError(
            f"op {op.display_name!r} cannot be differentiated in forward mode (jax.jvp, "
            f"jax.linearize, jax.jacfwd): its `{part}` defines only a reverse-mode rule (a "
            "custom VJP, e.g. a straight-through or AdderNet gradient). Use reverse mode "
            f"(jax.grad, jax.vjp, jax.jacrev) or an op with a differentiable `{part}`."
        )


class _Plain:
    """A plain (autodiff-friendly) tap loop over one block of images, for tangents."""

    def __init__(self, cfg: _Cfg, wt: Array):
        """The live taps of the geometry and their masks.

        Args:
            cfg: the configuration.
            wt: the kernel, taps major ``(T, G, Og, I)``.
        """
        self.cfg, self.wt = cfg, wt
        geom = cfg.geom
        self.mask = geom.valid_mask() if cfg.op.pad_value is None else None
        self.p = max(1, math.prod(geom.out_spatial))
        self.taps = [
            (t, tap, geom.tap_mask(self.mask, tap)) for t, tap in enumerate(geom.taps())
        ]
        self.taps = [(t, tap, m) for t, tap, m in self.taps if m is None or m.any()]

    def terms(self, xb: Array, wk: Array, tap: tuple[int, ...]) -> Array:
        """``combine`` of one tap: ``(Nb, P, G, Og, I)``.

        Args:
            xb: the padded images.
            wk: the tap's kernel ``(G, Og, I)``.
            tap: the tap.

        Returns:
            The products.
        """
        g, og, i = wk.shape
        xs = taps.tap_input(xb, self.cfg.geom, tap, g)  # (Nb, P, G, I)
        shape = (xs.shape[0], self.p, g, og, i)
        return self.cfg.op.combine(jnp.broadcast_to(xs[:, :, :, None, :], shape),
                                   jnp.broadcast_to(wk[None, None], shape))

    def in_bounds(self, m: np.ndarray | None) -> Array | None:
        """The tap's mask shaped for the products, or ``None`` where every position is in bounds.

        Args:
            m: the tap's validity over the output positions, or ``None``.

        Returns:
            The mask ``(1, P, 1, 1, 1)``, or ``None``.
        """
        if m is None or m.all():
            return None
        return jnp.asarray(m.reshape(1, self.p, 1, 1, 1))

    def forward(self, xb: Array, wt: Array) -> Array:
        """The block's output ``(Nb, P, G, Og)``, tap by tap (padded taps give the identity).

        Args:
            xb: the padded images.
            wt: the kernel, taps major.

        Returns:
            The output.
        """
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
        """The tangent of the winning terms, averaged over ties, for one block of images.

        The winners are found together with the max, from one computation of each tap's
        recomputed terms (`winner.winner_terms`), and the taps' partial results are merged by
        the same rule: never by comparing recomputed terms with the forward's ``yb``, which
        a differently compiled forward (the native engine's, or an XLA kernel that contracts
        ``x * w - x`` into an fma where this one does not) may have rounded otherwise. ``yb``
        only marks the NaN windows, which have no tangent.

        Args:
            xb: the padded images.
            txb: their tangent.
            yb: the block's output.
            twt: the kernel's tangent, taps major.

        Returns:
            The output's tangent.
        """
        acc = self.cfg.acc_dtype
        red = self.cfg.op.reduce
        best = count = num = None
        for t, tap, m in self.taps:
            c, tc = jax.jvp(lambda a, b, tap=tap: self.terms(a, b, tap), (xb, self.wt[t]),
                            (txb, twt[t]))
            ident = jnp.asarray(-jnp.inf if red == "max" else jnp.inf, c.dtype)
            v, (k, s) = winner.winner_terms(red, c, (jnp.ones(c.shape, acc), tc.astype(acc)))
            mk = self.in_bounds(m)
            if mk is not None:  # padded positions of this tap hold no term
                on = mk[..., 0]
                v, k, s = jnp.where(on, v, ident), jnp.where(on, k, 0), jnp.where(on, s, 0)
            if best is None:
                best, count, num = v, k, s
            else:
                best, (count, num) = winner.winner_merge(red, best, (count, num), v, (k, s))
        if best is None:
            return jnp.zeros(yb.shape, acc)
        real = (count > 0) & jnp.logical_not(jnp.isnan(yb) | jnp.isnan(best))
        return jnp.where(real, num / jnp.maximum(count, 1), 0).astype(acc)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    op: Op
    geom: Geometry
    acc_dtype: np.dtype
    block: int


def tangent(problem: Problem, cfg: Config, x: Array, w: Array, y: Array, tx: Array, tw: Array,
            active: tuple[bool, bool]) -> Array:
    """The tangent of the product's output `(N, *out_spatial, O)`, linear in `(tx, tw)`.

    Args:
      problem: the canonical problem.
      cfg: the XLA engine's configuration of it (canonical op, batch blocks).
      x: `(N, *spatial, C)` input; `w`: `(*window, I, O)` kernel.
      w: the kernel.
      y: the output, `(N, *out_spatial, O)`.
      tx: the input's tangent.
      tw: the kernel's tangent.
      active: which of `tx`, `tw` may be nonzero.

    Returns:
      The output's tangent, in the accumulation dtype.
    """
    del active
    check_forward_mode(problem.op)
    op, geom = cfg.op, cfg.geom
    g = geom.groups
    n, o = x.shape[0], w.shape[-1]
    p = max(1, math.prod(geom.out_spatial))
    pcfg = _Cfg(op, geom, cfg.acc_dtype, cfg.block_bwd)
    xb, _ = taps.blocks(taps.pad_input(x, op, geom), pcfg.block)
    txb, _ = taps.blocks(taps.pad_input(tx, op, geom, fill=0), pcfg.block)
    wt, twt = taps.taps_major(w, g), taps.taps_major(tw, g)
    plain = _Plain(pcfg, wt)
    if op.reduce in ("max", "min"):
        yb, _ = taps.blocks(y.reshape(n, p, g, o // g).astype(pcfg.acc_dtype), pcfg.block)
        ty = lax.map(lambda a: plain.tangent_max_min(a[0], a[1], a[2], twt), (xb, txb, yb))
    else:
        def blockwise(xb_: Array, wt_: Array) -> Array:
            return lax.map(lambda a: plain.forward(a, wt_), xb_)

        _, ty = jax.jvp(blockwise, (xb, wt), (txb, twt))
    ty = taps.unblock(ty, n).reshape(n, *geom.out_spatial, o)
    return ty.astype(cfg.acc_dtype)
