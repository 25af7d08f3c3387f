"""The generalized convolution as JAX primitives: one interface for every engine.

A canonical problem (a `Problem`: the op, the geometry, the engine asked for, the
accumulation dtype and the memory bound) travels through JAX's transformations as three
primitives:

- `conv`: `(x, w) -> y`, the product itself;
- `conv_tangent`: `(x, w, y, tx, tw) -> ty`, linear in `(tx, tw)`: forward mode;
- `conv_backward`: `(x, w, y, g) -> (gx, gw)`: the transpose of the tangent: reverse mode;
- `conv_record`: `(x, w) -> (y, record)`: the forward of an engine that records its winners
  (`Engine.records_winners`), bound in place of `conv` when a gradient is taken.

When the engine that the default backend would run records its winners (the native engine's
dense max/min products), `conv`'s JVP binds `conv_record` instead of `conv` and passes the
record (an int32 array of `y`'s shape) to the tangent and so to its transpose, the backward,
as one more operand (`recorded=True`): under `jax.grad` the recording forward runs once and
the record is a residual; the plain forward (no derivative) never records.

`conv`'s JVP rule returns `y` and a `conv_tangent`; `jax.grad` transposes that tangent into a
`conv_backward`. So `jax.jvp`, `jax.linearize`, `jax.jacfwd`, `jax.grad` and `jax.vjp` all
work with `jit` inside or outside, and each mode runs the engine's own rule (the hand-written
backward passes are never differentiated by JAX).

Under `jax.vmap` a primitive folds the mapped axis into its problem, so a vmapped call is one
call of the batched engine: a mapped input folds into the batch; a mapped kernel (an
ensemble, or per-example kernel gradients) folds into feature groups, the input's channels
repeated once per group. Nothing is ever run once per mapped element.

Each primitive is lowered, per platform, by the engine that `jaxconv._src.core.planner`
picks for that platform: the platform is the one being lowered for, so a function
cross-lowered for `"cuda"` or `"tpu"` on a CPU host gets the accelerator's engine. Under
a mesh, the calls of engines that declare `Engine.opaque_call` for the platform (the native
and XLA engines on CPU) are partitioned by `jaxconv._src.core.partitioning` (each device's
call on its local shapes); accelerator programs are left to JAX's partitioner. On a mesh
whose axes are all explicit, every engine on every platform is lowered as a `jax.shard_map`
read from the operands' types (`jaxconv._src.core.explicit`). Inside
`jax.shard_map` the primitives type their results with the operands' varying mesh axes.
Eager calls go through JAX's primitive dispatch, which compiles each primitive once per
shape and problem and reuses it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import ad_util, dispatch
from jax._src import config as _config
from jax._src import core as _core
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from jaxconv._src.core import algebra, explicit, factoring, partitioning, planner, products
from jaxconv._src.core import engine as registry
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.engine import Engine
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import DEFAULT_MAX_BLOCK_BYTES, Problem

Array = jax.Array

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _engine(problem: Problem, platform: str) -> Engine:
    """The engine the planner picks for ``problem`` on ``platform``."""
    return planner.engine_for(problem, platform)


def _out_shape(problem: Problem, x_shape: tuple[int, ...], w_shape: tuple[int, ...]):
    """The output's shape ``(N, *out_spatial, O)``."""
    return (x_shape[0], *problem.geom.out_spatial, w_shape[-1])


# --- the primitives ------------------------------------------------------------------------

conv_p = jex_core.Primitive("jaxconv_conv")
tangent_p = jex_core.Primitive("jaxconv_conv_tangent")
backward_p = jex_core.Primitive("jaxconv_conv_backward")
backward_p.multiple_results = True
record_p = jex_core.Primitive("jaxconv_conv_record")
record_p.multiple_results = True


def conv(x: Array, w: Array, problem: Problem) -> Array:
    """The generalized convolution of canonical `x` and `w`, as the `conv` primitive.

    Args:
      x: `(N, *spatial, C)` input.
      w: `(*window, I, O)` kernel.
      problem: the problem (op, geometry, engine asked, dtypes); no factoring is done here
        (`canonical_conv` does it).

    Returns:
      `(N, *out_spatial, O)` in `problem.acc_dtype`.
    """
    return conv_p.bind(*_same_varying(x, w), problem=problem)


# --- types under jax.shard_map: varying manual axes ----------------------------------------
#
# Inside `jax.shard_map` (with its default `check_vma=True`) every value's type says over
# which manual mesh axes it varies. As lax's primitives do, the operands are first made to
# vary over the union of their axes (`pvary`, whose transpose is the `psum` that sums a
# replicated kernel's per-device gradients), and the outputs vary over that union; each
# gradient has its primal's type.

