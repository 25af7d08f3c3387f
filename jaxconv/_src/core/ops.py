"""The built-in ops of the contract, each with its formula, gradient, padding and source."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxconv._src.core.algebra import Op


def _multiply(x, w):
    """``x * w``, the standard product's combine."""
    return x * w


standard = Op(
    _multiply, "sum", name="standard", semiring=True, combine_kind="mul", forward_mode=True,
    lax_product=True,
    doc="""Multiply-and-add. ``combine = x*w``, ``reduce = sum``, zero padding.

    Runs ``lax.conv_general_dilated`` / ``lax.dot_general`` itself (same numbers, same
    gradients, ``batch_group_count`` supported).""",
)


# --- xnor --------------------------------------------------------------------------------

def _xnor_combine(x, w):
    """``ste_sign(x) * ste_sign(w)``, the XNOR op's combine (straight-through gradients)."""
    from jaxconv._src.quantizers import ste_sign

    return ste_sign(x) * ste_sign(w)


def _xnor_rewrite(product, lhs, rhs):
    """The XNOR sum as the standard product of the signs.

    Args:
        product: the standard product of the geometry.
        lhs: the input.
        rhs: the kernel.

    Returns:
        ``sum sign(x) sign(w)`` over the window.
    """
    from jaxconv._src.quantizers import ste_sign

    # sign(x)*sign(w) summed over the window is a standard product of the signs; padded cells
    # are zero after the sign, so they contribute the sum's identity (the tap is skipped).
    return product(ste_sign(lhs), ste_sign(rhs))


xnor = Op(
    _xnor_combine, "sum", name="xnor", semiring=False, rewrite=_xnor_rewrite, forward_mode=False,
    binary=True,
    doc="""XNOR-popcount product of binary networks: ``combine = sign(x)*sign(w)``, sum.

    ``sign(0) = +1`` as in larq. Gradient: straight-through on both sides, through
    ``sign(x)`` as ``1{|x| <= 1}`` (larq ``ste_sign``), likewise for ``w``. Padding: the
    identity (skipped taps, i.e. zeros after the sign); set ``pad_value=1.0`` or ``-1.0``
    for larq's ``pad_values``. Computed as a native convolution of the signs (the same
    numbers exactly: every product is +-1 and sums of small integers are exact in f32).
    Sources: Rastegari et al., XNOR-Net (ECCV 2016); Courbariaux et al., BinaryNet (2016);
    larq (Geiger & Team, JOSS 2020).""",
)


# --- adder -------------------------------------------------------------------------------

@jax.custom_vjp
def _adder_combine(x, w):
    """``-|x - w|`` with AdderNet's gradients (`_adder_bwd`)."""
    return -jnp.abs(x - w)


def _adder_fwd(x, w):
    """The forward of `_adder_combine`, with the operands as residuals."""
    return -jnp.abs(x - w), (x, w)


def _adder_bwd(res, g):
    """AdderNet's gradients of ``-|x - w|``.

    Args:
        res: the operands ``(x, w)``.
        g: the output's cotangent.

    Returns:
        ``(g * clip(w - x, -1, 1), g * (x - w))``.
    """
    x, w = res
    # AdderNet (Chen et al., CVPR 2020), eqs. 5 and 7: the kernel gets the full-precision
    # gradient x - w, the input the HardTanh-clipped w - x.
    return g * jnp.clip(w - x, -1, 1), g * (x - w)


_adder_combine.defvjp(_adder_fwd, _adder_bwd)

adder = Op(
    _adder_combine, "sum", pad_value=0.0, name="adder", semiring=False, native="adder",
    separable="adder",
    forward_mode=False,
    doc="""AdderNet: ``combine = -|x - w|``, sum; pads with 0 (each padded tap adds ``-|w|``).

    Gradient (AdderNet's rules, not the exact subgradient): ``dW = sum g*(x - w)``,
    ``dX = sum g*clip(w - x, -1, 1)``. Train it with ``jaxconv.optim.adder_scale`` (the
    adaptive learning-rate scale) and batch norm after each layer.
    Source: Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?",
    CVPR 2020.""",
)


def _l1_combine(x, w):
    """``-|x - w|`` written with max and min, so that its derivative at ``x == w`` is 0.

    Args:
        x: the input's values.
        w: the kernel's values.

    Returns:
        ``-|x - w|``.
    """
    # -|d| written as -(max(d, 0) - min(d, 0)) (the same value, exactly): its derivative is
    # the stated subgradient, 0 at x == w (max and min split a tie), where jnp.abs's would
    # be 1. Only max/min, so that every engine's kernels lower it.
    d = x - w
    return -(jnp.maximum(d, 0) - jnp.minimum(d, 0))


