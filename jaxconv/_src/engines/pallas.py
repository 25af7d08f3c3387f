"""The Pallas engine: any ``Op`` as a blocked semiring matmul, one kernel call per tap.

The core is :func:`semiring_matmul`, a Pallas kernel for

    out[g, m, n] = REDUCE_k combine(a[g, m, k], b[g, k, n])

on a grid ``(G, M / bm, N / bn)`` whose axes are all parallel: each program owns one
``(bm, bn)`` output tile, keeps its accumulator in registers / VMEM (initialised with the
reduce's identity, or with the running result of the previous taps) and walks K inside the
kernel, in blocks of ``bk`` columns, by rank-1 steps
``acc = reduce(acc, combine(a[:, k], b[k, :]))``. Combine and reduce are fused and no
``(bm, bk, bn)`` product is ever stored. (K is a loop, not a grid axis: on GPU the programs
of a grid run concurrently, so accumulating over a grid axis would race.) Only the binary
form of the reduce is used, so any reduce works (``sum``, ``max``, ``min``, ``prod``,
``logsumexp``, a user's ``myadd``) and NaN propagates (elementwise ``maximum`` keeps NaN,
unlike XLA CPU's vectorised max reductions).

:func:`generic_conv` has the XLA engine's signature and semantics. For every kernel tap the
(padded) input is sliced exactly as the XLA engine does (no im2col tensor), the tap is one
``semiring_matmul`` call whose accumulator input is the previous taps' result (the taps are
a ``lax.scan``, so each kernel is traced and compiled once), and a per-row
mask leaves rows whose tap falls in padding (or an ``lhs_dilation`` hole) untouched, which is
the identity-padding semantics; ops with a ``pad_value`` pad with the value instead. Feature
groups are the kernel's leading grid axis; a dense product is a conv with one tap.

Gradients (``custom_vjp``) for ``sum``, ``max``, ``min`` and ``logsumexp`` are Pallas kernels
too: two kernels with the roles transposed (``dx`` reduces over the output features, ``dw``
over the rows) recompute ``combine`` block by block and push the output cotangent through
``combine``'s own VJP (so AdderNet's and the STE rules apply), with the reduce's rule:
``sum`` passes ``g``; ``max``/``min`` pass ``g / count`` to the taps equal to the output
(ties split equally, the count being one more semiring-matmul pass); ``logsumexp`` passes
``g * exp(c - y)``. Other reduces (``prod``, user callables) run the Pallas forward and take
their gradient from the XLA engine (recomputed there), because a winning-term rule does not
exist for an arbitrary reduce.

Block sizes: 64 x 64 output tiles with 32-deep K blocks on GPU, 128 x 128 x 128 on TPU, and
8 x 8 x 8 in interpret mode (CPU), small so that tests cover several blocks and ragged edges.
On CPU the kernels run with ``interpret=True`` (detected from the backend): correct, but slow
-- the XLA engine is the CPU engine; this one is for accelerators.
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

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op
from jaxconv._src.engines import taps
from jaxconv._src.engines import xla as engine_xla
from jaxconv._src.engines.xla import Geometry

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the semiring matmul: ``bm x bn`` output tiles, ``bk``-deep K blocks.

    ``pow2``: pad every extent a kernel sees whole (K in the forward, the reduced M or N in
    the gradient kernels) to a power of two, and keep tiles powers of two -- Triton (GPU)
    only handles power-of-two block shapes.
    """

    bm: int
    bn: int
    bk: int
    pow2: bool = False


GPU_BLOCKS = BlockSizes(64, 64, 32, pow2=True)
TPU_BLOCKS = BlockSizes(128, 128, 128)
INTERPRET_BLOCKS = BlockSizes(8, 8, 8)


def default_interpret() -> bool:
    """Interpret mode everywhere except on GPU and TPU backends."""
    return jax.default_backend() not in ("gpu", "tpu", "cuda", "rocm")


