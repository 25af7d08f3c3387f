"""The batching (`jax.vmap`) rules of the primitives: the mapped axis folds into the problem.

Under `jax.vmap` a primitive folds the mapped axis into its problem, so a vmapped call is one
call of the batched engine: a mapped input folds into the batch; a mapped kernel (an
ensemble, or per-example kernel gradients) folds into feature groups, the input's channels
repeated once per group. Nothing is ever run once per mapped element. Per-example kernel
gradients of the ops whose kernel gradient is standard `lax` products are `jax.vmap` of
those products instead (`_per_example_rule`).

Every operand is one of three kinds: input-like ("x": (N, *S, C)), kernel-like
("w": (*K, I, O)) or output-like ("y": (N, *P, O)).

Importing this module registers the rules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.interpreters import batching

from jaxconv._src.core import engine as registry
from jaxconv._src.core import products
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.primitive import (
    backward_p,
    conv_p,
    record_p,
    split_record,
    tangent_p,
)
from jaxconv._src.core.problem import Problem

Array = jax.Array


def _to_front(a: Array, d: int | None, size: int) -> Array:
    """``a`` with its mapped axis ``d`` first (broadcast to ``size`` if unmapped)."""
    if d is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, d, 0)


def _fold_batch(a: Array) -> Array:
    """`(B, N, ...) -> (N * B, ...)`: the mapped axis joins the batch as its minor part.

    Minor, so that a batch sharded over a mesh stays sharded (its blocks are the major
    part of the folded axis) and each device's call runs on its own images."""
    return jnp.moveaxis(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _fold_groups(a: Array) -> Array:
    """The mapped axis joins the last (channel) axis as its major part: input- and
    output-like `(B, N, *S, C) -> (N, *S, B * C)`, kernel-like `(B, *K, I, O) ->
    (*K, I, B * O)`. With `G` groups before, that is `B * G` groups, element `b`'s first."""
    return jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], a.shape[0] * a.shape[-1])


