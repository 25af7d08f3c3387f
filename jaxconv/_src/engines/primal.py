"""Evaluate a function with its custom derivative rules removed: the primal computation only.

A kernel body (Pallas on Triton or Mosaic) can lower only plain primitives. A user's
``combine`` may carry a ``jax.custom_vjp`` (AdderNet's rule, a straight-through quantizer
such as ``jaxconv.quantizers.ste_sign``) or a ``jax.custom_jvp`` (``jax.nn.relu``,
``jnp.logaddexp``), which reach the kernel as ``custom_vjp_call`` / ``custom_jvp_call``
equations that no kernel lowering implements. Inside a kernel nothing is differentiated (the
engines supply gradients with their own backward passes, which evaluate the combine's VJP as
a traced jaxpr with this same treatment), so those equations can be replaced by the primal
jaxpr they wrap. `primal` does that: it traces the function to a jaxpr once per call
site and evaluates it equation by equation, inlining the primal of every custom-derivative
call and of nested ``jit`` calls, and rewriting the bodies of control-flow primitives
(``cond``, ``while``, ``scan``) the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

from jaxconv._src.core.jaxpr_walk import iter_eqns

_CUSTOM_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_INLINE_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"})


def _has_custom(jaxpr: Any) -> bool:
    """Whether a jaxpr (or any sub-jaxpr) holds a custom-derivative call.

    Args:
        jaxpr: the jaxpr.

    Returns:
        True if it holds one.
    """
    return any(eqn.primitive.name in _CUSTOM_CALLS for eqn in iter_eqns(jaxpr))


def _strip_closed(cj: Any) -> Any:
    """A ``ClosedJaxpr`` with the same signature, its custom-derivative calls inlined.

    Args:
        cj: the closed jaxpr.

    Returns:
        The closed jaxpr without custom-derivative calls (``cj`` itself if it has none).
    """
    if not _has_custom(cj.jaxpr):
        return cj
    fn = functools.partial(_eval_closed, cj)
    return jax.make_jaxpr(fn)(*cj.in_avals)


def _eval_closed(cj: Any, *args: Any) -> list[Any]:
    """Evaluates a closed jaxpr on ``args`` (for retracing it)."""
    return eval_jaxpr(cj.jaxpr, cj.consts, *args)


def _strip_params(params: dict[str, Any]) -> dict[str, Any]:
    """An equation's parameters with the custom-derivative calls of their jaxprs inlined.

    Args:
        params: the equation's parameters.

    Returns:
        The new parameters.
    """
    new = {}
    for k, v in params.items():
        if isinstance(v, jex_core.ClosedJaxpr):
            v = _strip_closed(v)
        elif isinstance(v, tuple) and v and all(isinstance(s, jex_core.ClosedJaxpr) for s in v):
            v = tuple(_strip_closed(s) for s in v)
        new[k] = v
    return new


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """``jax.core.eval_jaxpr`` that evaluates custom-derivative calls by their primal jaxpr.

    Args:
      jaxpr: an open ``Jaxpr``.
      consts: values of its ``constvars``.
      *args: values of its ``invars`` (arrays or tracers).

    Returns:
      The list of output values.
    """
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        sub = None
        if name in _CUSTOM_CALLS or name in _INLINE_CALLS:
            sub = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
        if sub is not None:
            if isinstance(sub, jex_core.ClosedJaxpr):
                sub_jaxpr, sub_consts = sub.jaxpr, sub.consts
            else:
                sub_jaxpr, sub_consts = sub, ()
            # custom_jvp_call's / custom_vjp_call's primal takes every operand (its consts
            # included) as an input.
            outs = eval_jaxpr(sub_jaxpr, sub_consts, *invals[-len(sub_jaxpr.invars):])
        else:
            params = _strip_params(eqn.params)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def primal(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``fn`` so that it computes its primal only, whatever custom rules it carries.

    The result has the same values as ``fn``; ``jax.custom_vjp`` / ``jax.custom_jvp``
    functions inside it are replaced by the computations they wrap, so the traced program
    holds plain primitives only (what a Pallas kernel body can lower). Differentiating the
    wrapped function gives the primal's own derivative, not the custom rule: use it where
    nothing is differentiated.

    Args:
      fn: a jnp-traceable function of arrays (pytrees allowed).

    Returns:
      A function with ``fn``'s signature and outputs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxconv._src.core import ops
      >>> f = primal(ops.adder.combine)
      >>> "custom_vjp_call" in str(jax.make_jaxpr(f)(jnp.ones(3), jnp.zeros(3)))
      False
    """

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        flat, in_tree = jax.tree_util.tree_flatten(args)
        closed, out_shape = jax.make_jaxpr(
            lambda *leaves: fn(*jax.tree_util.tree_unflatten(in_tree, leaves)),
            return_shape=True)(*flat)
        if not _has_custom(closed.jaxpr):
            return fn(*args)
        outs = eval_jaxpr(closed.jaxpr, closed.consts, *flat)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
