"""Bit-packed XNOR inference: exact equality with ``ops.xnor`` (conv, dense, borders, Flax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxconv
from jaxconv import ops
from jaxconv import packed as pk

NHWC = ("NHWC", "HWIO", "NHWC")


def _jit(fn, *args, **kwargs):
    """Calls ``fn(*arrays, **static)`` under jit (eager dispatch of a tap loop is slow)."""
    return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def _xnor_conv(x, w, strides, padding, lhs_dil, rhs_dil, groups, op):
    return _jit(jaxconv.conv_general_dilated, x, w, window_strides=strides, padding=padding,
                lhs_dilation=lhs_dil, rhs_dilation=rhs_dil, dimension_numbers=NHWC,
                feature_group_count=groups, op=op)


def _data(x_shape, w_shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    # Exact zeros (and -0.0) must count as +1 on both sides, as larq's sign.
    x.reshape(-1)[::7] = 0.0
    x.reshape(-1)[3::11] = -0.0
    w.reshape(-1)[::5] = 0.0
    return x, w


def test_pack_roundtrip_bit_layout_and_sizes():
    x = jnp.array([1.0, -2.0, 0.0, -0.0, -1.0])
    # bits 0, 2, 3 set (x >= 0, -0.0 included)
    assert int(pk.pack_signs(x)[0]) == 0b1101
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 70, 2)).astype(np.float32)
    p = pk.pack_signs(a, axis=1, groups=2)
    assert p.shape == (3, 4, 2) and p.dtype == jnp.uint32  # 2 groups x ceil(35 / 32)
    back = pk.unpack_signs(p, 70, axis=1, groups=2)
    np.testing.assert_array_equal(back, np.where(a >= 0, 1.0, -1.0))
    k = pk.pack_kernel(rng.standard_normal((3, 3, 64, 16)))
    assert k.shape == (3, 3, 2, 16)
    assert k.nbytes * 32 == 3 * 3 * 64 * 16 * 4  # 32x smaller than float32


# (padding, strides, lhs_dilation, rhs_dilation, groups, C, O)
CONV_CASES = [
    ("SAME", (1, 1), None, None, 1, 70, 5),
    ("SAME_LOWER", (2, 1), None, (1, 2), 2, 66, 4),
    (((2, 1), (0, 2)), (1, 2), (2, 1), None, 1, 32, 3),
    ("VALID", (1, 1), None, None, 3, 9, 6),
]


# Every case with identity padding; the padded ones also with larq's pad_values +1 / -1.
CONV_RUNS = [(i, None) for i in range(len(CONV_CASES))] + [(0, 1.0), (1, -1.0), (2, 1.0)]


@pytest.mark.parametrize("index,pad_value", CONV_RUNS,
                         ids=[f"c{i}-pad{p}" for i, p in CONV_RUNS])
def test_packed_conv_equals_xnor_exactly(index, pad_value):
    case = CONV_CASES[index]
    padding, strides, lhs_dil, rhs_dil, groups, c, o = case
    x, w = _data((2, 6, 5, c), (3, 2, c // groups, o))
    op = ops.xnor if pad_value is None else ops.xnor.replace(pad_value=pad_value)
    expect = _xnor_conv(x, w, strides, padding, lhs_dil, rhs_dil, groups, op)
    wq = pk.pack_kernel(w)
    geo = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dil,
               rhs_dilation=rhs_dil, feature_group_count=groups, pad_value=pad_value)

    def both(a, b):
        # Float activations (packed inside) and already-packed activations.
        xq = pk.pack_signs(a, -1, groups=groups)
        return (pk.packed_conv(a, b, **geo),
                pk.packed_conv(xq, b, in_features=c // groups, **geo))

    got, got_q = jax.jit(both)(x, wq)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(got_q, expect)


@pytest.mark.parametrize("pad_value", [None, -1.0])
def test_packed_conv_pallas_engine_interpret(pad_value):
    x, w = _data((1, 5, 4, 40), (3, 3, 20, 4), seed=2)
    op = ops.xnor if pad_value is None else ops.xnor.replace(pad_value=pad_value)
    expect = _xnor_conv(x, w, (1, 1), "SAME", None, None, 2, op)
    got = _jit(pk.packed_conv, x, pk.pack_kernel(w), window_strides=(1, 1), padding="SAME",
               feature_group_count=2, pad_value=pad_value, engine="pallas")
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("engine", ["xla", "pallas"])
def test_packed_product_is_the_core_primitive(engine):
    """Both engines compute the popcount product through the core's primitive (no private
    autodiff wiring); under vmap the primitive folds the mapped axis into one call."""
    x, w = _data((2, 5, 4, 40), (3, 3, 40, 3), seed=4)
    wq = pk.pack_kernel(w)

    def f(a):
        return pk.packed_conv(a, wq, (1, 1), "SAME", engine=engine)

    text = str(jax.make_jaxpr(f)(x))
    assert "jaxconv_conv" in text and "custom_vjp" not in text
    if engine == "xla":  # (Pallas in interpret mode is slow: its vmap is test_pallas's)
        xs = np.stack([x, -x])
        got = jax.jit(jax.vmap(f))(xs)
        assert str(jax.make_jaxpr(jax.vmap(f))(xs)).count("jaxconv_conv") == 1
        for i in range(2):
            np.testing.assert_array_equal(got[i], _xnor_conv(xs[i], w, (1, 1), "SAME", None,
                                                             None, 1, ops.xnor))


@pytest.mark.parametrize("engine", ["xla", "pallas"])
def test_packed_dense_equals_xnor_exactly(engine):
    x, w = _data((2, 3, 100), (100, 7), seed=3)
    expect = jaxconv.dot_general(x, w, (((2,), (0,)), ((), ())), op="xnor")
    got = _jit(pk.packed_dense, x, pk.pack_kernel(w), engine=engine)
    np.testing.assert_array_equal(got, expect)
    got_i = pk.packed_dense(pk.pack_signs(x), pk.pack_kernel(w), in_features=100,
                            out_dtype=jnp.int32)
    assert got_i.dtype == jnp.int32
    np.testing.assert_array_equal(got_i, np.asarray(expect).astype(np.int32))


def test_bad_inputs_raise_named_errors():
    w = pk.pack_kernel(jnp.ones((3, 3, 40, 2)))
    with pytest.raises(TypeError, match="w_packed"):
        pk.packed_conv(jnp.ones((1, 5, 5, 40)), jnp.ones((3, 3, 2, 2)))
    with pytest.raises(ValueError, match="in_features"):
        pk.packed_conv(pk.pack_signs(jnp.ones((1, 5, 5, 40))), w)
    with pytest.raises(ValueError, match="words"):
        pk.packed_conv(jnp.ones((1, 5, 5, 80)), w)
    with pytest.raises(ValueError, match="groups"):
        pk.pack_signs(jnp.ones((5,)), groups=2)


class _BinaryNet(nnx.Module):
    """Standard first layer and head, binary layers in between (as in the literature)."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 40, (3, 3), rngs=rngs)
        self.b1 = jaxconv.nnx.Conv(40, 36, (3, 3), strides=2, rngs=rngs,
                                   op=ops.xnor.replace(pad_value=1.0))
        self.b2 = jaxconv.nnx.Conv(36, 36, (3, 3), padding="CIRCULAR", feature_group_count=2,
                                   op="standard", input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign", rngs=rngs)
        self.layers = nnx.List([jaxconv.nnx.Linear(36 * 16, 33, op="xnor", rngs=rngs),
                                nnx.Linear(33, 10, rngs=rngs)])

    def __call__(self, x):
        x = self.b2(self.b1(self.stem(x)))
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = layer(x)
        return x


def test_pack_model_replaces_binary_layers_and_keeps_outputs():
    model = _BinaryNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    inference = pk.pack_model(model)
    assert isinstance(inference.b1, pk.PackedConv)
    assert isinstance(inference.b2, pk.PackedConv)
    assert isinstance(inference.layers[0], pk.PackedLinear)
    assert isinstance(inference.stem, nnx.Conv) and isinstance(inference.layers[1], nnx.Linear)
    assert isinstance(model.b1, jaxconv.nnx.Conv)  # the original is untouched
    assert inference.b1.kernel[...].dtype == jnp.uint32

    def run(m):
        h = m.b2(m.b1(m.stem(x)))
        return h, m(x)

    feats, out = jax.jit(lambda: run(model))()
    feats_p, out_p = jax.jit(lambda: run(inference))()
    np.testing.assert_array_equal(feats_p, feats)
    np.testing.assert_allclose(out_p, out, rtol=1e-6, atol=1e-5)


def test_from_conv_rejects_non_binary_layers():
    layer = jaxconv.nnx.Conv(4, 4, (3, 3), op="max_plus", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a binary XNOR layer"):
        pk.PackedConv.from_conv(layer)
