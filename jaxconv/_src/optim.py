"""Optax helpers for networks with custom products.

AdderNet's adaptive learning rate
---------------------------------
:func:`adder_scale` rescales each gradient leaf (a whole kernel) to the norm
``eta * sqrt(size)``. Apply it to the raw gradients of the adder kernels, before
the optimiser, by masking it::

    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxconv._src.optim import adder_scale
    >>> params = {"adder": jnp.ones((3, 3, 4, 8)), "head": jnp.ones((8, 10))}
    >>> mask = {"adder": True, "head": False}
    >>> tx = optax.chain(
    ...     optax.masked(adder_scale(eta=0.2), mask),
    ...     optax.sgd(learning_rate=0.1, momentum=0.9),
    ... )
    >>> state = tx.init(params)

Latent-weight clipping for binary kernels
-----------------------------------------
A binary kernel quantizer (:func:`jaxconv.quantizers.ste_sign`, ...) keeps float
"latent" weights and binarizes them in the forward pass. Since the
straight-through gradient is zero where ``|w| > 1``, latent weights that drift out
of ``[-1, 1]`` stop learning ("starved weights"); larq prevents this with
``kernel_constraint="weight_clip"``. The optax equivalent is a projection after
each update, :func:`optax.projections.projection_box`::

    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    params = clip_latent_weights(params, mask)  # mask: True for binary kernels

:func:`clip_latent_weights` applies :func:`optax.projections.projection_box` to the
masked leaves only. (Calling ``projection_box`` on a whole parameter dict with
scalar bounds does not work in optax 0.2.8: it maps ``jnp.clip`` over the bound
as a tree, so either pass bounds trees or project leaf by leaf, as this helper
does.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["adder_scale", "clip_latent_weights"]


def _check_positive(value: object, name: str, fn_name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"`{fn_name}`: `{name}` must be a Python number, got {value!r} of type "
            f"{type(value).__name__}."
        )
    value = float(value)
    if not (0.0 < value < math.inf):
        raise ValueError(f"`{fn_name}`: `{name}` must be finite and > 0, got {value}.")
    return value


def adder_scale(eta: float = 0.2, eps: float = 1e-12) -> optax.GradientTransformation:
    r"""Rescales each gradient leaf to norm ``eta * sqrt(size)`` (AdderNet's adaptive rate).

    For every leaf :math:`g` of the updates (a whole kernel),

    .. math::

        g \leftarrow \eta \sqrt{k} \, \frac{g}{\max(\|g\|_2, \epsilon)}

    where :math:`k` is the number of elements of the leaf and :math:`\|g\|_2` its
    Frobenius norm. This is the adaptive learning rate of AdderNet (eq. 13), which
    compensates for the small magnitude of the gradients of adder layers; use it on the
    raw gradients of the adder kernels, before the optimiser, e.g.
    ``optax.chain(optax.masked(adder_scale(), mask), optax.sgd(...))``. A zero leaf
    stays zero (the norm is clamped to ``eps`` as in the reference implementation).
    The norm is accumulated in at least float32; each leaf keeps its dtype. The
    transform is stateless.

    Args:
        eta: The scale :math:`\eta` (> 0); AdderNet uses 0.2.
        eps: Lower bound (> 0) on the norm, so that a zero gradient stays zero.

    Returns:
        An :class:`optax.GradientTransformation` with state :class:`optax.EmptyState`.

    Raises:
        ValueError: If ``eta`` or ``eps`` is not finite and positive.
        TypeError: If ``eta`` or ``eps`` is not a number.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv._src.optim import adder_scale
        >>> tx = adder_scale(eta=0.2)
        >>> g = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}
        >>> updates, _ = tx.update(g, tx.init(g))
        >>> updates["w"]  # norm 5 -> 0.2 * sqrt(4) = 0.4
        Array([0.24, 0.32, 0.  , 0.  ], dtype=float32)

    References:
        Chen, Wang, Xu, Shi, Xu, Xu and Tian, "AdderNet: Do We Really Need
        Multiplications in Deep Learning?", CVPR 2020, eq. 13,
        https://arxiv.org/abs/1912.13200.
    """
    eta = _check_positive(eta, "eta", "adder_scale")
    eps = _check_positive(eps, "eps", "adder_scale")

    def scale_leaf(g: jax.Array) -> jax.Array:
        g = jnp.asarray(g)
        floating = jnp.issubdtype(g.dtype, jnp.floating) and jnp.finfo(g.dtype).bits >= 32
        acc = g.dtype if floating else jnp.dtype(jnp.float32)
        g_acc = g.astype(acc)
        # Frobenius norm, pre-scaled by max|g| so that it neither overflows nor underflows.
        peak = jnp.max(jnp.abs(g_acc), initial=0.0)
        peak = jnp.where(peak > 0, peak, jnp.ones_like(peak))
        norm = peak * jnp.sqrt(jnp.sum(jnp.square(g_acc / peak)))
        factor = (eta * math.sqrt(g.size)) / jnp.maximum(norm, eps)
        return (g_acc * factor).astype(g.dtype)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: Any, state: optax.EmptyState, params: Any = None
    ) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree.map(scale_leaf, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _static_bool(value: object) -> bool:
    """Converts a mask leaf to a Python bool, refusing traced or non-boolean values."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if (
        isinstance(value, (np.ndarray, jax.Array))
        and not isinstance(value, jax.core.Tracer)
        and value.shape == ()
        and value.dtype == np.bool_
    ):
        return bool(value)
    raise TypeError(
        "`mask` leaves must be Python bools (or concrete boolean scalars), got "
        f"{value!r} of type {type(value).__name__}."
    )


