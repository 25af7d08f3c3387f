"""Argument checks shared by the public functions.

Every check runs on shapes and Python values before any tracing work starts and raises a
``ValueError`` / ``TypeError`` that names the argument, what was given and what is allowed.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PADDING_STRINGS = ("VALID", "SAME", "SAME_LOWER")
ENGINES = ("auto", "xla", "pallas")


def as_array(name: str, x: Any) -> jax.Array:
    """Accepts jax/numpy arrays and Python scalars; rejects everything else and complex."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__"):
        arr = x
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        arr = jnp.asarray(x)
    elif isinstance(x, (list, tuple)):
        raise TypeError(
            f"`{name}` must be an array (jax.Array or numpy.ndarray), got a {type(x).__name__}; "
            "wrap it with jnp.asarray first."
        )
    else:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.")
    dtype = jnp.dtype(arr.dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` has complex dtype {dtype}; jaxconv supports real dtypes only.")
    if not (jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_):
        raise TypeError(f"`{name}` has dtype {dtype}; a numeric dtype is required.")
    return arr


def check_mixed_dtypes(lhs: Any, rhs: Any, generic: bool) -> None:
    """Generic ops need both operands floating or both integer (no silent int/float mix)."""
    if not generic:
        return
    lf = jnp.issubdtype(lhs.dtype, jnp.inexact)
    rf = jnp.issubdtype(rhs.dtype, jnp.inexact)
    if lf != rf:
        raise TypeError(
            f"`lhs` ({lhs.dtype}) and `rhs` ({rhs.dtype}) mix integer and floating dtypes; "
            "cast one of them so both are floating (or both integer)."
        )


def int_tuple(name: str, value: Any, n: int, minimum: int | None = 1,
              default: int | None = 1) -> tuple[int, ...]:
    """A length-``n`` tuple of ints ``>= minimum``; ``None`` gives ``default`` everywhere."""
    if value is None:
        if default is None:
            raise TypeError(f"`{name}` is required.")
        return (default,) * n
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be a sequence of {n} ints (one per spatial dimension), got {value!r}."
        )
    try:
        vals = tuple(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a sequence of ints, got {value!r}.") from None
    if len(vals) != n:
        raise ValueError(
            f"`{name}` must have one entry per spatial dimension ({n}), got {value!r} "
            f"(length {len(vals)})."
        )
    out = []
    for v in vals:
        try:
            iv = operator.index(v)
        except TypeError:
            raise TypeError(f"`{name}` entries must be ints, got {value!r}.") from None
        if minimum is not None and iv < minimum:
            raise ValueError(f"`{name}` entries must be >= {minimum}, got {value!r}.")
        out.append(iv)
    return tuple(out)


def positive_int(name: str, value: Any) -> int:
    try:
        iv = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.") from None
    if iv < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return iv


def conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) -> lax.ConvDimensionNumbers:
    """Parses ``dimension_numbers`` as lax does, re-raising with the argument's name."""
    if dimension_numbers is not None and not isinstance(
        dimension_numbers, (lax.ConvDimensionNumbers, tuple, list)
    ):
        raise TypeError(
            "`dimension_numbers` must be None, a ConvDimensionNumbers or a tuple of three "
            f"strings such as ('NHWC', 'HWIO', 'NHWC'), got {dimension_numbers!r}."
        )
    if isinstance(dimension_numbers, (tuple, list)) and not isinstance(
        dimension_numbers, lax.ConvDimensionNumbers
    ):
        if len(dimension_numbers) != 3:
            raise TypeError(
                "`dimension_numbers` must have three entries (lhs, rhs, out), got "
                f"{dimension_numbers!r}."
            )
        if all(isinstance(s, str) for s in dimension_numbers):
            nd = len(lhs_shape)
            for role, s in zip(("lhs", "rhs", "out"), dimension_numbers):
                if len(s) != nd:
                    raise ValueError(
                        f"`dimension_numbers` {role} spec {s!r} has {len(s)} letters but the "
                        f"operands have rank {nd}."
                    )
    try:
        dn = lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise TypeError(f"invalid `dimension_numbers` {dimension_numbers!r}: {e}") from None
    nd = len(lhs_shape)
    for role, spec in zip(("lhs", "rhs", "out"), dn):
        if sorted(spec) != list(range(nd)):
            raise TypeError(
                f"invalid `dimension_numbers` {dimension_numbers!r}: the {role} spec {spec} is "
                f"not a permutation of range({nd})."
            )
    return dn


def padding_pairs(padding: Any, nsd: int, lhs_dilation: tuple[int, ...]) -> str | tuple:
    """Canonical padding: an upper-case string or a tuple of ``nsd`` (lo, hi) int pairs."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in PADDING_STRINGS:
            raise ValueError(
                f"`padding` must be one of {PADDING_STRINGS} or a sequence of (low, high) "
                f"pairs, got {padding!r}."
            )
        if any(d != 1 for d in lhs_dilation):
            raise ValueError(
                f"`padding`={padding!r} (a string) cannot be combined with `lhs_dilation`="
                f"{lhs_dilation}: give explicit (low, high) pairs (or use conv_transpose)."
            )
        return p
    try:
        pairs = tuple(tuple(p) for p in padding)
    except TypeError:
        raise ValueError(
            "`padding` must be a string or a sequence of (low, high) pairs, got "
            f"{padding!r}."
        ) from None
    if len(pairs) != nsd or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"`padding` must have {nsd} (low, high) pairs (one per spatial dimension), got "
            f"{padding!r}."
        )
    try:
        return tuple((operator.index(lo), operator.index(hi)) for lo, hi in pairs)
    except TypeError:
        raise TypeError(f"`padding` pairs must hold ints, got {padding!r}.") from None


def engine_name(engine: Any) -> str:
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}, got {engine!r}.")
    return engine


def max_block_bytes(value: Any) -> int | None:
    if value is None:
        return None
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"`max_block_bytes` must be an int or None, got {value!r}.") from None
    if v < 1:
        raise ValueError(f"`max_block_bytes` must be positive, got {value!r}.")
    return v


def dot_dimension_numbers(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
                          dimension_numbers: Any):
    """Validates lax ``dot_general`` dimension numbers; returns them as int tuples."""
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc, lb, rb = (tuple(operator.index(i) for i in t) for t in (lc, rc, lb, rb))
    except (TypeError, ValueError):
        raise TypeError(
            "`dimension_numbers` must be ((lhs_contracting, rhs_contracting), (lhs_batch, "
            f"rhs_batch)) tuples of ints, got {dimension_numbers!r}."
        ) from None
    for name, dims, shape in (("lhs_contracting", lc, lhs_shape), ("rhs_contracting", rc, rhs_shape),
                              ("lhs_batch", lb, lhs_shape), ("rhs_batch", rb, rhs_shape)):
        for d in dims:
            if not 0 <= d < len(shape):
                raise ValueError(
                    f"`dimension_numbers` {name} dimension {d} is out of range for an operand "
                    f"of rank {len(shape)}."
                )
    for side, c, b in (("lhs", lc, lb), ("rhs", rc, rb)):
        if len(set(c + b)) != len(c + b):
            raise ValueError(
                f"`dimension_numbers`: the {side} contracting {c} and batch {b} dimensions must "
                "be distinct."
            )
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(
            "`dimension_numbers`: lhs and rhs need as many contracting and batch dimensions, "
            f"got {dimension_numbers!r}."
        )
    for a, b, kind in ((lc, rc, "contracting"), (lb, rb, "batch")):
        for i, j in zip(a, b):
            if lhs_shape[i] != rhs_shape[j]:
                raise ValueError(
                    f"`dimension_numbers`: {kind} dimensions differ in size: lhs dim {i} has "
                    f"{lhs_shape[i]}, rhs dim {j} has {rhs_shape[j]}."
                )
    return (lc, rc), (lb, rb)
