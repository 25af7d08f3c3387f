"""conv_transpose: lax.conv_transpose for the standard op, the dilated-conv reference otherwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from reference import NUMPY_OPS, conv_reference

import jaxconv


def _pads(k, s, padding):
    """lax's transposed-conv padding for one dimension (written out from its definition)."""
    if padding == "SAME":
        total = k + s - 2
        lo = k - 1 if s > k - 1 else -(-total // 2)
        return lo, total - lo
    if padding == "VALID":
        return k - 1, s - 1 + max(k - s, 0)
    return padding


# (dims, layout, strides, padding, rhs_dilation, transpose_kernel)
CONFIGS = [
    (1, ("NWC", "WIO", "NWC"), (2,), "SAME", None, False),
    (1, ("NCW", "OIW", "NWC"), (3,), "VALID", None, True),
    (2, None, (2, 2), "SAME", (1, 2), False),
    (2, ("NHWC", "HWIO", "NHWC"), (2, 1), "VALID", None, False),
    (2, ("NHWC", "HWIO", "NHWC"), (2, 3), ((1, 2), (0, 1)), None, True),
]


def _data(dims, layout, rng, tk=False):
    sp = {1: (5,), 2: (4, 3)}[dims]
    win = {1: (3,), 2: (3, 2)}[dims]
    n, c, o = 2, 3, 2
    ls, rs, _ = layout or {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[dims]
    letters = [ch for ch in rs if ch not in "OI"]
    ldims = {"N": n, "C": c, **dict(zip(letters, sp, strict=True))}
    if tk:  # transpose_kernel swaps the kernel's I and O axes
        o, c_k = c, o
    else:
        c_k = c
    rdims = {"O": o, "I": c_k, **dict(zip(letters, win, strict=True))}
    x = rng.standard_normal(tuple(ldims[ch] for ch in ls)).astype(np.float32)
    w = rng.standard_normal(tuple(rdims[ch] for ch in rs)).astype(np.float32)
    return x, w


@pytest.mark.parametrize("cfg", CONFIGS)
def test_standard_equals_lax(cfg):
    dims, layout, strides, padding, rdil, tk = cfg
    x, w = _data(dims, layout, np.random.default_rng(0), tk)
    got = jaxconv.conv_transpose(x, w, strides, padding, rdil, layout, tk)
    want = lax.conv_transpose(x, w, strides, padding, rdil, layout, tk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if cfg not in (CONFIGS[0], CONFIGS[4]):
        return
    # A user multiply-add goes through the generic engine and must agree too.
    mul = jaxconv.Op(jnp.multiply, "sum", name="mul")
    got = jaxconv.conv_transpose(x, w, strides, padding, rdil, layout, tk, op=mul)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,cfg", [("max_plus", c) for c in CONFIGS[:4]]
                         + [("log", CONFIGS[2]), ("adder", CONFIGS[1])])
def test_ops_equal_reference_of_dilated_conv(name, cfg):
    dims, layout, strides, padding, rdil, tk = cfg
    x, w = _data(dims, layout, np.random.default_rng(1), tk)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, layout or (
        {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[dims]))
    rd = rdil or (1,) * dims
    ks = [(w.shape[d] - 1) * r + 1 for d, r in zip(dn.rhs_spec[2:], rd, strict=True)]
    if isinstance(padding, str):
        pads = [_pads(k, s, padding) for k, s in zip(ks, strides, strict=True)]
    else:
        pads = list(padding)
    wk = w
    if tk:
        wk = np.flip(w, tuple(dn.rhs_spec[2:])).swapaxes(dn.rhs_spec[0], dn.rhs_spec[1])
    npop = NUMPY_OPS[name]
    want = conv_reference(x, wk, (1,) * dims, pads, strides, rd, dn, combine=npop.combine,
                          reduce=npop.reduce, identity=npop.identity, pad_value=npop.pad_value)
    got = jaxconv.conv_transpose(x, w, strides, padding, rdil, layout, tk, op=name)
    assert got.shape == lax.conv_transpose(x, w, strides, padding, rdil, layout, tk).shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_holes_are_skipped_for_max_plus_and_grad():
    x = jnp.array([1.0, 5.0, 2.0]).reshape(1, 3, 1)
    w = jnp.array([0.0, -1.0, 0.5]).reshape(3, 1, 1)
    y = jaxconv.conv_transpose(x, w, (2,), "SAME", op="max_plus")
    assert np.all(np.isfinite(y))
    g = jax.grad(lambda w: jnp.sum(jaxconv.conv_transpose(x, w, (2,), "SAME", op="max_plus")))(w)
    assert g.shape == w.shape and float(jnp.sum(g)) == y.size


@pytest.mark.parametrize("kw", [
    dict(padding="SAME", strides=2),
    dict(padding="VALID", strides=(2, 1), kernel_dilation=(1, 2)),
    dict(padding="CIRCULAR", strides=2),
    dict(padding="CIRCULAR", strides=2, transpose_kernel=True),
    dict(padding=((1, 0), (2, 1)), strides=1, use_bias=False),
])
def test_modules_equal_flax_for_standard(kw):
    from flax import linen as nn
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 4, 3)), jnp.float32)
    ours = jaxconv.nnx.ConvTranspose(3, 4, (3, 2), rngs=nnx.Rngs(0), **kw)
    theirs = nnx.ConvTranspose(3, 4, (3, 2), rngs=nnx.Rngs(0), **kw)
    np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    lk = dict(kw)
    if isinstance(lk.get("strides"), int):
        lk["strides"] = (lk["strides"],) * 2
    lo = jaxconv.linen.ConvTranspose(4, (3, 2), **lk)
    lt = nn.ConvTranspose(4, (3, 2), **lk)
    v = lt.init(jax.random.key(0), x)
    np.testing.assert_allclose(lo.apply(v, x), lt.apply(v, x), rtol=1e-5, atol=1e-5)


def test_module_max_plus_mask_and_circular():
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 2)), jnp.float32)
    mask = np.ones((3, 2, 2), np.float32)
    mask[1] = 0  # the middle tap is absent
    layer = jaxconv.nnx.ConvTranspose(2, 2, 3, strides=2, op="max_plus", mask=mask,
                                      rngs=nnx.Rngs(1))
    k = np.asarray(layer.kernel[...])
    y = layer(x)
    # The absent tap is skipped: equal to the conv of the kernel without that tap.
    k2 = np.stack([k[0], k[2]])
    want = jaxconv.conv_transpose(x, k2, (2,), ((2, 1),), rhs_dilation=(2,), op="max_plus")
    np.testing.assert_allclose(y, want + layer.bias[...].reshape(1, 1, -1), rtol=1e-6)
    # CIRCULAR wraps with the op's reduce: the output has period len * stride.
    circ = jaxconv.nnx.ConvTranspose(2, 2, 3, strides=2, padding="CIRCULAR", op="max_plus",
                                     rngs=nnx.Rngs(1))
    full = jaxconv.conv_transpose(x, circ.kernel[...], (2,), "VALID", op="max_plus")
    yc = circ(x) - circ.bias[...].reshape(1, 1, -1)
    assert yc.shape == (1, 8, 2)
    # Every output cell of the full result appears in the wrapped one as a candidate max.
    assert np.all(np.max(np.asarray(full), axis=1) <= np.max(np.asarray(yc), axis=1) + 1e-6)
