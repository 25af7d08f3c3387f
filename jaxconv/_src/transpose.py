"""Transposed convolution for any `jaxconv.Op`, with ``lax.conv_transpose``'s API."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxconv._src.conv import conv_general_dilated
from jaxconv._src.core import validation
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.ops import standard

Array = jax.Array

_DEFAULT_LAYOUTS = {
    2: ("NC", "IO", "NC"),
    3: ("NHC", "HIO", "NHC"),
    4: ("NHWC", "HWIO", "NHWC"),
    5: ("NHWDC", "HWDIO", "NHWDC"),
}


def transpose_padding(k: int, s: int, padding: str | tuple[int, int]) -> tuple[int, int]:
    """The ``(low, high)`` padding of the dilated convolution that a transposed one runs.

    Computed as ``lax.conv_transpose`` does for the padding of the forward convolution
    (``'SAME'``, ``'VALID'`` or, with ``use_consistent_padding``, a pair).

    Args:
      k: the dilated kernel size.
      s: the stride of the forward convolution (the input dilation here).
      padding: ``'SAME'``, ``'VALID'`` or the forward convolution's ``(low, high)``.

    Returns:
      The padding pair.

    Example:
      >>> from jaxconv._src.transpose import transpose_padding
      >>> transpose_padding(3, 2, "SAME"), transpose_padding(3, 2, "VALID")
      ((2, 1), (2, 2))
    """
    if padding == "SAME":
        pad_len = k + s - 2
        pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
    elif padding == "VALID":
        pad_len = k + s - 2 + max(k - s, 0)
        pad_a = k - 1
    elif isinstance(padding, tuple):
        pads = tuple(k - p - 1 for p in padding)
        pad_a, pad_len = pads[0], sum(pads)
    else:
        raise ValueError(f"`padding` must be 'SAME', 'VALID' or (low, high), got {padding!r}.")
    return pad_a, pad_len - pad_a


def conv_transpose(
    lhs: Any,
    rhs: Any,
    strides: Any,
    padding: Any,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    transpose_kernel: bool = False,
    precision: Any = None,
    preferred_element_type: Any = None,
    use_consistent_padding: bool = False,
    *,
    op: Op | str = standard,
    engine: str = "auto",
    max_block_bytes: int | None = None,
) -> Array:
    """Transposed (fractionally strided) convolution whose product is ``op``.

    Same arguments, defaults and semantics as `jax.lax.conv_transpose`: the input is
    dilated by ``strides`` and convolved with stride 1, with ``'SAME'`` / ``'VALID'`` padding
    strings computed as lax does (``dimension_numbers`` defaults to ``NHWC``/``HWIO``). The
    holes inserted between input cells are treated like padding: for ``pad_value=None`` ops
    they contribute the reduce's identity (skipped taps), so a max-plus transposed
    convolution takes the max over the real input cells under the kernel only.

    Args:
      lhs: input.
      rhs: kernel.
      strides: the stride of the forward convolution (the input dilation).
      padding: ``'SAME'``, ``'VALID'`` or ``(low, high)`` pairs (pairs are the padding of the
        transposed convolution unless ``use_consistent_padding``).
      rhs_dilation: kernel dilation.
      dimension_numbers: as in lax (default ``('NHWC', 'HWIO', 'NHWC')`` for 2-D).
      transpose_kernel: flip the spatial axes and swap the kernel's I/O axes (gradient-style).
      precision: passed to lax for the standard op.
      preferred_element_type: accumulation and output dtype.
      use_consistent_padding: pairs are the forward convolution's padding (PyTorch style).
      op: the product: a `jaxconv.Op` or a built-in op's name.
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      The transposed convolution.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> x = jnp.array([1., 5., 2.]).reshape(1, 3, 1)        # NWC
      >>> w = jnp.zeros((2, 1, 1))                             # WIO
      >>> jaxconv.conv_transpose(x, w, (2,), "VALID", op="max_plus")[0, :, 0]
      Array([1., 1., 5., 5., 2., 2.], dtype=float32)
    """
    lhs = validation.as_array("lhs", lhs)
    rhs = validation.as_array("rhs", rhs)
    if lhs.ndim != rhs.ndim or lhs.ndim < 2:
        raise ValueError(
            f"`lhs` and `rhs` must have the same rank >= 2, got lhs.shape={lhs.shape} and "
            f"rhs.shape={rhs.shape}.")
    if dimension_numbers is None:
        if lhs.ndim not in _DEFAULT_LAYOUTS:
            raise ValueError(
                f"no default `dimension_numbers` for rank {lhs.ndim}; pass them explicitly.")
        dimension_numbers = _DEFAULT_LAYOUTS[lhs.ndim]
    nsd = lhs.ndim - 2
    strides = validation.int_tuple("strides", strides, nsd, default=None)
    rhs_dil = validation.int_tuple("rhs_dilation", rhs_dilation, nsd)
    dn = validation.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    k_sdims = [rhs.shape[d] for d in dn.rhs_spec[2:]]
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"`padding` of conv_transpose must be 'SAME', 'VALID' or (low, high) pairs, got "
                f"{padding!r} (lax.conv_transpose has no {padding!r} either); give the pairs "
                "of the transposed convolution explicitly for other paddings.")
        padding = padding.upper()
    if use_consistent_padding or (isinstance(padding, str) and padding in ("SAME", "VALID")):
        eff = [(k - 1) * r + 1 if k else 0 for k, r in zip(k_sdims, rhs_dil, strict=True)]
        rep = [padding] * nsd if isinstance(padding, str) else [tuple(p) for p in padding]
        if len(rep) != nsd:
            raise ValueError(f"`padding` needs {nsd} (low, high) pairs, got {padding!r}.")
        pads: Any = tuple(transpose_padding(k, s, p) for k, s, p in zip(eff, strides, rep,
                                                                          strict=True))
    else:
        pads = padding
    if transpose_kernel:
        rhs = rhs[tuple(slice(None, None, -1) if a in dn.rhs_spec[2:] else slice(None)
                        for a in range(rhs.ndim))]
        rhs = rhs.swapaxes(dn.rhs_spec[0], dn.rhs_spec[1])
    return conv_general_dilated(
        lhs, rhs, (1,) * nsd, pads, strides, rhs_dil, dn, precision=precision,
        preferred_element_type=preferred_element_type, op=op, engine=engine,
        max_block_bytes=max_block_bytes)


__all__ = ["conv_transpose", "transpose_padding"]
