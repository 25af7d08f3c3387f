"""conv_general_dilated / dot_general against lax and the numpy loop reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from reference import NUMPY_OPS, conv_reference, dot_general_reference, forum_unfold_recipe

import jaxconv
from jaxconv import ops

# A covering set of configurations: every value of every axis appears, and the pairs that
# interact (padding x lhs_dilation, groups x layout, stride x rhs_dilation) are combined.
# (dims, layout, padding, strides, lhs_dilation, rhs_dilation, groups)
CONFIGS = [
    (1, ("NWC", "WIO", "NWC"), "SAME", (1,), None, None, 1),
    (1, None, "VALID", (2,), None, (2,), 2),
    (1, ("NCW", "OIW", "NWC"), ((2, -1),), (1,), (2,), None, 1),
    (2, ("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, None, 1),
    (2, None, "SAME_LOWER", (2, 1), None, (1, 2), 2),
    (2, ("NHWC", "HWIO", "NHWC"), "VALID", (1, 2), None, (2, 1), "depthwise"),
    (2, ("NCHW", "OIHW", "NHWC"), ((1, 0), (2, 1)), (2, 2), (2, 1), None, 1),
    (2, ("HNWC", "OWHI", "CWHN"), "SAME", (1, 1), None, (2, 2), 1),
    (3, ("NDHWC", "DHWIO", "NDHWC"), "SAME", (1, 2, 1), None, None, 1),
    (3, None, ((0, 1), (1, 0), (1, 1)), (1, 1, 1), (1, 2, 1), (1, 1, 2), 2),
]


def _shapes(dims, layout, groups, rng):
    n, c, o = 2, 4, 4
    spatial = {1: (7,), 2: (6, 5), 3: (4, 5, 4)}[dims]
    window = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}[dims]
    if groups == "depthwise":
        groups, o = c, 2 * c
    ci = c // groups
    if layout is None:
        lhs_shape = (n, c, *spatial)
        rhs_shape = (o, ci, *window)
    else:
        ls, rs, _ = layout
        sp = [ch for ch in rs if ch not in "OI"]  # spatial order follows the rhs spec
        lhs_dims = {"N": n, "C": c, **dict(zip(sp, spatial, strict=True))}
        rhs_dims = {"O": o, "I": ci, **dict(zip(sp, window, strict=True))}
        lhs_shape = tuple(lhs_dims[ch] for ch in ls)
        rhs_shape = tuple(rhs_dims[ch] for ch in rs)
    x = rng.standard_normal(lhs_shape).astype(np.float32)
    w = rng.standard_normal(rhs_shape).astype(np.float32)
    return x, w, groups


def _run(cfg, op, rng):
    dims, layout, padding, strides, lhs_dil, rhs_dil, groups = cfg
    x, w, g = _shapes(dims, layout, groups, rng)
    kwargs = dict(lhs_dilation=lhs_dil, rhs_dilation=rhs_dil, dimension_numbers=layout,
                  feature_group_count=g)
    return x, w, strides, padding, kwargs


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_standard_and_user_multiply_equal_lax(cfg):
    rng = np.random.default_rng(0)
    x, w, strides, padding, kw = _run(cfg, ops.standard, rng)
    expect = lax.conv_general_dilated(x, w, strides, padding, **kw)
    std = jaxconv.conv_general_dilated(x, w, strides, padding, **kw)
    np.testing.assert_array_equal(std, expect)  # standard runs lax itself
    mymult = jaxconv.Op(jnp.multiply, "sum", name="mymult")
    got = jaxconv.conv_general_dilated(x, w, strides, padding, **kw, op=mymult)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


OP_NAMES = ["xnor", "adder", "l1", "l2", "max_plus", "min_plus", "max_min", "min_max", "log"]


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_builtin_ops_against_loop_reference(name, cfg):
    rng = np.random.default_rng(1)
    x, w, strides, padding, kw = _run(cfg, None, rng)
    got = jaxconv.conv_general_dilated(x, w, strides, padding, **kw, op=name)
    ref = NUMPY_OPS[name]
    expect = conv_reference(x, w, strides, padding, **kw, combine=ref.combine,
                            reduce=ref.reduce, identity=ref.identity, pad_value=ref.pad_value)
    assert got.shape == expect.shape
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-5)


def test_user_mymult_myadd_against_reference():
    """The forum question: a plain-Python mymult / myadd pair."""
    def mymult(a, b):
        return jnp.tanh(a) * b + 0.5 * a

    def myadd(a, b):
        return jnp.where(a > b, a, b)  # a max written by hand

    op = jaxconv.Op(mymult, myadd, identity=-np.inf, name="mine")
    rng = np.random.default_rng(2)
    for cfg in CONFIGS[:6]:
        x, w, strides, padding, kw = _run(cfg, op, rng)
        got = jax.jit(lambda a, b, s=strides, p=padding, kw=kw: jaxconv.conv_general_dilated(
            a, b, s, p, **kw, op=op))(x, w)
        expect = conv_reference(x, w, strides, padding, **kw,
                                combine=lambda a, b: np.tanh(a) * b + 0.5 * a,
                                reduce=max, identity=-np.inf)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_custom_pad_value_goes_through_combine():
    op = jaxconv.ops.max_plus.replace(pad_value=0.0, name="max_plus_zero_pad")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32) - 5.0  # all below the pad value
    w = rng.standard_normal((3, 3, 2)).astype(np.float32)
    dn = ("NWC", "WIO", "NWC")
    got = jaxconv.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=dn, op=op)
    expect = conv_reference(x, w, (1,), "SAME", dimension_numbers=dn, combine=np.add,
                            reduce=max, identity=-np.inf, pad_value=0.0)
    np.testing.assert_allclose(got, expect, rtol=1e-6)


DOT_CASES = [
    ((5, 4), (4, 3), (((1,), (0,)), ((), ()))),
    ((3, 5, 4), (3, 4, 6), (((2,), (1,)), ((0,), (0,)))),
    ((4, 2, 5), (6, 4, 2), (((0, 1), (1, 2)), ((), ()))),
    ((5, 3, 4), (4, 6, 3), (((2,), (0,)), ((1,), (2,)))),
]


@pytest.mark.parametrize("case", DOT_CASES, ids=[f"d{i}" for i in range(len(DOT_CASES))])
@pytest.mark.parametrize("name", ["standard", *OP_NAMES])
def test_dot_general(case, name):
    ls, rs, dn = case
    rng = np.random.default_rng(4)
    a = rng.standard_normal(ls).astype(np.float32)
    b = rng.standard_normal(rs).astype(np.float32)
    got = jaxconv.dot_general(a, b, dn, op=name)
    ref = NUMPY_OPS[name]
    expect = dot_general_reference(a, b, dn, combine=ref.combine, reduce=ref.reduce,
                                   identity=ref.identity)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-5)
    if name == "standard":
        np.testing.assert_array_equal(got, lax.dot_general(a, b, dn))


def test_user_multiply_dot_equals_lax():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 7, 5)).astype(np.float32)
    b = rng.standard_normal((3, 5, 2)).astype(np.float32)
    dn = (((2,), (1,)), ((0,), (0,)))
    op = jaxconv.Op(jnp.multiply, "sum", name="mul")
    np.testing.assert_allclose(jaxconv.dot_general(a, b, dn, op=op), lax.dot_general(a, b, dn),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["standard", "adder"])
def test_forum_unfold_recipe_matches(name):
    """What forum users wrote (unfold + broadcast + sum, zero padding) equals jaxconv."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    ref = NUMPY_OPS[name]
    expect = forum_unfold_recipe(x, w, 1, 1, ref.combine, np.sum)
    got = jaxconv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), op=name)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-4)


