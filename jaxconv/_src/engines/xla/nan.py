"""NaN restoration for max/min products (XLA CPU's max reductions drop NaN)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core import products
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.jaxpr_walk import iter_eqns
from jaxconv._src.engines import taps
from jaxconv._src.engines.xla import zeros
from jaxconv._src.engines.xla.common import Config, separable_kind
from jaxconv._src.engines.xla.forward import _forward, _native_mul_forward

Array = jax.Array


def _value_flags(a: Array) -> Array:
    """Which special values ``a`` holds, as the bits of one int32: ``+inf`` 1, ``-inf`` 2,
    NaN 4, zero 8, and the signed-zero bits of `zeros.zero_indicators` (16, 32).

    One max reduction of the 0/1 indicators (a trailing axis), weighted into bits
    afterwards: a max partitions into an all-reduce every collective implements (an integer
    bitwise-or reduction does not lower on CPU or NCCL collectives).

    Args:
        a: an array.

    Returns:
        The flags, an int32 scalar.
    """
    ind = jnp.stack([a == jnp.inf, a == -jnp.inf, jnp.isnan(a), a == 0,
                     *zeros.zero_indicators(a)], axis=-1).astype(jnp.int32)
    seen = jnp.max(ind, axis=tuple(range(a.ndim)), initial=0)  # 0: an empty operand
    bits = [1, 2, 4, 8, zeros.SMALL_BIT, zeros.NEG_ZERO_BIT]
    return jnp.sum(seen * jnp.asarray(bits, jnp.int32))


def _nonfinite_flags(a: Array) -> Array:
    """`_value_flags`' non-finite bits, all set (7) where ``a`` holds any non-finite value:
    one max reduction of one indicator (partitioned, one scalar all-reduce, as
    `_value_flags`'), for the sums, whose NaN restoration needs no more (`_nan_terms` then
    examines every non-finite value, and no zero).

    Args:
        a: an array.

    Returns:
        The flags, an int32 scalar: 0 or 7.
    """
    bad = jnp.logical_not(jnp.isfinite(a)).astype(jnp.int32)
    return 7 * jnp.max(bad, axis=tuple(range(a.ndim)), initial=0)  # 0: an empty operand


def _operand_flags(cfg: Config, x: Array, w: Array) -> tuple[Array, Array]:
    """`_value_flags` of the input as the products see it (padded where the op has a pad
    value) and of the kernel.

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.

    Returns:
        ``(input flags, kernel flags)``.
    """
    xs = x if cfg.op.pad_value is None else taps.pad_input(x, cfg.op, cfg.geom)
    return _value_flags(xs), _value_flags(w)


def _nan_terms(op: Op, xs: Array, w: Array, flags: tuple[Array, Array]
               ) -> tuple[Any, Array]:
    """0/1 indicators of the products ``combine(x, w)`` that are NaN because of a
    non-finite value: ``(indicators, needed)``.

    ``indicators(xs, w)`` builds ``a`` over input cells ``(N, *S, G, J, I)`` and ``b`` over
    kernel entries ``(*K, J, I, O)`` (``J`` terms, each one elementwise fusion): a product
    is NaN exactly where some term ``j`` has ``a = b = 1``, the channels paired one to one.
    The scalar ``needed`` says whether any product can be such a NaN (from one reduction
    of each operand, `_operand_flags`); the indicators are built only then.

    ``combine_kind`` gives the IEEE rule (NaN in, NaN out; ``inf - inf``; ``0 * inf``); a
    combine of unknown kind is evaluated at ``+-inf`` and NaN against every entry of the
    other operand, so that its own rule applies (``masked_op``'s NaN-encoded absent taps are
    not NaN products). Products of finite values are not examined.

    Args:
        op: the op.
        xs: the input (padded).
        w: the kernel.
        flags: `_operand_flags`.

    Returns:
        ``(indicators, needed)``.
    """
    kind = capabilities(op).combine
    fx, fw = flags

    def has(f: Array, bit: int) -> Array:
        return (f & bit) != 0

    def stack(fs: list, a: Array, axis: int) -> Array:
        return jnp.stack([jnp.broadcast_to(f(a), a.shape) for f in fs],
                         axis=axis).astype(jnp.float32)

    if kind in ("add", "min", "max", "mul"):
        # NaN in, NaN out (against a term of ones), then the kind's pairs.
        xf = [jnp.isnan, jnp.ones_like]
        wf = [jnp.ones_like, jnp.isnan]
        needed = has(fx, 4) | has(fw, 4)
        if kind == "add":  # inf + -inf
            xf += [lambda a: a == jnp.inf, lambda a: a == -jnp.inf]
            wf += [lambda a: a == -jnp.inf, lambda a: a == jnp.inf]
            needed |= (has(fx, 1) & has(fw, 2)) | (has(fx, 2) & has(fw, 1))
        elif kind == "mul":  # 0 * inf
            xf += [lambda a: a == 0, jnp.isinf]
            wf += [jnp.isinf, lambda a: a == 0]
            needed |= (has(fx, 8) & has(fw, 3)) | (has(fx, 3) & has(fw, 8))

        def indicators(xs: Array, w: Array) -> tuple[Array, Array]:
            return stack(xf, xs, -2), stack(wf, w, -3)

        return indicators, needed

    def indicators(xs: Array, w: Array) -> tuple[Array, Array]:
        # For v in (+inf, -inf, NaN): (x is v, combine(v, w) is NaN) and (combine(x, v) is
        # NaN, w is v), each side one combine of the operand broadcast against the values.
        vals = jnp.asarray([jnp.inf, -jnp.inf, jnp.nan], xs.dtype)

        def is_v(a: Array, v: Array) -> Array:
            return jnp.where(jnp.isnan(v), jnp.isnan(a), a == v)

        xb = jnp.broadcast_to(xs[..., None, :], (*xs.shape[:-1], 3, xs.shape[-1]))
        vx = jnp.broadcast_to(vals[:, None], xb.shape)
        wb = jnp.broadcast_to(w[..., None, :, :], (*w.shape[:-2], 3, *w.shape[-2:]))
        vw = jnp.broadcast_to(vals[:, None, None].astype(w.dtype), wb.shape)
        a = jnp.concatenate([is_v(xb, vx), jnp.isnan(op.combine(xb, vx))], axis=-2)
        b = jnp.concatenate([jnp.isnan(op.combine(vw, wb)), is_v(wb, vw)], axis=-3)
        return a.astype(jnp.float32), b.astype(jnp.float32)

    return indicators, has(fx, 7) | has(fw, 7)


def _nan_outputs(cfg: Config, x: Array, w: Array, flags: tuple[Array, Array]) -> Array:
    """Which outputs ``(N, P, G, Og)`` have a NaN product involving a non-finite value.

    XLA CPU's vectorised max/min reductions drop NaN, so the engine restores it from one
    native sum-convolution of the 0/1 indicators of `_nan_terms`, inside a ``while_loop``
    that runs it once where the operands hold the values it needs (a NaN, or ``+inf`` and
    ``-inf`` for ``x + w``, ...) and else not at all: finite operands cost two reductions.
    That loop body is the only code compiled for it, and under ``vmap`` the primitive folds
    the mapped axis into the batch, so its predicate stays one scalar.

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.
        flags: `_operand_flags`.

    Returns:
        A bool array, True at the outputs to set to NaN.
    """
    op, geom = cfg.op, cfg.geom
    g = geom.groups
    n = x.shape[0]
    # With a pad value the padded cells are products and their indicators count; with
    # identity padding the indicator images are padded with 0.
    xs = x if op.pad_value is None else taps.pad_input(x, op, geom)
    xs = xs.reshape(*xs.shape[:-1], g, xs.shape[-1] // g)
    indicators, needed = _nan_terms(op, xs, w, flags)

    def count(xs: Array, w: Array) -> Array:
        lhs, rhs = indicators(xs, w)
        # Sizes written out, not -1: an empty input (all windows padding) has a 0 here.
        lhs = lhs.reshape(*lhs.shape[:-3], math.prod(lhs.shape[-3:]))
        rhs = rhs.reshape(*rhs.shape[:-3], math.prod(rhs.shape[-3:-1]), rhs.shape[-1])
        if op.pad_value is None:
            lhs = lax.pad(lhs, jnp.asarray(0, lhs.dtype), geom.pad_config)
        return products.padded(lhs, rhs, geom, jnp.float32)

    def body(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        # ``+ 0.0 * i`` (not simplified in floating point) keeps the indicators inside
        # the loop: XLA hoists loop-invariant code out of it.
        z = carry[0].astype(xs.dtype) * jnp.asarray(0, xs.dtype)
        return carry[0] + 1, carry[1] + count(xs + z, w + z.astype(w.dtype))

    total = jnp.zeros((n, *geom.out_spatial, w.shape[-1]), jnp.float32)
    _, total = lax.while_loop(lambda c: (c[0] == 0) & needed, body, (jnp.int32(0), total))
    return total.reshape(n, max(1, math.prod(geom.out_spatial)), g, -1) > 0


def _forward_dispatch(cfg: Config, x: Array, w: Array) -> Array:
    """The forward pass of a sum, max, min or logsumexp product (no branch on the values).

    Max/min: XLA CPU's vectorised reductions drop NaN, so the outputs with a NaN product
    are set to NaN from `_nan_outputs` (as are a sum's or logsumexp's whose combine holds a
    max or min, `_combine_may_drop_nan`), and they do not order signed zeros, so a zero result
    takes the sign its window gives it (`zeros.fix_zero_signs`, run only where the operands
    can make a ``-0`` product). The padding is masked statically.

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.

    Returns:
        The output ``(N, P, G, Og)``.
    """
    op = cfg.op
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    if floating and separable_kind(op) == "mul":
        return _native_mul_forward(cfg, x, w)
    y = _forward(cfg, x, w)
    if not floating:
        return y
    if op.reduce in ("max", "min"):
        flags = _operand_flags(cfg, x, w)
        y = zeros.fix_zero_signs(cfg, x, w, y,
                                 zeros.negative_zero_possible(op, *flags, y))
        y = jnp.where(_nan_outputs(cfg, x, w, flags), jnp.asarray(jnp.nan, y.dtype), y)
    elif _combine_may_drop_nan(op):
        flags = (_nonfinite_flags(x), _nonfinite_flags(w))
        y = jnp.where(_nan_outputs(cfg, x, w, flags), jnp.asarray(jnp.nan, y.dtype), y)
    return y


# Primitives that YNNPACK's fused reductions evaluate without propagating NaN.
_NAN_DROPPING = frozenset({"max", "min", "clamp", "reduce_max", "reduce_min"})


def _uses_max_min(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or a sub-jaxpr of its equations) applies one of `_NAN_DROPPING`.

    Args:
        jaxpr: a jaxpr.

    Returns:
        True if it does.
    """
    return any(eqn.primitive.name in _NAN_DROPPING for eqn in iter_eqns(jaxpr))


