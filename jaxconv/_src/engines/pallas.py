"""The Pallas engine: any ``Op`` as a blocked semiring matmul, for GPU (Triton) and TPU (Mosaic).

The core is a Pallas kernel for

    out[g, m, n] = REDUCE_k combine(a[g, m, k], b[g, k, n])

on a grid ``(G, M / bm, N / bn)`` whose axes are all parallel: each program owns one
``(bm, bn)`` output tile, keeps its accumulator in registers (GPU) / vregs (TPU), initialised
with the reduce's identity or with the running result of the previous taps, and walks K
inside the kernel by rank-1 steps ``acc = reduce(acc, combine(a[:, k], b[k, :]))``. Combine
and reduce are fused and no ``(bm, bk, bn)`` product is stored. K is a loop, not a grid
axis: the programs of a GPU grid run concurrently, so accumulating over a grid axis would
race. Only the binary form of the reduce is used, so any reduce works (``sum``, ``max``,
``min``, ``prod``, ``logsumexp``, a user's ``myadd``) and NaN propagates.

**One jitted function for every platform.** The platform is chosen when the program is
lowered, never from ``jax.default_backend()``: ``generic_conv`` traces one variant per
platform and joins them with ``lax.platform_dependent`` (``cpu``: interpret mode; ``cuda`` /
``rocm``: Triton; ``tpu``: Mosaic), so a function lowered for another platform than the
host's (cross-lowering, ``jax.export`` for that platform -- Triton calls need
``DisabledSafetyCheck.custom_call`` there, having no compatibility guarantee --, a CPU host
driving accelerators) gets that platform's kernel. The forward and the backward each
dispatch on their own, and the values that cross between them are unpadded, so the
platforms may use different tiles.
(One lowering for several platforms at once, ``lowering_platforms=("cpu", "cuda")``, is not
supported: jax 0.10 then lowers every branch for every platform, and a compiled Pallas
kernel has no CPU lowering.)

**GPU: Triton, chosen explicitly** through ``compiler_params=pallas.triton.CompilerParams``.
jax 0.10's default GPU backend for ``pallas_call`` is Mosaic GPU, which moves every block
through shared memory with TMA copies: its global strides must be multiples of 16 bytes and
the blocks must fit the 227 KiB of shared memory, so ragged channel counts (3, 10, 27, ...)
and full-K blocks fail there, and it has no lowering for a ``custom_vjp`` combine at all.
Triton addresses global memory through pointers, loads only what the kernel indexes (a
``(bm, 1)`` column, a ``(1, bn)`` row), and accepts any stride; its one rule is that block
shapes are powers of two, which `BlockSizes` ``pow2`` meets by padding whole extents
outside the kernel. The accumulator tile (64 x 64 f32, 32 registers per thread at 4 warps)
lives in registers; nothing is staged in shared memory.

**TPU: Mosaic** with the ``(8, 128)`` layout rules: every block's last two dimensions are
multiples of ``(8, 128)`` (16 sublanes for bf16 hold, as tiles are 128 or the whole padded
extent) or the full padded extent; operands are padded outside the kernel. No kernel uses a
dynamic offset inside a block: the walked axis (K in the forward, the output features in
``dx``) is the last grid axis, ``"arbitrary"`` (the TPU runs it in order and the output
block stays resident in VMEM as the accumulator), each program walking its ``128``-wide
block with static slices (lane / sublane broadcasts); ``dw`` reduces chunks of 128 rows, one
per program, whose partial sums are added outside. Every block is at most 128 x 128, so
VMEM use does not grow with the layer.

**Combine in a kernel: primal only.** The kernels evaluate ``combine`` (and, in the backward,
combine's VJP, traced to a jaxpr outside of any kernel logic) through
``jaxconv._src.engines.primal.primal``, which replaces every ``custom_vjp`` /
``custom_jvp`` call by the computation it wraps: AdderNet's combine, a straight-through
quantizer or ``jax.nn.relu`` lower on Triton and Mosaic. Gradients come from this engine's
own backward kernels, never from differentiating inside a kernel.

``generic_conv`` has the XLA engine's signature and semantics. **On GPU (and in interpret
mode) a convolution is an implicit GEMM: every tap inside one kernel.** The padded input is
split into stride phases and flattened to rows ``(n, position)``, so that a tap is a constant
row shift of one phase; the kernel walks the taps (statically) and K inside, computing one
"virtual" output row per phase position (the few rows past the output are dropped), and a
static per-tap row mask skips taps that read padding or an ``lhs_dilation`` hole (identity
padding; ops with a ``pad_value`` pad with the value). No im2col tensor, one launch per
layer. The gradients are one kernel each too: ``dw`` has the taps as a grid axis (and chunks
of ``red`` rows, whose partial sums are added outside, so the GPU has enough programs);
``dx`` runs over the phase rows, each program walking every tap of its phase and every output
feature. **On TPU** the input is sliced per tap and each tap is one kernel call (a
``lax.scan``) whose accumulator input is the previous taps' result, with a per-row mask: the
shifted row windows of the implicit form are unaligned dynamic sublane offsets, which Mosaic
handles poorly, and the whole input would have to sit in VMEM. Feature groups are the
kernels' leading grid axis; a dense product is a conv with one tap.

The gradient kernels (``custom_vjp``) serve ``sum``, ``max``, ``min`` and ``logsumexp``: they
recompute ``combine`` and push the output cotangent through combine's own VJP (AdderNet's and
the STE rules apply), with the reduce's rule: ``sum`` passes ``g``; ``max``/``min`` pass
``g / count`` to the taps equal to the output (ties split equally as ``jax.grad(jnp.max)``;
the count is one more forward pass); ``logsumexp`` passes ``g * exp(c - y)`` (the softmax).
Other reduces (``prod``, user callables) run the Pallas forward and take their gradient from
the XLA engine.

Block sizes: 64 x 64 output tiles on GPU (K and N padded to powers of two, rows to a multiple
of the tile), 128 x 128 x 128 on
TPU, 8 x 8 x 8 in interpret mode (CPU), small so that tests cover several blocks and ragged
edges. On CPU the kernels run in interpret mode: correct, but slow -- the XLA and native
engines are the CPU engines; this one is for accelerators.
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
from jax import lax
from jax.experimental import pallas as pl

from jaxconv._src.core import algebra, primitive
from jaxconv._src.core import engine as registry
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines import taps
from jaxconv._src.engines.primal import primal

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the semiring matmul: ``bm x bn`` output tiles, ``bk``-deep K blocks.

    ``pow2``: pad every extent a kernel sees whole to a power of two and keep tiles powers
    of two (Triton only handles power-of-two block shapes). ``red``: rows of M one program
    of the ``dw`` kernel reduces (the partial sums of the chunks are added outside).
    """

    bm: int
    bn: int
    bk: int
    pow2: bool = False
    red: int = 256