def test_ops_lookup_and_hashable():
    assert jaxconv.ops.get("max_plus") is jaxconv.ops.max_plus
    assert hash(jaxconv.ops.adder) == hash(jaxconv.ops.get("adder"))
    assert jaxconv.ops.adder.pad_value == 0.0 and jaxconv.ops.l1.pad_value is None
    with pytest.raises(ValueError, match="unknown op"):
        jaxconv.ops.get("nope")
    f = jax.jit(jaxconv.conv_general_dilated, static_argnames=("window_strides", "padding",
                                                              "dimension_numbers", "op"))
    x = jnp.ones((1, 4, 1))
    w = jnp.ones((2, 1, 1))
    y = f(x, w, window_strides=(1,), padding="VALID", dimension_numbers=("NWC", "WIO", "NWC"),
          op=jaxconv.ops.max_plus)
    np.testing.assert_array_equal(y[0, :, 0], [2.0, 2.0, 2.0])


def test_max_plus_same_padding_uses_only_in_bounds_taps():
    x = jnp.array([-5.0, -6.0, -7.0]).reshape(1, 3, 1)
    w = jnp.zeros((3, 1, 1))
    y = jaxconv.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"),
                                     op="max_plus")
    np.testing.assert_array_equal(y[0, :, 0], [-5.0, -5.0, -6.0])  # zero padding would give 0
