"""Flax layers beyond ``Conv``: ``ConvTranspose`` (nnx and linen) and nnx ``MultiOpConv``.

``ConvTranspose`` mirrors `flax.nnx.ConvTranspose` / `flax.linen.ConvTranspose`
(same arguments, defaults, parameter names, shapes and initialisation) plus ``op``,
``engine`` and ``max_block_bytes``; with ``op=ops.standard`` it equals Flax's layer given
the same parameters. The holes between input cells, the padding and masked taps are the
op's identity (skipped), and ``'CIRCULAR'`` padding wraps the output with the op's reduce
(Flax sums), so a max-plus transposed layer stays a max-plus layer.

``MultiOpConv`` is ``jaxconv.nnx.Conv`` with its output channels split among several ops
(`jaxconv.conv_multi`), e.g. half dilation (max-plus) and half erosion (min-plus)
channels, as morphological networks use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as _nn
from flax import nnx as _nnx
from flax.linen.dtypes import promote_dtype as _linen_promote_dtype
from flax.nnx.nn import dtypes as _dtypes
from flax.nnx.nn import initializers as _init

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.ops import standard
from jaxconv._src.layers import common as _m
from jaxconv._src.mixed import conv_multi
from jaxconv._src.transpose import conv_transpose

Array = jax.Array

default_kernel_init = _init.lecun_normal()
default_bias_init = _init.zeros_init()


def _circular_wrap(y: Array, x_spatial: Sequence[int], strides: Sequence[int],
                   transpose_kernel: bool, op: Op) -> Array:
    """Flax's periodic wrap of a transposed convolution, with ``op``'s identity and reduce.

    Args:
        y: the transposed convolution's output with VALID padding.
        x_spatial: the input's spatial sizes.
        strides: the strides.
        transpose_kernel: whether the kernel is flipped and its features swapped.
        op: the op (its identity and reduce fold the wrapped cells).

    Returns:
        The output of CIRCULAR padding.
    """
    periods = [d * s for d, s in zip(x_spatial, strides, strict=True)]
    diffs = [-(yd - p) % (2 * p) for yd, p in zip(y.shape[1:-1], periods, strict=True)]
    if transpose_kernel:
        pads = [(d // 2, (d + 1) // 2) for d in diffs]
    else:
        pads = [((d + 1) // 2, d // 2) for d in diffs]
    ident = algebra.identity_value(op, y.dtype)
    y = jnp.pad(y, [(0, 0), *pads, (0, 0)], constant_values=ident)
    for i in range(1, y.ndim - 1):
        y = y.reshape(y.shape[:i] + (-1, periods[i - 1]) + y.shape[i + 1:])
        y = jnp.moveaxis(y, i, -1)
        y = algebra.reduce_last(op, y, y.dtype)
    return y


def _transpose_apply(
    inputs: Array, kernel: Array, bias: Array | None, *, kernel_size: tuple[int, ...],
    strides: Any, padding: Any, kernel_dilation: Any, mask: Any, precision: Any,
    transpose_kernel: bool, promote: Callable[..., tuple[Any, Any, Any]],
    preferred_element_type: Any, op: Op, engine: str, max_block_bytes: int | None,
) -> Array:
    """The forward pass shared by the nnx and linen ``ConvTranspose``.

    Args:
        inputs: the input, channels last, with any number of batch dimensions.
        kernel: the kernel.
        bias: the bias, ``None`` for none.
        kernel_size: the window's size.
        strides: the strides.
        padding: Flax's transposed padding (a string, pairs or ``"CIRCULAR"``).
        kernel_dilation: the kernel dilation.
        mask: the kernel mask, ``None`` for none.
        precision: lax's precision.
        transpose_kernel: whether the kernel is flipped and its features swapped.
        promote: the dtype promotion.
        preferred_element_type: the output's dtype, ``None`` for the default.
        op: the product.
        engine: the engine asked for.
        max_block_bytes: the memory bound of one block, ``None`` for the default.

    Returns:
        The output, with the input's batch dimensions.

    Raises:
        ValueError: CIRCULAR padding with an op that has a ``post`` map.
    """
    nsd = len(kernel_size)
    x, batch_shape = _m.flatten_batch(inputs, nsd)
    strides_t = _m.broadcast_ints("strides", strides, nsd)
    k_dil = _m.broadcast_ints("kernel_dilation", kernel_dilation, nsd)
    _m.check_mask(mask, kernel.shape)
    pad = _m.canonicalize_padding(padding, nsd, _m.TRANSPOSE_PADDINGS)
    circular = pad == "CIRCULAR"
    if circular:
        if op.post is not None:
            raise ValueError(
                f"'CIRCULAR' padding wraps the reduced output, which op {op.display_name!r} maps "
                "through its `post` function; use another padding.")
        pad = "VALID"
    x, kernel, bias = promote(x, kernel, bias)
    kernel, conv_op = _m.mask_kernel(kernel, mask, op, multiply=op.lax_product)
    y = conv_transpose(x, kernel, strides_t, pad, rhs_dilation=k_dil,
                       transpose_kernel=transpose_kernel, precision=precision,
                       preferred_element_type=preferred_element_type, op=conv_op,
                       engine=engine, max_block_bytes=max_block_bytes)
    if circular:
        y = _circular_wrap(y, x.shape[1:-1], strides_t, transpose_kernel, op)
    return _m.unflatten_batch(_m.add_bias(y, bias), batch_shape)


class NnxConvTranspose(_nnx.Module):
    """Transposed convolution whose product is ``op`` (drop-in for ``flax.nnx.ConvTranspose``).

    Exported as ``jaxconv.nnx.ConvTranspose``.

    Examples:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxconv
      >>> layer = jaxconv.nnx.ConvTranspose(3, 4, (3, 3), strides=2, op="max_plus",
      ...                                   rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((1, 5, 5, 3))).shape
      (1, 10, 10, 4)

    Args:
      in_features: number of input features.
      out_features: number of output features.
      kernel_size: the kernel's spatial shape (an int is a 1-D kernel).
      strides: the fractional stride (int or one per spatial dimension; default 1).
      padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, an int or per-dimension pairs, as
        `flax.nnx.ConvTranspose`.
      kernel_dilation: kernel dilation (int or one per spatial dimension).
      use_bias: whether to add a bias.
      mask: optional array of the kernel's shape; zeros mark absent taps (skipped).
      dtype: computation dtype.
      param_dtype: parameter dtype.
      precision: lax precision.
      kernel_init: kernel initializer (lecun_normal).
      bias_init: bias initializer (zeros).
      transpose_kernel: flip the kernel's spatial axes and swap its I/O axes (kernel shape
        ``kernel_size + (out_features, in_features)``).
      promote_dtype: ``promote_dtype((inputs, kernel, bias), dtype=...)``.
      preferred_element_type: accumulation / output dtype.
      rngs: the ``nnx.Rngs``.
      kernel_metadata: metadata of the kernel ``nnx.Param``.
      bias_metadata: metadata of the bias ``nnx.Param``.
      op: the product (an `jaxconv.Op` or a built-in name).
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of intermediate blocks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        *,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] | None = None,
        use_bias: bool = True,
        mask: Array | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable[..., Array] = default_kernel_init,
        bias_init: Callable[..., Array] = default_bias_init,
        transpose_kernel: bool = False,
        promote_dtype: Callable[..., Any] = _dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: _nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        op: Op | str = standard,
        engine: str = "auto",
        max_block_bytes: int | None = None,
    ):
        self.kernel_size = _m.kernel_size_tuple(kernel_size)
        self.op = _m.check_op(op)
        self.in_features = in_features
        self.out_features = out_features
        self.strides = strides
        self.padding = padding
        self.kernel_dilation = kernel_dilation
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.transpose_kernel = transpose_kernel
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.engine = engine
        self.max_block_bytes = max_block_bytes
        io = (out_features, in_features) if transpose_kernel else (in_features, out_features)
        self.kernel_shape = self.kernel_size + io
        _m.check_mask(mask, self.kernel_shape)
        self.kernel, self.bias = _m.nnx_params(
            rngs, self.kernel_shape, out_features, use_bias=use_bias, param_dtype=param_dtype,
            kernel_init=kernel_init, bias_init=bias_init, kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata)

    def __call__(self, inputs: Array) -> Array:
        """Applies the transposed convolution to ``(*batch_dims, *spatial, features)``.

        Args:
          inputs: channels-last input.

        Returns:
          The output, ``(*batch_dims, *out_spatial, out_features)``.
        """
        _m.check_in_features(self, inputs, len(self.kernel_size))
        return _transpose_apply(
            inputs, self.kernel[...], _m.nnx_value(self.bias),
            kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            kernel_dilation=self.kernel_dilation, mask=self.mask, precision=self.precision,
            transpose_kernel=self.transpose_kernel,
            promote=_m.nnx_promoter(self.promote_dtype, self.dtype),
            preferred_element_type=self.preferred_element_type, op=self.op,
            engine=self.engine, max_block_bytes=self.max_block_bytes)


