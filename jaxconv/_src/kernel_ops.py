"""Kernel convolutions: a window reduction followed by an elementwise ``post`` map.

Kervolution (Wang et al., "Kervolutional Neural Networks", CVPR 2019) replaces the inner
product of a window ``x`` with a kernel ``w`` by a kernel function ``k(x, w)``:

- polynomial: ``k(x, w) = (x . w + c) ** p`` -- the standard product, then ``(s + c) ** p``;
- gaussian: ``k(x, w) = exp(-gamma * ||x - w||**2)`` -- the ``l2`` sum ``s = -||x - w||**2``,
  then ``exp(gamma * s)``.

Both are `jaxconv.Op` values with a ``post`` map, made by factories whose equal
parameters give equal (and equally hashed) ops. Sharpened cosine similarity (Pisoni and
Rohrer, 2022) needs the norm of each input window as well, so it is a function,
`sharpened_cosine_conv`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.conv import conv_general_dilated
from jaxconv._src.core import validation
from jaxconv._src.core.algebra import Op

Array = jax.Array


def _multiply(x: Any, w: Any) -> Any:
    """``x * w``, the combine of a polynomial kervolution."""
    return x * w


def _product_rewrite(product: Any, lhs: Array, rhs: Array) -> Array:
    """The standard product itself (the rewrite of a polynomial kervolution)."""
    return product(lhs, rhs)


def _l2_combine(x: Any, w: Any) -> Any:
    """``-(x - w)**2``, the combine of a Gaussian kervolution."""
    d = x - w
    return -(d * d)


def _l2_rewrite(product: Any, lhs: Array, rhs: Array) -> Array:
    """``-||x - w||^2`` through three standard products.

    Args:
        product: the standard product of the geometry.
        lhs: the input.
        rhs: the kernel.

    Returns:
        ``2 x.w - ||x||^2 - ||w||^2`` over the in-bounds taps.
    """
    # -||x - w||^2 = 2 x.w - ||x||^2 - ||w||^2 over the in-bounds taps (zero padding).
    return (2 * product(lhs, rhs) - product(lhs * lhs, jnp.ones_like(rhs))
            - product(jnp.ones_like(lhs), rhs * rhs))


@dataclasses.dataclass(frozen=True)
class PolynomialPost:
    """``s -> (s + c) ** p`` (hashable: equal parameters compare equal)."""

    c: float
    p: int | float

    def __call__(self, s: Array) -> Array:
        """``(s + c) ** p``.

        Args:
            s: the standard product's sum.

        Returns:
            The output.
        """
        return (s + self.c) ** self.p


@dataclasses.dataclass(frozen=True)
class GaussianPost:
    """``s -> exp(gamma * s)`` for ``s = -||x - w||**2`` (hashable)."""

    gamma: float

    def __call__(self, s: Array) -> Array:
        """``exp(gamma * s)``.

        Args:
            s: the ``l2`` sum, ``-||x - w||^2``.

        Returns:
            The output.
        """
        return jnp.exp(self.gamma * s)


def _number(name: str, v: Any) -> float:
    """``v`` if it is a real number (not a bool); the ``TypeError`` names ``name``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a real number, got {v!r}.")
    return v


@functools.cache
def _polynomial(c: float, p: int | float) -> Op:
    """The polynomial kervolution op, one per ``(c, p)``.

    Args:
        c: the offset.
        p: the power.

    Returns:
        The op.
    """
    return Op(
        _multiply, "sum", name=f"polynomial(c={c!r}, p={p!r})", rewrite=_product_rewrite,
        post=PolynomialPost(c, p),
        doc=f"""Polynomial kervolution ``(x . w + {c!r}) ** {p!r}``: the standard product
        over the window (zero padding: padded taps add nothing), then ``(s + c) ** p``.
        Gradient: exact (chain rule through the post map). Source: Wang et al., CVPR 2019.""",
    )


@functools.cache
def _gaussian(gamma: float) -> Op:
    """The Gaussian kervolution op, one per ``gamma``.

    Args:
        gamma: the width (the output is ``exp(-gamma ||x - w||^2)``).

    Returns:
        The op.
    """
    return Op(
        _l2_combine, "sum", name=f"gaussian(gamma={gamma!r})", rewrite=_l2_rewrite,
        post=GaussianPost(gamma),
        doc=f"""Gaussian (RBF) kervolution ``exp(-{gamma!r} * ||x - w||**2)``: the ``l2``
        sum over the window's in-bounds taps (padded taps are skipped), then ``exp(gamma s)``.
        Gradient: exact. The sum is computed as ``2 x.w - |x|^2 - |w|^2`` with native
        products (cancellation where ``x ~ w``, as ``ops.l2``). Source: Wang et al.,
        CVPR 2019.""",
    )


