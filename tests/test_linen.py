"""jaxconv.linen.Conv / Dense against flax.linen and the plain-loop reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from reference import NUMPY_OPS, conv_reference

import jaxconv
from jaxconv import linen as jln

MUL = jaxconv.Op(jnp.multiply, "sum", name="generic_mul")


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


_CASES = [
    (dict(kernel_size=(3, 3), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2),
          feature_group_count=2), (2, 7, 8, 4)),
    (dict(kernel_size=(3, 2), padding="CIRCULAR"), (2, 5, 6, 4)),
    (dict(kernel_size=(3, 3), padding="REFLECT", strides=2), (5, 6, 4)),
    (dict(kernel_size=3, padding="CAUSAL", kernel_dilation=2), (2, 3, 9, 4)),
    (dict(kernel_size=(2, 2), padding=[(1, 0), 2], input_dilation=(1, 2)), (1, 4, 4, 4)),
]


@pytest.mark.parametrize("kw, shape, op", [
    *[(kw, shape, None) for kw, shape in _CASES],
    *[(kw, shape, MUL) for kw, shape in _CASES[::2]],
])
def test_conv_equals_flax(kw, shape, op):
    ref = nn.Conv(features=6, **kw)
    mine = jln.Conv(features=6, **kw, **({"op": op} if op is not None else {}))
    x = _x(shape)
    v_ref = ref.init(jax.random.key(0), x)
    v_mine = mine.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, v_ref, v_mine)  # same names, shapes, values
    _close(ref.apply(v_ref, x), mine.apply(v_ref, x))


def test_dense_equals_flax_and_max_plus_reference():
    x = _x((2, 3, 5))
    v = nn.Dense(4).init(jax.random.key(0), x)
    v2 = jln.Dense(4).init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, v, v2)
    _close(nn.Dense(4).apply(v, x), jln.Dense(4).apply(v, x))
    _close(nn.Dense(4).apply(v, x), jln.Dense(4, op=MUL).apply(v, x))
    got = jln.Dense(4, op="max_plus").apply(v, x)
    k, b = np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
    _close(got, (np.asarray(x)[..., :, None] + k).max(axis=-2) + b, tol=1e-6)


def test_mask_and_padding_with_max_plus_against_reference():
    mask = np.random.RandomState(0).rand(3, 2, 3) > 0.3
    layer = jln.Conv(3, 3, padding="CAUSAL", mask=jnp.asarray(mask), use_bias=False,
                     op="max_plus")
    x = _x((2, 6, 2))
    v = layer.init(jax.random.key(0), x)
    w = np.asarray(v["params"]["kernel"], np.float64)
    ref = NUMPY_OPS["max_plus"]
    # Independent route for max-plus: an absent tap is a weight of -inf.
    want = conv_reference(np.asarray(x), np.where(mask, w, -np.inf), (1,), [(2, 0)],
                          dimension_numbers=("NWC", "WIO", "NWC"), combine=ref.combine,
                          reduce=ref.reduce, identity=ref.identity)
    _close(layer.apply(v, x), want)


def test_quantizers_and_hooks():
    x = _x((2, 5, 5, 3))
    q = jln.Conv(4, (3, 3), input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                 use_bias=False)
    v = q.init(jax.random.key(0), x)
    _close(q.apply(v, x), jln.Conv(4, (3, 3), op="xnor", use_bias=False).apply(v, x))
    hook = functools.partial(jaxconv.conv_general_dilated, op="min_plus")
    a = jln.Conv(4, (3, 3), conv_general_dilated=hook)
    _close(a.apply(v | {"params": {**v["params"], "bias": jnp.zeros(4)}}, x),
           jln.Conv(4, (3, 3), op="min_plus").apply(
               {"params": {**v["params"], "bias": jnp.zeros(4)}}, x))
    with pytest.raises(ValueError, match="not both"):
        jln.Dense(2, op="adder", dot_general=jax.lax.dot_general).init(jax.random.key(0), x)
    g = jax.grad(lambda p: q.apply({"params": p}, x).sum())(v["params"])
    assert np.isfinite(np.asarray(g["kernel"])).all()


@pytest.mark.parametrize("kernel_size", [(3, 0), 0, (2, -1)])
@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
def test_kernel_size_must_be_positive(kernel_size, layer):
    module = getattr(jln, layer)(4, kernel_size)
    with pytest.raises(ValueError, match=r"`kernel_size` entries must be positive ints"):
        module.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))


def test_unknown_padding_lists_every_accepted_value():
    module = jln.Conv(4, (3, 3), padding="CIRCULR")
    with pytest.raises(ValueError, match=r"`padding` must be one of \('VALID', 'SAME', "
                       r"'SAME_LOWER', 'CIRCULAR', 'REFLECT', 'CAUSAL'\).*got 'CIRCULR'"):
        module.init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
