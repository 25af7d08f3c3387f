"""Flax NNX layers whose product is a `jaxconv.Op`: ``Conv`` and ``Linear``.

Every argument of `flax.nnx.Conv` / `flax.nnx.Linear` keeps its default and
meaning (same parameter names ``kernel`` / ``bias``, same shapes, same initialisation from the
same ``Rngs``), plus the keyword arguments

- ``op``: the product, an `jaxconv.Op` or a built-in name (default ``ops.standard``,
  which gives exactly Flax's layer);
- ``input_quantizer`` / ``kernel_quantizer``: ``None``, a name from
  `jaxconv.quantizers` (``"ste_sign"``) or any callable ``q(x) -> x_q`` applied in the
  forward pass (the stored latent weights stay real-valued);
- ``engine`` and ``max_block_bytes``: passed to `jaxconv.conv_general_dilated` /
  `jaxconv.dot_general`.

Padding and masks are identity-correct for any op: ``'SAME'``, explicit and ``'CAUSAL'``
padding use the op's padding (padded taps skipped, or ``op.pad_value``), ``'CIRCULAR'`` and
``'REFLECT'`` pad with real input values, and ``mask`` marks taps as absent (for the standard
op the kernel is multiplied by it, as Flax does).

Binary kernels (``kernel_quantizer="ste_sign"`` or the ``xnor`` op): the straight-through
gradient vanishes where ``|w| > 1``, so train the latent weights with a constraint, as larq's
``kernel_constraint``: after each optimiser step call
``jaxconv.optim.clip_latent_weights(params, mask)`` (or chain
``optax.projections.projection_box``). No warning is emitted when you don't.

Flax's own layers accept jaxconv's functions as hooks too:

```python
flax.nnx.Conv(..., conv_general_dilated=functools.partial(
    jaxconv.conv_general_dilated, op="max_plus"))
flax.nnx.Linear(..., dot_general=functools.partial(jaxconv.dot_general, op="max_plus"))
```

but Flax multiplies the kernel by ``mask`` and zero-pads ``'CIRCULAR'``/``'CAUSAL'`` inputs
before calling the hook, which is right for the standard product only; these layers are the
identity-correct way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx as _nnx
from flax.nnx.nn import dtypes as _dtypes
from flax.nnx.nn import initializers as _init

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.ops import standard
from jaxconv._src.layers import common as _m
from jaxconv._src.layers.transpose import MultiOpConv as MultiOpConv
from jaxconv._src.layers.transpose import NnxConvTranspose as ConvTranspose

Array = jax.Array

default_kernel_init = _init.lecun_normal()
default_bias_init = _init.zeros_init()

__all__ = ("Conv", "ConvTranspose", "Linear", "MultiOpConv")


def _init_product(module: _nnx.Module, op: Op | str, hook_name: str, hook: Any,
                  input_quantizer: Any, kernel_quantizer: Any) -> None:
    """Sets ``op`` and the quantizers (resolved and checked, a hook excluding a custom op).

    Args:
        module: the layer being built.
        op: the ``op=`` argument.
        hook_name: the Flax hook's name, for the message.
        hook: the hook given, ``None`` for none.
        input_quantizer: the input quantizer given.
        kernel_quantizer: the kernel quantizer given.
    """
    module.op = _m.check_op(op)
    _m.check_hook(hook_name, hook, module.op)
    module.input_quantizer = _m.resolve_quantizer("input_quantizer", input_quantizer)
    module.kernel_quantizer = _m.resolve_quantizer("kernel_quantizer", kernel_quantizer)


class Conv(_nnx.Module):
    """Convolution whose product is ``op`` (an NNX module, drop-in for ``flax.nnx.Conv``).

    Inputs are channels-last, ``(*batch_dims, *spatial, features)``; several batch
    dimensions are folded into one and restored, an unbatched input gets one temporarily.

    Examples:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxconv
      >>> layer = jaxconv.nnx.Conv(3, 8, (3, 3), op="max_plus", rngs=nnx.Rngs(0))
      >>> layer.kernel.shape
      (3, 3, 3, 8)
      >>> layer(jnp.ones((2, 6, 6, 3))).shape
      (2, 6, 6, 8)

    Args:
      in_features: number of input features (channels).
      out_features: number of output features.
      kernel_size: shape of the kernel; an int is a 1-D kernel ``(k,)`` (as in Flax).
      strides: int or one int per spatial dimension (default 1).
      padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, ``'CIRCULAR'`` (periodic),
        ``'REFLECT'``, ``'CAUSAL'`` (1-D, left padding), an int, or a sequence of ints or
        ``(low, high)`` pairs. Zero-style padding follows the op's padding semantics;
        ``'CIRCULAR'`` / ``'REFLECT'`` pad with real input values.
      input_dilation: int or one int per spatial dimension (transposed-conv style holes,
        treated like padding).
      kernel_dilation: int or one int per spatial dimension (atrous convolution).
      feature_group_count: number of feature groups (must divide ``in_features``).
      use_bias: whether to add a bias (default True).
      mask: optional array of the kernel's shape; zero entries mark taps as absent (skipped:
        they contribute the reduce's identity; for ``ops.standard`` the kernel is multiplied
        by the mask, as in Flax).
      dtype: computation dtype (default: inferred from inputs and parameters).
      param_dtype: dtype of the parameters (default float32).
      precision: lax precision for the standard op and native rewrites.
      kernel_init: initializer of the kernel (default lecun_normal, as Flax).
      bias_init: initializer of the bias (default zeros).
      conv_general_dilated: optional hook with lax's signature called instead of jaxconv
        (Flax's argument; ``None`` uses `jaxconv.conv_general_dilated` with ``op``).
        Excludes a non-standard ``op``.
      promote_dtype: ``promote_dtype((inputs, kernel, bias), dtype=...)`` as in Flax.
      preferred_element_type: accumulation / output dtype of the product.
      rngs: the ``nnx.Rngs`` (``params`` stream) for initialisation.
      kernel_metadata: metadata of the kernel ``nnx.Param``.
      bias_metadata: metadata of the bias ``nnx.Param``.
      op: the product, an `jaxconv.Op` or a built-in op's name (default standard).
      input_quantizer: ``None``, a quantizer name or a callable applied to the inputs.
      kernel_quantizer: ``None``, a quantizer name or a callable applied to the kernel in
        the forward pass (clip binary latent weights with
        `jaxconv.optim.clip_latent_weights`).
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of intermediate blocks (default 64 MiB).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: None | int | Sequence[int] = 1,
        *,
        padding: Any = "SAME",
        input_dilation: None | int | Sequence[int] = 1,
        kernel_dilation: None | int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: Array | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable[..., Array] = default_kernel_init,
        bias_init: Callable[..., Array] = default_bias_init,
        conv_general_dilated: Callable[..., Array] | None = None,
        promote_dtype: Callable[..., Any] = _dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: _nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        op: Op | str = standard,
        input_quantizer: Callable[[Array], Array] | str | None = None,
        kernel_quantizer: Callable[[Array], Array] | str | None = None,
        engine: str = "auto",
        max_block_bytes: int | None = None,
    ):
        kernel_size = _m.kernel_size_tuple(kernel_size)
        _m.check_groups(feature_group_count, in_features)
        _init_product(self, op, "conv_general_dilated", conv_general_dilated, input_quantizer,
                      kernel_quantizer)
        kernel_shape = kernel_size + (in_features // feature_group_count, out_features)
        _m.check_mask(mask, kernel_shape)
        self.kernel_shape = kernel_shape
        self.kernel, self.bias = _m.nnx_params(
            rngs, kernel_shape, out_features, use_bias=use_bias, param_dtype=param_dtype,
            kernel_init=kernel_init, bias_init=bias_init, kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.input_dilation = input_dilation
        self.kernel_dilation = kernel_dilation
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.conv_general_dilated = conv_general_dilated
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.engine = engine
        self.max_block_bytes = max_block_bytes

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Applies the convolution.

        Args:
          inputs: ``(*batch_dims, *spatial, in_features)`` (channels last).
          out_sharding: optional output sharding (as ``flax.nnx.Conv``).

        Returns:
          The convolved data, ``(*batch_dims, *out_spatial, out_features)``.
        """
        _m.check_in_features(self, inputs, len(self.kernel_size))
        return _m.conv_apply(
            inputs, self.kernel[...], _m.nnx_value(self.bias),
            kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count, mask=self.mask,
            precision=self.precision, promote=_m.nnx_promoter(self.promote_dtype, self.dtype),
            preferred_element_type=self.preferred_element_type, out_sharding=out_sharding,
            op=self.op, input_quantizer=self.input_quantizer,
            kernel_quantizer=self.kernel_quantizer, engine=self.engine,
            max_block_bytes=self.max_block_bytes, hook=self.conv_general_dilated)


class Linear(_nnx.Module):
    """Dense layer whose product is ``op`` (an NNX module, drop-in for ``flax.nnx.Linear``).

    ``y = REDUCE_i op.combine(x[..., i], kernel[i, :]) + bias`` over the last input axis.

    Examples:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxconv
      >>> layer = jaxconv.nnx.Linear(4, 2, op="adder", rngs=nnx.Rngs(0))
      >>> layer.kernel.shape, layer(jnp.ones((5, 4))).shape
      ((4, 2), (5, 2))

    Args:
      in_features: number of input features.
      out_features: number of output features.
      use_bias: whether to add a bias (default True).
      dtype: computation dtype (default: inferred from inputs and parameters).
      param_dtype: dtype of the parameters (default float32).
      precision: lax precision for the standard op and native rewrites.
      kernel_init: initializer of the ``(in_features, out_features)`` kernel.
      bias_init: initializer of the bias.
      dot_general: optional hook with lax's signature called instead of jaxconv (Flax's
        argument; ``None`` uses `jaxconv.dot_general` with ``op``).
      promote_dtype: ``promote_dtype((inputs, kernel, bias), dtype=...)`` as in Flax.
      preferred_element_type: accumulation / output dtype of the product.
      rngs: the ``nnx.Rngs`` for initialisation.
      kernel_metadata: metadata of the kernel ``nnx.Param``.
      bias_metadata: metadata of the bias ``nnx.Param``.
      op: the product, an `jaxconv.Op` or a built-in op's name (default standard).
      input_quantizer: ``None``, a quantizer name or a callable applied to the inputs.
      kernel_quantizer: ``None``, a quantizer name or a callable applied to the kernel.
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of intermediate blocks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable[..., Array] = default_kernel_init,
        bias_init: Callable[..., Array] = default_bias_init,
        dot_general: Callable[..., Array] | None = None,
        promote_dtype: Callable[..., Any] = _dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: _nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        op: Op | str = standard,
        input_quantizer: Callable[[Array], Array] | str | None = None,
        kernel_quantizer: Callable[[Array], Array] | str | None = None,
        engine: str = "auto",
        max_block_bytes: int | None = None,
    ):
        _init_product(self, op, "dot_general", dot_general, input_quantizer, kernel_quantizer)
        self.kernel, self.bias = _m.nnx_params(
            rngs, (in_features, out_features), out_features, use_bias=use_bias,
            param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
            kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.engine = engine
        self.max_block_bytes = max_block_bytes

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Applies the dense layer over the last axis of ``inputs``.

        Args:
          inputs: ``(..., in_features)``.
          out_sharding: optional output sharding (as ``flax.nnx.Linear``).

        Returns:
          ``(..., out_features)``.
        """
        _m.check_in_features(self, inputs)
        return _m.dense_apply(
            inputs, self.kernel[...], _m.nnx_value(self.bias),
            precision=self.precision, promote=_m.nnx_promoter(self.promote_dtype, self.dtype),
            preferred_element_type=self.preferred_element_type, out_sharding=out_sharding,
            op=self.op, input_quantizer=self.input_quantizer,
            kernel_quantizer=self.kernel_quantizer, engine=self.engine,
            max_block_bytes=self.max_block_bytes, hook=self.dot_general)