def polynomial(c: float = 1.0, p: int | float = 2) -> Op:
    """The polynomial kernel op ``(x . w + c) ** p`` (Kervolution).

    Args:
      c: the offset (``c >= 0`` keeps the lower-order terms).
      p: the degree.

    Returns:
      A hashable `jaxconv.Op`; equal parameters give the same op.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> op = jaxconv.ops.polynomial(c=1.0, p=2)
      >>> op == jaxconv.ops.polynomial(1.0, 2)
      True
      >>> x = jnp.array([[1., 2.]]); w = jnp.array([[1.], [1.]])
      >>> jaxconv.dot_general(x, w, (((1,), (0,)), ((), ())), op=op)  # (1 + 2 + 1)**2
      Array([[16.]], dtype=float32)
    """
    c = float(_number("c", c))
    p = _number("p", p)
    p = int(p) if float(p).is_integer() else float(p)
    return _polynomial(c, p)


def gaussian(gamma: float = 1.0) -> Op:
    """The gaussian (RBF) kernel op ``exp(-gamma * ||x - w||**2)`` (Kervolution).

    Args:
      gamma: the inverse squared width, ``> 0``.

    Returns:
      A hashable `jaxconv.Op`; equal parameters give the same op.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> x = jnp.array([[1., 2.]]); w = jnp.array([[1.], [3.]])
      >>> jaxconv.dot_general(x, w, (((1,), (0,)), ((), ())), op=jaxconv.ops.gaussian(0.5))
      Array([[0.60653067]], dtype=float32)
    """
    gamma = float(_number("gamma", gamma))
    if gamma <= 0:
        raise ValueError(f"`gamma` must be > 0, got {gamma!r}.")
    return _gaussian(gamma)


def sharpened_cosine_conv(
    lhs: Any,
    rhs: Any,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    *,
    p: Any = 2.0,
    q: Any = 1e-3,
    eps: float = 1e-12,
) -> Array:
    """Sharpened cosine similarity convolution (Pisoni; Rohrer, 2022).

    ``out = sign(s) * |s / ((||x|| + q) (||w|| + q))| ** p`` with ``s = x . w`` the standard
    product of a window with a kernel, ``||x||`` the window's norm (over the in-bounds taps and
    the group's channels) and ``||w||`` the kernel's norm. ``p`` and ``q`` may be arrays
    broadcasting against the output channels (learnable, as in the paper).

    Args:
      lhs: input, as in `jaxconv.conv_general_dilated`.
      rhs: kernel.
      window_strides: strides.
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or ``(low, high)`` pairs (padded taps
        add nothing to ``s`` or to ``||x||``).
      lhs_dilation: input dilation.
      rhs_dilation: kernel dilation.
      dimension_numbers: as in lax.
      feature_group_count: feature groups.
      precision: passed to lax.
      p: the sharpening exponent.
      q: the norm offset (keeps near-zero windows from amplifying noise).
      eps: added under the square roots of the norms, so that gradients stay finite.

    Returns:
      The similarity map, laid out as ``dimension_numbers[2]``.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> x = jnp.array([[[3.], [4.]]]); w = jnp.array([[[4.]], [[3.]]])   # NWC, WIO
      >>> y = jaxconv.sharpened_cosine_conv(x, w, (1,), "VALID",
      ...     dimension_numbers=("NWC", "WIO", "NWC"), p=1.0, q=0.0)
      >>> y.round(4)
      Array([[[0.96]]], dtype=float32)
    """
    lhs = validation.as_array("lhs", lhs)
    rhs = validation.as_array("rhs", rhs)
    common = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count, precision=precision)
    s = conv_general_dilated(lhs, rhs, **common)
    xn = jnp.sqrt(conv_general_dilated(lhs * lhs, jnp.ones_like(rhs), **common) + eps)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    o_axis = dn.rhs_spec[0]
    wn = jnp.sqrt(jnp.sum(rhs * rhs, axis=tuple(a for a in range(rhs.ndim) if a != o_axis))
                  + eps)
    shape = [1] * s.ndim
    shape[dn.out_spec[1]] = wn.shape[0]
    wn = wn.reshape(shape)
    c_axis = dn.out_spec[1]

    def per_channel(v: Any) -> Any:
        v = jnp.asarray(v, s.dtype)
        if v.ndim == 1:
            sh = [1] * s.ndim
            sh[c_axis] = v.shape[0]
            return v.reshape(sh)
        return v

    p_, q_ = per_channel(p), per_channel(q)
    return jnp.sign(s) * jnp.abs(s / ((xn + q_) * (wn + q_))) ** p_
