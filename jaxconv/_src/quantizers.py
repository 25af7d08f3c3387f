"""Binary and ternary quantizers with straight-through gradients.

Each quantizer is a pure function ``f(x, *, param=...)`` whose forward pass
quantizes ``x`` and whose backward pass is a pseudo-gradient defined with
`jax.custom_vjp`. They follow the forward and gradient definitions and the
defaults of larq (``larq/quantizers.py``, ``larq/math.py``):

| name | forward | gradient ``dq/dx`` |
|---|---|---|
| ``ste_sign`` | ``sign(x)`` | ``1{abs(x) <= clip_value}`` |
| ``approx_sign`` | ``sign(x)`` | ``(2 - 2 abs(x)) * 1{abs(x) <= 1}`` |
| ``swish_sign`` | ``sign(x)`` | SignSwish derivative (``beta``) |
| ``magnitude_aware_sign`` | ``mean(abs(x))*sign(x)`` | ``mean(abs(x))*1{abs(x)<=clip_value}`` |
| ``ste_heaviside`` | ``1{x > 0}`` | ``1{abs(x) <= clip_value}`` |
| ``ste_tern`` | ``{-1, 0, +1}`` | ``1{abs(x) <= clip_value}`` |

``sign`` here is larq's ``sign``: ``sign(0) = +1`` (so a binarized value is
never zero, which XNOR arithmetic relies on), unlike `jax.numpy.sign`.
``clip_value=None`` disables the gradient clipping. The pass-through test is
inclusive, ``|x| <= clip_value``, as in larq.

All quantizers keep the dtype of their input (``bfloat16`` in, ``bfloat16``
out, for both the value and the gradient), propagate NaN in the forward pass,
and work under `jax.jit`, `jax.vmap`, `jax.grad` and
`jax.checkpoint` (reverse mode only: like any `jax.custom_vjp`
function they do not support `jax.jvp` / `jax.jacfwd`). Their
parameters are static Python numbers. Pseudo-gradient formulas are evaluated in
at least float32 and rounded once to the input dtype.

Quantizers are plain functions, so they can be passed to layers directly, with
non-default parameters bound by `functools.partial`, or looked up by name
with `get`:

```pycon
>>> import functools
>>> import jax.numpy as jnp
>>> from jaxconv import quantizers
>>> q = functools.partial(quantizers.ste_sign, clip_value=0.5)
>>> q(jnp.array([-0.3, 0.0, 2.0]))
Array([-1.,  1.,  1.], dtype=float32)
>>> quantizers.get("ste_tern") is quantizers.ste_tern
True

```

References:
    larq, https://github.com/larq/larq (``larq/quantizers.py``, ``larq/math.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv._src import static_parameters

__all__ = [
    "Quantizer",
    "approx_sign",
    "get",
    "magnitude_aware_sign",
    "sign",
    "ste_heaviside",
    "ste_sign",
    "ste_tern",
    "swish_sign",
]

Quantizer = Callable[[jax.Array], jax.Array]
"""A quantizer: maps an array to an array of the same shape and dtype."""


# --------------------------------------------------------------------------- helpers


def _as_float_array(x: jax.typing.ArrayLike, fn_name: str) -> jax.Array:
    """Converts ``x`` to an array and checks that its dtype is real floating.

    Args:
        x: the value.
        fn_name: the quantizer's name, for the message.

    Returns:
        ``x`` as an array.

    Raises:
        TypeError: its dtype is not real floating.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{fn_name}`: `x` must have a real floating dtype (float16, bfloat16, "
            f"float32 or float64), got dtype {x.dtype}."
        )
    return x


def _check_clip_value(clip_value: float | None, fn_name: str) -> float | None:
    """Validates ``clip_value``: ``None`` or a number >= 0 (``inf`` allowed).

    Args:
        clip_value: the value.
        fn_name: the quantizer's name, for the messages.

    Returns:
        ``clip_value`` as a float, or ``None``.

    Raises:
        TypeError: not a number.
        ValueError: negative or NaN.
    """
    if clip_value is None:
        return None
    value = static_parameters.static_number("clip_value", clip_value, fn_name)
    if value < 0:
        raise ValueError(f"`{fn_name}`: `clip_value` must be None or >= 0, got {clip_value}.")
    return value


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype in which pseudo-gradient formulas are evaluated (at least float32)."""
    # Not jnp.promote_types: it refuses bfloat16 -> float32 under strict promotion.
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _pass_mask(x: jax.Array, clip_value: float | None) -> jax.Array | None:
    """``|x| <= clip_value`` (larq's inclusive pass-through), or None for no clipping."""
    if clip_value is None:
        return None
    return jnp.abs(x) <= clip_value


def _apply_mask(mask: jax.Array | None, g: jax.Array) -> jax.Array:
    """Zeroes the cotangent ``g`` where ``mask`` is False."""
    if mask is None:
        return g
    return jnp.where(mask, g, jnp.zeros_like(g))


# --------------------------------------------------------------------------- forward maps


def sign(x: jax.typing.ArrayLike) -> jax.Array:
    """Sign function that is never zero: ``-1`` for ``x < 0``, ``+1`` for ``x >= 0``.

    This is larq's ``larq.math.sign``. Unlike `jax.numpy.sign`, ``sign(0)``
    and ``sign(-0.0)`` are ``+1``; NaN stays NaN. It is forward-only: its gradient
    is zero almost everywhere, so use a quantizer such as `ste_sign` to train
    through it.

    Args:
        x: Input array of a real (integer or floating) dtype.

    Returns:
        An array of the same shape and dtype as ``x`` holding ``-1`` and ``+1``
        (and NaN where ``x`` is NaN).

    Raises:
        TypeError: If ``x`` is boolean or complex.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv.quantizers import sign
        >>> sign(jnp.array([-2.0, -0.0, 0.0, 3.0]))
        Array([-1.,  1.,  1.,  1.], dtype=float32)

    References:
        larq, ``larq/math.py``: ``sign``.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"`sign`: `x` must have a real numeric dtype, got dtype {x.dtype}.")
    one = jnp.ones_like(x)
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return one
    # NaN fails both comparisons and is passed through.
    return jnp.where(x < 0, -one, jnp.where(x >= 0, one, x))


def _heaviside(x: jax.Array) -> jax.Array:
    """``1`` for ``x > 0``, ``0`` for ``x <= 0``, NaN for NaN (larq ``math.heaviside``)."""
    one = jnp.ones_like(x)
    return jnp.where(x > 0, one, jnp.where(x <= 0, jnp.zeros_like(x), x))


@dataclass(frozen=True)
class _Ternarize:
    """Ternarization forward map; a hashable, static callable for ``custom_vjp``."""

    threshold_value: float
    ternary_weight_networks: bool

    def __call__(self, x: jax.Array) -> jax.Array:
        """Ternarizes ``x`` to -1, 0 or +1 around the threshold.

        Args:
            x: the values.

        Returns:
            ``sign(sign(x + t) + sign(x - t))``, ``t`` the fixed or the TWN threshold.
        """
        if self.ternary_weight_networks:
            # TWN threshold 0.7 * mean|x| over the whole array, accumulated in float32.
            acc = _compute_dtype(x.dtype)
            threshold = (0.7 * jnp.mean(jnp.abs(x).astype(acc))).astype(x.dtype)
        else:
            threshold = self.threshold_value
        # larq's expression: +1 for x >= t, -1 for x <= -t, 0 in between (t > 0);
        # with t == 0 it is jnp.sign(x), so 0 maps to 0.
        return jnp.sign(jnp.sign(x + threshold) + jnp.sign(x - threshold))


# --------------------------------------------------------------------------- custom VJPs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _straight_through(
    x: jax.Array, forward: Callable[[jax.Array], jax.Array], clip_value: float | None
) -> jax.Array:
    """``forward(x)`` with the clipped-identity pseudo-gradient ``1{|x| <= clip_value}``."""
    return forward(x)


def _straight_through_fwd(
    x: jax.Array, forward: Callable[[jax.Array], jax.Array], clip_value: float | None
) -> tuple[jax.Array, jax.Array | None]:
    """The forward of the straight-through estimator: the value and the pass-through mask.

    Args:
        x: the input.
        forward: the quantizer's forward map.
        clip_value: the estimator's clip value, ``None`` for no clipping.

    Returns:
        ``(forward(x), mask)``, ``mask`` ``None`` without a clip value.
    """
    # Only the boolean pass-through mask is kept for the backward pass.
    return forward(x), _pass_mask(x, clip_value)


def _straight_through_bwd(
    forward: Callable[[jax.Array], jax.Array],
    clip_value: float | None,
    mask: jax.Array | None,
    g: jax.Array,
) -> tuple[jax.Array]:
    """The backward of the straight-through estimator: the cotangent where ``|x| <= clip``.

    Args:
        forward: the quantizer's forward map (unused).
        clip_value: the clip value (unused: the mask holds it).
        mask: the forward's pass-through mask, ``None`` for all.
        g: the output's cotangent.

    Returns:
        The input's cotangent, in a 1-tuple.
    """
    del forward, clip_value
    return (_apply_mask(mask, g),)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


@jax.custom_vjp
def _approx_sign(x: jax.Array) -> jax.Array:
    """``sign(x)`` with the ApproxSign gradient (`_approx_sign_bwd`)."""
    return sign(x)


def _approx_sign_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The forward of `_approx_sign`: the sign, with ``x`` as residual."""
    return sign(x), x


def _approx_sign_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    """The ApproxSign gradient, ``g * max(0, 2 - 2 |x|)``.

    Args:
        x: the forward's input.
        g: the output's cotangent.

    Returns:
        The input's cotangent, in a 1-tuple.
    """
    acc = _compute_dtype(x.dtype)
    abs_x = jnp.abs(x).astype(acc)
    slope = jnp.where(abs_x <= 1.0, (1.0 - abs_x) * 2.0, jnp.zeros_like(abs_x))
    return ((slope * g.astype(acc)).astype(g.dtype),)


_approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _swish_sign(x: jax.Array, beta: float) -> jax.Array:
    """``sign(x)`` with the SwishSign gradient of slope ``beta`` (`_swish_sign_bwd`)."""
    return sign(x)


def _swish_sign_fwd(x: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
    """The forward of `_swish_sign`: the sign, with ``x`` as residual."""
    return sign(x), x


def _swish_sign_bwd(beta: float, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    """The SwishSign gradient: the derivative of ``2 s (1 + beta x (1 - s)) - 1``, ``s`` the
    sigmoid of ``beta x``.

    Args:
        beta: the slope.
        x: the forward's input.
        g: the output's cotangent.

    Returns:
        The input's cotangent, in a 1-tuple.
    """
    acc = _compute_dtype(x.dtype)
    bx = beta * x.astype(acc)
    # For large |beta * x|, cosh overflows to inf and the slope is (correctly) 0.
    slope = beta * (2.0 - bx * jnp.tanh(0.5 * bx)) / (1.0 + jnp.cosh(bx))
    return ((slope * g.astype(acc)).astype(g.dtype),)


_swish_sign.defvjp(_swish_sign_fwd, _swish_sign_bwd)


# --------------------------------------------------------------------------- quantizers


def ste_sign(x: jax.typing.ArrayLike, *, clip_value: float | None = 1.0) -> jax.Array:
    r"""Sign binarization with the straight-through estimator (STE).

    Forward:

    $$
    q(x) = \begin{cases} -1 & x < 0 \\ +1 & x \ge 0 \end{cases}
    $$

    Backward (a clipped identity):

    $$
    \frac{\partial q}{\partial x} =
    \begin{cases} 1 & |x| \le \texttt{clip\_value} \\ 0 & \text{otherwise} \end{cases}
    $$

    Args:
        x: Input array of a real floating dtype.
        clip_value: Gradients pass where ``|x| <= clip_value`` and are zero elsewhere.
            ``None`` passes the gradient everywhere (no clipping).

    Returns:
        An array of ``-1``/``+1`` with the shape and dtype of ``x``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxconv.quantizers import ste_sign
        >>> x = jnp.array([-1.5, -0.5, 0.0, 1.0])
        >>> ste_sign(x)
        Array([-1., -1.,  1.,  1.], dtype=float32)
        >>> jax.grad(lambda x: ste_sign(x).sum())(x)
        Array([0., 1., 1., 1.], dtype=float32)

    References:
        - larq, ``larq.quantizers.SteSign`` (``clip_value=1.0``).
        - Courbariaux, Hubara, Soudry, El-Yaniv and Bengio, "Binarized Neural Networks:
          Training Deep Neural Networks with Weights and Activations Constrained to +1
          or -1" (BinaryNet), 2016, https://arxiv.org/abs/1602.02830.
    """
    x = _as_float_array(x, "ste_sign")
    clip_value = _check_clip_value(clip_value, "ste_sign")
    return _straight_through(x, sign, clip_value)


def approx_sign(x: jax.typing.ArrayLike) -> jax.Array:
    r"""Sign binarization with the ApproxSign (piecewise-polynomial) gradient.

    Forward: $q(x) = -1$ for $x < 0$, $+1$ for $x \ge 0$.
    Backward:

    $$
    \frac{\partial q}{\partial x} =
    \begin{cases} 2 - 2|x| & |x| \le 1 \\ 0 & \text{otherwise} \end{cases}
    $$

    the derivative of the piecewise quadratic approximation of ``sign`` in Bi-Real Net.

    Args:
        x: Input array of a real floating dtype.

    Returns:
        An array of ``-1``/``+1`` with the shape and dtype of ``x``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxconv.quantizers import approx_sign
        >>> x = jnp.array([-2.0, -0.5, 0.0, 0.75])
        >>> approx_sign(x)
        Array([-1., -1.,  1.,  1.], dtype=float32)
        >>> jax.grad(lambda x: approx_sign(x).sum())(x)
        Array([0. , 1. , 2. , 0.5], dtype=float32)

    References:
        - larq, ``larq.quantizers.ApproxSign``.
        - Liu, Wu, Luo, Yang, Liu and Cheng, "Bi-Real Net: Enhancing the Performance of
          1-bit CNNs With Improved Representational Capability and Advanced Training
          Algorithm", ECCV 2018, https://arxiv.org/abs/1808.00278.
    """
    x = _as_float_array(x, "approx_sign")
    return _approx_sign(x)


def swish_sign(x: jax.typing.ArrayLike, *, beta: float = 5.0) -> jax.Array:
    r"""Sign binarization with the SignSwish gradient.

    Forward: $q(x) = -1$ for $x < 0$, $+1$ for $x \ge 0$.
    Backward, the derivative of $2\sigma(\beta x)(1 + \beta x (1 - \sigma(\beta x)))
    - 1$:

    $$
    \frac{\partial q}{\partial x} =
    \frac{\beta \left(2 - \beta x \tanh(\beta x / 2)\right)}{1 + \cosh(\beta x)}
    $$

    Args:
        x: Input array of a real floating dtype.
        beta: Sharpness (> 0); larger values approximate the derivative of ``sign``
            more closely. The slope at 0 is ``beta``.

    Returns:
        An array of ``-1``/``+1`` with the shape and dtype of ``x``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxconv.quantizers import swish_sign
        >>> x = jnp.array([-0.5, 0.0, 3.0])
        >>> swish_sign(x, beta=2.0)
        Array([-1.,  1.,  1.], dtype=float32)
        >>> jax.grad(lambda x: swish_sign(x, beta=2.0).sum())(x)[1]
        Array(2., dtype=float32)

    References:
        - larq, ``larq.quantizers.SwishSign`` (``beta=5.0``).
        - Darabi, Belbahri, Courbariaux and Partovi Nia, "BNN+: Improved Binary Network
          Training", 2018, https://arxiv.org/abs/1812.11800.
    """
    x = _as_float_array(x, "swish_sign")
    beta = static_parameters.static_number("beta", beta, "swish_sign")
    if not (0.0 < beta < math.inf):
        raise ValueError(f"`swish_sign`: `beta` must be finite and > 0, got {beta}.")
    return _swish_sign(x, beta)


def magnitude_aware_sign(x: jax.typing.ArrayLike, *, clip_value: float | None = 1.0) -> jax.Array:
    r"""Sign scaled by the mean magnitude per channel (Bi-Real Net), with STE gradient.

    Forward:

    $$
    q(x) = \operatorname{mean}_{\text{all axes but the last}}(|x|) \cdot
    \operatorname{sign}(x)
    $$

    The scale is computed over every axis except the last one (the output-channel axis
    of an ``HWIO`` / ``(in, out)`` kernel), as in larq; for a 1-D (or 0-D) ``x`` there is
    nothing to average and the scale is ``|x|`` itself. The scale is treated as a
    constant (``stop_gradient``), so the gradient is the scaled STE of `ste_sign`:
    ``scale * 1{|x| <= clip_value}``. Under `jax.vmap` the mean is taken per
    mapped element.

    Args:
        x: Input array of a real floating dtype; typically a kernel.
        clip_value: Gradients pass where ``|x| <= clip_value``; ``None`` for no clipping.

    Returns:
        An array with the shape and dtype of ``x`` holding ``-a``/``+a`` per channel.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv.quantizers import magnitude_aware_sign
        >>> w = jnp.array([[0.5, -2.0], [-1.5, 1.0]])
        >>> magnitude_aware_sign(w)
        Array([[ 1. , -1.5],
               [-1. ,  1.5]], dtype=float32)

    References:
        - larq, ``larq.quantizers.MagnitudeAwareSign`` (``clip_value=1.0``).
        - Liu, Wu, Luo, Yang, Liu and Cheng, "Bi-Real Net: Enhancing the Performance of
          1-bit CNNs With Improved Representational Capability and Advanced Training
          Algorithm", ECCV 2018, Section 3.3, https://arxiv.org/abs/1808.00278.
    """
    x = _as_float_array(x, "magnitude_aware_sign")
    clip_value = _check_clip_value(clip_value, "magnitude_aware_sign")
    axes = tuple(range(x.ndim - 1))
    scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(x), axis=axes, keepdims=True))
    return scale * _straight_through(x, sign, clip_value)


def ste_heaviside(x: jax.typing.ArrayLike, *, clip_value: float | None = 1.0) -> jax.Array:
    r"""Binarization to ``{0, 1}`` (Heaviside step) with the straight-through estimator.

    Forward:

    $$
    q(x) = \begin{cases} 1 & x > 0 \\ 0 & x \le 0 \end{cases}
    $$

    Backward: $1$ where $|x| \le \texttt{clip\_value}$, $0$ elsewhere.

    Args:
        x: Input array of a real floating dtype.
        clip_value: Gradients pass where ``|x| <= clip_value``; ``None`` for no clipping.

    Returns:
        An array of ``0``/``1`` with the shape and dtype of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv.quantizers import ste_heaviside
        >>> ste_heaviside(jnp.array([-1.0, 0.0, 0.25]))
        Array([0., 0., 1.], dtype=float32)

    References:
        - larq, ``larq.quantizers.SteHeaviside`` (``clip_value=1.0``).
    """
    x = _as_float_array(x, "ste_heaviside")
    clip_value = _check_clip_value(clip_value, "ste_heaviside")
    return _straight_through(x, _heaviside, clip_value)


def ste_tern(
    x: jax.typing.ArrayLike,
    *,
    threshold_value: float = 0.05,
    ternary_weight_networks: bool = False,
    clip_value: float | None = 1.0,
) -> jax.Array:
    r"""Ternarization to ``{-1, 0, +1}`` with the straight-through estimator.

    Forward, with threshold $\Delta$:

    $$
    q(x) = \operatorname{sign}\left(\operatorname{sign}(x + \Delta)
           + \operatorname{sign}(x - \Delta)\right)
         = \begin{cases} +1 & x \ge \Delta \\ 0 & |x| < \Delta \\
           -1 & x \le -\Delta \end{cases}
         \quad (\Delta > 0)
    $$

    (here ``sign(0) = 0``; with $\Delta = 0$ this is `jax.numpy.sign`).
    $\Delta$ is ``threshold_value``, or with ``ternary_weight_networks=True`` the
    TWN estimate $\Delta = 0.7 \cdot \frac{1}{n}\sum_i |x_i|$ over the whole
    array (per mapped element under `jax.vmap`), treated as a constant.
    Backward: $1$ where $|x| \le \texttt{clip\_value}$, $0$ elsewhere.

    Args:
        x: Input array of a real floating dtype.
        threshold_value: The threshold $\Delta$ (>= 0), used unless
            ``ternary_weight_networks`` is True.
        ternary_weight_networks: Compute $\Delta$ from ``x`` as in TWN.
        clip_value: Gradients pass where ``|x| <= clip_value``; ``None`` for no clipping.

    Returns:
        An array of ``-1``/``0``/``+1`` with the shape and dtype of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv.quantizers import ste_tern
        >>> ste_tern(jnp.array([-0.5, -0.01, 0.0, 0.3]), threshold_value=0.1)
        Array([-1.,  0.,  0.,  1.], dtype=float32)

    References:
        - larq, ``larq.quantizers.SteTern`` (``threshold_value=0.05``,
          ``ternary_weight_networks=False``, ``clip_value=1.0``).
        - Li, Zhang and Liu, "Ternary Weight Networks", 2016,
          https://arxiv.org/abs/1605.04711.
        - Zhu, Han, Mao and Dally, "Trained Ternary Quantization", ICLR 2017,
          https://arxiv.org/abs/1612.01064.
    """
    x = _as_float_array(x, "ste_tern")
    threshold_value = static_parameters.static_number(
        "threshold_value", threshold_value, "ste_tern")
    if not (0.0 <= threshold_value < math.inf):
        raise ValueError(
            f"`ste_tern`: `threshold_value` must be finite and >= 0, got {threshold_value}."
        )
    if not isinstance(ternary_weight_networks, (bool, np.bool_)):
        raise TypeError(
            "`ste_tern`: `ternary_weight_networks` must be a bool, got "
            f"{ternary_weight_networks!r}."
        )
    clip_value = _check_clip_value(clip_value, "ste_tern")
    forward = _Ternarize(threshold_value, bool(ternary_weight_networks))
    return _straight_through(x, forward, clip_value)


# --------------------------------------------------------------------------- lookup

_QUANTIZERS: dict[str, Quantizer] = {
    "ste_sign": ste_sign,
    "approx_sign": approx_sign,
    "swish_sign": swish_sign,
    "magnitude_aware_sign": magnitude_aware_sign,
    "ste_heaviside": ste_heaviside,
    "ste_tern": ste_tern,
}


def get(identifier: str | Quantizer | None) -> Quantizer | None:
    """Looks up a quantizer by name (with its default parameters).

    Args:
        identifier: One of ``"ste_sign"``, ``"approx_sign"``, ``"swish_sign"``,
            ``"magnitude_aware_sign"``, ``"ste_heaviside"``, ``"ste_tern"``; a callable,
            returned unchanged; or ``None``, returned unchanged (no quantizer).

    Returns:
        The quantizer function, the given callable, or ``None``.

    Raises:
        ValueError: If ``identifier`` is an unknown name.
        TypeError: If ``identifier`` is neither a string, a callable nor ``None``.

    Example:
        >>> import functools
        >>> from jaxconv import quantizers
        >>> quantizers.get("approx_sign") is quantizers.approx_sign
        True
        >>> q = quantizers.get(functools.partial(quantizers.ste_sign, clip_value=None))
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        try:
            return _QUANTIZERS[identifier]
        except KeyError:
            raise ValueError(
                f"`identifier`: unknown quantizer {identifier!r}; expected one of "
                f"{sorted(_QUANTIZERS)}, a callable or None."
            ) from None
    if callable(identifier):
        return identifier
    raise TypeError(
        "`identifier` must be a quantizer name, a callable or None, got "
        f"{identifier!r} of type {type(identifier).__name__}."
    )
