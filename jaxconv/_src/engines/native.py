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

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op

Array = jax.Array

# Kernel ids (``Op.native``) -> (id in csrc/problem.h, the reduce the kernel implements).
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
      geom: the canonical geometry (`jaxconv._src.core.geometry.Geometry`).
      dtype: the common dtype of the two operands.

    Returns:
      True when the native kernels can run it.

    Example:
      >>> from jaxconv import ops
      >>> from jaxconv._src.core.geometry import Geometry
      >>> from jaxconv._src.engines import native
      >>> g = Geometry((5,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
      >>> native.supports(ops.max_plus, g, "float32"), native.supports(ops.log, g, "float32")
      (True, False)
    """
    return why_not(op, geom, dtype) is None


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static attributes of one FFI call (hashable: the custom_vjp's static argument)."""

    op_id: int
    geom: tuple[int, ...]
    pad: float | None
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]  # the 3-D geometry again, for the lax products
    groups: int
    nsd: int

    def attrs(self) -> dict[str, Any]:
        return dict(geom=np.asarray(self.geom, np.int64),
                    pad=np.float32(0.0 if self.pad is None else self.pad),
                    op=np.int64(self.op_id))

    def field(self, at: int) -> tuple[int, int, int]:
        return tuple(self.geom[at:at + 3])


def _call_spec(op: Op, geom: Any, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> _Call:
    nsd = len(geom.window)
    lead = 3 - nsd

    def three(t: tuple, fill: Any) -> tuple:
        return (fill,) * lead + tuple(t)

    n, c = x_shape[0], x_shape[-1]
    i, o = w_shape[-2], w_shape[-1]
    sp = three(geom.in_spatial, 1)
    k = three(geom.window, 1)
    os_ = three(geom.out_spatial, 1)
    pads = three(geom.padding, (0, 0))
    vals = (n, *sp, c, *k, i, o, geom.groups, *os_, *three(geom.strides, 1),
            *(lo for lo, _ in pads), *three(geom.lhs_dilation, 1), *three(geom.rhs_dilation, 1),
            0 if op.pad_value is None else 1)
    entry = _kernel(op)
    kid = entry[0] if entry is not None else user_kernel(op).op_id
    return _Call(kid, tuple(int(v) for v in vals),
                 None if op.pad_value is None else float(op.pad_value),
                 (n, *sp, c), (*k, i, o), (n, *os_, o),
                 tuple((int(lo), int(hi)) for lo, hi in pads), int(geom.groups), nsd)


def _forward_call(spec: _Call, x: Array, w: Array) -> Array:
    out = jax.ShapeDtypeStruct(spec.y_shape, jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="broadcast_all")(x, w, **spec.attrs())


def _backward_call(spec: _Call, x: Array, w: Array, y: Array, g: Array,
                   parts: int = 3) -> tuple[Array, Array]:
    outs = (jax.ShapeDtypeStruct(spec.x_shape, jnp.float32),
            jax.ShapeDtypeStruct(spec.w_shape, jnp.float32))
    return jax.ffi.ffi_call(_BACKWARD, outs, vmap_method="broadcast_all")(
        x, w, y, g, parts=np.int64(parts), **spec.attrs())
