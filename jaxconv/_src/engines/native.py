"""The native CPU engine: compiled semiring kernels called through the XLA FFI.

The kernels (``csrc/``, the extension module ``jaxconv._native``) are one templated
implicit-GEMM loop nest over combine/reduce functors, built for AVX-512, AVX2 and a portable
baseline and picked at run time; they share their work on XLA's intra-op thread pool and give
the same result whatever the thread count. A built-in op's kernel is chosen from ``op.native``
(with ``op.reduce`` and ``op.pad_value``); a user op's kernels are generated and compiled at
first use (`user_kernel`: ``codegen`` and ``user_kernels``). What the kernels do not serve is
reported by `supports` / `why_not`, so the caller falls back to the XLA engine statically.

Forward and backward are two FFI calls under ``jax.custom_vjp``: max/min ops route the
cotangent to the winning taps (ties split equally, as ``jax.grad(jnp.max)``), sums use the
op's gradient rule (AdderNet's for ``adder``, the exact subgradient for ``l1``, exact for
``l2_exact``). Under ``jax.vmap`` the calls take the mapped axis as an outer loop
(``vmap_method="broadcast_all"``).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op

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
}
DTYPES = (jnp.dtype(jnp.float32),)
_FORWARD = "jaxconv_forward"
_BACKWARD = "jaxconv_backward"

_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "error": None, "loaded": False, "registered": False}


def _load() -> Any:
    with _lock:
        if not _state["loaded"]:
            _state["loaded"] = True
            try:
                from jaxconv import _native  # noqa: PLC0415 - loaded on first use
            except Exception as e:  # noqa: BLE001 - any failure means "not available"
                _state["error"] = f"{type(e).__name__}: {e}"
            else:
                built = {name: (int(kid), str(red))
                         for name, (kid, red) in _native.kernels().items()}
                if built != KERNELS:
                    _state["error"] = (f"the compiled kernels {built} do not match this "
                                       f"package's table {KERNELS} (a stale build?)")
                else:
                    _state["module"] = _native
        return _state["module"]


def available() -> bool:
    """Whether the compiled kernels (``jaxconv._native``) can be loaded in this process.

    Returns:
      True when the extension module imports.

    Example:
      >>> from jaxconv._src.engines import native
      >>> isinstance(native.available(), bool)
      True
    """
    return _load() is not None


def load_error() -> str | None:
    """Why the compiled kernels could not be loaded (``None`` when they load).

    Returns:
      The import error as text, or ``None``.

    Example:
      >>> from jaxconv._src.engines import native
      >>> native.load_error() is None or isinstance(native.load_error(), str)
      True
    """
    _load()
    return _state["error"]


def isa() -> str | None:
    """The instruction set whose kernels run here (``"avx512"``, ``"avx2"`` or ``"base"``)."""
    mod = _load()
    return None if mod is None else str(mod.isa())


def _register() -> None:
    mod = _load()
    if mod is None:
        raise RuntimeError(f"jaxconv native engine: the compiled library could not be loaded "
                           f"({load_error()}).")
    with _lock:
        if not _state["registered"]:
            for name, capsule in mod.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _state["registered"] = True


def _kernel(op: Op) -> tuple[int, str] | None:
    entry = KERNELS.get(op.native) if op.native is not None else None
    if entry is None or op.reduce_name != entry[1]:
        return None
    return entry


@functools.lru_cache(maxsize=256)
def user_kernel(op: Op) -> Any:
    """The compiled kernels of a user op, or why it has none (decided once per op).

    Args:
      op: an op without a built-in kernel (``op.native is None``).

    Returns:
      A `user_kernels.Kernel`, or a `Refusal` saying why the op is not compiled.
    """
    from jaxconv._src.engines import codegen, user_kernels  # noqa: PLC0415

    if op.native is not None or op.rewrite is not None:
        return Refusal("it is a built-in op or a rewrite", compile_failed=False)
    caps = algebra.capabilities(op)
    if caps.reduce == "sum" and caps.separable == "mul":
        return Refusal("it is a multiply-and-add (a standard convolution is faster)",
                       compile_failed=False)
    try:
        functor = codegen.functor(op)
    except codegen.Untranslatable as e:
        return Refusal(f"it is not translated: {e}", compile_failed=False)
    if not available():
        return Refusal(f"the native library could not be loaded ({load_error()})",
                       compile_failed=False)
    try:
        return user_kernels.build(functor)
    except user_kernels.CompileError as e:
        return Refusal(f"it could not be compiled: {e}", compile_failed=True)


def scalar_math(op: Op) -> bool:
    """Whether a compiled user op evaluates some function with libm lane by lane."""
    got = user_kernel(op)
    return not isinstance(got, Refusal) and bool(got.functor.scalar)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why the native engine does not serve an op."""

    reason: str
    compile_failed: bool


