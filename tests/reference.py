"""Plain-loop numpy ground truth for generalized convolution and dot_general.

Independent of jaxconv (and of jax): every index computation is written out
explicitly, so the code reads like the algebra in DESIGN.md::

    out[n, o, co] = REDUCE over (k in window, ci in group) of
                    combine(x[n, o*stride + k*dilation - pad_lo, ci], w[k, ci, co])

Argument meanings and defaults follow ``jax.lax.conv_general_dilated`` and
``jax.lax.dot_general``. Taps that land in padding or in a hole inserted by
``lhs_dilation`` are skipped when ``pad_value is None`` (they contribute the
identity), otherwise they read ``pad_value`` and go through ``combine``.

Each output is a left fold from ``identity`` over its terms in the order written above
(kernel taps, then input channels; the contracting index for dot_general). The loops run
over output positions; the fold is vectorized over the batch and the output channels (a
ufunc ``reduce`` by ``ufunc.accumulate``, which folds strictly left to right), so it is the
same sequence of operations per output as a scalar loop. A ``combine`` or ``reduce`` that
does not accept arrays (Python ``max``, ``math`` functions) gets the scalar loops.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

Combine = Callable[[Any, Any], Any]
Reduce = Callable[[Any, Any], Any]
Specs = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

__all__ = [
    "NUMPY_OPS",
    "NUMPY_PARTIALS",
    "NUMPY_TERM_TANGENTS",
    "NUMPY_REDUCE_AXIS",
    "NumpyOp",
    "conv_grads_reference",
    "conv_maxmin_grads_reference",
    "conv_reference",
    "conv_tangent_reference",
    "dimension_specs",
    "dot_general_reference",
    "forum_unfold_recipe",
    "resolve_padding",
]


# --------------------------------------------------------------------------
# Built-in ops, written in numpy from the contract's table.
# --------------------------------------------------------------------------


class NumpyOp(NamedTuple):
    """(combine, reduce, identity, default pad_value) of a built-in op."""

    combine: Combine
    reduce: Reduce
    identity: float
    pad_value: float | None


def _sign_pos0(v: Any) -> Any:
    """sign with sign(0) = +1 (also for -0.0); NaN stays NaN."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(v == 0, 1.0, np.sign(v))[()]


def _xnor(x: Any, w: Any) -> Any:
    return _sign_pos0(x) * _sign_pos0(w)


def _neg_abs_diff(x: Any, w: Any) -> Any:
    return -np.abs(np.subtract(x, w))


def _neg_sq_diff(x: Any, w: Any) -> Any:
    return -np.square(np.subtract(x, w))


_INF = float("inf")

NUMPY_OPS: dict[str, NumpyOp] = {
    "standard": NumpyOp(np.multiply, np.add, 0.0, None),
    "xnor": NumpyOp(_xnor, np.add, 0.0, None),
    "adder": NumpyOp(_neg_abs_diff, np.add, 0.0, 0.0),
    "l1": NumpyOp(_neg_abs_diff, np.add, 0.0, None),
    "l2": NumpyOp(_neg_sq_diff, np.add, 0.0, None),
    "max_plus": NumpyOp(np.add, np.maximum, -_INF, None),
    "min_plus": NumpyOp(np.add, np.minimum, _INF, None),
    "max_min": NumpyOp(np.minimum, np.maximum, -_INF, None),
    "min_max": NumpyOp(np.maximum, np.minimum, _INF, None),
    "max_times": NumpyOp(np.multiply, np.maximum, -_INF, None),
    "log": NumpyOp(np.add, np.logaddexp, -_INF, None),
}
"""Built-in op name -> NumpyOp(combine, reduce, identity, default pad_value).

np.maximum / np.minimum propagate NaN; np.logaddexp(-inf, -inf) == -inf.
"""


def _logsumexp_axis(a: Any, axis: int) -> Any:
    return np.logaddexp.reduce(a, axis=axis)


NUMPY_REDUCE_AXIS: dict[str, Callable[..., Any]] = {
    "standard": np.sum,
    "xnor": np.sum,
    "adder": np.sum,
    "l1": np.sum,
    "l2": np.sum,
    "max_plus": np.max,
    "min_plus": np.min,
    "max_min": np.max,
    "min_max": np.min,
    "max_times": np.max,
    "log": _logsumexp_axis,
}
"""Built-in op name -> ``f(array, axis=...)`` reducing an axis (for the forum recipe)."""