def clip_latent_weights(
    params: Any,
    mask: Any | Callable[[Any], Any],
    lo: float = -1.0,
    hi: float = 1.0,
) -> Any:
    """Clips the masked parameter leaves to ``[lo, hi]``; leaves the others untouched.

    The optax counterpart of larq's ``WeightClip`` kernel constraint for the latent
    (float) weights of binary kernels: call it after each ``optax.apply_updates``. Each
    selected leaf is projected with :func:`optax.projections.projection_box`.

    Args:
        params: A pytree of parameters.
        mask: A pytree of bools with the structure of ``params`` (or a prefix of it, a
            bool then covering a whole subtree), or a callable mapping ``params`` to such
            a tree, as for :func:`optax.masked`. True marks the leaves to clip.
        lo: Lower bound.
        hi: Upper bound (``lo <= hi``).

    Returns:
        A new pytree like ``params`` in which the masked leaves are clipped; leaves keep
        their dtypes.

    Raises:
        ValueError: If ``lo > hi``, a bound is NaN, or ``mask`` does not match
            ``params``.
        TypeError: If a mask leaf is not a bool.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv._src.optim import clip_latent_weights
        >>> params = {"binary": jnp.array([-3.0, 0.5, 2.0]), "bias": jnp.array([2.0])}
        >>> new = clip_latent_weights(params, {"binary": True, "bias": False})
        >>> new["binary"], new["bias"]
        (Array([-1. ,  0.5,  1. ], dtype=float32), Array([2.], dtype=float32))
    """
    for name, value in (("lo", lo), ("hi", hi)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"`clip_latent_weights`: `{name}` must be a Python number, got {value!r}."
            )
        if math.isnan(value):
            raise ValueError(f"`clip_latent_weights`: `{name}` must not be NaN.")
    lo, hi = float(lo), float(hi)
    if lo > hi:
        raise ValueError(f"`clip_latent_weights`: `lo` (={lo}) must not exceed `hi` (={hi}).")
    if callable(mask):
        mask = mask(params)

    mask_def = jax.tree.structure(mask)
    try:
        subtrees = mask_def.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`clip_latent_weights`: `mask` must have the structure of `params` or a "
            f"prefix of it: {err}"
        ) from None
    clipped = [
        jax.tree.map(lambda leaf: optax.projections.projection_box(leaf, lo, hi), sub)
        if _static_bool(m)
        else sub
        for m, sub in zip(jax.tree.leaves(mask), subtrees, strict=True)
    ]
    return jax.tree.unflatten(mask_def, clipped)
