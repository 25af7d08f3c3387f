"""The Pallas convolution's forward and backward passes: which kernels, in which order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core import algebra
from jaxconv._src.engines import taps
from jaxconv._src.engines.pallas.config import Config, _Problem, _problem
from jaxconv._src.engines.pallas.implicit import _backward_implicit, _contract_implicit, _implicit
from jaxconv._src.engines.pallas.matmul import _combine_term, _grad_call
from jaxconv._src.engines.pallas.per_tap import _contract_taps, _tap_lhs, _tap_tables, _weights_taps
from jaxconv._src.engines.pallas.platforms import _ident, _pad_to
from jaxconv._src.engines.primal import primal

Array = jax.Array


def _pad_output(cfg: Config, pr: _Problem, y: Array) -> Array:
    """``(N, *Os, G * Og)`` -> padded canonical ``(G, Mp, Np)``."""
    y = y.reshape(pr.m, pr.g, pr.og).transpose(1, 0, 2)
    return _pad_to(y, (pr.g, pr.mp, pr.np_))


def _unpad_output(cfg: Config, pr: _Problem, acc: Array) -> Array:
    """Padded canonical ``(G, Mp, Np)`` -> ``(N, *Os, G * Og)``."""
    y = acc[:, : pr.m, : pr.og].transpose(1, 0, 2)
    return y.reshape(pr.n, *cfg.geom.out_spatial, pr.g * pr.og)


def _forward(cfg: Config, x: Array, w: Array) -> Array:
    """(N, *S, C), (*K, I, O) -> ``(N, *Os, O)`` in ``acc_dtype`` (before ``op.post``).

    Args:
        cfg: the call's configuration.
        x: the input.
        w: the kernel.

    Returns:
        The output.
    """
    op = cfg.op
    kw = dict(term=_combine_term(op), binary=algebra.binary(op),
              ident=_ident(op, cfg.acc_dtype))
    if _implicit(cfg):
        return _contract_implicit(cfg, x, w, **kw)
    return _unpad_output(cfg, _problem(cfg, x, w), _contract_taps(cfg, x, w, **kw))


def _grad_rule(reduce: str) -> Callable[[Array, Array, Array], Array]:
    """``dc(c, y, s)``: the cotangent of one product given the output ``y`` and scale ``s``.

    Args:
        reduce: the built-in reduce, ``"sum"``, ``"max"``, ``"min"`` or ``"logsumexp"``.

    Returns:
        The rule.
    """
    if reduce == "sum":
        return lambda c, y, s: jnp.broadcast_to(s, c.shape)
    if reduce in ("max", "min"):
        return lambda c, y, s: jnp.where(c == y, s, 0)
    # logsumexp: the softmax weight of the term; an all -inf window has no gradient.
    return lambda c, y, s: s * jnp.where(jnp.isneginf(y), 0, jnp.exp(c - y))


def _count_term(cfg: Config) -> dict[str, Any]:
    """The forward kernel's arguments that count the taps equal to the output (ties)."""
    comb, acc_dtype = primal(cfg.op.combine), cfg.acc_dtype
    return dict(term=lambda xv, wv, yv: (comb(xv, wv).astype(acc_dtype) == yv),
                binary=jnp.add, ident=0)


def _tie_scale(gy: Array, count: Array) -> Array:
    """``g / count`` where some tap wins (ties split equally), else 0."""
    return jnp.where(count > 0, gy / jnp.maximum(count, 1), 0).astype(gy.dtype)


def _backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array) -> tuple[Array, Array]:
    """The hand-written backward on one backend; ``y``, ``gy`` are ``(N, *Os, O)``.

    Args:
        cfg: the call's configuration.
        x: the input.
        w: the kernel.
        y: the forward's output.
        gy: the output's cotangent.

    Returns:
        ``(dx, dw)``.
    """
    op, geom = cfg.op, cfg.geom
    pr = _problem(cfg, x, w)
    acc_dtype = cfg.acc_dtype
    rule = _grad_rule(op.reduce)
    if _implicit(cfg):
        y, gy = y.astype(acc_dtype), gy.astype(acc_dtype)
        s = gy
        if op.reduce in ("max", "min"):
            s = _tie_scale(gy, _contract_implicit(cfg, x, w, y=y, **_count_term(cfg)))
        return _backward_implicit(cfg, x, w, s, y, rule)
    y = _pad_output(cfg, pr, y.astype(acc_dtype))
    gy = _pad_output(cfg, pr, gy.astype(acc_dtype))
    s = gy
    if op.reduce in ("max", "min"):
        s = _tie_scale(gy, _contract_taps(cfg, x, w, y=y, **_count_term(cfg)))
    xp = taps.pad_input(x, op, geom)
    used, offsets, rows = _tap_tables(cfg, pr)
    w_taps = _weights_taps(w, pr)
    gw_full = jnp.zeros((w_taps.shape[0], pr.g, pr.i, pr.og), acc_dtype)
    gxp = jnp.zeros(xp.shape, acc_dtype)
    if used.size:
        kw = dict(backend=cfg.backend, op=op, rule=rule, acc_dtype=acc_dtype,
                  blocks=pr.blocks, m_total=pr.m, n_total=pr.og)
        nsd = len(geom.window)

        def step(gxp: Array, tap: tuple[Array, Array, Array]) -> tuple[Array, Array]:
            off, r, b = tap
            a = _tap_lhs(cfg, pr, xp, off)
            da = _grad_call(a, b, y, s, r, wrt=0, **kw)[:, : pr.m, : pr.i]
            db = _grad_call(a, b, y, s, r, wrt=1, **kw)[:, : pr.i, : pr.og]
            da = da.transpose(1, 0, 2).reshape(pr.n, *geom.out_spatial, pr.g * pr.i)
            # Transpose of the strided tap slice: interleave the strides' holes, then add
            # into the padded input's gradient at the tap's offset (traced here, inside the
            # scan, so not ``taps.tap_unslice``, which takes a static tap).
            cfg_pad = [(0, 0, 0), *((0, 0, st - 1) for st in geom.strides), (0, 0, 0)]
            da = lax.pad(da, jnp.zeros((), da.dtype), cfg_pad)
            start = (jnp.zeros((), jnp.int32), *(off[d] for d in range(nsd)),
                     jnp.zeros((), jnp.int32))
            cur = lax.dynamic_slice(gxp, start, da.shape)
            return lax.dynamic_update_slice(gxp, cur + da, start), db

        gxp, gw_used = lax.scan(
            step, gxp, (jnp.asarray(offsets), jnp.asarray(rows), w_taps[jnp.asarray(used)]))
        gw_full = gw_full.at[jnp.asarray(used)].set(gw_used)
    _, pad_vjp = jax.vjp(lambda v: taps.pad_input(v, op, geom), x)
    (gx,) = pad_vjp(gxp.astype(x.dtype))
    gw = gw_full.transpose(0, 2, 1, 3).reshape(w.shape)
    return gx.astype(x.dtype), gw.astype(w.dtype)
