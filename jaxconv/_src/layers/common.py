"""Logic shared by the Flax modules of `jaxconv.nnx` and `jaxconv.linen`.

The modules follow Flax's ``Conv`` / ``Linear`` / ``Dense`` input handling (channels-last
inputs, any number of leading batch dimensions, an int ``kernel_size`` meaning a 1-D kernel,
Flax's padding forms) but compute the product with a `jaxconv.Op` and keep Flax's
zero-based tricks out of the way of ops whose identity is not zero:

- ``'CIRCULAR'`` / ``'REFLECT'`` pad with real (wrapped / reflected) input values, which is
  right for any op;
- ``'SAME'``, ``'VALID'``, explicit and ``'CAUSAL'`` padding are passed to
  `jaxconv.conv_general_dilated`, so padded taps follow the op's padding semantics
  (skipped, or ``op.pad_value``) instead of being zeros that go through ``combine``;
- ``mask`` marks kernel taps as absent: for ``ops.standard`` the kernel is multiplied by it
  (as Flax does); for other ops the taps are skipped (they contribute the reduce's
  identity), see `masked_op`.

Everything here is a pure function of arrays and static Python values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxconv._src import conv as _conv
from jaxconv._src import quantizers as _quantizers
from jaxconv._src.core.algebra import Op, identity_value
from jaxconv._src.core.ops import resolve

Array = jax.Array

PadPairs = list[tuple[int, int]]
Promote = Callable[[Array, Array, Array | None], tuple[Array, Array, Array | None]]


def kernel_size_tuple(kernel_size: int | Sequence[int]) -> tuple[int, ...]:
    """Flax's rule: an int is a 1-D kernel ``(k,)``, a sequence is taken as it is.

    Args:
      kernel_size: an int or a sequence of ints.

    Returns:
      The window as a tuple of ints.

    Raises:
      TypeError: not an int or a sequence of ints.
      ValueError: an entry is not positive (a zero-size kernel has no taps).

    Example:
      >>> kernel_size_tuple(3), kernel_size_tuple([3, 2])
      ((3,), (3, 2))
    """
    if isinstance(kernel_size, (int, np.integer)) and not isinstance(kernel_size, bool):
        out = (int(kernel_size),)
    elif isinstance(kernel_size, Sequence) and all(
        isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in kernel_size
    ):
        out = tuple(int(k) for k in kernel_size)
    else:
        raise TypeError(
            "`kernel_size` must be an int (a 1-D kernel) or a sequence of ints, got "
            f"{kernel_size!r}."
        )
    if any(k < 1 for k in out):
        raise ValueError(
            f"`kernel_size` entries must be positive ints (every window dimension holds at "
            f"least one tap), got {kernel_size!r}."
        )
    return out


def broadcast_ints(name: str, value: None | int | Sequence[int], n: int) -> tuple[int, ...]:
    """``None`` -> 1, an int -> repeated ``n`` times, a sequence -> checked to have length ``n``.

    Args:
      name: the argument's name, for the error.
      value: ``None``, an int or a sequence of ints.
      n: the number of spatial dimensions.

    Returns:
      ``n`` ints.

    Raises:
      ValueError: a sequence of another length.

    Example:
      >>> broadcast_ints("strides", 2, 3)
      (2, 2, 2)
    """
    if value is None:
        value = 1
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * n
    out = tuple(value)
    if len(out) != n:
        raise ValueError(
            f"`{name}` must be an int or a sequence of {n} ints (one per spatial dimension), "
            f"got {value!r}."
        )
    return out


# The padding strings of the layers: lax's, then Flax's input-padding modes.
CONV_PADDINGS = ("VALID", "SAME", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL")
TRANSPOSE_PADDINGS = ("VALID", "SAME", "CIRCULAR")


def canonicalize_padding(padding: Any, rank: int,
                         accepted: tuple[str, ...] = CONV_PADDINGS) -> str | PadPairs:
    """Flax's padding forms -> a string or ``rank`` ``(low, high)`` pairs.

    Strings are upper-cased (lax accepts any case) and must be one of ``accepted``; an int pads
    every side by it; a sequence of ``rank`` ints or pairs gives per-dimension padding.

    Args:
      padding: the layer's ``padding`` argument.
      rank: the number of spatial dimensions.
      accepted: the padding strings the layer accepts.

    Returns:
      The upper-cased string, or ``rank`` ``(low, high)`` pairs.

    Raises:
      ValueError: any other form.

    Example:
      >>> canonicalize_padding("same", 2), canonicalize_padding([1, (0, 2)], 2)
      ('SAME', [(1, 1), (0, 2)])
    """
    if isinstance(padding, str):
        if padding.upper() not in accepted:
            causal = " ('CAUSAL' for 1-D only)" if "CAUSAL" in accepted else ""
            raise ValueError(
                f"`padding` must be one of {accepted}{causal}, an int, or a sequence of {rank} "
                f"ints or (low, high) pairs; got {padding!r}."
            )
        return padding.upper()
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        return [(int(padding), int(padding))] * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs: PadPairs = []
        for p in padding:
            if isinstance(p, (int, np.integer)) and not isinstance(p, bool):
                pairs.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2 and all(
                isinstance(q, (int, np.integer)) and not isinstance(q, bool) for q in p
            ):
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        if len(pairs) == rank:
            return pairs
    raise ValueError(
        f"Invalid padding format: {padding}, should be str, int, or a sequence of len {rank} "
        "where each element is an int or pair of ints."
    )


def flatten_batch(inputs: Array, num_spatial: int) -> tuple[Array, tuple[int, ...] | None]:
    """Folds every leading batch dimension into one (adding one for unbatched inputs).

    Args:
      inputs: ``(*batch, *spatial, C)``.
      num_spatial: the number of spatial dimensions.

    Returns:
      The ``(N, *spatial, C)`` input and the original batch shape (``None`` if the input had
      exactly one batch dimension and nothing was changed).

    Raises:
      ValueError: fewer dimensions than the spatial ones and the features.

    Example:
      >>> import jax.numpy as jnp
      >>> x, batch = flatten_batch(jnp.zeros((2, 3, 5, 4)), 1)
      >>> x.shape, batch
      ((6, 5, 4), (2, 3))
    """
    nb = inputs.ndim - (num_spatial + 1)
    if nb < 0:
        raise ValueError(
            f"a {num_spatial}-D convolution needs inputs of rank >= {num_spatial + 1} "
            f"(spatial dims and features, channels last), got shape {inputs.shape}."
        )
    if nb == 1:
        return inputs, None
    batch_shape = tuple(inputs.shape[:nb])
    return jnp.reshape(inputs, (-1,) + tuple(inputs.shape[nb:])), batch_shape


def unflatten_batch(y: Array, batch_shape: tuple[int, ...] | None) -> Array:
    """Restores the batch dimensions folded by `flatten_batch`.

    Args:
      y: ``(N, ...)``.
      batch_shape: what `flatten_batch` returned (``None``: nothing to restore).

    Returns:
      ``(*batch_shape, ...)``.

    Example:
      >>> import jax.numpy as jnp
      >>> unflatten_batch(jnp.zeros((6, 5, 8)), (2, 3)).shape
      (2, 3, 5, 8)
    """
    if batch_shape is None:
        return y
    return jnp.reshape(y, batch_shape + tuple(y.shape[1:]))


def resolve_padding(
    inputs: Array,
    padding: Any,
    kernel_size: tuple[int, ...],
    kernel_dilation: tuple[int, ...],
    input_dilation: tuple[int, ...],
) -> tuple[Array, str | PadPairs]:
    """Applies Flax's padding modes to ``(N, *spatial, C)`` inputs.

    ``'CIRCULAR'`` / ``'REFLECT'`` pad the input itself with wrapped / reflected values by
    ``((k_d - 1) // 2, k_d // 2)`` (``k_d`` the dilated kernel extent), as Flax, then run a
    ``'VALID'`` convolution. ``'CAUSAL'`` (1-D only) becomes explicit left padding, which
    jaxconv fills with the op's padding (the identity, or ``op.pad_value``); for the standard
    op that is Flax's zero padding. Other forms are returned canonicalised.

    Args:
      inputs: ``(N, *spatial, C)``.
      padding: the layer's ``padding`` argument.
      kernel_size: the window.
      kernel_dilation: the kernel dilation per spatial dimension.
      input_dilation: the input dilation per spatial dimension.

    Returns:
      The (possibly padded) inputs and the padding to give `jaxconv.conv_general_dilated`.

    Raises:
      ValueError: an unknown padding, or ``'CAUSAL'`` for more than one spatial dimension.

    Example:
      >>> import jax.numpy as jnp
      >>> x, pad = resolve_padding(jnp.zeros((1, 5, 2)), "CIRCULAR", (3,), (1,), (1,))
      >>> x.shape, pad
      ((1, 7, 2), 'VALID')
    """
    rank = len(kernel_size)
    pad = canonicalize_padding(padding, rank)
    if pad in ("CIRCULAR", "REFLECT"):
        extents = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
        widths = [(0, 0)] + [((e - 1) // 2, e // 2) for e in extents] + [(0, 0)]
        mode = "wrap" if pad == "CIRCULAR" else "reflect"
        return jnp.pad(inputs, widths, mode=mode), "VALID"
    if pad == "CAUSAL":
        if rank != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        # Flax zero-pads the undilated input, so each padded cell becomes `input_dilation`
        # cells of the dilated input.
        left = kernel_dilation[0] * (kernel_size[0] - 1) * input_dilation[0]
        return inputs, [(left, 0)]
    return inputs, pad


def conv_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """Channels-last input and output, ``(*window, I, O)`` kernel.

    Args:
        ndim: the rank of the input (batch, spatial dimensions, features).

    Returns:
        The dimension numbers of a channels-last input and output and a ``(*window, I, O)``
        kernel.
    """
    lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


@functools.lru_cache(maxsize=256)
def masked_op(op: Op) -> Op:
    """The op whose ``combine`` skips kernel entries marked absent (NaN-encoded).

    The layer encodes absent taps as NaN in the kernel it hands to the engine; this op's
    ``combine`` returns the reduce's identity there (and evaluates ``op.combine`` on a
    harmless 0 instead of the NaN, so no NaN reaches values or gradients). Native rewrites
    are dropped (they bypass ``combine``), so a masked layer runs on the generic engine.
    Cached, so that the same op gives the same (hashable) masked op.

    Args:
      op: the op to mask.

    Returns:
      An `jaxconv.Op` with the same reduce, identity, padding and post-map.
    """
    inner = op.combine

    def combine(x: Array, w: Array) -> Array:
        absent = jnp.isnan(w)
        y = inner(x, jnp.where(absent, jnp.zeros_like(w), w))
        return jnp.where(absent, identity_value(op, y.dtype), y)

    return Op(
        combine, op.reduce, identity=op.identity, pad_value=op.pad_value,
        name=f"masked({op.name})", rewrite=None, post=op.post,
        doc=f"{op.name} with absent kernel taps skipped.",
    )


def check_mask(mask: Any, kernel_shape: tuple[int, ...]) -> None:
    """Flax's check: a mask has exactly the kernel's shape.

    Args:
        mask: the layer's ``mask`` (``None`` for none).
        kernel_shape: the kernel's shape.

    Raises:
        ValueError: the mask's shape is not the kernel's (Flax's message).
    """
    if mask is not None and tuple(np.shape(mask)) != tuple(kernel_shape):
        raise ValueError(
            "Mask needs to have the same shape as weights. "
            f"Shapes are: {tuple(np.shape(mask))}, {tuple(kernel_shape)}"
        )


def resolve_quantizer(name: str, q: Any) -> Callable[[Array], Array] | None:
    """A quantizer given by name (``"ste_sign"``), as a callable, or ``None``.

    Args:
        name: the argument's name, for the error message.
        q: a quantizer's name, a callable, or ``None``.

    Returns:
        The quantizer as a callable, or ``None``.

    Raises:
        TypeError, ValueError: ``q`` is no quantizer; the message names ``name``.
    """
    try:
        return _quantizers.get(q)
    except (TypeError, ValueError) as e:
        raise type(e)(f"`{name}`: {e}") from None


def check_op(op: Any) -> Op:
    """The ``op=`` argument of the modules: an `jaxconv.Op` or a built-in name.

    Args:
        op: the ``op=`` argument.

    Returns:
        The `jaxconv.Op`.
    """
    return resolve(op)


def nnx_promoter(fn: Callable[..., Any], dtype: Any) -> Promote:
    """nnx's ``promote_dtype`` takes one tuple ``(inputs, kernel, bias)``.

    Args:
        fn: the layer's ``promote_dtype``.
        dtype: the layer's ``dtype``.

    Returns:
        ``promote(x, kernel, bias)``, returning the three promoted.
    """

    def promote(x: Array, k: Array, b: Array | None) -> tuple[Any, Any, Any]:
        return tuple(fn((x, k, b), dtype=dtype))  # type: ignore[return-value]

    return promote


def linen_promoter(fn: Callable[..., Any], dtype: Any) -> Promote:
    """linen's ``promote_dtype`` is variadic.

    Args:
        fn: linen's ``promote_dtype``, called as ``fn(x, kernel, bias, dtype=dtype)``.
        dtype: the dtype to promote to (the module's ``dtype``).

    Returns:
        The same ``promote`` as `nnx_promoter`'s.
    """

    def promote(x: Array, k: Array, b: Array | None) -> tuple[Any, Any, Any]:
        return tuple(fn(x, k, b, dtype=dtype))  # type: ignore[return-value]

    return promote


def check_in_features(layer: Any, inputs: Any, spatial: int | None = None) -> None:
    """Input features (the last axis) against the layer's ``in_features``, in Flax's terms.

    ``spatial``: the convolution's number of spatial dimensions (then a channels-first input,
    whose axis after the batch has ``in_features`` entries, gets a hint), ``None`` for dense.

    Args:
        layer: the layer (its ``in_features`` and type name go into the message).
        inputs: the layer's input.
        spatial: the convolution's number of spatial dimensions, ``None`` for a dense layer.

    Raises:
        ValueError: the last axis of ``inputs`` is not ``in_features`` long.
    """
    shape = tuple(jnp.shape(inputs))
    expected = layer.in_features
    if not shape or shape[-1] == expected:
        return
    name = type(layer).__name__
    hint = (f"; build it with in_features={shape[-1]}" if shape[-1] else "")
    if spatial is not None and len(shape) >= spatial + 2 and shape[-spatial - 1] == expected:
        hint += (f", or, if the data is channels-first, move its channels last "
                 f"(`jnp.moveaxis(x, {len(shape) - spatial - 1}, -1)`)")
    raise ValueError(
        f"{name}: `in_features`={expected}, but the input has {shape[-1]} "
        f"{'channels' if spatial is not None else 'features'} (its last axis; input shape "
        f"{shape}){hint}."
    )


def check_groups(groups: int, in_features: int, in_name: str = "`in_features`") -> None:
    """``feature_group_count`` must be positive and divide the input features.

    Args:
        groups: ``feature_group_count``.
        in_features: the number of input features.
        in_name: how the message names the input features.

    Raises:
        ValueError: ``groups`` is not positive or does not divide ``in_features``.
    """
    if groups < 1 or in_features % groups:
        raise ValueError(
            f"`feature_group_count` (={groups}) must be >= 1 and divide {in_name} "
            f"(={in_features})."
        )


def nnx_params(
    rngs: Any, kernel_shape: tuple[int, ...], out_features: int, *, use_bias: bool,
    param_dtype: Any, kernel_init: Callable[..., Array], bias_init: Callable[..., Array],
    kernel_metadata: Any = MappingProxyType({}), bias_metadata: Any = MappingProxyType({}),
) -> tuple[Any, Any]:
    """An nnx layer's ``kernel`` and ``bias`` (``nnx.data(None)`` without bias), as Flax.

    Args:
        rngs: the layer's ``nnx.Rngs``.
        kernel_shape: the kernel's shape.
        out_features: the number of output features (the bias's length).
        use_bias: whether the layer has a bias.
        param_dtype: the parameters' dtype.
        kernel_init: the kernel's initializer.
        bias_init: the bias's initializer.
        kernel_metadata: keywords of the kernel's ``nnx.Param``.
        bias_metadata: keywords of the bias's ``nnx.Param``.

    Returns:
        ``(kernel, bias)``.
    """
    kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype), **kernel_metadata)
    if not use_bias:
        return kernel, nnx.data(None)
    return kernel, nnx.Param(
        bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata)


def nnx_value(param: Any) -> Array | None:
    """The array of an nnx ``Param``, or ``None`` for an absent one (no bias).

    Args:
        param: an ``nnx.Param`` or ``None``.

    Returns:
        Its value, or ``None``.
    """
    return None if param is None else param[...]


def linen_params(module: Any, kernel_shape: tuple[int, ...]) -> tuple[Array, Array | None]:
    """A linen layer's ``kernel`` and ``bias`` (``None`` without bias), as Flax.

    Args:
        module: the linen layer (its initializers, ``param_dtype``, ``features``, ``use_bias``).
        kernel_shape: the kernel's shape.

    Returns:
        ``(kernel, bias)``.
    """
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
            if module.use_bias else None)
    return kernel, bias


def quantize(
    x: Array, kernel: Array, input_quantizer: Callable[[Array], Array] | None,
    kernel_quantizer: Callable[[Array], Array] | None,
) -> tuple[Array, Array]:
    """Applies the (optional) input and kernel quantizers.

    Args:
        x: the input.
        kernel: the kernel.
        input_quantizer: applied to ``x`` unless ``None``.
        kernel_quantizer: applied to ``kernel`` unless ``None``.

    Returns:
        ``(x, kernel)``, quantized.
    """
    if input_quantizer is not None:
        x = input_quantizer(x)
    if kernel_quantizer is not None:
        kernel = kernel_quantizer(kernel)
    return x, kernel


def hook_kwargs(out_sharding: Any, preferred_element_type: Any) -> dict[str, Any]:
    """The optional keywords of a Flax hook call (omitted when None, as Flax does).

    Args:
        out_sharding: the layer's ``out_sharding``.
        preferred_element_type: the layer's ``preferred_element_type``.

    Returns:
        The keywords that are not ``None``.
    """
    kwargs: dict[str, Any] = {}
    if out_sharding is not None:
        kwargs["out_sharding"] = out_sharding
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    return kwargs


def mask_kernel(kernel: Array, mask: Any, op: Op, multiply: bool) -> tuple[Array, Op]:
    """Applies ``mask`` to the kernel: multiplies it (``multiply``: the standard product or a
    hook) or encodes absent taps as NaN for `masked_op`, the op returned with it.

    Args:
        kernel: the kernel.
        mask: the layer's mask, ``None`` for none.
        op: the layer's op.
        multiply: multiply the kernel by the mask instead of encoding absent taps.

    Returns:
        ``(kernel, op)`` to convolve with.
    """
    if mask is None:
        return kernel, op
    if multiply:
        return kernel * jnp.asarray(mask, kernel.dtype), op
    present = jnp.asarray(mask) != 0
    return jnp.where(present, kernel, jnp.asarray(jnp.nan, kernel.dtype)), masked_op(op)


def add_bias(y: Array, bias: Array | None) -> Array:
    """``y + bias`` over the trailing (feature) axes.

    Args:
        y: the layer's output.
        bias: the bias, ``None`` for none.

    Returns:
        ``y`` with the bias added.
    """
    if bias is None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + tuple(bias.shape))


def conv_apply(
    inputs: Array,
    kernel: Array,
    bias: Array | None,
    *,
    kernel_size: tuple[int, ...],
    strides: Any,
    padding: Any,
    input_dilation: Any,
    kernel_dilation: Any,
    feature_group_count: int,
    mask: Any,
    precision: Any,
    promote: Promote,
    preferred_element_type: Any,
    out_sharding: Any,
    op: Op,
    input_quantizer: Callable[[Array], Array] | None,
    kernel_quantizer: Callable[[Array], Array] | None,
    engine: str,
    max_block_bytes: int | None,
    hook: Callable[..., Array] | None,
) -> Array:
    """The forward pass of a jaxconv ``Conv`` layer (nnx and linen share it).

    Steps: fold batch dimensions; apply Flax's padding modes (`resolve_padding`);
    promote dtypes; quantize inputs and kernel; apply the mask (multiply for the standard op,
    skip taps for any other op); convolve with `jaxconv.conv_general_dilated` (or the
    user's ``hook``); add the bias; restore the batch dimensions.

    Args:
        inputs: the input, channels last, with any number of batch dimensions.
        kernel: the kernel, ``(*kernel_size, in_features // groups, out_features)``.
        bias: the bias, ``None`` for none.
        kernel_size: the window's size.
        strides: the window strides (an int or one per spatial dimension).
        padding: Flax's padding (a string, explicit pairs, or an int).
        input_dilation: the input dilation.
        kernel_dilation: the kernel dilation.
        feature_group_count: the number of feature groups.
        mask: the kernel mask, ``None`` for none.
        precision: lax's precision.
        promote: the dtype promotion (`nnx_promoter` / `linen_promoter`).
        preferred_element_type: the output's dtype, ``None`` for the default.
        out_sharding: the output's sharding, ``None`` for the default.
        op: the product.
        input_quantizer: applied to the input unless ``None``.
        kernel_quantizer: applied to the kernel unless ``None``.
        engine: the engine asked for.
        max_block_bytes: the memory bound of one block, ``None`` for the default.
        hook: a Flax-style ``conv_general_dilated`` called instead of jaxconv, or ``None``.

    Returns:
        The layer's output, with the input's batch dimensions.

    Raises:
        TypeError: a mask with a non-standard op on an integer kernel.
    """
    nsd = len(kernel_size)
    x, batch_shape = flatten_batch(inputs, nsd)
    strides_t = broadcast_ints("strides", strides, nsd)
    in_dil = broadcast_ints("input_dilation", input_dilation, nsd)
    k_dil = broadcast_ints("kernel_dilation", kernel_dilation, nsd)
    x, pad = resolve_padding(x, padding, kernel_size, k_dil, in_dil)
    check_mask(mask, kernel.shape)
    x, kernel, bias = promote(x, kernel, bias)
    x, kernel = quantize(x, kernel, input_quantizer, kernel_quantizer)

    multiply = hook is not None or op.lax_product
    nan_channels = None
    if mask is not None and not multiply:
        if not jnp.issubdtype(kernel.dtype, jnp.inexact):
            raise TypeError(
                f"`mask` with op {op.display_name!r} needs a floating kernel, got {kernel.dtype}."
            )
        # NaN-in-NaN-out for a genuine NaN weight that is present: its whole output
        # channel is NaN (the NaN encoding of absent taps would otherwise skip it).
        present = jnp.asarray(mask) != 0
        nan_channels = jnp.any(jnp.isnan(kernel) & present, axis=tuple(range(nsd + 1)))
    kernel, conv_op = mask_kernel(kernel, mask, op, multiply)

    dn = conv_dimension_numbers(x.ndim)
    if hook is not None:
        y = hook(x, kernel, strides_t, pad, lhs_dilation=in_dil, rhs_dilation=k_dil,
                 dimension_numbers=dn, feature_group_count=feature_group_count,
                 precision=precision, **hook_kwargs(out_sharding, preferred_element_type))
    else:
        y = _conv.conv_general_dilated(
            x, kernel, strides_t, pad, in_dil, k_dil, dn, feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding, op=conv_op, engine=engine,
            max_block_bytes=max_block_bytes)
    if nan_channels is not None:
        y = jnp.where(nan_channels, jnp.asarray(jnp.nan, y.dtype), y)
    return unflatten_batch(add_bias(y, bias), batch_shape)


def dense_apply(
    inputs: Array,
    kernel: Array,
    bias: Array | None,
    *,
    precision: Any,
    promote: Promote,
    preferred_element_type: Any,
    out_sharding: Any,
    op: Op,
    input_quantizer: Callable[[Array], Array] | None,
    kernel_quantizer: Callable[[Array], Array] | None,
    engine: str,
    max_block_bytes: int | None,
    hook: Callable[..., Array] | None,
) -> Array:
    """The forward pass of a jaxconv ``Linear`` / ``Dense`` layer (last axis contracted).

    Args:
        inputs: the input; the last axis is contracted.
        kernel: the kernel, ``(in_features, out_features)``.
        bias: the bias, ``None`` for none.
        precision: lax's precision.
        promote: the dtype promotion (`nnx_promoter` / `linen_promoter`).
        preferred_element_type: the output's dtype, ``None`` for the default.
        out_sharding: the output's sharding, ``None`` for the default.
        op: the product.
        input_quantizer: applied to the input unless ``None``.
        kernel_quantizer: applied to the kernel unless ``None``.
        engine: the engine asked for.
        max_block_bytes: the memory bound of one block, ``None`` for the default.
        hook: a Flax-style ``dot_general`` called instead of jaxconv, or ``None``.

    Returns:
        The layer's output.
    """
    x, kernel, bias = promote(inputs, kernel, bias)
    x, kernel = quantize(x, kernel, input_quantizer, kernel_quantizer)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if hook is not None:
        y = hook(x, kernel, dims, precision=precision,
                 **hook_kwargs(out_sharding, preferred_element_type))
    else:
        y = _conv.dot_general(
            x, kernel, dims, precision, preferred_element_type, out_sharding=out_sharding,
            op=op, engine=engine, max_block_bytes=max_block_bytes)
    return add_bias(y, bias)


def check_hook(name: str, hook: Any, op: Op) -> None:
    """A Flax-style ``conv_general_dilated`` / ``dot_general`` hook excludes a custom op.

    Args:
        name: the hook argument's name, for the messages.
        hook: the hook, ``None`` for none.
        op: the layer's op.

    Raises:
        TypeError: the hook is not callable.
        ValueError: both a hook and a non-standard op are given.
    """
    if hook is None:
        return
    if not callable(hook):
        raise TypeError(f"`{name}` must be a callable with lax's signature or None, got {hook!r}.")
    if not op.lax_product:
        raise ValueError(
            f"pass either `op=` (got {op.display_name!r}) or a `{name}` hook, not both; a hook is "
            f"called instead of jaxconv (bind the op into it with functools.partial)."
        )
