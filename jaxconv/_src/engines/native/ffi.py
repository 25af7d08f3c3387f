"""The native CPU engine: compiled semiring kernels called through the XLA FFI.

The kernels (``csrc/``, the extension module ``jaxconv._native``) are one templated
implicit-GEMM loop nest over combine/reduce functors, built for AVX-512, AVX2 and a portable
baseline and picked at run time; they share their work on XLA's intra-op thread pool and give
the same result whatever the thread count. A built-in op's kernel is chosen from ``op.native``
(with ``op.reduce`` and ``op.pad_value``); a user op's kernels are generated and compiled at
first use (``codegen`` and ``user_kernels.user_kernel``). What the kernels do not serve is
decided by `eligibility.refusal`.

This module holds the library's loading (it is the one module that imports the extension;
the others reach it through `extension`) and the two FFI calls (forward and backward); the
engine (`engine.NativeEngine`) lowers the core's primitives to them: max/min ops route the
cotangent to the winning taps (ties split equally, as ``jax.grad(jnp.max)``), sums use the
op's gradient rule (AdderNet's for ``adder``, the exact subgradient for ``l1``, exact for
``l2_exact``). Under ``jax.vmap`` the core folds the mapped axis into the problem.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry

Array = jax.Array

# Kernel ids (``Op.native``) -> (id in csrc/problem.h, the reduce the kernel implements): the
# library's own list (``_native.kernels()``, from csrc/problem.h) must equal it, or the
# library is refused as built from other sources.
KERNELS: dict[str, tuple[int, str]] = {
    "max_plus": (0, "max"),
    "min_plus": (1, "min"),
    "max_min": (2, "max"),
    "min_max": (3, "min"),
    "adder": (4, "sum"),
    "l1": (5, "sum"),
    "l2_exact": (6, "sum"),
    "log": (7, "logsumexp"),
    "max_minus": (8, "max"),
    "min_minus": (9, "min"),
}
_FORWARD = "jaxconv_forward"
_BACKWARD = "jaxconv_backward"
_WIDE_FORWARD = "jaxconv_wide_forward"
_LOW_FORWARD = "jaxconv_low_forward"
_WIDE_BACKWARD = "jaxconv_wide_backward"
_FORWARD_RECORD = "jaxconv_forward_record"
_BACKWARD_RECORDED = "jaxconv_backward_recorded"
_LOW_FORWARD_RECORD = "jaxconv_low_forward_record"
_LOW_BACKWARD_RECORDED = "jaxconv_low_backward_recorded"
# The built-in ops the wide kernels (csrc/kernel_wide.h: float64, int32, int64) serve.
WIDE_KERNELS = ("max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2_exact")

_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "error": None, "loaded": False, "registered": False}


def _load() -> Any:
    """The extension module, imported once; ``None`` (with the error kept) if it fails.

    Returns:
        The module, or ``None``.
    """
    with _lock:
        if not _state["loaded"]:
            _state["loaded"] = True
            try:
                import jaxconv._native as _native  # noqa: PLC0415 - loaded on first use

                # A library built from older sources may lack the table: not available.
                built = {name: (int(kid), str(red))
                         for name, (kid, red) in _native.kernels().items()}
            except Exception as e:  # noqa: BLE001 - any failure means "not available"
                _state["error"] = f"{type(e).__name__}: {e}"
            else:
                if built != KERNELS:
                    _state["error"] = (f"the compiled kernels {built} do not match this "
                                       f"package's table {KERNELS} (a stale build?)")
                else:
                    _state["module"] = _native
        return _state["module"]


def extension() -> Any:
    """The loaded extension module ``jaxconv._native`` (kernels, FFI targets, build facts).

    Returns:
      The module.

    Raises:
      ImportError: it cannot be loaded here, or it was built from other sources (the reason
        is `load_error`).

    Example:
      >>> from jaxconv._src.engines.native import ffi
      >>> ffi.extension().isa() in ("avx512", "avx2", "base") if ffi.available() else True
      True
    """
    mod = _load()
    if mod is None:
        raise ImportError(f"the native library could not be loaded ({load_error()})")
    return mod


def available() -> bool:
    """Whether the compiled kernels (``jaxconv._native``) can be loaded in this process.

    Returns:
      True when the extension module imports.

    Example:
      >>> from jaxconv._src.engines.native import ffi
      >>> isinstance(ffi.available(), bool)
      True
    """
    return _load() is not None


def load_error() -> str | None:
    """Why the compiled kernels could not be loaded (``None`` when they load).

    Returns:
      The import error as text, or ``None``.

    Example:
      >>> from jaxconv._src.engines.native import ffi
      >>> ffi.load_error() is None or isinstance(ffi.load_error(), str)
      True
    """
    _load()
    return _state["error"]


def isa() -> str | None:
    """The instruction set whose kernels run here.

    Returns:
      ``"avx512"``, ``"avx2"`` or ``"base"``; ``None`` when the library does not load.

    Example:
      >>> from jaxconv._src.engines.native import ffi
      >>> ffi.isa() in ("avx512", "avx2", "base", None)
      True
    """
    mod = _load()
    return None if mod is None else str(mod.isa())


def has_wide() -> bool:
    """Whether the loaded library has the wide kernels (float64 / int32 / int64 max/min)."""
    mod = _load()
    return mod is not None and _WIDE_FORWARD in mod.registrations()


def has_low_forward() -> bool:
    """Whether the loaded library has the forward that takes bfloat16 / float16 operands itself
    (``csrc/kernel_bf16fuse_low.h``)."""
    mod = _load()
    return mod is not None and _LOW_FORWARD in mod.registrations()


def has_wide_backward() -> bool:
    """Whether the loaded library has the wide kernels' backward (float64 gradients)."""
    mod = _load()
    return mod is not None and _WIDE_BACKWARD in mod.registrations()


