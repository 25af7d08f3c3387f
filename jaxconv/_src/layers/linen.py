"""Flax Linen layers whose product is a `jaxconv.Op`: ``Conv`` and ``Dense``.

Every attribute of `flax.linen.Conv` / `flax.linen.Dense` keeps its default
and meaning (same parameter names ``kernel`` / ``bias``, same shapes, same initialisation
from the same key), plus ``op``, ``input_quantizer``, ``kernel_quantizer``, ``engine``,
``max_block_bytes`` and ``preferred_element_type``. See `jaxconv.nnx` for the padding,
mask and quantizer semantics, which are the same here. Flax's deprecated hooks
(``conv_general_dilated[_cls]``, ``dot_general[_cls]``) are honoured and exclude a
non-standard ``op``.

Binary kernels: clip the latent weights to ``[-1, 1]`` after each step with
`jaxconv.optim.clip_latent_weights` (larq's ``kernel_constraint``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as _nn
from flax.linen import initializers as _init
from flax.linen.dtypes import promote_dtype as _promote_dtype

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.ops import standard
from jaxconv._src.layers import common as _m
from jaxconv._src.layers.transpose import LinenConvTranspose as ConvTranspose

Array = jax.Array

default_kernel_init = _init.lecun_normal()

__all__ = ("Conv", "ConvTranspose", "Dense")


def _checked_op_and_hook(module: _nn.Module, name: str) -> tuple[Op, Any]:
    """The module's op and its Flax hook ``name`` (or ``name_cls()``), which excludes it.

    Args:
        module: the linen layer.
        name: the hook's name, ``"conv_general_dilated"`` or ``"dot_general"``.

    Returns:
        ``(op, hook)``, the hook ``None`` when none is given.
    """
    op = _m.check_op(module.op)
    cls = getattr(module, f"{name}_cls")
    hook = cls() if cls is not None else getattr(module, name)
    _m.check_hook(name, hook, op)
    return op, hook


def _quantizers(module: _nn.Module) -> dict[str, Any]:
    """The module's ``input_quantizer`` and ``kernel_quantizer``, resolved, as keywords."""
    return {name: _m.resolve_quantizer(name, getattr(module, name))
            for name in ("input_quantizer", "kernel_quantizer")}


