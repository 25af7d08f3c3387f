"""The built-in ops of the contract, each with its formula, gradient, padding and source."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxconv._src.core.algebra import Op


def _multiply(x, w):
    return x * w


standard = Op(
    _multiply, "sum", name="standard", combine_kind="mul", forward_mode=True,
    doc="""Multiply-and-add. ``combine = x*w``, ``reduce = sum``, zero padding.

    Runs ``lax.conv_general_dilated`` / ``lax.dot_general`` itself (same numbers, same
    gradients, ``batch_group_count`` supported).""",
)


# --- xnor --------------------------------------------------------------------------------

def _xnor_combine(x, w):
    from jaxconv._src.quantizers import ste_sign

    return ste_sign(x) * ste_sign(w)


def _xnor_rewrite(product, lhs, rhs):
    from jaxconv._src.quantizers import ste_sign

    # sign(x)*sign(w) summed over the window is a standard product of the signs; padded cells
    # are zero after the sign, so they contribute the sum's identity (the tap is skipped).
    return product(ste_sign(lhs), ste_sign(rhs))


xnor = Op(
    _xnor_combine, "sum", name="xnor", rewrite=_xnor_rewrite, forward_mode=False,
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
    return -jnp.abs(x - w)


def _adder_fwd(x, w):
    return -jnp.abs(x - w), (x, w)


def _adder_bwd(res, g):
    x, w = res
    # AdderNet (Chen et al., CVPR 2020), eqs. 5 and 7: the kernel gets the full-precision
    # gradient x - w, the input the HardTanh-clipped w - x.
    return g * jnp.clip(w - x, -1, 1), g * (x - w)


_adder_combine.defvjp(_adder_fwd, _adder_bwd)

adder = Op(
    _adder_combine, "sum", pad_value=0.0, name="adder", native="adder", separable="adder",
    forward_mode=False,
    doc="""AdderNet: ``combine = -|x - w|``, sum; pads with 0 (each padded tap adds ``-|w|``).

    Gradient (AdderNet's rules, not the exact subgradient): ``dW = sum g*(x - w)``,
    ``dX = sum g*clip(w - x, -1, 1)``. Train it with ``jaxconv.optim.adder_scale`` (the
    adaptive learning-rate scale) and batch norm after each layer.
    Source: Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?",
    CVPR 2020.""",
)


def _l1_combine(x, w):
    return -jnp.abs(x - w)


l1 = Op(
    _l1_combine, "sum", name="l1", native="l1", forward_mode=True,
    doc="""Negative L1 distance: ``combine = -|x - w|``, sum, identity padding (skipped taps).

    Gradient: the exact subgradient (``-sign(x - w)``, 0 at ``x == w``). Differs from
    ``adder`` in its gradient and at the borders (``adder`` pads with 0).
    Source: the L1 similarity of AdderNet (Chen et al., CVPR 2020).""",
)


# --- l2 ----------------------------------------------------------------------------------

def _l2_combine(x, w):
    d = x - w
    return -(d * d)


def _l2_rewrite(product, lhs, rhs):
    # -(x - w)^2 = 2 x w - x^2 - w^2. The last two terms are rank one in the channels, so they
    # ride along in the same native product as two extra input channels per group:
    # lhs' = [x, sum_i x_i^2, 1], rhs' = [2 w, -1, -sum_i w_i^2]. Zero padding makes the w^2
    # term count in-bounds taps only (the ones channel is 0 in the padding).
    kw = getattr(product, "keywords", None) or {}
    dn = kw.get("dimension_numbers")
    if isinstance(dn, jax.lax.ConvDimensionNumbers) and kw.get("feature_group_count", 1) == 1:
        # (Grouped: XLA CPU's grouped convolutions with a few channels per group are slow,
        # far slower backward, so the three products below stay separate.)
        return _l2_conv(product, lhs, rhs, dn, 1)
    if dn is not None and not isinstance(dn, jax.lax.ConvDimensionNumbers) and \
            getattr(product, "func", None) is jax.lax.dot_general:
        return _l2_dot(product, lhs, rhs, dn)
    return (2 * product(lhs, rhs) - product(lhs * lhs, jnp.ones_like(rhs))
            - product(jnp.ones_like(lhs), rhs * rhs))


def _l2_conv(product, lhs, rhs, dn, groups):
    f_ax, i_ax = dn.lhs_spec[1], dn.rhs_spec[1]
    xs = jnp.moveaxis(lhs, f_ax, -1)
    xs = xs.reshape(*xs.shape[:-1], groups, xs.shape[-1] // groups)
    x2 = jnp.sum(xs * xs, axis=-1, keepdims=True)
    xn = jnp.concatenate([xs, x2, jnp.ones_like(x2)], axis=-1)
    xn = jnp.moveaxis(xn.reshape(*xn.shape[:-2], -1), -1, f_ax)
    w2 = jnp.sum(rhs * rhs, axis=i_ax, keepdims=True)
    wn = jnp.concatenate([2 * rhs, -jnp.ones_like(w2), -w2], axis=i_ax)
    return product(xn, wn)


def _l2_dot(product, lhs, rhs, dn):
    (lc, rc), (lb, rb) = dn
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    y = 2 * product(lhs, rhs)  # batch + lhs free + rhs free
    keep_l = [d for d in range(lhs.ndim) if d not in lc]
    x2 = jnp.sum(lhs * lhs, axis=tuple(lc)).astype(y.dtype)
    x2 = x2.transpose([keep_l.index(d) for d in (*lb, *lf)])
    x2 = x2.reshape(x2.shape + (1,) * len(rf))
    keep_r = [d for d in range(rhs.ndim) if d not in rc]
    w2 = jnp.sum(rhs * rhs, axis=tuple(rc)).astype(y.dtype)
    w2 = w2.transpose([keep_r.index(d) for d in (*rb, *rf)])
    w2 = w2.reshape(w2.shape[:len(rb)] + (1,) * len(lf) + w2.shape[len(rb):])
    return y - x2 - w2


l2 = Op(
    _l2_combine, "sum", name="l2", rewrite=_l2_rewrite, forward_mode=True,
    doc="""Negative squared L2 distance: ``combine = -(x - w)**2``, sum, identity padding.

    Gradient: exact. Computed as ``2 x.w - |x|^2 - |w|^2`` in one native product (the two
    norms are two extra input channels per group); that
    loses relative precision where the distance is tiny next to ``|x|^2`` (cancellation,
    ~1e-7 * |x|^2 absolute error in f32). Use ``l2_exact`` when that matters.
    Source: Chen et al., AdderNet (L2 variant); kernel methods (RBF layers).""",
)

l2_exact = Op(
    _l2_combine, "sum", name="l2_exact", native="l2_exact", forward_mode=True,
    doc="""``l2`` computed directly by the generic engine (no cancellation).""",
)


# --- tropical / morphological --------------------------------------------------------------

def _add(x, w):
    return x + w


max_plus = Op(
    _add, "max", name="max_plus", native="max_plus", combine_kind="add", forward_mode=True,
    doc="""Tropical (max-plus) product, morphological dilation: ``combine = x + w``, max.

    Padding: the identity (-inf in effect: padded taps are skipped). Gradient: to the
    winning tap, split equally among ties (as ``jax.grad(jnp.max)``). IEEE infinities:
    a -inf term is dominated; ``-inf + inf`` is NaN; NaN in a window gives NaN.
    Sources: Zhang et al., "Tropical geometry of deep neural networks" (ICML 2018);
    Mondal et al., "Dense morphological network" (2019); Franchi et al., "Deep
    morphological networks" (2020).""",
)