def has_recording() -> bool:
    """Whether the loaded library has the recording forward and the recorded backward."""
    mod = _load()
    return mod is not None and _FORWARD_RECORD in mod.registrations()


def has_low_recording() -> bool:
    """Whether the loaded library has the bfloat16 / float16 recording forward and the low
    backward that takes its masks (``csrc/kernel_lowrec_mark.h``,
    ``csrc/kernel_lowrec_backward.h``)."""
    mod = _load()
    return mod is not None and _LOW_BACKWARD_RECORDED in mod.registrations()


NativeConstant = Literal["pair_channels", "record_block_rows"]


def native_constant(name: NativeConstant) -> int:
    """A count compiled into the loaded library (csrc/problem.h), which the engine reads to
    decide what to ask of the kernels:

    - ``"pair_channels"`` (``kPairChannels``): the input channels the paired sums backward
      takes in whole vectors on every instruction set; a kernel whose input channels are a
      multiple of it runs adder's kernel gradient in that pass;
    - ``"record_block_rows"`` (``kRecordBlockRows``): the kernel rows of one block of a max /
      min product's winner record; the recording forward keeps a record only for a kernel of
      more than one block.

    Args:
        name: the constant's name (the extension module's attribute).

    Returns:
        Its value in the loaded library.

    Example:
        >>> from jaxconv._src.engines.native import ffi
        >>> [ffi.native_constant(n) if ffi.available() else d
        ...  for n, d in (("pair_channels", 16), ("record_block_rows", 64))]
        [16, 64]
    """
    return int(getattr(extension(), name))


