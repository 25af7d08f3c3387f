"""Optax helpers for networks with custom products.

AdderNet's adaptive learning rate
---------------------------------
`adder_scale` rescales each gradient leaf (a whole kernel) to the norm
``eta * sqrt(size)``. Apply it to the raw gradients of the adder kernels, before
the optimiser, by masking it:

```pycon
>>> import jax, jax.numpy as jnp, optax
>>> from jaxconv.optim import adder_scale
>>> params = {"adder": jnp.ones((3, 3, 4, 8)), "head": jnp.ones((8, 10))}
>>> mask = {"adder": True, "head": False}
>>> tx = optax.chain(
...     optax.masked(adder_scale(eta=0.2), mask),
...     optax.sgd(learning_rate=0.1, momentum=0.9),
... )
>>> state = tx.init(params)

```

Latent-weight clipping for binary kernels
-----------------------------------------
A binary kernel quantizer (`jaxconv.quantizers.ste_sign`, ...) keeps float
"latent" weights and binarizes them in the forward pass. Since the
straight-through gradient is zero where ``|w| > 1``, latent weights that drift out
of ``[-1, 1]`` stop learning ("starved weights"); larq prevents this with
``kernel_constraint="weight_clip"``. The optax equivalent is a projection after
each update, `optax.projections.projection_box`:

```python
updates, state = tx.update(grads, state, params)
params = optax.apply_updates(params, updates)
params = clip_latent_weights(params, mask)  # mask: True for binary kernels
```

`clip_latent_weights` applies `optax.projections.projection_box` to the
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

from jaxconv._src import static_parameters

__all__ = ["KernelMask", "adder_scale", "clip_latent_weights", "kernel_mask", "weight_clip"]


def _check_positive(value: object, name: str, fn_name: str) -> float:
    """A finite positive Python number.

    Args:
        value: the value.
        name: the argument's name, for the messages.
        fn_name: the function's name, for the messages.

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: not a real number.
        ValueError: not finite and positive.
    """
    value = static_parameters.static_number(name, value, fn_name)
    if not (0.0 < value < math.inf):
        raise ValueError(f"`{fn_name}`: `{name}` must be finite and > 0, got {value}.")
    return value


def adder_scale(eta: float = 0.2, eps: float = 1e-12) -> optax.GradientTransformation:
    r"""Rescales each gradient leaf to norm ``eta * sqrt(size)`` (AdderNet's adaptive rate).

    For every leaf $g$ of the updates (a whole kernel),

    $$
    g \leftarrow \eta \sqrt{k} \, \frac{g}{\max(\|g\|_2, \epsilon)}
    $$

    where $k$ is the number of elements of the leaf and $\|g\|_2$ its
    Frobenius norm. This is the adaptive learning rate of AdderNet (eq. 13), which
    compensates for the small magnitude of the gradients of adder layers; use it on the
    raw gradients of the adder kernels, before the optimiser, e.g.
    ``optax.chain(optax.masked(adder_scale(), mask), optax.sgd(...))``. A zero leaf
    stays zero (the norm is clamped to ``eps`` as in the reference implementation).
    The norm is accumulated in at least float32; each leaf keeps its dtype. The
    transform is stateless.

    Args:
        eta: The scale $\eta$ (> 0); AdderNet uses 0.2.
        eps: Lower bound (> 0) on the norm, so that a zero gradient stays zero.

    Returns:
        An `optax.GradientTransformation` with state `optax.EmptyState`.

    Raises:
        ValueError: If ``eta`` or ``eps`` is not finite and positive.
        TypeError: If ``eta`` or ``eps`` is not a number.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv.optim import adder_scale
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
    """Converts a mask leaf to a Python bool, refusing traced or non-boolean values.

    Args:
        value: the mask's leaf.

    Returns:
        The leaf as a bool.

    Raises:
        TypeError: a traced or non-boolean leaf.
    """
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
    selected leaf is projected with `optax.projections.projection_box`.

    Args:
        params: A pytree of parameters, an ``nnx.State`` (a new pure state is returned) or
            an ``nnx.Module`` (its ``nnx.Param`` variables are clipped in place and the
            module is returned).
        mask: A pytree of bools with the structure of ``params`` (or a prefix of it, a
            bool then covering a whole subtree), or a callable mapping ``params`` to such
            a tree, as for `optax.masked` (e.g. `kernel_mask`). True marks the leaves to
            clip. For an ``nnx.State`` or module, the mask sees the plain nested dict of
            its parameters (paths without a trailing ``.value``).
        lo: Lower bound.
        hi: Upper bound (``lo <= hi``).

    Returns:
        A new pytree like ``params`` in which the masked leaves are clipped; leaves keep
        their dtypes.

    Raises:
        ValueError: If ``lo > hi``, a bound is NaN, ``mask`` does not match ``params``
            or selects no leaf.
        TypeError: If a mask leaf is not a bool.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxconv.optim import clip_latent_weights
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
    from flax import nnx

    if isinstance(params, nnx.Module):
        state = nnx.state(params, nnx.Param)
        nnx.update(params, clip_latent_weights(state, mask, lo, hi))
        return params
    if isinstance(params, nnx.State):
        # Work on the plain nested dict (the paths a user sees, no trailing ``.value``).
        pure = params.to_pure_dict()
        new = clip_latent_weights(pure, mask, lo, hi)
        out = nnx.as_pure(params)
        out.replace_by_pure_dict(new)
        return out
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
    selected = [_static_bool(m) for m in jax.tree.leaves(mask)]
    if not any(s and jax.tree.leaves(sub) for s, sub in zip(selected, subtrees, strict=True)):
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0]][:6]
        raise ValueError(
            "`clip_latent_weights`: `mask` selects no leaf of `params`, so nothing would be "
            f"clipped; the leaves of `params` are at paths such as {paths}. Build the mask "
            "with jaxconv.optim.kernel_mask(model, quantized=True)."
        )
    clipped = [
        jax.tree.map(lambda leaf: optax.projections.projection_box(leaf, lo, hi), sub)
        if m
        else sub
        for m, sub in zip(selected, subtrees, strict=True)
    ]
    return jax.tree.unflatten(mask_def, clipped)