def why_not(op: Op, geom: Any, dtype: Any) -> str | None:
    """Why the native kernels do not serve ``op`` on ``geom`` in ``dtype`` (``None``: they do).

    Args:
      op: the product.
      geom: the canonical geometry.
      dtype: the common dtype of the two operands.

    Returns:
      ``None``, or the reason as text.
    """
    if jnp.dtype(dtype) not in DTYPES:
        return f"dtype {jnp.dtype(dtype).name} is not served (float32 only)"
    if len(geom.window) > 3:
        return "more than 3 spatial dimensions"
    if op.pad_value is not None and not isinstance(op.pad_value, int | float):
        return "a non-numeric pad_value"
    if _kernel(op) is not None:
        return None
    if op.native is not None:
        return f"no kernel {op.native!r} with reduce {op.reduce_name!r}"
    got = user_kernel(op)
    return got.reason if isinstance(got, Refusal) else None


def supports(op: Op, geom: Any, dtype: Any) -> bool:
    """Whether the native kernels serve ``op`` on ``geom`` in ``dtype`` (decided statically).

    Built-in ops are served by their kernel (``op.native``); a user op by its kernels
    compiled at first use (`user_kernel`).

    Args:
      op: the product.
      geom: the canonical geometry (``engines.xla.Geometry``).
      dtype: the common dtype of the two operands.

    Returns:
      True when `generic_conv` can run it.

    Example:
      >>> from jaxconv import ops
      >>> from jaxconv._src.engines import native, xla
      >>> g = xla.Geometry((5,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
      >>> native.supports(ops.max_plus, g, "float32"), native.supports(ops.log, g, "float32")
      (True, False)
    """
    return why_not(op, geom, dtype) is None


Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static attributes of one FFI call (hashable: the custom_vjp's static argument), on
    the 3-D canonical layout (missing spatial dims have size 1)."""

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


def _call_spec(op: Op, geom: Any, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> _Call:
    lead = 3 - len(geom.window)

    def three(t: tuple, fill: Any) -> tuple:
        return tuple((fill,) * lead + tuple(t))

    def ints(t: tuple) -> Triple:
        return tuple(int(v) for v in t)  # type: ignore[return-value]

    n, c = int(x_shape[0]), int(x_shape[-1])
    i, o = int(w_shape[-2]), int(w_shape[-1])
    entry = _kernel(op)
    kid = entry[0] if entry is not None else user_kernel(op).op_id
    return _Call(kid, None if op.pad_value is None else float(op.pad_value),
                 (n, *ints(three(geom.in_spatial, 1)), c), (*ints(three(geom.window, 1)), i, o),
                 (n, *ints(three(geom.out_spatial, 1)), o), ints(three(geom.strides, 1)),
                 tuple((int(lo), int(hi)) for lo, hi in three(geom.padding, (0, 0))),
                 ints(three(geom.lhs_dilation, 1)), ints(three(geom.rhs_dilation, 1)),
                 int(geom.groups), len(geom.window))


def _forward_call(spec: _Call, x: Array, w: Array) -> Array:
    out = jax.ShapeDtypeStruct(spec.y_shape, jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="broadcast_all")(x, w, **spec.attrs())


def _backward_call(spec: _Call, x: Array, w: Array, y: Array, g: Array,
                   parts: int = 3) -> tuple[Array, Array]:
    outs = (jax.ShapeDtypeStruct(spec.x_shape, jnp.float32),
            jax.ShapeDtypeStruct(spec.w_shape, jnp.float32))
    return jax.ffi.ffi_call(_BACKWARD, outs, vmap_method="broadcast_all")(
        x, w, y, g, parts=np.int64(parts), **spec.attrs())


# Separable gradients: sum_p g * (x - w) over a tap's positions is lax's kernel gradient of the
# padded input minus w times the cotangent summed over the positions that tap reads, and
# sum g * (x - w) over the outputs that read a cell is x times their summed cotangent minus
# lax's input gradient. These run as lax's own (fast) products.
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _conv3(spec: _Call, x: Array, w: Array, groups: int, padded: bool) -> Array:
    """A lax convolution on the 3-D canonical operands, run with the problem's own number of
    spatial dims (XLA CPU's 3-D convolutions are much slower than its 1-D / 2-D ones)."""
    m = max(spec.nsd, 1)
    sp = _SPATIAL[m]
    y = lax.conv_general_dilated(
        x.reshape(x.shape[0], *x.shape[4 - m:]), w.reshape(w.shape[3 - m:]),
        spec.strides[3 - m:], ((0, 0),) * m if padded else spec.padding[3 - m:],
        (1,) * m if padded else spec.lhs_dilation[3 - m:], spec.rhs_dilation[3 - m:],
        (f"N{sp}C", f"{sp}IO", f"N{sp}C"), groups, precision=lax.Precision.HIGHEST)
    return y.reshape(y.shape[0], *(1,) * (3 - m), *y.shape[1:])


def _pad_config(spec: _Call) -> list[tuple[int, int, int]]:
    ld = spec.lhs_dilation
    return [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(spec.padding, ld, strict=True)),
            (0, 0, 0)]


def _dense_parts(spec: _Call, x: Array, w: Array, g: Array) -> tuple[Array, Array, Array]:
    """A dense problem's ``(N, G, I)`` input, ``(I, G, Og)`` kernel and ``(N, G, Og)``
    cotangent: the separable gradients are then plain matrix products (XLA compiles a
    dot several times faster than the 1-D convolution it would be otherwise)."""
    n, grp = x.shape[0], spec.groups
    return (x.reshape(n, grp, -1), w.reshape(w.shape[-2], grp, -1), g.reshape(n, grp, -1))


def _sep_dw(spec: _Call, x: Array, w: Array, g: Array) -> Array:
    """``sum_p g[p, o] * (x[p, t, i] - w[t, i, o])`` over each tap's combined positions."""
    if spec.nsd == 0:
        xd, wd, gd = _dense_parts(spec, x, w, g)
        hi = lax.Precision.HIGHEST
        prod = jnp.einsum("ngi,ngo->igo", xd, gd, precision=hi)
        return (prod - wd * jnp.sum(gd, axis=0, keepdims=True)).reshape(w.shape)
    fill = 0.0 if spec.pad is None else spec.pad
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), _pad_config(spec))
    _, vjp = jax.vjp(lambda w_: _conv3(spec, xp, w_, spec.groups, True), w)
    (prod,) = vjp(g)
    if spec.pad is None:
        ones = jnp.ones((1, *spec.x_shape[1:-1], 1), x.dtype)
        mask = lax.pad(ones, jnp.zeros((), x.dtype), _pad_config(spec))
        wm = jnp.zeros((*spec.w_shape[:3], 1, spec.w_shape[-1]), w.dtype)
        _, vjp = jax.vjp(lambda w_: _conv3(spec, mask, w_, 1, True), wm)
        (gsum,) = vjp(jnp.sum(g, axis=0, keepdims=True))
    else:
        gsum = jnp.sum(g, axis=(0, 1, 2, 3)).reshape(1, 1, 1, 1, -1)
    return prod - w * gsum