def _same_varying(*args: Array) -> list[Array]:
    """`args`, each cast to vary over the union of the manual axes any of them varies over.

    Args:
        *args: the operands of one primitive.

    Returns:
        The operands, each varying over the same manual axes (unchanged without that check).
    """
    if not _config._check_vma.value:
        return list(args)
    vmas = [_core.typeof(a).mat.varying for a in args]
    union = frozenset().union(*vmas)
    if not union:
        return list(args)
    return [a if vma == union else _core.pvary(a, tuple(n for n in union if n not in vma))
            for a, vma in zip(args, vmas, strict=True)]


def _out_aval(shape: tuple[int, ...], dtype: Any, *operands: Any) -> Any:
    """The output type: varying over the operands' manual axes, else unsharded in type.

    Args:
        shape: the output's shape.
        dtype: the output's dtype.
        *operands: the primitive's operand types.

    Returns:
        The output's ``ShapedArray``.
    """
    vma = frozenset().union(*(a.mat.varying for a in operands))
    if not vma:
        return _core.ShapedArray(shape, dtype)
    ref = next(a for a in operands if a.mat.varying)
    return _core.ShapedArray(shape, dtype, sharding=_core.get_cur_mesh_sharding(),
                             manual_axis_type=ref.mat.update(varying=vma))


def _explicit_spec(x: Any, w: Any) -> Any:
    """On a mesh with explicit axes, the output's spec as lax's convolution types it: the
    input's batch axes and the kernel's output-feature axes (`None`: not typed sharded).

    Args:
        x: the input's type.
        w: the kernel's type.

    Returns:
        The output's ``PartitionSpec``, or ``None``.
    """
    mesh = x.sharding.mesh
    if mesh.empty or not mesh.explicit_axes or x.mat.varying:
        return None
    from jax.sharding import PartitionSpec  # noqa: PLC0415

    xs, ws = tuple(x.sharding.spec), tuple(w.sharding.spec)
    batch = xs[0] if xs else None
    out = ws[w.ndim - 1] if len(ws) == w.ndim else None
    return PartitionSpec(batch, *(None,) * (x.ndim - 2), out)


def _conv_abstract(x, w, *, problem):
    """The abstract evaluation of `conv_p`.

    Args:
        x: the input's type.
        w: the kernel's type.
        problem: the canonical problem.

    Returns:
        The output's type, in the accumulation dtype.
    """
    shape = _out_shape(problem, x.shape, w.shape)
    spec = _explicit_spec(x, w)
    if spec is not None:
        return _core.ShapedArray(shape, problem.acc_dtype,
                                 sharding=_core.get_cur_mesh_sharding(spec))
    return _out_aval(shape, problem.acc_dtype, x, w)


def _record_abstract(x, w, *, problem):
    """The abstract evaluation of `record_p`: the output's type and the record's (int32).

    Args:
        x: the input's type.
        w: the kernel's type.
        problem: the canonical problem.

    Returns:
        ``[y, record]``.
    """
    y = _conv_abstract(x, w, problem=problem)
    return [y, y.update(dtype=jnp.dtype(jnp.int32), weak_type=False)]


def _split_record(args: tuple, recorded: bool) -> tuple[tuple, Any]:
    """The operands without the record (after `y`, the third) and the record, or ``None``."""
    if not recorded:
        return tuple(args), None
    return (*args[:3], *args[4:]), args[3]


def _tangent_abstract(*args, problem, active, recorded):
    """The abstract evaluation of `tangent_p`: the output's type.

    Args:
        *args: the types of ``x, w, y, [record], tx, tw``.
        problem: the canonical problem.
        active: which of the tangents are not zero.
        recorded: whether the record of a recording forward follows ``y``.

    Returns:
        The output tangent's type.
    """
    del problem, active
    (x, w, y, tx, tw), _ = _split_record(args, recorded)
    if _explicit_spec(x, w) is not None:
        return y.update(weak_type=False)
    return _out_aval(y.shape, y.dtype, x, w, y, tx, tw)


def _backward_abstract(*args, problem, need, recorded):
    """The abstract evaluation of `backward_p`: the operands' types.

    Args:
        *args: the types of ``x, w, y, [record], g``.
        problem: the canonical problem.
        need: which gradients are needed.
        recorded: whether the record of a recording forward follows ``y``.

    Returns:
        The types of the input's and the kernel's gradients.
    """
    del problem, need, recorded
    x, w = args[0], args[1]
    return [x.update(weak_type=False), w.update(weak_type=False)]


conv_p.def_abstract_eval(_conv_abstract)
tangent_p.def_abstract_eval(_tangent_abstract)
backward_p.def_abstract_eval(_backward_abstract)
record_p.def_abstract_eval(_record_abstract)
for _p in (conv_p, tangent_p, backward_p, record_p):
    _p.def_impl(functools.partial(dispatch.apply_primitive, _p))
