"""Bit-packed XNOR-popcount convolutions and dense products (inference).

Binary values ``+-1`` (``sign(0) = +1``, larq's sign) are packed 32 to a ``uint32`` along the
input-channel axis: bit ``j`` of word ``q`` holds channel ``32 q + j``, 1 for ``+1`` and 0 for
``-1``. For two packed vectors of ``K`` real channels

    sum_c sign(x_c) sign(w_c) = K - 2 * popcount(x XOR w)

provided the bits that pad ``K`` up to a multiple of 32 are equal in both operands (here:
always 0), so they never count. With feature groups every group is packed separately (each
group's channels padded to a multiple of 32).

Padding follows ``ops.xnor``: with ``pad_value=None`` a padded tap (or an ``lhs_dilation``
hole) is skipped, i.e. contributes 0 -- which no bit pattern can encode, so each tap's term
``K - 2 popcount`` is masked to 0 at the positions where it reads padding (a static mask, as
in the XLA engine). With a ``pad_value`` the padded cells hold ``sign(pad_value)`` in every
real channel (larq's ``pad_values=+-1``) and go through the XNOR.

NaN cannot be packed: a NaN input packs as ``-1`` (``ops.xnor`` would give NaN).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import canonical
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps

Array = jax.Array

WORD_BITS = 32


def packed_size(n: int) -> int:
    """Number of ``uint32`` words holding ``n`` binary channels.

    Args:
      n: the number of channels.

    Returns:
      ``ceil(n / 32)``.

    Example:
      >>> from jaxconv import packed
      >>> packed.packed_size(33)
      2
    """
    return -(-int(n) // WORD_BITS)


def pack_signs(x: Any, axis: int = -1, *, groups: int = 1) -> Array:
    """Packs ``sign(x)`` (``sign(0) = +1``) into ``uint32`` words along ``axis``.

    Args:
      x: real array; ``x >= 0`` (and ``-0.0``) packs as a 1 bit (``+1``), ``x < 0`` as 0.
      axis: the channel axis to pack.
      groups: feature groups: the axis is split into ``groups`` equal parts, each packed on
        its own (padded with 0 bits to a multiple of 32).

    Returns:
      ``uint32`` array with ``axis`` of length ``groups * ceil(C / groups / 32)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import packed
      >>> packed.pack_signs(jnp.array([1.0, -2.0, 0.0, -0.5]))
      Array([5], dtype=uint32)
    """
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"pack_signs: `x` must be a real array, got dtype {x.dtype}.")
    axis = _check_axis("pack_signs", axis, x.ndim)
    c = x.shape[axis]
    if groups < 1 or c % groups:
        raise ValueError(
            f"pack_signs: `groups` (={groups}) must be >= 1 and divide the size of axis {axis} "
            f"({c}).")
    xm = jnp.moveaxis(x, axis, -1)
    per = c // groups
    words = packed_size(per)
    bits = (xm >= 0).reshape(*xm.shape[:-1], groups, per)
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, words * WORD_BITS - per)])
    bits = bits.reshape(*xm.shape[:-1], groups, words, WORD_BITS).astype(jnp.uint32)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape((1,) * (bits.ndim - 1) + (-1,))
    # Distinct bits never carry, so the sum is the bitwise OR of the shifted bits.
    packed = jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)
    packed = packed.reshape(*xm.shape[:-1], groups * words)
    return jnp.moveaxis(packed, -1, axis)


def unpack_signs(
    packed: Any, size: int, axis: int = -1, *, groups: int = 1, dtype: Any = jnp.float32
) -> Array:
    """Inverse of `pack_signs`: ``uint32`` words -> ``+-1`` values.

    Args:
      packed: ``uint32`` array from `pack_signs`.
      size: the number of real channels along ``axis`` (all groups together).
      axis: the packed axis.
      groups: feature groups used when packing.
      dtype: dtype of the result.

    Returns:
      Array with ``axis`` of length ``size`` holding ``-1`` and ``+1``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import packed
      >>> packed.unpack_signs(jnp.array([5], jnp.uint32), 4)
      Array([ 1., -1.,  1., -1.], dtype=float32)
    """
    packed = jnp.asarray(packed)
    _check_packed("unpack_signs", "packed", packed)
    axis = _check_axis("unpack_signs", axis, packed.ndim)
    if groups < 1 or size % groups:
        raise ValueError(
            f"unpack_signs: `groups` (={groups}) must be >= 1 and divide `size` (={size}).")
    per = size // groups
    words = packed_size(per)
    if packed.shape[axis] != groups * words:
        raise ValueError(
            f"unpack_signs: axis {axis} has {packed.shape[axis]} words; {size} channels in "
            f"{groups} group(s) need {groups * words}.")
    pm = jnp.moveaxis(packed, axis, -1).reshape(*packed.shape[:axis] + packed.shape[axis + 1:],
                                                 groups, words, 1)
    bits = (pm >> jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape((1,) * (pm.ndim - 1) + (-1,))) & 1
    bits = bits.reshape(*bits.shape[:-2], words * WORD_BITS)[..., :per]
    vals = (2 * bits.astype(jnp.int32) - 1).astype(dtype)
    vals = vals.reshape(*vals.shape[:-2], size)
    return jnp.moveaxis(vals, -1, axis)


def pack_kernel(kernel: Any, *, groups: int = 1) -> Array:
    """Packs a float kernel ``(*window, I, O)`` (or a dense ``(I, O)``) along ``I``.

    The kernel's ``I`` is already per group, so groups need no split here; ``groups`` is
    accepted for symmetry and must be 1 for a kernel.

    Args:
      kernel: latent (real-valued) weights; ``sign(kernel)`` is what gets packed.
      groups: must be 1 (the ``I`` axis of a grouped kernel holds one group's channels).

    Returns:
      ``uint32`` kernel ``(*window, ceil(I / 32), O)``: 32 times smaller than float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import packed
      >>> packed.pack_kernel(jnp.ones((3, 3, 40, 8))).shape
      (3, 3, 2, 8)
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(
            f"pack_kernel: `kernel` must be (*window, I, O) or (I, O), got shape {kernel.shape}.")
    if groups != 1:
        raise ValueError("pack_kernel: `groups` must be 1 (a kernel's I axis is per group).")
    return pack_signs(kernel, axis=-2)


def _check_axis(fn: str, axis: int, ndim: int) -> int:
    """``axis`` as a non-negative int.

    Args:
        fn: the function's name, for the message.
        axis: the axis given (negative counts from the end).
        ndim: the array's rank.

    Returns:
        The axis in ``[0, ndim)``.

    Raises:
        ValueError: not an int in ``[-ndim, ndim)``.
    """
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: `axis` (={axis!r}) out of range for an array of rank {ndim}.")
    return int(axis) % ndim


def _check_packed(fn: str, name: str, a: Array) -> None:
    """Refuses an operand that is not packed ``uint32`` words (the message names ``name``)."""
    if a.dtype != jnp.uint32:
        raise TypeError(f"{fn}: `{name}` must be packed uint32 words, got dtype {a.dtype}.")


# An op on integer words: it has no derivative (declared, so nothing traces it on floats);
# its declared combine kind makes the XLA engine run it as one fused word reduction.
POPCOUNT_XOR = Op(
    lambda a, b: lax.population_count(a ^ b).astype(jnp.int32), "sum", name="popcount_xor",
    doc="""``popcount(x XOR w)`` summed: the mismatches of packed binary words.""",
    combine_kind="popcount_xor", forward_mode=False,
)


def _pad_word(pad_value: float, per: int, groups: int) -> Array:
    """The packed word(s) of one padded cell: ``sign(pad_value)`` in every real channel."""
    return pack_signs(jnp.full((groups * per,), pad_value, jnp.float32), groups=groups)


def _geometry(
    in_spatial: tuple[int, ...], window: tuple[int, ...], window_strides: Any, padding: Any,
    lhs_dilation: Any, rhs_dilation: Any, groups: int,
) -> Geometry:
    """The `Geometry` of a packed convolution, checked as lax checks its arguments.

    Args:
        in_spatial: the input's spatial sizes.
        window: the kernel's spatial sizes.
        window_strides: the strides, ``None`` for ones.
        padding: ``"SAME"``, ``"VALID"`` (any case) or ``(low, high)`` pairs.
        lhs_dilation: the input dilation, ``None`` for ones.
        rhs_dilation: the kernel dilation, ``None`` for ones.
        groups: the number of feature groups.

    Returns:
        The geometry.

    Raises:
        ValueError: a stride or dilation that is not positive ints, padding of the wrong length,
            a string padding with an input dilation, or a window larger than the padded input.
    """
    nsd = len(in_spatial)

    def ints(name: str, v: Any) -> tuple[int, ...]:
        if v is None:
            return (1,) * nsd
        t = tuple(int(e) for e in v)
        if len(t) != nsd or min(t, default=1) < 1:
            raise ValueError(
                f"packed_conv: `{name}` must be {nsd} positive ints, got {v!r}.")
        return t

    strides = ints("window_strides", window_strides)
    lhs_dil = ints("lhs_dilation", lhs_dilation)
    rhs_dil = ints("rhs_dilation", rhs_dilation)
    dil_in = tuple((s - 1) * d + 1 if s else 0 for s, d in zip(in_spatial, lhs_dil, strict=True))
    dil_win = tuple((k - 1) * d + 1 for k, d in zip(window, rhs_dil, strict=True))
    if isinstance(padding, str):
        if padding.upper() != "VALID" and any(d != 1 for d in lhs_dil):
            raise ValueError("packed_conv: string padding needs lhs_dilation == 1 (as lax).")
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(dil_in, dil_win, strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pads) != nsd:
            raise ValueError(
                f"packed_conv: `padding` needs {nsd} (low, high) pairs, got {padding!r}.")
    for ax, (s, (lo, hi), k) in enumerate(zip(dil_in, pads, dil_win, strict=True)):
        if s + lo + hi < k:
            raise ValueError(
                f"packed_conv: window larger than the padded input in spatial dimension {ax}.")
    return Geometry(tuple(in_spatial), tuple(window), strides, pads, lhs_dil, rhs_dil, groups)


def _as_packed_input(x: Any, groups: int, in_features: int | None) -> tuple[Array, int]:
    """A float input is packed along its last axis; a ``uint32`` input is taken as packed.

    Args:
        x: the input, float (packed here) or ``uint32`` words.
        groups: the number of feature groups.
        in_features: the real number of input channels per group (needed for a packed input).

    Returns:
        The packed input and the number of channels per group.

    Raises:
        TypeError: neither float nor ``uint32``.
        ValueError: a packed input without ``in_features``, or channels that ``groups`` does
            not divide.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.uint32:
        if in_features is None:
            raise ValueError(
                "packed input (uint32) needs `in_features`: the real number of input channels "
                "per group.")
        return x, int(in_features)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`x` must be a float array (packed on the fly) or packed uint32 words, got "
            f"{x.dtype}.")
    c = x.shape[-1]
    if c % groups:
        raise ValueError(f"`feature_group_count` (={groups}) must divide the channels ({c}).")
    if in_features is not None and in_features != c // groups:
        raise ValueError(
            f"`in_features` (={in_features}) must equal channels per group ({c // groups}).")
    return pack_signs(x, -1, groups=groups), c // groups


def packed_conv(
    x: Any,
    w_packed: Any,
    window_strides: Any = None,
    padding: Any = "VALID",
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    feature_group_count: int = 1,
    *,
    in_features: int | None = None,
    pad_value: float | None = None,
    out_dtype: Any = jnp.float32,
    engine: str = "xla",
) -> Array:
    """XNOR-popcount convolution on packed bits, channels last; equals ``ops.xnor`` exactly.

    ``out = sum over taps and channels of sign(x) * sign(w)``, computed as
    ``K - 2 popcount(x XOR w)`` per tap on ``uint32`` words.

    Args:
      x: ``(N, *spatial, C)``: float (its signs are packed here) or already packed ``uint32``
        ``(N, *spatial, G * ceil(C / G / 32))`` from ``pack_signs(x, -1, groups=G)``.
      w_packed: packed kernel ``(*window, ceil(I / 32), O)`` from `pack_kernel`.
      window_strides: strides (default 1).
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or ``(low, high)`` pairs.
      lhs_dilation: input dilation (holes behave like padding).
      rhs_dilation: kernel dilation.
      feature_group_count: feature groups ``G``.
      in_features: real input channels per group ``I`` (needed for a packed ``x``).
      pad_value: ``None``: padded taps are skipped (contribute 0, as ``ops.xnor``); a number:
        padded cells hold ``sign(pad_value)`` (``ops.xnor.replace(pad_value=...)``).
      out_dtype: result dtype (default float32, as ``ops.xnor`` on float inputs; the values
        are exact integers).
      engine: ``"xla"`` (a fused loop over taps) or ``"pallas"`` (the Pallas semiring-matmul
        kernel with a ``popcount(x XOR w)`` product; interpret mode on CPU).

    Returns:
      ``(N, *out_spatial, O)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import packed
      >>> x = jnp.array([[[1.0], [-1.0], [2.0]]])  # (N, W, C): signs +, -, +
      >>> w = packed.pack_kernel(jnp.array([[[1.0]], [[-1.0]]]))  # (2, 1, 1)
      >>> packed.packed_conv(x, w, (1,), "VALID")[0, :, 0]
      Array([ 2., -2.], dtype=float32)
    """
    w_packed = jnp.asarray(w_packed)
    _check_packed("packed_conv", "w_packed", w_packed)
    groups = int(feature_group_count)
    if groups < 1:
        raise ValueError(f"packed_conv: `feature_group_count` must be >= 1, got {groups}.")
    xq, per = _as_packed_input(x, groups, in_features)
    if xq.ndim != w_packed.ndim or xq.ndim < 2:
        raise ValueError(
            f"packed_conv: `x` {xq.shape} and `w_packed` {w_packed.shape} must have the same "
            "rank (channels-last (N, *spatial, C) and (*window, I_words, O)).")
    words = packed_size(per)
    if w_packed.shape[-2] != words or xq.shape[-1] != groups * words:
        raise ValueError(
            f"packed_conv: {per} channels per group need {words} words: `w_packed` has "
            f"{w_packed.shape[-2]}, `x` has {xq.shape[-1]} for {groups} group(s).")
    if w_packed.shape[-1] % groups:
        raise ValueError(
            f"packed_conv: `feature_group_count` (={groups}) must divide the output features "
            f"({w_packed.shape[-1]}).")
    if engine not in ("xla", "pallas"):
        raise ValueError(f"packed_conv: `engine` must be 'xla' or 'pallas', got {engine!r}.")
    geom = _geometry(tuple(xq.shape[1:-1]), tuple(w_packed.shape[:-2]), window_strides,
                     padding, lhs_dilation, rhs_dilation, groups)
    y = _packed_conv_canonical(xq, w_packed, geom, per, pad_value, engine)
    return y.astype(out_dtype)


def _fill_padding(xq: Array, geom: Geometry, pad_value: float, per: int) -> tuple[Array, Geometry]:
    """Pads packed ``x`` with ``sign(pad_value)`` words; returns it and a VALID geometry.

    Args:
        xq: the packed input.
        geom: the product's geometry.
        pad_value: the padding's real value (its sign is packed).
        per: the number of real channels per group.

    Returns:
        The padded input and the geometry of a VALID product on it.
    """
    xp = taps.pad_input(xq, POPCOUNT_XOR, geom, fill=0)
    vm = geom.valid_mask()
    if vm is not None:
        word = _pad_word(pad_value, per, geom.groups)
        xp = jnp.where(jnp.asarray(vm)[None, ..., None], xp, word)
    nsd = len(geom.window)
    valid = Geometry(geom.padded_spatial, geom.window, geom.strides, ((0, 0),) * nsd,
                     (1,) * nsd, geom.rhs_dilation, geom.groups)
    return xp, valid


def _valid_taps(geom: Geometry) -> np.ndarray:
    """Number of taps reading a real cell, per output position (static).

    Args:
        geom: the product's geometry.

    Returns:
        The counts, of shape ``geom.out_spatial``.
    """
    mask = geom.valid_mask()
    out = np.zeros(geom.out_spatial, np.int64)
    for tap in geom.taps():
        m = geom.tap_mask(mask, tap)
        out += 1 if m is None else m
    return out


def _packed_conv_canonical(
    xq: Array, wq: Array, geom: Geometry, per: int, pad_value: float | None, engine: str
) -> Array:
    """The XNOR-popcount convolution of packed operands in the canonical layout.

    Args:
        xq: the packed input ``(N, *S, words)``.
        wq: the packed kernel ``(*K, words, O)``.
        geom: the product's geometry.
        per: the number of real channels per group.
        pad_value: the padding's real value, ``None`` to skip padded taps.
        engine: the engine asked for.

    Returns:
        The ±1 dot products, int32 ``(N, *out_spatial, O)``.
    """
    if pad_value is not None:
        xq, geom = _fill_padding(xq, geom, pad_value, per)
    # The mismatches over the taps that read real cells (padded taps are skipped: the op's
    # identity padding), through the core's primitive with the engine asked for (XLA: one
    # fused XOR-popcount reduction; Pallas: its semiring kernels); then
    # K * (#valid taps) - 2 * mismatches.
    mism = canonical.canonical_conv(xq, wq, geom, POPCOUNT_XOR, engine=engine,
                                    preferred_element_type=jnp.int32)
    nvalid = jnp.asarray(_valid_taps(geom).astype(np.int32))[None, ..., None]
    return per * nvalid - 2 * mism


def packed_dense(
    x: Any,
    w_packed: Any,
    *,
    in_features: int | None = None,
    out_dtype: Any = jnp.float32,
    engine: str = "xla",
) -> Array:
    """XNOR-popcount dense product over the last axis; equals ``ops.xnor`` exactly.

    Args:
      x: ``(..., K)`` float (packed here) or packed ``uint32`` ``(..., ceil(K / 32))``.
      w_packed: packed kernel ``(ceil(K / 32), O)`` from `pack_kernel`.
      in_features: ``K`` (needed for a packed ``x``).
      out_dtype: result dtype (default float32).
      engine: ``"xla"`` or ``"pallas"``.

    Returns:
      ``(..., O)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import packed
      >>> w = packed.pack_kernel(jnp.array([[1.0], [1.0], [-1.0]]))
      >>> packed.packed_dense(jnp.array([[0.5, -1.0, 2.0]]), w)
      Array([[-1.]], dtype=float32)
    """
    w_packed = jnp.asarray(w_packed)
    _check_packed("packed_dense", "w_packed", w_packed)
    if w_packed.ndim != 2:
        raise ValueError(
            f"packed_dense: `w_packed` must be (words, O), got shape {w_packed.shape}.")
    xq, k = _as_packed_input(x, 1, in_features)
    lead = xq.shape[:-1]
    # (M, words) x (words, O): a convolution with no spatial dimensions (one tap).
    y = packed_conv(xq.reshape(-1, xq.shape[-1]), w_packed, (), (), in_features=k,
                    out_dtype=out_dtype, engine=engine)
    return y.reshape(*lead, w_packed.shape[-1])
