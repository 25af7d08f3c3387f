"""The algebra: an `Op` is an elementwise ``combine`` and an associative ``reduce``.

A generalized product replaces ``x * w`` by ``combine(x, w)`` and the sum over the
contraction by ``reduce``. This module holds the ``Op`` type and the reducers (``sum``,
``max``, ``min``, ``prod``, ``logsumexp`` or a user's binary callable), each with its identity
in every dtype, a reduction along an axis and the elementwise binary form used to accumulate
across kernel taps. What the engines infer about an op (its canonical reduce, its combine's
primitive, ...) is `capabilities`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BUILTIN_REDUCES = ("sum", "max", "min", "prod", "logsumexp")

# Reduces whose backward pass jaxconv writes by hand (recomputing the products instead of
# storing them). Other reduces (``prod``, user callables) are differentiated automatically,
# block by block under ``jax.checkpoint``.
HAND_VJP_REDUCES = ("sum", "max", "min", "logsumexp")


@dataclasses.dataclass(frozen=True, eq=True)
class Op:
    """A generalized product: ``reduce`` over the contraction of ``combine(x, w)``.

    Args:
      combine: elementwise ``combine(x, w) -> y``, written for scalars with ``jnp``
        functions; it is called on broadcast arrays of equal shape.
      reduce: ``"sum" | "max" | "min" | "prod" | "logsumexp"`` or an associative,
        commutative binary callable ``myadd(a, b)`` (then ``identity`` is required).
      identity: the reduce's two-sided identity ``e`` (``reduce(a, e) == reduce(e, a) == a``).
        Built-in reduces know theirs (0, -inf, +inf, 1, -inf) in every dtype; a number given
        here overrides it. A callable ``reduce`` is probed once per dtype, on concrete
        values, for both sides of the identity, commutativity and associativity, and
        refused with a ``ValueError`` naming ``reduce`` when a probe fails. A callable that
        computes a built-in reduce (``jnp.logaddexp`` or a stable hand-written logaddexp,
        ``jnp.maximum``, ``lambda a, b: a + b``, ...; recognised from its traced program,
        never its name) with that reduce's identity runs as the built-in.
      pad_value: ``None``: padded taps (and the holes of ``lhs_dilation``) contribute the
        identity, i.e. they are skipped. A number: padded input cells hold that value and go
        through ``combine`` (AdderNet pads with 0, larq's ``pad_values``).
      name: the name under which the op is known (``jaxconv.ops.get(name)``), also used in
        error messages and checkpoints.
      rewrite: optional fast path ``rewrite(product, lhs, rhs) -> out`` where ``product(a, b)``
        is the *standard* convolution or dot product with every geometry argument bound
        (zero padding, which is the identity of ``sum``). Used by ``xnor`` and ``l2``.
      post: optional elementwise map applied to the reduced result (kernel methods).
      doc: one paragraph describing the op (its formula, gradient, padding and source).
      native: the id of the compiled CPU kernel functor that computes this op
        (``"max_plus"``, ``"adder"``, ...), declared by built-in ops; ``None``: no native
        kernel (the XLA engine serves it).
      combine_kind: ``"add" | "mul" | "min" | "max"`` when ``combine`` is exactly that
        primitive of ``x`` and ``w``, ``"popcount_xor"`` when it is ``popcount(x ^ w)`` of
        packed ``uint32`` words (bit-packed XNOR); ``None``: inferred once from
        ``combine``'s jaxpr.
      separable: ``"mul"``, ``"adder"`` or ``"sqdiff"`` when a sum's kernel gradient is a
        native product (``"adder"``: ``sum g * (x - w)``, AdderNet's rule; ``"sqdiff"``:
        twice that, the exact gradient of ``-(x - w)**2``); ``None``: inferred (``"mul"``
        for a multiply-and-add).
      forward_mode: whether the op has a forward-mode (JVP) rule; ``None``: inferred once
        (a ``combine`` or ``reduce`` with only a custom VJP, such as a straight-through
        estimator, has none).
      semiring: whether ``combine`` distributes over ``reduce`` (a semiring product, so a
        contraction of several operands may be split into pairwise products, as
        ``jaxconv.einsum`` does); ``None``: not declared.
      binary: whether ``combine`` is ``sign(x) * sign(w)`` (sign(0) = +1), so that a layer
        with this op under ``sum`` can be packed to one bit per weight (`jaxconv.packed`);
        declared by ``xnor`` (and kept by ``xnor.replace(...)``).
      lax_product: whether this op is exactly lax's multiply-and-add (``x * w``, ``sum``,
        zero padding) and is computed by calling lax itself (``lax.conv_general_dilated``,
        ``lax.dot_general``, ``jnp.einsum``: lax's numbers and gradients,
        ``batch_group_count`` allowed, layers' masks multiply the kernel). Declared by
        ``standard``; ``replace`` keeps it while ``combine``, ``reduce``, ``identity``,
        ``pad_value``, ``rewrite`` and ``post`` stay the same (so
        ``standard.replace(name="mine")`` still calls lax) and drops it when one of them
        changes. An op that does not declare it, ``Op(jnp.multiply, "sum")`` included, runs
        on the engines (whose result must equal lax's); it is never inferred. Requires
        ``reduce="sum"`` and no ``identity``, ``pad_value``, ``rewrite`` or ``post``.

    Ops are immutable and hashable, so they can be static arguments of ``jax.jit``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> max_plus = jaxconv.Op(lambda x, w: x + w, reduce="max", name="my_max_plus")
      >>> x = jnp.arange(4.0).reshape(1, 4, 1)            # N W C
      >>> w = jnp.zeros((2, 1, 1))                         # W I O
      >>> jaxconv.conv_general_dilated(x, w, (1,), "VALID",
      ...     dimension_numbers=("NWC", "WIO", "NWC"), op=max_plus)[0, :, 0]
      Array([1., 2., 3.], dtype=float32)
    """

    combine: Callable[[Any, Any], Any]
    reduce: str | Callable[[Any, Any], Any] = "sum"
    identity: float | int | None = None
    pad_value: float | int | None = None
    name: str | None = None
    rewrite: Callable[..., Any] | None = dataclasses.field(default=None, compare=True)
    post: Callable[[Any], Any] | None = None
    doc: str = dataclasses.field(default="", compare=False)
    native: str | None = None
    combine_kind: str | None = None
    separable: str | None = None
    forward_mode: bool | None = None
    semiring: bool | None = None
    binary: bool = False
    lax_product: bool = False

    def __post_init__(self) -> None:
        """Checks the fields (``TypeError`` / ``ValueError`` naming the field)."""
        if not callable(self.combine):
            raise TypeError(
                f"Op: `combine` must be a callable combine(x, w), got {type(self.combine)!r}."
            )
        if isinstance(self.reduce, str):
            if self.reduce not in BUILTIN_REDUCES:
                raise ValueError(
                    f"Op: `reduce` must be one of {BUILTIN_REDUCES} or a binary callable, "
                    f"got {self.reduce!r}."
                )
        elif callable(self.reduce):
            if self.identity is None:
                raise ValueError(
                    "Op: a callable `reduce` needs `identity` (the value e with "
                    "reduce(a, e) == a), e.g. identity=-inf for a max."
                )
        else:
            raise TypeError(
                f"Op: `reduce` must be a string or a binary callable, got {type(self.reduce)!r}."
            )
        for field in ("identity", "pad_value"):
            v = getattr(self, field)
            if v is not None and not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"Op: `{field}` must be a Python number or None, got {v!r}.")
        if isinstance(self.identity, bool) or isinstance(self.pad_value, bool):
            raise TypeError("Op: `identity` and `pad_value` must be numbers, not bool.")
        if self.rewrite is not None and not callable(self.rewrite):
            raise TypeError("Op: `rewrite` must be callable or None.")
        if self.post is not None and not callable(self.post):
            raise TypeError("Op: `post` must be callable or None.")
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"Op: `name` must be a string or None, got {self.name!r}.")
        if not isinstance(self.lax_product, bool):
            raise TypeError(f"Op: `lax_product` must be a bool, got {self.lax_product!r}.")
        if self.lax_product and (
                self.reduce != "sum" or any(getattr(self, f) is not None for f in _LAX_FIXED)):
            raise ValueError(
                "Op: `lax_product=True` declares lax's multiply-and-add, which needs "
                "reduce='sum' and identity, pad_value, rewrite and post all None; got "
                f"reduce={self.reduce!r}, "
                + ", ".join(f"{f}={getattr(self, f)!r}" for f in _LAX_FIXED) + ".")

    def __repr__(self) -> str:
        """The name, the reduce and the pad value."""
        red = self.reduce if isinstance(self.reduce, str) else getattr(
            self.reduce, "__name__", "callable")
        return f"Op(name={self.name!r}, reduce={red!r}, pad_value={self.pad_value!r})"

    @property
    def display_name(self) -> str:
        """The name that messages and ``explain`` show: ``name``, or for an unnamed op one made
        from its functions, ``"<combine>/<reduce>"`` (e.g. ``"tanh_diff/max"``,
        ``"<lambda>/sum"``). Derived, so it takes no part in equality or hashing.

        Example:
          >>> import jax.numpy as jnp
          >>> import jaxconv
          >>> def tanh_diff(x, w):
          ...     return jnp.tanh(x - w)
          >>> jaxconv.Op(tanh_diff, "max").display_name
          'tanh_diff/max'
        """
        if self.name is not None:
            return self.name
        return f"{_callable_name(self.combine)}/{_callable_name(self.reduce)}"

    @property
    def reduce_name(self) -> str:
        """The built-in reduce's name, or ``"custom"`` for a callable."""
        return self.reduce if isinstance(self.reduce, str) else "custom"

    def replace(self, **changes: Any) -> Op:
        """Returns a copy with some fields changed (``dataclasses.replace``).

        Declared fields are kept, except ``lax_product``, which is dropped (unless given)
        when the change touches the math it vouches for: ``combine``, ``reduce``,
        ``identity``, ``pad_value``, ``rewrite`` or ``post``.

        Args:
          **changes: new values of ``Op`` fields, by name.

        Returns:
          The new op.

        Example:
          >>> import jaxconv
          >>> jaxconv.ops.standard.replace(name="mine").lax_product
          True
          >>> jaxconv.ops.standard.replace(pad_value=1.0).lax_product
          False
        """
        if self.lax_product and "lax_product" not in changes and any(
                f in changes and not _same(changes[f], getattr(self, f)) for f in _LAX_MATH):
            changes["lax_product"] = False
        return dataclasses.replace(self, **changes)


# The fields that `Op.lax_product` vouches for, and those it requires to be None.
_LAX_MATH = ("combine", "reduce", "identity", "pad_value", "rewrite", "post")
_LAX_FIXED = ("identity", "pad_value", "rewrite", "post")


def _same(a: Any, b: Any) -> bool:
    """Whether a field's new value is its old one (the same object, or an equal plain value)."""
    return a is b or (type(a) is type(b) and isinstance(a, (str, int, float)) and a == b)


def _callable_name(fn: Any) -> str:
    """A function's name for messages: ``__name__``, through ``functools.partial`` layers.

    Args:
        fn: a function (or a string, returned as it is).

    Returns:
        Its name.
    """
    if isinstance(fn, str):
        return fn
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None) or getattr(fn, "name", None)
    return name if isinstance(name, str) else type(fn).__name__


def identity_value(op: Op, dtype: Any) -> Array:
    """The identity of ``op.reduce`` as a scalar of ``dtype`` (the dtype's own infinities).

    Args:
        op: the op.
        dtype: the dtype.

    Returns:
        The identity as a scalar array.
    """
    dtype = jnp.dtype(dtype)
    if op.identity is not None:
        v = op.identity
    else:
        r = op.reduce
        if r == "sum":
            v = 0
        elif r == "prod":
            v = 1
        elif r in ("max", "logsumexp"):
            v = -math.inf
        else:  # min
            v = math.inf
    if math.isinf(v) and not jnp.issubdtype(dtype, jnp.inexact):
        info = jnp.iinfo(dtype) if jnp.issubdtype(dtype, jnp.integer) else None
        if info is None:
            raise TypeError(f"op {op.display_name!r}: no identity {v} in dtype {dtype}.")
        v = info.min if v < 0 else info.max
    return jnp.asarray(v, dtype)


def binary(op: Op) -> Callable[[Array, Array], Array]:
    """The elementwise binary form of the reduce, used to accumulate across taps.

    Args:
        op: the op.

    Returns:
        ``f(a, b)`` combining two partial results.
    """
    r = op.reduce
    if callable(r):
        return r
    return {
        "sum": jnp.add,
        "max": jnp.maximum,
        "min": jnp.minimum,
        "prod": jnp.multiply,
        "logsumexp": jnp.logaddexp,
    }[r]


def logaddexp(a: Array, b: Array) -> Array:
    """``jnp.logaddexp`` whose JVP is zero, not NaN, where both terms are ``-inf``.

    The double ``where``: the all ``-inf`` case is the constant ``-inf``, and the inner
    ``logaddexp`` never sees it (its tangent would be ``exp(-inf - -inf)``).

    Args:
        a: one term (log space).
        b: the other.

    Returns:
        ``log(exp(a) + exp(b))``.
    """
    empty = jnp.isneginf(a) & jnp.isneginf(b)
    out = jnp.logaddexp(jnp.where(empty, 0, a), jnp.where(empty, 0, b))
    return jnp.where(empty, -jnp.inf, out)


def reduce_last(op: Op, c: Array, acc_dtype: Any) -> Array:
    """Reduces ``c`` over its last axis with ``op.reduce``, accumulating in ``acc_dtype``.

    XLA's vectorised CPU max/min reductions drop NaN; the engines restore NaN separately.

    Args:
        op: the op.
        c: the products, the reduced axis last.
        acc_dtype: the accumulation dtype.

    Returns:
        ``c`` reduced over its last axis.
    """
    r = op.reduce
    if r == "sum":
        return jnp.sum(c, axis=-1, dtype=acc_dtype)
    if r in ("max", "min"):
        out = jnp.max(c, axis=-1) if r == "max" else jnp.min(c, axis=-1)
        return out.astype(acc_dtype)
    if r == "prod":
        return jnp.prod(c, axis=-1, dtype=acc_dtype)
    if r == "logsumexp":
        c = c.astype(acc_dtype)
        m = jnp.max(c, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0).astype(acc_dtype)
        s = jnp.sum(jnp.exp(c - m), axis=-1)
        # All terms -inf: s == 0. Double where, so that the result is the constant -inf with
        # a zero tangent (log's would be 0 / 0).
        empty = s == 0
        out = jnp.log(jnp.where(empty, 1, s)) + m[..., 0]
        return jnp.where(empty, -jnp.inf, out).astype(acc_dtype)
    return tree_reduce_last(r, c, identity_value(op, c.dtype))


def tree_reduce_last(fn: Callable[[Array, Array], Array], c: Array, identity: Array) -> Array:
    """Reduces the last axis of ``c`` with the binary ``fn`` as a balanced tree.

    Only elementwise calls of ``fn`` are made, so any jnp-traceable ``myadd`` works and is
    differentiable by ``jax.grad``.

    Args:
        fn: the binary reduce.
        c: the values, the reduced axis last.
        identity: the reduce's identity (pads an odd level).

    Returns:
        ``c`` reduced over its last axis.
    """
    while c.shape[-1] > 1:
        if c.shape[-1] % 2:
            pad = jnp.broadcast_to(identity, c.shape[:-1] + (1,)).astype(c.dtype)
            c = jnp.concatenate([c, pad], axis=-1)
        h = c.shape[-1] // 2
        c = fn(c[..., :h], c[..., h:])
    return c[..., 0]