# --------------------------------------------------------------------------
# Dimension numbers and padding.
# --------------------------------------------------------------------------


def _specs_from_strings(lhs_s: str, rhs_s: str, out_s: str) -> Specs:
    """Parse lax-style layout strings; spatial order is the rhs string's order."""
    for spec, pair in ((lhs_s, "NC"), (rhs_s, "OI"), (out_s, "NC")):
        if any(spec.count(c) != 1 for c in pair) or len(set(spec)) != len(spec):
            raise ValueError(f"bad dimension_numbers string {spec!r} (needs {pair} once each)")
    rhs_spatial = [c for c in rhs_s if c not in "OI"]
    if not (
        set(lhs_s) - set("NC") == set(rhs_spatial) == set(out_s) - set("NC")
    ):
        raise ValueError(f"spatial letters differ: {(lhs_s, rhs_s, out_s)}")
    lhs = (lhs_s.index("N"), lhs_s.index("C")) + tuple(lhs_s.index(c) for c in rhs_spatial)
    rhs = (rhs_s.index("O"), rhs_s.index("I")) + tuple(rhs_s.index(c) for c in rhs_spatial)
    out = (out_s.index("N"), out_s.index("C")) + tuple(out_s.index(c) for c in rhs_spatial)
    return lhs, rhs, out


def dimension_specs(dimension_numbers: Any, ndim: int) -> Specs:
    """Return (lhs_spec, rhs_spec, out_spec) int tuples: (batch/out-feat, feat, spatial...).

    Accepts None (NC..., OI..., NC...), three layout strings, or a
    ``lax.ConvDimensionNumbers`` (any 3-sequence of int sequences).
    """
    if dimension_numbers is None:
        default = tuple(range(ndim))
        return default, default, default
    if hasattr(dimension_numbers, "lhs_spec"):
        dimension_numbers = (
            dimension_numbers.lhs_spec,
            dimension_numbers.rhs_spec,
            dimension_numbers.out_spec,
        )
    if len(dimension_numbers) != 3:
        raise ValueError(f"dimension_numbers must have 3 entries, got {dimension_numbers!r}")
    if all(isinstance(s, str) for s in dimension_numbers):
        specs = _specs_from_strings(*dimension_numbers)
    else:
        specs = tuple(tuple(int(i) for i in s) for s in dimension_numbers)  # type: ignore[assignment]
    for s in specs:
        if sorted(s) != list(range(ndim)):
            raise ValueError(f"spec {s} is not a permutation of range({ndim})")
    return specs  # type: ignore[return-value]


