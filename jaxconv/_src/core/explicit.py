"""Products on explicit-axes meshes, partitioned by `jax.shard_map` from their types.

On a mesh whose axes are all `jax.sharding.AxisType.Explicit` ("sharding in types") every
operand's type carries its sharding when the primitive is lowered. Such a call is lowered
as a `jax.shard_map` over that mesh, its specs read from the types -- no
`custom_partitioning` (which fails to compile on multi-device TPUs, jax#38196), so this
works on every platform:

- the batch axis and the output-feature axis (feature groups group-aligned, as
  `partitioning.split_for` decides) pass through: each device runs its engine on its local
  shapes (the native and Pallas kernels on local blocks, the XLA engine's loops and its
  NaN / tie flags per device: no collective in the forward);
- a sharded contraction axis is reduced with the op's own collective
  (`partitioning.device_forward`, `collectives`); a max/min backward as
  `partitioning.device_backward` does it;
- the backward's only collectives are lax's all-reduces: the kernel gradient over the
  batch's axes, the input gradient over the output features' axes;
- what cannot be split (spatial axes, a contraction without a collective, a split that the
  groups do not allow) is gathered first (`jax.sharding.reshard`), and each result is
  resharded to the type the primitive's abstract evaluation gave it (lax's).

Meshes with automatic axes keep `partitioning` (CPU) or JAX's partitioner (GPU / TPU), and
the inside of `jax.shard_map` (the operands vary over manual axes) lowers the engine as is.

Example:
  >>> import jax, numpy as np
  >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  >>> import jaxconv
  >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
  >>> x = jax.device_put(np.ones((2, 5, 1), np.float32), NamedSharding(mesh, P("data")))
  >>> w = np.zeros((3, 1, 4), np.float32)
  >>> with jax.set_mesh(mesh):
  ...     y = jax.jit(lambda a, b: jaxconv.conv_general_dilated(
  ...         a, b, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
  ...         op="max_plus"))(x, w)
  >>> jax.typeof(y).sharding.spec
  P('data', None, None)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxconv._src.core import partitioning

Array = jax.Array


def mesh_of(*types: Any) -> Any:
    """The mesh to partition a call over: the operands' mesh when every one of its axes is
    explicit and no operand varies over manual axes, else ``None``.

    Args:
        *types: the operands' types (``ShapedArray`` with their shardings).

    Returns:
        The abstract mesh, or ``None``.

    Example:
        >>> import jax, numpy as np
        >>> from jaxconv._src.core import explicit
        >>> explicit.mesh_of(jax.typeof(np.ones(3))) is None
        True
    """
    shardings = [getattr(t, "sharding", None) for t in types]
    if any(s is None or not hasattr(s, "mesh") for s in shardings):
        return None
    mesh = shardings[0].mesh
    if (mesh.empty or any(s.mesh != mesh for s in shardings)
            or any(t.mat.varying for t in types)):
        return None
    explicit = jax.sharding.AxisType.Explicit
    if any(kind != explicit for kind in mesh.axis_types):
        return None
    return mesh


def forward(problem: Any, engine: Any, x: Array, w: Array, types: Sequence[Any],
            out_types: Sequence[Any], recording: bool = False) -> Any:
    """`engine.forward` (or `forward_recording`) of a call on an explicit-axes mesh, as one
    `jax.shard_map` over it.

    Args:
        problem: the canonical problem.
        engine: the engine the planner picked for the platform being lowered.
        x: the input.
        w: the kernel.
        types: the operands' types (``mesh_of(*types)`` is not ``None``).
        out_types: the results' types, as the primitive typed them.
        recording: the recording forward: ``(y, record)``, the record split as ``y``.

    Returns:
        The output (``(y, record)`` when ``recording``), sharded as ``out_types``.
    """
    mesh = mesh_of(*types)
    split = partitioning.split_for(problem, engine, mesh, *types[:2])
    lower = partitioning.device_forward(problem, engine, split, recording)
    y = _spec(split.y())
    with jax.sharding.use_abstract_mesh(mesh):
        x = jax.sharding.reshard(x, _spec(split.x()))
        w = jax.sharding.reshard(w, _spec(split.w()))
        outs = jax.shard_map(lower, mesh=mesh, in_specs=(_spec(split.x()), _spec(split.w())),
                             out_specs=(y, y) if recording else y, check_vma=False)(x, w)
        return _retype(outs if recording else (outs,), out_types, recording)


def backward(problem: Any, engine: Any, need: tuple[bool, bool], args: Sequence[Array],
             types: Sequence[Any], out_types: Sequence[Any]) -> list[Array]:
    """`engine.backward` (or `backward_recorded`) of a call on an explicit-axes mesh, as one
    `jax.shard_map` over it: the kernel gradient all-reduced over the batch's axes, the input
    gradient over the output features' axes (lax's all-reduces), nothing else.

    Args:
        problem: the canonical problem.
        engine: the engine the planner picked for the platform being lowered.
        need: which gradients are needed.
        args: ``x, w, y, g`` and, after a recording forward, the record (last).
        types: their types.
        out_types: the gradients' types (the primals').

    Returns:
        ``[gx, gw]``, sharded as ``out_types``.
    """
    mesh = mesh_of(*types[:2])
    split = partitioning.split_for(problem, engine, mesh, *types[:2])
    lower = partitioning.device_backward(problem, engine, split, need)
    specs = (_spec(split.x()), _spec(split.w()), *(_spec(split.y()),) * (len(args) - 2))
    with jax.sharding.use_abstract_mesh(mesh):
        args = [jax.sharding.reshard(a, s) for a, s in zip(args, specs, strict=True)]
        outs = jax.shard_map(lower, mesh=mesh, in_specs=specs, out_specs=specs[:2],
                             check_vma=False)(*args)
        return _retype(outs, out_types, True)


def _spec(sharding: Any) -> P:
    """The ``PartitionSpec`` of a `partitioning.Split`'s sharding."""
    return sharding.spec


def _retype(outs: Sequence[Array], types: Sequence[Any], multiple: bool) -> Any:
    """Each result resharded to its type (a no-op where `shard_map`'s spec is the type's).

    Args:
        outs: the results of the `shard_map`.
        types: their types, as the primitive's abstract evaluation gave them.
        multiple: return a list (else the one result).

    Returns:
        The results.
    """
    outs = [jax.sharding.reshard(o, t.sharding.spec) for o, t in zip(outs, types, strict=True)]
    return outs if multiple else outs[0]
