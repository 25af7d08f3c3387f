"""The algebra: an `Op` is an elementwise ``combine`` and an associative ``reduce``.

A generalized product replaces ``x * w`` by ``combine(x, w)`` and the sum over the
contraction by ``reduce``. This module holds the ``Op`` type and the reducers (``sum``,
``max``, ``min``, ``prod``, ``logsumexp`` or a user's binary callable), each with its identity
in every dtype, a reduction along an axis and the elementwise binary form used to accumulate
across kernel taps.
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


def accumulation_dtype(op: Op, dtype: Any, preferred: Any | None) -> Any:
    """The dtype partial results are accumulated in.

    Sums and logsumexp of low-precision floats accumulate in float32 (or in
    ``preferred_element_type``); max/min keep the input dtype (no rounding happens).

    Args:
        op: the op.
        dtype: the operands' dtype.
        preferred: the ``preferred_element_type``, or ``None``.

    Returns:
        The accumulation dtype.
    """
    dtype = jnp.dtype(dtype)
    if preferred is not None:
        return jnp.dtype(preferred)
    if op.reduce in ("sum", "prod", "logsumexp") and jnp.issubdtype(dtype, jnp.floating):
        return jnp.promote_types(dtype, jnp.float32)
    return dtype


# --- capabilities: what an engine needs to know about an op -------------------------------

COMBINE_KINDS = ("add", "mul", "min", "max")
_REDUCE_OF_PRIMITIVE = {"add": ("sum", 0.0), "mul": ("prod", 1.0), "max": ("max", -math.inf),
                        "min": ("min", math.inf)}
_DEFAULT_IDENTITY = {**dict(_REDUCE_OF_PRIMITIVE.values()), "logsumexp": -math.inf}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the engines need to know about an op, declared or inferred once.

    Attributes:
      canonical: the op with a callable reduce that `recognised_reduce` finds to be a
        built-in one (``add`` / ``mul`` / ``max`` / ``min`` exactly, or a logaddexp), with
        that reduce's identity, replaced by the built-in reduce, so that it takes the
        built-in's fast paths and hand-written backward pass.
      reduce: the (canonical) reduce's name, ``"custom"`` for a callable.
      combine: ``"add" | "mul" | "min" | "max"`` when ``combine`` is that one primitive,
        ``"popcount_xor"`` as declared (`Op.combine_kind`).
      dominated_fill: a pad value whose products the reduce provably ignores (identity
        padding without masks): ``-inf`` for ``x + w`` / ``min(x, w)`` under max and for
        ``x + w`` under logsumexp, ``+inf`` for ``x + w`` / ``max(x, w)`` under min.
      separable: ``"mul"`` / ``"adder"``: a sum whose kernel gradient is a native product.
      log_semiring: ``x + w`` under logsumexp with identity padding (exp-space fast path).
      native: the native CPU kernel's id, or ``None``.
      forward_mode: whether a forward-mode rule exists.
      reverse_only_part: ``"combine"`` / ``"reduce"``: the part that has only a custom VJP.
      temperature: ``c`` when the callable reduce is ``c * logaddexp(a / c, b / c)``
        (`smoothing_temperature`) with its identity (``-inf`` for ``c > 0``, ``+inf`` for
        ``c < 0``): the op is ``c`` times the logsumexp of ``combine / c``, which
        `factoring.factored_form` runs on the built-in logsumexp paths; else ``None``.
    """

    canonical: Op
    reduce: str
    combine: str | None
    dominated_fill: float | None
    separable: str | None
    log_semiring: bool
    native: str | None
    forward_mode: bool
    reverse_only_part: str | None
    temperature: float | None = None


def simple_primitive(fn: Any, dtype: Any = jnp.float32) -> str | None:
    """``"add" | "mul" | "max" | "min"`` if ``fn(a, b)`` is exactly that primitive of a, b.

    Traced once on abstract scalars (no values, never on a caller's tracer).

    Args:
        fn: a binary function.
        dtype: the dtype it is traced in.

    Returns:
        The primitive's name, or ``None``.
    """
    s = jax.ShapeDtypeStruct((), dtype)
    try:
        jaxpr = jax.make_jaxpr(fn)(s, s).jaxpr
    except Exception:  # noqa: BLE001 - anything untraceable is simply not simple
        return None
    if len(jaxpr.eqns) != 1 or len(jaxpr.outvars) != 1:
        return None
    eqn = jaxpr.eqns[0]
    name = eqn.primitive.name
    if name not in COMBINE_KINDS:
        return None
    if eqn.outvars[0] is not jaxpr.outvars[0] or len(eqn.invars) != 2:
        return None
    if {id(v) for v in eqn.invars} != {id(v) for v in jaxpr.invars}:
        return None
    return name