# A native call is lowered through `custom_partitioning`, which needs the devices to lower.
dispatch.prim_requires_devices_during_lowering.update((conv_p, backward_p, record_p))


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
        engine = _engine(problem, platform)
    except ValueError:
        return False
    return engine.records_winners(problem, platform)


def _custom_call(engine: Engine, platform: str) -> bool:
    """Whether `engine` lowers to a custom call that the SPMD partitioner would replicate
    (declared by the engine: `Engine.opaque_call`): such calls are partitioned by
    `partitioning`."""
    return engine.opaque_call(platform)


def _forward_impl(x, w, *, problem, platform):
    """The forward on ``platform``: the engine's, or its custom call with the SPMD rule.

    Args:
        x: the input.
        w: the kernel.
        problem: the canonical problem.
        platform: the platform being lowered for.

    Returns:
        The output.
    """
    engine = _engine(problem, platform)
    if _custom_call(engine, platform):
        return partitioning.forward(problem, engine, x, w)
    return engine.forward(problem, x, w)


def _record_impl(x, w, *, problem, platform):
    """The recording forward on ``platform`` (an engine that does not record gives an
    empty record).

    Args:
        x: the input.
        w: the kernel.
        problem: the canonical problem.
        platform: the platform being lowered for.

    Returns:
        ``[y, record]``.
    """
    engine = _engine(problem, platform)
    if _custom_call(engine, platform):
        return list(partitioning.forward_recording(problem, engine, x, w))
    return list(engine.forward_recording(problem, x, w))


def _tangent_impl(*args, problem, active, recorded, platform):
    """The tangent (forward mode) on ``platform``, by the engine the planner picks (the
    record is not needed there)."""
    (x, w, y, tx, tw), _ = _split_record(args, recorded)
    return _engine(problem, platform).tangent(problem, x, w, y, tx, tw, active)


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
    (x, w, y, g), record = _split_record(args, recorded)
    engine = _engine(problem, platform)
    if _custom_call(engine, platform):
        gx, gw = partitioning.backward(problem, engine, x, w, y, g, need, record)
    elif record is not None:
        gx, gw = engine.backward_recorded(problem, x, w, y, record, g, need)
    else:
        gx, gw = engine.backward(problem, x, w, y, g, need)
    return [gx, gw]


def _forward_explicit(x, w, *, problem, platform, types, out_types):
    """The forward on an explicit-axes mesh: one `jax.shard_map` read from the types.

    Args:
        x: the input.
        w: the kernel.
        problem: the canonical problem.
        platform: the platform being lowered for.
        types: the operands' types.
        out_types: the output's type.

    Returns:
        The output.
    """
    return explicit.forward(problem, _engine(problem, platform), x, w, types, out_types)