def resolve_padding(
    padding: str | Sequence[tuple[int, int]],
    in_spatial: Sequence[int],
    dilated_kernel: Sequence[int],
    strides: Sequence[int],
) -> list[tuple[int, int]]:
    """Explicit (lo, hi) pairs, computed as ``lax.padtype_to_pads`` does for strings.

    ``in_spatial`` is the *undilated* input spatial shape (lax ignores lhs_dilation here).
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return [(0, 0)] * len(in_spatial)
        if mode not in ("SAME", "SAME_LOWER"):
            raise ValueError(f"unknown padding {padding!r}")
        pads = []
        for size, k, s in zip(in_spatial, dilated_kernel, strides, strict=True):
            out = -(-size // s)  # ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            if mode == "SAME":
                pads.append((total // 2, total - total // 2))
            else:
                pads.append((total - total // 2, total // 2))
        return pads
    pads = [(int(lo), int(hi)) for lo, hi in padding]
    if len(pads) != len(in_spatial):
        raise ValueError(f"padding has {len(pads)} pairs, expected {len(in_spatial)}")
    return pads


def _dilate_dim(size: int, dilation: int) -> int:
    return 0 if size == 0 else 1 + dilation * (size - 1)


# --------------------------------------------------------------------------
# Convolution.
# --------------------------------------------------------------------------


def conv_reference(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    *,
    combine: Combine,
    reduce: Reduce,
    identity: float,
    pad_value: float | None = None,
    dtype: Any = np.float64,
) -> np.ndarray:
    """Generalized ``lax.conv_general_dilated`` by explicit loops.

    For every output cell the result is ``reduce``-folded from ``identity`` over
    all (kernel tap, input channel of the group) pairs of ``combine(x, w)``.
    """
    lhs = np.asarray(lhs, dtype=dtype)
    rhs = np.asarray(rhs, dtype=dtype)
    if lhs.ndim != rhs.ndim or lhs.ndim < 3:
        raise ValueError(f"lhs/rhs ranks must match and be >= 3: {lhs.shape}, {rhs.shape}")
    nsp = lhs.ndim - 2
    lhs_spec, rhs_spec, out_spec = dimension_specs(dimension_numbers, lhs.ndim)

    # Canonical layouts: x (N, C, spatial...), w (O, I, spatial...).
    x = np.transpose(lhs, lhs_spec)
    w = np.transpose(rhs, rhs_spec)
    n_batch, c_in = x.shape[:2]
    c_out, c_in_group = w.shape[:2]
    in_sp = x.shape[2:]
    k_sp = w.shape[2:]

    strides = tuple(int(s) for s in window_strides)
    lhs_dil = tuple(int(d) for d in lhs_dilation) if lhs_dilation is not None else (1,) * nsp
    if isinstance(padding, str) and any(d != 1 for d in lhs_dil):
        # As lax: string padding is undefined for transposed (lhs-dilated) convolution.
        raise ValueError("string padding with lhs_dilation != 1 is not supported (as lax)")
    rhs_dil = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else (1,) * nsp
    if not (len(strides) == len(lhs_dil) == len(rhs_dil) == nsp):
        raise ValueError("window_strides / dilations must have one entry per spatial dim")
    if min(strides + lhs_dil + rhs_dil, default=1) < 1:
        raise ValueError("strides and dilations must be >= 1")
    groups = int(feature_group_count)
    if groups < 1 or c_in != groups * c_in_group or c_out % groups != 0:
        raise ValueError(
            f"feature_group_count={groups} incompatible with C_in={c_in}, "
            f"rhs I={c_in_group}, O={c_out}"
        )

    dil_kernel = [_dilate_dim(k, d) for k, d in zip(k_sp, rhs_dil, strict=True)]
    pads = resolve_padding(padding, in_sp, dil_kernel, strides)
    dil_in = [_dilate_dim(s, d) for s, d in zip(in_sp, lhs_dil, strict=True)]
    out_sp = []
    for size, (lo, hi), k, s in zip(dil_in, pads, dil_kernel, strides, strict=True):
        padded = size + lo + hi
        out_sp.append((padded - k) // s + 1 if padded >= k else 0)

    identity = np.asarray(identity, dtype=dtype)[()]
    pad = None if pad_value is None else np.asarray(pad_value, dtype=dtype)[()]
    out = np.empty((n_batch, c_out) + tuple(out_sp), dtype=dtype)

    with np.errstate(all="ignore"):  # IEEE results (NaN, inf) are wanted, not warnings
        try:
            _conv_vectorized(x, w, out, out_sp, strides, pads, lhs_dil, rhs_dil, dil_in,
                             groups, combine, reduce, identity, pad)
        except (TypeError, ValueError):  # a scalar-only combine or reduce
            _conv_loops(x, w, out, out_sp, strides, pads, lhs_dil, rhs_dil, dil_in, groups,
                        combine, reduce, identity, pad)
    # canonical = transpose(out_final, out_spec)  =>  out_final = transpose(canonical, argsort)
    return np.transpose(out, np.argsort(out_spec))


def _left_fold(terms: np.ndarray, reduce: Reduce, identity: Any) -> np.ndarray:
    """``reduce(...reduce(reduce(identity, t0), t1)..., tL)`` over the last axis of ``terms``."""
    if isinstance(reduce, np.ufunc) and reduce.nin == 2:
        start = np.broadcast_to(np.asarray(identity), terms.shape[:-1] + (1,))
        return reduce.accumulate(np.concatenate([start, terms], axis=-1), axis=-1)[..., -1]
    acc = np.broadcast_to(np.asarray(identity), terms.shape[:-1])
    for j in range(terms.shape[-1]):
        acc = reduce(acc, terms[..., j])
    return np.asarray(acc)


def _taps(o_idx: tuple[int, ...], k_sp: Sequence[int], strides: Sequence[int],
          pads: Sequence[tuple[int, int]], lhs_dil: Sequence[int], rhs_dil: Sequence[int],
          dil_in: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...] | None]]:
    """For each kernel tap of output ``o_idx``: the input index, or None in padding / a hole."""
    tap_src: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []
    for k_idx in itertools.product(*(range(k) for k in k_sp)):
        src: tuple[int, ...] | None = ()
        for d in range(len(k_sp)):
            # Position in the lhs-dilated, padded input (pad_lo may be negative).
            pos = o_idx[d] * strides[d] + k_idx[d] * rhs_dil[d] - pads[d][0]
            if pos < 0 or pos >= dil_in[d] or pos % lhs_dil[d] != 0:
                src = None  # padding or a hole inserted by lhs_dilation
                break
            src = src + (pos // lhs_dil[d],)
        tap_src.append((k_idx, src))
    return tap_src


def _conv_vectorized(
    x: np.ndarray,
    w: np.ndarray,
    out: np.ndarray,
    out_sp: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    lhs_dil: Sequence[int],
    rhs_dil: Sequence[int],
    dil_in: Sequence[int],
    groups: int,
    combine: Combine,
    reduce: Reduce,
    identity: Any,
    pad: Any,
) -> None:
    """``_conv_loops`` with each output position's fold done for all (n, co) at once."""
    n_batch = x.shape[0]
    c_out, c_in_group = w.shape[:2]
    out_per_group = c_out // groups
    for o_idx in itertools.product(*(range(s) for s in out_sp)):
        taps = [(k, src) for k, src in _taps(o_idx, w.shape[2:], strides, pads, lhs_dil,
                                               rhs_dil, dil_in)
                if src is not None or pad is not None]
        for g in range(groups):
            cos = slice(g * out_per_group, (g + 1) * out_per_group)
            cis = slice(g * c_in_group, (g + 1) * c_in_group)
            if not taps:
                out[(slice(None), cos) + o_idx] = identity
                continue
            # Terms in fold order: taps, then input channels -> (n, co, term).
            xv = np.concatenate([np.full((n_batch, c_in_group), pad, x.dtype) if src is None
                                 else x[(slice(None), cis) + src] for _, src in taps], axis=1)
            wv = np.concatenate([w[(cos, slice(None)) + k] for k, _ in taps], axis=1)
            terms = np.broadcast_to(combine(xv[:, None, :], wv[None, :, :]),
                                    (n_batch, out_per_group, xv.shape[1]))
            out[(slice(None), cos) + o_idx] = _left_fold(terms, reduce, identity)