@dataclasses.dataclass(frozen=True)
class Backend:
    """How the kernels of one platform are built.

    Args:
      kind: ``"interpret"`` (any platform, the CPU's), ``"triton"`` (CUDA / ROCm) or
        ``"mosaic"`` (TPU).
      blocks: the tile sizes.
      style: ``"rank1"``: one column of ``a`` and one row of ``b`` loaded per step at a
        dynamic offset (Triton's pointer loads); ``"chunked"``: aligned ``lane``-wide chunks
        loaded, then walked with static slices (Mosaic's layout rules).
      lane: chunk width of the ``"chunked"`` style (128 on TPU).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    kind: str
    blocks: BlockSizes
    style: str = "rank1"
    lane: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("interpret", "triton", "mosaic"):
            raise ValueError(f"Backend: `kind` must be 'interpret', 'triton' or 'mosaic', "
                             f"got {self.kind!r}.")
        if self.style not in ("rank1", "chunked"):
            raise ValueError(f"Backend: `style` must be 'rank1' or 'chunked', got {self.style!r}.")


GPU_BLOCKS = BlockSizes(64, 64, 32, pow2=True, red=256)
TPU_BLOCKS = BlockSizes(128, 128, 128, red=128)
INTERPRET_BLOCKS = BlockSizes(8, 8, 8, red=16)

# The platforms ``lax.platform_dependent`` dispatches on, and their kernels.
PLATFORM_BACKENDS: dict[str, Backend] = {
    "cpu": Backend("interpret", INTERPRET_BLOCKS),
    "cuda": Backend("triton", GPU_BLOCKS),
    "rocm": Backend("triton", GPU_BLOCKS),
    "tpu": Backend("mosaic", TPU_BLOCKS, style="chunked"),
}


def platform_backends(
    *, interpret: bool | None = None, blocks: BlockSizes | None = None,
    backend: Backend | None = None,
) -> tuple[tuple[str, Backend], ...]:
    """The ``(platform, Backend)`` pairs a call dispatches on.

    Args:
      interpret: ``True``: interpret mode on every platform (debugging); ``None`` / ``False``:
        each platform's kernel (CPU has no compiled Pallas, so it always interprets).
      blocks: tile sizes for every platform (default: each platform's).
      backend: one backend for every platform (overrides the other two).

    Returns:
      A hashable tuple, a static argument.
    """
    if backend is not None:
        return tuple((p, backend) for p in PLATFORM_BACKENDS)
    out = []
    for p, be in PLATFORM_BACKENDS.items():
        if interpret:
            be = Backend("interpret", INTERPRET_BLOCKS)
        if blocks is not None:
            be = dataclasses.replace(be, blocks=blocks)
        out.append((p, be))
    return tuple(out)


def _on_platforms(
    backends: tuple[tuple[str, Backend], ...], make: Callable[[Backend], Callable[..., Any]],
    *args: Any,
) -> Any:
    """``make(backend)(*args)`` for the platform the program is lowered for."""
    kinds = {be for _, be in backends}
    if len(kinds) == 1:
        return make(next(iter(kinds)))(*args)
    cache: dict[Backend, Callable[..., Any]] = {}
    branches = {p: cache.setdefault(be, make(be)) for p, be in backends}
    return lax.platform_dependent(*args, **branches)


def _ident(op: Op, dtype: Any) -> float | int:
    """The reduce's identity as a Python scalar: a kernel may not capture array constants."""
    with jax.ensure_compile_time_eval():
        return np.asarray(algebra.identity_value(op, dtype)).item()


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _fit(blocks: BlockSizes, m: int, n: int, k: int) -> BlockSizes:
    """Shrinks tiles for small problems (never above the block size).

    Tiles become multiples of 8 (then they equal the whole padded extent), or powers of two
    (at least 16) with ``pow2``.
    """
    if blocks.pow2:
        def fit(b: int, v: int) -> int:
            return min(b, max(16, _next_pow2(v)))
    else:
        def fit(b: int, v: int) -> int:
            return min(b, _round_up(v, 8))
    return dataclasses.replace(blocks, bm=fit(blocks.bm, m), bn=fit(blocks.bn, n),
                               bk=fit(blocks.bk, k))


def _padded(v: int, block: int, pow2: bool) -> int:
    """Extent of a padded axis: a multiple of ``block`` (a power of two with ``pow2``)."""
    return max(block, _next_pow2(v)) if pow2 else _round_up(v, block)


def _pad_to(a: Array, shape: tuple[int, ...]) -> Array:
    widths = [(0, s - d) for d, s in zip(a.shape, shape, strict=True)]
    if all(hi == 0 for _, hi in widths):
        return a
    return jnp.pad(a, widths)


def _call_options(backend: Backend, ndims: int, arbitrary_last: bool = False
                  ) -> dict[str, Any]:
    """``pallas_call`` keywords selecting the backend.

    Every grid axis is parallel, except the last with ``arbitrary_last`` (a reduction the
    TPU runs in order, accumulating into the resident output block).
    """
    if backend.kind == "interpret":
        return {"interpret": True}
    if backend.kind == "triton":
        from jax.experimental.pallas import triton as pltriton

        return {"compiler_params": pltriton.CompilerParams(
            num_warps=backend.num_warps, num_stages=backend.num_stages)}
    from jax.experimental.pallas import tpu as pltpu

    sem = ("parallel",) * (ndims - 1) + ("arbitrary" if arbitrary_last else "parallel",)
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=sem)}


def _chunk(backend: Backend, extent: int) -> int:
    """Width of the static chunks the ``"chunked"`` style walks an axis of ``extent`` in."""
    return backend.lane if extent % backend.lane == 0 else extent


def _take(v: Array, j: int, axis: int) -> Array:
    """Static slice ``j:j+1`` of ``v`` along ``axis`` (``v`` itself when it has one entry)."""
    if v.shape[axis] == 1:
        return v
    return lax.slice_in_dim(v, j, j + 1, axis=axis)


def _walk(
    backend: Backend, total: int, extent: int, load: Callable[[Any, int], tuple[Array, ...]],
    step: Callable[[Array, tuple[Array, ...], int], Array], acc: Array,
) -> Array:
    """``acc = step(acc, views, j)`` for every index ``0 <= i < total`` of a walked axis.

    ``load(start, size)`` returns the operands' slices ``[start, start + size)`` along the
    walked axis; ``step`` takes entry ``j`` of them (`_take`). ``"rank1"``: one dynamic
    slice of size 1 per index. ``"chunked"``: aligned chunks (``extent``, the padded length of
    the axis, is a multiple of the chunk), each walked with static slices; the last chunk only
    as far as ``total``.
    """
    if backend.style == "rank1":
        return lax.fori_loop(0, total, lambda i, a: step(a, load(i, 1), 0), acc)
    size = _chunk(backend, extent)

    def chunk(a: Array, views: tuple[Array, ...], count: int) -> Array:
        for j in range(count):
            a = step(a, views, j)
        return a

    full = total // size
    if full == 1:
        acc = chunk(acc, load(0, size), size)  # one chunk: static offsets only
    elif full:
        acc = lax.fori_loop(
            0, full,
            lambda c, a: chunk(a, load(pl.multiple_of(c * size, size), size), size), acc)
    if total % size:
        acc = chunk(acc, load(full * size, size), total % size)
    return acc


def _grid_walk(
    axis: int, total: int, size: int, views: Callable[[], tuple[Array, ...]],
    step: Callable[[Array, tuple[Array, ...], int], Array], o_ref: Any,
    start: Callable[[], Array],
) -> None:
    """The ``"chunked"`` style's walk when the walked axis is grid axis ``axis``.

    Each program sees one ``size``-wide block of the walked axis (a BlockSpec block, so no
    dynamic offset inside the kernel: Mosaic's layout rules) and walks it with static
    slices, accumulating into the output block, which stays resident while the axis (the
    last, ``"arbitrary"``) advances. The last block is walked only as far as ``total``.
    """
    kb = pl.program_id(axis)

    @pl.when(kb == 0)
    def _init() -> None:
        o_ref[0] = start()

    def run(count: int) -> None:
        vs = views()
        acc = o_ref[0]
        for j in range(count):
            acc = step(acc, vs, j)
        o_ref[0] = acc

    full, rem = divmod(total, size)
    if full:
        pl.when(kb < full)(lambda: run(size))
    if rem:
        pl.when(kb == full)(lambda: run(rem))


# ----------------------------------------------------------------------------- kernels


def _contract_kernel(
    *refs: Any,
    backend: Backend,
    term: Callable[..., Array],
    binary: Callable[[Array, Array], Array],
    ident: Any,
    acc_dtype: Any,
    k_total: int,
    has_y: bool,
    has_acc: bool,
    has_mask: bool,
    grid_k: bool = False,
) -> None:
    """One ``(bm, bn)`` output tile: ``acc = binary(acc, term(combine(a[:, k], b[k, :])))``.

    ``grid_k``: K is the last grid axis (blocks of ``bk``), walked by ``_grid_walk``.
    """
    refs = list(refs)
    a_ref, b_ref = refs[0], refs[1]
    pos = 2
    y_ref = acc_ref = mask_ref = None
    if has_y:
        y_ref, pos = refs[pos], pos + 1
    if has_acc:
        acc_ref, pos = refs[pos], pos + 1
    if has_mask:
        mask_ref, pos = refs[pos], pos + 1
    o_ref = refs[pos]
    shape = o_ref.shape[1:]
    start = acc_ref[0] if acc_ref is not None else jnp.full(shape, ident, acc_dtype)
    y = y_ref[0] if y_ref is not None else None

    def load(k: Any, size: int) -> tuple[Array, Array]:
        return a_ref[0, :, pl.ds(k, size)], b_ref[0, pl.ds(k, size), :]

    def step(acc: Array, views: tuple[Array, Array], j: int) -> Array:
        col = jnp.broadcast_to(_take(views[0], j, 1), shape)  # a[:, k] across the tile
        row = jnp.broadcast_to(_take(views[1], j, 0), shape)  # b[k, :] down the tile
        return binary(acc, term(col, row, y).astype(acc_dtype))

    if grid_k:
        _grid_walk(3, k_total, a_ref.shape[-1], lambda: (a_ref[0], b_ref[0]), step, o_ref,
                   lambda: start)
        if mask_ref is not None:
            @pl.when(pl.program_id(3) == pl.num_programs(3) - 1)
            def _skip() -> None:
                o_ref[0] = jnp.where(mask_ref[...] != 0, o_ref[0], start)
        return
    # The loop runs over the real K only: the zero padding of K never reaches combine.
    acc = _walk(backend, k_total, a_ref.shape[-1], load, step, start)
    if mask_ref is not None:
        # Rows whose tap lies in padding keep their previous value: the tap is skipped.
        acc = jnp.where(mask_ref[...] != 0, acc, start)
    o_ref[0] = acc


