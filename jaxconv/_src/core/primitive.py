"""The generalized convolution as JAX primitives: their definitions and output types.

A canonical problem (a `Problem`: the op, the geometry, the engine asked for, the
accumulation dtype and the memory bound) travels through JAX's transformations as these
primitives:

- `conv`: `(x, w) -> y`, the product itself;
- `conv_tangent`: `(x, w, y, tx, tw) -> ty`, linear in `(tx, tw)`: forward mode;
- `conv_backward`: `(x, w, y, g) -> (gx, gw)`: the transpose of the tangent: reverse mode;
- `conv_record`: `(x, w) -> (y, record)`: the forward of an engine that records its winners
  (`Engine.records_winners`), bound in place of `conv` when a gradient is taken; the record
  (an int32 array of `y`'s shape) then follows `y` among the tangent's and the backward's
  operands (`recorded=True`).

This module defines them, their abstract evaluation (the output types, also inside
`jax.shard_map` and on meshes with explicit axes) and their eager implementation (JAX's
dispatch, which compiles each primitive once per shape and problem). Their rules live one
idea a module, each importing this one: `lowering` (per platform, by the planner's engine),
`differentiation` (JVP and transpose) and `batching` (`vmap`); `canonical` imports all three,
so every rule is registered before the front end binds a primitive.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import config as _config
from jax._src import core as _core
from jax._src import dispatch
from jax.extend import core as jex_core

from jaxconv._src.core.problem import Problem

Array = jax.Array


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
        (`canonical.canonical_conv` does it).

    Returns:
      `(N, *out_spatial, O)` in `problem.acc_dtype`.
    """
    return conv_p.bind(*same_varying(x, w), problem=problem)


# --- types under jax.shard_map: varying manual axes ----------------------------------------
#
# Inside `jax.shard_map` (with its default `check_vma=True`) every value's type says over
# which manual mesh axes it varies. As lax's primitives do, the operands are first made to
# vary over the union of their axes (`pvary`, whose transpose is the `psum` that sums a
# replicated kernel's per-device gradients), and the outputs vary over that union; each
# gradient has its primal's type.

def same_varying(*args: Array) -> list[Array]:
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


def split_record(args: tuple, recorded: bool) -> tuple[tuple, Any]:
    """The operands of `tangent_p` or `backward_p` without the record, and the record.

    Args:
        args: the operands (or their types, or their mapped axes): ``x, w, y``, the record
            when ``recorded``, then the rest.
        recorded: whether the record follows ``y``.

    Returns:
        ``(args without the record, the record or None)``.
    """
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
    (x, w, y, tx, tw), _ = split_record(args, recorded)
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
