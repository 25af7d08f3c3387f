"""The generic XLA engine: any ``Op`` as a loop over kernel taps, tiled to a memory bound.

It implements the planner's protocol (`jaxconv._src.core.planner`): `forward`,
`backward` (the transpose of the tangent, reverse mode) and `tangent` (forward
mode), each the lowering of one of the core's primitives (`jaxconv._src.core.primitive`),
which also fold ``vmap`` into the problem. It serves every op on every platform.

Layout inside the engine is canonical: ``x`` is ``(N, *spatial, C)`` and ``w`` is
``(*window, I, O)`` with ``C = G * I`` and ``O = G * Og`` for ``G`` feature groups. A dense
product is the same problem with no spatial dimensions and one tap.

Forward: for every kernel tap the input is sliced with the tap's offset and the strides (no
im2col tensor is built), the products ``combine(x, w)`` of shape ``(rows, G, Og, I)`` are
reduced over the input channels ``I`` (the innermost axis: XLA CPU fuses the broadcast, the
combine and the reduction into one kernel) and the taps' partial results are accumulated
with the reduce's binary form. The batch is cut into blocks of whole images whose products
fit ``max_block_bytes``; blocks and taps are one rolled loop over their pairs (nested loops
are twice the loop code to compile: XLA CPU's compile time is mostly LLVM compiling each
kernel, so this engine keeps the number of distinct kernels low). A user's multiply-and-add
tap is a matrix product.

Padding: with ``op.pad_value is None`` padded cells (and ``lhs_dilation`` holes) are skipped:
they hold 0 and a static mask replaces every padded tap's partial result by the identity (a
`dominated_fill` would need no mask, but a non-finite kernel entry turns it into NaN, and it
measured no faster). With a pad value the cells hold it and go through ``combine``.

The taps are a rolled loop (dynamic slices at each tap's offset), so the compiled code does
not grow with the window.

Max/min have no branch on the values: XLA CPU's vectorised max reductions drop NaN, so the
outputs with a NaN product are found by a native sum-convolution of 0/1 indicators
(`_nan_outputs`, in a loop whose trip count is 0 unless the operands hold the values that
make a NaN product: a NaN, or both infinities for ``x + w``) and set to NaN; the padding of
the tap loop is masked (no dominated fill, which a non-finite kernel entry would turn into
NaN).
``ops.log`` still chooses from the values (``lax.cond``; under ``vmap`` the primitives fold
the mapped axis into the problem, so the predicate stays a scalar): a native convolution in
exp space unless a window needs the exact two-pass path (`_log_fast_or_exact`), and its
backward follows the same test.

Backward passes for sum, max, min and logsumexp are written by hand: they
keep only ``x``, ``w`` and the output and recompute the products, pushing the cotangent
through ``combine``'s own VJP (so AdderNet's custom rule applies). No product tensor is
stored: per tap, the input gradient is a loop over the output channels (an elementwise
update that XLA fuses into one vectorised loop), the kernel gradient a scan over blocks of
positions, and max/min first count each window's winners in a loop over taps and chunks of
output channels (the gradient is split equally among ties, as ``jax.grad(jnp.max)`` does).
Other reduces are differentiated automatically, block by block under ``jax.checkpoint``.

Faster backward paths where the op allows them:

- Separable sums (`separable_kind`): a user's ``x * w`` runs forward and backward as one
  native convolution of the padded input; AdderNet's kernel gradient ``sum g * (x - w)`` is
  the native convolution's kernel gradient minus ``w`` times the sum of the cotangent over
  each tap's positions, and only its clipped input gradient keeps the loop above.
- Max/min (`_winner_backward`; a pad value, or identity padding held as 0 with the padded
  taps masked statically): one fused reduction per tap writes, for each output, the sum of
  ``base + index`` over its winning products, which names the winner when there is one;
  the cotangent then goes through ``combine``'s VJP at that product and is scatter-added
  onto the input and the kernel. Tied windows and infinite outputs are recomputed
  `MAX_SPARSE_TIES` at a time in a ``while_loop`` (no iteration without them) and split
  equally; there is no fallback branch.

The canonical-layout helpers (tap slices, taps-major kernels, batch blocks, padding, dtypes)
are `jaxconv._src.engines.taps`, shared with the other engines.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps

Array = jax.Array

DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Config:
    op: Op
    geom: Geometry
    acc_dtype: Any
    max_block_bytes: int
    block: int  # images (rows) per block in the forward pass
    block_bwd: int  # images per block in the backward pass (several products live at once)
    unroll: int = 8  # steps of the input gradient's loop over output channels per iteration


def block_size(
    geom: Geometry, n: int, in_features: int, out_per_group: int, itemsize: int,
    max_block_bytes: int,
) -> int:
    """Images per block so that one tap's ``(block, P, G, Og, I)`` products fit the bound."""
    per_image = max(1, math.prod(geom.out_spatial)) * in_features * out_per_group * itemsize
    return int(max(1, min(n, max_block_bytes // max(per_image, 1))))


def canonical_op(op: Op) -> Op:
    return algebra.capabilities(op).canonical


def dominated_fill(op: Op) -> float | None:
    return algebra.capabilities(op).dominated_fill


def _fwd_products(op: Op, xs: Array, wk: Array) -> Array:
    """``combine`` over ``(Nb, P, G, Og, I)``: ``xs`` (Nb, P, G, I), ``wk`` (G, Og, I)."""
    shape = (*xs.shape[:3], wk.shape[1], xs.shape[3])
    return op.combine(jnp.broadcast_to(xs[:, :, :, None, :], shape),
                      jnp.broadcast_to(wk[None, None], shape))


def _reduce_tap(op: Op, xs: Array, wk: Array, acc_dtype: Any) -> Array:
    """One tap's products reduced over the input channels: ``(Nb, P, G, Og)``."""
    if op.reduce == "sum" and algebra.capabilities(op).combine == "mul":
        # A user's multiply-and-add: the tap is a matrix product. (Written as a broadcast
        # and a reduction, XLA CPU turns it into one tiny matrix-vector product per
        # position, ~100x slower.)
        return jnp.einsum("npgi,goi->npgo", xs, wk, preferred_element_type=acc_dtype,
                          precision=lax.Precision.HIGHEST)
    c = _fwd_products(op, xs, wk)
    if op.reduce != "logsumexp":
        return algebra.reduce_last(op, c, acc_dtype)
    # Two passes (max, then the shifted sum of exponentials). The barrier stops XLA from
    # sharing the products between them, which would write them to memory; recomputing
    # them in each fused reduction is cheaper than storing them.
    m = jnp.max(c, axis=-1).astype(acc_dtype)
    m = jnp.where(jnp.isfinite(m), m, 0).astype(acc_dtype)
    xs2, wk2 = lax.optimization_barrier((xs, wk))
    c2 = _fwd_products(op, xs2, wk2).astype(acc_dtype)
    s = jnp.sum(jnp.exp(c2 - m[..., None]), axis=-1)
    return jnp.log(s) + m


def _live_taps(geom: Geometry, mask: np.ndarray | None) -> list[tuple[int, tuple, Any]]:
    """The taps that see at least one real input cell: ``(t, tap, mask over P or None)``."""
    out = []
    for t, tap in enumerate(geom.taps()):
        m = geom.tap_mask(mask, tap)
        if m is None or m.all():
            out.append((t, tap, None))
        elif m.any():
            out.append((t, tap, m.reshape(-1)))
    return out


def _tap_tables(geom: Geometry, live: list) -> tuple[Array, Array, Array | None]:
    """Per live tap: its start offsets ``(L, nsd)``, its kernel index ``(L,)`` and, where any
    tap sees padding, its validity over the output positions ``(L, P)``."""
    offs = np.array([taps.tap_offset(geom, tap) for _, tap, _ in live],
                    np.int32).reshape(len(live), len(geom.window))
    tix = np.array([t for t, _, _ in live], np.int32)
    masks = None
    if any(m is not None for _, _, m in live):
        p = max(1, math.prod(geom.out_spatial))
        masks = jnp.asarray(np.stack([np.ones(p, bool) if m is None else m
                                      for _, _, m in live]))
    return jnp.asarray(offs), jnp.asarray(tix), masks


def _forward_block(cfg: Config, xb: Array, wt: Array, fill: bool, rows: int | None = None
                   ) -> Array:
    """Images ``xb`` (N, *padded, C), ``wt`` (T, G, Og, I) -> (N, P, G, Og), ``rows``
    images (default: all) at a time.

    One rolled loop over the (block of ``rows`` images, tap) pairs: one compiled body
    whatever the window size and the number of blocks (a loop over blocks around a loop over
    taps is twice the loop code to compile); taps that only ever see padding are skipped
    statically. ``fill``: the padding holds `dominated_fill`'s value, so no mask is needed.
    """
    op, geom = cfg.op, cfg.geom
    mask = geom.valid_mask() if op.pad_value is None and not fill else None
    ident = algebra.identity_value(op, cfg.acc_dtype)
    binary = algebra.binary(op)
    nb = rows or xb.shape[0]
    xb, n = taps.pad_rows(xb, nb)
    nblk = xb.shape[0] // nb
    p = max(1, math.prod(geom.out_spatial))
    g, og = wt.shape[1], wt.shape[2]
    live = _live_taps(geom, mask)
    if not live:
        return jnp.broadcast_to(ident, (n, p, g, og))
    offs, tix, masks = _tap_tables(geom, live)
    nl = len(live)

    def part(b: Any, j: Any) -> Array:
        xs = taps.tap_slice_at(xb, geom, offs[j], b * nb, nb)
        xs = xs.reshape(nb, p, g, xs.shape[-1] // g)
        wk = lax.dynamic_index_in_dim(wt, tix[j], axis=0, keepdims=False)
        out = _reduce_tap(op, xs, wk, cfg.acc_dtype)
        if masks is not None:
            mk = lax.dynamic_index_in_dim(masks, j, axis=0, keepdims=False)
            out = jnp.where(mk.reshape(1, p, 1, 1), out, ident)
        return out

    if nl == 1 and nblk == 1:
        return part(0, 0)[:n]

    def step(k: Any, acc: Array) -> Array:
        b = _div(k, nl)
        cur = lax.dynamic_slice_in_dim(acc, b * nb, nb, axis=0)
        return lax.dynamic_update_slice_in_dim(acc, binary(cur, part(b, _rem(k, nl))),
                                               b * nb, 0)

    # From the identity, so that the tap's reduction is compiled once (each copy of it is
    # a large part of the compile time).
    init = jnp.broadcast_to(ident, (nblk * nb, p, g, og))
    return lax.fori_loop(0, nblk * nl, step, init)[:n]


def _forward(cfg: Config, x: Array, w: Array, fill: bool = False) -> Array:
    """Canonical forward without custom gradient: (N, *S, C), (*K, I, O) -> (N, P, G, Og)."""
    geom = cfg.geom
    xp = taps.pad_input(x, cfg.op, geom, dominated_fill(cfg.op) if fill else None)
    wt = taps.taps_major(w, geom.groups)
    if cfg.op.reduce_name in algebra.HAND_VJP_REDUCES:
        return _forward_block(cfg, xp, wt, fill, cfg.block)
    # Differentiated automatically: blocks under ``jax.checkpoint`` (a loop carrying the
    # whole output would keep it per step for the backward pass).
    xblocks, n = taps.blocks(xp, cfg.block)
    fn = jax.checkpoint(functools.partial(_forward_block, cfg, wt=wt, fill=fill))
    if xblocks.shape[0] == 1:
        out = fn(xblocks[0])[None]
    else:
        out = lax.map(fn, xblocks)
    return taps.unblock(out, n)


def _value_flags(a: Array) -> Array:
    """Which special values ``a`` holds, as the bits of one int32 (one reduction):
    ``+inf`` 1, ``-inf`` 2, NaN 4, zero 8."""
    i32 = jnp.int32
    bits = ((a == jnp.inf).astype(i32) | ((a == -jnp.inf).astype(i32) << 1)
            | (jnp.isnan(a).astype(i32) << 2) | ((a == 0).astype(i32) << 3))
    return lax.reduce(bits, np.int32(0), lax.bitwise_or, tuple(range(a.ndim)))


def _nan_terms(op: Op, xs: Array, w: Array) -> tuple[Any, Array]:
    """0/1 indicators of the products ``combine(x, w)`` that are NaN because of a
    non-finite value: ``(indicators, needed)``.

    ``indicators(xs, w)`` builds ``a`` over input cells ``(N, *S, G, J, I)`` and ``b`` over
    kernel entries ``(*K, J, I, O)`` (``J`` terms, each one elementwise fusion): a product
    is NaN exactly where some term ``j`` has ``a = b = 1``, the channels paired one to one.
    The scalar ``needed`` says whether any product can be such a NaN (from one reduction
    of each operand, `_value_flags`); the indicators are built only then.

    ``combine_kind`` gives the IEEE rule (NaN in, NaN out; ``inf - inf``; ``0 * inf``); a
    combine of unknown kind is evaluated at ``+-inf`` and NaN against every entry of the
    other operand, so that its own rule applies (``masked_op``'s NaN-encoded absent taps are
    not NaN products). Products of finite values are not examined.
    """
    kind = algebra.capabilities(op).combine
    fx, fw = _value_flags(xs), _value_flags(w)

    def has(f: Array, bit: int) -> Array:
        return (f & bit) != 0

    def stack(fs: list, a: Array, axis: int) -> Array:
        return jnp.stack([jnp.broadcast_to(f(a), a.shape) for f in fs],
                         axis=axis).astype(jnp.float32)

    if kind in ("add", "min", "max", "mul"):
        # NaN in, NaN out (against a term of ones), then the kind's pairs.
        xf = [jnp.isnan, jnp.ones_like]
        wf = [jnp.ones_like, jnp.isnan]
        needed = has(fx, 4) | has(fw, 4)
        if kind == "add":  # inf + -inf
            xf += [lambda a: a == jnp.inf, lambda a: a == -jnp.inf]
            wf += [lambda a: a == -jnp.inf, lambda a: a == jnp.inf]
            needed |= (has(fx, 1) & has(fw, 2)) | (has(fx, 2) & has(fw, 1))
        elif kind == "mul":  # 0 * inf
            xf += [lambda a: a == 0, jnp.isinf]
            wf += [jnp.isinf, lambda a: a == 0]
            needed |= (has(fx, 8) & has(fw, 3)) | (has(fx, 3) & has(fw, 8))

        def indicators(xs: Array, w: Array) -> tuple[Array, Array]:
            return stack(xf, xs, -2), stack(wf, w, -3)

        return indicators, needed

    def indicators(xs: Array, w: Array) -> tuple[Array, Array]:
        # For v in (+inf, -inf, NaN): (x is v, combine(v, w) is NaN) and (combine(x, v) is
        # NaN, w is v), each side one combine of the operand broadcast against the values.
        vals = jnp.asarray([jnp.inf, -jnp.inf, jnp.nan], xs.dtype)

        def is_v(a: Array, v: Array) -> Array:
            return jnp.where(jnp.isnan(v), jnp.isnan(a), a == v)

        xb = jnp.broadcast_to(xs[..., None, :], (*xs.shape[:-1], 3, xs.shape[-1]))
        vx = jnp.broadcast_to(vals[:, None], xb.shape)
        wb = jnp.broadcast_to(w[..., None, :, :], (*w.shape[:-2], 3, *w.shape[-2:]))
        vw = jnp.broadcast_to(vals[:, None, None].astype(w.dtype), wb.shape)
        a = jnp.concatenate([is_v(xb, vx), jnp.isnan(op.combine(xb, vx))], axis=-2)
        b = jnp.concatenate([jnp.isnan(op.combine(vw, wb)), is_v(wb, vw)], axis=-3)
        return a.astype(jnp.float32), b.astype(jnp.float32)

    return indicators, has(fx, 7) | has(fw, 7)


def _nan_outputs(cfg: Config, x: Array, w: Array) -> Array:
    """Which outputs ``(N, P, G, Og)`` have a NaN product involving a non-finite value.

    XLA CPU's vectorised max/min reductions drop NaN, so the engine restores it from one
    native sum-convolution of the 0/1 indicators of `_nan_terms`, inside a ``while_loop``
    that runs it once where the operands hold the values it needs (a NaN, or ``+inf`` and
    ``-inf`` for ``x + w``, ...) and else not at all: finite operands cost two reductions.
    That loop body is the only code compiled for it, and under ``vmap`` the primitive folds
    the mapped axis into the batch, so its predicate stays one scalar.
    """
    op, geom = cfg.op, cfg.geom
    g = geom.groups
    n = x.shape[0]
    # With a pad value the padded cells are products and their indicators count; with
    # identity padding the indicator images are padded with 0.
    xs = x if op.pad_value is None else taps.pad_input(x, op, geom)
    xs = xs.reshape(*xs.shape[:-1], g, xs.shape[-1] // g)
    indicators, needed = _nan_terms(op, xs, w)

    def count(xs: Array, w: Array) -> Array:
        lhs, rhs = indicators(xs, w)
        # Sizes written out, not -1: an empty input (all windows padding) has a 0 here.
        lhs = lhs.reshape(*lhs.shape[:-3], math.prod(lhs.shape[-3:]))
        rhs = rhs.reshape(*rhs.shape[:-3], math.prod(rhs.shape[-3:-1]), rhs.shape[-1])
        if op.pad_value is None:
            lhs = lax.pad(lhs, jnp.asarray(0, lhs.dtype), geom.pad_config)
        return _native_valid(lhs, rhs, geom, jnp.float32)

    def body(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        # ``+ 0.0 * i`` (not simplified in floating point) keeps the indicators inside
        # the loop: XLA hoists loop-invariant code out of it.
        z = carry[0].astype(xs.dtype) * jnp.asarray(0, xs.dtype)
        return carry[0] + 1, carry[1] + count(xs + z, w + z.astype(w.dtype))

    total = jnp.zeros((n, *geom.out_spatial, w.shape[-1]), jnp.float32)
    _, total = lax.while_loop(lambda c: (c[0] == 0) & needed, body, (jnp.int32(0), total))
    return total.reshape(n, max(1, math.prod(geom.out_spatial)), g, -1) > 0


def _forward_dispatch(cfg: Config, x: Array, w: Array) -> Array:
    """The forward pass of a sum, max, min or logsumexp product (no branch on the values).

    Max/min: XLA CPU's vectorised reductions drop NaN, so the outputs with a NaN product
    are set to NaN from `_nan_outputs`. The padding is masked statically.
    """
    op = cfg.op
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    if floating and separable_kind(op) == "mul":
        return _native_mul_forward(cfg, x, w)
    y = _forward(cfg, x, w)
    if op.reduce in ("max", "min") and floating:
        y = jnp.where(_nan_outputs(cfg, x, w), jnp.asarray(jnp.nan, y.dtype), y)
    return y


def _cotangent_of_products(red: str, c: Array, yl: Array, gl: Array, sl: Array | None,
                           ml: np.ndarray | None, fast: bool, acc_dtype: Any) -> Array:
    """d out / d products times the output cotangent, elementwise in any layout.

    ``ml``: the tap's validity mask in this layout (None: every product is valid). ``fast``:
    the inputs, outputs and padding are such that the formulas below need only the
    arithmetic that XLA CPU fuses into its reduction kernels (add, multiply, abs, sign,
    exp); comparisons and selects on the products would be written to memory instead.
    For max/min that means finite ``x``, ``w`` and ``y`` with dominated padding: every
    product is ``<= y`` (``>=`` for min) and equals it exactly at the winners, since it is
    recomputed bit for bit, so ``1 - |sign(y - c)|`` marks the winners.
    """
    if red == "sum":
        if ml is None:
            return jnp.broadcast_to(gl, c.shape)
        return jnp.broadcast_to(gl * jnp.asarray(ml, gl.dtype), c.shape)
    if red in ("max", "min"):
        d = jnp.where(c == yl, sl, 0)
        if fast:
            return d
    else:
        # logsumexp: the softmax weight of each product; ``gl`` and ``yl`` come in with an
        # all -inf window's cotangent zeroed and its output replaced by 0 (no inf - inf).
        d = gl * jnp.exp(c.astype(acc_dtype) - yl)
    if ml is not None:
        d = jnp.where(jnp.asarray(ml), d, 0)
    return d


# Positions per step when the kernel gradient sums over them; the products of one step,
# (rows, G, Og, I), are reduced over their leading axis.
_DW_ROWS = 64


def _dw_rows(nbp: int, row_bytes: int, max_bytes: int) -> int:
    """Rows per kernel-gradient step: a divisor of ``nbp`` near ``_DW_ROWS`` if there is one,
    fewer where one step's products (``row_bytes`` per row) would pass ``max_bytes``."""
    top = max(1, min(_DW_ROWS, nbp, max_bytes // max(row_bytes, 1)))
    for r in range(top, max(1, top // 4) - 1, -1):
        if nbp % r == 0:
            return r
    return top


def _dx_of_tap(op: Op, red: str, xs: Array, wk: Array, yf: Array, gf: Array,
               sf: Array | None, m_pos: np.ndarray | None, fast: bool, acc: Any,
               unroll: int = 8) -> Array:
    """One tap's input gradient ``(NP, G, I)``: a loop over the output channels.

    Each step adds ``dc * d combine / d x`` for one output channel, an elementwise update
    of the ``(NP, G, I)`` accumulator that XLA fuses into one vectorised loop (a reduction
    over the output channels as an axis is many times slower on CPU: the input is constant
    along it).
    """
    og = wk.shape[1]
    ml = None if m_pos is None else m_pos.reshape(-1, 1, 1)

    def body(k: Any, a: Array) -> Array:
        wo = lax.dynamic_index_in_dim(wk, k, axis=1, keepdims=False)  # (G, I)
        yo = lax.dynamic_index_in_dim(yf, k, axis=2)  # (NP, G, 1)
        go = lax.dynamic_index_in_dim(gf, k, axis=2)
        so = None if sf is None else lax.dynamic_index_in_dim(sf, k, axis=2)
        c, vjp = jax.vjp(op.combine, xs, jnp.broadcast_to(wo[None], xs.shape))
        dc = _cotangent_of_products(red, c, yo, go, so, ml, fast, acc)
        return a + vjp(dc.astype(c.dtype))[0].astype(acc)

    return lax.fori_loop(0, og, body, jnp.zeros(xs.shape, acc), unroll=max(1, min(og, unroll)))


def _dw_of_tap(op: Op, red: str, xs: Array, wk: Array, yf: Array, gf: Array,
               sf: Array | None, m_pos: np.ndarray | None, fast: bool, acc: Any,
               rows: int) -> Array:
    """One tap's kernel gradient ``(G, Og, I)``: a scan over blocks of ``rows`` positions.

    Each step reduces the ``(rows, G, Og, I)`` products over their leading axis.
    """
    nbp, g, i = xs.shape
    og = wk.shape[1]
    nblk = nbp // rows
    seq = [xs.reshape(nblk, rows, g, i), yf.reshape(nblk, rows, g, og),
           gf.reshape(nblk, rows, g, og)]
    if sf is not None:
        seq.append(sf.reshape(nblk, rows, g, og))
    if m_pos is not None:
        seq.append(jnp.asarray(m_pos.reshape(nblk, rows)))
    shape = (rows, g, og, i)

    def body(a: Array, blk: list[Array]) -> tuple[Array, None]:
        xb_, yb_, gb_ = blk[:3]
        rest = blk[3:]
        sb_ = rest.pop(0)[..., None] if sf is not None else None
        mb_ = rest.pop(0).reshape(rows, 1, 1, 1) if m_pos is not None else None
        c, vjp = jax.vjp(op.combine, jnp.broadcast_to(xb_[:, :, None, :], shape),
                         jnp.broadcast_to(wk[None], shape))
        dc = _cotangent_of_products(red, c, yb_[..., None], gb_[..., None], sb_, mb_, fast,
                                    acc)
        return a + jnp.sum(vjp(dc.astype(c.dtype))[1], axis=0, dtype=acc), None

    out, _ = lax.scan(body, jnp.zeros(wk.shape, acc), seq)
    return out


def _count_winners(op: Op, geom: Geometry, xb: Array, wt: Array, yb: Array, tap_list: list,
                   fast: bool, acc: Any, max_bytes: int) -> Array:
    """How many products of each window equal its max/min ``yb`` (ties split gradients).

    A loop over the taps, so that each tap's comparison stays inside its own fused reduction
    (unrolled, XLA CPU merges the taps' reductions into one kernel fed by stored products),
    and over chunks of output channels, so that one step's comparisons, which XLA may store,
    fit in ``max_bytes``.
    """
    nb = xb.shape[0]
    g = wt.shape[1]
    p = max(1, math.prod(geom.out_spatial))
    offs_j, t_j, masks_j = _tap_tables(geom, tap_list)
    og, i = wt.shape[2], wt.shape[3]
    fit = max(1, max_bytes // max(1, nb * p * g * i * 4))
    oc = max(d for d in range(1, og + 1) if og % d == 0 and d <= fit)

    def body(k: Any, count: Array) -> Array:
        xs = taps.tap_slice_at(xb, geom, offs_j[k])
        xs = xs.reshape(nb, p, g, xs.shape[-1] // g)
        wk = lax.dynamic_index_in_dim(wt, t_j[k], axis=0, keepdims=False)
        m = None
        if not fast and masks_j is not None:
            m = lax.dynamic_index_in_dim(masks_j, k, axis=0, keepdims=False)

        def chunk(j: Any, cnt: Array) -> Array:
            wc = lax.dynamic_slice_in_dim(wk, j * oc, oc, axis=1)
            yc = lax.dynamic_slice_in_dim(yb, j * oc, oc, axis=3)
            eq = _fwd_products(op, xs, wc) == yc[..., None]
            if m is not None:
                eq = eq & m.reshape(1, p, 1, 1, 1)
            part = lax.dynamic_slice_in_dim(cnt, j * oc, oc, axis=3)
            return lax.dynamic_update_slice_in_dim(
                cnt, part + jnp.sum(eq, axis=-1, dtype=acc), j * oc, axis=3)

        if oc == og:
            return chunk(0, count)
        return lax.fori_loop(0, og // oc, chunk, count)

    return lax.fori_loop(0, len(tap_list), body, jnp.zeros(yb.shape, acc))


_DX_ACC_BYTES = 2**20


def separable_kind(op: Op) -> str | None:
    """``"mul"`` or ``"adder"`` when a sum's kernel gradient is a native product (declared
    or inferred: `jaxconv._src.core.algebra.Capabilities.separable`)."""
    return algebra.capabilities(op).separable


def _native_valid(xp: Array, w: Array, geom: Geometry, out_dtype: Any = None) -> Array:
    """The standard product of the padded input ``xp`` (N, *padded, C) and ``w`` (*K, I, O):
    ``(N, *out_spatial, O)`` (a dense product when there are no spatial dimensions)."""
    nsd = len(geom.window)
    hi = lax.Precision.HIGHEST
    if nsd == 0:
        n, g = xp.shape[0], geom.groups
        return jnp.einsum("ngi,igo->ngo", xp.reshape(n, g, -1),
                          w.reshape(w.shape[0], g, -1), precision=hi,
                          preferred_element_type=out_dtype).reshape(n, -1)
    return lax.conv_general_dilated(
        xp, w, geom.strides, [(0, 0)] * nsd, None, geom.rhs_dilation,
        _canonical_dimension_numbers(nsd), geom.groups, precision=hi,
        preferred_element_type=out_dtype)


def _native_mul_forward(cfg: Config, x: Array, w: Array) -> Array:
    """A user's multiply-and-add as one native product of the padded input: ``(N, P, G, Og)``.

    Padded cells hold the pad value (they go through ``x * w``) or, with identity padding,
    0, whose products ``0 * w`` are the identity unless ``w`` is not finite: then (``lax.cond``)
    the masked tap loop runs instead.
    """
    geom = cfg.geom
    shape = (x.shape[0], max(1, math.prod(geom.out_spatial)), geom.groups, -1)

    def native(a: Array, b: Array) -> Array:
        xp = taps.pad_input(a, cfg.op, geom)
        return _native_valid(xp, b, geom, cfg.acc_dtype).astype(cfg.acc_dtype).reshape(shape)

    if cfg.op.pad_value is not None or geom.valid_mask() is None:
        return native(x, w)
    return lax.cond(jnp.all(jnp.isfinite(w)), native,
                    lambda a, b: _forward(cfg, a, b).astype(cfg.acc_dtype), x, w)


def _separable_grads(cfg: Config, kind: str, x: Array, w: Array, gy: Array
                     ) -> tuple[Array | None, Array]:
    """The kernel gradient of a `separable_kind` op (and the input gradient for
    ``"mul"``; ``None`` for ``"adder"``, whose clipped input rule is not separable, and for
    ``"sqdiff"``, whose input gradient the tap loop computes)."""
    op, geom = cfg.op, cfg.geom
    acc = cfg.acc_dtype
    # Padded cells hold the pad value (0 for identity padding: no contribution to sum g*x).
    xp = taps.pad_input(x, op, geom).astype(acc)
    n = x.shape[0]
    g4 = gy.astype(acc).reshape(n, *geom.out_spatial, w.shape[-1])
    _, vjp = jax.vjp(functools.partial(_native_valid, geom=geom), xp, w.astype(acc))
    gxp, gw = vjp(g4)
    if kind == "mul":
        _, pad_vjp = jax.vjp(lambda a: taps.pad_input(a, op, geom), x)
        return pad_vjp(gxp.astype(x.dtype))[0], gw.astype(w.dtype)
    # adder (sqdiff: twice that): minus w times the sum of the cotangent over the positions
    # each tap sees.
    p = max(1, math.prod(geom.out_spatial))
    gsum = jnp.sum(gy.astype(acc).reshape(n, p, -1), axis=0)  # (P, O)
    mask = geom.valid_mask() if op.pad_value is None else None
    if mask is None:
        s = jnp.broadcast_to(jnp.sum(gsum, axis=0), (len(geom.taps()), gsum.shape[-1]))
    else:
        masks = np.stack([geom.tap_mask(mask, tap).reshape(p) for tap in geom.taps()])
        s = jnp.asarray(masks, acc) @ gsum  # (T, O)
    s = s.reshape(*geom.window, 1, w.shape[-1])
    gw = gw - w.astype(acc) * s
    return None, (2 * gw if kind == "sqdiff" else gw).astype(w.dtype)


def separable_kernel_gradient(problem: Any, kind: str, x: Array, w: Array, g: Array) -> Array:
    """The kernel gradient of a `separable_kind` op, in standard products (see
    `_separable_grads`)."""
    cfg = _config(problem, x, w)
    return _separable_grads(cfg, kind, x, w, _grouped(cfg, g))[1]


def _backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array, fill: bool):
    """Gradients of sum, max, min and logsumexp products without storing any products.

    Per block and tap, the products are recomputed inside two fused reductions, laid out so
    that the reduced axis is the innermost one: ``(Nb, P, G, I, Og)`` summed over ``Og`` for
    the input gradient and ``(G, Og, I, Nb*P)`` summed over the positions for the kernel
    gradient. The cotangent goes through ``combine``'s own VJP (so AdderNet's custom rule
    applies). Max/min first count the winners of each window (ties split the gradient).
    """
    op, geom = cfg.op, cfg.geom
    acc = cfg.acc_dtype
    kind = separable_kind(op) if jnp.issubdtype(x.dtype, jnp.floating) else None
    gw_sep = None
    if kind is not None:
        gx_sep, gw_sep = _separable_grads(cfg, kind, x, w, gy)
        if gx_sep is not None:
            return gx_sep, gw_sep
    xp = taps.pad_input(x, op, geom, dominated_fill(op) if fill else None)
    wt = taps.taps_major(w, geom.groups)
    mask = geom.valid_mask() if op.pad_value is None else None
    p = max(1, math.prod(geom.out_spatial))
    g, og, i = wt.shape[1:]
    red = op.reduce
    tap_list = [(t, tap, None if fill else m) for t, tap, m in _live_taps(geom, mask)]
    if not tap_list:  # every tap of every window sees only padding: nothing depends on x, w
        return jnp.zeros(x.shape, x.dtype), (gw_sep if gw_sep is not None
                                             else jnp.zeros(w.shape, w.dtype))

    def block_grads(gwt: Array, blk: tuple[Array, Array, Array]) -> tuple[Array, Array]:
        xb, yb, gb = blk
        nb = xb.shape[0]
        gb = gb.astype(acc)
        scale = None
        if red in ("max", "min"):
            count = _count_winners(op, geom, xb, wt, yb, tap_list, fill, acc,
                                   cfg.max_block_bytes // 2)
            scale = jnp.where(count > 0, gb / jnp.maximum(count, 1), 0)
        elif red == "logsumexp":
            gb = jnp.where(jnp.isneginf(yb), 0, gb)
            yb = jnp.where(jnp.isneginf(yb), 0, yb).astype(acc)
        # Layout for the input gradient: (Nb, P, G, I, Og).
        nbp = nb * p
        # Per-position views (NP, G, Og) of the output, its cotangent and the max/min scale.
        yf = yb.reshape(nbp, g, og)
        gf = gb.reshape(nbp, g, og)
        sf = None if scale is None else scale.reshape(nbp, g, og)
        # Kernel-gradient blocks of positions: ``dw_rows`` positions per step of a scan.
        rows = _dw_rows(nbp, g * og * i * 4, cfg.max_block_bytes // 2)
        nbp_pad = -(-nbp // rows) * rows

        def pad_rows(a: Array | None) -> Array | None:
            if a is None or nbp_pad == nbp:
                return a
            return jnp.concatenate([a, jnp.zeros((nbp_pad - nbp, *a.shape[1:]), a.dtype)])

        offs, tix, masks = _tap_tables(geom, tap_list)

        def tap_body(j: Any, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            gwt, gxb = carry
            xs4 = taps.tap_slice_at(xb, geom, offs[j])
            xs = xs4.reshape(nbp, g, i)
            wk = lax.dynamic_index_in_dim(wt, tix[j], axis=0, keepdims=False)
            m_pos = None  # (NP,) validity of this tap
            if masks is not None:
                m_pos = jnp.tile(lax.dynamic_index_in_dim(masks, j, axis=0, keepdims=False), nb)
            dxs = _dx_of_tap(op, red, xs, wk, yf, gf, sf, m_pos, fill, acc, cfg.unroll)
            gxb = taps.tap_unslice_add(gxb, dxs.reshape(xs4.shape), geom, offs[j])
            if gw_sep is None:  # else the kernel gradient is already known (separable)
                if nbp_pad != nbp:
                    valid = jnp.ones((nbp,), bool) if m_pos is None else m_pos
                    m_pos = jnp.concatenate([valid, jnp.zeros((nbp_pad - nbp,), bool)])
                dwk = _dw_of_tap(op, red, pad_rows(xs), wk, pad_rows(yf), pad_rows(gf),
                                 pad_rows(sf), m_pos, fill, acc, rows)
                gwt = gwt.at[tix[j]].add(dwk.astype(gwt.dtype))
            return gwt, gxb

        gwt, gxb = lax.fori_loop(0, len(tap_list), tap_body,
                                 (gwt, jnp.zeros(xb.shape, acc)))
        return gwt, gxb.astype(x.dtype)

    block = cfg.block_bwd
    if gw_sep is not None:
        # Input gradient only: no products are held, and the loop over output channels runs
        # fastest on an accumulator of about 1 MiB (measured: 4 images of layer A, 256 rows
        # of a 1024-wide dense layer; the per-step overhead dominates smaller blocks).
        row = max(1, math.prod(xp.shape[1:]) * jnp.dtype(acc).itemsize)
        block = int(max(1, min(x.shape[0], _DX_ACC_BYTES // row)))
    xblocks, n = taps.blocks(xp, block)
    yblocks, _ = taps.blocks(y, block)
    gblocks, _ = taps.blocks(gy, block)
    gwt0 = jnp.zeros(wt.shape, jnp.promote_types(w.dtype, jnp.float32))
    if xblocks.shape[0] == 1:
        gwt, gxp = block_grads(gwt0, (xblocks[0], yblocks[0], gblocks[0]))
    else:
        gwt, gx_blocks = lax.scan(block_grads, gwt0, (xblocks, yblocks, gblocks))
        gxp = gx_blocks.reshape(-1, *gx_blocks.shape[2:])
    gxp = gxp[:n]
    _, pad_vjp = jax.vjp(lambda a: taps.pad_input(a, op, geom), x)
    (gx,) = pad_vjp(gxp)
    if gw_sep is not None:
        return gx.astype(x.dtype), gw_sep
    gw = taps.taps_major_transpose(gwt, w.shape, geom.groups).astype(w.dtype)
    return gx.astype(x.dtype), gw


# Tied windows (several winning products) that the winner path recomputes per step of its
# loop over them.
MAX_SPARSE_TIES = 1024


def _winner_base(geom: Geometry, in_per_group: int) -> int | None:
    """The code offset of `_winner_codes` (a power of two above every product's index
    ``t * I + i``), or None where the codes would not be exact float32 integers."""
    n_prod = len(geom.taps()) * in_per_group
    base = 1 << max(1, n_prod).bit_length()
    return base if 4 * base <= 2**24 else None


def _winner_codes(cfg: Config, xp: Array, wt: Array, y: Array, base: int,
                  tmask: np.ndarray | None = None) -> Array:
    """Per output, ``sum over its winning products of (base + t * I + i)`` in float32.

    One winner gives a code in ``[base, 2 base)`` that names it; ties give ``>= 2 base``; a
    window with a NaN or an infinite output gives NaN or garbage (the caller sends the
    infinite ones to the tie pass). Every real product is ``<= y`` for max (``>= y`` for
    min), equal at the winners bit for bit. The indicator is the comparison ``c == y``: the
    arithmetic ``1 - sign(y - c)``, which XLA CPU keeps inside its fused reduction kernels,
    is contracted into an fma for a multiplying combine, whose exact difference is not zero
    at the winner. All sums are of integers below ``2**24``: exact.

    ``tmask`` (T, P): with identity padding, the static validity of each tap at each output
    position; the padded cells hold 0, whose products may beat ``y`` (or be NaN), so a tap's
    reduced codes are zeroed (a select on the reduced ``(Nb, P, G, Og)`` part, outside the
    products' reduction) where the tap sees padding.
    """
    op, geom = cfg.op, cfg.geom
    g, og, i = wt.shape[1:]
    p = max(1, math.prod(geom.out_spatial))
    nt = len(geom.taps())
    offs = np.array([[k * d for k, d in zip(tap, geom.rhs_dilation, strict=True)]
                     for tap in geom.taps()], np.int32).reshape(nt, len(geom.window))
    offs_j = jnp.asarray(offs)
    tmask_j = None if tmask is None else jnp.asarray(tmask)

    nb = cfg.block
    fit = max(1, (cfg.max_block_bytes // 2) // max(1, nb * p * g * i * 4))
    oc = max(d for d in range(1, og + 1) if og % d == 0 and d <= fit)
    nc = og // oc
    xp, n = taps.pad_rows(xp, nb)
    y, _ = taps.pad_rows(y, nb)
    nblk = xp.shape[0] // nb

    def step(s: Any, tot: Array) -> Array:
        # One loop over (block of images, tap, chunk of output channels): one compiled body.
        b, k, j = _div(s, nt * nc), _rem(_div(s, nc), nt), _rem(s, nc)
        xs = taps.tap_slice_at(xp, geom, offs_j[k], b * nb, nb).reshape(nb, p, g, i)
        wc = lax.dynamic_slice(wt, (k, 0, j * oc, 0), (1, g, oc, i))[0]
        at = (b * nb, 0, 0, j * oc)
        yc = lax.dynamic_slice(y, at, (nb, p, g, oc))
        code = (base + k * i + jnp.arange(i)).astype(jnp.float32).reshape(1, 1, 1, 1, i)
        c = _fwd_products(op, xs, wc)
        # A comparison, not 1 - sign(y - c): XLA CPU contracts y - x * w into an fma,
        # whose exact difference is not 0 at the winner of a multiplying combine.
        part = jnp.sum(jnp.where(c == yc[..., None], code, 0.0), axis=-1)
        if tmask_j is not None:
            mk = lax.dynamic_index_in_dim(tmask_j, k, axis=0, keepdims=False)
            part = jnp.where(mk.reshape(1, p, 1, 1), part, 0)
        return lax.dynamic_update_slice(tot, lax.dynamic_slice(tot, at, part.shape) + part, at)

    return lax.fori_loop(0, nblk * nt * nc, step, jnp.zeros(y.shape, jnp.float32))[:n]


def _div(a: Any, m: int) -> Array:
    """``a // m`` for nonnegative integers ``a`` (lax's division: no floor correction)."""
    a = jnp.asarray(a)
    return lax.div(a, jnp.asarray(m, a.dtype))


def _rem(a: Any, m: int) -> Array:
    """``a % m`` for nonnegative integers ``a``."""
    a = jnp.asarray(a)
    return lax.rem(a, jnp.asarray(m, a.dtype))


def _digit(flat: Array, shape: tuple[int, ...], d: int) -> Array:
    """Index ``d`` of the row-major ``shape`` at the nonnegative integers ``flat``."""
    return _rem(_div(flat, math.prod(shape[d + 1:])), shape[d])


def _next_true(flags: Array, k: int) -> Array:
    """The indices of the first ``k`` true entries of the flat ``flags`` in order (int32),
    -1 past the last one.

    A ``top_k`` of float32 keys (exact below ``2**24`` entries), else a sort: either
    compiles to one operation, where ``jnp.nonzero``'s prefix sum is some twenty kernels.
    """
    idx = jnp.arange(flags.size, dtype=jnp.int32)
    if flags.size <= 2**24:
        key = jnp.where(flags, -idx.astype(jnp.float32), -jnp.inf)
        top, _ = lax.top_k(key, k)
        return jnp.where(top > -jnp.inf, -top, -1).astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    first = lax.sort(jnp.where(flags, idx, big))[:k]
    return jnp.where(first < big, first, -1)


def _winner_backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array) -> tuple:
    """Max/min gradients through each window's winner, found by `_winner_codes`.

    Any values, no branch on them. The padded cells hold ``op.pad_value`` (real products)
    or, with identity padding, 0 with the padded taps masked out (statically: of the codes
    and of the tied windows' products); a dominated fill is not used, since a non-finite
    kernel entry would make it NaN. Where a window has one winner, its cotangent goes
    through ``combine``'s VJP at that one product (gathered) and is scatter-added onto the
    input and the kernel. The tied windows and those with an infinite output (the next
    ones in index order, by `_next_true`) are recomputed whole (their ``T x I``
    products), `MAX_SPARSE_TIES` at a time in a
    ``while_loop`` that runs once per such chunk (not at all without ties), and their
    cotangent is split equally among the tied products. A window with a NaN has no
    gradient (none of its products equals its NaN output), as in the exact rule; so has a
    window whose winner a user's combine does not recompute bit for bit (XLA may evaluate
    ``tanh`` differently in two fused kernels; the codes' reduction is fused as the
    forward's is, which keeps that rare).
    """
    op, geom = cfg.op, cfg.geom
    xp = taps.pad_input(x, op, geom)
    wt = taps.taps_major(w, geom.groups)
    n = x.shape[0]
    nt, g, og, i = wt.shape
    nsd = len(geom.window)
    p = max(1, math.prod(geom.out_spatial))
    # Identity padding: the validity of each tap at each output position, (T, P) (None:
    # every product is real).
    mask = geom.valid_mask() if op.pad_value is None else None
    tmask = None
    if mask is not None:
        tmask = np.stack([geom.tap_mask(mask, tap).reshape(p) for tap in geom.taps()])
        if tmask.all():
            tmask = None
    base = _winner_base(geom, i)
    tot = _winner_codes(cfg, xp, wt, y, base, tmask)
    flat = jnp.clip(tot - base, 0, nt * i - 1).astype(jnp.int32)
    # An infinite output's winners (``inf - inf`` in the codes) are found by the tie pass.
    inf = jnp.isinf(y)
    single = (tot >= base) & (tot < 2 * base) & jnp.logical_not(inf)
    tie = (tot >= 2 * base) | inf
    n_ties = jnp.sum(tie, dtype=jnp.int32)
    gdt = jnp.promote_types(x.dtype, jnp.float32)

    def coords(pp: Array, tt: Array) -> list[Array]:
        """Padded-input coordinates read at flat output position ``pp`` by tap ``tt``
        (arithmetic: gathers from coordinate tables are as many more kernels to compile)."""
        out = []
        for d in range(nsd):
            od = _digit(pp, geom.out_spatial, d)
            kd = _digit(tt, geom.window, d)
            out.append(od * geom.strides[d] + kd * geom.rhs_dilation[d])
        return out

    # Flat (row-major) strides of the padded input and of the taps-major kernel: scatters
    # and gathers with one int32 index per element (a multi-dimensional index per element
    # would be stored as an (elements, rank) array).
    xstr = np.cumprod((1, *xp.shape[::-1]))[:-1][::-1].astype(np.int64)

    def x_index(nn: Array, pos: list[Array], chan: Array) -> Array:
        idx = nn * int(xstr[0]) + chan
        for j, a in enumerate(pos):
            idx = idx + a * int(xstr[j + 1])
        return idx

    def w_index(tt: Array, gg: Array, oo: Array, ii: Array) -> Array:
        return ((tt * g + gg) * og + oo) * i + ii

    shp = (n, p, g, og)
    n_i = lax.broadcasted_iota(jnp.int32, shp, 0)
    p_i = lax.broadcasted_iota(jnp.int32, shp, 1)
    g_i = lax.broadcasted_iota(jnp.int32, shp, 2)
    o_i = lax.broadcasted_iota(jnp.int32, shp, 3)
    t_w, i_w = _div(flat, i), _rem(flat, i)
    xi = x_index(n_i, coords(p_i, t_w), g_i * i + i_w).reshape(-1)
    wi = w_index(t_w, g_i, o_i, i_w).reshape(-1)
    xf, wf = xp.reshape(-1), wt.reshape(-1)
    ct = jnp.where(single, gy, 0).astype(xf.dtype).reshape(-1)
    _, vjp = jax.vjp(op.combine, xf[xi], wf[wi])
    dx, dw = vjp(ct)
    gxf = jnp.zeros(xf.shape, gdt).at[xi].add(dx.astype(gdt))
    gwf = jnp.zeros(wf.shape, gdt).at[wi].add(dw.astype(gdt))

    # Tied windows, a chunk of k at a time: (k, T, I) products each, within the bound.
    total = n * p * g * og
    k = max(1, min(MAX_SPARSE_TIES, total, cfg.max_block_bytes // max(1, 8 * nt * i * 4)))
    flat_tie = tie.reshape(-1)
    idx = jnp.arange(total, dtype=jnp.int32)
    kt = jnp.arange(nt).reshape(1, nt, 1)
    ki = jnp.arange(i).reshape(1, 1, i)
    tmask_j = None if tmask is None else jnp.asarray(tmask.T)
    yf_all, gf_all = y.reshape(-1), gy.reshape(-1)

    def tie_chunk(carry: tuple) -> tuple:
        j, last, gxf, gwf = carry
        found = _next_true(flat_tie & (idx > last), k)
        valid = found >= 0
        sel = jnp.maximum(found, 0)
        kn, kp, kg, ko = (_digit(sel, shp, d) for d in range(4))
        kxi = jnp.broadcast_to(
            x_index(kn.reshape(k, 1, 1), coords(kp.reshape(k, 1, 1), kt),
                    kg.reshape(k, 1, 1) * i + ki), (k, nt, i))
        kwi = jnp.broadcast_to(
            w_index(kt, kg.reshape(k, 1, 1), ko.reshape(k, 1, 1), ki), (k, nt, i))
        ck, vjpk = jax.vjp(op.combine, xf[kxi], wf[kwi])
        eq = ck == yf_all[sel].reshape(k, 1, 1)
        if tmask_j is not None:  # padded taps are not products
            eq = eq & tmask_j[kp].reshape(k, nt, 1)
        cnt = jnp.maximum(jnp.sum(eq, axis=(1, 2)), 1)
        sk = jnp.where(valid, gf_all[sel].astype(gdt) / cnt, 0).reshape(k, 1, 1)
        dxk, dwk = vjpk(jnp.where(eq, sk, 0).astype(ck.dtype))
        # The next chunk starts after this one's last window (where this one is not full,
        # it was the last chunk).
        return (j + 1, found[k - 1], gxf.at[kxi].add(dxk.astype(gdt)),
                gwf.at[kwi].add(dwk.astype(gdt)))

    _, _, gxf, gwf = lax.while_loop(lambda c: c[0] * k < n_ties, tie_chunk,
                                    (jnp.int32(0), jnp.int32(-1), gxf, gwf))
    _, pad_vjp = jax.vjp(lambda a: taps.pad_input(a, op, geom), x)
    gx = pad_vjp(gxf.reshape(xp.shape).astype(x.dtype))[0]
    gwt = gwf.reshape(wt.shape)
    return gx, taps.taps_major_transpose(gwt, w.shape, geom.groups).astype(w.dtype)


def _hand_backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array):
    """The hand-written backward pass of a sum, max, min or logsumexp product.

    Max/min take the winner path (`_winner_backward`) where its codes are exact (static);
    the others the exact pass with identity padding masked statically.
    """
    if (jnp.issubdtype(x.dtype, jnp.floating) and cfg.op.reduce in ("max", "min")
            and _winner_ok(cfg, x, w)):
        return _winner_backward(cfg, x, w, y, gy)
    return _backward(cfg, x, w, y, gy, fill=False)


def _winner_ok(cfg: Config, x: Array, w: Array) -> bool:
    """Whether `_winner_backward`'s codes and int32 flat indices are exact here (static)."""
    geom = cfg.geom
    xp_size = x.shape[0] * math.prod(geom.padded_spatial) * x.shape[-1]
    return (_winner_base(geom, w.shape[-2]) is not None and max(xp_size, w.size) < 2**31
            and (not geom.window or math.prod(geom.out_spatial) > 0))




# The fast log-semiring path is used only when every window's sum of exponentials, shifted
# by the per-sample and per-channel maxima, is at least exp(LOG_FAST_MIN_EXPONENT): then its
# largest term is within ~80 of the shift, every term that matters in float32 is a normal
# number, and the native convolution's sum is accurate to a few ulps.
LOG_FAST_MIN_EXPONENT = -60.0


def is_log_semiring(op: Op) -> bool:
    """Whether ``op`` is ``x + w`` under logsumexp with identity padding (``ops.log``)."""
    return algebra.capabilities(op).log_semiring


def _canonical_dimension_numbers(nsd: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, nsd + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, nsd + 1, *spatial),
                                    rhs_spec=(nsd + 1, nsd, *range(nsd)),
                                    out_spec=(0, nsd + 1, *spatial))


def _log_exp_space(cfg: Config, x: Array, w: Array) -> tuple[Array, Array, Array, Array]:
    """``exp(x - mx)``, ``exp(w - mw)``, their native product ``s`` and the shift
    ``mx + mw`` (broadcastable to the output), in the accumulation dtype.

    ``mx`` is the per-sample maximum of ``x``, ``mw`` the per-output-channel maximum of ``w``
    (zero where not finite).
    """
    geom, acc = cfg.geom, cfg.acc_dtype
    n, nsd = x.shape[0], len(geom.window)
    xa, wa = x.astype(acc), w.astype(acc)
    mx = jnp.max(xa, axis=tuple(range(1, xa.ndim)), keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0)
    mw = jnp.max(wa, axis=tuple(range(wa.ndim - 1)), keepdims=True)
    mw = jnp.where(jnp.isfinite(mw), mw, 0)
    ex, ew = jnp.exp(xa - mx), jnp.exp(wa - mw)
    shift = mx.reshape(n, *(1,) * nsd, 1) + mw.reshape(*(1,) * (nsd + 1), -1)
    return ex, ew, _exp_product(cfg, ex, ew), shift


def _exp_product(cfg: Config, ex: Array, ew: Array) -> Array:
    """The standard product of the exp-space operands (zero padding is the identity)."""
    geom, n, nsd = cfg.geom, ex.shape[0], len(cfg.geom.window)
    hi = lax.Precision.HIGHEST
    if nsd == 0:
        g = geom.groups
        return jnp.einsum("ngi,igo->ngo", ex.reshape(n, g, -1),
                          ew.reshape(ew.shape[0], g, -1), precision=hi).reshape(n, -1)
    return lax.conv_general_dilated(
        ex, ew, geom.strides, geom.padding, geom.lhs_dilation, geom.rhs_dilation,
        _canonical_dimension_numbers(nsd), geom.groups, precision=hi)


def _log_inputs_ok(x: Array, w: Array) -> Array:
    """No NaN and no ``+inf`` in either operand (the exp-space path's precondition)."""
    return (jnp.all(jnp.logical_not(jnp.isnan(x)) & (x < jnp.inf))
            & jnp.all(jnp.logical_not(jnp.isnan(w)) & (w < jnp.inf)))


def _log_fast_or_exact(cfg: Config, x: Array, w: Array) -> Array:
    """The log semiring as a native product in exp space, or the exact engine where needed.

    ``y = log(conv(exp(x - mx), exp(w - mw))) + mx + mw`` (`_log_exp_space`). Zero
    padding in exp space is the identity. Falls back to the exact tap engine (``lax.cond``)
    when any input is NaN or ``+inf``, or when any window's shifted sum is below
    ``exp(LOG_FAST_MIN_EXPONENT)`` -- windows far below the maximum of their sample and
    channel, windows of only ``-inf`` and underflow.
    """
    _, _, s, shift = _log_exp_space(cfg, x, w)
    ok = jnp.all(s >= math.exp(LOG_FAST_MIN_EXPONENT)) & _log_inputs_ok(x, w)
    out_shape = (x.shape[0], max(1, math.prod(cfg.geom.out_spatial)), cfg.geom.groups, -1)
    return lax.cond(
        ok,
        lambda s_, sh_, a, b: (jnp.log(s_) + sh_).reshape(out_shape),
        lambda s_, sh_, a, b: _forward_dispatch(cfg, a, b).astype(cfg.acc_dtype).reshape(
            out_shape),
        s, shift, x, w,
    )


def _log_backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array) -> tuple[Array, Array]:
    """The softmax rule in exp space where the forward took it: with ``s = exp(y - shift)``,
    ``d y / d s = 1 / s``, so the cotangent ``g / s`` goes through the native product's own
    transpose and back through the exponentials. Elsewhere (``lax.cond``, the same test as
    the forward's) the exact tap backward."""
    ex, ew, _, shift = _log_exp_space(cfg, x, w)
    n, o = x.shape[0], w.shape[-1]
    yo = y.reshape(n, *cfg.geom.out_spatial, o).astype(cfg.acc_dtype)
    go = gy.reshape(yo.shape).astype(cfg.acc_dtype)
    ok = jnp.all(yo - shift >= LOG_FAST_MIN_EXPONENT) & _log_inputs_ok(x, w)

    def fast(ex: Array, ew: Array, yo: Array, go: Array, x: Array, w: Array, y: Array,
             gy: Array) -> tuple[Array, Array]:
        gs = go * jnp.exp(shift - yo)
        _, vjp = jax.vjp(functools.partial(_exp_product, cfg), ex, ew)
        gex, gew = vjp(gs)
        return (gex * ex).astype(x.dtype), (gew * ew).astype(w.dtype)

    def exact(ex: Array, ew: Array, yo: Array, go: Array, x: Array, w: Array, y: Array,
              gy: Array) -> tuple[Array, Array]:
        # The rare exact branch is compiled without unrolling (less code to compile).
        gx, gw = _hand_backward(dataclasses.replace(cfg, unroll=1), x, w, y, gy)
        return gx.astype(x.dtype), gw.astype(w.dtype)

    return lax.cond(ok, fast, exact, ex, ew, yo, go, x, w, y, gy)


def _rewritten(problem: Any, x: Array, w: Array) -> Array:
    """An op's native rewrite (``op.rewrite(product, x, w)``, e.g. ``xnor``, ``l2``) with
    ``product`` the standard convolution of this geometry in the canonical layout (a batched
    matrix product ``(G, M, K) x (K, G, N)`` for a dense problem); a pad value is written into
    the input first, so that the product's zero padding is the sum's identity."""
    op, geom = problem.op, problem.geom
    nsd = len(geom.window)
    kw = dict(precision=problem.precision, preferred_element_type=problem.acc_dtype)
    if nsd == 0:
        m, g = x.shape[0], geom.groups
        product = functools.partial(
            lax.dot_general, dimension_numbers=(((2,), (0,)), ((1,), (1,))), **kw)
        y = op.rewrite(product, x.reshape(m, g, -1), w.reshape(w.shape[0], g, -1))
        return jnp.transpose(y, (1, 0, 2)).reshape(m, -1).astype(problem.acc_dtype)
    pads, lhs_dil = geom.padding, geom.lhs_dilation
    if op.pad_value is not None and (any(lo or hi for lo, hi in pads)
                                     or any(d != 1 for d in lhs_dil)):
        x = taps.pad_input(x, op, geom)
        pads, lhs_dil = ((0, 0),) * nsd, (1,) * nsd
    product = functools.partial(
        lax.conv_general_dilated, window_strides=geom.strides, padding=pads,
        lhs_dilation=lhs_dil, rhs_dilation=geom.rhs_dilation,
        dimension_numbers=_canonical_dimension_numbers(nsd),
        feature_group_count=geom.groups, **kw)
    return op.rewrite(product, x, w).astype(problem.acc_dtype)


def _config(problem: Any, x: Array, w: Array) -> Config:
    """The engine's static configuration of a problem: canonical op and batch blocks."""
    op = canonical_op(problem.op)
    geom, mbb = problem.geom, problem.max_block_bytes
    itemsize = max(jnp.dtype(x.dtype).itemsize, jnp.dtype(problem.acc_dtype).itemsize)
    args = (geom, x.shape[0], w.shape[-2] * geom.groups, w.shape[-1] // geom.groups, itemsize)
    # Backward blocks stay small although the backward never holds a block's products:
    # measured, one image per block runs faster than the whole batch (cache locality).
    return Config(op, geom, jnp.dtype(problem.acc_dtype), mbb, block_size(*args, mbb),
                  block_size(*args, mbb // 4))


def supports(problem: Any, dtype: Any, platform: str) -> bool:
    """The XLA engine serves every problem on every platform."""
    del problem, dtype, platform
    return True


def _grouped(cfg: Config, a: Array) -> Array:
    """``(N, *out_spatial, O) -> (N, P, G, Og)``."""
    return a.reshape(a.shape[0], max(1, math.prod(cfg.geom.out_spatial)), cfg.geom.groups, -1)


def forward(problem: Any, x: Array, w: Array) -> Array:
    """The product of canonical ``x`` and ``w``: ``(N, *out_spatial, O)`` in the
    accumulation dtype."""
    cfg = _config(problem, x, w)
    if cfg.op.rewrite is not None:
        return _rewritten(problem, x, w)
    if is_log_semiring(cfg.op) and jnp.issubdtype(x.dtype, jnp.floating):
        y = _log_fast_or_exact(cfg, x, w)
    elif cfg.op.reduce_name in algebra.HAND_VJP_REDUCES:
        y = _forward_dispatch(cfg, x, w)
    else:
        y = _forward(cfg, x, w)
    return y.reshape(x.shape[0], *cfg.geom.out_spatial, w.shape[-1]).astype(cfg.acc_dtype)


def backward(problem: Any, x: Array, w: Array, y: Array, g: Array,
             need: tuple[bool, bool] = (True, True)) -> tuple[Array, Array]:
    """The input and kernel gradients given the output ``y`` and its cotangent ``g``."""
    del need  # both gradients come out of the same passes
    cfg = _config(problem, x, w)
    y4, g4 = _grouped(cfg, y), _grouped(cfg, g)
    if cfg.op.rewrite is not None:
        _, vjp = jax.vjp(functools.partial(_rewritten, problem), x, w)
        gx, gw = vjp(g.astype(cfg.acc_dtype))
    elif is_log_semiring(cfg.op) and jnp.issubdtype(x.dtype, jnp.floating):
        gx, gw = _log_backward(cfg, x, w, y4, g4)
    elif cfg.op.reduce_name in algebra.HAND_VJP_REDUCES:
        gx, gw = _hand_backward(cfg, x, w, y4, g4)
    else:
        _, vjp = jax.vjp(lambda a, b: _forward(cfg, a, b).astype(cfg.acc_dtype), x, w)
        gx, gw = vjp(g4.astype(cfg.acc_dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


def tangent(problem: Any, x: Array, w: Array, y: Array, tx: Array, tw: Array,
            active: tuple[bool, bool] = (True, True)) -> Array:
    """The forward-mode tangent of the output, linear in ``(tx, tw)``."""
    from jaxconv._src.engines import forward_mode  # noqa: PLC0415 - forward mode uses this

    if problem.op.rewrite is not None:
        forward_mode.check_forward_mode(problem.op)
        return jax.jvp(functools.partial(_rewritten, problem), (x, w), (tx, tw))[1]
    return forward_mode.tangent(problem, _config(problem, x, w), x, w, y, tx, tw, active)


def generic_conv(
    x: Array,
    w: Array,
    geom: Geometry,
    op: Op,
    *,
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
) -> Array:
    """Generalized convolution on canonical layouts by this engine (any transformation).

    Args:
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, C // groups, O)`` kernel.
      geom: the static geometry (padding already resolved to pairs).
      op: the product.
      preferred_element_type: accumulation / output dtype, as in ``lax``.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      ``(N, *out_spatial, O)``.
    """
    from jaxconv._src.core import primitive  # noqa: PLC0415 - the core binds the engines

    return primitive.canonical_conv(x, w, geom, op, engine="xla",
                                    preferred_element_type=preferred_element_type,
                                    max_block_bytes=max_block_bytes)