def _path_names(path: tuple) -> tuple[str, ...]:
    """A pytree key path as plain names, without a Variable's trailing ``value``.

    Args:
        path: a key path from ``jax.tree_util``.

    Returns:
        The names along it.
    """
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    if len(path) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names.pop()
    return tuple(names)


class KernelMask:
    """A mask selecting some layers' kernels, for `optax.masked` and `clip_latent_weights`.

    Built by `kernel_mask`. Calling it on a parameter tree (an ``nnx.State``, pure or not,
    or the same nested dict) gives a tree of bools of the same structure: True at the
    selected kernels. ``paths`` holds the selected kernels' paths in the model.
    """

    def __init__(self, paths: Any) -> None:
        """Keeps the selected kernels' paths.

        Args:
            paths: the paths, each a sequence of names.
        """
        self.paths = frozenset(tuple(str(k) for k in p) for p in paths)

    def __call__(self, params: Any) -> Any:
        """The mask of a parameter tree.

        Args:
            params: an ``nnx.State`` or a nested dict of the model's parameters.

        Returns:
            A tree of bools of the same structure, True at the selected kernels.
        """
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _path_names(path) in self.paths, params)

    def __repr__(self) -> str:
        """The selected paths, sorted and joined by ``/``."""
        return f"KernelMask({sorted('/'.join(p) for p in self.paths)})"


