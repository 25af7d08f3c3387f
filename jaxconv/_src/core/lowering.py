"""The per-platform lowering of the primitives, by the engine the planner picks.

Each primitive of `jaxconv._src.core.primitive` is lowered, per platform, by the engine that
`jaxconv._src.core.planner` picks for that platform: the platform is the one being lowered
for, so a function cross-lowered for `"cuda"` or `"tpu"` on a CPU host gets the accelerator's
engine. Under a mesh, the calls of engines that declare `Engine.opaque_call` for the platform
(the native and XLA engines on CPU, the Pallas engine on CPU and GPU) are partitioned by
`jaxconv._src.core.partitioning` (each device's call on its local shapes); the others (TPU, the
XLA engine on GPU) are left to JAX's partitioner. On
a mesh whose axes are all explicit, every engine on every platform is lowered as a
`jax.shard_map` read from the operands' types (`jaxconv._src.core.explicit`). Inside
`jax.shard_map` the engines are traced as per-device code (the primitives' abstract
evaluation has already typed the results with the operands' varying mesh axes).

Importing this module registers the lowerings.
"""

from __future__ import annotations

import functools
from typing import Any

from jax._src import core as _core
from jax.interpreters import mlir

from jaxconv._src.core import explicit, partitioning, planner
from jaxconv._src.core.engine import Engine
from jaxconv._src.core.primitive import (
    backward_p,
    conv_p,
    record_p,
    split_record,
    tangent_p,
)

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _custom_call(engine: Engine, platform: str) -> bool:
    """Whether `engine` lowers to a custom call that the SPMD partitioner would replicate
    (declared by the engine: `Engine.opaque_call`): such calls are partitioned by
    `partitioning`."""
    return engine.opaque_call(platform)


def _forward_impl(x, w, *, problem, platform, recording=False):
    """The forward on ``platform``: the engine's, or its custom call with the SPMD rule.

    Args:
        x: the input.
        w: the kernel.
        problem: the canonical problem.
        platform: the platform being lowered for.
        recording: the recording forward (an engine that does not record gives an empty
            record).

    Returns:
        The output, or ``[y, record]`` when ``recording``.
    """
    engine = planner.engine_for(problem, platform)
    if _custom_call(engine, platform):
        run = partitioning.forward_recording if recording else partitioning.forward
        out = run(problem, engine, x, w)
    else:
        out = (engine.forward_recording if recording else engine.forward)(problem, x, w)
    return list(out) if recording else out


def _tangent_impl(*args, problem, active, recorded, platform):
    """The tangent (forward mode) on ``platform``, by the engine the planner picks (the
    record is not needed there)."""
    (x, w, y, tx, tw), _ = split_record(args, recorded)
    return planner.engine_for(problem, platform).tangent(problem, x, w, y, tx, tw, active)


def _backward_impl(*args, problem, need, recorded, platform):
    """The backward on ``platform``: the engine's, or its custom call with the SPMD rule.

    Args:
        *args: the input, the kernel, the output, the record (when ``recorded``) and the
            output's cotangent.
        problem: the canonical problem.
        need: which gradients are needed, ``(input, kernel)``.
        recorded: whether the recording forward's record is among ``args``.
        platform: the platform being lowered for.

    Returns:
        ``[gx, gw]``.
    """
    (x, w, y, g), record = split_record(args, recorded)
    engine = planner.engine_for(problem, platform)
    if _custom_call(engine, platform):
        gx, gw = partitioning.backward(problem, engine, x, w, y, g, need, record)
    elif record is not None:
        gx, gw = engine.backward_recorded(problem, x, w, y, record, g, need)
    else:
        gx, gw = engine.backward(problem, x, w, y, g, need)
    return [gx, gw]


