"""The backward's one zeroing rule (``Call::zero_dx`` / ``zero_dw`` in csrc/problem.h, and
``WideCall``'s in csrc/wide.h): the FFI leaves dx and dw unzeroed and each kernel zeroes what
its passes do not write.

The paths that took this rule over from a serial memset: the wide kernels' backward on float64
(csrc/kernel_wide_backward.h: built-in and user ops, one group and several), the bfloat16 max
/ min backward on float32 copies (csrc/kernel_wide_lowwin.h, reached from the FFI under
``JAXCONV_NATIVE_LOW=call`` and from the low recorded backward, csrc/kernel_lowrec_backward.h,
under ``record``), and a callable reduce's fold (csrc/kernel_fold.h), each with only the input's
or only the kernel's gradient asked for. Integer operands have no gradient (float0, tested in
tests/test_native_wide.py). A problem without terms (no image, no output position) never
reaches the kernels (JAX folds the empty computation to zeros before the call), so the
kernels' zeroing of an empty problem's gradients serves their direct callers only.

Each case runs its jitted gradient over several rounds of data, so that XLA hands the kernels
output buffers that held earlier results: a kernel that stops zeroing adds into them and fails
against the XLA engine (JAX's derivative of its generic formulation).
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines import native
from jaxconv._src.engines.native import ffi, low_route

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

DN = ("NHWC", "HWIO", "NHWC")
# name -> (x shape, w shape, conv kwargs)
GEOMETRY = {
    "same": ((2, 7, 6, 5), (3, 3, 5, 19), dict(window_strides=(1, 1), padding="SAME")),
    "groups": ((2, 6, 5, 6), (3, 2, 3, 8), dict(window_strides=(2, 1), padding="SAME",
                                               feature_group_count=2)),
}

# A user op the wide kernels compile (not a built-in one, not factored).
USER_MAX = jaxconv.Op(lambda x, w: jnp.abs(x - w) - jnp.minimum(x, w), "max", name="zero_max")
# A user op whose bfloat16 backward runs on the wide kernels (each product rounded once).
CLIP_MAX = jaxconv.Op(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "max", name="zero_clip_max")
# A callable reduce: the fold of csrc/kernel_fold.h.
PROB_OR = jaxconv.Op(lambda x, w: jax.nn.sigmoid(x * w), lambda a, b: a + b - a * b,
                     identity=0.0, name="zero_prob_or")

# (op, dtype, geometry, JAXCONV_NATIVE_LOW route or None, the wide backward call expected)
CASES = {
    "f64_max_plus": ("max_plus", np.float64, "same", None, "jaxconv_wide_backward"),
    "f64_adder_groups": ("adder", np.float64, "groups", None, "jaxconv_wide_backward"),
    "f64_user_max": (USER_MAX, np.float64, "groups", None, "jaxconv_wide_backward"),
    "bf16_call": ("max_plus", jnp.bfloat16, "same", "call", "jaxconv_wide_backward"),
    "bf16_record_groups": ("min_plus", jnp.bfloat16, "groups", "record",
                           "jaxconv_low_backward_recorded"),
    "bf16_user_call": (CLIP_MAX, jnp.bfloat16, "same", "call", "jaxconv_wide_backward"),
    "fold": (PROB_OR, np.float32, "groups", None, "jaxconv_backward"),
}


def _data(dtype: Any, geometry: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ws, kw = GEOMETRY[geometry]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    if np.dtype(dtype) == np.float64:  # a 1/4 grid: ties between products too
        x, w = np.round(x * 4) / 4, np.round(w * 4) / 4
    shape = jax.eval_shape(
        lambda a, b: jax.lax.conv_general_dilated(a, b, dimension_numbers=DN, **kw),
        jax.ShapeDtypeStruct(xs, np.float32), jax.ShapeDtypeStruct(ws, np.float32)).shape
    ct = rng.standard_normal(shape)
    return (np.asarray(x).astype(dtype), np.asarray(w).astype(dtype),
            np.asarray(ct).astype(dtype))


def _grad(op: Any, engine: str, geometry: str, arg: int) -> Any:
    """The jitted gradient of ``sum(conv(x, w) * ct)`` in x (arg 0) or w (arg 1) alone."""
    kw = GEOMETRY[geometry][2]

    def loss(x: jax.Array, w: jax.Array, ct: jax.Array) -> jax.Array:
        y = jaxconv.conv_general_dilated(x, w, op=op, engine=engine, dimension_numbers=DN,
                                         **kw)
        return jnp.sum((y * ct).astype(jnp.float32 if y.dtype == jnp.bfloat16 else y.dtype))

    return jax.jit(jax.grad(loss, argnums=arg))


def _close(got: np.ndarray, want: np.ndarray, dtype: Any) -> None:
    if np.dtype(dtype) == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    elif np.dtype(dtype) == np.float32:
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    else:  # bfloat16: the same winners and shares, each gradient rounded once
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                   rtol=1e-2, atol=1e-2)


def _only(arg: int) -> Any:
    """``ffi._backward_call`` asking the kernels for one gradient alone (the engine asks a
    user op's kernels for both): bit 0 dx, bit 1 dw."""
    real = ffi._backward_call

    def call(spec: Any, x: Any, w: Any, y: Any, g: Any, parts: int = 3) -> Any:
        del parts
        return real(spec, x, w, y, g, parts=1 << arg)

    return call


@pytest.mark.parametrize("case", list(CASES))
def test_one_gradient_asked_for_is_zeroed_by_the_kernels(case: str) -> None:
    op, dtype, geometry, route, call = CASES[case]
    with jax.enable_x64(np.dtype(dtype) == np.float64), \
            low_route.chosen(route or low_route.low_route()):
        x, w, ct = _data(dtype, geometry, 0)
        native_grads = []
        for arg in (0, 1):  # compiled now: the float32 kernels asked for this part alone
            with mock.patch.object(ffi, "_backward_call", _only(arg)):
                native_grads.append(_grad(op, "native", geometry, arg).lower(x, w, ct))
        if call is not None:
            assert call in native_grads[0].as_text()
        native_grads = [f.compile() for f in native_grads]
        xla_grads = [_grad(op, "xla", geometry, arg) for arg in (0, 1)]
        # Rounds of new data, each gradient alone: buffers that held the last round's
        # gradients (or the other one's) come back as the kernels' outputs.
        for seed in range(4):
            x, w, ct = _data(dtype, geometry, seed)
            for arg in (0, 1):
                got = np.asarray(native_grads[arg](x, w, ct))
                with jax.numpy_rank_promotion("allow"):
                    want = np.asarray(xla_grads[arg](x, w, ct))
                assert got.dtype == np.dtype(dtype) and got.shape == (x, w)[arg].shape
                _close(got, want, dtype)
