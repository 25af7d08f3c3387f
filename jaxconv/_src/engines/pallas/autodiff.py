"""The ``custom_vjp`` wiring of the Pallas kernels (apart from the kernels themselves), and
`generic_conv`, the engine called directly with its own block sizes or backend."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxconv._src.core import algebra, primitive
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps
from jaxconv._src.engines.pallas.config import Spec
from jaxconv._src.engines.pallas.orchestration import _backward, _forward
from jaxconv._src.engines.pallas.platforms import (
    Backend,
    BlockSizes,
    _on_platforms,
    platform_backends,
)

Array = jax.Array


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