def _forward_explicit(x, w, *, problem, platform, types, out_types, recording=False):
    """The forward on an explicit-axes mesh: one `jax.shard_map` read from the types.

    Args:
        x: the input.
        w: the kernel.
        problem: the canonical problem.
        platform: the platform being lowered for.
        types: the operands' types.
        out_types: the output's type (with the record's, when ``recording``).
        recording: the recording forward.

    Returns:
        The output, or ``[y, record]`` when ``recording``.
    """
    out = explicit.forward(problem, planner.engine_for(problem, platform), x, w, types,
                           out_types, recording=recording)
    return list(out) if recording else out


def _backward_explicit(*args, problem, need, recorded, platform, types, out_types):
    """The backward on an explicit-axes mesh (see `_forward_explicit`).

    Args:
        *args: the input, the kernel, the output, the record (when ``recorded``) and the
            output's cotangent.
        problem: the canonical problem.
        need: which gradients are needed, ``(input, kernel)``.
        recorded: whether the recording forward's record is among ``args``.
        platform: the platform being lowered for.
        types: the operands' types.
        out_types: the gradients' types.

    Returns:
        ``[gx, gw]``.
    """
    (x, w, y, g), record = split_record(args, recorded)
    (tx, tw, ty, tg), trecord = split_record(types, recorded)
    operands, operand_types = [x, w, y, g], [tx, tw, ty, tg]
    if recorded:
        operands.append(record)
        operand_types.append(trecord)
    return explicit.backward(problem, planner.engine_for(problem, platform), need, operands,
                             operand_types, out_types)


def _plain(aval: Any) -> Any:
    """``aval`` without varying manual axes or a sharding."""
    return _core.ShapedArray(aval.shape, aval.dtype, aval.weak_type)


def _per_device(impl, multiple_results: bool, explicit_impl=None):
    """The lowering of `impl`, traced on plain per-device types.

    Inside `jax.shard_map` the operands' types say over which manual axes they vary; the
    engines' loops start from constants (invariant) and update them with the operands
    (varying), a difference only that typing sees, and the primitive's own abstract
    evaluation has already typed its results. So the engine is traced as per-device code on
    types without varying axes (or shardings). On a mesh whose axes are all explicit the
    operands' types say how they are sharded: `explicit_impl` lowers the call as a
    `jax.shard_map` read from them (`jaxconv._src.core.explicit`).

    Args:
        impl: the implementation, ``impl(*args, platform=..., **params)``.
        multiple_results: whether it returns a list.
        explicit_impl: the implementation on explicit-axes meshes, ``explicit_impl(*args,
            platform=..., types=..., out_types=..., **params)``, or ``None``.

    Returns:
        The MLIR lowering rule.
    """
    lower = mlir.lower_fun(impl, multiple_results=multiple_results)

    def rule(ctx, *args, **params):
        outs = ctx.avals_out
        if explicit_impl is not None and explicit.mesh_of(*ctx.avals_in[:2]) is not None:
            run = functools.partial(explicit_impl, types=tuple(ctx.avals_in),
                                    out_types=tuple(outs))
            return mlir.lower_fun(run, multiple_results=multiple_results)(ctx, *args, **params)
        ctx = ctx.replace(avals_in=[_plain(a) for a in ctx.avals_in],
                          avals_out=None if outs is None else [_plain(a) for a in outs])
        return lower(ctx, *args, **params)

    return rule


_RULES = (  # (primitive, implementation, on explicit meshes, keyword arguments, multiple)
    (conv_p, _forward_impl, _forward_explicit, {}, False),
    (record_p, _forward_impl, _forward_explicit, {"recording": True}, True),
    (tangent_p, _tangent_impl, None, {}, False),
    (backward_p, _backward_impl, _backward_explicit, {}, True),
)
for _platform in PLATFORMS:
    for _prim, _impl, _explicit, _kw, _multiple in _RULES:
        mlir.register_lowering(
            _prim, _per_device(
                functools.partial(_impl, platform=_platform, **_kw), _multiple,
                None if _explicit is None
                else functools.partial(_explicit, platform=_platform, **_kw)),
            platform=_platform)