def _record_explicit(x, w, *, problem, platform, types, out_types):
    """The recording forward on an explicit-axes mesh (see `_forward_explicit`).

    Args:
        x: the input.
        w: the kernel.
        problem: the canonical problem.
        platform: the platform being lowered for.
        types: the operands' types.
        out_types: the types of the output and the record.

    Returns:
        ``[y, record]``.
    """
    return explicit.forward(problem, _engine(problem, platform), x, w, types, out_types,
                            recording=True)


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
    (x, w, y, g), record = _split_record(args, recorded)
    (tx, tw, ty, tg), trecord = _split_record(types, recorded)
    operands, operand_types = [x, w, y, g], [tx, tw, ty, tg]
    if recorded:
        operands.append(record)
        operand_types.append(trecord)
    return explicit.backward(problem, _engine(problem, platform), need, operands,
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


for _platform in PLATFORMS:
    mlir.register_lowering(
        conv_p, _per_device(functools.partial(_forward_impl, platform=_platform), False,
                            functools.partial(_forward_explicit, platform=_platform)),
        platform=_platform)
    mlir.register_lowering(
        tangent_p, _per_device(functools.partial(_tangent_impl, platform=_platform), False),
        platform=_platform)
    mlir.register_lowering(
        backward_p, _per_device(functools.partial(_backward_impl, platform=_platform), True,
                                functools.partial(_backward_explicit, platform=_platform)),
        platform=_platform)
    mlir.register_lowering(
        record_p, _per_device(functools.partial(_record_impl, platform=_platform), True,
                              functools.partial(_record_explicit, platform=_platform)),
        platform=_platform)


# --- differentiation -------------------------------------------------------------------------

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
    return tangent_p.bind(*_same_varying(x, w, y, *rec, ad.instantiate_zeros(tx),
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
    (x, w, y, tx, tw), record = _split_record(args, recorded)
    primals = (x, w, y) if record is None else (x, w, y, record)
    if any(ad.is_undefined_primal(a) for a in primals):
        raise ValueError("jaxconv: the tangent of a convolution is linear in its tangents only.")
    need = (ad.is_undefined_primal(tx), ad.is_undefined_primal(tw))
    zeros = [ad.Zero(tx.aval) if need[0] else None, ad.Zero(tw.aval) if need[1] else None]
    nones = [None] * len(primals)
    if type(ct) is ad.Zero or not any(need):
        return [*nones, *zeros]
    rec = () if record is None else (record,)
    gx, gw = backward_p.bind(*_same_varying(x, w, y, *rec, ct), problem=problem, need=need,
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
        primals, _ = _split_record(primals, params["recorded"])
        tangents, _ = _split_record(tangents, params.pop("recorded"))
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


# --- batching: fold the mapped axis into the problem ------------------------------------------
#
# Every operand is one of three kinds: input-like ("x": (N, *S, C)), kernel-like
# ("w": (*K, I, O)) or output-like ("y": (N, *P, O)).

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
            args, _ = _split_record(args, recorded)
            dims, _ = _split_record(dims, recorded)
            return _per_example_backward(args, dims, problem, need, *per_example)
    # The kernel gradient of a mapped problem is per element: group folding keeps it apart.
    by_groups = dims[1] is not None or need[1]
    return _folded_call(
        args, dims, ("x", "w", "y", "y", "y") if recorded else ("x", "w", "y", "y"),
        ("x", "w"), by_groups, problem,
        lambda p, *a: backward_p.bind(*a, problem=p, need=need, recorded=recorded))


def _per_example_rule(problem: Problem):
    """For the ops whose kernel gradient is standard `lax` products on every engine: `(fn,
    both)`, `fn(x, w, y, g)` computing the kernel gradient (`both`: the pair `(gx, gw)`) in
    those products; else `None`.

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
    kind = algebra.capabilities(problem.op).separable
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


def _hashable_precision(precision: Any) -> Any:
    """``precision`` as a hashable value (a list becomes a tuple)."""
    if isinstance(precision, list):
        return tuple(precision)
    return precision


def canonical_conv(
    x: Array,
    w: Array,
    geom: Geometry,
    op: Op,
    *,
    engine: str = "auto",
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
    precision: Any = None,
) -> Array:
    """The generalized convolution of canonical operands, by the engine the planner picks.

    Args:
      x: `(N, *spatial, C)` input.
      w: `(*window, C // groups, O)` kernel.
      geom: the static geometry (padding resolved to pairs).
      op: the product.
      engine: `"auto"` or a registered engine (`"xla"`, `"native"`, `"pallas"`).
      preferred_element_type: accumulation and output dtype, as in `lax`.
      max_block_bytes: bound on the bytes of intermediate tiles (default 64 MiB).
      precision: the `lax` precision of native products.

    Returns:
      `(N, *out_spatial, O)` in the output dtype (`preferred_element_type`, else the
      operands' common dtype), after `op.post`.
    """
    dtype = jnp.result_type(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    out_dtype = dtype if preferred_element_type is None else jnp.dtype(preferred_element_type)
    acc_dtype = jnp.dtype(algebra.accumulation_dtype(op, dtype, preferred_element_type))
    n, o = x.shape[0], w.shape[-1]
    if n == 0 or o == 0:
        return jnp.zeros((n, *geom.out_spatial, o), out_dtype)
    mbb = DEFAULT_MAX_BLOCK_BYTES if max_block_bytes is None else int(max_block_bytes)
    form = factoring.factored_form(op.replace(post=None), dtype)
    inner = op.replace(post=None) if form is None else form.inner
    if form is not None and form.lhs_map is not None:
        x = form.lhs_map(x)
    if form is not None and form.rhs_map is not None:
        w = form.rhs_map(w)
    problem = Problem(inner, geom, engine, acc_dtype, mbb, _hashable_precision(precision),
                      jnp.dtype(dtype))
    if engine not in (registry.AUTO, planner.FALLBACK):
        planner.check_engine(problem, dtype)
    y = conv(x, w, problem)
    if form is not None and form.outer is not None:
        y = _apply_outer(y, form.outer, op, geom)
    if op.post is not None:
        y = op.post(y)
    return y.astype(out_dtype)


def _apply_outer(y: Array, outer: Any, op: Op, geom: Geometry) -> Array:
    """`outer(y)`, keeping the reduce's identity on windows that read no input cell.

    Args:
        y: the reduced output.
        outer: the monotone map applied after the reduce.
        op: the op (its identity and pad value).
        geom: the product's geometry.

    Returns:
        ``outer(y)``, the identity at empty windows.
    """
    out = outer(y)
    empty = geom.empty_windows() if op.pad_value is None else None
    if empty is None:
        return out
    mask = jnp.asarray(empty).reshape(1, *empty.shape, 1)
    return jnp.where(mask, algebra.identity_value(op, y.dtype), out)