# Probe values for recognising a logaddexp: both signs, ties, spreads beyond exp's range in
# float32 (|a - b| > 88), zeros of both signs, the infinities and NaN.
_LAE_PROBES = np.array([-np.inf, -1e4, -200.0, -88.5, -30.0, -3.5, -1.0, -0.6931472, -1e-3,
                        -0.0, 0.0, 1e-6, 0.3, 1.0, 2.5, 17.0, 80.0, 100.0, 1e4, np.inf, np.nan],
                       np.float32)


def single_primitive(program: Any) -> str | None:
    """``"add" | "mul" | "max" | "min"`` if the program is that one primitive of its two
    arguments (in either order), in its own dtype.

    Args:
        program: a `scalar_program.Program` of two arguments.

    Returns:
        The primitive's name, or ``None``.
    """
    from jaxconv._src.core import scalar_program as sp  # noqa: PLC0415

    live = program.live()
    if len(program.outputs) != 1 or len(live) != 1 or program.outputs[0] != live[0]:
        return None
    node = program.nodes[live[0]]
    if node.name not in COMBINE_KINDS or node.dtype != program.dtype:
        return None
    return node.name if set(node.args) == {sp.Arg(0), sp.Arg(1)} else None


def _computes_logaddexp(program: Any) -> bool:
    """Whether a two-argument program is ``log(exp(a) + exp(b))`` on the probe values.

    It must use an exponential and a logarithm, and match float64 ``logaddexp`` within a few
    float32 rounding steps on every pair of probe values (NaN where an argument is NaN,
    ``a`` exactly for ``(a, -inf)``, the identity). Where an argument is ``+inf``, or both
    are ``-inf``, hand-written stable forms (``m + log(exp(a - m) + exp(b - m))``) give NaN:
    accepted there, and the recognised reduce computes the built-in's answer (``+inf``;
    ``-inf`` for two ``-inf``, the identity law).

    Args:
        program: a `scalar_program.Program` of two arguments.

    Returns:
        True if it computes ``logaddexp``.
    """
    from jaxconv._src.core import scalar_program as sp  # noqa: PLC0415

    used = set(program.primitives())
    if not used & {"exp", "exp2", "expm1", "logistic"} or not used & {"log", "log1p"}:
        return False
    a, b = (v.ravel() for v in np.meshgrid(_LAE_PROBES, _LAE_PROBES))
    try:
        with jax.ensure_compile_time_eval():
            got = np.asarray(sp.evaluate(program, jnp.asarray(a), jnp.asarray(b))[0],
                             np.float64)
    except Exception:  # noqa: BLE001 - a program that fails on values is not a logaddexp
        return False
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan_in = np.isnan(a64) | np.isnan(b64)
    edge = ~nan_in & ((a64 == np.inf) | (b64 == np.inf) | ((a64 == -np.inf) & (b64 == -np.inf)))
    with np.errstate(invalid="ignore"):
        want = np.logaddexp(a64, b64)
        scale = np.maximum(1.0, np.maximum(np.abs(a64), np.abs(b64)))
        close = (got == want) | (np.abs(got - want) <= 8 * np.finfo(np.float32).eps * scale)
    return bool(np.isnan(got[nan_in]).all() and close[~nan_in & ~edge].all()
                and (close[edge] | np.isnan(got[edge])).all())


