"""The derivatives of the primitives: JVP and transpose rules.

`conv`'s JVP rule returns `y` and a `conv_tangent`; `jax.grad` transposes that tangent into a
`conv_backward`. So `jax.jvp`, `jax.linearize`, `jax.jacfwd`, `jax.grad` and `jax.vjp` all
work with `jit` inside or outside, and each mode runs the engine's own rule (the hand-written
backward passes are never differentiated by JAX).

When the engine that the default backend would run records its winners (the native engine's
dense max/min products), `conv`'s JVP binds `conv_record` instead of `conv` and passes the
record to the tangent and so to its transpose, the backward, as one more operand: under
`jax.grad` the recording forward runs once and the record is a residual; the plain forward
(no derivative) never records. Second-order derivatives of the tangent and the backward are
the fallback (XLA) engine's formulas differentiated by JAX.

Importing this module registers the rules.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax._src import ad_util
from jax.interpreters import ad

from jaxconv._src.core import engine as registry
from jaxconv._src.core import planner
from jaxconv._src.core.primitive import (
    backward_p,
    conv_p,
    record_p,
    same_varying,
    split_record,
    tangent_p,
)
from jaxconv._src.core.problem import Problem

Array = jax.Array


def _records(problem: Problem) -> bool:
    """Whether a differentiated call binds the recording forward: the engine the default
    backend's platform would run declares that it records its winners (another platform
    lowering the same program runs its own engine's forward, with an empty record).

    Args:
        problem: the canonical problem.

    Returns:
        True to bind `record_p` in place of `conv_p` under a derivative.
    """
    platform = jax.default_backend()
    try:
        engine = planner.engine_for(problem, platform)
    except ValueError:
        return False
    return engine.records_winners(problem, platform)


def _conv_jvp(primals, tangents, *, problem):
    """The JVP of `conv_p`: the output and, if any tangent is not zero, `tangent_p`'s.

    Args:
        primals: ``(x, w)``.
        tangents: ``(tx, tw)``, either a symbolic zero.
        problem: the canonical problem.

    Returns:
        ``(y, ty)``.
    """
    x, w = primals
    tx, tw = tangents
    active = (type(tx) is not ad.Zero, type(tw) is not ad.Zero)
    if not any(active):
        y = conv_p.bind(x, w, problem=problem)
        return y, ad_util.p2tz(y)
    if _records(problem):
        y, record = record_p.bind(x, w, problem=problem)
        return y, _bind_tangent(problem, active, x, w, y, record, tx, tw)
    y = conv_p.bind(x, w, problem=problem)
    return y, _bind_tangent(problem, active, x, w, y, None, tx, tw)


def _bind_tangent(problem: Problem, active: tuple[bool, bool], x: Array, w: Array, y: Array,
                  record: Array | None, tx: Any, tw: Any) -> Array:
    """`tangent_p` of the operands, with the record after `y` when there is one.

    Args:
        problem: the canonical problem.
        active: which tangents are not zero.
        x: the input.
        w: the kernel.
        y: the output.
        record: the recording forward's record, or ``None``.
        tx: the input's tangent (maybe a symbolic zero).
        tw: the kernel's tangent (likewise).

    Returns:
        The output's tangent.
    """
    rec = () if record is None else (record,)
    return tangent_p.bind(*same_varying(x, w, y, *rec, ad.instantiate_zeros(tx),
                                         ad.instantiate_zeros(tw)),
                          problem=problem, active=active, recorded=record is not None)


def _record_jvp(primals, tangents, *, problem):
    """The JVP of `record_p` (a derivative taken of a derivative): the record has none.

    Args:
        primals: ``(x, w)``.
        tangents: ``(tx, tw)``.
        problem: the canonical problem.

    Returns:
        ``([y, record], [ty, zero])``.
    """
    x, w = primals
    tx, tw = tangents
    y, record = record_p.bind(x, w, problem=problem)
    active = (type(tx) is not ad.Zero, type(tw) is not ad.Zero)
    zero = ad_util.p2tz(record)
    if not any(active):
        return [y, record], [ad_util.p2tz(y), zero]
    return [y, record], [_bind_tangent(problem, active, x, w, y, record, tx, tw), zero]


def _tangent_transpose(ct, *args, problem, active, recorded):
    """The transpose of `tangent_p` (linear in its tangents): `backward_p`.

    Args:
        ct: the output tangent's cotangent.
        *args: the primals ``x, w, y`` (and the record when ``recorded``), then the tangents
            ``tx, tw`` (undefined when their gradient is needed).
        problem: the canonical problem.
        active: which tangents were not zero (unused).
        recorded: whether the recording forward's record follows ``y``.

    Returns:
        The cotangents of the operands (``None`` for the primals).

    Raises:
        ValueError: a primal operand is undefined (not linear in it).
    """
    del active
    (x, w, y, tx, tw), record = split_record(args, recorded)
    primals = (x, w, y) if record is None else (x, w, y, record)
    if any(ad.is_undefined_primal(a) for a in primals):
        raise ValueError("jaxconv: the tangent of a convolution is linear in its tangents only.")
    need = (ad.is_undefined_primal(tx), ad.is_undefined_primal(tw))
    zeros = [ad.Zero(tx.aval) if need[0] else None, ad.Zero(tw.aval) if need[1] else None]
    nones = [None] * len(primals)
    if type(ct) is ad.Zero or not any(need):
        return [*nones, *zeros]
    rec = () if record is None else (record,)
    gx, gw = backward_p.bind(*same_varying(x, w, y, *rec, ct), problem=problem, need=need,
                             recorded=recorded)
    return [*nones, gx if need[0] else None, gw if need[1] else None]


def _xla_jvp(name: str):
    """JVP of a derived primitive (second-order derivatives): the fallback (XLA) engine's own
    formula differentiated by JAX (its paths are plain, differentiable JAX code).

    Args:
        name: the engine method, ``"tangent"`` or ``"backward"``.

    Returns:
        The JVP rule.
    """

    def rule(primals, tangents, **params):
        # The XLA engine finds winners itself: the record (no tangent) is dropped.
        primals, _ = split_record(primals, params["recorded"])
        tangents, _ = split_record(tangents, params.pop("recorded"))
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        fn = functools.partial(getattr(registry.get(planner.FALLBACK), name),
                               params.pop("problem"))
        extra = tuple(params.values())
        return jax.jvp(lambda *a: fn(*a, *extra), tuple(primals), tuple(tangents))

    return rule


ad.primitive_jvps[conv_p] = _conv_jvp
ad.primitive_jvps[record_p] = _record_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose


def _tangent_jvp(primals, tangents, *, problem, active, recorded):
    """The JVP of `tangent_p` (second order), by the XLA engine's formula."""
    y, ty = _xla_jvp("tangent")(primals, tangents, problem=problem, active=active,
                                recorded=recorded)
    return y, ty


def _backward_jvp(primals, tangents, *, problem, need, recorded):
    """The JVP of `backward_p` (second order), by the XLA engine's formula."""
    outs, touts = _xla_jvp("backward")(primals, tangents, problem=problem, need=need,
                                       recorded=recorded)
    return list(outs), list(touts)


ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_jvps[backward_p] = _backward_jvp

