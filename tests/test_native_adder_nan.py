"""AdderNet's input gradient ``dx = sum g clip(w - x, -1, 1)`` keeps NaN wherever a term's
difference ``w - x`` is NaN (a NaN operand, or ``x`` and ``w`` the same infinity), on every
native route, against the numpy loops of the rule (reference.py) in float64.

The AVX-512 kernels' one-instruction clip returns +-1 for a NaN, so a call whose operands are
not all finite takes the kernels' NaN-keeping clip (csrc/kernel_sums.h: nan_twin_backward).
tests/test_engine.py::test_gradients_with_nan_and_infinities covers 16 input channels (the
paired conv pass); here: the dense pair pass in both of its cotangent modes, 64-channel
tiles, input channels that are not whole vectors (the input gradient alone, the kernel
gradient in standard products), the per-example gradients of ``vmap`` (feature groups),
float64 (the wide kernels) and bfloat16 / float16 (float32 kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import NUMPY_PARTIALS, conv_grads_reference

import jaxconv
from jaxconv._src.engines import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no native engine")

DN = ("NHWC", "HWIO", "NHWC")
RULE = {
    "partials": NUMPY_PARTIALS["adder"],
    "reduce": "sum",
    "pad_value": 0.0,
    "combine": lambda x, w: -np.abs(np.subtract(x, w)),
}


def _operands(x_shape, w_shape, seed=7):
    """Integer-valued operands (every sum exact) with NaN, +inf and -inf in both, and one
    infinity in each that meets the same one in the other (inf - inf)."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal(x_shape) * 2).astype(np.float32)
    w = np.round(rng.standard_normal(w_shape) * 2).astype(np.float32)
    xf, wf = x.reshape(-1, x_shape[-1]), w.reshape(-1, w_shape[-1])
    xf[1, 3], xf[2, 5], xf[3, 7] = np.nan, np.inf, -np.inf
    xf[-1, -1] = np.inf
    wf[xf.shape[1] // 2, 0], wf[5, 1], wf[7, 2], wf[5, 3] = np.nan, np.inf, -np.inf, -np.inf
    wf[-1, -2] = np.inf
    return x, w


def _cotangent(shape, seed=3):
    rng = np.random.default_rng(seed)
    return (np.round(rng.standard_normal(shape) * 2) + 0.5).astype(np.float32)


def _conv_grads(x, w, g, pads, engine="native"):
    f = lambda a, b: jaxconv.conv_general_dilated(  # noqa: E731
        a, b, (1, 1), pads, dimension_numbers=DN, op="adder", engine=engine
    )
    y, vjp = jax.vjp(jax.jit(f), x, w)
    return (np.asarray(v, np.float64) for v in vjp(jnp.asarray(g, y.dtype).reshape(y.shape)))


def _dense_grads(x, w, g):
    f = lambda a, b: jaxconv.dot_general(  # noqa: E731
        a, b, (((1,), (0,)), ((), ())), op="adder", engine="native"
    )
    y, vjp = jax.vjp(jax.jit(f), x, w)
    return (np.asarray(v, np.float64) for v in vjp(jnp.asarray(g, y.dtype)))


def _check(dx, dw, want_dx, want_dw, rtol=1e-6):
    assert np.isnan(want_dx).any()
    np.testing.assert_allclose(dx, want_dx, rtol=rtol, atol=rtol, err_msg="dx")
    np.testing.assert_allclose(dw, want_dw, rtol=rtol, atol=rtol, err_msg="dw")


# (x shape, kernel shape, padding): 64 input channels (the paired pass's full 4 x 64 tiles);
# 17 (not whole vectors: the input gradient alone, its kernel gradient in standard products).
@pytest.mark.parametrize(
    "xs, ws", [((2, 6, 6, 64), (3, 3, 64, 64)), ((2, 5, 5, 17), (3, 3, 17, 16))], ids=["c64", "c17"]
)
def test_conv_routes(xs, ws):
    x, w = _operands(xs, ws)
    pads = ((1, 1), (1, 1))
    g = _cotangent((xs[0], xs[1], xs[2], ws[-1]))
    want = conv_grads_reference(x, w, g, pads, **RULE)
    _check(*_conv_grads(x, w, g, pads), *want)


# 272 input channels and 13 positions: the dense pair pass (kernel_sumbwd_dense.h), its
# cotangent broadcast into a register (bcast=0) and read by the instructions (bcast=1);
# 20: input channels not whole vectors.
@pytest.mark.parametrize("i, bcast", [(272, 0), (272, 1), (20, None)])
def test_dense_routes(i, bcast):
    from jaxconv import _native
    from jaxconv._src.engines.native import tuning

    x, w = _operands((13, i), (i, 136))
    g = _cotangent((13, 136))
    want = conv_grads_reference(
        x[:, None, None], w[None, None], g[:, None, None], ((0, 0), (0, 0)), **RULE
    )
    tuning.ensure()
    saved = dict(_native.params())
    try:
        if bcast is not None:
            _native.set_params({**tuning.defaults(), "bcast": bcast})
        dx, dw = _dense_grads(x, w, g)
    finally:
        _native.set_params(saved)
    _check(dx, dw, want[0].reshape(x.shape), want[1].reshape(w.shape))


def test_per_example_gradients():
    """``vmap`` of the gradient over examples (the kernel's mapped gradient: feature groups),
    one example finite and the kernel without NaN: each example's gradients as its own call's
    rule gives them, the finite example's input gradient finite."""
    xs, ws = (4, 5, 5, 16), (3, 3, 16, 16)
    x, w = _operands(xs, ws)
    w = np.where(np.isnan(w), 1.0, w).astype(np.float32)
    x[0] = np.round(np.random.default_rng(1).standard_normal(xs[1:]) * 2)  # finite
    g = _cotangent((xs[0], 5, 5, 16))
    pads = ((1, 1), (1, 1))

    def one(a, b, c):
        f = lambda u, v: jaxconv.conv_general_dilated(  # noqa: E731
            u[None], v, (1, 1), pads, dimension_numbers=DN, op="adder", engine="native"
        )[0]
        return jax.vjp(f, a, b)[1](c)

    dx, dw = jax.jit(jax.vmap(one, in_axes=(0, None, 0)))(x, w, g)
    for n in range(xs[0]):
        want = conv_grads_reference(x[n : n + 1], w, g[n : n + 1], pads, **RULE)
        np.testing.assert_allclose(np.asarray(dx[n]), want[0][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(dw[n]), want[1], rtol=1e-6, atol=1e-6)
    assert np.isfinite(np.asarray(dx[0])).all() and np.isnan(np.asarray(dx[1:])).any()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "conv"])
def test_other_dtypes(dtype, dense):
    """float64 (the wide kernels), bfloat16 / float16 (float32 kernels on the widened
    operands): the rule on the operands' values, the sums rounded once to the dtype."""
    xs, ws = ((13, 1, 1, 32), (1, 1, 32, 24)) if dense else ((2, 5, 5, 16), (3, 3, 16, 16))
    x, w = _operands(xs, ws)
    g = _cotangent((xs[0], xs[1], xs[2], ws[-1]))
    pads = ((0, 0), (0, 0)) if dense else ((1, 1), (1, 1))
    want = conv_grads_reference(x, w, g, pads, **RULE)
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        if dense:
            dx, dw = _dense_grads(jnp.asarray(x[:, 0, 0], dt), jnp.asarray(w[0, 0], dt), g[:, 0, 0])
            dx, dw = dx.reshape(xs), dw.reshape(ws)
        else:
            dx, dw = _conv_grads(jnp.asarray(x, dt), jnp.asarray(w, dt), g, pads)
    _check(dx, dw, *want, rtol=1e-6 if dtype == "float64" else 1e-2)