def _register() -> None:
    """Registers the extension's FFI targets with JAX, once.

    Raises:
        RuntimeError: the extension could not be loaded.
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"jaxconv native engine: the compiled library could not be loaded "
                           f"({load_error()}).")
    with _lock:
        if not _state["registered"]:
            for name, capsule in mod.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _state["registered"] = True


def kernel_id(op: Op) -> int | None:
    """The built-in kernel serving ``op`` (``op.native`` with its reduce).

    Args:
      op: the product.

    Returns:
      The kernel's id in the library's table, or ``None`` (no built-in kernel).

    Example:
      >>> import jaxconv
      >>> from jaxconv._src.engines.native import ffi
      >>> ffi.kernel_id(jaxconv.ops.max_plus), ffi.kernel_id(jaxconv.ops.standard)
      (0, None)
    """
    entry = KERNELS.get(op.native) if op.native is not None else None
    if entry is None or op.reduce_name != entry[1]:
        return None
    return entry[0]


Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static attributes of one FFI call (hashable), on the 3-D canonical layout (missing
    spatial dims have size 1)."""

    op_id: int
    pad: float | None
    x_shape: tuple[int, ...]  # (N, D, H, W, C)
    w_shape: tuple[int, ...]  # (KD, KH, KW, I, O)
    y_shape: tuple[int, ...]  # (N, OD, OH, OW, O)
    strides: Triple
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: Triple
    rhs_dilation: Triple
    groups: int
    nsd: int

    def attrs(self) -> dict[str, Any]:
        """The FFI attributes, by name (``csrc/ffi.cc``'s ``JAXCONV_CALL_ATTRS``)."""

        def triple(t: tuple[int, ...]) -> np.ndarray:
            return np.asarray(t, np.int64)

        return dict(op=np.int64(self.op_id),
                    pad=np.float32(0.0 if self.pad is None else self.pad),
                    has_pad=np.int64(self.pad is not None),
                    n=np.int64(self.x_shape[0]), spatial=triple(self.x_shape[1:4]),
                    c=np.int64(self.x_shape[4]), window=triple(self.w_shape[:3]),
                    i=np.int64(self.w_shape[3]), o=np.int64(self.w_shape[4]),
                    groups=np.int64(self.groups), out_spatial=triple(self.y_shape[1:4]),
                    strides=triple(self.strides),
                    pad_lo=triple(tuple(lo for lo, _ in self.padding)),
                    lhs_dilation=triple(self.lhs_dilation),
                    rhs_dilation=triple(self.rhs_dilation))


def _call_spec(op: Op, op_id: int, geom: Geometry, x_shape: tuple[int, ...],
               w_shape: tuple[int, ...]) -> _Call:
    """The static description of one custom call, in three spatial dimensions.

    Args:
        op: the op (its pad value).
        op_id: the kernel's id.
        geom: the product's geometry.
        x_shape: the input's shape.
        w_shape: the kernel's shape.

    Returns:
        The ``_Call`` spec, shapes padded to three spatial dimensions with ones.
    """
    lead = 3 - len(geom.window)

    def three(t: tuple, fill: Any) -> tuple:
        return tuple((fill,) * lead + tuple(t))

    def ints(t: tuple) -> Triple:
        return tuple(int(v) for v in t)  # type: ignore[return-value]

    n, c = int(x_shape[0]), int(x_shape[-1])
    i, o = int(w_shape[-2]), int(w_shape[-1])
    return _Call(op_id, None if op.pad_value is None else float(op.pad_value),
                 (n, *ints(three(geom.in_spatial, 1)), c), (*ints(three(geom.window, 1)), i, o),
                 (n, *ints(three(geom.out_spatial, 1)), o), ints(three(geom.strides, 1)),
                 tuple((int(lo), int(hi)) for lo, hi in three(geom.padding, (0, 0))),
                 ints(three(geom.lhs_dilation, 1)), ints(three(geom.rhs_dilation, 1)),
                 int(geom.groups), len(geom.window))


def _forward_call(spec: _Call, x: Array, w: Array) -> Array:
    """The f32 kernels' forward custom call.

    Args:
        spec: the call's static description.
        x: the input, in ``spec.x_shape``.
        w: the kernel, in ``spec.w_shape``.

    Returns:
        The output, float32, in ``spec.y_shape``.
    """
    out = jax.ShapeDtypeStruct(spec.y_shape, jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="broadcast_all")(x, w, **spec.attrs())


