"""Multi-op convolutions: the output channels split among several ops in one call.

Morphological networks use dilation (max-plus) and erosion (min-plus) channels side by side
(Mondal et al. 2019; Franchi et al. 2020). `conv_multi` computes such a layer from one
kernel whose output channels are split into consecutive slices, slice ``j`` computed with
``ops[j]``.

Dual pairs run in a single pass of the engine: ``min_plus(x, w) = -max_plus(-x, -w)`` and
``min_max(x, w) = -max_min(-x, -w)``, so a (max_plus, min_plus) split is one max-plus
convolution of ``[x, -x]`` (channels concatenated) with two feature groups -- one pass over
the taps computing both slices, instead of two convolutions. Every other combination is the
concatenation of one convolution per slice (the same numbers, documented as such).
A pair is recognised from what its ops declare or are inferred to compute (`combine` the
same primitive ``x + w``, or ``min(x, w)`` against ``max(x, w)``; reduces max and min;
identity padding, no ``post`` or ``rewrite``), never by name, so user ops and renamed
built-ins pair too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.conv import conv_general_dilated, with_out_sharding
from jaxconv._src.core import validation
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.ops import resolve

Array = jax.Array

# (combine, reduce) of a max side -> that of its min side, b(x, w) = -a(-x, -w): negating
# both operands negates x + w and swaps min(x, w) with max(x, w).
_NEGATED = {("add", "max"): ("add", "min"), ("min", "max"): ("max", "min")}


def _dual_sides(a: Op, b: Op) -> tuple[bool, bool] | None:
    """``(negated_a, negated_b)`` when one op is the other on negated operands, negated
    (``b(x, w) == -a(-x, -w)``: the max side is computed, the min side negated), else
    ``None``.

    Args:
        a: the first op.
        b: the second op.

    Returns:
        Which side is computed negated, or ``None``.
    """
    kinds = []
    for op in (a, b):
        caps = capabilities(op)
        plain = caps.canonical
        if (plain.pad_value is not None or plain.identity is not None or plain.post is not None
                or plain.rewrite is not None):
            return None
        kinds.append((caps.combine, caps.reduce))
    if _NEGATED.get(kinds[0]) == kinds[1]:
        return False, True
    if _NEGATED.get(kinds[1]) == kinds[0]:
        return True, False
    return None


def conv_multi(
    lhs: Any,
    rhs: Any,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    *,
    ops: Sequence[Op | str],
    split: Sequence[int],
    engine: str = "auto",
    max_block_bytes: int | None = None,
) -> Array:
    """A convolution whose output channels are split among several ops.

    Output channels ``[s_0, s_0 + split[0])`` use ``ops[0]``, the next ``split[1]`` use
    ``ops[1]``, and so on; all slices share the input, the geometry and one kernel ``rhs``
    (whose output-feature axis has ``sum(split)`` entries). Arguments are those of
    `jaxconv.conv_general_dilated`. With feature groups, every slice must hold whole
    groups.

    A dual pair such as ``("max_plus", "min_plus")`` with equal slices (or with feature
    groups) runs as one engine pass (``min_plus(x, w) = -max_plus(-x, -w)``, computed as a
    two-group max-plus convolution of ``[x, -x]``); other combinations are the
    concatenation of one convolution per slice.

    Args:
      lhs: input, as in `jaxconv.conv_general_dilated`.
      rhs: kernel with ``sum(split)`` output features.
      window_strides: strides.
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or ``(low, high)`` pairs.
      lhs_dilation: input dilation.
      rhs_dilation: kernel dilation.
      dimension_numbers: as in lax.
      feature_group_count: feature groups.
      precision: passed to lax for the standard op and native rewrites.
      preferred_element_type: accumulation and output dtype.
      out_sharding: output sharding.
      ops: one op (or built-in name) per slice.
      split: the number of output channels of each slice.
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      The convolution, every slice's channels in order along the output feature axis.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> x = jnp.array([0., 3., 1., 2.]).reshape(1, 4, 1)     # NWC
      >>> w = jnp.zeros((2, 1, 2))                              # WIO, 2 output channels
      >>> y = jaxconv.conv_multi(x, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
      ...                        ops=("max_plus", "min_plus"), split=(1, 1))
      >>> y[0]                                                  # dilation | erosion
      Array([[3., 0.],
             [3., 1.],
             [2., 1.]], dtype=float32)
    """
    ops_ = tuple(resolve(o) for o in ops)
    split_ = tuple(int(s) for s in split)
    if len(ops_) != len(split_) or not ops_:
        raise ValueError(
            f"`ops` ({len(ops_)}) and `split` ({len(split_)}) need one entry per slice.")
    if any(s < 0 for s in split_):
        raise ValueError(f"`split` entries must be >= 0, got {tuple(split)}.")
    lhs = validation.as_array("lhs", lhs)
    rhs = validation.as_array("rhs", rhs)
    dn = validation.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    o_axis, c_axis, out_c = dn.rhs_spec[0], dn.lhs_spec[1], dn.out_spec[1]
    o_total = rhs.shape[o_axis]
    if sum(split_) != o_total:
        raise ValueError(
            f"`split` {split_} must add up to the kernel's output features ({o_total}).")
    groups = validation.positive_int("feature_group_count", feature_group_count)
    if o_total % groups:
        raise ValueError(
            f"`feature_group_count`={groups} must divide the output features ({o_total}).")
    og = o_total // groups
    if groups > 1 and any(s % og for s in split_):
        raise ValueError(
            f"with `feature_group_count`={groups} every slice must hold whole groups of {og} "
            f"output features; got `split`={split_}.")
    kw = dict(precision=precision, preferred_element_type=preferred_element_type,
              engine=engine, max_block_bytes=max_block_bytes)
    geo = (window_strides, padding, lhs_dilation, rhs_dilation, dn)

    # Drop empty slices and merge neighbours with the same op.
    pieces: list[tuple[Op, int]] = []
    for o, s in zip(ops_, split_, strict=True):
        if s == 0:
            continue
        if pieces and pieces[-1][0] == o:
            pieces[-1] = (o, pieces[-1][1] + s)
        else:
            pieces.append((o, s))

    def run(op: Op, x: Array, k: Array, g: int) -> Array:
        return conv_general_dilated(x, k, *geo, feature_group_count=g, op=op, **kw)

    if len(pieces) == 1:
        return with_out_sharding(run(pieces[0][0], lhs, rhs, groups), out_sharding)

    if len(pieces) == 2:
        (a, na), (b, nb) = pieces
        sides = _dual_sides(a, b) if jnp.issubdtype(lhs.dtype, jnp.floating) else None
        dual = sides is not None
        neg_a, neg_b = sides or (False, False)
        base = b if neg_a else a  # the max side, computed on [x, -x]
        sa, sb = (-1 if neg_a else 1), (-1 if neg_b else 1)
        ka = lax.slice_in_dim(rhs, 0, na, axis=o_axis) * sa
        kb = lax.slice_in_dim(rhs, na, na + nb, axis=o_axis) * sb
        k2 = jnp.concatenate([ka, kb], axis=o_axis)
        if dual and groups > 1:
            # The slices hold whole groups: negate the input channels of the negated slice's
            # groups and run one grouped convolution.
            split_c = (na // og) * (lhs.shape[c_axis] // groups)
            xa = lax.slice_in_dim(lhs, 0, split_c, axis=c_axis) * sa
            xb = lax.slice_in_dim(lhs, split_c, lhs.shape[c_axis], axis=c_axis) * sb
            y = run(base, jnp.concatenate([xa, xb], axis=c_axis), k2, groups)
        elif dual and na == nb:
            # One pass over [s_a x, s_b x] with two groups (slice a reads the first half).
            y = run(base, jnp.concatenate([lhs * sa, lhs * sb], axis=c_axis), k2, 2)
        else:
            y = None
        if y is not None:
            ya = lax.slice_in_dim(y, 0, na, axis=out_c) * sa
            yb = lax.slice_in_dim(y, na, na + nb, axis=out_c) * sb
            return with_out_sharding(jnp.concatenate([ya, yb], axis=out_c), out_sharding)

    cin = lhs.shape[c_axis]
    cg = cin // groups
    outs = []
    start = 0
    for op, n in pieces:
        k = lax.slice_in_dim(rhs, start, start + n, axis=o_axis)
        g_lo, g_n = start // og, n // og
        x = lhs if groups == 1 else lax.slice_in_dim(lhs, g_lo * cg, (g_lo + g_n) * cg,
                                                     axis=c_axis)
        outs.append(run(op, x, k, g_n if groups > 1 else 1))
        start += n
    return with_out_sharding(jnp.concatenate(outs, axis=out_c), out_sharding)