def _sep_dx(spec: _Call, x: Array, w: Array, g: Array) -> Array:
    """``sum g[p, o] * (x[cell, i] - w[t, i, o])`` over the outputs that read each cell."""
    if spec.nsd == 0:
        xd, wd, gd = _dense_parts(spec, x, w, g)
        prod = jnp.einsum("ngo,igo->ngi", gd, wd, precision=lax.Precision.HIGHEST)
        return (xd * jnp.sum(gd, axis=-1, keepdims=True) - prod).reshape(x.shape)
    _, vjp = jax.vjp(lambda x_: _conv3(spec, x_, w, spec.groups, False), x)
    (prod,) = vjp(g)
    grp = spec.groups
    xg = jnp.zeros((*spec.x_shape[:-1], grp), x.dtype)
    ones = jnp.ones((*spec.w_shape[:3], 1, spec.w_shape[-1]), w.dtype)
    _, vjp = jax.vjp(lambda x_: _conv3(spec, x_, ones, grp, False), xg)
    (gsum,) = vjp(g)
    return x * jnp.repeat(gsum, spec.x_shape[-1] // grp, axis=-1) - prod


def gradients(spec: _Call, x: Array, w: Array, y: Array, g: Array) -> tuple[Array, Array]:
    """The input and kernel gradients of the canonical 3-D operands, from the forward's
    ``y`` and its cotangent ``g``: FFI kernels, and lax products where those are faster."""
    g = g.astype(jnp.float32)
    if spec.op_id == KERNELS["adder"][0]:
        dx, _ = _backward_call(spec, x, w, y, g, parts=1)
        return dx, _sep_dw(spec, x, w, g)
    if spec.op_id == KERNELS["l2_exact"][0]:
        return -2.0 * _sep_dx(spec, x, w, g), 2.0 * _sep_dw(spec, x, w, g)
    return _backward_call(spec, x, w, y, g)


def generic_conv(
    x: Array,
    w: Array,
    geom: Any,
    op: Op,
    *,
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
) -> Array:
    """Generalized convolution on canonical layouts, computed by the native kernels.

    Same contract as ``engines.xla.generic_conv``; the kernels hold no product tensor, so
    ``max_block_bytes`` does not apply.

    Args:
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, C // groups, O)`` kernel.
      geom: the static geometry (padding already resolved to pairs).
      op: the product (``op.native`` names the kernel).
      preferred_element_type: output dtype, as in ``lax``.
      max_block_bytes: ignored.

    Returns:
      ``(N, *out_spatial, O)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import ops
      >>> from jaxconv._src.engines import native, xla
      >>> g = xla.Geometry((4,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
      >>> x = jnp.arange(4.0).reshape(1, 4, 1); w = jnp.zeros((2, 1, 1))
      >>> native.generic_conv(x, w, g, ops.max_plus)[0, :, 0]
      Array([1., 2., 3.], dtype=float32)
    """
    from jaxconv._src.core import primitive  # noqa: PLC0415 - the core binds the engines

    del max_block_bytes
    return primitive.canonical_conv(x, w, geom, op, engine="native",
                                    preferred_element_type=preferred_element_type)