def kernel_mask(model: Any, *, op: Any = None, quantized: bool | None = None) -> KernelMask:
    """A mask of the kernels of ``model``'s jaxconv layers with a given op or quantizer.

    Use it with `optax.masked` inside ``nnx.Optimizer`` (e.g. `adder_scale` on the adder
    kernels only), with `weight_clip` and with `clip_latent_weights`.

    Args:
        model: an ``nnx.Module`` holding jaxconv layers (``jaxconv.nnx.Conv``, ``Linear``,
            ``ConvTranspose``, ...), at any depth.
        op: ``None`` (any op), an op or built-in op's name, or a sequence of them: only
            layers computing one of these products are selected.
        quantized: ``None`` (either), ``True`` (layers with a ``kernel_quantizer``: binary
            or ternary kernels with float latent weights) or ``False`` (layers without).

    Returns:
        A `KernelMask`.

    Raises:
        ValueError: If no layer of ``model`` matches (the message lists the layers found).
        TypeError: If ``model`` is not an ``nnx.Module``.

    Example:
        >>> import optax
        >>> from flax import nnx
        >>> import jaxconv
        >>> model = jaxconv.nnx.Conv(3, 8, (3, 3), op="adder", rngs=nnx.Rngs(0))
        >>> mask = jaxconv.optim.kernel_mask(model, op="adder")
        >>> tx = optax.chain(optax.masked(jaxconv.optim.adder_scale(), mask), optax.sgd(0.1))
        >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> mask(nnx.state(model, nnx.Param).to_pure_dict())
        {'bias': False, 'kernel': True}
    """
    from flax import nnx

    from jaxconv._src.core.algebra import Op
    from jaxconv._src.core.ops import resolve

    if not isinstance(model, nnx.Module):
        raise TypeError(f"`kernel_mask`: `model` must be an nnx.Module, got {type(model)!r}.")
    if op is None:
        ops = None
    elif isinstance(op, (str, Op)):
        ops = (resolve(op),)
    else:
        ops = tuple(resolve(o) for o in op)
    if quantized not in (None, True, False):
        raise TypeError(
            f"`kernel_mask`: `quantized` must be None, True or False, got {quantized!r}.")
    found, paths = [], []
    for path, node in nnx.graph.iter_graph(model):
        layer_op = getattr(node, "op", None) if isinstance(node, nnx.Module) else None
        if not isinstance(layer_op, Op) or not isinstance(getattr(node, "kernel", None),
                                                            nnx.Variable):
            continue
        has_q = getattr(node, "kernel_quantizer", None) is not None
        found.append(f"{'/'.join(map(str, path)) or '<model>'} (op={layer_op.display_name!r}, "
                     f"kernel_quantizer={'yes' if has_q else 'none'})")
        if ops is not None and layer_op not in ops:
            continue
        if quantized is not None and has_q != quantized:
            continue
        paths.append((*path, "kernel"))
    if not paths:
        raise ValueError(
            f"`kernel_mask`: no layer of the model has op={op!r} and quantized={quantized!r}; "
            f"its jaxconv layers are: {found or 'none'}."
        )
    return KernelMask(paths)


def weight_clip(mask: Any, clip_value: float = 1.0) -> optax.GradientTransformation:
    """larq's ``kernel_constraint="weight_clip"`` as the last link of an optax chain.

    Turns the updates of the masked leaves into those that land the parameters in
    ``[-clip_value, clip_value]`` (``clip(p + u) - p``), so that ``nnx.Optimizer`` (or
    ``optax.apply_updates``) leaves the latent weights of binary kernels clipped after each
    step: ``optax.chain(optax.adam(1e-3), weight_clip(kernel_mask(model, quantized=True)))``.

    Args:
        mask: a tree of bools or a callable (e.g. `kernel_mask`), as for `optax.masked`.
        clip_value: the bound (> 0); larq's default is 1.

    Returns:
        An `optax.GradientTransformation` whose ``update`` needs ``params``.

    Raises:
        ValueError: at ``init``, if ``mask`` selects no leaf of the parameters.

    Example:
        >>> import jax.numpy as jnp, optax, jaxconv
        >>> params = {"kernel": jnp.array([0.5, -0.75])}
        >>> tx = optax.chain(optax.sgd(1.0), jaxconv.optim.weight_clip({"kernel": True}))
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"kernel": jnp.array([-1.0, 1.0])}, state, params)
        >>> optax.apply_updates(params, updates)["kernel"]
        Array([ 1., -1.], dtype=float32)
    """
    c = _check_positive(clip_value, "clip_value", "weight_clip")

    def init_fn(params: Any) -> optax.EmptyState:
        m = mask(params) if callable(mask) else mask
        if not any(_static_bool(v) for v in jax.tree.leaves(m)):
            raise ValueError("`weight_clip`: `mask` selects no leaf of the parameters, so "
                             "nothing would be clipped.")
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("`weight_clip` needs `params` in update (nnx.Optimizer passes "
                             "them).")
        new = jax.tree.map(lambda u, p: (jnp.clip(p + u, -c, c) - p).astype(u.dtype),
                           updates, params)
        return new, state

    inner = optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)
    masked = optax.masked(inner, mask)
    return optax.GradientTransformation(
        lambda p: (init_fn(p), masked.init(p))[1], masked.update)