def _conv_loops(
    x: np.ndarray,
    w: np.ndarray,
    out: np.ndarray,
    out_sp: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    lhs_dil: Sequence[int],
    rhs_dil: Sequence[int],
    dil_in: Sequence[int],
    groups: int,
    combine: Combine,
    reduce: Reduce,
    identity: Any,
    pad: Any,
) -> None:
    """Fill canonical ``out`` (N, O, spatial...) from x (N, C, ...) and w (O, I, ...)."""
    n_batch = x.shape[0]
    c_out, c_in_group = w.shape[:2]
    out_per_group = c_out // groups
    for o_idx in itertools.product(*(range(s) for s in out_sp)):
        tap_src = _taps(o_idx, w.shape[2:], strides, pads, lhs_dil, rhs_dil, dil_in)
        for n in range(n_batch):
            for co in range(c_out):
                g = co // out_per_group
                acc = identity
                for k_idx, src in tap_src:
                    if src is None and pad is None:
                        continue  # skipped tap: contributes the identity
                    for ci in range(c_in_group):
                        xv = pad if src is None else x[(n, g * c_in_group + ci) + src]
                        acc = reduce(acc, combine(xv, w[(co, ci) + k_idx]))
                out[(n, co) + o_idx] = acc


# --------------------------------------------------------------------------
# dot_general.
# --------------------------------------------------------------------------