@functools.lru_cache(maxsize=1024)
def _combine_may_drop_nan(op: Op) -> bool:
    """Whether a sum's or logsumexp's tap reduction can lose a NaN product.

    XLA CPU hands a reduction fused with its elementwise producers to YNNPACK (jaxlib
    0.10: ``__ynn_fusion``, fusion type ``LIBRARY_FUSION_TYPE_REDUCE``), whose ``maximum``
    and ``minimum`` return the other operand where one is NaN: ``sum(max(x - w, 0))`` over
    a NaN ``w`` gives a number at larger shapes, while the same ``max`` outside a reduction
    gives NaN. So a combine with a max or min in its program (``l1``'s ``-|x - w|``, written
    with both; a ``min``/``max`` combine kind; a user's ``relu(x - w)``), or one that cannot
    be traced, has its NaN products restored from `_nan_outputs`, like the max/min
    reductions'; the others (``add``, ``mul``, ``adder``'s ``-abs``) have none to lose.

    Args:
        op: the op (canonical).

    Returns:
        True where the NaN outputs are restored.
    """
    if op.reduce not in ("sum", "logsumexp"):
        return False
    kind = capabilities(op).combine
    if kind in ("add", "mul", "max", "min"):
        return kind in ("max", "min")
    s = jax.ShapeDtypeStruct((2,), jnp.float32)
    try:
        jaxpr = jax.make_jaxpr(op.combine)(s, s).jaxpr
    except Exception:  # noqa: BLE001 - an untraceable combine: restore, to be safe
        return True
    return _uses_max_min(jaxpr)
