"""SPMD partitioning of engines that are custom calls (the native CPU engine).

A custom call is opaque to JAX's SPMD partitioner (Shardy or GSPMD): left alone it is
replicated (every operand all-gathered, every device computing the whole batch) -- and its
geometry, the batch size included, is baked into its attributes, so it must be lowered again
on each device's local shapes. `forward` and `backward` wrap an engine's call in
`jax.experimental.custom_partitioning`:

- the batch axis and the output-feature axis pass through: each device runs the engine on its
  own images and output features, with no collective in the forward;
- with feature groups the output features are split group-aligned (the input channels with
  them); where the output features' axes are a multiple of the groups (2 groups over 8
  devices), each device takes its group's channels of the whole input; other splits are
  gathered. The Shardy rule is chosen on the mesh (`_compound_safe`): Shardy would cut an
  axis that only partly fits the groups into a sub-axis, which `custom_partitioning` cannot
  express;
- the backward's collectives are lax's all-reduces: the kernel gradient is summed over the
  batch's mesh axes, the input gradient (one group) over the output features' axes;
- a sharded contraction axis (the input channels, one group) is reduced across devices with
  the op's own reduce (`collectives`: `psum`, `pmax` / `pmin` on order-preserving integer
  keys, a stable logsumexp combine): each device's call runs on its own channels and the
  forward's only collective is that all-reduce. The backward of a sum needs nothing more
  (each device's gradients are those of its channels); a max/min backward recomputes each
  device's partial result, counts the devices that hold the winner (an integer all-reduce),
  runs each device's backward on the outputs it wins (any engine) and, only where some
  output's winners sit on several devices, gathers the channels for that backward
  (`lax.cond`), so that ties split exactly as on one device. A reduce with no
  collective (`prod`, a user's callable) and grouped convolutions gather the axis;
- spatial axes are gathered (correct, not partitioned).

Engines that declare it (`Engine.opaque_call`: the native engine and the XLA engine on CPU,
the Pallas engine on CPU and GPU) go through here; TPU programs never contain a
`custom_partitioning` call (jax#38196), and the XLA engine on GPU / TPU is partitioned by the
partitioner itself.
A logsumexp contraction is reduced across devices only for an engine whose backward reads
the global `y` (`Engine.backward_reads_output`); otherwise it is gathered.
A single device and the inside of `jax.shard_map` (every axis manual) lower the engine
directly; meshes whose axes are all explicit are split the same way by `explicit` (a
`jax.shard_map` over `device_forward` / `device_backward`, on every platform).

The interface is two functions, `forward` and `backward`, with an engine that has the core's
protocol (`jaxconv._src.core.engine.Engine`) and declares its custom call
(`Engine.opaque_call`).

Example:
  >>> import jax, numpy as np
  >>> from jaxconv import ops
  >>> from jaxconv._src.core import engine, partitioning
  >>> from jaxconv._src.core.geometry import Geometry
  >>> from jaxconv._src.core.problem import Problem
  >>> geom = Geometry((4,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
  >>> p = Problem(ops.max_plus, geom, "native", np.dtype("float32"), 2**20)
  >>> x, w = jax.numpy.ones((2, 4, 1)), jax.numpy.zeros((2, 1, 3))
  >>> partitioning.forward(p, engine.get("native"), x, w).shape
  (2, 3, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxconv._src.core import collectives

Array = jax.Array


def forward(problem: Any, engine: Any, x: Array, w: Array) -> Array:
    """`engine.forward(problem, x, w)`, partitioned over batch and output features.

    Args:
        problem: the canonical problem.
        engine: the engine (an opaque custom call on this platform).
        x: the input.
        w: the kernel.

    Returns:
        The output.
    """
    return _forward_fn(problem, engine, x.shape, w.shape)(x, w)


def forward_recording(problem: Any, engine: Any, x: Array, w: Array) -> tuple[Array, Array]:
    """`engine.forward_recording(problem, x, w)`, partitioned as `forward`: the record is
    split as the output. With a sharded contraction nothing is recorded (an empty record:
    each device's record would describe its partial result, not the output it is typed as).

    Args:
        problem: the canonical problem.
        engine: the engine.
        x: the input.
        w: the kernel.

    Returns:
        ``(y, record)``.
    """
    return _forward_fn(problem, engine, x.shape, w.shape, True)(x, w)


def backward(problem: Any, engine: Any, x: Array, w: Array, y: Array, g: Array,
             need: tuple[bool, bool], record: Array | None = None) -> tuple[Array, Array]:
    """`engine.backward(problem, x, w, y, g, need)`, partitioned as `forward` (the kernel
    gradient all-reduced over the batch's axes, the input gradient over the output
    features' axes); with the recording forward's `record`, `engine.backward_recorded`.

    Args:
        problem: the canonical problem.
        engine: the engine.
        x: the input.
        w: the kernel.
        y: the forward's output.
        g: its cotangent.
        need: which gradients are needed.
        record: the record of `forward_recording`, or ``None``.

    Returns:
        ``(gx, gw)``.
    """
    if record is None:
        return _backward_fn(problem, engine, need, x.shape, w.shape)(x, w, y, g)
    return _backward_fn(problem, engine, need, x.shape, w.shape, True)(x, w, y, g, record)


# --- the sharding rule -----------------------------------------------------------------------

def _factors(nsd: int, groups: int, shape_w: tuple[int, ...],
             compound: bool = True) -> tuple[str, str, str, dict]:
    """Shardy's einsum-like factors of `x`, `w`, `y` and the compound factors' sizes.

    With `compound` (and feature groups) the channel dimensions are written as (groups,
    within-group) factors, so that a group-aligned sharding propagates between `x`'s
    channels and the output features; without, `x`'s channels are one factor `c` and the
    output features one factor `o` (see `_compound_safe`).

    Args:
        nsd: the number of spatial dimensions.
        groups: the number of feature groups.
        shape_w: the kernel's shape.
        compound: whether to write grouped channels as (groups, within-group) factors.

    Returns:
        The factors of ``x``, ``w`` and ``y``, and the sizes of the compound factors.
    """
    s = " ".join(f"s{d}" for d in range(nsd))
    k = " ".join(f"k{d}" for d in range(nsd))
    p = " ".join(f"p{d}" for d in range(nsd))
    if groups == 1:
        cx, cw, co, sizes = "i", "i o", "o", {}
    elif not compound:
        cx, cw, co, sizes = "c", "i o", "o", {}
    else:
        # Shardy refuses a compound dimension with a factor of size 1 (depthwise: one
        # input channel, or one output feature, per group).
        i, q = shape_w[-2], shape_w[-1] // groups
        cx = "(g i)" if i > 1 else "g"
        co = "(g q)" if q > 1 else "g"
        cw = f"i {co}"
        # Sizes for the factors that are never a whole dimension.
        sizes = {"g": groups} if i > 1 and q > 1 else {}
        if q > 1:
            sizes["q"] = q
    join = lambda *parts: " ".join(q for q in parts if q)  # noqa: E731
    return join("n", s, cx), join(k, cw), join("n", p, co), sizes


def _compound_safe(mesh: Any, groups: int) -> bool:
    """Whether Shardy can map any sharding of a (groups, within-group) dimension onto whole
    mesh axes.

    Shardy gives a compound dimension's axes to its major factor (the groups) while they
    divide it, and cuts an axis that only partly fits into sub-axes (2 groups sharded over 8
    devices: a sub-axis of size 2) -- which `custom_partitioning` (jax 0.10) cannot express
    as a `PartitionSpec` and fails on. So on a mesh where some order of its axes would be
    cut, the rule does not tie the channels to the groups (`_factors(compound=False)`);
    the partition then splits what divides (`Split.subgroups`) and gathers the rest.

    Args:
        mesh: the mesh the call is lowered for.
        groups: the number of feature groups.

    Returns:
        True when no order of the mesh's axes would cut one into a sub-axis.
    """
    sizes = [n for n in (getattr(mesh, "shape", None) or {}).values() if n > 1]
    for r in range(1, len(sizes) + 1):
        for order in itertools.permutations(sizes, r):
            left = groups
            for n in order:
                if left % n == 0:
                    left //= n
                elif math.gcd(left, n) > 1:
                    return False
                else:
                    break
    return True


def _rule(nsd: int, groups: int, w_shape: tuple[int, ...], backward: bool,
          reduce_contraction: bool, recorded: bool = False) -> Any:
    """The Shardy rule of a call, chosen on the mesh the call is lowered for.

    Args:
        nsd: the number of spatial dimensions.
        groups: the number of feature groups.
        w_shape: the kernel's shape.
        backward: whether the call is the backward (``x, w, y, g -> gx, gw``).
        reduce_contraction: whether the contraction is reduced across devices.
        recorded: whether a record shaped as the output follows (the recording forward's
            second result, the backward's fifth operand).

    Returns:
        A function of ``(mesh, value_types, result_types)`` giving the rule's text and its
        factor options.
    """
    def rule(mesh: Any, value_types: Any, result_types: Any) -> tuple[str, dict]:
        del value_types, result_types
        xf, wf, yf, sizes = _factors(nsd, groups, w_shape, _compound_safe(mesh, groups))
        rec = f", {yf}" if recorded else ""
        text = (f"{xf}, {wf}, {yf}, {yf}{rec} -> {xf}, {wf}" if backward
                else f"{xf}, {wf} -> {yf}{rec}")
        need = _replicated_factors(text, reduce_contraction)
        return text, dict(need_replication_factors=need, **sizes)

    return rule


def _replicated_factors(rule: str, reduce_contraction: bool) -> tuple[str, ...]:
    """The factors each device needs whole (spatial, window, the contraction unless it is
    reduced across devices; within-group output features), in the order they first appear
    in `rule` (Shardy wants them sorted).

    Args:
        rule: the Shardy rule.
        reduce_contraction: whether the contraction is reduced across devices.

    Returns:
        The factor names.
    """
    seen: list[str] = []
    whole = "skpq" if reduce_contraction else "skpiq"
    for token in rule.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if token not in seen and token[0] in whole:
            seen.append(token)
    return tuple(seen)


# --- choosing each device's part ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Split:
    """How a call is split: the mesh axes of the batch, of the output features and of the
    contraction (input channels of one group; `None`: not split), the local number of groups
    and the mesh."""

    mesh: Any
    batch: Any
    out: Any
    groups: int
    nsd: int
    contract: Any = None

    def x(self) -> NamedSharding:
        """The input's sharding: batch, and the output features' axes when whole groups are
        split, none when parts of groups are, else the contraction's.
        """
        channels = self.out if self.groups_split else None if self.subgroups else self.contract
        return self._named(self.batch, *(None,) * self.nsd, channels)

    def w(self) -> NamedSharding:
        """The kernel's sharding: contraction and output features."""
        return self._named(*(None,) * self.nsd, self.contract, self.out)

    def y(self) -> NamedSharding:
        """The output's sharding: batch and output features."""
        return self._named(self.batch, *(None,) * self.nsd, self.out)

    @property
    def groups_split(self) -> bool:
        """Whole groups on each device (the groups divide over the output features' axes)."""
        return self.out is not None and self.groups > 1 and self.groups % self.out_size == 0

    @property
    def subgroups(self) -> bool:
        """Part of one group on each device (the output features' axes are a multiple of
        the groups): each device takes its group's channels out of the whole input."""
        return (self.out is not None and self.groups > 1 and not self.groups_split)

    @property
    def out_size(self) -> int:
        """The number of devices along the output features' axes."""
        return _size(self.mesh, self.out)

    def _named(self, *spec: Any) -> NamedSharding:
        """A ``NamedSharding`` on the split's mesh."""
        return NamedSharding(self.mesh, P(*spec))


def _axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry, as a tuple."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _size(mesh: Any, entry: Any) -> int:
    """The number of devices along one ``PartitionSpec`` entry."""
    return math.prod(mesh.shape[a] for a in _axes(entry))


def _spec(sharding: Any, ndim: int) -> tuple[Any, ...] | None:
    """The mesh axes of each dimension (`None`: a sharding not on the mesh).

    Args:
        sharding: the operand's sharding proposed by the partitioner, or ``None``.
        ndim: the operand's rank.

    Returns:
        One entry per dimension, or ``None``.
    """
    if sharding is None:  # not yet decided by the partitioner: nothing split
        return (None,) * ndim
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def split_for(problem: Any, engine: Any, mesh: Any, x_info: Any, w_info: Any) -> Split:
    """The split of a call whose operands the partitioner proposes sharded as given.

    Args:
        problem: the canonical problem.
        engine: the engine.
        mesh: the mesh, or ``None``.
        x_info: the input's proposed shape and sharding.
        w_info: the kernel's.

    Returns:
        The split: axes that do not divide their dimension are dropped.
    """
    nsd = len(problem.geom.window)
    groups = problem.geom.groups
    xs = _spec(x_info.sharding, len(x_info.shape))
    ws = _spec(w_info.sharding, len(w_info.shape))
    if xs is None or ws is None or mesh is None or mesh.empty:
        return Split(mesh, None, None, groups, nsd)
    batch, out = xs[0], ws[-1]
    if batch is not None and x_info.shape[0] % _size(mesh, batch):
        batch = None
    if out is not None:
        k = _size(mesh, out)
        if (set(_axes(out)) & set(_axes(batch)) or w_info.shape[-1] % k
                or (groups > 1 and groups % k and k % groups)):
            out = None
    contract = None
    if _reduces_contraction(problem, engine):
        contract = xs[-1] if xs[-1] is not None else ws[-2]
        if contract is not None and (set(_axes(contract)) & set(_axes(batch) + _axes(out))
                                     or w_info.shape[-2] % _size(mesh, contract)):
            contract = None
    return Split(mesh, batch, out, groups, nsd, contract)


def _reduces_contraction(problem: Any, engine: Any) -> bool:
    """Whether a sharded contraction axis is reduced across devices (one group, a reduce
    with a collective and, for logsumexp, an engine whose backward reads the global output)
    rather than gathered. Max/min need nothing of the engine: `_winner_backward` hands each
    device its own partial result and the cotangent of the outputs it wins."""
    which = collectives.kind(problem.op)
    return problem.geom.groups == 1 and which is not None and (
        which != "logsumexp" or engine.backward_reads_output(problem))


def _local_problem(problem: Any, split: Split) -> Any:
    """The problem each device computes (fewer groups when the groups are split).

    Args:
        problem: the global problem.
        split: how the call is split over the mesh.

    Returns:
        The local problem.
    """
    if split.groups_split:
        return problem.with_groups(problem.geom.groups // split.out_size)
    if split.subgroups:
        return problem.with_groups(1)
    return problem


def _group_channels(split: Split, x: Array) -> tuple[Array, Array]:
    """This device's group's channels of the whole input `x` (`split.subgroups`), and
    where they start."""
    width = x.shape[-1] // split.groups
    start = jax.lax.axis_index(_axes(split.out)) // (split.out_size // split.groups) * width
    return jax.lax.dynamic_slice_in_dim(x, start, width, x.ndim - 1), start


def _replicated_like(info: Any) -> Any:
    """A fully replicated sharding on the devices of `info`'s (non-named) sharding."""
    from jax._src import sharding_impls  # noqa: PLC0415 - GSPMD shardings have no public type

    return sharding_impls.GSPMDSharding.get_replicated(info.sharding._device_assignment)


# --- each device's part (inside a partitioned or manual computation) ---------------------------

def device_forward(problem: Any, engine: Any, split: Split, recording: bool = False) -> Any:
    """What each device computes of the forward split as `split`: its engine's call on its
    local shapes, a sharded contraction reduced with the op's collective.

    Args:
        problem: the global problem.
        engine: the engine.
        split: how the call is split (its mesh axes are manual where this runs).
        recording: the recording forward (``(y, record)``).

    Returns:
        ``lower(x, w)`` on the local operands (sharded as ``split.x()``, ``split.w()``).

    Example:
        >>> import numpy as np
        >>> from jaxconv import ops
        >>> from jaxconv._src.core import engine, partitioning
        >>> from jaxconv._src.core.geometry import Geometry
        >>> from jaxconv._src.core.problem import Problem
        >>> geom = Geometry((4,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
        >>> p = Problem(ops.max_plus, geom, "xla", np.dtype("float32"), 2**20)
        >>> split = partitioning.Split(None, None, None, 1, 1)
        >>> lower = partitioning.device_forward(p, engine.get("xla"), split)
        >>> lower(np.ones((2, 4, 1), np.float32), np.zeros((2, 1, 3), np.float32)).shape
        (2, 3, 3)
    """
    local = _local_problem(problem, split)
    contract = _axes(split.contract)
    which = collectives.kind(problem.op)

    def lower(x: Array, w: Array) -> Any:
        if split.subgroups:
            x = _group_channels(split, x)[0]
        if not contract:
            return (engine.forward_recording(local, x, w) if recording
                    else engine.forward(local, x, w))
        # Partial products over this device's channels, reduced with the op's reduce.
        # A record would describe this device's partial result while typed as the
        # (replicated over the contraction) output: none is kept, the backward finds the
        # winners itself.
        y = collectives.combine(which, engine.forward(local, x, w), contract)
        return (y, jax.numpy.full(y.shape, -1, jax.numpy.int32)) if recording else y

    return lower


def device_backward(problem: Any, engine: Any, split: Split, need: tuple[bool, bool]) -> Any:
    """What each device computes of the backward split as `split`: its engine's backward on
    its local shapes, then lax's all-reduces (the kernel gradient over the batch's axes, the
    input gradient of one group over the output features' axes); a max/min contraction
    split over devices by `_winner_backward`.

    Args:
        problem: the global problem.
        engine: the engine.
        split: how the call is split (its mesh axes are manual where this runs).
        need: which gradients are needed.

    Returns:
        ``lower(x, w, y, g, record=None) -> (gx, gw)`` on the local operands.

    Example:
        >>> import numpy as np
        >>> from jaxconv import ops
        >>> from jaxconv._src.core import engine, partitioning
        >>> from jaxconv._src.core.geometry import Geometry
        >>> from jaxconv._src.core.problem import Problem
        >>> geom = Geometry((4,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
        >>> p = Problem(ops.adder, geom, "xla", np.dtype("float32"), 2**20)
        >>> split = partitioning.Split(None, None, None, 1, 1)
        >>> lower = partitioning.device_backward(p, engine.get("xla"), split, (True, True))
        >>> x, w = np.ones((2, 4, 1), np.float32), np.zeros((2, 1, 3), np.float32)
        >>> y = g = np.ones((2, 3, 3), np.float32)
        >>> [a.shape for a in lower(x, w, y, g)]
        [(2, 4, 1), (2, 1, 3)]
    """
    local = _local_problem(problem, split)
    batch_axes, out_axes = _axes(split.batch), _axes(split.out)
    contract = _axes(split.contract)
    which = collectives.kind(problem.op)

    def run(x: Array, w: Array, y: Array, g: Array, record: Array | None
            ) -> tuple[Array, Array]:
        if record is None:
            return engine.backward(local, x, w, y, g, need)
        return engine.backward_recorded(local, x, w, y, record, g, need)

    def lower(x: Array, w: Array, y: Array, g: Array, record: Array | None = None
              ) -> tuple[Array, Array]:
        if split.subgroups:
            xg, start = _group_channels(split, x)
            gx, gw = run(xg, w, y, g, record)
            # This device's group's channels of the whole input gradient.
            gx = jax.lax.dynamic_update_slice_in_dim(jax.numpy.zeros_like(x), gx, start,
                                                     x.ndim - 1)
        elif contract and which in ("max", "min"):
            # The record is empty here (`device_forward`): not passed.
            gx, gw = _winner_backward(local, engine, need, contract, x, w, y, g)
        else:
            # Sums need no y; logsumexp's weights exp(c - y) take the global y.
            gx, gw = run(x, w, y, g, record)
        # lax's all-reduces: the kernel gradient sums over the images of every device,
        # the input gradient (one group) over every device's output features.
        if need[1] and batch_axes:
            gw = jax.lax.psum(gw, batch_axes)
        if need[0] and out_axes and not split.groups_split:
            gx = jax.lax.psum(gx, out_axes)
        return gx, gw

    return lower


# --- the partitioned calls ---------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _forward_fn(problem: Any, engine: Any, x_shape: tuple[int, ...],
                w_shape: tuple[int, ...], recording: bool = False) -> Any:
    """The partitioned forward, one ``custom_partitioning`` function per problem and shapes.

    Args:
        problem: the canonical problem.
        engine: the engine.
        x_shape: the input's shape.
        w_shape: the kernel's shape.
        recording: the recording forward (``(y, record)``, the record split as ``y``).

    Returns:
        ``call(x, w)``, with its Shardy rule and partitioning callbacks.
    """
    nsd, groups = len(problem.geom.window), problem.geom.groups

    def run(p: Any, x: Array, w: Array) -> Any:
        return engine.forward_recording(p, x, w) if recording else engine.forward(p, x, w)

    def outs(sharding: Any) -> Any:
        return (sharding, sharding) if recording else sharding

    @custom_partitioning
    def call(x: Array, w: Array) -> Any:
        # Under `jax.jit`: `custom_partitioning` refuses a body with hoisted constants.
        return jax.jit(functools.partial(run, problem))(x, w)

    def infer(mesh: Any, arg_infos: Any, result_info: Any) -> Any:
        del result_info
        split = split_for(problem, engine, mesh, *arg_infos)
        return outs(split.y()) if split.mesh is not None and not split.mesh.empty else None

    def partition(mesh: Any, arg_infos: Any, result_info: Any) -> Any:
        del result_info
        split = split_for(problem, engine, mesh, *arg_infos)
        if not isinstance(arg_infos[0].sharding, NamedSharding) or mesh.empty:
            rep = _replicated_like(arg_infos[0])
            return mesh, functools.partial(run, problem), outs(rep), (rep, rep)
        lower = device_forward(problem, engine, split, recording)
        return mesh, lower, outs(split.y()), (split.x(), split.w())

    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=_rule(
        nsd, groups, w_shape, False, _reduces_contraction(problem, engine), recording))
    return call


@functools.lru_cache(maxsize=512)
def _backward_fn(problem: Any, engine: Any, need: tuple[bool, bool],
                 x_shape: tuple[int, ...], w_shape: tuple[int, ...],
                 recorded: bool = False) -> Any:
    """The partitioned backward, one ``custom_partitioning`` function per problem and shapes.

    Args:
        problem: the canonical problem.
        engine: the engine.
        need: which gradients are needed.
        x_shape: the input's shape.
        w_shape: the kernel's shape.
        recorded: the call takes the recording forward's record as a fifth operand.

    Returns:
        ``call(x, w, y, g[, record])``, with its Shardy rule and partitioning callbacks.
    """
    nsd, groups = len(problem.geom.window), problem.geom.groups

    def run(p: Any, x: Array, w: Array, y: Array, g: Array, record: Array | None = None
            ) -> tuple[Array, Array]:
        if record is None:
            gx, gw = engine.backward(p, x, w, y, g, need)
        else:
            gx, gw = engine.backward_recorded(p, x, w, y, record, g, need)
        return gx, gw

    @custom_partitioning
    def call(*args: Array) -> tuple[Array, Array]:
        # Under `jax.jit`: `custom_partitioning` refuses a body with hoisted constants, and
        # the backward's lax products may hold some (the static masks of padded taps).
        return jax.jit(functools.partial(run, problem))(*args)

    def infer(mesh: Any, arg_infos: Any, result_info: Any) -> Any:
        del result_info
        split = split_for(problem, engine, mesh, arg_infos[0], arg_infos[1])
        if split.mesh is None or split.mesh.empty:
            return None
        return split.x(), split.w()

    def partition(mesh: Any, arg_infos: Any, result_info: Any) -> Any:
        del result_info
        split = split_for(problem, engine, mesh, arg_infos[0], arg_infos[1])
        nargs = 5 if recorded else 4
        if not isinstance(arg_infos[0].sharding, NamedSharding) or mesh.empty:
            rep = _replicated_like(arg_infos[0])
            return (mesh, functools.partial(run, problem), (rep, rep), (rep,) * nargs)
        lower = device_backward(problem, engine, split, need)
        return (mesh, lower, (split.x(), split.w()),
                (split.x(), split.w(), *(split.y(),) * (nargs - 2)))

    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=_rule(
        nsd, groups, w_shape, True, _reduces_contraction(problem, engine), recorded))
    return call


def _winner_backward(problem: Any, engine: Any, need: tuple[bool, bool],
                     contract: tuple[str, ...], x: Array, w: Array, y: Array,
                     g: Array) -> tuple[Array, Array]:
    """The backward of a max/min op whose contraction is split over `contract`.

    Each device recomputes its partial result `y_local` (its channels' max/min); it holds
    the winner of an output where `y_local == y` (the global result is one of the partial
    results bit for bit: `collectives.combine` is exact). The devices holding each winner
    are counted (one integer all-reduce). Where every output's winners sit on one device,
    each device's part of the global backward is its own backward with `y_local` and the
    cotangent of the outputs it wins (zero elsewhere): the engine splits a tie among that
    device's taps exactly as one device splits it among all taps, whatever way it finds
    winners (the native scan matches products against the `y` given; the XLA engine finds
    them by index in its own recomputation). Where some output's winners sit on several
    devices (a tie across devices), the contraction is gathered and the whole window's
    backward run, this device keeping its channels' part (`lax.cond`: the all-gather runs
    only then). A NaN output wins on no device (NaN equals nothing), and has no gradient,
    as on one device.

    Args:
        problem: the local problem.
        engine: the engine.
        need: which gradients are needed.
        contract: the mesh axes of the contraction.
        x: the local input.
        w: the local kernel.
        y: the global output.
        g: its cotangent.

    Returns:
        The local ``(gx, gw)``.
    """
    y_local = engine.forward(problem, x, w)
    wins = y_local == y

    def local() -> tuple[Array, Array]:
        gl = jax.numpy.where(wins, g, jax.numpy.zeros_like(g))
        return engine.backward(problem, x, w, y_local.astype(y.dtype), gl, need)

    def gathered() -> tuple[Array, Array]:
        xa = jax.lax.all_gather(x, contract, axis=x.ndim - 1, tiled=True)
        wa = jax.lax.all_gather(w, contract, axis=w.ndim - 2, tiled=True)
        gx, gw = engine.backward(problem, xa, wa, y, g, need)
        at = jax.lax.axis_index(contract)
        gx = jax.lax.dynamic_slice_in_dim(gx, at * x.shape[-1], x.shape[-1], x.ndim - 1)
        gw = jax.lax.dynamic_slice_in_dim(gw, at * w.shape[-2], w.shape[-2], w.ndim - 2)
        return gx, gw

    shared = jax.numpy.any(collectives.tie_devices(y_local, y, contract) > 1)
    return jax.lax.cond(shared, gathered, local)