min_plus = Op(
    _add, "min", name="min_plus", native="min_plus", combine_kind="add", forward_mode=True,
    doc="""Min-plus product (tropical, morphological erosion with ``-w``): ``x + w``, min.

    Padding: the identity (+inf in effect). Gradient: to the winning tap, ties split equally.
    Sources: as ``max_plus``.""",
)

max_min = Op(
    jnp.minimum, "max", name="max_min", native="max_min", combine_kind="min",
    forward_mode=True,
    doc="""Fuzzy max-min composition: ``combine = min(x, w)``, max.

    Padding: the identity. Gradient: to the winning tap through ``min`` (split 1/2 when
    ``x == w``). Source: Zadeh's max-min composition; fuzzy morphological networks.""",
)

min_max = Op(
    jnp.maximum, "min", name="min_max", native="min_max", combine_kind="max",
    forward_mode=True,
    doc="""Fuzzy min-max composition: ``combine = max(x, w)``, min.

    Padding: the identity. Gradient: to the winning tap. Source: as ``max_min``.""",
)

max_times = Op(
    _multiply, "max", name="max_times", combine_kind="mul", forward_mode=True,
    doc="""Max-times (Viterbi) product: ``combine = x * w``, max, for nonnegative data.

    Padding: the identity (padded taps are skipped). Gradient: to the winning tap, split
    equally among ties. On nonnegative inputs and weights it is the semiring of
    probabilities under max (the Viterbi semiring); with signs it is still well defined
    but no longer a semiring product of probabilities.
    Source: Goodman, "Semiring parsing" (1999), the Viterbi semiring.""",
)

log = Op(
    _add, "logsumexp", name="log", combine_kind="add", forward_mode=True,
    doc="""Log-semiring product: ``combine = x + w``, ``logsumexp`` (a soft max-plus).

    Padding: the identity (-inf in effect). Gradient: exact (the softmax of the window's
    terms); a window of only -inf gives -inf and a zero gradient, never NaN. Fast path:
    a native convolution in exp space, ``log(conv(exp(x - mx), exp(w - mw))) + mx + mw``
    with per-sample and per-output-channel maxima ``mx``, ``mw`` (same numbers to ~1e-6
    relative). Where a window's largest term lies more than ~60 below ``mx + mw`` (a range
    of values above ~80 in practice), holds only -inf, or an input is NaN or +inf, the whole
    call falls back to the exact engine (two passes per tap: max shift, then the sum of
    exponentials; any range of values is exact there).
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
    """The ``op=`` argument of the public functions: an ``Op`` or a built-in name."""
    return get(op)


def names() -> tuple[str, ...]:
    """The built-in ops' names."""
    return tuple(BUILTIN_OPS)