class Conv(_nn.Module):
    """Convolution whose product is ``op`` (a Linen module, drop-in for ``flax.linen.Conv``).

    Examples:

      >>> import jax, jax.numpy as jnp
      >>> import jaxconv
      >>> layer = jaxconv.linen.Conv(8, (3, 3), op="max_plus")
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 6, 6, 3)))
      >>> variables["params"]["kernel"].shape
      (3, 3, 3, 8)
      >>> layer.apply(variables, jnp.ones((2, 6, 6, 3))).shape
      (2, 6, 6, 8)

    Attributes:
      features: number of output features.
      kernel_size: shape of the kernel; an int is a 1-D kernel ``(k,)`` (as in Flax).
      strides: int or one int per spatial dimension (default 1).
      padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, ``'CIRCULAR'``, ``'REFLECT'``,
        ``'CAUSAL'`` (1-D), an int, or a sequence of ints or ``(low, high)`` pairs.
        Zero-style padding follows the op's padding semantics; ``'CIRCULAR'`` and
        ``'REFLECT'`` pad with real input values.
      input_dilation: int or one int per spatial dimension.
      kernel_dilation: int or one int per spatial dimension.
      feature_group_count: number of feature groups.
      use_bias: whether to add a bias.
      mask: optional array of the kernel's shape; zeros mark absent (skipped) taps.
      dtype: computation dtype (default: inferred).
      param_dtype: dtype of the parameters.
      precision: lax precision for the standard op and native rewrites.
      kernel_init: kernel initializer (default lecun_normal).
      bias_init: bias initializer (default zeros).
      promote_dtype: variadic ``promote_dtype(inputs, kernel, bias, dtype=...)``.
      conv_general_dilated: deprecated Flax hook, called instead of jaxconv if given.
      conv_general_dilated_cls: deprecated Flax hook factory.
      op: the product, an `jaxconv.Op` or a built-in name (default standard).
      input_quantizer: ``None``, a quantizer name or a callable applied to the inputs.
      kernel_quantizer: ``None``, a quantizer name or a callable applied to the kernel.
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of intermediate blocks.
      preferred_element_type: accumulation / output dtype of the product.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: Any = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Array | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = _init.zeros_init()
    promote_dtype: Callable[..., Any] = _promote_dtype
    conv_general_dilated: Callable[..., Array] | None = None
    conv_general_dilated_cls: Any = None
    op: Op | str = standard
    input_quantizer: Callable[[Array], Array] | str | None = None
    kernel_quantizer: Callable[[Array], Array] | str | None = None
    engine: str = "auto"
    max_block_bytes: int | None = None
    preferred_element_type: Any = None

    @_nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the convolution to ``(*batch_dims, *spatial, features)`` inputs.

        Args:
            inputs: the input, channels last.

        Returns:
            The output, with the input's batch dimensions.
        """
        kernel_size = _m.kernel_size_tuple(self.kernel_size)
        op, hook = _checked_op_and_hook(self, "conv_general_dilated")
        in_features = jnp.shape(inputs)[-1]
        groups = self.feature_group_count
        _m.check_groups(groups, in_features, "the input features")
        kernel_shape = kernel_size + (in_features // groups, self.features)
        _m.check_mask(self.mask, kernel_shape)
        kernel, bias = _m.linen_params(self, kernel_shape)
        return _m.conv_apply(
            inputs, kernel, bias, kernel_size=kernel_size, strides=self.strides,
            padding=self.padding, input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation, feature_group_count=groups, mask=self.mask,
            precision=self.precision, promote=_m.linen_promoter(self.promote_dtype, self.dtype),
            preferred_element_type=self.preferred_element_type, out_sharding=None, op=op,
            **_quantizers(self), engine=self.engine, max_block_bytes=self.max_block_bytes,
            hook=hook)


class Dense(_nn.Module):
    """Dense layer whose product is ``op`` (a Linen module, drop-in for ``flax.linen.Dense``).

    Examples:

      >>> import jax, jax.numpy as jnp
      >>> import jaxconv
      >>> layer = jaxconv.linen.Dense(2, op="adder")
      >>> variables = layer.init(jax.random.key(0), jnp.ones((5, 4)))
      >>> layer.apply(variables, jnp.ones((5, 4))).shape
      (5, 2)

    Attributes:
      features: number of output features.
      use_bias: whether to add a bias.
      dtype: computation dtype (default: inferred).
      param_dtype: dtype of the parameters.
      precision: lax precision for the standard op and native rewrites.
      kernel_init: kernel initializer (default lecun_normal).
      bias_init: bias initializer (default zeros).
      promote_dtype: variadic ``promote_dtype(inputs, kernel, bias, dtype=...)``.
      dot_general: Flax hook, called instead of jaxconv if given.
      dot_general_cls: Flax hook factory.
      op: the product, an `jaxconv.Op` or a built-in name (default standard).
      input_quantizer: ``None``, a quantizer name or a callable applied to the inputs.
      kernel_quantizer: ``None``, a quantizer name or a callable applied to the kernel.
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of intermediate blocks.
      preferred_element_type: accumulation / output dtype of the product.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = _init.zeros_init()
    promote_dtype: Callable[..., Any] = _promote_dtype
    dot_general: Callable[..., Array] | None = None
    dot_general_cls: Any = None
    op: Op | str = standard
    input_quantizer: Callable[[Array], Array] | str | None = None
    kernel_quantizer: Callable[[Array], Array] | str | None = None
    engine: str = "auto"
    max_block_bytes: int | None = None
    preferred_element_type: Any = None

    @_nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the dense layer over the last axis of ``inputs``.

        Args:
            inputs: the input; the last axis is contracted.

        Returns:
            The output.
        """
        op, hook = _checked_op_and_hook(self, "dot_general")
        kernel, bias = _m.linen_params(self, (jnp.shape(inputs)[-1], self.features))
        return _m.dense_apply(
            inputs, kernel, bias, precision=self.precision,
            promote=_m.linen_promoter(self.promote_dtype, self.dtype),
            preferred_element_type=self.preferred_element_type, out_sharding=None, op=op,
            **_quantizers(self), engine=self.engine, max_block_bytes=self.max_block_bytes,
            hook=hook)
