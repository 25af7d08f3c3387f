"""jaxconv.nnx.Conv / Linear against flax.nnx and the plain-loop reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import NUMPY_OPS, conv_reference

import jaxconv
from jaxconv import checkpoint
from jaxconv import nnx as jnn

MUL = jaxconv.Op(jnp.multiply, "sum", name="generic_mul")  # generic engine, same numbers


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _pair(kw, op=None, **extra):
    ref = nnx.Conv(**kw, rngs=nnx.Rngs(0))
    mine = jnn.Conv(**kw, rngs=nnx.Rngs(0), **({"op": op} if op is not None else {}), **extra)
    return ref, mine


def test_init_equals_flax():
    ref, mine = _pair(dict(in_features=4, out_features=6, kernel_size=(3, 2),
                           feature_group_count=2))
    assert mine.kernel.shape == (3, 2, 2, 6)
    np.testing.assert_array_equal(ref.kernel[...], mine.kernel[...])
    np.testing.assert_array_equal(ref.bias[...], mine.bias[...])
    a, b = nnx.Linear(5, 3, rngs=nnx.Rngs(2)), jnn.Linear(5, 3, rngs=nnx.Rngs(2))
    np.testing.assert_array_equal(a.kernel[...], b.kernel[...])
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(a))) == jax.tree.map(
        jnp.shape, nnx.to_pure_dict(nnx.state(b)))
    nb = jnn.Conv(3, 4, 3, use_bias=False, rngs=nnx.Rngs(0))
    assert nb.bias is None and nb.kernel.shape == (3, 3, 4)


@pytest.mark.parametrize("padding, op", [
    *[(p, None) for p in ["SAME", "VALID", "CIRCULAR", "REFLECT", 1, [(1, 2), 0],
                          "SAME_LOWER"]],
    *[(p, MUL) for p in ["SAME", "CIRCULAR", [(1, 2), 0]]],
])
def test_conv_equals_flax_2d(padding, op):
    kw = dict(in_features=4, out_features=6, kernel_size=(3, 3), strides=(2, 1),
              padding=padding, kernel_dilation=(1, 2), feature_group_count=2)
    if padding == "SAME_LOWER":
        kw["input_dilation"] = 1
    ref, mine = _pair(kw, op)
    x = _x((2, 7, 8, 4))
    _close(ref(x), mine(x))


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_batch_dims_and_int_kernel(batch):
    # int kernel_size is a 1-D kernel (as Flax): (*batch, W, C) inputs.
    ref, mine = _pair(dict(in_features=3, out_features=5, kernel_size=3, strides=2,
                           padding="CIRCULAR"))
    x = _x(batch + (9, 3))
    _close(ref(x), mine(x))
    assert mine(x).shape == batch + (5, 5)


@pytest.mark.parametrize("op", [None, MUL])
def test_causal_equals_flax(op):
    ref, mine = _pair(dict(in_features=3, out_features=4, kernel_size=3, padding="CAUSAL",
                           kernel_dilation=2), op)
    x = _x((2, 10, 3))
    _close(ref(x), mine(x))
    with pytest.raises(ValueError, match="Causal padding"):
        jnn.Conv(3, 4, (3, 3), padding="CAUSAL", rngs=nnx.Rngs(0))(_x((1, 5, 5, 3)))


def test_causal_input_dilation_equals_explicit_zero_padding():
    # Flax pads the undilated input; with input dilation that is left padding by k_d*d.
    mine = jnn.Conv(2, 3, 2, padding="CAUSAL", input_dilation=2, rngs=nnx.Rngs(0))
    x = _x((1, 5, 2))
    xp = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))
    want = jax.lax.conv_general_dilated(xp, mine.kernel[...], (1,), [(0, 0)], (2,),
                                        dimension_numbers=("NWC", "WIO", "NWC"))
    _close(mine(x), want + mine.bias[...].reshape(1, 1, -1))


@pytest.mark.parametrize("op", [None, MUL])
def test_mask_standard_semantics_equal_flax(op):
    mask = (jax.random.uniform(jax.random.key(3), (3, 2, 6)) > 0.4).astype(jnp.float32)
    ref, mine = _pair(dict(in_features=4, out_features=6, kernel_size=3,
                           feature_group_count=2, mask=mask), op)
    x = _x((2, 9, 4))
    _close(ref(x), mine(x))
    with pytest.raises(ValueError, match="Mask needs to have the same shape"):
        jnn.Conv(4, 6, 3, mask=jnp.ones((3, 3, 6)), rngs=nnx.Rngs(0))


def _masked_reference(x, w, mask, pad_lo, pad_hi, op_name):
    """Plain loops, 1-D NWC, stride 1: absent taps are skipped."""
    ref = NUMPY_OPS[op_name]
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, length, _ = x.shape
    k, ci_n, co_n = w.shape
    out_len = length + pad_lo + pad_hi - k + 1
    out = np.empty((n, out_len, co_n))
    for b in range(n):
        for o in range(out_len):
            for co in range(co_n):
                acc = ref.identity
                for t in range(k):
                    pos = o + t - pad_lo
                    for ci in range(ci_n):
                        if not mask[t, ci, co]:
                            continue
                        if 0 <= pos < length:
                            xv = x[b, pos, ci]
                        elif ref.pad_value is None:
                            continue
                        else:
                            xv = ref.pad_value
                        acc = ref.reduce(acc, ref.combine(xv, w[t, ci, co]))
                out[b, o, co] = acc
    return out


@pytest.mark.parametrize("op_name", ["max_plus", "adder", "xnor", "log"])
def test_mask_skips_taps(op_name):
    rng = np.random.RandomState(0)
    mask = rng.rand(3, 3, 4) > 0.3
    mask[:, :, 0] = False  # a channel with no taps at all: the identity
    mask[1, 0, 1] = True
    layer = jnn.Conv(3, 4, 3, padding="CAUSAL", mask=jnp.asarray(mask), use_bias=False,
                     op=op_name, rngs=nnx.Rngs(0))
    x = _x((2, 6, 3))
    want = _masked_reference(x, layer.kernel[...], mask, 2, 0, op_name)
    got = np.asarray(layer(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mask_gradients_finite_and_zero_on_absent_taps():
    mask = np.ones((3, 2, 3), bool)
    mask[0] = False
    layer = jnn.Conv(2, 3, 3, mask=jnp.asarray(mask), op="max_plus", rngs=nnx.Rngs(0))
    x = _x((2, 7, 2))

    @nnx.jit
    def grads(m, x):
        return nnx.grad(lambda m: m(x).sum())(m)

    g = grads(layer, x)
    gk = np.asarray(g.kernel[...])
    assert np.isfinite(gk).all()
    assert (gk[0] == 0).all() and np.abs(gk[1:]).sum() > 0
    # NaN in, NaN out: a NaN weight on a present tap poisons its output channel.
    layer.kernel[...] = layer.kernel[...].at[1, 0, 2].set(jnp.nan)
    y = np.asarray(layer(x))
    assert np.isnan(y[..., 2]).all() and np.isfinite(y[..., :2]).all()
    layer.kernel[...] = layer.kernel[...].at[1, 0, 2].set(0.0).at[0, 0, 1].set(jnp.nan)
    assert np.isfinite(np.asarray(layer(x))).all()  # NaN on an absent tap is ignored


@pytest.mark.parametrize("padding, op_name", [
    *[(p, "max_plus") for p in ["SAME", "CIRCULAR", "REFLECT", "CAUSAL"]],
    ("SAME", "adder"), ("CAUSAL", "adder"),  # adder pads with 0 through combine
])
def test_padding_modes_against_reference(padding, op_name):
    layer = jnn.Conv(2, 3, 3, padding=padding, use_bias=False, op=op_name,
                     rngs=nnx.Rngs(0))
    x = _x((2, 7, 2))
    ref = NUMPY_OPS[op_name]
    xn = np.asarray(x, np.float64)
    if padding in ("CIRCULAR", "REFLECT"):  # real values, then VALID
        xn = np.pad(xn, ((0, 0), (1, 1), (0, 0)),
                    mode="wrap" if padding == "CIRCULAR" else "reflect")
        pads = [(0, 0)]
    else:
        pads = [(1, 1)] if padding == "SAME" else [(2, 0)]
    want = conv_reference(xn, np.asarray(layer.kernel[...]), (1,), pads,
                          dimension_numbers=("NWC", "WIO", "NWC"), combine=ref.combine,
                          reduce=ref.reduce, identity=ref.identity, pad_value=ref.pad_value)
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)


def test_flax_hooks_with_partial():
    op = jaxconv.ops.max_plus
    hook = functools.partial(jaxconv.conv_general_dilated, op=op)
    a = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", conv_general_dilated=hook,
                 rngs=nnx.Rngs(0))
    b = jnn.Conv(3, 4, (3, 3), strides=2, padding="SAME", op=op, rngs=nnx.Rngs(0))
    x = _x((2, 6, 5, 3))
    _close(a(x), b(x))
    dhook = functools.partial(jaxconv.dot_general, op=op)
    la = nnx.Linear(5, 3, dot_general=dhook, rngs=nnx.Rngs(0))  # nnx passes out_sharding=
    lb = jnn.Linear(5, 3, op=op, rngs=nnx.Rngs(0))
    xx = _x((2, 4, 5))
    _close(la(xx), lb(xx))
    # A hook on jaxconv's own layer is called instead of jaxconv, as in Flax.
    c = jnn.Conv(3, 4, (3, 3), strides=2, conv_general_dilated=hook, rngs=nnx.Rngs(0))
    _close(c(x), b(x))
    with pytest.raises(ValueError, match="not both"):
        jnn.Conv(3, 4, 3, op="adder", conv_general_dilated=hook, rngs=nnx.Rngs(0))


def test_linear_equals_flax_and_reference():
    a, b = nnx.Linear(5, 3, rngs=nnx.Rngs(0)), jnn.Linear(5, 3, rngs=nnx.Rngs(0))
    x = _x((2, 4, 5))
    _close(a(x), b(x))
    c = jnn.Linear(5, 3, op=MUL, use_bias=False, rngs=nnx.Rngs(0))
    _close(c(x), x @ c.kernel[...])
    m = jnn.Linear(5, 3, op="max_plus", rngs=nnx.Rngs(0))
    xn, kn = np.asarray(x), np.asarray(m.kernel[...])
    want = (xn[..., :, None] + kn).max(axis=-2) + np.asarray(m.bias[...])
    np.testing.assert_allclose(np.asarray(m(x)), want, rtol=1e-6)


def test_dtype_and_preferred_element_type():
    a = nnx.Conv(3, 4, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    b = jnn.Conv(3, 4, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = _x((1, 5, 5, 3))
    assert b(x).dtype == jnp.bfloat16
    _close(a(x).astype(jnp.float32), b(x).astype(jnp.float32), tol=1e-2)
    c = jnn.Linear(3, 2, dtype=jnp.bfloat16, preferred_element_type=jnp.float32,
                   rngs=nnx.Rngs(0))
    assert c(_x((2, 3))).dtype == jnp.float32


def test_quantizers_equal_xnor_op_and_train():
    q = jnn.Conv(3, 4, (3, 3), input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                 use_bias=False, rngs=nnx.Rngs(0))
    xn = jnn.Conv(3, 4, (3, 3), op="xnor", use_bias=False, rngs=nnx.Rngs(0))
    x = _x((2, 5, 5, 3))
    _close(q(x), xn(x))
    gq = nnx.grad(lambda m: (m(x) ** 2).sum())(q)
    gx = nnx.grad(lambda m: (m(x) ** 2).sum())(xn)
    _close(gq.kernel[...], gx.kernel[...])
    lin = jnn.Linear(3, 2, kernel_quantizer="ste_sign", rngs=nnx.Rngs(0))
    want = x[0, 0, 0] @ jaxconv.quantizers.sign(lin.kernel[...]) + lin.bias[...]
    _close(lin(x[0, 0, 0]), want)
    with pytest.raises(ValueError, match="unknown quantizer"):
        jnn.Conv(3, 4, 3, kernel_quantizer="nope", rngs=nnx.Rngs(0))


def test_checkpoint_roundtrip(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = jnn.Conv(1, 4, (3, 3), op="xnor", use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = jnn.Linear(4, 3, op="l2", rngs=rngs)

        def __call__(self, x):
            return self.head(self.bn(self.conv(x)).mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    x = _x((2, 6, 6, 1))
    model(x)  # update batch statistics
    model.eval()
    want = model(x)
    checkpoint.save(tmp_path / "ckpt", model)
    for target in (Net(nnx.Rngs(5)), nnx.eval_shape(lambda: Net(nnx.Rngs(5)))):
        restored = checkpoint.restore(tmp_path / "ckpt", target)
        restored.eval()
        _close(restored(x), want, tol=0)
        np.testing.assert_array_equal(restored.bn.mean[...], model.bn.mean[...])


@pytest.mark.parametrize("kernel_size", [(3, 0), (0,), 0, -2, (2, -1)])
@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
def test_kernel_size_must_be_positive(kernel_size, layer):
    with pytest.raises(ValueError, match=r"`kernel_size` entries must be positive ints"):
        getattr(jnn, layer)(3, 4, kernel_size=kernel_size, rngs=nnx.Rngs(0))


def test_summary_counts_binary_parameters_and_packed_memory():
    from jaxconv import packed

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = jnn.Conv(3, 16, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.binary = jnn.Conv(16, 40, (3, 3), kernel_quantizer="ste_sign",
                                   input_quantizer="ste_sign", use_bias=False, rngs=rngs)
            self.adder = jnn.Conv(40, 8, (1, 1), op="adder", rngs=rngs)
            self.head = jnn.Linear(8, 10, op="xnor", rngs=rngs)

    model = Net(nnx.Rngs(0))
    rows = {line.split()[0]: line.split() for line in jnn.summary(model).splitlines()[1:]}
    assert rows["binary"][1:5] == ["Conv", "standard", "ste_sign", "ste_sign"]
    assert rows["binary"][5:7] == [str(3 * 3 * 16 * 40)] * 2
    # float32 latent weights vs one bit per weight, 32 in-features per uint32 word
    assert float(rows["binary"][7]) == pytest.approx(3 * 3 * 16 * 40 * 4 / 1024, abs=0.05)
    assert float(rows["binary"][8]) == pytest.approx(3 * 3 * 1 * 4 * 40 / 1024, abs=0.05)
    assert rows["adder"][2] == "adder" and rows["adder"][6] == "0"
    assert rows["head"][2] == "xnor" and rows["head"][6] == str(8 * 10)
    assert rows["bn"][1] == "BatchNorm" and rows["bn"][5] == str(2 * 16 + 2 * 16)
    total = rows["total"]
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert int(total[1]) == n_params and int(total[2]) == 3 * 3 * 16 * 40 + 80
    # A packed model: the same binary count, the same packed memory.
    prows = {line.split()[0]: line.split()
             for line in jnn.summary(packed.pack_model(model)).splitlines()[1:]}
    assert prows["binary"][1] == "PackedConv" and prows["binary"][6] == rows["binary"][6]
    assert prows["binary"][-1] == rows["binary"][-1]
    with pytest.raises(TypeError, match="`model` must be an nnx.Module"):
        jnn.summary({"kernel": 1})


@pytest.mark.parametrize("make,x_shape,match", [
    (lambda: jnn.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0)), (1, 8, 8, 3),
     r"Conv: `in_features`=4, but the input has 3 channels \(its last axis; input shape "
     r"\(1, 8, 8, 3\)\); build it with in_features=3\.$"),
    (lambda: jnn.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0)), (2, 4, 8, 3),
     r"input has 3 channels .* if the data is channels-first, move its channels last "
     r"\(`jnp.moveaxis\(x, 1, -1\)`\)"),
    (lambda: jnn.Linear(4, 8, rngs=nnx.Rngs(0)), (2, 5),
     r"Linear: `in_features`=4, but the input has 5 features \(its last axis; input shape "
     r"\(2, 5\)\); build it with in_features=5\.$"),
    (lambda: jnn.ConvTranspose(4, 8, (3,), rngs=nnx.Rngs(0)), (2, 6, 3),
     r"ConvTranspose: `in_features`=4, but the input has 3 channels"),
    (lambda: jnn.MultiOpConv(4, 8, (3,), ops=("max_plus", "min_plus"), rngs=nnx.Rngs(0)),
     (2, 6, 5), r"MultiOpConv: `in_features`=4, but the input has 5 channels"),
], ids=["conv", "conv_channels_first", "linear", "conv_transpose", "multi_op"])
def test_in_features_mismatch_speaks_flax_terms(make, x_shape, match):
    """The wrong number of input features is reported as Flax users think of it: the layer's
    `in_features` against the input's last axis, not as a raw lax layout."""
    with pytest.raises(ValueError, match=match) as info:
        make()(jnp.ones(x_shape))
    assert "ConvDimensionNumbers" not in str(info.value) and "rhs" not in str(info.value)


@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
def test_unknown_padding_lists_every_accepted_value(layer):
    accepted = {"Conv": "'VALID', 'SAME', 'SAME_LOWER', 'CIRCULAR', 'REFLECT', 'CAUSAL'",
                "ConvTranspose": "'VALID', 'SAME', 'CIRCULAR'"}[layer]
    module = getattr(jnn, layer)(3, 4, (3,), padding="CIRCULR", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`padding` must be one of \(" + accepted +
                       r"\).* \(low, high\) pairs; got 'CIRCULR'"):
        module(jnp.ones((1, 6, 3)))