def _backward_call(spec: _Call, x: Array, w: Array, y: Array, g: Array,
                   parts: int = 3) -> tuple[Array, Array]:
    """The f32 kernels' backward custom call.

    Args:
        spec: the call's static description.
        x: the input, in ``spec.x_shape``.
        w: the kernel, in ``spec.w_shape``.
        y: the forward's output, in ``spec.y_shape``.
        g: the output's cotangent, in ``spec.y_shape``.
        parts: which gradients to compute: bit 0 the input's, bit 1 the kernel's.

    Returns:
        ``(gx, gw)``, float32; only the parts asked for are meaningful.
    """
    outs = (jax.ShapeDtypeStruct(spec.x_shape, jnp.float32),
            jax.ShapeDtypeStruct(spec.w_shape, jnp.float32))
    return jax.ffi.ffi_call(_BACKWARD, outs, vmap_method="broadcast_all")(
        x, w, y, g, parts=np.int64(parts), **spec.attrs())


def _forward_record_call(spec: _Call, x: Array, w: Array) -> tuple[Array, Array]:
    """The recording forward (``csrc/kernel_dense_record.h``): the output and, per output,
    the mask of the kernel-row blocks holding its winners (-1 everywhere: not recorded).

    Args:
        spec: the call's static description.
        x: the input, in ``spec.x_shape``.
        w: the kernel, in ``spec.w_shape``.

    Returns:
        ``(y, masks)``: float32 and int32, both in ``spec.y_shape``.
    """
    outs = (jax.ShapeDtypeStruct(spec.y_shape, jnp.float32),
            jax.ShapeDtypeStruct(spec.y_shape, jnp.int32))
    return jax.ffi.ffi_call(_FORWARD_RECORD, outs, vmap_method="broadcast_all")(
        x, w, **spec.attrs())


def _backward_recorded_call(spec: _Call, x: Array, w: Array, y: Array, masks: Array,
                            g: Array, parts: int = 3) -> tuple[Array, Array]:
    """`_backward_call` with the recording forward's masks (its marking pass skipped).

    Args:
        spec: the call's static description.
        x: the input, in ``spec.x_shape``.
        w: the kernel, in ``spec.w_shape``.
        y: the forward's output, in ``spec.y_shape``.
        masks: the recording forward's masks, in ``spec.y_shape``.
        g: the output's cotangent, in ``spec.y_shape``.
        parts: which gradients to compute: bit 0 the input's, bit 1 the kernel's.

    Returns:
        ``(gx, gw)``, float32.
    """
    outs = (jax.ShapeDtypeStruct(spec.x_shape, jnp.float32),
            jax.ShapeDtypeStruct(spec.w_shape, jnp.float32))
    return jax.ffi.ffi_call(_BACKWARD_RECORDED, outs, vmap_method="broadcast_all")(
        x, w, y, masks, g, parts=np.int64(parts), **spec.attrs())


def _wide_forward_call(spec: _Call, x: Array, w: Array) -> Array:
    """The wide kernels' forward: the result in the operands' dtype."""
    out = jax.ShapeDtypeStruct(spec.y_shape, x.dtype)
    return jax.ffi.ffi_call(_WIDE_FORWARD, out, vmap_method="broadcast_all")(
        x, w, **spec.attrs())


def _low_forward_call(spec: _Call, x: Array, w: Array, out_shape: tuple[int, ...],
                      out_dtype: DTypeLike) -> Array:
    """The forward on bfloat16 / float16 operands, widened inside the call (a built-in op's
    kernels, or a user op's float32 library: the same template); the result rounded to
    `out_dtype` (the operands' dtype) or kept in float32.

    The operands keep their own shapes (the kernel reads the geometry from `spec` and the vmap
    batch from the element counts): reshaping x to ``spec.x_shape``, whose added size-1
    dimension XLA lays out apart, would cost a copy of x.

    Args:
        spec: the call's static description (a built-in op, or a user op's float32 library
            that is not a callable reduce's fold).
        x: the input, bfloat16 or float16, ``spec.x_shape``'s elements in any shape.
        w: the kernel, in x's dtype, likewise.
        out_shape: the output's shape (``spec.y_shape``'s elements).
        out_dtype: x's dtype, or float32.

    Returns:
        The output in `out_shape`: the float32 result, rounded once to `out_dtype`.
    """
    out = jax.ShapeDtypeStruct(out_shape, out_dtype)
    return jax.ffi.ffi_call(_LOW_FORWARD, out, vmap_method="broadcast_all")(
        x, w, **spec.attrs())


