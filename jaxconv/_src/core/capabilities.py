"""What the engines need to know about an `Op`, declared on it or inferred once from its programs.

`capabilities(op)` answers it as a `Capabilities`: the op's canonical form (a callable reduce
recognised as a built-in one from its traced program, `recognised_reduce`, or as a tempered
logaddexp, `smoothing_temperature`), the combine's one primitive (`simple_primitive`,
`single_primitive`), the padding its reduce ignores, whether a sum's kernel gradient is a
native product, the log semiring, and whether a forward-mode rule exists (a part with only a
custom VJP has none). Inferred from the functions' programs, never their names.
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

from jaxconv._src.core import scalar_program as sp
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.jaxpr_walk import iter_eqns

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
    live = program.live()
    if len(program.outputs) != 1 or len(live) != 1 or program.outputs[0] != live[0]:
        return None
    node = program.nodes[live[0]]
    if node.name not in COMBINE_KINDS or node.dtype != program.dtype:
        return None
    return node.name if set(node.args) == {sp.Arg(0), sp.Arg(1)} else None


def _probe(program: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """`program` evaluated on the probe pairs ``(a, b)``, as float64.

    Args:
        program: a `scalar_program.Program` of two arguments.
        a: the first arguments.
        b: the second arguments.

    Returns:
        The first output, or ``None`` where the program fails on values (then it computes
        no fold this module recognises).
    """
    try:
        with jax.ensure_compile_time_eval():
            return np.asarray(sp.evaluate(program, jnp.asarray(a), jnp.asarray(b))[0],
                              np.float64)
    except Exception:  # noqa: BLE001 - a program that fails on values is no known fold
        return None


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
    used = set(program.primitives())
    if not used & {"exp", "exp2", "expm1", "logistic"} or not used & {"log", "log1p"}:
        return False
    a, b = (v.ravel() for v in np.meshgrid(_LAE_PROBES, _LAE_PROBES))
    got = _probe(program, a, b)
    if got is None:
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
      >>> from jaxconv._src.core.capabilities import recognised_reduce
      >>> recognised_reduce(jnp.logaddexp), recognised_reduce(lambda a, b: b * a)
      ('logsumexp', 'prod')
    """
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
    with np.errstate(over="ignore"):
        probes = np.unique(np.concatenate([_LAE_PROBES, _LAE_PROBES * np.float32(abs(c))]))
    a, b = (v.ravel().astype(dtype) for v in np.meshgrid(probes, probes))
    got = _probe(program, a, b)
    if got is None:
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
      >>> from jaxconv._src.core.capabilities import smoothing_temperature
      >>> smoothing_temperature(lambda a, b: 0.5 * jnp.logaddexp(a / 0.5, b / 0.5))
      0.5
      >>> smoothing_temperature(lambda a, b: jnp.logaddexp(a, b) + 1.0) is None
      True
    """
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
    return any(eqn.primitive.name.startswith("custom_vjp")
               for eqn in iter_eqns(jaxpr, descend=_outside_custom_jvp))


def _outside_custom_jvp(eqn: Any) -> bool:
    """Whether a walk enters ``eqn``'s sub-jaxprs: not a ``custom_jvp`` call's (its rule's).

    Args:
        eqn: a jaxpr equation.

    Returns:
        False for a ``custom_jvp`` call.
    """
    return not eqn.primitive.name.startswith("custom_jvp")


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
      >>> from jaxconv._src.core.capabilities import capabilities
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


def accumulation_dtype(op: Op, dtype: Any, preferred: Any | None) -> Any:
    """The dtype partial results are accumulated in.

    Sums and logsumexp of low-precision floats accumulate in float32 (or in
    ``preferred_element_type``); max/min keep the input dtype (no rounding happens). A
    callable reduce recognised as one of them (``lambda a, b: a + b``, ``jnp.logaddexp``)
    accumulates as the declared one does (it accumulated in f16, 3 half-ulps off at 576
    terms, and its standard-product tangent 25x the declared sum's error).

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
    reduce = op.reduce
    if not isinstance(reduce, str) and jnp.issubdtype(dtype, jnp.floating):
        # The op's canonical reduce (the callable recognised from its traced program, with
        # the built-in's identity; cached).
        reduce = capabilities(op).reduce
    if reduce in ("sum", "prod", "logsumexp") and jnp.issubdtype(dtype, jnp.floating):
        return jnp.promote_types(dtype, jnp.float32)
    return dtype