def _contract(
    a: Array,
    b: Array,
    *,
    backend: Backend,
    term: Callable[..., Array],
    binary: Callable[[Array, Array], Array],
    ident: Any,
    acc_dtype: Any,
    blocks: BlockSizes,
    k_total: int,
    y: Array | None = None,
    acc: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Padded operands ``a (G, Mp, Kp)``, ``b (G, Kp, Np)`` -> ``(G, Mp, Np)``.

    Grid ``(G, Mp / bm, Np / bn)``, every axis parallel.
    """
    g, mp, kp = a.shape
    np_ = b.shape[-1]
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    # The chunked (TPU) form: K is the last grid axis, each program one (bm, bk) block.
    grid_k = backend.style == "chunked"
    if grid_k:
        grid = (g, mp // bm, np_ // bn, kp // bk)
        out_spec = pl.BlockSpec((1, bm, bn), lambda gi, i, j, kk: (gi, i, j))
        in_specs = [
            pl.BlockSpec((1, bm, bk), lambda gi, i, j, kk: (gi, i, kk)),
            pl.BlockSpec((1, bk, bn), lambda gi, i, j, kk: (gi, kk, j)),
        ]
        mask_spec = pl.BlockSpec((bm, 1), lambda gi, i, j, kk: (i, 0))
    else:
        grid = (g, mp // bm, np_ // bn)
        out_spec = pl.BlockSpec((1, bm, bn), lambda gi, i, j: (gi, i, j))
        in_specs = [
            pl.BlockSpec((1, bm, kp), lambda gi, i, j: (gi, i, 0)),
            pl.BlockSpec((1, kp, bn), lambda gi, i, j: (gi, 0, j)),
        ]
        mask_spec = pl.BlockSpec((bm, 1), lambda gi, i, j: (i, 0))
    args = [a, b]
    if y is not None:
        in_specs.append(out_spec)
        args.append(y)
    if acc is not None:
        in_specs.append(out_spec)
        args.append(acc)
    if mask is not None:
        in_specs.append(mask_spec)
        args.append(mask)
    kernel = functools.partial(
        _contract_kernel, backend=backend, term=term, binary=binary, ident=ident,
        acc_dtype=acc_dtype, k_total=k_total, has_y=y is not None, has_acc=acc is not None,
        has_mask=mask is not None, grid_k=grid_k)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, mp, np_), acc_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        name="jaxconv_semiring_matmul",
        **_call_options(backend, len(grid), arbitrary_last=grid_k),
    )(*args)


def _combine_term(op: Op) -> Callable[..., Array]:
    comb = primal(op.combine)
    return lambda xv, wv, y: comb(xv, wv)


def _matmul_one(backend: Backend, op: Op, acc_dtype: Any, a: Array, b: Array) -> Array:
    g, m, k = a.shape
    n = b.shape[-1]
    bs = _fit(backend.blocks, m, n, k)
    mp, np_, kp = (_padded(m, bs.bm, bs.pow2), _padded(n, bs.bn, bs.pow2),
                   _padded(k, bs.bk, bs.pow2))
    return _contract(
        _pad_to(a, (g, mp, kp)), _pad_to(b, (g, kp, np_)), backend=backend,
        term=_combine_term(op), binary=algebra.binary(op), ident=_ident(op, acc_dtype),
        acc_dtype=acc_dtype, blocks=bs, k_total=k)[:, :m, :n]


def semiring_matmul(
    a: Array,
    b: Array,
    op: Op,
    *,
    acc_dtype: Any | None = None,
    blocks: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: Backend | None = None,
) -> Array:
    """``out[g, m, n] = REDUCE_k combine(a[g, m, k], b[g, k, n])`` as one Pallas kernel.

    The kernel is chosen per platform when the program is lowered (interpret mode on CPU,
    Triton on CUDA / ROCm, Mosaic on TPU). Forward only (no gradient rule).

    Args:
      a: ``(G, M, K)`` or ``(M, K)`` left operand.
      b: ``(G, K, N)`` or ``(K, N)`` right operand.
      op: the product (``op.rewrite`` and ``op.pad_value`` are not used; ``op.post`` is).
      acc_dtype: accumulation and output dtype (default: the XLA engine's choice).
      blocks: tile sizes for every platform (default: each platform's).
      interpret: ``True``: interpret mode on every platform.
      backend: one `Backend` for every platform (tests).

    Returns:
      ``(G, M, N)`` (or ``(M, N)``) in ``acc_dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import ops
      >>> semiring_matmul(jnp.zeros((2, 3)), jnp.ones((3, 4)), ops.max_plus).shape
      (2, 4)
    """
    squeeze = a.ndim == 2
    if squeeze:
        a, b = a[None], b[None]
    dtype = jnp.result_type(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    acc_dtype = jnp.dtype(acc_dtype or algebra.accumulation_dtype(op, dtype, None))
    backends = platform_backends(interpret=interpret, blocks=blocks, backend=backend)
    out = _on_platforms(
        backends, lambda be: functools.partial(_matmul_one, be, op, acc_dtype), a, b)
    if op.post is not None:
        out = op.post(out)
    return out[0] if squeeze else out


def _grad_kernel(
    a_ref: Any, bt_ref: Any, y_ref: Any, s_ref: Any, mask_ref: Any, o_ref: Any, *,
    backend: Backend, combine: Callable[..., Array], combine_vjp: Callable[..., Any],
    rule: Callable[..., Array], acc_dtype: Any, red_total: int, wrt: int,
    grid_n: bool = False,
) -> None:
    """One gradient tile; ``wrt=0``: ``dx (bm, bk)`` summed over n, ``wrt=1``: ``dw (bk, bn)``.

    ``wrt=0``: ``a_ref`` is ``a (bm, bk)``, ``bt_ref`` is ``b^T (Np, bk)``, ``y``/``s`` are
    ``(bm, Np)``, ``mask`` ``(bm, 1)``; step ``j`` takes row ``j`` of ``b^T`` and column ``j``
    of ``y`` and ``s``, over the real features only. ``wrt=1``: ``a_ref`` is ``a^T (bk, R)``
    for a chunk of ``R`` rows, ``bt_ref`` is ``b (bk, bn)``, ``y``/``s`` are ``(R, bn)``,
    ``mask`` ``(R, 1)``; step ``i`` takes column ``i`` of ``a^T`` and row ``i`` of ``y``, ``s``
    and the mask. Masked rows (padding, padded taps) contribute exactly 0.
    """
    shape = o_ref.shape[-2:]
    if wrt == 0:
        xv = a_ref[0]
        valid_rows = mask_ref[...] != 0

        def load(i: Any, size: int) -> tuple[Array, ...]:
            return (bt_ref[0, pl.ds(i, size), :], y_ref[0, :, pl.ds(i, size)],
                    s_ref[0, :, pl.ds(i, size)])
    else:
        wv = bt_ref[0]

        def load(i: Any, size: int) -> tuple[Array, ...]:
            return (a_ref[0, :, pl.ds(i, size)], y_ref[0, pl.ds(i, size), :],
                    s_ref[0, pl.ds(i, size), :], mask_ref[pl.ds(i, size), :])

    def step(acc: Array, views: tuple[Array, ...], j: int) -> Array:
        if wrt == 0:
            x = xv
            w = jnp.broadcast_to(_take(views[0], j, 0), shape)
            yv, sv = _take(views[1], j, 1), _take(views[2], j, 1)
            valid = valid_rows
        else:
            x = jnp.broadcast_to(_take(views[0], j, 1), shape)
            w = wv
            yv, sv = _take(views[1], j, 0), _take(views[2], j, 0)
            valid = _take(views[3], j, 0) != 0
        c = combine(x, w)
        dc = jnp.where(valid, rule(c.astype(acc_dtype), yv, sv), 0).astype(c.dtype)
        d = combine_vjp(x, w, dc)[wrt].astype(acc_dtype)
        # Skipped (padded) taps carry no gradient, even where the VJP is 0 * inf there.
        return acc + jnp.where(valid, d, 0)

    if grid_n:
        # dx of the chunked (TPU) form: the output features are the last grid axis.
        _grid_walk(3, red_total, bt_ref.shape[-2],
                   lambda: (bt_ref[0], y_ref[0], s_ref[0]), step, o_ref,
                   lambda: jnp.zeros(shape, acc_dtype))
        return
    extent = bt_ref.shape[-2] if wrt == 0 else a_ref.shape[-1]
    o_ref[...] = _walk(backend, red_total, extent, load, step,
                       jnp.zeros(shape, acc_dtype)).reshape(o_ref.shape)


def _grad_call(
    a: Array, b: Array, y: Array, s: Array, mask: Array, *, backend: Backend, op: Op,
    rule: Callable[..., Array], acc_dtype: Any, blocks: BlockSizes, m_total: int,
    n_total: int, wrt: int,
) -> Array:
    """Padded ``a (G, Mp, Kp)``, ``b (G, Kp, Np)``, ``y, s (G, Mp, Np)``, ``mask (Mp, 1)``.

    Returns ``dx (G, Mp, Kp)`` (``wrt=0``: grid over ``(G, M, K)`` tiles, a loop over the
    output features) or ``dw (G, Kp, Np)`` (``wrt=1``: grid over ``(G, K, N)`` tiles and
    chunks of ``blocks.red`` rows, a loop over a chunk's rows; the chunks' partial sums are
    added here, outside the kernel).
    """
    g, mp, kp = a.shape
    np_ = b.shape[-1]
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    comb = primal(op.combine)
    comb_vjp = primal(lambda xv, wv, dc: jax.vjp(op.combine, xv, wv)[1](dc))
    kernel = functools.partial(
        _grad_kernel, backend=backend, combine=comb, combine_vjp=comb_vjp, rule=rule,
        acc_dtype=acc_dtype, red_total=n_total if wrt == 0 else 0, wrt=wrt)
    if wrt == 0 and backend.style == "chunked":
        return pl.pallas_call(
            functools.partial(kernel, grid_n=True),
            out_shape=jax.ShapeDtypeStruct((g, mp, kp), acc_dtype),
            grid=(g, mp // bm, kp // bk, np_ // bn),
            in_specs=[
                pl.BlockSpec((1, bm, bk), lambda gi, i, kk, jn: (gi, i, kk)),
                pl.BlockSpec((1, bn, bk), lambda gi, i, kk, jn: (gi, jn, kk)),
                pl.BlockSpec((1, bm, bn), lambda gi, i, kk, jn: (gi, i, jn)),
                pl.BlockSpec((1, bm, bn), lambda gi, i, kk, jn: (gi, i, jn)),
                pl.BlockSpec((bm, 1), lambda gi, i, kk, jn: (i, 0)),
            ],
            out_specs=pl.BlockSpec((1, bm, bk), lambda gi, i, kk, jn: (gi, i, kk)),
            name="jaxconv_semiring_grad_x",
            **_call_options(backend, 4, arbitrary_last=True),
        )(a, jnp.swapaxes(b, 1, 2), y, s, mask)
    if wrt == 0:
        grid = (g, mp // bm, kp // bk)
        in_specs = [
            pl.BlockSpec((1, bm, bk), lambda gi, i, kk: (gi, i, kk)),
            pl.BlockSpec((1, np_, bk), lambda gi, i, kk: (gi, 0, kk)),
            pl.BlockSpec((1, bm, np_), lambda gi, i, kk: (gi, i, 0)),
            pl.BlockSpec((1, bm, np_), lambda gi, i, kk: (gi, i, 0)),
            pl.BlockSpec((bm, 1), lambda gi, i, kk: (i, 0)),
        ]
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((g, mp, kp), acc_dtype),
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((1, bm, bk), lambda gi, i, kk: (gi, i, kk)),
            name="jaxconv_semiring_grad_x",
            **_call_options(backend, 3),
        )(a, jnp.swapaxes(b, 1, 2), y, s, mask)
    # dw: rows in chunks of `red` (a multiple of bm; padded rows carry a 0 mask).
    red = min(_round_up(blocks.red, bm), mp)
    if blocks.pow2:
        red = min(_next_pow2(red), mp)
    mr = _round_up(mp, red)
    at = _pad_to(jnp.swapaxes(a, 1, 2), (g, kp, mr))
    y, s, mask = _pad_to(y, (g, mr, np_)), _pad_to(s, (g, mr, np_)), _pad_to(mask, (mr, 1))
    nred = mr // red
    kernel = functools.partial(kernel, red_total=min(red, m_total) if nred == 1 else red)
    part = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nred, g, kp, np_), acc_dtype),
        grid=(g, kp // bk, np_ // bn, nred),
        in_specs=[
            pl.BlockSpec((1, bk, red), lambda gi, kk, j, r: (gi, kk, r)),
            pl.BlockSpec((1, bk, bn), lambda gi, kk, j, r: (gi, kk, j)),
            pl.BlockSpec((1, red, bn), lambda gi, kk, j, r: (gi, r, j)),
            pl.BlockSpec((1, red, bn), lambda gi, kk, j, r: (gi, r, j)),
            pl.BlockSpec((red, 1), lambda gi, kk, j, r: (r, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, bk, bn), lambda gi, kk, j, r: (r, gi, kk, j)),
        name="jaxconv_semiring_grad_w",
        **_call_options(backend, 4),
    )(at, b, y, s, mask)
    return part[0] if nred == 1 else jnp.sum(part, axis=0)


# ----------------------------------------------------------------------------- conv


@dataclasses.dataclass(frozen=True)
class Config:
    """Static parameters of one Pallas convolution on one backend (hashable)."""

    op: Op
    geom: Geometry
    acc_dtype: Any
    backend: Backend
    max_block_bytes: int | None


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static parameters of one Pallas convolution on every platform (a ``custom_vjp`` arg)."""

    op: Op
    geom: Geometry
    acc_dtype: Any
    backends: tuple[tuple[str, Backend], ...]
    max_block_bytes: int | None

    def config(self, backend: Backend) -> Config:
        return Config(self.op, self.geom, self.acc_dtype, backend, self.max_block_bytes)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Canonical sizes: rows ``M = N * P``, ``K = I`` per group, ``N = Og`` per group."""

    n: int
    p: int
    g: int
    i: int
    og: int
    blocks: BlockSizes

    @property
    def m(self) -> int:
        return self.n * self.p

    @property
    def mp(self) -> int:
        return _padded(self.m, self.blocks.bm, self.blocks.pow2)

    @property
    def kp(self) -> int:
        return _padded(self.i, self.blocks.bk, self.blocks.pow2)

    @property
    def np_(self) -> int:
        return _padded(self.og, self.blocks.bn, self.blocks.pow2)


def _problem(cfg: Config, x: Array, w: Array) -> _Problem:
    g = cfg.geom.groups
    n = x.shape[0]
    p = max(1, math.prod(cfg.geom.out_spatial))
    i = w.shape[-2]
    og = w.shape[-1] // g
    return _Problem(n, p, g, i, og, _fit(cfg.backend.blocks, n * p, og, i))


def _tap_tables(
    cfg: Config, pr: _Problem
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static per-tap tables over the taps that see at least one real input cell.

    Returns ``(used, offsets, rows)``: the used taps' indices ``(T_used,)``, their offsets in
    the padded input ``(T_used, nsd)`` and their row masks ``(T_used, Mp, 1)`` (1 where the
    output row's tap reads a real cell, 0 for padding, ``lhs_dilation`` holes and the rows
    that only pad M to a block multiple).
    """
    geom, op = cfg.geom, cfg.op
    mask = geom.valid_mask() if op.pad_value is None else None
    used, offsets, rows = [], [], []
    for t, tap in enumerate(geom.taps()):
        m = geom.tap_mask(mask, tap)
        if m is not None and not m.any():
            continue  # a tap that only ever sees padding contributes the identity
        valid = np.ones((pr.n, pr.p), bool) if m is None else np.broadcast_to(
            m.reshape(1, pr.p), (pr.n, pr.p))
        r = np.zeros((pr.mp, 1), np.int32)
        r[: pr.m, 0] = valid.reshape(-1)
        used.append(t)
        offsets.append(taps.tap_offset(geom, tap))
        rows.append(r)
    nsd = len(geom.window)
    t = len(used)
    return (np.asarray(used, np.int32), np.asarray(offsets, np.int32).reshape(t, nsd),
            np.asarray(rows, np.int32).reshape(t, pr.mp, 1))


def _tap_lhs(cfg: Config, pr: _Problem, xp: Array, off: Array) -> Array:
    """The tap at (traced) offset ``off``: padded input slice -> ``a (G, Mp, Kp)``."""
    xs = taps.tap_slice_at(xp, cfg.geom, off)  # (N, *Os, C)
    a = xs.reshape(pr.m, pr.g, pr.i).transpose(1, 0, 2)
    return _pad_to(a, (pr.g, pr.mp, pr.kp))


def _weights_taps(w: Array, pr: _Problem) -> Array:
    """(*K, I, O) -> padded ``(T, G, Kp, Np)`` (the matmul's ``b`` operand is K-major)."""
    *k, i, o = w.shape
    wt = w.reshape(math.prod(k), i, pr.g, pr.og).transpose(0, 2, 1, 3)
    return _pad_to(wt, (wt.shape[0], pr.g, pr.kp, pr.np_))


def _contract_taps(
    cfg: Config, x: Array, w: Array, *, term: Callable[..., Array],
    binary: Callable[[Array, Array], Array], ident: Any, y: Array | None = None,
) -> Array:
    """Accumulates ``term(combine)`` over every tap and channel: ``(G, Mp, Np)`` padded.

    The taps are a ``lax.scan`` (the kernel is traced once); each step is one kernel call
    whose accumulator input is the running result.
    """
    op = cfg.op
    pr = _problem(cfg, x, w)
    xp = taps.pad_input(x, op, cfg.geom)
    used, offsets, rows = _tap_tables(cfg, pr)
    acc0 = jnp.full((pr.g, pr.mp, pr.np_), ident, cfg.acc_dtype)
    if used.size == 0:
        return acc0
    w_taps = _weights_taps(w, pr)[jnp.asarray(used)]

    def step(acc: Array, tap: tuple[Array, Array, Array]) -> tuple[Array, None]:
        off, r, b = tap
        acc = _contract(
            _tap_lhs(cfg, pr, xp, off), b, backend=cfg.backend, term=term, binary=binary,
            ident=ident, acc_dtype=cfg.acc_dtype, blocks=pr.blocks, k_total=pr.i, y=y,
            acc=acc, mask=r)
        return acc, None

    acc, _ = lax.scan(step, acc0, (jnp.asarray(offsets), jnp.asarray(rows), w_taps))
    return acc


# ------------------------------------------------------------- implicit GEMM (taps inside)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static layout of the implicit-GEMM forward (every tap inside one kernel).

    The padded input is split into stride phases (``xp[r::s]`` per spatial dimension); in
    phase ``r`` the tap at offset ``k * d = q * s + r`` reads the cell ``o + q`` for output
    ``o``. Each phase is cropped / zero-padded to ``lengths = out + max q`` and flattened to
    rows ``(n, l)``, so a tap is a constant row shift of one phase: ``base = phase * rows_p +
    sum_d q_d * stride_d``. The kernel computes "virtual" output rows ``(n, l)`` for every
    ``l < lengths`` (the rows with ``l >= out`` are dropped afterwards, ~10% extra work for
    a 3x3 SAME layer of 32 x 32).
    """

    lengths: tuple[int, ...]
    phases: tuple[tuple[int, ...], ...]
    tap_phase: tuple[int, ...]
    shifts: tuple[int, ...]
    used: tuple[int, ...]
    masks: np.ndarray  # (T_used, prod(lengths)): 1 where a real output's tap reads a real cell
    skips: bool  # identity padding: the forward masks the taps that read padding


def _plan(geom: Geometry, op: Op) -> _Plan:
    vmask = geom.valid_mask() if op.pad_value is None else None
    used, qs, rs, masks = [], [], [], []
    for t, tap in enumerate(geom.taps()):
        m = geom.tap_mask(vmask, tap)
        if m is not None and not m.any():
            continue
        off = taps.tap_offset(geom, tap)
        used.append(t)
        qs.append(tuple(o // st for o, st in zip(off, geom.strides, strict=True)))
        rs.append(tuple(o % st for o, st in zip(off, geom.strides, strict=True)))
        masks.append(m)
    nsd = len(geom.window)
    lengths = tuple(geom.out_spatial[d] + max((q[d] for q in qs), default=0)
                    for d in range(nsd))
    phases = tuple(sorted(set(rs)))
    strides = [math.prod(lengths[d + 1:]) for d in range(nsd)]
    shifts = tuple(sum(q[d] * strides[d] for d in range(nsd)) for q in qs)
    out_masks = np.zeros((len(used), *lengths), np.int32)
    region = tuple(slice(0, o) for o in geom.out_spatial)
    for j, m in enumerate(masks):
        out_masks[(j, *region)] = 1 if m is None else m
    return _Plan(lengths, phases, tuple(phases.index(r) for r in rs), shifts, tuple(used),
                 out_masks.reshape(len(used), math.prod(lengths)), vmask is not None)


def _phase_rows(xp: Array, geom: Geometry, plan: _Plan) -> Array:
    """Padded input ``(N, *P, C)`` -> phases ``(R, N * prod(lengths), C)``."""
    out = []
    for r in plan.phases:
        sl = xp[(slice(None), *(slice(ri, None, st) for ri, st in zip(r, geom.strides,
                                                                     strict=True)))]
        sl = sl[(slice(None), *(slice(0, ln) for ln in plan.lengths))]
        sl = _pad_to(sl, (sl.shape[0], *plan.lengths, sl.shape[-1]))
        out.append(sl.reshape(-1, sl.shape[-1]))
    return jnp.stack(out)


def _implicit_kernel(
    *refs: Any, bases: tuple[int, ...], term: Callable[..., Array],
    binary: Callable[[Array, Array], Array], ident: Any, acc_dtype: Any, k_total: int,
    has_y: bool, has_mask: bool,
) -> None:
    """One ``(bm, bn)`` output tile, every tap and every K column walked inside the kernel.

    ``a_ref`` is the whole phase-row input ``(1, R * rows_p, Kp)`` (Triton reads it through
    pointers: only the ``(bm, 1)`` columns the kernel indexes are loaded), ``b_ref`` the
    taps' weights ``(T, 1, Kp, bn)``, ``mask_ref`` ``(bm, T)``.
    """
    refs = list(refs)
    a_ref, b_ref = refs[0], refs[1]
    pos = 2
    y_ref = mask_ref = None
    if has_y:
        y_ref, pos = refs[pos], pos + 1
    if has_mask:
        mask_ref, pos = refs[pos], pos + 1
    o_ref = refs[pos]
    shape = o_ref.shape[1:]
    bm = shape[0]
    row0 = pl.program_id(1) * bm
    y = y_ref[0] if y_ref is not None else None
    acc = jnp.full(shape, ident, acc_dtype)
    for t, base in enumerate(bases):
        def step(k: Any, acc: Array, t: int = t, base: int = base) -> Array:
            col = a_ref[0, pl.ds(row0 + base, bm), pl.ds(k, 1)]
            row = b_ref[t, 0, pl.ds(k, 1), :]
            c = term(jnp.broadcast_to(col, shape), jnp.broadcast_to(row, shape), y)
            return binary(acc, c.astype(acc_dtype))

        new = lax.fori_loop(0, k_total, step, acc)
        if mask_ref is not None:
            # Rows whose tap reads padding keep their value: the tap is skipped there.
            new = jnp.where(mask_ref[:, pl.ds(t, 1)] != 0, new, acc)
        acc = new
    o_ref[0] = acc


def _to_virtual(y: Array, plan: _Plan, g: int, rows_to: int, cols_to: int) -> Array:
    """``(N, *Os, G * Og)`` -> virtual-row canonical ``(G, rows_to, cols_to)``."""
    n, o = y.shape[0], y.shape[-1]
    y = _pad_to(y, (n, *plan.lengths, o)).reshape(-1, g, o // g).transpose(1, 0, 2)
    return _pad_to(y, (g, rows_to, cols_to))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Padded extents of the implicit-GEMM kernels for one problem."""

    n: int
    g: int
    i: int
    og: int
    rows: int  # virtual output rows N * prod(lengths)
    bs: BlockSizes
    mp: int  # rows padded to the row tile
    mr: int  # rows padded to the dw kernel's row chunk
    red: int  # the dw kernel's row chunk
    np_: int
    kp: int
    rows_p: int  # rows per phase in the kernels' input (room for the largest shift)
    nph_p: int  # phases, padded
    nt: int
    nt_p: int  # used taps, padded
    bases: tuple[int, ...]  # per used tap: its first row in the phase-row input

    @property
    def total_rows(self) -> int:
        return self.nph_p * self.rows_p


def _layout(cfg: Config, plan: _Plan, x: Array, w: Array) -> _Layout:
    n, g = x.shape[0], cfg.geom.groups
    i, og = w.shape[-2], w.shape[-1] // g
    rows = n * math.prod(plan.lengths)
    bs = _fit(cfg.backend.blocks, rows, og, i)
    # Rows are always cut into bm-row blocks, so they are padded to a multiple of bm only
    # (no power of two: that would add programs); K and N are whole blocks somewhere.
    mp = _round_up(rows, bs.bm)
    np_, kp = _padded(og, bs.bn, bs.pow2), _padded(i, bs.bk, bs.pow2)
    red = _round_up(bs.red, bs.bm)
    red = min(_next_pow2(red), _next_pow2(mp)) if bs.pow2 else min(red, mp)
    mr = _round_up(mp, red)
    rows_p = _padded(mr + max(plan.shifts), bs.bm, bs.pow2)
    nph = len(plan.phases)
    nph_p = _next_pow2(nph) if bs.pow2 else nph
    nt = len(plan.used)
    nt_p = _next_pow2(nt) if bs.pow2 else nt
    bases = tuple(ph * rows_p + sh for ph, sh in zip(plan.tap_phase, plan.shifts, strict=True))
    return _Layout(n, g, i, og, rows, bs, mp, mr, red, np_, kp, rows_p, nph_p, nt, nt_p, bases)


def _implicit_operands(
    cfg: Config, plan: _Plan, lay: _Layout, x: Array, w: Array
) -> tuple[Array, Array]:
    """Phase-row input ``(G, R * rows_p, Kp)`` and used taps' weights ``(T, G, Kp, Np)``."""
    xr = _phase_rows(taps.pad_input(x, cfg.op, cfg.geom), cfg.geom, plan)  # (R, rows, C)
    xr = xr.reshape(len(plan.phases), lay.rows, lay.g, lay.i).transpose(2, 0, 1, 3)
    a = _pad_to(xr, (lay.g, lay.nph_p, lay.rows_p, lay.kp)).reshape(
        lay.g, lay.total_rows, lay.kp)
    wt = w.reshape(-1, lay.i, lay.g, lay.og).transpose(0, 2, 1, 3)[jnp.asarray(plan.used)]
    return a, _pad_to(wt, (lay.nt_p, lay.g, lay.kp, lay.np_))


def _mask_table(plan: _Plan, lay: _Layout, rows_to: int, front: int = 0) -> Array:
    """``(front + rows_to, T_p)`` int32: tap validity per virtual output row."""
    mk = np.zeros((front + rows_to, lay.nt_p), np.int32)
    mk[front:front + lay.rows, :lay.nt] = np.tile(plan.masks, (1, lay.n)).T
    return jnp.asarray(mk)


def _from_virtual(out: Array, plan: _Plan, lay: _Layout, geom: Geometry) -> Array:
    """Virtual-row canonical ``(G, >= rows, >= Og)`` -> ``(N, *Os, G * Og)``."""
    out = out[:, :lay.rows, :lay.og].reshape(lay.g, lay.n, *plan.lengths, lay.og)
    out = out[(slice(None), slice(None), *(slice(0, o) for o in geom.out_spatial))]
    return jnp.moveaxis(out, 0, -2).reshape(lay.n, *geom.out_spatial, lay.g * lay.og)


def _contract_implicit(
    cfg: Config, x: Array, w: Array, *, term: Callable[..., Array],
    binary: Callable[[Array, Array], Array], ident: Any, y: Array | None = None,
) -> Array:
    """The forward (or tie count) as one kernel with the taps inside: ``(N, *Os, O)``.

    ``y``: the forward's output ``(N, *Os, O)``, for a ``term`` that compares with it.
    """
    geom = cfg.geom
    plan = _plan(geom, cfg.op)
    out_shape = (x.shape[0], *geom.out_spatial, w.shape[-1])
    if not plan.used:
        return jnp.full(out_shape, ident, cfg.acc_dtype)
    lay = _layout(cfg, plan, x, w)
    bs = lay.bs
    a, b = _implicit_operands(cfg, plan, lay, x, w)
    in_specs = [
        pl.BlockSpec((1, lay.total_rows, lay.kp), lambda gi, i_, j: (gi, 0, 0)),
        pl.BlockSpec((lay.nt_p, 1, lay.kp, bs.bn), lambda gi, i_, j: (0, gi, 0, j)),
    ]
    args = [a, b]
    out_spec = pl.BlockSpec((1, bs.bm, bs.bn), lambda gi, i_, j: (gi, i_, j))
    if y is not None:
        in_specs.append(out_spec)
        args.append(_to_virtual(y.astype(cfg.acc_dtype), plan, lay.g, lay.mp, lay.np_))
    if plan.skips:
        in_specs.append(pl.BlockSpec((bs.bm, lay.nt_p), lambda gi, i_, j: (i_, 0)))
        args.append(_mask_table(plan, lay, lay.mp))
    kernel = functools.partial(
        _implicit_kernel, bases=lay.bases, term=term, binary=binary, ident=ident,
        acc_dtype=cfg.acc_dtype, k_total=lay.i, has_y=y is not None, has_mask=plan.skips)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lay.g, lay.mp, lay.np_), cfg.acc_dtype),
        grid=(lay.g, lay.mp // bs.bm, lay.np_ // bs.bn),
        in_specs=in_specs,
        out_specs=out_spec,
        name="jaxconv_semiring_conv",
        **_call_options(cfg.backend, 3),
    )(*args)
    return _from_virtual(out, plan, lay, geom)


def _implicit_dw_kernel(
    at_ref: Any, b_ref: Any, y_ref: Any, s_ref: Any, mask_ref: Any, o_ref: Any, *,
    bases: tuple[int, ...], combine: Callable[..., Array], combine_vjp: Callable[..., Any],
    rule: Callable[..., Array], acc_dtype: Any, red: int,
) -> None:
    """``dw`` of one tap (a grid axis), ``(bk, bn)`` tile, summed over a chunk of rows.

    ``at_ref``: phase rows transposed ``(1, bk, R * rows_p)``; ``b_ref`` ``(1, 1, bk, bn)``;
    ``y``/``s`` ``(1, red, bn)`` virtual rows; ``mask_ref`` ``(red, T_p)``.
    """
    t = pl.program_id(1)
    base = jnp.int32(0)
    for tt, bt in enumerate(bases):  # the tap's first row: scalar selects, no table load
        base = lax.select(t == tt, jnp.int32(bt), base)
    row0 = base + pl.program_id(4) * red
    shape = o_ref.shape[-2:]
    wv = b_ref[0, 0]

    def step(i: Any, acc: Array) -> Array:
        xv = jnp.broadcast_to(at_ref[0, :, pl.ds(row0 + i, 1)], shape)
        yv, sv = y_ref[0, pl.ds(i, 1), :], s_ref[0, pl.ds(i, 1), :]
        valid = mask_ref[pl.ds(i, 1), pl.ds(t, 1)] != 0
        c = combine(xv, wv)
        dc = jnp.where(valid, rule(c.astype(acc_dtype), yv, sv), 0).astype(c.dtype)
        d = combine_vjp(xv, wv, dc)[1].astype(acc_dtype)
        return acc + jnp.where(valid, d, 0)

    o_ref[...] = lax.fori_loop(0, red, step, jnp.zeros(shape, acc_dtype)).reshape(o_ref.shape)


def _implicit_dx_kernel(
    a_ref: Any, bt_ref: Any, y_ref: Any, s_ref: Any, mask_ref: Any, o_ref: Any, *,
    phase_taps: tuple[tuple[tuple[int, int], ...], ...], rows_p: int, front: int,
    n_total: int, combine: Callable[..., Array], combine_vjp: Callable[..., Any],
    rule: Callable[..., Array], acc_dtype: Any,
) -> None:
    """``dx`` of a ``(bm, bk)`` tile of phase rows: every tap reading that phase, every n.

    Input row ``q`` of a phase gets the terms of the output rows ``q - shift`` of the taps
    in that phase. ``bt_ref`` ``(T_p, 1, Np, bk)``; ``y``/``s`` ``(1, front + rows, Np)`` and
    ``mask_ref`` ``(front + rows, T_p)`` start with ``front`` zero rows (shifts reach back).
    """
    shape = o_ref.shape[1:]
    bm = shape[0]
    row0 = pl.program_id(1) * bm
    phase = lax.div(row0, jnp.int32(rows_p))  # (jnp floor division trips Triton)
    q0 = row0 - phase * rows_p
    xv = a_ref[0]

    for ph, tap_list in enumerate(phase_taps):
        @pl.when(phase == ph)
        def _(tap_list: tuple[tuple[int, int], ...] = tap_list) -> None:
            acc = jnp.zeros(shape, acc_dtype)
            for t, shift in tap_list:
                start = q0 - shift + front
                valid = mask_ref[pl.ds(start, bm), pl.ds(t, 1)] != 0

                def step(j: Any, acc: Array, t: int = t, start: Any = start,
                         valid: Array = valid) -> Array:
                    wv = jnp.broadcast_to(bt_ref[t, 0, pl.ds(j, 1), :], shape)
                    yv = y_ref[0, pl.ds(start, bm), pl.ds(j, 1)]
                    sv = s_ref[0, pl.ds(start, bm), pl.ds(j, 1)]
                    c = combine(xv, wv)
                    dc = jnp.where(valid, rule(c.astype(acc_dtype), yv, sv), 0).astype(c.dtype)
                    d = combine_vjp(xv, wv, dc)[0].astype(acc_dtype)
                    return acc + jnp.where(valid, d, 0)

                acc = lax.fori_loop(0, n_total, step, acc)
            o_ref[0] = acc

    # Rows of the padding phases (a power-of-two count) are never read back.
    @pl.when(phase >= len(phase_taps))
    def _() -> None:
        o_ref[0] = jnp.zeros(shape, acc_dtype)


def _backward_implicit(
    cfg: Config, x: Array, w: Array, s: Array, y: Array, rule: Callable[..., Array]
) -> tuple[Array, Array]:
    """``dx``, ``dw`` with the taps inside the kernels; ``s``, ``y`` are ``(N, *Os, O)``."""
    op, geom, acc_dtype = cfg.op, cfg.geom, cfg.acc_dtype
    plan = _plan(geom, op)
    xp = taps.pad_input(x, op, geom)
    t_all = math.prod(geom.window)
    g = geom.groups
    if not plan.used:
        return (jnp.zeros(x.shape, x.dtype), jnp.zeros(w.shape, w.dtype))
    lay = _layout(cfg, plan, x, w)
    bs = lay.bs
    a, b = _implicit_operands(cfg, plan, lay, x, w)
    comb = primal(op.combine)
    comb_vjp = primal(lambda xv, wv, dc: jax.vjp(op.combine, xv, wv)[1](dc))
    kw = dict(combine=comb, combine_vjp=comb_vjp, rule=rule, acc_dtype=acc_dtype)

    # dw: grid (G, taps, K tiles, N tiles, row chunks); the chunks' partial sums added here.
    nred = lay.mr // lay.red
    yv = _to_virtual(y, plan, g, lay.mr, lay.np_)
    sv = _to_virtual(s, plan, g, lay.mr, lay.np_)
    part = pl.pallas_call(
        functools.partial(_implicit_dw_kernel, bases=lay.bases, red=lay.red, **kw),
        out_shape=jax.ShapeDtypeStruct((nred, lay.nt_p, g, lay.kp, lay.np_), acc_dtype),
        grid=(g, lay.nt, lay.kp // bs.bk, lay.np_ // bs.bn, nred),
        in_specs=[
            pl.BlockSpec((1, bs.bk, lay.total_rows), lambda gi, t, kk, j, r: (gi, kk, 0)),
            pl.BlockSpec((1, 1, bs.bk, bs.bn), lambda gi, t, kk, j, r: (t, gi, kk, j)),
            pl.BlockSpec((1, lay.red, bs.bn), lambda gi, t, kk, j, r: (gi, r, j)),
            pl.BlockSpec((1, lay.red, bs.bn), lambda gi, t, kk, j, r: (gi, r, j)),
            pl.BlockSpec((lay.red, lay.nt_p), lambda gi, t, kk, j, r: (r, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, 1, bs.bk, bs.bn),
                               lambda gi, t, kk, j, r: (r, t, gi, kk, j)),
        name="jaxconv_semiring_conv_grad_w",
        **_call_options(cfg.backend, 5),
    )(jnp.swapaxes(a, 1, 2), b, yv, sv, _mask_table(plan, lay, lay.mr))
    gw_used = jnp.sum(part, axis=0)[:lay.nt, :, :lay.i, :lay.og]
    gw_full = jnp.zeros((t_all, g, lay.i, lay.og), acc_dtype).at[
        jnp.asarray(plan.used)].set(gw_used)
    gw = gw_full.transpose(0, 2, 1, 3).reshape(w.shape)

    # dx over phase rows: grid (G, R * rows_p / bm, K tiles).
    front = max(plan.shifts)
    yrows = _padded(front + lay.rows_p, bs.bm, bs.pow2)
    yf = _pad_to(jnp.pad(yv, ((0, 0), (front, 0), (0, 0))), (g, yrows, lay.np_))
    sf = _pad_to(jnp.pad(sv, ((0, 0), (front, 0), (0, 0))), (g, yrows, lay.np_))
    mk = _pad_to(_mask_table(plan, lay, lay.mr, front), (yrows, lay.nt_p))
    phase_taps = tuple(
        tuple((t, sh) for t, (tp, sh) in enumerate(zip(plan.tap_phase, plan.shifts,
                                                        strict=True)) if tp == ph)
        for ph in range(len(plan.phases)))
    dxr = pl.pallas_call(
        functools.partial(_implicit_dx_kernel, phase_taps=phase_taps, rows_p=lay.rows_p,
                          front=front, n_total=lay.og, **kw),
        out_shape=jax.ShapeDtypeStruct((g, lay.total_rows, lay.kp), acc_dtype),
        grid=(g, lay.total_rows // bs.bm, lay.kp // bs.bk),
        in_specs=[
            pl.BlockSpec((1, bs.bm, bs.bk), lambda gi, i_, kk: (gi, i_, kk)),
            pl.BlockSpec((lay.nt_p, 1, lay.np_, bs.bk), lambda gi, i_, kk: (0, gi, 0, kk)),
            pl.BlockSpec((1, yrows, lay.np_), lambda gi, i_, kk: (gi, 0, 0)),
            pl.BlockSpec((1, yrows, lay.np_), lambda gi, i_, kk: (gi, 0, 0)),
            pl.BlockSpec((yrows, lay.nt_p), lambda gi, i_, kk: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, bs.bm, bs.bk), lambda gi, i_, kk: (gi, i_, kk)),
        name="jaxconv_semiring_conv_grad_x",
        **_call_options(cfg.backend, 3),
    )(a, jnp.swapaxes(b, 2, 3), yf, sf, mk)
    # Phase rows back onto the padded input (the transpose of _phase_rows).
    gxp = jnp.zeros(xp.shape, acc_dtype)
    n, c = x.shape[0], x.shape[-1]
    for ph, r in enumerate(plan.phases):
        v = dxr[:, ph * lay.rows_p: ph * lay.rows_p + lay.rows, :lay.i]
        v = v.transpose(1, 0, 2).reshape(n, *plan.lengths, c)
        avail = [-(-(p - ri) // st) for p, ri, st in zip(geom.padded_spatial, r, geom.strides,
                                                          strict=True)]
        keep = [min(ln, av) for ln, av in zip(plan.lengths, avail, strict=True)]
        v = v[(slice(None), *(slice(0, k) for k in keep))]
        idx = (slice(None), *(slice(ri, ri + st * k, st)
                              for ri, st, k in zip(r, geom.strides, keep, strict=True)))
        gxp = gxp.at[idx].add(v)
    _, pad_vjp = jax.vjp(lambda v: taps.pad_input(v, op, geom), x)
    (gx,) = pad_vjp(gxp.astype(x.dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


def _implicit(cfg: Config) -> bool:
    """Whether the forward runs as one kernel with the taps inside (rank-1 backends)."""
    return cfg.backend.style == "rank1"


def _pad_output(cfg: Config, pr: _Problem, y: Array) -> Array:
    """``(N, *Os, G * Og)`` -> padded canonical ``(G, Mp, Np)``."""
    y = y.reshape(pr.m, pr.g, pr.og).transpose(1, 0, 2)
    return _pad_to(y, (pr.g, pr.mp, pr.np_))


def _unpad_output(cfg: Config, pr: _Problem, acc: Array) -> Array:
    """Padded canonical ``(G, Mp, Np)`` -> ``(N, *Os, G * Og)``."""
    y = acc[:, : pr.m, : pr.og].transpose(1, 0, 2)
    return y.reshape(pr.n, *cfg.geom.out_spatial, pr.g * pr.og)


def _forward(cfg: Config, x: Array, w: Array) -> Array:
    """(N, *S, C), (*K, I, O) -> ``(N, *Os, O)`` in ``acc_dtype`` (before ``op.post``)."""
    op = cfg.op
    kw = dict(term=_combine_term(op), binary=algebra.binary(op),
              ident=_ident(op, cfg.acc_dtype))
    if _implicit(cfg):
        return _contract_implicit(cfg, x, w, **kw)
    return _unpad_output(cfg, _problem(cfg, x, w), _contract_taps(cfg, x, w, **kw))


def _grad_rule(reduce: str) -> Callable[[Array, Array, Array], Array]:
    """``dc(c, y, s)``: the cotangent of one product given the output ``y`` and scale ``s``."""
    if reduce == "sum":
        return lambda c, y, s: jnp.broadcast_to(s, c.shape)
    if reduce in ("max", "min"):
        return lambda c, y, s: jnp.where(c == y, s, 0)
    # logsumexp: the softmax weight of the term; an all -inf window has no gradient.
    return lambda c, y, s: s * jnp.where(jnp.isneginf(y), 0, jnp.exp(c - y))


def _count_term(cfg: Config) -> dict[str, Any]:
    """The forward kernel's arguments that count the taps equal to the output (ties)."""
    comb, acc_dtype = primal(cfg.op.combine), cfg.acc_dtype
    return dict(term=lambda xv, wv, yv: (comb(xv, wv).astype(acc_dtype) == yv),
                binary=jnp.add, ident=0)


def _tie_scale(gy: Array, count: Array) -> Array:
    """``g / count`` where some tap wins (ties split equally), else 0."""
    return jnp.where(count > 0, gy / jnp.maximum(count, 1), 0).astype(gy.dtype)


def _backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array) -> tuple[Array, Array]:
    """The hand-written backward on one backend; ``y``, ``gy`` are ``(N, *Os, O)``."""
    op, geom = cfg.op, cfg.geom
    pr = _problem(cfg, x, w)
    acc_dtype = cfg.acc_dtype
    rule = _grad_rule(op.reduce)
    if _implicit(cfg):
        y, gy = y.astype(acc_dtype), gy.astype(acc_dtype)
        s = gy
        if op.reduce in ("max", "min"):
            s = _tie_scale(gy, _contract_implicit(cfg, x, w, y=y, **_count_term(cfg)))
        return _backward_implicit(cfg, x, w, s, y, rule)
    y = _pad_output(cfg, pr, y.astype(acc_dtype))
    gy = _pad_output(cfg, pr, gy.astype(acc_dtype))
    s = gy
    if op.reduce in ("max", "min"):
        s = _tie_scale(gy, _contract_taps(cfg, x, w, y=y, **_count_term(cfg)))
    xp = taps.pad_input(x, op, geom)
    used, offsets, rows = _tap_tables(cfg, pr)
    w_taps = _weights_taps(w, pr)
    gw_full = jnp.zeros((w_taps.shape[0], pr.g, pr.i, pr.og), acc_dtype)
    gxp = jnp.zeros(xp.shape, acc_dtype)
    if used.size:
        kw = dict(backend=cfg.backend, op=op, rule=rule, acc_dtype=acc_dtype,
                  blocks=pr.blocks, m_total=pr.m, n_total=pr.og)
        nsd = len(geom.window)

        def step(gxp: Array, tap: tuple[Array, Array, Array]) -> tuple[Array, Array]:
            off, r, b = tap
            a = _tap_lhs(cfg, pr, xp, off)
            da = _grad_call(a, b, y, s, r, wrt=0, **kw)[:, : pr.m, : pr.i]
            db = _grad_call(a, b, y, s, r, wrt=1, **kw)[:, : pr.i, : pr.og]
            da = da.transpose(1, 0, 2).reshape(pr.n, *geom.out_spatial, pr.g * pr.i)
            # Transpose of the strided tap slice: interleave the strides' holes, then add
            # into the padded input's gradient at the tap's offset (traced here, inside the
            # scan, so not ``taps.tap_unslice``, which takes a static tap).
            cfg_pad = [(0, 0, 0), *((0, 0, st - 1) for st in geom.strides), (0, 0, 0)]
            da = lax.pad(da, jnp.zeros((), da.dtype), cfg_pad)
            start = (jnp.zeros((), jnp.int32), *(off[d] for d in range(nsd)),
                     jnp.zeros((), jnp.int32))
            cur = lax.dynamic_slice(gxp, start, da.shape)
            return lax.dynamic_update_slice(gxp, cur + da, start), db

        gxp, gw_used = lax.scan(
            step, gxp, (jnp.asarray(offsets), jnp.asarray(rows), w_taps[jnp.asarray(used)]))
        gw_full = gw_full.at[jnp.asarray(used)].set(gw_used)
    _, pad_vjp = jax.vjp(lambda v: taps.pad_input(v, op, geom), x)
    (gx,) = pad_vjp(gxp.astype(x.dtype))
    gw = gw_full.transpose(0, 2, 1, 3).reshape(w.shape)
    return gx.astype(x.dtype), gw.astype(w.dtype)


def _forward_all(spec: Spec, x: Array, w: Array) -> Array:
    return _on_platforms(
        spec.backends, lambda be: functools.partial(_forward, spec.config(be)), x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_hand_vjp(spec: Spec, x: Array, w: Array) -> Array:
    return _forward_all(spec, x, w)


def _conv_hand_fwd(spec: Spec, x: Array, w: Array) -> tuple[Array, tuple[Array, ...]]:
    y = _forward_all(spec, x, w)
    return y, (x, w, y)


def _conv_hand_bwd(spec: Spec, res: tuple[Array, ...], gy: Array) -> tuple[Array, Array]:
    x, w, y = res
    return _on_platforms(
        spec.backends, lambda be: functools.partial(_backward, spec.config(be)), x, w, y, gy)


_conv_hand_vjp.defvjp(_conv_hand_fwd, _conv_hand_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_xla_vjp(spec: Spec, x: Array, w: Array) -> Array:
    return _forward_all(spec, x, w)


def _conv_xla_fwd(spec: Spec, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _forward_all(spec, x, w), (x, w)


def _conv_xla_bwd(spec: Spec, res: tuple[Array, Array], gy: Array) -> tuple[Array, Array]:
    # prod and user reduces: no kernel form of the gradient; differentiate the XLA engine
    # (which recomputes its forward block by block under jax.checkpoint).
    x, w = res

    def f(xv: Array, wv: Array) -> Array:
        return primitive.canonical_conv(
            xv, wv, spec.geom, spec.op.replace(post=None), engine="xla",
            preferred_element_type=spec.acc_dtype, max_block_bytes=spec.max_block_bytes)

    _, vjp = jax.vjp(f, x, w)
    gx, gw = vjp(gy.astype(spec.acc_dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


_conv_xla_vjp.defvjp(_conv_xla_fwd, _conv_xla_bwd)


# --- the core's engine protocol (`jaxconv._src.core.engine`) on canonical problems ---------

def _spec_of(problem: Problem) -> Spec:
    return Spec(problem.op, problem.geom, problem.acc_dtype, platform_backends(),
                problem.max_block_bytes)


def forward(problem: Problem, x: Array, w: Array) -> Array:
    """The product of canonical ``x`` and ``w`` in the accumulation dtype."""
    return _forward_all(_spec_of(problem), x, w).astype(problem.acc_dtype)


def backward(problem: Problem, x: Array, w: Array, y: Array, g: Array,
             need: tuple[bool, bool]) -> tuple[Array, Array]:
    """The input and kernel gradients from the forward's ``y`` (not recomputed)."""
    del need
    spec = _spec_of(problem)
    if problem.op.reduce_name in algebra.HAND_VJP_REDUCES:
        return _conv_hand_bwd(spec, (x, w, y), g.astype(problem.acc_dtype))
    return _conv_xla_bwd(spec, (x, w), g)


class PallasEngine(registry.Engine):
    """The Pallas kernels on the core's protocol: every problem on every platform
    (interpret mode on CPU); forward-mode tangents are the XLA engine's formulas."""

    name = "pallas"

    def refusal(self, problem: Problem, dtype: Any, platform: str | None) -> str | None:
        del problem, dtype, platform
        return None

    def forward(self, problem: Problem, x: Array, w: Array) -> Array:
        return forward(problem, x, w)

    def backward(self, problem: Problem, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        return backward(problem, x, w, y, g, need)

    def tangent(self, problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        return registry.get("xla").tangent(problem, x, w, y, tx, tw, active)

    def describe(self, problem: Problem, dtype: Any) -> tuple[str, ...]:
        del dtype
        return (f"Pallas kernels under {algebra.capabilities(problem.op).reduce!r} "
                "(interpret mode on CPU, Triton on GPU, Mosaic on TPU)",)


ENGINE = PallasEngine()


def generic_conv(
    x: Array,
    w: Array,
    geom: Geometry,
    op: Op,
    *,
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
    interpret: bool | None = None,
    blocks: BlockSizes | None = None,
    backend: Backend | None = None,
) -> Array:
    """Generalized convolution on canonical layouts with Pallas kernels.

    Same contract as the XLA engine's ``generic_conv``. The kernels are chosen per platform
    when the program is lowered: interpret mode on CPU, Triton on CUDA / ROCm, Mosaic on TPU.

    Args:
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, C // groups, O)`` kernel.
      geom: the static geometry (padding already resolved to pairs).
      op: the product.
      preferred_element_type: accumulation / output dtype, as in ``lax``.
      max_block_bytes: bound on intermediate bytes; the Pallas kernels keep one
        ``(bm, bn)`` tile per program, so it only matters for the XLA-engine backward of
        reduces without a kernel gradient (``prod``, user callables).
      interpret: ``True``: interpret mode on every platform (debugging); default: each
        platform's kernel.
      blocks: tile sizes for every platform (default: each platform's).
      backend: one `Backend` for every platform (tests; overrides the other two).

    Returns:
      ``(N, *out_spatial, O)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import ops
      >>> from jaxconv._src.core.geometry import Geometry
      >>> geom = Geometry((4,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
      >>> generic_conv(jnp.arange(4.0).reshape(1, 4, 1), jnp.zeros((2, 1, 1)), geom,
      ...              ops.max_plus)[0, :, 0]
      Array([1., 2., 3.], dtype=float32)
    """
    x, w, out_dtype, acc_dtype = taps.resolve_dtypes(x, w, op, preferred_element_type)
    n, o = x.shape[0], w.shape[-1]
    if n == 0 or o == 0:
        return jnp.zeros((n, *geom.out_spatial, o), out_dtype)
    spec = Spec(op, geom, acc_dtype,
                platform_backends(interpret=interpret, blocks=blocks, backend=backend),
                max_block_bytes)
    if op.reduce_name in algebra.HAND_VJP_REDUCES:
        y = _conv_hand_vjp(spec, x, w)
    else:
        y = _conv_xla_vjp(spec, x, w)
    return taps.finish(y, op, out_dtype)
