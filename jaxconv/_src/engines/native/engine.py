"""The native engine on the core's protocol: the FFI calls (`ffi`) on the canonical problem,
served where `eligibility.refusal` says so. Forward-mode tangents come from the XLA engine.

bfloat16 and float16 operands run the float32 kernels: the forward takes them as they are and
converts inside the call (`kinds.low_in_call`: the built-in kernels and a user op's compiled
library alike; a callable reduce's fold and the exp-space ``log`` get float32 copies made next
to the call, XLA fusing the conversions). A sum's result is its float32
accumulator, a max/min op's is rounded once to the operands' dtype (bit for bit the XLA
engine's, which `eligibility.rounds_once` checks for a user combine). The backward of a
max/min op runs the wide backward on float32 copies, each product rounded to the operands'
dtype before it is matched against y (its ties are those between the rounded products): a
user op's through its combine compiled a second time for the wide kernels
(`user_kernels.user_kernel(..., wide=True)`), or on the XLA engine where that library cannot
be built. Under a derivative (`records.low_records`) the forward records the blocks that may
hold a winner and that backward runs in one call on the low operands themselves (the
built-ins', and a user op's through the same wide library where its two libraries compute the
same products: `records.user_records`; `records` decides which max/min calls record).
float64, int32 and int64 operands run the wide kernels, built-in ops and user ops alike (a
user op's kernels compiled for the operands' dtype; float64 backward too;
integers have no gradient).

A user op's kernels compile when the engine first lowers it (never while planning). If that
compile fails, the call still computes: under ``engine="auto"`` it warns once and lowers on
the XLA engine (and the planner, reading the remembered failure, picks that engine from then
on); with ``engine="native"`` it raises.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxconv._src.core import engine as registry
from jaxconv._src.core import log_products, products
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.native import (
    codegen,
    eligibility,
    ffi,
    kinds,
    records,
    tuning,
    twins,
    user_kernels,
)
from jaxconv._src.engines.native.l2_route import l2_route
from jaxconv._src.engines.native.low_route import ENV_LOW, low_route
from jaxconv._src.engines.native.translation import Refusal

Array = jax.Array


def _tuning_line() -> str:
    """The tuning parameters this process runs with, where they came from, and (after a
    search, fresh or cached) what it measured and why it chose them."""
    got = tuning.params()
    values = " ".join(f"{k}={v}" for k, v in got["params"].items())
    why = f"; {got['why']}" if got["why"] else ""
    return f"tuning ({got['source']}): {values}{why}"


def _wide(dtype: DTypeLike) -> bool:
    """Whether operands of `dtype` run the wide kernels (float64 / int32 / int64)."""
    return np.dtype(dtype) in eligibility.WIDE


def _kernel_dtype(dtype: DTypeLike | None) -> str:
    """The dtype a user op's kernels compute in for operands of `dtype`: the wide kernels'
    own, else float32 (bfloat16 / float16 operands run on float32 copies)."""
    return np.dtype(dtype).name if dtype is not None and _wide(dtype) else "float32"


def _wide_backward(dtype: DTypeLike) -> bool:
    """Whether the wide kernels compute the gradients of `dtype` operands (float64)."""
    return np.dtype(dtype) == np.float64 and ffi.has_wide_backward()


def _wide_backward_line(problem: Problem, dtype: DTypeLike) -> str:
    """What computes the gradients of an op on the wide kernels' `dtype` (for `explain`).

    Args:
        problem: the canonical problem (a built-in op, or a user op compiled for `dtype`).
        dtype: the operands' dtype (float64, int32, int64).

    Returns:
        The line.
    """
    if np.dtype(dtype).kind == "i":
        return "backward: none (integer operands have no gradient)"
    if not _wide_backward(dtype):
        return "backward: the XLA engine"
    user = problem.op.native is None
    if kinds.winner(problem):
        return ("backward: the wide kernels (the winners are the products equal to the "
                "forward's result, ties split equally"
                + (", through the combine's compiled partial derivatives)" if user else ")"))
    return ("backward: the wide kernels ("
            + ("the combine's compiled partial derivatives" if user else "the op's gradient rule")
            + " per term)")


@functools.cache
def _warn_compile_failed(name: str, reason: str) -> None:
    """Warns once per op that `engine="auto"` runs a user op on the XLA engine because its
    native kernels could not be compiled."""
    warnings.warn(f"jaxconv: op {name!r} runs on the XLA engine: {reason}", RuntimeWarning,
                  stacklevel=2)


@functools.cache
def _warn_native_unavailable(error: str) -> None:
    """Warns once per process that `engine="auto"` cannot use the native kernels."""
    warnings.warn(f"jaxconv: the native CPU engine could not be loaded ({error}); "
                  "engine='auto' uses the XLA engine.", RuntimeWarning, stacklevel=2)


class NativeEngine(registry.Engine):
    """The compiled CPU kernels on the protocol: the forward and backward FFI calls on the
    canonical problem, tangents from the XLA engine.

    Example:
      >>> from jaxconv._src.core import engine
      >>> engine.get("native").name
      'native'
    """

    name = "native"

    def load_error(self) -> str | None:
        """Why the extension cannot be loaded, or ``None``."""
        return ffi.load_error()

    def refusal(self, problem: Problem, dtype: DTypeLike, platform: str | None) -> str | None:
        """`eligibility.refusal`, warning once under "auto" when the extension does not load."""
        problem = twins.served(problem)
        if (problem.engine == registry.AUTO and problem.op.native is not None
                and platform in (None, "cpu") and ffi.load_error() is not None):
            _warn_native_unavailable(ffi.load_error())
        return eligibility.refusal(problem, dtype, platform)

    def opaque_call(self, platform: str) -> bool:
        """On CPU the engine is an FFI custom call (partitioned by the core)."""
        return platform == "cpu"

    def backward_reads_output(self, problem: Problem) -> bool:
        """The kernels' winner scan matches products against the given `y` bit for bit (a
        user op that falls back to the XLA engine does not)."""
        served = twins.served(problem)
        return self._fallback(served, served.dtype or served.acc_dtype) is None

    def records_winners(self, problem: Problem, platform: str) -> bool:
        """float32 max / min products (dense or convolutions): the recording forward keeps, per
        output, the blocks of 64 kernel rows holding its winners
        (``csrc/kernel_dense_record.h``, ``kernel_convrec_forward.h``), and the backward scans
        only those. (Shapes decide the rest in `forward_recording`, the kernels at run time:
        finite data, more than 64 kernel rows, not depthwise; else the record says "not
        recorded" and the backward rescans.) A user op served by a built-in's kernels
        (`twins.served`) records as the built-in does; another float32 user max / min op
        through its own library where `records.user_f32_records` admits it."""
        problem = twins.served(problem)
        return (platform == "cpu" and problem.dtype is not None
                and records.records_op(problem, problem.dtype))

    def forward_recording(self, problem: Problem, x: Array, w: Array) -> tuple[Array, Array]:
        """The recording forward (`records_winners`): ``y`` and the int32 block masks."""
        problem = twins.served(problem)
        if not (self.records_winners(problem, "cpu") and _records_shapes(x.shape, w.shape)
                and records.user_built(problem)):
            return super().forward_recording(problem, x, w)
        spec = self._spec(problem, x, w)
        out_shape = (x.shape[0], *problem.geom.out_spatial, w.shape[-1])
        if kinds.low(x.dtype):  # csrc/kernel_lowrec_mark.h: y in x's dtype, rounded in it
            y, masks = ffi._low_forward_record_call(spec, x, w, out_shape)
            return y.astype(problem.acc_dtype), masks
        y, masks = ffi._forward_record_call(spec, x.reshape(spec.x_shape),
                                            w.reshape(spec.w_shape))
        return y.reshape(out_shape).astype(problem.acc_dtype), masks.reshape(out_shape)

    def backward_recorded(self, problem: Problem, x: Array, w: Array, y: Array,
                          record: Array, g: Array, need: tuple[bool, bool]
                          ) -> tuple[Array, Array]:
        """The backward kernel given the recording forward's masks: a dense product skips its
        marking pass, a convolution scans only each output's marked blocks."""
        problem = twins.served(problem)
        if not (self.records_winners(problem, "cpu") and _records_shapes(x.shape, w.shape)
                and records.user_built(problem)):
            return self.backward(problem, x, w, y, g, need)
        spec = self._spec(problem, x, w)
        if kinds.low(x.dtype):
            if problem.op.native is None:  # the user op's library for the wide kernels
                spec = dataclasses.replace(spec, op_id=kinds.rounded_user(problem).op_id)
            # csrc/kernel_lowrec_backward.h: x, w, y and g widened in the call, the products
            # rounded to x's dtype before the winner compare (the bits of `backward`'s route).
            def kept(a: Array) -> Array:
                return a if a.dtype in (x.dtype, jnp.float32) else a.astype(jnp.float32)

            gx, gw = ffi._low_backward_recorded_call(spec, x, w, kept(y), record, kept(g))
            return gx.astype(x.dtype), gw.astype(w.dtype)
        gx, gw = ffi._backward_recorded_call(
            spec, x.reshape(spec.x_shape), w.reshape(spec.w_shape),
            y.astype(jnp.float32).reshape(spec.y_shape), record.reshape(spec.y_shape),
            g.astype(jnp.float32).reshape(spec.y_shape))
        return gx.reshape(x.shape).astype(x.dtype), gw.reshape(w.shape).astype(w.dtype)

    def describe(self, problem: Problem, dtype: DTypeLike) -> tuple[str, ...]:
        """The kernel, compiling a user op's now (as the first call would)."""
        twin = twins.served(problem)
        if twin is not problem:
            return ("its combine's traced program is the built-in "
                    f"{twin.op.native!r}'s combine under the same reduce: the built-in's "
                    "kernels serve it", *self.describe(twin, dtype))
        op = problem.op
        low: tuple[str, ...] = ()
        if _wide(dtype) and op.native is None:
            return self._describe_user(problem, dtype)
        if _wide(dtype):
            return (f"built-in kernel {op.native!r} on {np.dtype(dtype).name} (the wide "
                    f"kernels, {ffi.isa()})", _wide_backward_line(problem, dtype))
        if kinds.low(dtype):
            name = np.dtype(dtype).name
            if kinds.winner(problem) and records.low_records(problem):
                back = (f"backward: the wide kernels in one call on the {name} operands and "
                        "cotangent (widened to float32 inside the call, dx and dw rounded "
                        f"once to {name}), each product rounded to {name} before the winner "
                        "compare (ties between the rounded products split equally)"
                        + ("; the combine compiled a second time for the wide kernels, its "
                           "compiled partial derivatives per winner" if op.native is None
                           else ""))
                low = (f"{name} operands: computed in float32, the result rounded once to "
                       f"{name} (bit for bit the products rounded in {name})", back)
            elif kinds.winner(problem):
                why = records.refusal(problem, dtype)
                not_recorded = f"; not recorded: {why}" if why is not None else ""
                back = (f"backward: the wide kernels on float32 copies, each product rounded "
                        f"to {name} before the winner compare (ties between the rounded "
                        "products split equally), made next to the call by XLA's conversions, "
                        "every output's window scanned" + not_recorded
                        if kinds.rounded_winners(problem)
                        or kinds.rounded_user(problem) is not None
                        else f"backward: the XLA engine (ties between the {name}-rounded "
                        "products; this op's combine could not be compiled for the wide "
                        "kernels)")
                if kinds.rounded_winners(problem) and low_route() != "record":
                    back += f" ({ENV_LOW}={low_route()}: no record)"
                low = (f"{name} operands: computed in float32, the result rounded once to "
                       f"{name} (bit for bit the products rounded in {name})", back)
            else:
                low = (f"{name} operands: products and sum in float32, rounded once to the "
                       "result dtype",)
            low = (*low, _low_route(problem, name))
        if op.native is not None:
            if kinds.exp_space(problem):
                return (f"built-in kernel {op.native!r} ({ffi.isa()}) behind the exp-space "
                        "convolution: the kernel (one pass, a running maximum) takes the "
                        "calls that exp space would not compute exactly (a spread beyond ~80, "
                        "an all -inf window, NaN or +inf)", _tuning_line(), *low)
            return (f"built-in kernel {op.native!r} ({ffi.isa()})", _tuning_line(),
                    *records.record_lines(problem, dtype), *low)
        kernel = user_kernels.user_kernel(op)
        if isinstance(kernel, Refusal):
            return (kernel.reason,)
        how = (f"compiled now in {kernel.seconds:.2f} s" if kernel.compiled
               else "loaded from the cache")
        lines = [f"compiled user kernel ({ffi.isa()}, {how}): {kernel.path}",
                 f"primitives: {', '.join(kernel.functor.primitives)}", _tuning_line()]
        if kernel.functor.scalar:
            lines.append("lane by lane with libm (not vectorized): "
                         + ", ".join(kernel.functor.scalar))
        if capabilities(op).reduce == "custom":
            lines.append("the callable reduce compiled as the kernel's fold, vectorized over "
                         "output channels, from its identity in the XLA engine's order (per "
                         "tap a tree over the input channels); its gradient computed natively "
                         "per tap from the fold's derivative (the forward recomputed per "
                         "output, then run backwards)")
        if codegen.has_rules(op.combine):
            lines.append("the combine's custom derivative rule runs per product: the kernel "
                         "computes its primal, the backward its rule (traced on scalars, "
                         "compiled)")
        return (*lines, *records.record_lines(problem, dtype), *low)

    def _describe_user(self, problem: Problem, dtype: DTypeLike) -> tuple[str, ...]:
        """`describe` of a user op on float64 / int32 / int64 operands (the wide kernels).

        Args:
            problem: the canonical problem.
            dtype: the operands' dtype.

        Returns:
            The lines.
        """
        name = np.dtype(dtype).name
        kernel = user_kernels.user_kernel(problem.op, name)
        if isinstance(kernel, Refusal):
            return (kernel.reason,)
        how = (f"compiled now in {kernel.seconds:.2f} s" if kernel.compiled
               else "loaded from the cache")
        back = _wide_backward_line(problem, dtype)
        lines = [f"compiled user kernel on {name} (the wide kernels, {ffi.isa()}, {how}): "
                 f"{kernel.path}", f"primitives: {', '.join(kernel.functor.primitives)}"]
        if kernel.functor.scalar:
            lines.append("lane by lane with libm (not vectorized): "
                         + ", ".join(kernel.functor.scalar))
        return (*lines, back)

    def _fallback(self, problem: Problem, dtype: DTypeLike | None = None
                  ) -> registry.Engine | None:
        """The XLA engine where a user op's kernels fail to compile under "auto" (with one
        warning); raises under engine="native"; ``None`` when the kernels are there.

        Args:
            problem: the canonical problem.
            dtype: the operands' dtype (``None``: float32's kernels).

        Returns:
            The XLA engine, or ``None``.

        Raises:
            ValueError: the kernels fail under ``engine="native"``.
        """
        if problem.op.native is not None:
            return None
        got = user_kernels.user_kernel(problem.op, _kernel_dtype(dtype))
        if not isinstance(got, Refusal):
            return None
        name = problem.op.display_name
        if problem.engine != registry.AUTO:
            raise ValueError(
                f"engine='native' does not serve op {name!r} ({got.reason}); use "
                "engine='auto' (which falls back to the XLA engine) or engine='xla'.")
        if got.compile_failed:
            _warn_compile_failed(name, got.reason)
        return registry.get("xla")

    def _spec(self, problem: Problem, x: Array, w: Array) -> Any:
        """The custom call's static description: shapes, op id, pad value (kernels loaded).

        Args:
            problem: the canonical problem.
            x: the input.
            w: the kernel.

        Returns:
            The ``_Call`` spec.
        """
        ffi._register()
        tuning.ensure()
        op_id = ffi.kernel_id(problem.op)
        if op_id is None:
            op_id = user_kernels.user_kernel(problem.op, _kernel_dtype(x.dtype)).op_id
        spec = ffi._call_spec(problem.op, op_id, problem.geom, x.shape, w.shape)
        if spec.pad is not None and kinds.low(x.dtype):
            # The pad value the XLA engine pads with: the Python number in the dtype.
            pad = float(np.asarray(spec.pad).astype(x.dtype).astype(np.float32))
            spec = dataclasses.replace(spec, pad=pad)
        return spec

    def forward(self, problem: Problem, x: Array, w: Array) -> Array:
        """The forward by the compiled kernels (wide dtypes by their family, bf16/f16 in f32)."""
        problem = twins.served(problem)
        other = self._fallback(problem, x.dtype)
        if other is not None:
            return other.forward(problem, x, w)
        spec = self._spec(problem, x, w)
        dtype = x.dtype
        out_shape = (x.shape[0], *problem.geom.out_spatial, w.shape[-1])
        if _wide(dtype):
            y = ffi._wide_forward_call(spec, x.reshape(spec.x_shape), w.reshape(spec.w_shape))
            return y.reshape(out_shape)
        if kinds.low(dtype) and kinds.low_in_call(problem):
            # Widened and rounded inside the call (csrc/kernel_bf16fuse_low.h): the same
            # bits as the conversions below, without their passes over x and y.
            keep = kinds.winner(problem) or np.dtype(problem.acc_dtype) == np.dtype(dtype)
            y = ffi._low_forward_call(spec, x, w, out_shape, dtype if keep else jnp.float32)
            return y.reshape(out_shape).astype(problem.acc_dtype)
        if kinds.low(dtype):
            x, w = x.astype(jnp.float32), w.astype(jnp.float32)

        def kernel(a: Array, b: Array) -> Array:
            y = ffi._forward_call(spec, a.reshape(spec.x_shape), b.reshape(spec.w_shape))
            return y.reshape(out_shape)

        exp = kinds.exp_space(problem)
        y = log_products.forward(problem, x, w, kernel) if exp else kernel(x, w)
        if kinds.low(dtype) and kinds.winner(problem):
            y = y.astype(dtype)  # one rounding: max of the rounded products (monotone)
        return y.astype(problem.acc_dtype)

    def backward(self, problem: Problem, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        """The FFI backward kernel, and standard products where those are faster: the
        kernel gradient of a ``x - w`` sum (AdderNet) where the paired native pass does not
        serve the shape (`_paired`), and both gradients of l2's (centred, `_centred`) under
        ``JAXCONV_NATIVE_L2=products`` (`l2_route`)."""
        problem = twins.served(problem)
        other = self._fallback(problem, x.dtype)
        low_winner = kinds.low(x.dtype) and kinds.winner(problem)
        rounded = kinds.rounded_user(problem) if low_winner and other is None else None
        if other is None and ((_wide(x.dtype) and not _wide_backward(x.dtype))
                              or (low_winner and not kinds.rounded_winners(problem)
                                  and rounded is None)):
            other = registry.get("xla")  # ties between the rounded products (module doc)
        if other is not None:
            return other.backward(problem, x, w, y, g, need)
        op, geom = problem.op, problem.geom
        spec = self._spec(problem, x, w)
        if rounded is not None:  # the user op's library built for the wide kernels
            spec = dataclasses.replace(spec, op_id=rounded.op_id)
        if low_winner and records.low_records(problem):
            # The conversions in the call (csrc/kernel_lowrec_backward.h), no masks: the scan
            # of every output's window.
            def kept(a: Array) -> Array:
                return a if a.dtype in (x.dtype, jnp.float32) else a.astype(jnp.float32)

            none = jnp.zeros((0,), jnp.int32)
            gx, gw = ffi._low_backward_recorded_call(spec, x, w, kept(y), none, kept(g))
            return gx.astype(x.dtype), gw.astype(w.dtype)
        if _wide(x.dtype) or low_winner:
            # float64, or float32 copies of bf16 / f16 operands whose products the kernel
            # rounds to their dtype before matching them against y (exact in float32).
            xd, wd = x.dtype, w.dtype
            dt = jnp.float32 if low_winner else xd
            gx, gw = ffi._wide_backward_call(
                spec, x.astype(dt).reshape(spec.x_shape), w.astype(dt).reshape(spec.w_shape),
                y.astype(dt).reshape(spec.y_shape), g.astype(dt).reshape(spec.y_shape),
                round_to=np.dtype(xd).name if low_winner else None)
            return gx.reshape(x.shape).astype(xd), gw.reshape(w.shape).astype(wd)
        g = g.astype(jnp.float32)
        xd, wd = x.dtype, w.dtype
        x, w, y = x.astype(jnp.float32), w.astype(jnp.float32), y.astype(jnp.float32)
        # Built-in kernels only: a user op's compiled backward computes both sides itself.
        kind = capabilities(op).separable if op.native is not None else None
        if kind == "sqdiff" and l2_route() == "products":
            # Standard products on operands centred per input channel (`_centred`): x times
            # the cotangent's sums, less the standard gradients. A pad_value is one scalar
            # for every channel, so it cannot move with them: such an op keeps its operands.
            # JAXCONV_NATIVE_L2=native takes the kernel below instead (l2_route.py: why).
            xc, wc = _centred(x, w, geom.groups) if op.pad_value is None else (x, w)
            gx = -2.0 * products.difference_input_gradient(op, geom, xc, wc, g)
            gw = products.separable_kernel_gradient(problem, kind, xc, wc, g)
            return gx.astype(xd), gw.astype(wd)
        native_dw = kind != "adder" or _paired(spec.w_shape)
        parts = 3 if native_dw else 1

        def kernel(x: Array, w: Array, y: Array, g: Array) -> tuple[Array, Array]:
            gx, gw = ffi._backward_call(
                spec, x.reshape(spec.x_shape), w.reshape(spec.w_shape),
                y.reshape(spec.y_shape), g.reshape(spec.y_shape), parts=parts)
            return gx.reshape(x.shape), gw.reshape(w.shape)

        if kinds.exp_space(problem):
            gx, gw = log_products.backward(problem, x, w, y.astype(jnp.float32), g, kernel)
        else:
            gx, gw = kernel(x, w, y, g)
        if not native_dw:
            gw = products.separable_kernel_gradient(problem, kind, x, w, g)
        return gx.reshape(x.shape).astype(xd), gw.reshape(w.shape).astype(wd)

    def tangent(self, problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        """The XLA engine's forward-mode tangent (no native tangent kernels)."""
        return registry.get("xla").tangent(problem, x, w, y, tx, tw, active)


def _records_shapes(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> bool:
    """Whether the recording forward's kernels record for these canonical shapes: more than
    one block of kernel rows (the library's ``ffi.native_constant("record_block_rows")``, 64),
    not depthwise (the kernels then decide by the data: finite).

    Args:
        x_shape: the input's shape, ``(N, *spatial, C)``.
        w_shape: the kernel's shape, ``(*window, I, O)``.

    Returns:
        True when a record is worth its memory (an int32 per output).

    Example:
        >>> _records_shapes((8, 32, 32, 64), (3, 3, 64, 64)), _records_shapes((8, 5), (5, 9))
        (True, False)
    """
    rows = int(np.prod(w_shape[:-1]))
    groups = x_shape[-1] // w_shape[-2] if w_shape[-2] else 1
    depthwise = w_shape[-2] == 1 and w_shape[-1] == groups
    return rows > ffi.native_constant("record_block_rows") and not depthwise


def _centred(x: Array, w: Array, groups: int) -> tuple[Array, Array]:
    """``x`` and ``w`` less one constant per input channel (per group), the mean of the
    channel's weights (0 where that is not finite): every difference ``x - w`` is unchanged,
    but l2_exact's gradients in standard products, ``x * sum(g) - sum(g * w)``, then cancel
    only what the data's spread makes them cancel, the error of a product's sum
    ``eps * sum(|g| (|x - s| + |w - s|))`` (as the min form of adder's forward,
    docs/numerics.md), not ``eps * sum(|g| (|x| + |w|))``: data at 1000 +- 0.01 would keep
    about one digit.

    Args:
        x: the canonical input ``(N, *S, C)``, float32.
        w: the canonical kernel ``(*K, I, O)``, float32, ``C = groups * I``.
        groups: the feature groups.

    Returns:
        ``(x - s, w - s)``, each channel's ``s`` broadcast.

    Example:
        >>> x, w = jnp.full((1, 2, 1), 1000.5), jnp.full((3, 1, 2), 1000.0)
        >>> [np.asarray(a).ravel().tolist() for a in _centred(x, w, 1)]
        [[0.5, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    i, o = w.shape[-2], w.shape[-1]
    s = jnp.mean(w.reshape(-1, i, groups, o // groups), axis=(0, 3))  # (I, G)
    s = jnp.where(jnp.isfinite(s), s, 0.0)
    xs = s.T.reshape((1,) * (x.ndim - 1) + (groups * i,))  # channel grp * I + i
    ws = jnp.repeat(s, o // groups, axis=1).reshape((1,) * (w.ndim - 2) + (i, o))
    return x - xs, w - ws


def _paired(w_shape: tuple[int, ...]) -> bool:
    """Whether adder's kernel gradient comes from the native pass that computes both gradients
    from each term's ``x - w`` (csrc/kernel_sums_paired.h, csrc/kernel_sumbwd_dense.h: input
    channels a multiple of the library's ``ffi.native_constant("pair_channels")``) rather than
    from a standard product (`products`).

    Args:
        w_shape: the kernel's shape in the call spec, ``(KD, KH, KW, I, O)``.

    Returns:
        True for the fused pass.

    Example:
        >>> _paired((1, 3, 3, 64, 64)), _paired((1, 3, 3, 17, 64))
        (True, False)
    """
    return w_shape[3] % ffi.native_constant("pair_channels") == 0


def _low_route(problem: Problem, name: str) -> str:
    """`describe`'s line on where a bfloat16 / float16 forward converts
    (`kinds.low_in_call`).

    Args:
        problem: the canonical problem (its twin already served).
        name: the operands' dtype name.

    Returns:
        The line.
    """
    if kinds.low_in_call(problem):
        back = ("the backward takes them as they are (one call, above)"
                if kinds.winner(problem) and records.low_records(problem)
                else "the backward's operands are float32 copies made next to its call")
        return (f"forward: the {name} operands widened to float32 inside the call and its "
                "result rounded there (csrc/kernel_bf16fuse_low.h, the bits of XLA's "
                f"converts); {back}")
    if kinds.exp_space(problem):
        why = "the exp-space convolution runs on float32"
    elif problem.op.native is None and capabilities(problem.op).reduce == "custom":
        why = "a callable reduce's fold (csrc/kernel_fold.h) reads float32 only"
    elif low_route() == "convert":
        why = f"{ENV_LOW}=convert chooses this route"
    else:
        why = "the native library has no in-call conversions (built from older sources)"
    return (f"forward: the {name} operands converted to float32 next to the call and its "
            f"result rounded after it (XLA's converts): {why}")


ENGINE = NativeEngine()
