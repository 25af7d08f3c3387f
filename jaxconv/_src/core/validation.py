"""Argument checks shared by the public functions.

Every check runs on shapes and Python values before any tracing work starts and raises a
``ValueError`` / ``TypeError`` that names the argument, what was given and what is allowed.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import engine as registry
from jaxconv._src.core.capabilities import accumulation_dtype

PADDING_STRINGS = ("VALID", "SAME", "SAME_LOWER")


def as_array(name: str, x: Any) -> jax.Array:
    """Accepts jax/numpy arrays and Python scalars; rejects everything else and complex.

    Args:
        name: the argument's name, for the messages.
        x: the value given.

    Returns:
        ``x`` as an array (a Python scalar through ``jnp.asarray``).

    Raises:
        TypeError: ``x`` is not an array or a real scalar, or it is complex.
    """
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
    """Generic ops need both operands floating or both integer (no silent int/float mix).

    Args:
        lhs: the left operand.
        rhs: the right operand.
        generic: whether the op is generic (the standard op mixes dtypes as lax does).

    Raises:
        TypeError: a generic op with one integer and one floating operand.
    """
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
    """A length-``n`` tuple of ints ``>= minimum``; ``None`` gives ``default`` everywhere.

    Args:
        name: the argument's name, for the messages.
        value: a sequence of ``n`` ints, or ``None``.
        n: the length wanted (the number of spatial dimensions).
        minimum: the smallest value allowed, ``None`` for no bound.
        default: the value of every entry when ``value`` is ``None``; ``None`` makes it required.

    Returns:
        The ints as a tuple.

    Raises:
        TypeError: ``value`` is not a sequence of ints (or is missing and required).
        ValueError: it has the wrong length or an entry below ``minimum``.
    """
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
    """``value`` as an int, checked positive.

    Args:
      name: the argument's name, for the error.
      value: the value given.

    Returns:
      The int.

    Raises:
      TypeError: not an integer.
      ValueError: not positive.

    Example:
      >>> positive_int("feature_group_count", 2)
      2
    """
    try:
        iv = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.") from None
    if iv < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return iv


def conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) -> lax.ConvDimensionNumbers:
    """Parses ``dimension_numbers`` as lax does, re-raising with the argument's name.

    Args:
        lhs_shape: the input's shape.
        rhs_shape: the kernel's shape.
        dimension_numbers: ``None``, a ``ConvDimensionNumbers`` or three layout strings.

    Returns:
        The parsed ``ConvDimensionNumbers``.

    Raises:
        TypeError: ``dimension_numbers`` is not one of those, or does not fit the shapes.
    """
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
            for role, s in zip(("lhs", "rhs", "out"), dimension_numbers, strict=True):
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
    for role, spec in zip(("lhs", "rhs", "out"), dn, strict=True):
        if sorted(spec) != list(range(nd)):
            raise TypeError(
                f"invalid `dimension_numbers` {dimension_numbers!r}: the {role} spec {spec} is "
                f"not a permutation of range({nd})."
            )
    return dn


def _spec_string(spec: Sequence[int], letters: str) -> str:
    """A layout string for ``spec`` (``letters[0]`` at ``spec[0]``, ...; spatial ``0, 1..``).

    Args:
        spec: the dimension order of one operand (batch or output feature, feature, spatial...).
        letters: the names of its first two dimensions (``"NC"`` or ``"OI"``).

    Returns:
        The layout string, such as ``"NHWC"``.
    """
    out = [""] * len(spec)
    out[spec[0]], out[spec[1]] = letters[0], letters[1]
    for i, d in enumerate(spec[2:]):
        out[d] = "DHW"[-(len(spec) - 2):][i] if len(spec) - 2 <= 3 else str(i)
    return "".join(out)


def describe_layout(dn: lax.ConvDimensionNumbers, given: Any,
                    lhs_shape: Sequence[int] | None = None,
                    channels: int | None = None) -> str:
    """Says which layout was used and which axes were read as channels (for error messages).

    With ``lhs_shape`` and the number of input ``channels`` the kernel expects, a mismatch gets
    a hint: when ``dimension_numbers`` were given and another axis of ``lhs`` has that many
    entries, the data's layout looks transposed, and the message says so.

    Args:
        dn: the dimension numbers in use.
        given: the ``dimension_numbers`` the caller gave (``None`` for the default).
        lhs_shape: the input's shape, for the transposed-layout hint.
        channels: the number of input channels the kernel expects, for the same hint.

    Returns:
        A sentence for an error message.
    """
    lhs_s, rhs_s, out_s = (_spec_string(dn.lhs_spec, "NC"), _spec_string(dn.rhs_spec, "OI"),
                           _spec_string(dn.out_spec, "NC"))
    if given is None:
        head = (f"`dimension_numbers` was not given, so the default ({lhs_s!r}, {rhs_s!r}, "
                f"{out_s!r}) applies")
    else:
        if isinstance(given, lax.ConvDimensionNumbers):
            given = (lhs_s, rhs_s, out_s)
        head = f"`dimension_numbers`={given!r} reads lhs as {lhs_s!r} and rhs as {rhs_s!r}"
    nsd = len(dn.lhs_spec) - 2
    c_ax = dn.lhs_spec[1]
    text = (f"{head}: the channels of `lhs` are axis {c_ax}, the in-features of `rhs` "
            f"axis {dn.rhs_spec[1]} and its out-features axis {dn.rhs_spec[0]}.")
    last = ("N" + "DHW"[-nsd:] + "C", "DHW"[-nsd:] + "IO", "N" + "DHW"[-nsd:] + "C") \
        if 1 <= nsd <= 3 else None
    # Suggesting channels-last to a caller who passed exactly that would send them in a circle.
    hint = (f" For channels-last data pass dimension_numbers={last}."
            if last and (lhs_s, rhs_s, out_s) != last else "")
    others = [] if given is None or lhs_shape is None or channels is None or \
        lhs_shape[c_ax] == channels else [ax for ax in dn.lhs_spec[2:]
                                          if lhs_shape[ax] == channels]
    if not others:
        return text + hint
    ax = others[0]
    # The same letters with C moved to the axis that has the kernel's channel count.
    letters = [ch for ch in lhs_s if ch != "C"]
    letters.insert(ax, "C")
    guess = "".join(letters)
    return (f"{text} `lhs` axis {c_ax} (size {lhs_shape[c_ax]}) was read as channels, but its "
            f"axis {ax} has the {channels} channels the kernel expects: the data's layout looks "
            f"transposed relative to {lhs_s!r}. If `lhs` is {guess!r}, pass "
            f"dimension_numbers=({guess!r}, {rhs_s!r}, {guess!r}), or move its channels to axis "
            f"{c_ax} (`jnp.moveaxis(lhs, {ax}, {c_ax})`).")


def padding_pairs(padding: Any, nsd: int, lhs_dilation: tuple[int, ...]) -> str | tuple:
    """Canonical padding: an upper-case string or a tuple of ``nsd`` (lo, hi) int pairs.

    Args:
        padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` (any case) or ``nsd`` pairs.
        nsd: the number of spatial dimensions.
        lhs_dilation: the input dilation (a string padding refuses one).

    Returns:
        The padding string, upper case, or a tuple of ``(low, high)`` int pairs.

    Raises:
        TypeError: pairs that are not pairs of ints.
        ValueError: an unknown string, the wrong number of pairs, or a string with an input
            dilation.
    """
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
    """``engine``, checked to be ``"auto"`` or a registered engine's name.

    Args:
      engine: the value of ``engine=``.

    Returns:
      The name.

    Raises:
      ValueError: not a known engine (the message lists them).

    Example:
      >>> engine_name("xla")
      'xla'
    """
    allowed = (registry.AUTO, *registry.names())
    if not isinstance(engine, str) or engine not in allowed:
        raise ValueError(f"`engine` must be one of {allowed}, got {engine!r}.")
    return engine


def max_block_bytes(value: Any) -> int | None:
    """``max_block_bytes``, checked: ``None`` (the default bound) or a positive int.

    Args:
      value: the value given.

    Returns:
      The int, or ``None``.

    Raises:
      TypeError: not an integer or ``None``.
      ValueError: not positive.

    Example:
      >>> max_block_bytes(2**20)
      1048576
    """
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
    """Validates lax ``dot_general`` dimension numbers; returns them as int tuples.

    Args:
        lhs_shape: the left operand's shape.
        rhs_shape: the right operand's shape.
        dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.

    Returns:
        The same four sequences as tuples of ints.

    Raises:
        TypeError: malformed dimension numbers.
        ValueError: an axis out of range or repeated, or contracting / batch axes of different
            sizes.
    """
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc, lb, rb = (tuple(operator.index(i) for i in t) for t in (lc, rc, lb, rb))
    except (TypeError, ValueError):
        raise TypeError(
            "`dimension_numbers` must be ((lhs_contracting, rhs_contracting), (lhs_batch, "
            f"rhs_batch)) tuples of ints, got {dimension_numbers!r}."
        ) from None
    checks = (("lhs_contracting", lc, lhs_shape), ("rhs_contracting", rc, rhs_shape),
              ("lhs_batch", lb, lhs_shape), ("rhs_batch", rb, rhs_shape))
    for name, dims, shape in checks:
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
        for i, j in zip(a, b, strict=True):
            if lhs_shape[i] != rhs_shape[j]:
                raise ValueError(
                    f"`dimension_numbers`: {kind} dimensions differ in size: lhs dim {i} has "
                    f"{lhs_shape[i]}, rhs dim {j} has {rhs_shape[j]}."
                )
    return (lc, rc), (lb, rb)


def window_sizes(rhs_shape: Sequence[int], rhs_spec: Sequence[int]) -> tuple[int, ...]:
    """The kernel's spatial sizes, each required to be ``>= 1``.

    Args:
        rhs_shape: the kernel's shape.
        rhs_spec: the kernel's dimension order (``ConvDimensionNumbers.rhs_spec``).

    Returns:
        The kernel's spatial sizes.

    Raises:
        ValueError: a spatial size below one.
    """
    window = tuple(int(rhs_shape[d]) for d in rhs_spec[2:])
    if any(k < 1 for k in window):
        raise ValueError(
            f"`rhs` kernel spatial sizes must be >= 1, got {window} (rhs.shape="
            f"{tuple(rhs_shape)})."
        )
    return window


def preferred_element_type(value: Any, lhs: Any, rhs: Any, generic: bool) -> Any:
    """``preferred_element_type``: ``None`` or a real numeric dtype.

    As in lax, any real dtype is accepted for the standard op. A generic op with floating
    inputs refuses an integer accumulation dtype (it would truncate every product).

    Args:
        value: the ``preferred_element_type`` given.
        lhs: the left operand.
        rhs: the right operand.
        generic: whether the op is generic.

    Returns:
        The dtype, or ``None``.

    Raises:
        TypeError: not a dtype, a complex or non-numeric one, or an integer accumulation for a
            generic op on floating inputs.
    """
    if value is None:
        return None
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise TypeError(
            f"`preferred_element_type` must be None or a dtype (e.g. jnp.float32), got {value!r}."
        ) from None
    if jnp.issubdtype(dt, jnp.complexfloating) or not jnp.issubdtype(dt, jnp.number):
        raise TypeError(
            f"`preferred_element_type` must be a real numeric dtype, got {dt}."
        )
    inputs_float = jnp.issubdtype(_common_dtype(lhs, rhs), jnp.inexact)
    if generic and inputs_float and not jnp.issubdtype(dt, jnp.inexact):
        raise TypeError(
            f"`preferred_element_type`={dt} is an integer dtype but the inputs are floating "
            f"(lhs {lhs.dtype}, rhs {rhs.dtype}); a generic op needs a floating one."
        )
    return dt


def precision(value: Any) -> Any:
    """``precision``: anything ``lax`` accepts (checked even where lax is not called).

    Args:
        value: the ``precision`` given.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: lax would refuse it.
    """
    if value is None:
        return None
    try:
        from jax._src.lax.lax import canonicalize_precision
    except ImportError:  # pragma: no cover - private jax API moved; lax checks it later
        return value
    try:
        canonicalize_precision(value)
    except (TypeError, ValueError):
        raise ValueError(
            "`precision` must be None, a lax.Precision, one of its names ('highest', ...) or a "
            f"pair of them, got {value!r}."
        ) from None
    return value


def _common_dtype(lhs: Any, rhs: Any) -> Any:
    """The operands' promoted dtype, canonical (float64 is float32 without x64), no warning."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(lhs.dtype, rhs.dtype))


def check_op(op: Any, lhs: Any, rhs: Any) -> None:
    """Checks that a generic ``op`` can run on ``lhs`` / ``rhs`` (dtypes, combine, reduce).

    Rejects mixed integer/floating inputs, ``bool`` inputs, ``logsumexp`` on integers, a
    ``combine`` (or callable ``reduce``) that is not elementwise, a declared ``identity``
    that is not a two-sided identity of the reduce, and a callable ``reduce`` that is not
    commutative and associative on probe values. The op-level checks run once per
    ``(op, dtype)``, on concrete numpy values (never on the caller's tracers), and are cached.

    Args:
        op: the op.
        lhs: the left operand.
        rhs: the right operand.

    Raises:
        TypeError: any of the refusals above; the message names the op and what to change.
    """
    check_mixed_dtypes(lhs, rhs, generic=True)
    dtype = _common_dtype(lhs, rhs)
    if dtype == jnp.bool_:
        raise TypeError(
            f"`lhs` ({lhs.dtype}) and `rhs` ({rhs.dtype}) are bool; op {op.display_name!r} needs "
            "numeric inputs (cast to float32 or an integer dtype)."
        )
    if op.reduce == "logsumexp" and not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"op {op.display_name!r} reduces with logsumexp, which needs floating inputs; got lhs "
            f"{lhs.dtype} and rhs {rhs.dtype}."
        )
    try:
        hash(op)
    except TypeError:  # an Op holding an unhashable field: check without the cache
        _check_op_dtype.__wrapped__(op, jnp.dtype(dtype))
        return
    _check_op_dtype(op, jnp.dtype(dtype))


# The probe values: distinct, of both signs and including 0, so that a combine mixing up
# positions (``w[0]``, a transpose, a broadcast constant) gives different numbers.
_PROBE_X = np.array([[-1.5, 0.0, 2.0, 0.5, -0.25], [1.0, -2.0, 0.75, 3.0, -1.0],
                     [0.25, 1.25, -0.5, -3.0, 2.5]])
_PROBE_W = np.array([[0.5, -1.0, 1.5, -2.5, 0.0], [-0.75, 2.25, -1.25, 1.0, 0.25],
                     [3.0, 0.125, -0.5, -1.75, 1.75]])


def _probe(dtype: Any, values: np.ndarray) -> np.ndarray:
    """The probe values cast to ``dtype`` (scaled so that integer probes are not all zero).

    Args:
        dtype: the dtype to probe.
        values: the float probe values.

    Returns:
        The probes in ``dtype``.
    """
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        values = np.abs(values) * 2
    elif jnp.issubdtype(dtype, jnp.integer):
        values = values * 4
    return np.asarray(values).astype(dtype)


def _same(a: Any, b: Any) -> bool:
    """Whether two probe results are equal (shape, values to 1e-3, NaN equal to NaN).

    Args:
        a: one result.
        b: the other.

    Returns:
        True if they are equal.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return a.shape == b.shape and bool(
        np.allclose(a, b, rtol=1e-3, atol=1e-6, equal_nan=True))


def _elementwise(fn: Any, what: str, op: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Runs ``fn`` on the (3, 5) arrays and element by element; raises if they differ.

    Args:
        fn: the function to probe, ``f(a, b)``.
        what: its role, ``"combine"`` or ``"reduce"``, for the messages.
        op: the op, for the messages.
        a: the first probe array.
        b: the second probe array.

    Returns:
        ``fn(a, b)`` on the arrays.

    Raises:
        TypeError: ``fn`` fails on arrays, changes the shape, or differs element by element.
    """
    sds = jax.ShapeDtypeStruct(a.shape, a.dtype)
    try:
        out = jax.eval_shape(fn, sds, jax.ShapeDtypeStruct(b.shape, b.dtype))
    except Exception as e:  # noqa: BLE001 - reported with the op's name
        if what == "combine" and not jnp.issubdtype(a.dtype, jnp.inexact):
            raise TypeError(
                f"op {op.display_name!r} does not accept {a.dtype} inputs: its `combine` failed on "
                f"them ({e}); cast `lhs` and `rhs` to a floating dtype."
            ) from e
        raise TypeError(
            f"op {op.display_name!r}: `{what}` must be a binary elementwise function f(a, b) of "
            f"two arrays; calling it on two arrays of shape {a.shape} failed: {e}"
        ) from e
    if not hasattr(out, "shape") or tuple(out.shape) != a.shape:
        raise ValueError(
            f"op {op.display_name!r}: `{what}` must be elementwise (two arrays of shape {a.shape} "
            f"in, one of shape {a.shape} out), got {getattr(out, 'shape', type(out).__name__)}; "
            "nothing is broadcast for you."
        )
    whole = _run(fn, a, b)
    try:
        each = _run(jax.vmap(fn), a.ravel(), b.ravel())
    except Exception as e:  # noqa: BLE001 - reported with the op's name
        raise ValueError(
            f"op {op.display_name!r}: `{what}` must be elementwise, written for scalars; calling "
            f"it on scalars failed: {e}"
        ) from e
    if each.shape != (a.size,) and each.size == a.size and _same(whole, each.reshape(a.shape)):
        raise ValueError(
            f"op {op.display_name!r}: `{what}` gives the right values, but called on two "
            f"scalars it returns shape {each.shape[1:]}, not a scalar: a captured array of "
            f"shape {each.shape[1:]} broadcasts its result. Make that constant a scalar (a "
            "Python number, `c.reshape(())` or `c[0]`)."
        )
    if each.shape != (a.size,) or not _same(whole, each.reshape(a.shape)):
        raise ValueError(
            f"op {op.display_name!r}: `{what}` is not elementwise: on arrays of shape {a.shape} it "
            "gives other values than element by element (does it index, transpose, reduce or "
            "broadcast its arguments?)."
        )
    return whole


def _run(fn: Any, *args: np.ndarray) -> np.ndarray:
    """``fn`` on concrete numpy values, compiled on its own: never on the caller's tracers.

    The probes run when an op is first used, which may be inside ``jit``, ``vmap`` or
    ``grad`` of the user's function; a compiled executable called with numpy arrays takes
    no part in those traces.
    """
    sds = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    compiled = jax.jit(fn).lower(*sds).compile()
    return np.asarray(compiled(*args))


@functools.lru_cache(maxsize=256)
def _check_op_dtype(op: Any, dtype: Any) -> None:
    """The op-level checks of `check_op` for one ``(op, dtype)``, cached.

    Args:
        op: the op.
        dtype: the operands' common dtype.

    Raises:
        TypeError: the combine or the callable reduce is not elementwise, or the reduce is not a
            commutative monoid with the declared identity.
    """
    # The probes judge the op itself, whatever the caller's rank-promotion setting: a
    # combine that broadcasts is refused as not elementwise either way.
    with jax.numpy_rank_promotion("allow"):
        a = _probe(dtype, _PROBE_X)
        b = _probe(dtype, _PROBE_W)
        c = _elementwise(op.combine, "combine", op, a, b)
        if callable(op.reduce):
            _check_reduce(op, np.asarray(c), dtype)


def _check_reduce(op: Any, c: np.ndarray, dtype: Any) -> None:
    """Probes a callable ``reduce`` on the combine's outputs ``c``: a commutative monoid, in
    the dtype it folds in (a reduce recognised as sum / logsumexp folds bf16 / f16 terms in
    float32: ``jnp.logaddexp``'s bf16 roundings broke the probes' associativity by more than
    their 1e-3).

    Args:
        op: the op (its ``reduce`` and ``identity``).
        c: the combine's outputs on the probes.
        dtype: the operands' common dtype.

    Raises:
        TypeError: the reduce is not commutative or associative, or ``op.identity`` is not its
            identity, on the probes.
    """
    c2 = c[::-1, ::-1].copy()
    c3 = np.roll(c, 2, axis=1)
    red = op.reduce
    _elementwise(red, "reduce", op, c, c2)
    acc = np.dtype(accumulation_dtype(op, dtype, None))
    c, c2, c3 = (v.astype(acc) for v in (c, c2, c3))
    v = op.identity
    if np.isinf(v) and not jnp.issubdtype(c.dtype, jnp.inexact):
        # An integer reduce's infinite identity stands for the dtype's extreme.
        info = np.iinfo(c.dtype)
        v = info.min if v < 0 else info.max
    ident = np.full(c.shape, v, dtype=c.dtype)
    def probes(a, b, d, e):
        ab = red(a, b)
        return red(a, e), red(e, a), ab, red(b, a), red(ab, d), red(a, red(b, d))

    sds = [jax.ShapeDtypeStruct(c.shape, c.dtype)] * 4
    ae, ea, ab, ba, left, right = (np.asarray(v) for v in jax.jit(probes).lower(*sds).compile()(
        c, c2, c3, ident))
    for side, got in (("reduce(a, identity)", ae), ("reduce(identity, a)", ea)):
        if not _same(got, c):
            raise ValueError(
                f"op {op.display_name!r}: `identity`={op.identity!r} is not a two-sided identity "
                f"of `reduce`: {side} must equal a (e.g. -inf for a max, 0 for a sum)."
            )
    if not _same(ab, ba):
        raise ValueError(
            f"op {op.display_name!r}: `reduce` is not commutative: reduce(a, b) != reduce(b, a) "
            "on probe values; the taps of a window are reduced in no fixed order, so `reduce` "
            "must be commutative and associative."
        )
    if not _same(left, right):
        raise ValueError(
            f"op {op.display_name!r}: `reduce` is not associative: reduce(reduce(a, b), c) != "
            "reduce(a, reduce(b, c)) on probe values; the taps of a window are reduced in no "
            "fixed order, so `reduce` must be commutative and associative."
        )


def out_sharding(value: Any, shape: Sequence[int]) -> Any:
    """Checks `out_sharding` for an output of `shape`, as lax does: a `PartitionSpec` needs a
    mesh in context, every mesh axis it names must exist, and on axes of type `Explicit` each
    sharded dimension must divide evenly (on `Auto` axes the partitioner pads). Returns the
    value unchanged.

    Args:
        value: the ``out_sharding`` given (``None``, a sharding or a ``PartitionSpec``).
        shape: the output's shape.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: a ``PartitionSpec`` without a mesh, an axis the mesh does not have, or an
            explicit axis that does not divide its dimension; the message names ``out_sharding``.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> out_sharding(P("data"), (4, 2))
      Traceback (most recent call last):
      ...
      ValueError: `out_sharding`: a PartitionSpec needs a mesh in context ...
    """
    if value is None:
        return value
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    if isinstance(value, PartitionSpec):
        mesh, spec = jax.sharding.get_abstract_mesh(), value
        if mesh.empty:
            raise ValueError(
                "`out_sharding`: a PartitionSpec needs a mesh in context (`jax.set_mesh(mesh)`); "
                f"otherwise pass a NamedSharding. Got {value!r}.")
    elif isinstance(value, NamedSharding):
        mesh, spec = value.mesh, value.spec
    else:
        return value
    if len(spec) > len(shape):
        raise ValueError(f"`out_sharding` {spec!r} has {len(spec)} entries for an output of "
                         f"rank {len(shape)} (shape {tuple(shape)}).")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    explicit = set(getattr(mesh, "explicit_axes", ()))
    for dim, entry in enumerate(spec):
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        for name in names:
            if name not in sizes:
                raise ValueError(
                    f"`out_sharding` {spec!r} names mesh axis {name!r}, which the mesh does "
                    f"not have; its axes are {tuple(mesh.axis_names)}.")
        k = math.prod(sizes[n] for n in names)
        if set(names) & explicit and shape[dim] % k:
            raise ValueError(
                f"`out_sharding` {spec!r} splits output dimension {dim} (size {shape[dim]}) "
                f"over mesh axes {names} ({k} devices), which do not divide it evenly; "
                f"output shape {tuple(shape)}.")
    return value
