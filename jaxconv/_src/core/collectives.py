"""An op's reduce as a collective: partial products over a sharded contraction axis combined
across devices.

When the contraction axis (the input channels of a convolution, `K` of a dense product) is
split over mesh axes, each device reduces its own channels; the partial results are then
reduced across the devices with the op's own reduce, as declared on the `Op` (its canonical
reduce, `capabilities(op).reduce`; never its name):

- ``sum``: `psum`;
- ``max`` / ``min``: `pmax` / `pmin` on an order-preserving integer key of each float, so that
  the combine is exact in every case the engines define: XLA CPU's all-reduce drops NaN and
  orders a `+0` / `-0` tie by position, the key makes NaN win and `-0` order below `+0`
  (`docs/numerics.md`); integers directly;
- ``logsumexp``: a stable combine, the global maximum (`pmax`) then `psum(exp(y - m))`; an all
  `-inf` result is `-inf` (never NaN), NaN propagates, `+inf` wins;
- ``prod`` and a user's callable reduce that is not a built-in one: no collective (`None`):
  the caller gathers the axis.

Example:
  >>> import jaxconv
  >>> from jaxconv._src.core import collectives
  >>> collectives.kind(jaxconv.ops.min_max), collectives.kind(jaxconv.ops.log)
  ('min', 'logsumexp')
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import algebra
from jaxconv._src.core.capabilities import capabilities

Array = jax.Array

KINDS = ("sum", "max", "min", "logsumexp")


def kind(op: algebra.Op) -> str | None:
    """The collective that reduces `op`'s partial products across devices, or `None`.

    Args:
      op: the product (its canonical reduce decides).

    Returns:
      ``"sum" | "max" | "min" | "logsumexp"``, or `None` for a reduce without one.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> from jaxconv._src.core import collectives
      >>> collectives.kind(jaxconv.Op(jnp.add, lambda a, b: a * b + a + b, identity=0.0))
    """
    red = capabilities(op).reduce
    return red if red in KINDS else None


def combine(which: str, y: Array, axes: tuple[str, ...]) -> Array:
    """Reduces each device's partial result `y` over the mesh `axes` with `which`.

    Args:
      which: a kind from `kind`.
      y: this device's partial result (inside a manual/partitioned computation).
      axes: the mesh axes that split the contraction.

    Returns:
      The reduced result, the same on every device of `axes`.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import PartitionSpec as P
      >>> from jaxconv._src.core import collectives
      >>> mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("c",))
      >>> f = jax.shard_map(lambda v: collectives.combine("max", v, ("c",)), mesh=mesh,
      ...                   in_specs=P("c"), out_specs=P())
      >>> f(jax.numpy.array([-0.0]))
      Array([-0.], dtype=float32)
    """
    if which == "sum":
        return lax.psum(y, axes)
    if which in ("max", "min"):
        return _extremum(which, y, axes)
    if which == "logsumexp":
        return _logsumexp(y, axes)
    raise ValueError(f"collectives.combine: no collective for reduce {which!r}.")


def _extremum(which: str, y: Array, axes: tuple[str, ...]) -> Array:
    """The max (min) across ``axes``, on order-preserving integer keys for floats.

    NaN wins; ``-0`` orders below ``+0``; the result equals one device's max bit for bit.

    Args:
        which: ``"max"`` or ``"min"``.
        y: the partial results.
        axes: the mesh axes.

    Returns:
        The reduced results, in ``y``'s dtype.
    """
    if not jnp.issubdtype(y.dtype, jnp.floating):
        return (lax.pmax if which == "max" else lax.pmin)(y, axes)
    wide = np.dtype(np.float64) if y.dtype == np.float64 else np.dtype(np.float32)
    ints = np.dtype(np.int64) if wide == np.float64 else np.dtype(np.int32)
    info = np.iinfo(ints)
    key = _key(y.astype(wide), ints)
    # NaN wins the max (min): the largest (smallest) key, which decodes to a NaN.
    key = jnp.where(jnp.isnan(y), ints.type(info.max if which == "max" else info.min), key)
    key = (lax.pmax if which == "max" else lax.pmin)(key, axes)
    out = lax.bitcast_convert_type(_flip(key, ints), wide)
    return jnp.where(jnp.isnan(out), jnp.asarray(jnp.nan, wide), out).astype(y.dtype)


def _flip(bits: Array, ints: np.dtype) -> Array:
    """Flips the magnitude bits of negative numbers: an involution between a float's bits
    and an integer key ordered as the floats (`-0` just below `+0`)."""
    mask = ints.type(np.iinfo(ints).max)
    return bits ^ (lax.shift_right_arithmetic(bits, ints.type(8 * ints.itemsize - 1)) & mask)


def _key(y: Array, ints: np.dtype) -> Array:
    """The order-preserving integer key of the floats ``y`` (`_flip` of their bits)."""
    return _flip(lax.bitcast_convert_type(y, ints), ints)


def _logsumexp(y: Array, axes: tuple[str, ...]) -> Array:
    """``log sum exp`` across ``axes``: a ``pmax``, then the ``psum`` of shifted exponentials.

    Args:
        y: the partial results.
        axes: the mesh axes.

    Returns:
        The reduced results (``-inf`` where every term is ``-inf``).
    """
    m = lax.pmax(y, axes)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    s = lax.psum(jnp.exp(y - m), axes)
    # Every term -inf: s == 0, the result -inf (double where: no 0 / 0 in a tangent).
    empty = s == 0
    out = jnp.log(jnp.where(empty, jnp.ones_like(s), s)) + m
    return jnp.where(empty, jnp.full_like(out, -jnp.inf), out)


def tie_devices(y_local: Array, y: Array, axes: tuple[str, ...]) -> Array:
    """How many devices of `axes` hold the winner `y` of a max/min among their partial
    results `y_local` (equal floats: a `+0` / `-0` tie is a tie), per output.

    Args:
        y_local: this device's partial results.
        y: the global results.
        axes: the mesh axes of the contraction.

    Returns:
        The counts, int32.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import PartitionSpec as P
      >>> from jaxconv._src.core import collectives
      >>> mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("c",))
      >>> f = jax.shard_map(lambda a: collectives.tie_devices(a, a, ("c",)), mesh=mesh,
      ...                   in_specs=P("c"), out_specs=P())
      >>> f(jax.numpy.array([1.0]))
      Array([1], dtype=int32)
    """
    return lax.psum((y_local == y).astype(jnp.int32), axes)