class LinenConvTranspose(_nn.Module):
    """Transposed convolution whose product is ``op`` (drop-in for ``flax.linen.ConvTranspose``).

    Exported as ``jaxconv.linen.ConvTranspose``.

    Examples:

      >>> import jax, jax.numpy as jnp
      >>> import jaxconv
      >>> layer = jaxconv.linen.ConvTranspose(4, (3,), strides=(2,), op="log")
      >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 5, 3)))
      >>> layer.apply(variables, jnp.ones((1, 5, 3))).shape
      (1, 10, 4)

    Attributes:
      features: number of output features.
      kernel_size: the kernel's spatial shape (an int is a 1-D kernel).
      strides: the fractional stride (default 1).
      padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, an int or pairs.
      kernel_dilation: kernel dilation.
      use_bias: whether to add a bias.
      mask: optional array of the kernel's shape; zeros mark absent taps (skipped).
      dtype: computation dtype.
      param_dtype: parameter dtype.
      precision: lax precision.
      kernel_init: kernel initializer.
      bias_init: bias initializer.
      transpose_kernel: flip spatial axes and swap the kernel's I/O axes.
      promote_dtype: linen's variadic ``promote_dtype``.
      preferred_element_type: accumulation / output dtype.
      op: the product.
      engine: the engine.
      max_block_bytes: bound on the bytes of intermediate blocks.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: Sequence[int] | int | None = None
    padding: Any = "SAME"
    kernel_dilation: Sequence[int] | int | None = None
    use_bias: bool = True
    mask: Array | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = _nn.initializers.zeros_init()
    transpose_kernel: bool = False
    promote_dtype: Callable[..., Any] = _linen_promote_dtype
    preferred_element_type: Any = None
    op: Op | str = standard
    engine: str = "auto"
    max_block_bytes: int | None = None

    @_nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the transposed convolution to ``(*batch_dims, *spatial, features)``.

        Args:
            inputs: the input, channels last.

        Returns:
            The output, with the input's batch dimensions.
        """
        kernel_size = _m.kernel_size_tuple(self.kernel_size)
        op = _m.check_op(self.op)
        in_features = jnp.shape(inputs)[-1]
        io = (self.features, in_features) if self.transpose_kernel else (
            in_features, self.features)
        kernel_shape = kernel_size + io
        _m.check_mask(self.mask, kernel_shape)
        kernel, bias = _m.linen_params(self, kernel_shape)
        return _transpose_apply(
            inputs, kernel, bias, kernel_size=kernel_size, strides=self.strides,
            padding=self.padding, kernel_dilation=self.kernel_dilation, mask=self.mask,
            precision=self.precision, transpose_kernel=self.transpose_kernel,
            promote=_m.linen_promoter(self.promote_dtype, self.dtype),
            preferred_element_type=self.preferred_element_type, op=op, engine=self.engine,
            max_block_bytes=self.max_block_bytes)