@functools.lru_cache(maxsize=256)
def recognised_reduce(fn: Callable[[Any, Any], Any]) -> str | None:
    """The built-in reduce that a callable ``reduce`` computes, from its traced program.

    ``"sum" | "prod" | "max" | "min"`` when the program (calls inlined) is exactly ``a + b``,
    ``a * b``, ``max(a, b)`` or ``min(a, b)`` (``jnp.add``, ``lambda a, b: b + a``,
    ``jnp.maximum``, ...); ``"logsumexp"`` when it computes ``log(exp(a) + exp(b))``
    (``jnp.logaddexp``, a hand-written stable form): see `_computes_logaddexp`. ``None``
    otherwise, or when it does not trace on scalars. Never decided by the function's
    identity or name.

    Args:
      fn: the binary callable.

    Returns:
      The reduce's name, or ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.core.algebra import recognised_reduce
      >>> recognised_reduce(jnp.logaddexp), recognised_reduce(lambda a, b: b * a)
      ('logsumexp', 'prod')
    """
    from jaxconv._src.core import scalar_program as sp  # noqa: PLC0415

    try:
        program = sp.trace(fn, np.float32, 2)
    except sp.Untranslatable:
        return None
    if len(program.outputs) != 1:
        return None
    prim = single_primitive(program)
    if prim is not None:
        return _REDUCE_OF_PRIMITIVE[prim][0]
    return "logsumexp" if _computes_logaddexp(program) else None


def _matches_tempered_logaddexp(program: Any, c: float, dtype: Any) -> bool:
    """Whether a two-argument program is ``c * logaddexp(a / c, b / c)`` on the probe values.

    The probes are `_LAE_PROBES` and the same values scaled by ``|c|`` (spreads beyond exp's
    range at this temperature). Every pair must match the float64 formula within a few
    float32 rounding steps, NaN where an argument is NaN; where ``a / c`` or ``b / c`` is
    ``+inf``, or both are ``-inf``, NaN is accepted too (hand-written stable forms), as for
    `_computes_logaddexp`.

    Args:
        program: a `scalar_program.Program` of two arguments.
        c: the temperature (non-zero, finite).
        dtype: the program's dtype (the probes' dtype).

    Returns:
        True if it computes the tempered logaddexp.
    """
    from jaxconv._src.core import scalar_program as sp  # noqa: PLC0415

    with np.errstate(over="ignore"):
        probes = np.unique(np.concatenate([_LAE_PROBES, _LAE_PROBES * np.float32(abs(c))]))
    a, b = (v.ravel().astype(dtype) for v in np.meshgrid(probes, probes))
    try:
        with jax.ensure_compile_time_eval():
            got = np.asarray(sp.evaluate(program, jnp.asarray(a), jnp.asarray(b))[0],
                             np.float64)
    except Exception:  # noqa: BLE001 - a program that fails on values is not this fold
        return False
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan_in = np.isnan(a64) | np.isnan(b64)
    with np.errstate(invalid="ignore", over="ignore"):
        u, v = a64 / c, b64 / c
        edge = ~nan_in & ((u == np.inf) | (v == np.inf) | ((u == -np.inf) & (v == -np.inf)))
        want = c * np.logaddexp(u, v)
        scale = np.maximum(1.0, np.maximum(np.abs(a64), np.abs(b64)))
        close = (got == want) | (np.abs(got - want) <= 8 * np.finfo(np.float32).eps * scale)
    return bool(np.isnan(got[nan_in]).all() and close[~nan_in & ~edge].all()
                and (close[edge] | np.isnan(got[edge])).all())


@functools.lru_cache(maxsize=256)
def smoothing_temperature(fn: Callable[[Any, Any], Any], dtype: Any = np.float32) -> float | None:
    """The temperature ``c`` of a callable reduce that computes ``c * logaddexp(a / c, b / c)``.

    Such a fold is a logsumexp at temperature ``c``: ``reduce(t_1, ..., t_n) = c *
    logsumexp(t_i / c)``, a smoothed max for ``c > 0`` (identity ``-inf``) and a smoothed
    min for ``c < 0`` (identity ``+inf``). Recognised from the traced program, never the
    function's name: it must use an exponential and a logarithm, and for one of its
    constants ``k`` (or ``1 / k``) match the formula with ``c = k`` on pairs of probe values
    (`_matches_tempered_logaddexp`): ``c * jnp.logaddexp(a / c, b / c)``, the softplus form
    ``max(a, b) + c * softplus(-|a - b| / c)``, ... ``c == 1`` is `recognised_reduce`'s
    plain ``"logsumexp"``.

    Args:
      fn: the binary callable.
      dtype: the dtype it is traced in (``c`` is the literal in that dtype: float32's
        ``0.1`` is ``0.10000000149...``; float64 operands need float64's).

    Returns:
      ``c`` (a float), or ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.core.algebra import smoothing_temperature
      >>> smoothing_temperature(lambda a, b: 0.5 * jnp.logaddexp(a / 0.5, b / 0.5))
      0.5
      >>> smoothing_temperature(lambda a, b: jnp.logaddexp(a, b) + 1.0) is None
      True
    """
    from jaxconv._src.core import scalar_program as sp  # noqa: PLC0415

    try:
        program = sp.trace(fn, dtype, 2)
    except sp.Untranslatable:
        return None
    used = set(program.primitives())
    if len(program.outputs) != 1 or not used & {"exp", "exp2", "expm1", "logistic"} \
            or not used & {"log", "log1p"}:
        return None
    consts = {float(r.value) for k in program.live() for r in program.nodes[k].args
              if isinstance(r, sp.Const) and not isinstance(r.value, bool)}
    candidates = []
    for k in sorted(consts, key=abs):
        if not math.isfinite(k) or k == 0:
            continue
        candidates += [k, float(np.dtype(dtype).type(1.0 / k))]
    for c in dict.fromkeys(candidates):
        if c != 1.0 and math.isfinite(c) and _matches_tempered_logaddexp(program, c, dtype):
            return c
    return None