def dot_general_reference(
    lhs: Any,
    rhs: Any,
    dimension_numbers: Any,
    *,
    combine: Combine,
    reduce: Reduce,
    identity: float,
    dtype: Any = np.float64,
) -> np.ndarray:
    """Generalized ``lax.dot_general``; output dims are (batch, lhs free, rhs free)."""
    lhs = np.asarray(lhs, dtype=dtype)
    rhs = np.asarray(rhs, dtype=dtype)
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(i) % a.ndim for i in t) for t, a in
                      ((lc, lhs), (rc, rhs), (lb, lhs), (rb, rhs)))
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"mismatched dimension_numbers {dimension_numbers!r}")
    for a, b in itertools.chain(zip(lc, rc, strict=True), zip(lb, rb, strict=True)):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(f"lhs dim {a} ({lhs.shape[a]}) != rhs dim {b} ({rhs.shape[b]})")
    lf = tuple(i for i in range(lhs.ndim) if i not in lc and i not in lb)
    rf = tuple(i for i in range(rhs.ndim) if i not in rc and i not in rb)

    batch_shape = tuple(lhs.shape[i] for i in lb)
    lf_shape = tuple(lhs.shape[i] for i in lf)
    rf_shape = tuple(rhs.shape[i] for i in rf)
    c_shape = tuple(lhs.shape[i] for i in lc)
    identity = np.asarray(identity, dtype=dtype)[()]
    out = np.empty(batch_shape + lf_shape + rf_shape, dtype=dtype)

    def index(nd: int, pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple:
        idx = [0] * nd
        for axes, values in pairs:
            for a, v in zip(axes, values, strict=True):
                idx[a] = v
        return tuple(idx)

    try:  # (batch, lhs free, contracting) x (batch, contracting, rhs free), folded per (b, i)
        x = np.transpose(lhs, lb + lf + lc).reshape(
            (math.prod(batch_shape), math.prod(lf_shape), math.prod(c_shape)))
        w = np.transpose(rhs, rb + rc + rf).reshape(
            (math.prod(batch_shape), math.prod(c_shape), math.prod(rf_shape)))
        flat = np.empty((x.shape[0], x.shape[1], w.shape[2]), dtype=dtype)
        with np.errstate(all="ignore"):
            for b in range(x.shape[0]):
                for i in range(x.shape[1]):
                    terms = np.broadcast_to(combine(x[b, i][None, :], w[b].T), flat.shape[2:]
                                            + (x.shape[2],))
                    flat[b, i] = _left_fold(terms, reduce, identity)
        return flat.reshape(out.shape)
    except (TypeError, ValueError):  # a scalar-only combine or reduce: the scalar loops
        pass
    for b in itertools.product(*(range(s) for s in batch_shape)):
        for i in itertools.product(*(range(s) for s in lf_shape)):
            for j in itertools.product(*(range(s) for s in rf_shape)):
                acc = identity
                for c in itertools.product(*(range(s) for s in c_shape)):
                    xv = lhs[index(lhs.ndim, ((lb, b), (lf, i), (lc, c)))]
                    wv = rhs[index(rhs.ndim, ((rb, b), (rf, j), (rc, c)))]
                    with np.errstate(all="ignore"):
                        acc = reduce(acc, combine(xv, wv))
                out[b + i + j] = acc
    return out


# --------------------------------------------------------------------------
# What users did: the PyTorch-forum unfold recipe, in numpy.
# --------------------------------------------------------------------------


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def forum_unfold_recipe(
    x_nchw: Any,
    w_oihw: Any,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    combine: Combine,
    reduce_axis_fn: Callable[..., Any],
) -> np.ndarray:
    """2-D im2col recipe: ``F.unfold`` (ZERO padding), broadcast combine, reduce the window.

    ``padding`` is torch-style (symmetric per dim). Builds the full
    (N, L, Cin*kh*kw, Cout) tensor, as the recipe does. Returns (N, Cout, oh, ow).
    """
    x = np.asarray(x_nchw, dtype=np.float64)
    w = np.asarray(w_oihw, dtype=np.float64)
    n, c, h, wd = x.shape
    c_out, c_in, kh, kw = w.shape
    if c_in != c:
        raise ValueError(f"channel mismatch: x has {c}, w expects {c_in}")
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # zeros, as F.unfold
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (wd + 2 * pw - kw) // sw + 1
    # unfold: (N, C*kh*kw, L), channel-major then kh, kw; L = oh*ow row-major.
    cols = np.empty((n, c * kh * kw, oh * ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            cols[:, :, i * ow + j] = patch.reshape(n, -1)
    unf = cols.transpose(0, 2, 1)  # (N, L, Cin*kh*kw)
    w_flat = w.reshape(c_out, -1).T  # (Cin*kh*kw, Cout)
    prod = combine(unf[:, :, :, None], w_flat[None, None, :, :])  # (N, L, K, Cout)
    res = reduce_axis_fn(prod, axis=2)  # (N, L, Cout)
    return np.asarray(res).transpose(0, 2, 1).reshape(n, c_out, oh, ow)


# --------------------------------------------------------------------------
# Gradients (the rules of docs/numerics.md), including NaN and infinities.
# --------------------------------------------------------------------------


def _maxmin_partials(first_wins: Any) -> Callable[[Any, Any], tuple[Any, Any]]:
    """The partials of ``max(x, w)`` (``first_wins = np.greater``) or ``min`` as lax's rule
    has them: 1 to the strict winner, 1/2 each on a tie, 0 to both where one is NaN."""

    def partials(x: Any, w: Any) -> tuple[Any, Any]:
        tie = 0.5 * (x == w)
        return first_wins(x, w) + tie, first_wins(w, x) + tie

    return partials


def _l1_partials(x: Any, w: Any) -> tuple[Any, Any]:
    """``-(max(d, 0) - min(d, 0))`` with ``d = x - w``: ``-sign(d)``, 0 at a tie and 0 where
    ``d`` is NaN (lax's max/min give a NaN argument no derivative)."""
    d = np.subtract(x, w)
    s = -(np.greater(d, 0) * 1.0 - np.less(d, 0))
    return s, -s


def _xnor_partials(x: Any, w: Any) -> tuple[Any, Any]:
    """The straight-through rule of ``sign(x) sign(w)``: ``sign(w)`` where ``|x| <= 1``, else
    0 (selected, so a NaN ``sign(w)`` is dropped where ``|x| > 1`` or ``x`` is NaN)."""
    with np.errstate(invalid="ignore"):
        return (np.where(np.abs(x) <= 1, _sign_pos0(w), 0.0),
                np.where(np.abs(w) <= 1, _sign_pos0(x), 0.0))


NUMPY_PARTIALS: dict[str, Callable[[Any, Any], tuple[Any, Any]]] = {
    "standard": lambda x, w: (w, x),
    "xnor": _xnor_partials,
    "adder": lambda x, w: (np.clip(np.subtract(w, x), -1, 1), np.subtract(x, w)),
    "l1": _l1_partials,
    "l2": lambda x, w: (-2 * np.subtract(x, w), 2 * np.subtract(x, w)),
    "max_plus": lambda x, w: (np.ones_like(x * w), np.ones_like(x * w)),
    "min_plus": lambda x, w: (np.ones_like(x * w), np.ones_like(x * w)),
    "max_min": _maxmin_partials(np.less),
    "min_max": _maxmin_partials(np.greater),
    "max_times": lambda x, w: (np.broadcast_to(w, np.broadcast_shapes(np.shape(x), np.shape(w))),
                               np.broadcast_to(x, np.broadcast_shapes(np.shape(x), np.shape(w)))),
    "log": lambda x, w: (np.ones_like(x * w), np.ones_like(x * w)),
}
"""Built-in op name -> ``partials(x, w) = (d combine / dx, d combine / dw)`` elementwise,
as JAX differentiates the op's combine (AdderNet's and XNOR's surrogate rules for theirs)."""


NUMPY_TERM_TANGENTS: dict[str, Callable[[Any, Any, Any, Any], Any]] = {
    "l2": lambda x, w, tx, tw: -2 * np.subtract(x, w) * np.subtract(tx, tw),
}
"""Ops whose term tangent is not ``partial_x * tx + partial_w * tw`` when a partial is
infinite: ``-(x - w)^2``'s chain rule forms ``tx - tw`` first (``inf * (tx - tw)``, where
the two products would give ``inf - inf``)."""


def _window_terms(x: np.ndarray, w: np.ndarray, out_shape: tuple[int, ...],
                  padding: Sequence[tuple[int, int]], combine: Combine,
                  partials: Callable[[Any, Any], tuple[Any, Any]], reduce: str,
                  pad_value: float | None) -> Any:
    """For each output ``(n, i, j, o)`` of a stride-1 2-D NHWC / HWIO product that has a
    derivative: ``(index, window, selected, d out / d term, d term / dx, d term / dw)``, the
    window a slice of the padded input and the rest over its ``(KH, KW, C)`` terms.

    The rules of docs/numerics.md: a sum gives every term 1 (NaN and infinities propagate
    through the partials as IEEE says); a max / min window holding a NaN term has no
    derivative (it is not yielded: its cotangent is dropped, its tangent 0), otherwise each
    term equal to the result gets ``1 / count``; logsumexp gives each term
    ``exp(term - out)`` and an all ``-inf`` window nothing. Taps in identity padding are not
    selected; with a ``pad_value`` they are terms.
    """
    (pt, pb), (pl, pr) = padding
    kh, kw = w.shape[:2]
    fill = 0.0 if pad_value is None else pad_value
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    valid = np.pad(np.ones(x.shape, bool), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    if pad_value is not None:
        valid[:] = True
    for n, i, j, o in np.ndindex(out_shape):
        win = (n, slice(i, i + kh), slice(j, j + kw))
        xs, ws, ok = xp[win], w[..., o], valid[win]
        c = np.asarray(combine(xs, ws), np.float64)
        if reduce == "sum":
            sel, weight = ok, np.ones(c.shape)
        elif reduce in ("max", "min"):
            if np.isnan(c[ok]).any() or not ok.any():
                continue
            y = c[ok].max() if reduce == "max" else c[ok].min()
            sel = ok & (c == y)
            weight = np.full(c.shape, 1.0 / sel.sum())
        else:  # logsumexp
            y = np.logaddexp.reduce(c[ok]) if ok.any() else -np.inf
            if y == -np.inf:
                continue
            sel, weight = ok, np.exp(c - y)
        yield (n, i, j, o), win, sel, weight, *partials(xs, ws)


def _padded_shape(x: np.ndarray, padding: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    (pt, pb), (pl, pr) = padding
    return (x.shape[0], x.shape[1] + pt + pb, x.shape[2] + pl + pr, x.shape[3])


def conv_grads_reference(
    x: Any,
    w: Any,
    g: Any,
    padding: Sequence[tuple[int, int]],
    *,
    combine: Combine,
    partials: Callable[[Any, Any], tuple[Any, Any]],
    reduce: str,
    pad_value: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(dx, dw)`` of a stride-1, undilated 2-D NHWC / HWIO product by loops over the output,
    in float64, given the cotangent ``g`` of its output: each selected term of
    `_window_terms` adds ``g * d out / d term * partial``; an unselected one adds nothing
    (it is not multiplied by 0). A padded cell's input gradient is discarded.

    Args:
        x: the input ``(N, H, W, C)``.
        w: the kernel ``(KH, KW, C, O)``.
        g: the output's cotangent ``(N, OH, OW, O)``.
        padding: ``((lo, hi), (lo, hi))``.
        combine: the elementwise product (numpy).
        partials: its partial derivatives, ``partials(x, w) -> (dx, dw)``.
        reduce: ``"sum"``, ``"max"``, ``"min"`` or ``"logsumexp"``.
        pad_value: the value of padded cells, or None for identity padding.

    Returns:
        ``(dx, dw)`` in float64.
    """
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    dxp, dw = np.zeros(_padded_shape(x, padding)), np.zeros(w.shape)
    with np.errstate(all="ignore"):
        for idx, win, sel, weight, px, pw in _window_terms(
                x, w, g.shape, padding, combine, partials, reduce, pad_value):
            share = g[idx] * weight
            dxp[win] += np.where(sel, share * px, 0.0)
            dw[..., idx[3]] += np.where(sel, share * pw, 0.0)
    (pt, _), (pl, _) = padding
    return dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2]], dw


def conv_maxmin_grads_reference(
    lhs: Any,
    rhs: Any,
    g: Any,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    *,
    combine: Combine,
    partials: Callable[[Any, Any], tuple[Any, Any]],
    reduce: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``(dx, dw)`` of a max / min product of any `conv_reference` geometry (identity
    padding), by loops over its outputs, in float64, given the output's cotangent ``g``.

    Each output's terms are its window's ``combine(x, w)`` over the taps that read the input
    (taps in padding or a hole are not terms), exactly as `conv_reference` folds them; the
    terms equal to the result share its cotangent equally (``-0 == +0``), each adding
    ``g / count * partial`` to its operands' gradients; a window holding a NaN term, or none,
    has no derivative.

    Args:
        lhs: the input, laid out as ``dimension_numbers`` says.
        rhs: the kernel, likewise.
        g: the output's cotangent, likewise.
        window_strides: as ``lax.conv_general_dilated``.
        padding: likewise.
        lhs_dilation: likewise.
        rhs_dilation: likewise.
        dimension_numbers: likewise.
        feature_group_count: likewise.
        combine: the elementwise product (numpy, on scalars).
        partials: its partial derivatives, ``partials(x, w) -> (dx, dw)``.
        reduce: ``"max"`` or ``"min"``.

    Returns:
        ``(dx, dw)`` in float64, laid out as ``lhs`` and ``rhs``.
    """
    lhs, rhs, g = (np.asarray(a, np.float64) for a in (lhs, rhs, g))
    nsp = lhs.ndim - 2
    lhs_spec, rhs_spec, out_spec = dimension_specs(dimension_numbers, lhs.ndim)
    x, w, gc = np.transpose(lhs, lhs_spec), np.transpose(rhs, rhs_spec), np.transpose(g, out_spec)
    strides = tuple(int(s) for s in window_strides)
    lhs_dil = tuple(lhs_dilation) if lhs_dilation is not None else (1,) * nsp
    rhs_dil = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nsp
    k_sp = w.shape[2:]
    dil_kernel = [_dilate_dim(k, d) for k, d in zip(k_sp, rhs_dil, strict=True)]
    pads = resolve_padding(padding, x.shape[2:], dil_kernel, strides)
    dil_in = [_dilate_dim(s, d) for s, d in zip(x.shape[2:], lhs_dil, strict=True)]
    c_out, c_in_group = w.shape[:2]
    out_per_group = c_out // int(feature_group_count)
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    pick = np.max if reduce == "max" else np.min
    with np.errstate(all="ignore"):
        for o_idx in itertools.product(*(range(s) for s in gc.shape[2:])):
            taps = [(k, src) for k, src in _taps(o_idx, k_sp, strides, pads, lhs_dil, rhs_dil,
                                                 dil_in) if src is not None]
            for n, co in itertools.product(range(x.shape[0]), range(c_out)):
                cis = co // out_per_group * c_in_group
                at = [((n, cis + ci) + src, (co, ci) + k)
                      for k, src in taps for ci in range(c_in_group)]
                if not at:
                    continue
                c = np.array([combine(x[i], w[j]) for i, j in at], np.float64)
                if np.isnan(c).any():
                    continue
                won = c == pick(c)
                share = gc[(n, co) + o_idx] / won.sum()
                for (i, j), hit in zip(at, won, strict=True):
                    if hit:
                        px, pw = partials(x[i], w[j])
                        dx[i] += share * px
                        dw[j] += share * pw
    return (np.transpose(dx, np.argsort(lhs_spec)), np.transpose(dw, np.argsort(rhs_spec)))


def conv_tangent_reference(
    x: Any,
    w: Any,
    tx: Any,
    tw: Any,
    out_shape: tuple[int, ...],
    padding: Sequence[tuple[int, int]],
    *,
    combine: Combine,
    partials: Callable[[Any, Any], tuple[Any, Any]],
    reduce: str,
    pad_value: float | None = None,
    term_tangent: Callable[[Any, Any, Any, Any], Any] | None = None,
) -> np.ndarray:
    """The output's tangent (forward mode) of the product of `conv_grads_reference`, given
    the operands' tangents: each selected term of `_window_terms` adds
    ``d out / d term * (partial_x * tx + partial_w * tw)``; an output without a derivative
    (a NaN max / min window, an all ``-inf`` logsumexp one) has tangent 0; a padded cell's
    tangent is 0.

    Args:
        x: the input ``(N, H, W, C)``.
        w: the kernel ``(KH, KW, C, O)``.
        tx: the input's tangent.
        tw: the kernel's tangent.
        out_shape: the output's shape ``(N, OH, OW, O)``.
        padding: ``((lo, hi), (lo, hi))``.
        combine: the elementwise product (numpy).
        partials: its partial derivatives, ``partials(x, w) -> (dx, dw)``.
        reduce: ``"sum"``, ``"max"``, ``"min"`` or ``"logsumexp"``.
        pad_value: the value of padded cells, or None for identity padding.
        term_tangent: ``(x, w, tx, tw) -> `` a term's tangent, where the chain rule through
            the combine's own expression differs from ``partial_x * tx + partial_w * tw``
            with infinite partials (`NUMPY_TERM_TANGENTS`); None for that sum.

    Returns:
        The tangent ``(N, OH, OW, O)`` in float64.
    """
    x, w, tx, tw = (np.asarray(a, np.float64) for a in (x, w, tx, tw))
    (pt, pb), (pl, pr) = padding
    fill = 0.0 if pad_value is None else pad_value
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    txp = np.pad(tx, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ty = np.zeros(out_shape)
    with np.errstate(all="ignore"):
        for idx, win, sel, weight, px, pw in _window_terms(
                x, w, out_shape, padding, combine, partials, reduce, pad_value):
            if term_tangent is None:
                t = px * txp[win] + pw * tw[..., idx[3]]
            else:
                t = term_tangent(xp[win], w[..., idx[3]], txp[win], tw[..., idx[3]])
            ty[idx] = np.sum(np.where(sel, weight * t, 0.0))
    return ty