class MultiOpConv(_nnx.Module):
    """A convolution whose output channels are split among several ops (nnx).

    Exported as ``jaxconv.nnx.MultiOpConv``. Arguments are those of ``jaxconv.nnx.Conv``
    (without ``mask`` and hooks) plus ``ops`` and ``split``; the output channels
    ``[0, split[0])`` use ``ops[0]`` and so on (`jaxconv.conv_multi`).

    Examples:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxconv
      >>> layer = jaxconv.nnx.MultiOpConv(3, 8, (3, 3), ops=("max_plus", "min_plus"),
      ...                                 rngs=nnx.Rngs(0))
      >>> layer.split, layer(jnp.ones((2, 6, 6, 3))).shape
      ((4, 4), (2, 6, 6, 8))

    Args:
      in_features: number of input features.
      out_features: number of output features (``sum(split)``).
      kernel_size: the kernel's spatial shape (an int is a 1-D kernel).
      strides: int or one per spatial dimension.
      ops: one op (or built-in name) per slice.
      split: output channels per slice (default: equal slices).
      padding: as ``jaxconv.nnx.Conv``.
      input_dilation: input dilation.
      kernel_dilation: kernel dilation.
      feature_group_count: feature groups.
      use_bias: whether to add a bias.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      precision: lax precision.
      kernel_init: kernel initializer (lecun_normal, as Flax).
      bias_init: bias initializer.
      promote_dtype: ``promote_dtype((inputs, kernel, bias), dtype=...)``.
      preferred_element_type: accumulation / output dtype.
      rngs: the ``nnx.Rngs``.
      engine: the engine.
      max_block_bytes: bound on the bytes of intermediate blocks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None = 1,
        *,
        ops: Sequence[Op | str],
        split: Sequence[int] | None = None,
        padding: Any = "SAME",
        input_dilation: int | Sequence[int] | None = 1,
        kernel_dilation: int | Sequence[int] | None = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable[..., Array] = default_kernel_init,
        bias_init: Callable[..., Array] = default_bias_init,
        promote_dtype: Callable[..., Any] = _dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: _nnx.Rngs,
        engine: str = "auto",
        max_block_bytes: int | None = None,
    ):
        ops_t = tuple(_m.check_op(o) for o in ops)
        if not ops_t:
            raise ValueError("`ops` needs at least one op.")
        if split is None:
            if out_features % len(ops_t):
                raise ValueError(
                    f"`out_features` (={out_features}) is not divisible by the number of ops "
                    f"({len(ops_t)}); pass `split`.")
            split = (out_features // len(ops_t),) * len(ops_t)
        split_t = tuple(int(s) for s in split)
        if len(split_t) != len(ops_t) or sum(split_t) != out_features:
            raise ValueError(
                f"`split` {split_t} needs one entry per op ({len(ops_t)}) adding up to "
                f"`out_features` (={out_features}).")
        _m.check_groups(feature_group_count, in_features)
        self.ops, self.split = ops_t, split_t
        self.kernel_size = _m.kernel_size_tuple(kernel_size)
        self.kernel_shape = self.kernel_size + (in_features // feature_group_count,
                                                out_features)
        self.kernel, self.bias = _m.nnx_params(
            rngs, self.kernel_shape, out_features, use_bias=use_bias, param_dtype=param_dtype,
            kernel_init=kernel_init, bias_init=bias_init)
        self.in_features, self.out_features = in_features, out_features
        self.strides, self.padding = strides, padding
        self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
        self.feature_group_count = feature_group_count
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.engine, self.max_block_bytes = engine, max_block_bytes

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Applies the layer to ``(*batch_dims, *spatial, in_features)`` inputs.

        Args:
          inputs: channels-last input.
          out_sharding: optional output sharding.

        Returns:
          ``(*batch_dims, *out_spatial, out_features)``, slices in ``ops`` order.
        """
        hook = functools.partial(conv_multi, ops=self.ops, split=self.split,
                                 engine=self.engine, max_block_bytes=self.max_block_bytes)
        _m.check_in_features(self, inputs, len(self.kernel_size))
        return _m.conv_apply(
            inputs, self.kernel[...], _m.nnx_value(self.bias),
            kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count, mask=None,
            precision=self.precision, promote=_m.nnx_promoter(self.promote_dtype, self.dtype),
            preferred_element_type=self.preferred_element_type, out_sharding=out_sharding,
            op=standard, input_quantizer=None, kernel_quantizer=None, engine=self.engine,
            max_block_bytes=self.max_block_bytes, hook=hook)


__all__ = ["LinenConvTranspose", "MultiOpConv", "NnxConvTranspose"]
