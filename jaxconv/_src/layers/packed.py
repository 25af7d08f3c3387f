"""Bit-packed XNOR inference: binary weights and activations stored 32 to a ``uint32``.

A binary network trained with ``op="xnor"`` (or with sign quantizers on both sides of the
standard product) keeps real-valued latent weights. For inference only their signs matter,
so they can be packed 32 channels to a word and the product computed as
``K - 2 * popcount(x XOR w)``; the results equal ``ops.xnor`` exactly (borders included).

Functions:

- `pack_signs` / `unpack_signs`: ``+-1`` values <-> ``uint32`` words along an axis
  (``sign(0) = +1``; feature groups packed separately);
- `pack_kernel`: a ``(*window, I, O)`` or ``(I, O)`` kernel -> ``(*window, ceil(I/32), O)``;
- `packed_conv` / `packed_dense`: the XNOR-popcount products (channels last);
  inputs may be float (packed on the fly) or already packed.

Flax: `PackedConv` / `PackedLinear` are NNX modules built from a trained
``jaxconv.nnx.Conv`` / ``jaxconv.nnx.Linear`` (``PackedConv.from_conv(layer)``), and
`pack_model` replaces every binary layer of a model by its packed twin.

Performance: XLA has no bit-GEMM on CPU; the popcount loop is vectorised but is not faster
than the float XNOR rewrite (a native float convolution of the signs). The sure gain is
memory: weights and activations 32x smaller. On GPU ``engine="pallas"`` runs the Pallas
semiring-matmul kernel with a ``popcount(x XOR w)`` product (not measured here).

Example:
  >>> import jax.numpy as jnp
  >>> import jaxconv
  >>> from jaxconv import packed
  >>> x = jnp.array([[0.5, -1.0, 2.0]]); w = jnp.array([[1.0], [1.0], [-3.0]])
  >>> packed.packed_dense(x, packed.pack_kernel(w))
  Array([[-1.]], dtype=float32)
  >>> jaxconv.dot_general(x, w, (((1,), (0,)), ((), ())), op="xnor")
  Array([[-1.]], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx as _nnx

from jaxconv._src import quantizers as _q
from jaxconv._src.layers import common as _m
from jaxconv._src.layers import nnx as _jnnx
from jaxconv._src.packed import (
    pack_kernel,
    pack_signs,
    packed_conv,
    packed_dense,
    packed_size,
    unpack_signs,
)

Array = jax.Array

__all__ = (
    "PackedConv",
    "PackedKernel",
    "PackedLinear",
    "pack_kernel",
    "pack_model",
    "pack_signs",
    "packed_conv",
    "packed_dense",
    "packed_size",
    "unpack_signs",
)

# Quantizers whose forward pass is larq's sign (sign(0) = +1): packing keeps them exactly.
_SIGN_QUANTIZERS = (_q.ste_sign, _q.approx_sign, _q.swish_sign)


class PackedKernel(_nnx.Variable):
    """An inference-only ``uint32`` kernel of packed signs (not a trainable ``Param``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import packed
      >>> packed.PackedKernel(jnp.zeros((1, 8), jnp.uint32)).shape
      (1, 8)
    """


def _is_sign(q: Any) -> bool:
    """Whether ``q`` (or the function a ``functools.partial`` wraps) is a sign quantizer."""
    base = q.func if isinstance(q, functools.partial) else q
    return base in _SIGN_QUANTIZERS


def _binary_pad_value(layer: Any) -> float | None:
    """The xnor padding of a jaxconv layer, or a ``ValueError`` if it is not binary.

    Args:
        layer: an nnx jaxconv ``Conv`` or ``Linear``.

    Returns:
        The xnor op's pad value (``None``: padded taps contribute 0).

    Raises:
        ValueError: the layer is not binary.
    """
    op = layer.op
    qi, qk = layer.input_quantizer, layer.kernel_quantizer
    quant_ok = all(q is None or _is_sign(q) for q in (qi, qk))
    if op.binary and op.reduce == "sum" and op.post is None and quant_ok:
        return op.pad_value
    if op.lax_product and qi is not None and qk is not None and quant_ok:
        return None  # sign(x) * sign(w) with zero padding: padded taps contribute 0
    raise ValueError(
        f"{type(layer).__name__} is not a binary XNOR layer: op {op.display_name!r}, "
        f"input_quantizer={qi!r}, kernel_quantizer={qk!r}. Packing needs op='xnor' (sign "
        "quantizers allowed) or the standard op with sign quantizers on inputs and kernel.")


def _init_packed(layer: _nnx.Module, kernel: Array, bias: Array | None, in_features: int,
                 dtype: Any, engine: str) -> None:
    """The attributes ``PackedConv`` and ``PackedLinear`` share (``kernel`` checked packed).

    Args:
        layer: the packed layer being built.
        kernel: the packed kernel, ``uint32``.
        bias: the bias, ``None`` for none.
        in_features: the real number of input features.
        dtype: the output dtype, ``None`` for float32.
        engine: the engine asked for.

    Raises:
        TypeError: the kernel is not ``uint32``.
    """
    kernel = jnp.asarray(kernel)
    if kernel.dtype != jnp.uint32:
        raise TypeError(
            f"{type(layer).__name__}: `kernel` must be packed uint32, got {kernel.dtype}.")
    layer.kernel = PackedKernel(kernel)
    layer.bias = _nnx.data(None) if bias is None else _nnx.Variable(jnp.asarray(bias))
    layer.in_features = int(in_features)
    layer.dtype = dtype
    layer.engine = engine


def _add_bias(layer: _nnx.Module, y: Array) -> Array:
    """``y`` plus the layer's bias (if any) in ``y``'s dtype."""
    return _m.add_bias(y, None if layer.bias is None else layer.bias[...].astype(y.dtype))


class PackedConv(_nnx.Module):
    """Inference-only XNOR convolution on packed bits (channels last, Flax's input handling).

    Build it from a trained layer with `from_conv`; it gives the same outputs as the
    layer (exactly, the values being sums of ``+-1``) with a 32x smaller kernel.

    Args:
      kernel: packed ``uint32`` kernel ``(*window, ceil(I / 32), O)``.
      bias: optional ``(O,)`` bias (kept as it is).
      in_features: real input channels (all groups).
      kernel_size: the kernel's window.
      strides: as ``jaxconv.nnx.Conv`` (an int or one per spatial axis).
      padding: as ``jaxconv.nnx.Conv`` (Flax's forms, ``'CIRCULAR'`` and ``'REFLECT'``
        included).
      input_dilation: as ``jaxconv.nnx.Conv``.
      kernel_dilation: as ``jaxconv.nnx.Conv``.
      feature_group_count: as ``jaxconv.nnx.Conv``.
      pad_value: ``None`` (padded taps contribute 0) or larq's ``pad_values`` (``+-1``).
      dtype: output dtype (default float32).
      engine: ``"xla"`` or ``"pallas"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxconv
      >>> from jaxconv import packed
      >>> conv = jaxconv.nnx.Conv(3, 4, (3, 3), op="xnor", rngs=nnx.Rngs(0))
      >>> x = jnp.linspace(-1.0, 1.0, 2 * 5 * 5 * 3).reshape(2, 5, 5, 3)
      >>> bool((packed.PackedConv.from_conv(conv)(x) == conv(x)).all())
      True
    """

    def __init__(
        self,
        kernel: Array,
        bias: Array | None,
        *,
        in_features: int,
        kernel_size: tuple[int, ...],
        strides: Any = 1,
        padding: Any = "SAME",
        input_dilation: Any = 1,
        kernel_dilation: Any = 1,
        feature_group_count: int = 1,
        pad_value: float | None = None,
        dtype: Any = None,
        engine: str = "xla",
    ):
        _init_packed(self, kernel, bias, in_features, dtype, engine)
        self.kernel_size = tuple(kernel_size)
        self.strides = strides
        self.padding = padding
        self.input_dilation = input_dilation
        self.kernel_dilation = kernel_dilation
        self.feature_group_count = int(feature_group_count)
        self.pad_value = pad_value

    @classmethod
    def from_conv(cls, conv: _jnnx.Conv, *, engine: str = "xla") -> PackedConv:
        """Packs a trained binary ``jaxconv.nnx.Conv`` (``op="xnor"`` or sign quantizers).

        Args:
          conv: the layer (no ``mask``, no hook).
          engine: ``"xla"`` or ``"pallas"`` for the packed product.

        Returns:
          The packed layer.

        Raises:
          ValueError: the layer is not binary, or has a mask or a hook.

        Example:
          >>> from flax import nnx
          >>> import jaxconv
          >>> from jaxconv import packed
          >>> conv = jaxconv.nnx.Conv(40, 8, (3, 3), op="xnor", rngs=nnx.Rngs(0))
          >>> packed.PackedConv.from_conv(conv).kernel.shape
          (3, 3, 2, 8)
        """
        pad_value = _binary_pad_value(conv)
        if conv.mask is not None or conv.conv_general_dilated is not None:
            raise ValueError("PackedConv.from_conv: layers with a `mask` or a hook can't be "
                             "packed.")
        return cls(
            pack_kernel(conv.kernel[...]), _m.nnx_value(conv.bias), in_features=conv.in_features,
            kernel_size=conv.kernel_size, strides=conv.strides, padding=conv.padding,
            input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation,
            feature_group_count=conv.feature_group_count, pad_value=pad_value,
            dtype=conv.dtype, engine=engine)

    def __call__(self, inputs: Array) -> Array:
        """Applies the layer to float inputs ``(*batch, *spatial, C)``.

        Args:
          inputs: channels-last float inputs (their signs are packed here).

        Returns:
          ``(*batch, *out_spatial, O)``.
        """
        nsd = len(self.kernel_size)
        x, batch_shape = _m.flatten_batch(inputs, nsd)
        strides = _m.broadcast_ints("strides", self.strides, nsd)
        in_dil = _m.broadcast_ints("input_dilation", self.input_dilation, nsd)
        k_dil = _m.broadcast_ints("kernel_dilation", self.kernel_dilation, nsd)
        x, pad = _m.resolve_padding(x, self.padding, self.kernel_size, k_dil, in_dil)
        y = packed_conv(
            x, self.kernel[...], strides, pad, in_dil, k_dil, self.feature_group_count,
            pad_value=self.pad_value, out_dtype=self.dtype or jnp.float32, engine=self.engine)
        return _m.unflatten_batch(_add_bias(self, y), batch_shape)


class PackedLinear(_nnx.Module):
    """Inference-only XNOR dense layer on packed bits; see `from_linear`.

    Args:
      kernel: packed ``uint32`` kernel ``(ceil(K / 32), O)``.
      bias: optional ``(O,)`` bias.
      in_features: ``K``.
      dtype: output dtype (default float32).
      engine: ``"xla"`` or ``"pallas"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxconv
      >>> from jaxconv import packed
      >>> linear = jaxconv.nnx.Linear(40, 3, op="xnor", rngs=nnx.Rngs(0))
      >>> x = jnp.linspace(-1.0, 1.0, 2 * 40).reshape(2, 40)
      >>> bool((packed.PackedLinear.from_linear(linear)(x) == linear(x)).all())
      True
    """

    def __init__(
        self, kernel: Array, bias: Array | None, *, in_features: int, dtype: Any = None,
        engine: str = "xla",
    ):
        _init_packed(self, kernel, bias, in_features, dtype, engine)

    @classmethod
    def from_linear(cls, linear: _jnnx.Linear, *, engine: str = "xla") -> PackedLinear:
        """Packs a trained binary ``jaxconv.nnx.Linear``.

        Args:
          linear: the layer (``op="xnor"`` or sign quantizers, no hook).
          engine: ``"xla"`` or ``"pallas"``.

        Returns:
          The packed layer.

        Raises:
          ValueError: the layer is not binary, or has a hook.

        Example:
          >>> from flax import nnx
          >>> import jaxconv
          >>> from jaxconv import packed
          >>> linear = jaxconv.nnx.Linear(40, 3, op="xnor", rngs=nnx.Rngs(0))
          >>> packed.PackedLinear.from_linear(linear).kernel.shape
          (2, 3)
        """
        _binary_pad_value(linear)
        if linear.dot_general is not None:
            raise ValueError("PackedLinear.from_linear: a layer with a hook can't be packed.")
        return cls(pack_kernel(linear.kernel[...]), _m.nnx_value(linear.bias),
                   in_features=linear.in_features, dtype=linear.dtype, engine=engine)

    def __call__(self, inputs: Array) -> Array:
        """Applies the layer over the last axis of float or packed ``inputs``.

        Args:
            inputs: float inputs (packed here) or packed ``uint32`` words.

        Returns:
            The layer's output.
        """
        y = packed_dense(inputs, self.kernel[...], in_features=self.in_features,
                         out_dtype=self.dtype or jnp.float32, engine=self.engine)
        return _add_bias(self, y)


def _is_binary(layer: Any) -> bool:
    """Whether `_binary_pad_value` accepts the layer.

    Args:
        layer: an nnx layer.

    Returns:
        True for a binary XNOR layer.
    """
    try:
        _binary_pad_value(layer)
    except ValueError:
        return False
    return True


def pack_model(model: _nnx.Module, *, engine: str = "xla") -> _nnx.Module:
    """A copy of ``model`` whose binary jaxconv layers are replaced by packed ones.

    Every ``jaxconv.nnx.Conv`` / ``jaxconv.nnx.Linear`` computing an XNOR product (see
    `PackedConv`) becomes a `PackedConv` / `PackedLinear`; every other
    layer (the standard first layer and head, batch norm, ...) is kept. The original model
    is not modified.

    Args:
      model: a trained NNX model.
      engine: ``"xla"`` or ``"pallas"`` for the packed layers.

    Returns:
      The inference model (call it like the original).

    Example:
      >>> from flax import nnx
      >>> import jaxconv
      >>> from jaxconv import packed
      >>> model = nnx.Sequential(jaxconv.nnx.Linear(40, 3, op="xnor", rngs=nnx.Rngs(0)))
      >>> type(packed.pack_model(model).layers[0]).__name__
      'PackedLinear'
    """
    model = _nnx.clone(model)
    targets = []
    for path, node in _nnx.iter_graph(model):
        if path and isinstance(node, (_jnnx.Conv, _jnnx.Linear)) and _is_binary(node):
            targets.append((path, node))
    for path, node in targets:
        parent: Any = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if isinstance(node, _jnnx.Conv):
            new: _nnx.Module = PackedConv.from_conv(node, engine=engine)
        else:
            new = PackedLinear.from_linear(node, engine=engine)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return model