# The dtype whose rounding the wide backward applies to float32 products (csrc/wide.h).
WIDE_ROUND = {"bfloat16": 1, "float16": 2}


def _wide_backward_call(spec: _Call, x: Array, w: Array, y: Array, g: Array,
                        round_to: str | None = None) -> tuple[Array, Array]:
    """The wide kernels' backward: both gradients in the operands' dtype (float64, or float32
    copies of bfloat16 / float16 operands whose products round to `round_to`).

    Args:
        spec: the call's geometry and op.
        x: the input.
        w: the kernel.
        y: the forward's output.
        g: its cotangent.
        round_to: ``"bfloat16"`` or ``"float16"`` for float32 copies whose products round to
            that dtype, None for none.

    Returns:
        ``(gx, gw)``.
    """
    outs = (jax.ShapeDtypeStruct(spec.x_shape, x.dtype),
            jax.ShapeDtypeStruct(spec.w_shape, w.dtype))
    rounding = 0 if round_to is None else WIDE_ROUND[round_to]
    return jax.ffi.ffi_call(_WIDE_BACKWARD, outs, vmap_method="broadcast_all")(
        x, w, y, g, round_to=np.int64(rounding), **spec.attrs())


def _low_forward_record_call(spec: _Call, x: Array, w: Array, out_shape: tuple[int, ...]
                             ) -> tuple[Array, Array]:
    """`_low_forward_call` of a max / min op that also records, per output, the blocks of
    kernel rows that may hold a product rounding to y (``csrc/kernel_lowrec_mark.h``; -1
    everywhere: not recorded).

    Args:
        spec: the call's static description (a built-in max / min op).
        x: the input, bfloat16 or float16, ``spec.x_shape``'s elements in any shape.
        w: the kernel, in x's dtype, likewise.
        out_shape: the output's shape (``spec.y_shape``'s elements).

    Returns:
        ``(y, masks)``: y in x's dtype and the int32 masks, both in `out_shape`.
    """
    outs = (jax.ShapeDtypeStruct(out_shape, x.dtype), jax.ShapeDtypeStruct(out_shape, jnp.int32))
    return jax.ffi.ffi_call(_LOW_FORWARD_RECORD, outs, vmap_method="broadcast_all")(
        x, w, **spec.attrs())


def _low_backward_recorded_call(spec: _Call, x: Array, w: Array, y: Array, masks: Array,
                                g: Array) -> tuple[Array, Array]:
    """A built-in max / min op's backward on bfloat16 / float16 operands in one call
    (``csrc/kernel_lowrec_backward.h``): x, w, y and g widened inside, only the blocks the
    masks name scanned (all of them where the masks are -1), dx and dw rounded to x's dtype.

    Args:
        spec: the call's static description.
        x: the input, bfloat16 or float16, ``spec.x_shape``'s elements in any shape.
        w: the kernel, in x's dtype.
        y: the forward's output, in x's dtype or float32.
        masks: `_low_forward_record_call`'s masks, int32, y's shape.
        g: the output's cotangent, in x's dtype or float32.

    Returns:
        ``(dx, dw)`` in x's and w's shapes and dtype.
    """
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
    return jax.ffi.ffi_call(_LOW_BACKWARD_RECORDED, outs, vmap_method="broadcast_all")(
        x, w, y, masks, g, **spec.attrs())
