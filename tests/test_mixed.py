"""conv_multi: output channels split among ops, each slice against the numpy loop reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import NUMPY_OPS, conv_reference

import jaxconv

DN = ("NHWC", "HWIO", "NHWC")


def _ref_slice(x, w, name, groups=1, **geo):
    npop = NUMPY_OPS[name]
    return conv_reference(x, w, geo.get("strides", (1, 1)), geo.get("padding", "SAME"),
                          None, geo.get("rhs_dilation"), DN, groups, combine=npop.combine,
                          reduce=npop.reduce, identity=npop.identity, pad_value=npop.pad_value)


@pytest.mark.parametrize("ops,split,groups", [
    (("max_plus", "min_plus"), (3, 3), 1),     # single pass (dual pair)
    (("min_max", "max_min"), (2, 2), 1),       # single pass (dual pair)
    (("max_plus", "min_plus"), (4, 2), 1),     # unequal: concatenation
    (("max_plus", "log", "adder"), (2, 1, 1), 1),
    (("min_plus", "max_plus"), (2, 2), 2),     # feature groups, dual pair
    (("standard", "l1"), (3, 3), 2),
])
def test_slices_match_reference(ops, split, groups):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 4 // groups, sum(split))).astype(np.float32)
    y = jaxconv.conv_multi(x, w, (1, 2), "SAME", rhs_dilation=(2, 1), dimension_numbers=DN,
                           feature_group_count=groups, ops=ops, split=split)
    og = sum(split) // groups
    cg = 4 // groups
    start = 0
    for name, n in zip(ops, split, strict=True):
        ws = w[..., start:start + n]
        if groups == 1:
            want = _ref_slice(x, ws, name, strides=(1, 2), rhs_dilation=(2, 1))
        else:
            g0, gn = start // og, n // og
            want = _ref_slice(x[..., g0 * cg:(g0 + gn) * cg], ws, name, gn, strides=(1, 2),
                              rhs_dilation=(2, 1))
        np.testing.assert_allclose(y[..., start:start + n], want, rtol=1e-5, atol=1e-5)
        start += n


def test_single_pass_gradient_equals_concatenation():
    rng = np.random.default_rng(1)
    dn = ("NWC", "WIO", "NWC")
    x = jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)

    def multi(x, w):
        return jaxconv.conv_multi(x, w, (1,), "SAME", dimension_numbers=dn,
                                  ops=("max_plus", "min_plus"), split=(2, 2))

    def cat(x, w):
        a = jaxconv.conv_general_dilated(x, w[..., :2], (1,), "SAME", dimension_numbers=dn,
                                         op="max_plus")
        b = jaxconv.conv_general_dilated(x, w[..., 2:], (1,), "SAME", dimension_numbers=dn,
                                         op="min_plus")
        return jnp.concatenate([a, b], axis=-1)

    ct = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    g1 = jax.grad(lambda x, w: jnp.sum(multi(x, w) * ct), (0, 1))(x, w)
    g2 = jax.grad(lambda x, w: jnp.sum(cat(x, w) * ct), (0, 1))(x, w)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_split():
    x = jnp.ones((1, 4, 4, 2))
    w = jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="add up"):
        jaxconv.conv_multi(x, w, (1, 1), "SAME", dimension_numbers=DN,
                           ops=("max_plus", "min_plus"), split=(2, 1))
    with pytest.raises(ValueError, match="one entry per slice"):
        jaxconv.conv_multi(x, w, (1, 1), "SAME", dimension_numbers=DN,
                           ops=("max_plus",), split=(2, 2))


def test_nnx_multi_op_conv():
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 3)), jnp.float32)
    layer = jaxconv.nnx.MultiOpConv(3, 4, (3, 3), ops=("max_plus", "min_plus"),
                                    rngs=nnx.Rngs(0))
    ref = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.kernel[...], ref.kernel[...])  # Flax's init
    want = jaxconv.conv_multi(x, layer.kernel[...], (1, 1), "SAME", dimension_numbers=DN,
                              ops=("max_plus", "min_plus"), split=(2, 2))
    want = want + layer.bias[...].reshape(1, 1, 1, -1)
    np.testing.assert_allclose(layer(x), want, rtol=1e-6)


_ERODE = jaxconv.ops.min_plus.replace(name="erosion")
_USER_MAX_MIN = jaxconv.Op(lambda x, w: jnp.minimum(x, w), "max", name="user_max_min")


@pytest.mark.parametrize("ops,ref,passes", [
    ((jaxconv.ops.max_plus, _ERODE), ("max_plus", "min_plus"), 1),  # renamed built-in
    ((_USER_MAX_MIN, "min_max"), ("max_min", "min_max"), 1),        # user op, inferred
    ((_ERODE, jaxconv.Op(lambda x, w: x + w, "max")), ("min_plus", "max_plus"), 1),
    (("max_plus", jaxconv.ops.min_plus.replace(pad_value=0.0)), ("max_plus", None), 2),
    (("max_plus", jaxconv.Op(lambda x, w: x - w, "min")), ("max_plus", None), 2),
])
def test_dual_pairs_are_recognised_by_what_ops_compute(ops, ref, passes):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)

    def multi(x, w):
        return jaxconv.conv_multi(x, w, (1, 1), "SAME", dimension_numbers=DN, ops=ops,
                                  split=(2, 2))

    jaxpr = jax.make_jaxpr(multi)(x, w)
    assert sum(e.primitive.name == "jaxconv_conv" for e in jaxpr.eqns) == passes
    y = multi(x, w)
    for j, name in enumerate(ref):
        if name is not None:
            want = _ref_slice(x, w[..., 2 * j:2 * j + 2], name)
            np.testing.assert_allclose(y[..., 2 * j:2 * j + 2], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ops,split", [
    (("max_plus", "max_plus"), (2, 2)),      # one op: one convolution
    (("max_plus", "min_plus"), (2, 2)),      # dual pair: single pass
    (("max_plus", "adder"), (2, 2)),         # concatenation
])
def test_out_sharding_on_every_path(ops, split):
    """Each way `conv_multi` computes its slices applies `out_sharding` as `conv_general_dilated`
    does: the output is placed as asked and its values are unchanged, and a `PartitionSpec`
    without a mesh is refused naming `out_sharding`."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 4, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 4, 4)), jnp.float32)
    kw = dict(dimension_numbers=DN, ops=ops, split=split)
    plain = jaxconv.conv_multi(x, w, (1, 1), "SAME", **kw)
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)), P("data"))
    y = jaxconv.conv_multi(x, w, (1, 1), "SAME", out_sharding=sharding, **kw)
    assert y.sharding.is_equivalent_to(sharding, y.ndim)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
    with pytest.raises(ValueError, match="`out_sharding`"):
        jaxconv.conv_multi(x, w, (1, 1), "SAME", out_sharding=P("data"), **kw)