def _has_reverse_only_rule(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` calls a ``custom_vjp`` function outside any ``custom_jvp`` one (whose
    own JVP rule would cover it): such a program has no forward-mode rule.

    Args:
        jaxpr: a jaxpr (sub-jaxprs of its equations are searched too).

    Returns:
        True if it has such a call.
    """
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name.startswith("custom_vjp"):
            return True
        if name.startswith("custom_jvp"):
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _has_reverse_only_rule(inner):
                    return True
    return False


def _reverse_only_part(op: Op) -> str | None:
    """``"combine"`` / ``"reduce"`` if that part of ``op`` defines only a reverse-mode rule.

    Found from the part's program, traced once on abstract values (nothing runs).

    Args:
        op: the op.

    Returns:
        The part's name, or ``None``.
    """
    s = jax.ShapeDtypeStruct((2,), jnp.float32)
    parts = [("combine", op.combine)]
    if callable(op.reduce):
        parts.append(("reduce", op.reduce))
    for what, fn in parts:
        if _has_reverse_only_rule(jax.make_jaxpr(fn)(s, s).jaxpr):
            return what
    return None


@functools.lru_cache(maxsize=1024)
def capabilities(op: Op) -> Capabilities:
    """The capabilities of ``op``: its declared fields, the rest inferred once (cached).

    Args:
      op: the product.

    Returns:
      A `Capabilities`.

    Example:
      >>> import jaxconv
      >>> from jaxconv._src.core.algebra import capabilities
      >>> capabilities(jaxconv.ops.max_plus).dominated_fill
      -inf
    """
    canonical = op
    temperature = None
    if callable(op.reduce):
        name = recognised_reduce(op.reduce)
        if name is not None and op.identity is not None \
                and float(op.identity) == _DEFAULT_IDENTITY[name]:
            canonical = op.replace(reduce=name, identity=None)
        elif name is None and op.identity is not None and op.rewrite is None:
            c = smoothing_temperature(op.reduce)
            if c is not None and float(op.identity) == (-math.inf if c > 0 else math.inf):
                temperature = c
    elif op.identity is not None and float(op.identity) == _DEFAULT_IDENTITY.get(op.reduce):
        # A declared identity that is the reduce's own (max's -inf): the default, which
        # lets the engines fill padding, factor maps out of the product and so on.
        canonical = op.replace(identity=None)
    red = canonical.reduce_name
    comb = op.combine_kind if op.combine_kind is not None else simple_primitive(op.combine)
    fill = None
    if canonical.pad_value is None and canonical.identity is None and red != "custom":
        if comb == "add":
            fill = {"max": -math.inf, "logsumexp": -math.inf, "min": math.inf}.get(red)
        elif (comb, red) in (("min", "max"), ("max", "min")):
            fill = -math.inf if red == "max" else math.inf
    separable = op.separable
    if separable is None and red == "sum" and comb == "mul":
        separable = "mul"
    log_semiring = (red == "logsumexp" and canonical.pad_value is None
                    and canonical.identity is None and comb == "add")
    if op.forward_mode is None:
        part = _reverse_only_part(op)
        forward = part is None
    else:
        forward = bool(op.forward_mode)
        part = None if forward else "combine"
    return Capabilities(canonical, red, comb, fill, separable if red == "sum" else None,
                        log_semiring, op.native, forward, part, temperature)