l1 = Op(
    _l1_combine, "sum", name="l1", semiring=False, native="l1", forward_mode=True,
    doc="""Negative L1 distance: ``combine = -|x - w|``, sum, identity padding (skipped taps).

    Gradient: the exact subgradient (``-sign(x - w)``, 0 at ``x == w``). Differs from
    ``adder`` in its gradient and at the borders (``adder`` pads with 0).
    Source: the L1 similarity of AdderNet (Chen et al., CVPR 2020).""",
)


# --- l2 ----------------------------------------------------------------------------------

def _l2_combine(x, w):
    """``-(x - w)**2``, the ``l2`` op's combine."""
    d = x - w
    return -(d * d)


def _l2_rewrite(product, lhs, rhs):
    """The ``l2`` sum ``sum -(x - w)^2`` through standard products.

    Floats go through `_l2_float_exact` (exact for infinities, NaN and overflowing squares);
    integers through one product in a wide integer dtype, which wraps as the direct sum does.

    Args:
        product: the standard product of the geometry (a ``functools.partial`` of lax's).
        lhs: the input.
        rhs: the kernel.

    Returns:
        The sum, in the product's output dtype.
    """
    # -(x - w)^2 = 2 x w - x^2 - w^2, computed in one native product (see `_l2_products`).
    dtype = jnp.result_type(lhs, rhs)
    kw = getattr(product, "keywords", None) or {}
    out_dtype = jnp.dtype(kw.get("preferred_element_type") or dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        # Integers wrap: the sum of -(x - w)^2 modulo 2^bits does not depend on where the
        # wrapping happens, so the rewrite in a wide integer, cast back, equals l2_exact.
        wide = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        y = _l2_products(_with_dtype(product, wide), lhs.astype(wide), rhs.astype(wide),
                         None, None)
        return y.astype(out_dtype)
    return _l2_float_exact(product, out_dtype, lhs, rhs)


def _with_dtype(product, dtype):
    """``product`` accumulating in ``dtype`` (where it binds ``preferred_element_type``).

    Args:
        product: the standard product.
        dtype: the accumulation dtype.

    Returns:
        The product, rebound where it has a ``preferred_element_type``.
    """
    kw = getattr(product, "keywords", None)
    if kw is None or "preferred_element_type" not in kw:
        return product
    return functools.partial(product, preferred_element_type=dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _l2_float_exact(product, out_dtype, lhs, rhs):
    """The float rewrite, exact for infinities, NaN and values whose squares overflow.

    Branch-free. Non-finite cells enter the product as 0 and their counts ride along in the
    two norm channels, weighted by a power of two ``G`` far above any finite result: an
    output whose window (in-bounds taps only) holds a NaN gives NaN, one holding an infinity
    gives -inf, as ``-(x - w)^2`` summed directly does; ``+inf`` meeting ``+inf`` (or
    ``-inf`` meeting ``-inf``) at one tap gives NaN, found by a second product of the
    infinities' indicators. Where the largest finite magnitude exceeds ``limit`` (about
    ``1e11`` to ``1e13`` in float32, depending on the window), all data is scaled by one
    power of two into ``[-1, 1]`` (exactly) so that no square overflows.

    Args:
        product: the standard product of the geometry.
        lhs: the input.
        rhs: the kernel.
        out_dtype: the output dtype.

    Returns:
        The ``l2`` sum.
    """
    acc = jnp.promote_types(jnp.result_type(lhs, rhs), jnp.float32)
    x = lhs.astype(acc)
    w = rhs.astype(acc)
    fx, fw = jnp.isfinite(x), jnp.isfinite(w)
    x0, w0 = jnp.where(fx, x, 0), jnp.where(fw, w, 0)
    m = jnp.maximum(jnp.max(jnp.abs(x0), initial=0), jnp.max(jnp.abs(w0), initial=0))
    taps = max(int(rhs.size) // max(_out_features(product, rhs), 1), 1)
    # Flag weights, powers of two: a NaN counts M, an infinity 1 (at most 2 * taps < M / 2),
    # both times G, with G * M * 4 * taps below the dtype's largest value.
    big_m = 2.0 ** math.ceil(math.log2(4 * taps + 1))
    big_g = 2.0 ** math.floor(math.log2(float(jnp.finfo(acc).max) / (64 * big_m * taps)))
    # Finite windows give |y| <= 4 * taps * limit^2 = G / 4 when max|value| <= limit; beyond
    # it a power of two s >= max|value| scales the data into [-1, 1] (exactly).
    limit = math.sqrt(big_g / (16 * taps))
    s = jnp.exp2(jnp.ceil(jnp.log2(jnp.where(m > limit, m, 1))))
    s = jax.lax.stop_gradient(s)
    cx = jnp.where(fx, 0, jnp.where(jnp.isnan(x), big_m, 1)).astype(acc) * big_g
    cw = jnp.where(fw, 0, jnp.where(jnp.isnan(w), big_m, 1)).astype(acc) * big_g
    prod = _with_dtype(product, acc)
    y = _l2_products(prod, x0 / s, w0 / s, cx, cw)
    # Indicators whose product is NaN exactly where +inf meets +inf or -inf meets -inf
    # (inf * 0), and finite elsewhere; padded cells hold 1, so they never make a NaN.
    ix, prod1 = _pad_like(prod, jnp.where(x == jnp.inf, jnp.inf, jnp.where(
        x == -jnp.inf, 0, 1)).astype(acc))
    both = prod1(ix, jnp.where(w == jnp.inf, 0, jnp.where(w == -jnp.inf, jnp.inf, 1)).astype(acc))
    nan = (y > big_g * big_m / 2) | jnp.isnan(both) | jnp.isnan(y)
    out = jnp.where(y > big_g / 2, -jnp.inf, y * s * s)
    return jnp.where(nan, jnp.nan, out).astype(out_dtype)


@_l2_float_exact.defjvp
def _l2_float_jvp(product, out_dtype, primals, tangents):
    """The tangent of ``sum -(x - w)^2``, ``2 x.tw + 2 tx.w - 2 x.tx - 2 w.tw`` in standard
    products (no square, so no overflow), whatever the values: differentiated through
    `_l2_float_exact`'s selects, a window holding a NaN or an infinity had a zero derivative
    (its finite terms too) where the sum of the terms' derivatives has the terms' own, and
    NaN or infinities where IEEE gives them (as ``l2_exact``).

    Args:
        product: the standard product of the geometry.
        out_dtype: the output dtype.
        primals: ``(lhs, rhs)``.
        tangents: their tangents.

    Returns:
        ``(the l2 sum, its tangent)``.
    """
    lhs, rhs = primals
    acc = jnp.promote_types(jnp.result_type(lhs, rhs), jnp.float32)
    prod = _with_dtype(product, acc)
    x, w, tx, tw = (a.astype(acc) for a in (*primals, *tangents))
    kw = getattr(product, "keywords", None) or {}
    dn = kw.get("dimension_numbers")
    if isinstance(dn, jax.lax.ConvDimensionNumbers) and kw.get("feature_group_count", 1) == 1:
        t = _l2_conv_tangent(prod, x, w, tx, tw, dn)
    else:  # no constant channel here: JAX skips the products of the constants' zero tangents
        _, t = jax.jvp(lambda a, b: _l2_products(prod, a, b, None, None), (x, w), (tx, tw))
    return _l2_float_exact(product, out_dtype, lhs, rhs), t.astype(out_dtype)


def _l2_conv_tangent(product, x, w, tx, tw, dn):
    """The tangent of `_l2_conv`'s sum in two products of one extra channel each,
    ``[tx, 2 x.tx] * [2 w, -1] + [x, 1] * [2 tw, -2 w.tw]``: differentiated as written,
    `_l2_conv`'s constant channels (1, -1) would meet the norms ``|w|^2``, ``|x|^2`` with a
    zero tangent, ``0 * inf`` = NaN where an operand is infinite.

    Args:
        product: the standard convolution.
        x: the input.
        w: the kernel.
        tx: the input's tangent.
        tw: the kernel's tangent.
        dn: the convolution's dimension numbers.

    Returns:
        The tangent.
    """
    f_ax, i_ax = dn.lhs_spec[1], dn.rhs_spec[1]
    xs, txs = jnp.moveaxis(x, f_ax, -1), jnp.moveaxis(tx, f_ax, -1)
    sx = 2 * jnp.sum(xs * txs, axis=-1, keepdims=True)
    sw = 2 * jnp.sum(w * tw, axis=i_ax, keepdims=True)
    a1 = jnp.moveaxis(jnp.concatenate([txs, sx], axis=-1), -1, f_ax)
    a2 = jnp.moveaxis(jnp.concatenate([xs, jnp.ones_like(sx)], axis=-1), -1, f_ax)
    b1 = jnp.concatenate([2 * w, -jnp.ones_like(sw)], axis=i_ax)
    b2 = jnp.concatenate([2 * tw, -sw], axis=i_ax)
    return product(a1, b1) + product(a2, b2)


def _out_features(product, rhs) -> int:
    """The number of output features of ``product`` on kernel ``rhs`` (1 if unknown).

    Args:
        product: the standard product (a ``functools.partial`` of lax's conv or dot).
        rhs: the kernel.

    Returns:
        The count.
    """
    kw = getattr(product, "keywords", None) or {}
    dn = kw.get("dimension_numbers")
    if isinstance(dn, jax.lax.ConvDimensionNumbers):
        return int(rhs.shape[dn.rhs_spec[0]])
    if dn is not None:  # dot_general: the contraction is the product of the contracting dims
        (_, rc), _ = dn
        return int(rhs.size) // max(math.prod(rhs.shape[d] for d in rc), 1)
    return 1


def _pad_like(product, x):
    """``(x padded explicitly with ones, product without padding)`` for a padded conv.

    Returns ``(x, product)`` unchanged where ``product`` pads nothing (or is not a conv).

    Args:
        product: the standard product (a ``functools.partial`` of lax's conv or dot).
        x: the input.

    Returns:
        ``(x, product)``.
    """
    kw = getattr(product, "keywords", None) or {}
    dn = kw.get("dimension_numbers")
    if not isinstance(dn, jax.lax.ConvDimensionNumbers):
        return x, product
    pads = kw.get("padding", ())
    ldil = kw.get("lhs_dilation") or (1,) * len(pads)
    if isinstance(pads, str) or (not any(lo or hi for lo, hi in pads) and all(
            d == 1 for d in ldil)):
        return x, product
    cfg = [(0, 0, 0)] * x.ndim
    for ax, (lo, hi), d in zip(dn.lhs_spec[2:], pads, ldil, strict=True):
        cfg[ax] = (lo, hi, d - 1)
    unpadded = functools.partial(product, padding=((0, 0),) * len(pads),
                                 lhs_dilation=(1,) * len(pads))
    return jax.lax.pad(x, jnp.asarray(1, x.dtype), cfg), unpadded


def _l2_products(product, lhs, rhs, cx, cw):
    """``2 x.w - |x|^2 - |w|^2``; ``cx`` / ``cw`` (or None) are subtracted inside the norms.

    Args:
        product: the standard product of the geometry.
        lhs: the input.
        rhs: the kernel.
        cx: subtracted from ``x^2`` inside its norm, or ``None``.
        cw: subtracted from ``w^2`` inside its norm, or ``None``.

    Returns:
        The sum, with one product where the layout allows (`_l2_conv`, `_l2_dot`).
    """
    kw = getattr(product, "keywords", None) or {}
    dn = kw.get("dimension_numbers")
    if isinstance(dn, jax.lax.ConvDimensionNumbers) and kw.get("feature_group_count", 1) == 1:
        # (Grouped: XLA CPU's grouped convolutions with a few channels per group are slow,
        # far slower backward, so the three products below stay separate.)
        return _l2_conv(product, lhs, rhs, dn, 1, cx, cw)
    if dn is not None and not isinstance(dn, jax.lax.ConvDimensionNumbers) and \
            getattr(product, "func", None) is jax.lax.dot_general:
        return _l2_dot(product, lhs, rhs, dn, cx, cw)
    x2, w2 = lhs * lhs, rhs * rhs
    if cx is not None:
        x2, w2 = x2 - cx, w2 - cw
    return 2 * product(lhs, rhs) - product(x2, jnp.ones_like(rhs)) - product(
        jnp.ones_like(lhs), w2)


def _l2_conv(product, lhs, rhs, dn, groups, cx=None, cw=None):
    """``2 x.w - |x|^2 - |w|^2`` of a convolution as one product with two extra channels.

    The input gets the channels ``|x|^2`` and 1, the kernel ``-1`` and ``-|w|^2``.

    Args:
        product: the standard convolution.
        lhs: the input.
        rhs: the kernel.
        dn: the convolution's dimension numbers.
        groups: the number of feature groups.
        cx: subtracted from ``x^2`` inside its norm, or ``None``.
        cw: subtracted from ``w^2`` inside its norm, or ``None``.

    Returns:
        The sum.
    """
    f_ax, i_ax = dn.lhs_spec[1], dn.rhs_spec[1]
    xs = jnp.moveaxis(lhs, f_ax, -1)
    xs = xs.reshape(*xs.shape[:-1], groups, xs.shape[-1] // groups)
    x2 = jnp.sum(xs * xs, axis=-1, keepdims=True)
    if cx is not None:
        c = jnp.moveaxis(cx, f_ax, -1)
        x2 = x2 - jnp.sum(c.reshape(*c.shape[:-1], groups, c.shape[-1] // groups), axis=-1,
                          keepdims=True)
    xn = jnp.concatenate([xs, x2, jnp.ones_like(x2)], axis=-1)
    xn = jnp.moveaxis(xn.reshape(*xn.shape[:-2], -1), -1, f_ax)
    w2 = jnp.sum(rhs * rhs, axis=i_ax, keepdims=True)
    if cw is not None:
        w2 = w2 - jnp.sum(cw, axis=i_ax, keepdims=True)
    wn = jnp.concatenate([2 * rhs, -jnp.ones_like(w2), -w2], axis=i_ax)
    return product(xn, wn)


def _l2_dot(product, lhs, rhs, dn, cx=None, cw=None):
    """``2 x.w - |x|^2 - |w|^2`` of a ``dot_general``: one product and two broadcast norms.

    Args:
        product: the standard ``dot_general``.
        lhs: the left operand.
        rhs: the right operand.
        dn: the dot's dimension numbers.
        cx: subtracted from ``x^2`` inside its norm, or ``None``.
        cw: subtracted from ``w^2`` inside its norm, or ``None``.

    Returns:
        The sum, in lax's output order (batch, lhs free, rhs free).
    """
    (lc, rc), (lb, rb) = dn
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    y = 2 * product(lhs, rhs)  # batch + lhs free + rhs free
    keep_l = [d for d in range(lhs.ndim) if d not in lc]
    x2 = jnp.sum(lhs * lhs if cx is None else lhs * lhs - cx, axis=tuple(lc)).astype(y.dtype)
    x2 = x2.transpose([keep_l.index(d) for d in (*lb, *lf)])
    x2 = x2.reshape(x2.shape + (1,) * len(rf))
    keep_r = [d for d in range(rhs.ndim) if d not in rc]
    w2 = jnp.sum(rhs * rhs if cw is None else rhs * rhs - cw, axis=tuple(rc)).astype(y.dtype)
    w2 = w2.transpose([keep_r.index(d) for d in (*rb, *rf)])
    w2 = w2.reshape(w2.shape[:len(rb)] + (1,) * len(lf) + w2.shape[len(rb):])
    return y - x2 - w2


l2 = Op(
    _l2_combine, "sum", name="l2", semiring=False, rewrite=_l2_rewrite, forward_mode=True,
    separable="sqdiff",
    doc="""Negative squared L2 distance: ``combine = -(x - w)**2``, sum, identity padding.

    Gradient: exact. Computed as ``2 x.w - |x|^2 - |w|^2`` in one native product (the two
    norms are two extra input channels per group); that
    loses relative precision where the distance is tiny next to ``|x|^2`` (cancellation,
    ~1e-7 * |x|^2 absolute error in f32). Use ``l2_exact`` when that matters.
    Infinities and NaN give what the direct sum gives (-inf, or NaN where IEEE has one), and
    values whose squares would overflow are scaled by a power of two first (then a window
    of values ~2^60 below the largest reads as 0). Integers keep their dtype and wrap as
    ``l2_exact`` does.
    Source: Chen et al., AdderNet (L2 variant); kernel methods (RBF layers).""",
)

l2_exact = Op(
    _l2_combine, "sum", name="l2_exact", semiring=False, native="l2_exact", forward_mode=True,
    separable="sqdiff",
    doc="""``l2`` computed directly by the generic engine (no cancellation).""",
)


# --- tropical / morphological --------------------------------------------------------------

def _add(x, w):
    """``x + w``, the combine of the tropical ops."""
    return x + w


max_plus = Op(
    _add, "max", name="max_plus", semiring=True, native="max_plus", combine_kind="add",
    forward_mode=True,
    doc="""Tropical (max-plus) product, morphological dilation: ``combine = x + w``, max.

    Padding: the identity (-inf in effect: padded taps are skipped). Gradient: to the
    winning tap, split equally among ties (as ``jax.grad(jnp.max)``). IEEE infinities:
    a -inf term is dominated; ``-inf + inf`` is NaN; NaN in a window gives NaN.
    Sources: Zhang et al., "Tropical geometry of deep neural networks" (ICML 2018);
    Mondal et al., "Dense morphological network" (2019); Franchi et al., "Deep
    morphological networks" (2020).""",
)

min_plus = Op(
    _add, "min", name="min_plus", semiring=True, native="min_plus", combine_kind="add",
    forward_mode=True,
    doc="""Min-plus product (tropical, morphological erosion with ``-w``): ``x + w``, min.

    Padding: the identity (+inf in effect). Gradient: to the winning tap, ties split equally.
    Sources: as ``max_plus``.""",
)

max_min = Op(
    jnp.minimum, "max", name="max_min", semiring=True, native="max_min", combine_kind="min",
    forward_mode=True,
    doc="""Fuzzy max-min composition: ``combine = min(x, w)``, max.

    Padding: the identity. Gradient: to the winning tap through ``min`` (split 1/2 when
    ``x == w``). Source: Zadeh's max-min composition; fuzzy morphological networks.""",
)

min_max = Op(
    jnp.maximum, "min", name="min_max", semiring=True, native="min_max", combine_kind="max",
    forward_mode=True,
    doc="""Fuzzy min-max composition: ``combine = max(x, w)``, min.

    Padding: the identity. Gradient: to the winning tap. Source: as ``max_min``.""",
)

max_times = Op(
    _multiply, "max", name="max_times", semiring=True, combine_kind="mul", forward_mode=True,
    doc="""Max-times (Viterbi) product: ``combine = x * w``, max, for nonnegative data.

    Padding: the identity (padded taps are skipped). Gradient: to the winning tap, split
    equally among ties. On nonnegative inputs and weights it is the semiring of
    probabilities under max (the Viterbi semiring); with signs it is still well defined
    but no longer a semiring product of probabilities.
    Source: Goodman, "Semiring parsing" (1999), the Viterbi semiring.""",
)

log = Op(
    _add, "logsumexp", name="log", semiring=True, native="log", combine_kind="add",
    forward_mode=True,
    doc="""Log-semiring product: ``combine = x + w``, ``logsumexp`` (a soft max-plus).

    Padding: the identity (-inf in effect). Gradient: exact (the softmax of the window's
    terms); a window of only -inf gives -inf and a zero gradient, never NaN. Fast path:
    a native convolution in exp space, ``log(conv(exp(x - mx), exp(w - mw))) + mx + mw``
    with per-sample and per-output-channel maxima ``mx``, ``mw`` (same numbers to ~1e-6
    relative). Where a window's largest term lies more than ~60 below ``mx + mw`` (a range
    of values above ~80 in practice), holds only -inf, or an input is NaN or +inf, the whole
    call falls back to the exact path (on CPU the native kernel, elsewhere the XLA engine:
    two passes per tap, max shift, then the sum of exponentials; any range of values is
    exact there). The gradients follow the same choice.
    Source: the log semiring (Goodman, "Semiring parsing", 1999); torch-semiring-einsum.""",
)

BUILTIN_OPS: dict[str, Op] = {
    o.name: o for o in (standard, xnor, adder, l1, l2, l2_exact, max_plus, min_plus, max_min,
                        min_max, max_times, log)
}


def get(name: str | Op) -> Op:
    """Looks an op up by name (``"max_plus"``); an ``Op`` is returned unchanged.

    Args:
      name: a built-in op's name or an ``Op``.

    Returns:
      The op.

    Example:
      >>> import jaxconv
      >>> jaxconv.ops.get("max_plus").reduce
      'max'
    """
    if isinstance(name, Op):
        return name
    if not isinstance(name, str):
        raise TypeError(f"`op` must be a jaxconv.Op or a built-in op's name, got {name!r}.")
    try:
        return BUILTIN_OPS[name]
    except KeyError:
        raise ValueError(
            f"unknown op {name!r}; built-in ops are {sorted(BUILTIN_OPS)} (or pass a "
            "jaxconv.Op)."
        ) from None


def resolve(op: Any) -> Op:
    """The ``op=`` argument of the public functions: an ``Op`` or a built-in name.

    Args:
        op: an ``Op`` or the name of a built-in one.

    Returns:
        The ``Op``.
    """
    return get(op)


def names() -> tuple[str, ...]:
    """The built-in ops' names.

    Returns:
      The names, as `get` takes them.

    Example:
      >>> import jaxconv
      >>> "max_plus" in jaxconv.ops.names()
      True
    """
    return tuple(BUILTIN_OPS)