def _unfold_batch(a: Array, size: int) -> Array:
    """Inverse of `_fold_batch`: ``(size * N, ...) -> (size, N, ...)``."""
    return jnp.moveaxis(a.reshape(a.shape[0] // size, size, *a.shape[1:]), 1, 0)


def _unfold_groups(a: Array, size: int) -> Array:
    """Inverse of `_fold_groups` on an output: ``(..., size * C) -> (size, ..., C)``."""
    return jnp.moveaxis(a.reshape(*a.shape[:-1], size, a.shape[-1] // size), -2, 0)


def _batch_size(args, dims) -> int:
    """The mapped axis's size, from the first mapped operand."""
    return next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)


def _folded_call(args, dims, kinds, out_kinds, by_groups, problem, call):
    """Folds the mapped axis, calls `call(problem', *args')`, unfolds the outputs.

    Args:
        args: the operands.
        dims: each operand's mapped axis, or ``None``.
        kinds: each operand's role, ``"x"``, ``"w"`` or ``"y"`` (kernel-like ones are shared
            when folded into the batch).
        out_kinds: each output's role.
        by_groups: fold into feature groups (else into the batch).
        problem: the canonical problem.
        call: ``call(problem, *operands)`` returning a list of outputs.

    Returns:
        The outputs and their mapped axes.
    """
    size = _batch_size(args, dims)
    front = [_to_front(a, d, size) for a, d in zip(args, dims, strict=True)]
    if by_groups:
        problem = problem.with_groups(problem.geom.groups * size)
        outs = call(problem, *(_fold_groups(a) for a in front))
        return [_unfold_groups(o, size) for o in outs], [0] * len(out_kinds)
    # Folded into the batch, kernel-like operands are shared (never mapped here), and so is
    # a kernel-like output (only produced, unused, where its gradient is not needed).
    folded = [a if k == "w" else _fold_batch(f)
              for a, f, k in zip(args, front, kinds, strict=True)]
    outs = call(problem, *folded)
    kinds_out = list(out_kinds)
    return ([o if k == "w" else _unfold_batch(o, size) for o, k in zip(outs, kinds_out,
                                                                        strict=True)],
            [None if k == "w" else 0 for k in kinds_out])


def _conv_batch(args, dims, *, problem):
    """The batching rule of `conv_p`: a mapped kernel into feature groups, else the batch.

    Args:
        args: ``(x, w)``.
        dims: their mapped axes.
        problem: the canonical problem.

    Returns:
        The output and its mapped axis.
    """
    by_groups = dims[1] is not None
    outs, out_dims = _folded_call(
        args, dims, ("x", "w"), ("y",), by_groups, problem,
        lambda p, x, w: [conv_p.bind(x, w, problem=p)])
    return outs[0], out_dims[0]


def _record_batch(args, dims, *, problem):
    """The batching rule of `record_p`, folded as `_conv_batch` folds (the record is
    output-like; an output's record does not depend on the folding).

    Args:
        args: ``(x, w)``.
        dims: their mapped axes.
        problem: the canonical problem.

    Returns:
        ``[y, record]`` and their mapped axes.
    """
    return _folded_call(args, dims, ("x", "w"), ("y", "y"), dims[1] is not None, problem,
                        lambda p, x, w: record_p.bind(x, w, problem=p))


def _tangent_batch(args, dims, *, problem, active, recorded):
    """The batching rule of `tangent_p`, folded as `_conv_batch` folds.

    Args:
        args: ``(x, w, y, [record], tx, tw)``.
        dims: their mapped axes.
        problem: the canonical problem.
        active: which tangents are not zero.
        recorded: whether the record follows ``y``.

    Returns:
        The output tangent and its mapped axis.
    """
    kinds = ("x", "w", "y", "y", "x", "w") if recorded else ("x", "w", "y", "x", "w")
    by_groups = dims[1] is not None or dims[-1] is not None
    outs, out_dims = _folded_call(
        args, dims, kinds, ("y",), by_groups, problem,
        lambda p, *a: [tangent_p.bind(*a, problem=p, active=active, recorded=recorded)])
    return outs[0], out_dims[0]


def _backward_batch(args, dims, *, problem, need, recorded):
    """The batching rule of `backward_p`.

    A shared kernel whose gradient is needed per element goes through `_per_example_backward`
    where the op allows, else everything is folded into feature groups.

    Args:
        args: ``(x, w, y, [record], g)``.
        dims: their mapped axes.
        problem: the canonical problem.
        need: which gradients are needed.
        recorded: whether the record follows ``y``.

    Returns:
        ``[gx, gw]`` and their mapped axes.
    """
    if dims[1] is None and need[1]:
        per_example = _per_example_rule(problem)
        if per_example is not None:
            # Standard products there: the record is not read.
            args, _ = split_record(args, recorded)
            dims, _ = split_record(dims, recorded)
            return _per_example_backward(args, dims, problem, need, *per_example)
    # The kernel gradient of a mapped problem is per element: group folding keeps it apart.
    by_groups = dims[1] is not None or need[1]
    return _folded_call(
        args, dims, ("x", "w", "y", "y", "y") if recorded else ("x", "w", "y", "y"),
        ("x", "w"), by_groups, problem,
        lambda p, *a: backward_p.bind(*a, problem=p, need=need, recorded=recorded))


def _per_example_rule(problem: Problem):
    """For the ops whose kernel gradient can be written as standard `lax` products (an engine
    may compute the batched one otherwise, as the native engine does adder's): `(fn, both)`,
    `fn(x, w, y, g)` computing the kernel gradient (`both`: the pair `(gx, gw)`) in those
    products; else `None`.

    Per-example kernel gradients (a mapped input, a shared kernel) of these ops are then
    `jax.vmap` of those products, whose kernel gradient is batched as one matrix product per
    tap with the examples as its batch dimension (`products.per_example_kernel_grad`: JAX's own
    batching, a convolution with a feature group per example, is mis-partitioned by XLA
    when the examples are sharded). Folding the examples into feature groups would instead
    run the whole backward pass grouped (measured 20-35x slower on XLA CPU).

    Args:
        problem: the canonical problem.

    Returns:
        ``(fn, both)`` or ``None``.
    """
    if problem.engine != registry.AUTO:
        rule = registry.get(problem.engine).per_example_kernel_gradient(problem)
        if rule is not None:
            return rule.fn, rule.both
    kind = capabilities(problem.op).separable
    floating = problem.dtype is None or jnp.issubdtype(problem.dtype, jnp.floating)
    if kind is not None and floating:
        return (lambda x, w, y, g: products.separable_kernel_gradient(problem, kind, x, w, g),
                False)
    if problem.op.rewrite is not None:  # a rewrite's whole backward is lax products
        return functools.partial(_rewrite_backward, problem), True
    return None


def _rewrite_backward(problem: Problem, x: Array, w: Array, y: Array, g: Array
                      ) -> tuple[Array, Array]:
    """A rewrite's gradients, per example: JAX's, through its standard products, whose kernel
    gradient partitions over sharded examples (`products.rewritten`'s ``per_example``).

    Args:
        problem: the canonical problem.
        x: the input.
        w: the kernel.
        y: the output (unused).
        g: the output's cotangent.

    Returns:
        ``(gx, gw)``.
    """
    del y
    _, vjp = jax.vjp(functools.partial(products.rewritten, problem, per_example=True), x, w)
    gx, gw = vjp(g.astype(problem.acc_dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


def _per_example_backward(args, dims, problem, need, fn, both):
    """The backward pass with a shared kernel whose gradient is kept per mapped element: the
    kernel gradient by `fn` under `jax.vmap`, the input gradient folded into the batch.

    Args:
        args: ``(x, w, y, g)``.
        dims: their mapped axes (the kernel's ``None``).
        problem: the canonical problem.
        need: which gradients are needed.
        fn: the per-example kernel gradient (`_per_example_rule`).
        both: whether ``fn`` returns both gradients.

    Returns:
        ``[gx, gw]`` and their mapped axes.
    """
    x, w, y, g = args
    size = _batch_size(args, dims)
    xf, yf, gf = (_to_front(a, d, size) for a, d in ((x, dims[0]), (y, dims[2]),
                                                      (g, dims[3])))
    mapped = jax.vmap(fn, in_axes=(0, None, 0, 0))(xf, w, yf, gf)
    if both:
        return list(mapped), [0, 0]
    if not need[0]:
        return [jnp.zeros(xf.shape, x.dtype), mapped], [0, 0]
    gx, _ = backward_p.bind(_fold_batch(xf), w, _fold_batch(yf), _fold_batch(gf),
                            problem=problem, need=(True, False), recorded=False)
    return [_unfold_batch(gx, size), mapped], [0, 0]


batching.primitive_batchers[conv_p] = _conv_batch
batching.primitive_batchers[tangent_p] = _tangent_batch
batching.primitive_batchers[backward_p] = _backward_batch
batching.primitive_batchers[record_p] = _record_batch

