"""The XLA engine's bit-packed XNOR product: ``popcount(x XOR w)`` summed over the taps and
the ``uint32`` words, as one fused reduction (ops declaring ``combine_kind="popcount_xor"``).

The engine's generic tap loop would hold one ``(block, P, G, Og, words)`` product per tap;
here all taps' packed slices (``T / 32`` of a float input's bytes) feed one reduction over
``(taps, words)``, in chunks of at most `WORDS_PER_REDUCE` words.

Padding is the op's: a padded tap (or an ``lhs_dilation`` hole) is skipped. The input is
padded with 0 words, so a padded tap first adds ``popcount(w_tap)`` mismatches; a static
mask times ``popcount(w)`` (a tiny integer matmul) takes them away again.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps

Array = jax.Array

KIND = "popcount_xor"

# XLA CPU splits an integer reduction longer than 32 elements into a reduce-window and a
# reduce, which materialises the whole (rows, O, K) XOR tensor (150 MiB for a 256-channel 3x3
# layer); reductions over at most 32 words stay one fused loop with no temporary.
WORDS_PER_REDUCE = 32


def mismatches(op: Op, geom: Geometry, x: Array, w: Array) -> Array:
    """The mismatching bits of packed ``x`` and ``w`` over every real tap.

    Args:
      op: the product (its padding fills the input before the correction).
      geom: the geometry.
      x: packed ``uint32`` input ``(N, *spatial, G * words)``.
      w: packed ``uint32`` kernel ``(*window, words, O)``.

    Returns:
      ``(N, *out_spatial, O)`` ``int32`` counts.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax import lax
      >>> from jaxconv._src.core.algebra import Op
      >>> op = Op(lambda a, b: lax.population_count(a ^ b), "sum", combine_kind="popcount_xor")
      >>> geom = Geometry((3,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
      >>> x = jnp.array([[[5], [1], [7]]], jnp.uint32)
      >>> mismatches(op, geom, x, jnp.array([[[1]], [[1]]], jnp.uint32))[0, :, 0]
      Array([1, 2], dtype=int32)
    """
    n = x.shape[0]
    g = geom.groups
    words = w.shape[-2]
    o = w.shape[-1]
    og = o // g
    tap_list = geom.taps()
    t = len(tap_list)
    p = max(1, math.prod(geom.out_spatial))
    xp = taps.pad_input(x, op, geom, fill=0)
    cols = jnp.stack([taps.tap_slice(xp, geom, tap) for tap in tap_list], axis=-2)
    cols = cols.reshape(n, p, t, g, words).transpose(0, 1, 3, 2, 4).reshape(n, p, g, 1, t * words)
    wt = w.reshape(t, words, g, og).transpose(2, 3, 0, 1)  # (G, Og, T, words)
    wflat = wt.reshape(g, og, t * words)
    mism = None  # (N, P, G, Og)
    for s in range(0, t * words, WORDS_PER_REDUCE):
        e = min(s + WORDS_PER_REDUCE, t * words)
        part = jnp.sum(lax.population_count(cols[..., s:e] ^ wflat[None, None, :, :, s:e]),
                       axis=-1, dtype=jnp.int32)
        mism = part if mism is None else mism + part
    mask = geom.valid_mask()
    if mask is not None:
        invalid = np.stack([np.logical_not(geom.tap_mask(mask, tap)).reshape(p)
                            for tap in tap_list]).astype(np.int32)
        if invalid.any():
            pcw = jnp.sum(lax.population_count(wt), axis=-1, dtype=jnp.int32)  # (G, Og, T)
            corr = jnp.einsum("tp,got->pgo", jnp.asarray(invalid), pcw,
                              preferred_element_type=jnp.int32)
            mism = mism - corr[None, ...]
    return mism.reshape(n, *geom.out_spatial, o)