def default_blocks(interpret: bool) -> BlockSizes:
    """The block sizes for the current backend (or for interpret mode)."""
    if interpret:
        return INTERPRET_BLOCKS
    return TPU_BLOCKS if jax.default_backend() == "tpu" else GPU_BLOCKS


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

    Tiles become multiples of 8, or powers of two (at least 16) with ``pow2``.
    """
    if blocks.pow2:
        def fit(b: int, v: int) -> int:
            return min(b, max(16, _next_pow2(v)))
    else:
        def fit(b: int, v: int) -> int:
            return min(b, _round_up(v, 8))
    return BlockSizes(fit(blocks.bm, m), fit(blocks.bn, n), fit(blocks.bk, k), blocks.pow2)


def _padded(v: int, block: int, pow2: bool) -> int:
    """Extent of a padded axis: a multiple of ``block`` (a power of two with ``pow2``)."""
    return max(block, _next_pow2(v)) if pow2 else _round_up(v, block)


def _pad_to(a: Array, shape: tuple[int, ...]) -> Array:
    widths = [(0, s - d) for d, s in zip(a.shape, shape, strict=True)]
    if all(hi == 0 for _, hi in widths):
        return a
    return jnp.pad(a, widths)


def _compiler_params(ndims: int) -> Any:
    """Every grid axis is parallel (the contraction is a loop inside the kernel)."""
    if jax.default_backend() != "tpu":
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel",) * ndims)


# ----------------------------------------------------------------------------- kernels


def _contract_kernel(
    *refs: Any,
    term: Callable[..., Array],
    binary: Callable[[Array, Array], Array],
    ident: Any,
    acc_dtype: Any,
    bk: int,
    k_total: int,
    has_y: bool,
    has_acc: bool,
    has_mask: bool,
) -> None:
    """One ``(bm, bn)`` output tile: ``acc = binary(acc, term(combine(a[:, k], b[k, :])))``.

    The accumulator lives in registers / VMEM for the whole contraction: an outer loop over
    K blocks of ``bk`` columns, an inner loop of rank-1 updates within a block.
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
    if acc_ref is not None:
        start = acc_ref[0]
    else:
        start = jnp.full(shape, ident, acc_dtype)
    y = y_ref[0] if y_ref is not None else None

    def step(k: Any, acc: Array) -> Array:
        col = a_ref[0, :, pl.ds(k, 1)]  # (bm, 1)
        row = b_ref[0, pl.ds(k, 1), :]  # (1, bn)
        c = term(jnp.broadcast_to(col, shape), jnp.broadcast_to(row, shape), y)
        return binary(acc, c.astype(acc_dtype))

    def block(kb: Any, acc: Array) -> Array:
        return lax.fori_loop(kb * bk, kb * bk + bk, step, acc)

    # Full K blocks, then the ragged tail: the zero padding of K never reaches combine.
    acc = lax.fori_loop(0, k_total // bk, block, start)
    if k_total % bk:
        acc = lax.fori_loop(k_total - k_total % bk, k_total, step, acc)
    if mask_ref is not None:
        # Rows whose tap lies in padding keep their previous value: the tap is skipped.
        acc = jnp.where(mask_ref[...] != 0, acc, start)
    o_ref[0] = acc


def _contract(
    a: Array,
    b: Array,
    *,
    term: Callable[..., Array],
    binary: Callable[[Array, Array], Array],
    ident: Any,
    acc_dtype: Any,
    blocks: BlockSizes,
    k_total: int,
    interpret: bool,
    y: Array | None = None,
    acc: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Padded operands ``a (G, Mp, Kp)``, ``b (G, Kp, Np)`` -> ``(G, Mp, Np)``.

    Grid ``(G, Mp / bm, Np / bn)``, every axis parallel (on GPU the programs of a grid run
    concurrently, so the contraction is a loop inside the kernel, not a grid axis).
    """
    g, mp, kp = a.shape
    np_ = b.shape[-1]
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    grid = (g, mp // bm, np_ // bn)
    out_spec = pl.BlockSpec((1, bm, bn), lambda gi, i, j: (gi, i, j))
    in_specs = [
        pl.BlockSpec((1, bm, kp), lambda gi, i, j: (gi, i, 0)),
        pl.BlockSpec((1, kp, bn), lambda gi, i, j: (gi, 0, j)),
    ]
    args = [a, b]
    if y is not None:
        in_specs.append(out_spec)
        args.append(y)
    if acc is not None:
        in_specs.append(out_spec)
        args.append(acc)
    if mask is not None:
        in_specs.append(pl.BlockSpec((bm, 1), lambda gi, i, j: (i, 0)))
        args.append(mask)
    kernel = functools.partial(
        _contract_kernel, term=term, binary=binary, ident=ident, acc_dtype=acc_dtype, bk=bk,
        k_total=k_total, has_y=y is not None, has_acc=acc is not None,
        has_mask=mask is not None)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, mp, np_), acc_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=_compiler_params(3),
        name="jaxconv_semiring_matmul",
    )(*args)


def semiring_matmul(
    a: Array,
    b: Array,
    op: Op,
    *,
    acc_dtype: Any | None = None,
    blocks: BlockSizes | None = None,
    interpret: bool | None = None,
) -> Array:
    """``out[g, m, n] = REDUCE_k combine(a[g, m, k], b[g, k, n])`` as one Pallas kernel.

    Args:
      a: ``(G, M, K)`` or ``(M, K)`` left operand.
      b: ``(G, K, N)`` or ``(K, N)`` right operand.
      op: the product (``op.rewrite`` and ``op.pad_value`` are not used; ``op.post`` is).
      acc_dtype: accumulation and output dtype (default: the XLA engine's choice).
      blocks: tile sizes (default: :func:`default_blocks`).
      interpret: run the kernel in interpret mode (default: on CPU).

    Returns:
      ``(G, M, N)`` (or ``(M, N)``) in ``acc_dtype``.
    """
    squeeze = a.ndim == 2
    if squeeze:
        a, b = a[None], b[None]
    dtype = jnp.result_type(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    acc_dtype = jnp.dtype(acc_dtype or algebra.accumulation_dtype(op, dtype, None))
    interpret = default_interpret() if interpret is None else interpret
    g, m, k = a.shape
    n = b.shape[-1]
    bs = _fit(blocks or default_blocks(interpret), m, n, k)
    mp, np_, kp = (_padded(m, bs.bm, bs.pow2), _padded(n, bs.bn, bs.pow2),
                   _padded(k, bs.bk, bs.pow2))
    out = _contract(
        _pad_to(a, (g, mp, kp)), _pad_to(b, (g, kp, np_)),
        term=lambda x, w, y: op.combine(x, w), binary=algebra.binary(op),
        ident=_ident(op, acc_dtype), acc_dtype=acc_dtype, blocks=bs,
        k_total=k, interpret=interpret)[:, :m, :n]
    if op.post is not None:
        out = op.post(out)
    return out[0] if squeeze else out


def _grad_kernel(
    a_ref: Any, bt_ref: Any, y_ref: Any, s_ref: Any, mask_ref: Any, o_ref: Any, *,
    op: Op, rule: Callable[..., Array], acc_dtype: Any, red_total: int, wrt: int,
) -> None:
    """One gradient tile; ``wrt=0``: ``dx (bm, bk)`` summed over n, ``wrt=1``: ``dw (bk, bn)``.

    ``wrt=0``: ``a_ref`` is ``a (bm, bk)``, ``bt_ref`` is ``b^T (Np, bk)``, ``y``/``s`` are
    ``(bm, Np)``, ``mask`` ``(bm, 1)``; step ``j`` takes row ``j`` of ``b^T`` and column ``j`` of
    ``y`` and ``s``. ``wrt=1``: ``a_ref`` is ``a^T (bk, Mp)``, ``bt_ref`` is ``b (bk, bn)``,
    ``y``/``s`` are ``(Mp, bn)``, ``mask`` ``(Mp, 1)``; step ``i`` takes column ``i`` of ``a^T``
    and row ``i`` of ``y``, ``s`` and the mask. The loop runs over the real rows / features
    only, so padding never reaches combine's VJP.
    """
    shape = o_ref.shape[1:]

    def step(i: Any, acc: Array) -> Array:
        if wrt == 0:
            xv = a_ref[0]
            wv = jnp.broadcast_to(bt_ref[0, pl.ds(i, 1), :], shape)
            yv = y_ref[0, :, pl.ds(i, 1)]
            sv = s_ref[0, :, pl.ds(i, 1)]
            valid = mask_ref[...] != 0
        else:
            xv = jnp.broadcast_to(a_ref[0, :, pl.ds(i, 1)], shape)
            wv = bt_ref[0]
            yv = y_ref[0, pl.ds(i, 1), :]
            sv = s_ref[0, pl.ds(i, 1), :]
            valid = mask_ref[pl.ds(i, 1), :] != 0
        c, vjp = jax.vjp(op.combine, xv, wv)
        dc = rule(c.astype(acc_dtype), yv, sv)
        # Skipped (padded) taps carry no gradient, and no 0 * inf reaches it.
        dc = jnp.where(valid, dc, 0).astype(c.dtype)
        return acc + vjp(dc)[wrt].astype(acc_dtype)

    o_ref[0] = lax.fori_loop(0, red_total, step, jnp.zeros(shape, acc_dtype))


def _grad_call(
    a: Array, b: Array, y: Array, s: Array, mask: Array, *, op: Op, rule: Callable[..., Array],
    acc_dtype: Any, blocks: BlockSizes, m_total: int, n_total: int, wrt: int, interpret: bool,
) -> Array:
    """Padded ``a (G, Mp, Kp)``, ``b (G, Kp, Np)``, ``y, s (G, Mp, Np)``, ``mask (Mp, 1)``.

    Returns ``dx (G, Mp, Kp)`` (``wrt=0``, grid over ``(G, M, K)`` tiles, a loop over the
    output features) or ``dw (G, Kp, Np)`` (``wrt=1``, grid over ``(G, K, N)`` tiles, a loop
    over the rows): the forward kernel with the roles transposed.
    """
    g, mp, kp = a.shape
    np_ = b.shape[-1]
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    if wrt == 0:
        grid = (g, mp // bm, kp // bk)
        in_specs = [
            pl.BlockSpec((1, bm, bk), lambda gi, i, kk: (gi, i, kk)),
            pl.BlockSpec((1, np_, bk), lambda gi, i, kk: (gi, 0, kk)),
            pl.BlockSpec((1, bm, np_), lambda gi, i, kk: (gi, i, 0)),
            pl.BlockSpec((1, bm, np_), lambda gi, i, kk: (gi, i, 0)),
            pl.BlockSpec((bm, 1), lambda gi, i, kk: (i, 0)),
        ]
        out_spec = pl.BlockSpec((1, bm, bk), lambda gi, i, kk: (gi, i, kk))
        out_shape = (g, mp, kp)
        args = (a, jnp.swapaxes(b, 1, 2), y, s, mask)
        red_total = n_total
    else:
        grid = (g, kp // bk, np_ // bn)
        in_specs = [
            pl.BlockSpec((1, bk, mp), lambda gi, kk, j: (gi, kk, 0)),
            pl.BlockSpec((1, bk, bn), lambda gi, kk, j: (gi, kk, j)),
            pl.BlockSpec((1, mp, bn), lambda gi, kk, j: (gi, 0, j)),
            pl.BlockSpec((1, mp, bn), lambda gi, kk, j: (gi, 0, j)),
            pl.BlockSpec((mp, 1), lambda gi, kk, j: (0, 0)),
        ]
        out_spec = pl.BlockSpec((1, bk, bn), lambda gi, kk, j: (gi, kk, j))
        out_shape = (g, kp, np_)
        args = (jnp.swapaxes(a, 1, 2), b, y, s, mask)
        red_total = m_total
    kernel = functools.partial(
        _grad_kernel, op=op, rule=rule, acc_dtype=acc_dtype, red_total=red_total, wrt=wrt)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, acc_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=_compiler_params(3),
        name=f"jaxconv_semiring_grad_{'x' if wrt == 0 else 'w'}",
    )(*args)


# ----------------------------------------------------------------------------- conv


@dataclasses.dataclass(frozen=True)
class Config:
    """Static parameters of one Pallas convolution (hashable: a ``custom_vjp`` static arg)."""

    op: Op
    geom: Geometry
    acc_dtype: Any
    blocks: BlockSizes
    interpret: bool
    max_block_bytes: int | None


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
    return _Problem(n, p, g, i, og, _fit(cfg.blocks, n * p, og, i))


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
    """(*K, I, O) -> padded ``(T, G, Kp, Np)``.

    Not ``taps.taps_major`` (``(T, G, Og, I)``): the matmul's ``b`` operand is K-major.
    """
    *k, i, o = w.shape
    wt = w.reshape(math.prod(k), i, pr.g, pr.og).transpose(0, 2, 1, 3)
    return _pad_to(wt, (wt.shape[0], pr.g, pr.kp, pr.np_))


def _contract_taps(
    cfg: Config, x: Array, w: Array, *, term: Callable[..., Array],
    binary: Callable[[Array, Array], Array], ident: Any, y: Array | None = None,
) -> Array:
    """Accumulates ``term(combine)`` over every tap and channel: ``(G, Mp, Np)`` padded.

    The taps are a ``lax.scan`` (the kernel is traced and compiled once); each step is one
    kernel call whose accumulator input is the running result.
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
            _tap_lhs(cfg, pr, xp, off), b, term=term, binary=binary, ident=ident,
            acc_dtype=cfg.acc_dtype, blocks=pr.blocks, k_total=pr.i, interpret=cfg.interpret,
            y=y, acc=acc, mask=r)
        return acc, None

    acc, _ = lax.scan(step, acc0, (jnp.asarray(offsets), jnp.asarray(rows), w_taps))
    return acc


def _forward(cfg: Config, x: Array, w: Array) -> Array:
    """(N, *S, C), (*K, I, O) -> padded canonical ``(G, Mp, Np)`` in ``acc_dtype``."""
    op = cfg.op
    return _contract_taps(
        cfg, x, w, term=lambda xv, wv, y: op.combine(xv, wv), binary=algebra.binary(op),
        ident=_ident(op, cfg.acc_dtype))


def _unpad_output(cfg: Config, pr: _Problem, acc: Array) -> Array:
    """``(G, Mp, Np)`` -> ``(N, *Os, G * Og)``."""
    y = acc[:, : pr.m, : pr.og].transpose(1, 0, 2)
    return y.reshape(pr.n, *cfg.geom.out_spatial, pr.g * pr.og)


def _grad_rule(reduce: str) -> Callable[[Array, Array, Array], Array]:
    """``dc(c, y, s)``: the cotangent of one product given the output ``y`` and scale ``s``."""
    if reduce == "sum":
        return lambda c, y, s: jnp.broadcast_to(s, c.shape)
    if reduce in ("max", "min"):
        return lambda c, y, s: jnp.where(c == y, s, 0)
    # logsumexp: the softmax weight of the term; an all -inf window has no gradient.
    return lambda c, y, s: s * jnp.where(jnp.isneginf(y), 0, jnp.exp(c - y))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_hand_vjp(cfg: Config, x: Array, w: Array) -> Array:
    return _forward(cfg, x, w)


def _conv_hand_fwd(cfg: Config, x: Array, w: Array) -> tuple[Array, tuple[Array, ...]]:
    y = _forward(cfg, x, w)
    return y, (x, w, y)


def _conv_hand_bwd(cfg: Config, res: tuple[Array, ...], gy: Array) -> tuple[Array, Array]:
    x, w, y = res
    op, geom = cfg.op, cfg.geom
    pr = _problem(cfg, x, w)
    acc_dtype = cfg.acc_dtype
    gy = gy.astype(acc_dtype)
    if op.reduce in ("max", "min"):
        # Number of tied winners per output: one more pass of the forward kernel.
        count = _contract_taps(
            cfg, x, w, term=lambda xv, wv, yv: (op.combine(xv, wv).astype(acc_dtype) == yv),
            binary=jnp.add, ident=0, y=y)
        s = jnp.where(count > 0, gy / jnp.maximum(count, 1), 0).astype(acc_dtype)
    else:
        s = gy
    rule = _grad_rule(op.reduce)
    xp = taps.pad_input(x, op, geom)
    used, offsets, rows = _tap_tables(cfg, pr)
    w_taps = _weights_taps(w, pr)
    gw_full = jnp.zeros((w_taps.shape[0], pr.g, pr.i, pr.og), acc_dtype)
    gxp = jnp.zeros(xp.shape, acc_dtype)
    if used.size:
        kw = dict(op=op, rule=rule, acc_dtype=acc_dtype, blocks=pr.blocks, m_total=pr.m,
                  n_total=pr.og, interpret=cfg.interpret)
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


_conv_hand_vjp.defvjp(_conv_hand_fwd, _conv_hand_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_xla_vjp(cfg: Config, x: Array, w: Array) -> Array:
    return _forward(cfg, x, w)


def _conv_xla_fwd(cfg: Config, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _forward(cfg, x, w), (x, w)


def _conv_xla_bwd(cfg: Config, res: tuple[Array, Array], gy: Array) -> tuple[Array, Array]:
    # prod and user reduces: no kernel form of the gradient; differentiate the XLA engine
    # (which recomputes its forward block by block under jax.checkpoint).
    x, w = res
    pr = _problem(cfg, x, w)
    gy = _unpad_output(cfg, pr, gy)

    def f(xv: Array, wv: Array) -> Array:
        return engine_xla.generic_conv(
            xv, wv, cfg.geom, cfg.op.replace(post=None), preferred_element_type=cfg.acc_dtype,
            max_block_bytes=cfg.max_block_bytes)

    _, vjp = jax.vjp(f, x, w)
    gx, gw = vjp(gy.astype(cfg.acc_dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


_conv_xla_vjp.defvjp(_conv_xla_fwd, _conv_xla_bwd)


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
) -> Array:
    """Generalized convolution on canonical layouts with Pallas kernels.

    Same contract as :func:`jaxconv._src.engine_xla.generic_conv`.

    Args:
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, C // groups, O)`` kernel.
      geom: the static geometry (padding already resolved to pairs).
      op: the product.
      preferred_element_type: accumulation / output dtype, as in ``lax``.
      max_block_bytes: bound on intermediate bytes; the Pallas kernels keep one
        ``(bm, bn)`` tile per program, so it only matters for the XLA-engine backward of
        reduces without a kernel gradient (``prod``, user callables).
      interpret: run the kernels in interpret mode (default: unless on GPU / TPU).
      blocks: tile sizes (default: :func:`default_blocks`).

    Returns:
      ``(N, *out_spatial, O)``.
    """
    x, w, out_dtype, acc_dtype = taps.resolve_dtypes(x, w, op, preferred_element_type)
    interpret = default_interpret() if interpret is None else bool(interpret)
    n, o = x.shape[0], w.shape[-1]
    if n == 0 or o == 0:
        return jnp.zeros((n, *geom.out_spatial, o), out_dtype)
    cfg = Config(op, geom, acc_dtype, blocks or default_blocks(interpret), interpret,
                 max_block_bytes)
    pr = _problem(cfg, x, w)
    if op.reduce_name in algebra.HAND_VJP_REDUCES:
        acc = _conv_hand_vjp(cfg, x, w)
    else:
        acc = _conv_xla_vjp(cfg, x, w)
    return taps.finish(_unpad_output(cfg, pr, acc), op, out_dtype)
