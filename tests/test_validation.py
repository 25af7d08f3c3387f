"""Bad input: every case raises ``ValueError`` / ``TypeError`` naming the argument.

Each case is a call with one thing wrong; the test checks the exception type and (with
``match=``) that the message names the argument, what was given and what is allowed. The
same calls on abstract values (``jax.eval_shape``) raise the same errors, which shows that
the checks run on shapes and Python values, before any XLA work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

DN = ("NHWC", "HWIO", "NHWC")
X = np.ones((2, 6, 6, 4), np.float32)
W = np.ones((3, 3, 4, 8), np.float32)
A = np.ones((3, 4), np.float32)
B = np.ones((4, 5), np.float32)
DOT_DN = (((1,), (0,)), ((), ()))
ONE_ELEMENT = np.full((1,), 2.0, np.float32)  # a constant of shape (1,) where a scalar belongs


def conv(x: Any = X, w: Any = W, strides: Any = (1, 1), padding: Any = "SAME",
         **kw: Any) -> Any:
    """A max-plus convolution with one argument overridden."""
    kw.setdefault("dimension_numbers", DN)
    kw.setdefault("op", "max_plus")
    return jaxconv.conv_general_dilated(x, w, strides, padding, **kw)


def dot(a: Any = A, b: Any = B, dn: Any = DOT_DN, **kw: Any) -> Any:
    """A max-plus dot_general with one argument overridden."""
    kw.setdefault("op", "max_plus")
    return jaxconv.dot_general(a, b, dn, **kw)


def user(combine: Callable, reduce: Any = "sum", **kw: Any) -> jaxconv.Op:
    return jaxconv.Op(combine, reduce, name="user", **kw)


# (id, call, exception, regex the message must match)
CASES: list[tuple[str, Callable[[], Any], type, str]] = [
    # ranks and layouts
    ("rank_mismatch", lambda: conv(w=W[0]), ValueError,
     r"`lhs` and `rhs` must have the same rank, got lhs.shape=\(2, 6, 6, 4\) and "
     r"rhs.shape=\(3, 4, 8\)"),
    ("rank_too_small", lambda: conv(np.ones(3), np.ones(3), (), "VALID",
                                    dimension_numbers=None), ValueError,
     r"`lhs` needs rank >= 2 .* got shape \(3,\)"),
    ("layout_rank", lambda: conv(dimension_numbers=("NWC", "WIO", "NWC")), ValueError,
     r"`dimension_numbers` lhs spec 'NWC' has 3 letters but the operands have rank 4"),
    ("dn_unknown_letter", lambda: conv(dimension_numbers=("NHWZ", "HWIO", "NHWC")), TypeError,
     r"invalid `dimension_numbers` .*'NHWZ'.* must contain the characters 'N' and 'C'"),
    ("dn_duplicate", lambda: conv(dimension_numbers=("NHHC", "HWIO", "NHWC")), TypeError,
     r"invalid `dimension_numbers` .*duplicate characters, got NHHC"),
    ("dn_inconsistent_spatial", lambda: conv(dimension_numbers=("NHWC", "HDIO", "NHWC")),
     TypeError, r"invalid `dimension_numbers` .*same set of spatial characters"),
    ("dn_not_strings", lambda: conv(dimension_numbers=(1, 2, 3)), TypeError,
     r"invalid `dimension_numbers` \(1, 2, 3\).*must be strings"),
    ("dn_single_string", lambda: conv(dimension_numbers="NHWC"), TypeError,
     r"`dimension_numbers` must be None, a ConvDimensionNumbers or a tuple of three strings"
     r".* got 'NHWC'"),
    ("dn_two_entries", lambda: conv(dimension_numbers=("NHWC", "HWIO")), TypeError,
     r"`dimension_numbers` must have three entries \(lhs, rhs, out\)"),
    # channels and groups
    ("channels", lambda: conv(w=np.ones((3, 3, 3, 8))), ValueError,
     r"`rhs` in-features \(3\) x `feature_group_count` \(1\) must equal the input channels "
     r"of `lhs` \(4\)"),
    ("groups_not_dividing_channels", lambda: conv(w=np.ones((3, 3, 1, 8)),
                                                  feature_group_count=3), ValueError,
     r"`feature_group_count`=3 must divide the input channels of `lhs` \(4\)"),
    ("groups_not_dividing_out", lambda: conv(w=np.ones((3, 3, 2, 7)), feature_group_count=2),
     ValueError, r"`feature_group_count`=2 must divide the output features of `rhs` \(7\)"),
    ("groups_zero", lambda: conv(feature_group_count=0), ValueError,
     r"`feature_group_count` must be a positive int, got 0"),
    ("groups_float", lambda: conv(feature_group_count=1.0), TypeError,
     r"`feature_group_count` must be a positive int, got 1.0"),
    ("batch_group_generic", lambda: conv(batch_group_count=2), ValueError,
     r"`batch_group_count`=2 is supported only for ops.standard .* op 'max_plus'"),
    ("batch_group_zero", lambda: conv(batch_group_count=0, op="standard"), ValueError,
     r"`batch_group_count` must be a positive int, got 0"),
    # strides, dilations, kernel sizes
    ("strides_length", lambda: conv(strides=(1,)), ValueError,
     r"`window_strides` must have one entry per spatial dimension \(2\), got \(1,\)"),
    ("strides_zero", lambda: conv(strides=(1, 0)), ValueError,
     r"`window_strides` entries must be >= 1, got \(1, 0\)"),
    ("strides_int", lambda: conv(strides=1), TypeError,
     r"`window_strides` must be a sequence of 2 ints .* got 1"),
    ("strides_none", lambda: conv(strides=None), TypeError, r"`window_strides` is required"),
    ("strides_float", lambda: conv(strides=(1.5, 1)), TypeError,
     r"`window_strides` entries must be ints, got \(1.5, 1\)"),
    ("rhs_dilation_length", lambda: conv(rhs_dilation=(1, 1, 1)), ValueError,
     r"`rhs_dilation` must have one entry per spatial dimension \(2\), got \(1, 1, 1\)"),
    ("rhs_dilation_zero", lambda: conv(rhs_dilation=(0, 1)), ValueError,
     r"`rhs_dilation` entries must be >= 1, got \(0, 1\)"),
    ("lhs_dilation_negative", lambda: conv(padding=((0, 0), (0, 0)), lhs_dilation=(-1, 1)),
     ValueError, r"`lhs_dilation` entries must be >= 1, got \(-1, 1\)"),
    ("kernel_size_zero", lambda: conv(w=np.ones((0, 3, 4, 8))), ValueError,
     r"`rhs` kernel spatial sizes must be >= 1, got \(0, 3\)"),
    ("kernel_size_zero_standard", lambda: conv(w=np.ones((0, 3, 4, 8)), op="standard"),
     ValueError, r"`rhs` kernel spatial sizes must be >= 1, got \(0, 3\)"),
    # padding
    ("padding_unknown_string", lambda: conv(padding="FULL"), ValueError,
     r"`padding` must be one of \('VALID', 'SAME', 'SAME_LOWER'\) or a sequence of "
     r"\(low, high\) pairs, got 'FULL'"),
    ("padding_length", lambda: conv(padding=((1, 1),)), ValueError,
     r"`padding` must have 2 \(low, high\) pairs .* got \(\(1, 1\),\)"),
    ("padding_triple", lambda: conv(padding=((1, 1, 1), (1, 1))), ValueError,
     r"`padding` must have 2 \(low, high\) pairs"),
    ("padding_int", lambda: conv(padding=1), ValueError,
     r"`padding` must be a string or a sequence of \(low, high\) pairs, got 1"),
    ("padding_float", lambda: conv(padding=((1.5, 1), (1, 1))), TypeError,
     r"`padding` pairs must hold ints"),
    ("padding_string_with_lhs_dilation", lambda: conv(lhs_dilation=(2, 2)), ValueError,
     r"`padding`='SAME' \(a string\) cannot be combined with `lhs_dilation`=\(2, 2\)"),
    ("window_larger_than_input", lambda: conv(w=np.ones((7, 3, 4, 8)), padding="VALID"),
     ValueError, r"window larger than the padded input in spatial dimension 0: dilated "
     r"window 7 > padded input 6"),
    ("window_larger_dilated", lambda: conv(padding="VALID", rhs_dilation=(3, 1)),
     ValueError, r"dilated window 7 > padded input 6"),
    ("negative_padding_too_large", lambda: conv(padding=((-7, 0), (0, 0))), ValueError,
     r"window larger than the padded input .* padding \(-7, 0\)"),
    # operands and dtypes
    ("lhs_list", lambda: conv(x=[[1.0]]), TypeError,
     r"`lhs` must be an array \(jax.Array or numpy.ndarray\), got a list"),
    ("rhs_string", lambda: conv(w="w"), TypeError, r"`rhs` must be an array, got str"),
    ("lhs_none", lambda: conv(x=None), TypeError, r"`lhs` must be an array, got NoneType"),
    ("lhs_complex", lambda: conv(x=X.astype(np.complex64)), TypeError,
     r"`lhs` has complex dtype complex64; jaxconv supports real dtypes only"),
    ("complex_standard", lambda: conv(x=X.astype(np.complex64), w=W.astype(np.complex64),
                                      op="standard"), TypeError, r"`lhs` has complex dtype"),
    ("mixed_int_float", lambda: conv(x=X.astype(np.int32)), TypeError,
     r"`lhs` \(int32\) and `rhs` \(float32\) mix integer and floating dtypes"),
    ("bool_generic", lambda: conv(x=X.astype(bool), w=W.astype(bool)), TypeError,
     r"`lhs` \(bool\) and `rhs` \(bool\) are bool; op 'max_plus' needs numeric inputs"),
    ("log_on_ints", lambda: conv(x=X.astype(np.int32), w=W.astype(np.int32), op="log"),
     TypeError, r"op 'log' reduces with logsumexp, which needs floating inputs; got lhs int32"),
    ("xnor_on_ints", lambda: conv(x=X.astype(np.int32), w=W.astype(np.int32), op="xnor"),
     TypeError, r"op 'xnor' does not accept int32 inputs.*cast `lhs` and `rhs` to a floating"),
    ("preferred_not_a_dtype", lambda: conv(preferred_element_type="foo"), TypeError,
     r"`preferred_element_type` must be None or a dtype .* got 'foo'"),
    ("preferred_complex", lambda: conv(preferred_element_type=np.complex64), TypeError,
     r"`preferred_element_type` must be a real numeric dtype, got complex64"),
    ("preferred_int_for_floats", lambda: conv(op="l1", preferred_element_type=np.int32),
     TypeError, r"`preferred_element_type`=int32 is an integer dtype but the inputs are "
     r"floating"),
    ("precision_unknown", lambda: conv(precision="nope"), ValueError,
     r"`precision` must be None, a lax.Precision.* got 'nope'"),
    ("precision_unknown_standard", lambda: conv(precision="nope", op="standard"), ValueError,
     r"`precision` must be None"),
    # op, engine, block bytes
    ("op_unknown_name", lambda: conv(op="maxplus"), ValueError,
     r"unknown op 'maxplus'; built-in ops are \[.*'max_plus'"),
    ("op_int", lambda: conv(op=3), TypeError,
     r"`op` must be a jaxconv.Op or a built-in op's name, got 3"),
    ("engine_unknown", lambda: conv(engine="gpu"), ValueError,
     r"`engine` must be one of \('auto', 'xla', 'native', 'pallas'.*got 'gpu'"),
    ("max_block_bytes_zero", lambda: conv(max_block_bytes=0), ValueError,
     r"`max_block_bytes` must be positive, got 0"),
    ("max_block_bytes_float", lambda: conv(max_block_bytes=1.5), TypeError,
     r"`max_block_bytes` must be an int or None, got 1.5"),
    ("max_block_bytes_string", lambda: conv(max_block_bytes="1M"), TypeError,
     r"`max_block_bytes` must be an int or None, got '1M'"),
    # ops whose combine / reduce are not elementwise
    ("combine_reduces", lambda: conv(op=user(lambda a, b: jnp.sum(a * b))), ValueError,
     r"op 'user': `combine` must be elementwise \(two arrays of shape \(3, 5\) in, one of "
     r"shape \(3, 5\) out\), got \(\); nothing is broadcast"),
    ("combine_returns_scalar", lambda: conv(op=user(lambda a, b: jnp.float32(1.0))),
     ValueError, r"op 'user': `combine` must be elementwise .* got \(\)"),
    ("combine_transposes", lambda: conv(op=user(lambda a, b: (a * b).T)), ValueError,
     r"`combine` must be elementwise .* got \(5, 3\)"),
    ("combine_outer", lambda: conv(op=user(lambda a, b: a[..., None] * b)), TypeError,
     r"op 'user': `combine` must be a binary elementwise function"),
    ("combine_unary", lambda: conv(op=user(lambda a: a)), TypeError,
     r"`combine` must be a binary elementwise function f\(a, b\).*positional argument"),
    ("combine_indexes_w", lambda: conv(op=user(lambda a, b: a * b[0])), ValueError,
     r"`combine` must be elementwise, written for scalars; calling it on scalars failed"),
    ("combine_broadcasts_constant", lambda: conv(op=user(lambda a, b: a * b + jnp.ones(5))),
     ValueError, r"`combine` is not elementwise: on arrays of shape \(3, 5\) it gives other "
     r"values than element by element"),
    ("combine_shape_1_constant", lambda: conv(op=user(lambda a, b: a * b * ONE_ELEMENT)),
     ValueError, r"op 'user': `combine` gives the right values, but called on two scalars it "
     r"returns shape \(1,\), not a scalar: a captured array of shape \(1,\)"),
    ("combine_flips", lambda: conv(op=user(lambda a, b: a * jnp.flip(b))), ValueError,
     r"`combine` is not elementwise"),
    ("reduce_ternary", lambda: conv(op=user(jnp.add, lambda a, b, c: a, identity=0.0)),
     TypeError, r"op 'user': `reduce` must be a binary elementwise function.*'c'"),
    ("reduce_unary", lambda: conv(op=user(jnp.add, lambda a: a, identity=0.0)), TypeError,
     r"`reduce` must be a binary elementwise function"),
    ("reduce_returns_scalar", lambda: conv(op=user(jnp.add, lambda a, b: jnp.sum(a + b),
                                                   identity=0.0)), ValueError,
     r"`reduce` must be elementwise \(two arrays of shape \(3, 5\) in, one of shape \(3, 5\) "
     r"out\), got \(\)"),
    ("reduce_returns_tuple", lambda: conv(op=user(jnp.add, lambda a, b: (a, b), identity=0.0)),
     ValueError, r"`reduce` must be elementwise .* got tuple"),
    ("reduce_broadcasts", lambda: conv(op=user(jnp.add, lambda a, b: a + jnp.max(b),
                                               identity=0.0)), ValueError,
     r"`reduce` is not elementwise"),
    ("identity_wrong", lambda: conv(op=user(jnp.add, jnp.maximum, identity=0.0)), ValueError,
     r"`identity`=0.0 is not a two-sided identity of `reduce`: reduce\(a, identity\) must equal a"),
    # dot_general
    ("dot_dn_malformed", lambda: dot(dn=((1,), (0,))), TypeError,
     r"`dimension_numbers` must be \(\(lhs_contracting, rhs_contracting\), \(lhs_batch, "
     r"rhs_batch\)\) tuples of ints, got \(\(1,\), \(0,\)\)"),
    ("dot_dn_out_of_range", lambda: dot(dn=(((2,), (0,)), ((), ()))), ValueError,
     r"`dimension_numbers` lhs_contracting dimension 2 is out of range for an operand of "
     r"rank 2"),
    ("dot_dn_negative", lambda: dot(dn=(((-1,), (0,)), ((), ()))), ValueError,
     r"lhs_contracting dimension -1 is out of range"),
    ("dot_size_mismatch", lambda: dot(b=np.ones((5, 5))), ValueError,
     r"`dimension_numbers`: contracting dimensions differ in size: lhs dim 1 has 4, rhs dim "
     r"0 has 5"),
    ("dot_batch_size_mismatch", lambda: dot(np.ones((2, 3, 4)), np.ones((3, 4, 5)),
                                            (((2,), (1,)), ((0,), (0,)))), ValueError,
     r"batch dimensions differ in size: lhs dim 0 has 2, rhs dim 0 has 3"),
    ("dot_count_mismatch", lambda: dot(dn=(((1,), (0, 1)), ((), ()))), ValueError,
     r"lhs and rhs need as many contracting and batch dimensions"),
    ("dot_dims_not_distinct", lambda: dot(np.ones((3, 4)), np.ones((3, 4)),
                                          (((0,), (0,)), ((0,), (1,)))), ValueError,
     r"the lhs contracting \(0,\) and batch \(0,\) dimensions must be distinct"),
    ("dot_complex", lambda: dot(a=A.astype(np.complex64)), TypeError,
     r"`lhs` has complex dtype complex64"),
    ("dot_mixed", lambda: dot(a=A.astype(np.int32)), TypeError,
     r"`lhs` \(int32\) and `rhs` \(float32\) mix integer and floating dtypes"),
    ("dot_engine", lambda: dot(engine="x"), ValueError, r"`engine` must be one of"),
    ("dot_max_block_bytes", lambda: dot(max_block_bytes=-1), ValueError,
     r"`max_block_bytes` must be positive, got -1"),
    ("dot_bad_combine", lambda: dot(op=user(lambda a, b: jnp.float32(1.0))), ValueError,
     r"`combine` must be elementwise"),
    ("dot_preferred", lambda: dot(preferred_element_type="foo"), TypeError,
     r"`preferred_element_type` must be None or a dtype"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(call: Callable[[], Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


# Shape-level cases again, inside ``jax.eval_shape``: the operands are abstract, so the
# errors come from shapes and Python values alone, before any XLA work.
ABSTRACT = [
    ("rank_mismatch", (2, 6, 6, 4), (3, 4, 8), {}, ValueError, r"must have the same rank"),
    ("channels", (2, 6, 6, 4), (3, 3, 3, 8), {}, ValueError, r"`rhs` in-features \(3\)"),
    ("strides_zero", (2, 6, 6, 4), (3, 3, 4, 8), {"strides": (0, 1)}, ValueError,
     r"`window_strides` entries must be >= 1"),
    ("window_too_big", (2, 6, 6, 4), (7, 3, 4, 8), {"padding": "VALID"}, ValueError,
     r"window larger than the padded input"),
    ("kernel_size_zero", (2, 6, 6, 4), (3, 0, 4, 8), {}, ValueError,
     r"kernel spatial sizes must be >= 1"),
    ("combine_indexes_w", (2, 6, 6, 4), (3, 3, 4, 8), {"op": "bad"}, ValueError,
     r"`combine` must be elementwise"),
    ("identity_wrong", (2, 6, 6, 4), (3, 3, 4, 8), {"op": "bad_identity"}, ValueError,
     r"is not a two-sided identity of `reduce`"),
]


@pytest.mark.parametrize("case", ABSTRACT, ids=[c[0] for c in ABSTRACT])
def test_bad_input_raises_on_abstract_values(case: tuple) -> None:
    _, xs, ws, kw, exc, match = case
    kw = dict(kw)
    if kw.get("op") == "bad":
        kw["op"] = user(lambda a, b: a * b[0])
    elif kw.get("op") == "bad_identity":
        kw["op"] = user(jnp.add, jnp.minimum, identity=0.0)
    sx = jax.ShapeDtypeStruct(xs, jnp.float32)
    sw = jax.ShapeDtypeStruct(ws, jnp.float32)
    with pytest.raises(exc, match=match):
        jax.eval_shape(lambda x, w: conv(x, w, **kw), sx, sw)
    with pytest.raises(exc, match=match):
        jax.jit(lambda x, w: conv(x, w, **kw)).lower(sx, sw)


def test_checks_accept_valid_edge_cases() -> None:
    """What lax allows is still allowed: int8 -> int32, string padding in any case."""
    xi = X.astype(np.int8)
    wi = W.astype(np.int8)
    y = conv(xi, wi, op="standard", preferred_element_type=np.int32)
    assert y.dtype == jnp.int32 and int(y[0, 2, 2, 0]) == 36
    y = conv(xi, wi, op="standard", preferred_element_type=np.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(conv(padding="same"), conv(padding="SAME"))
    y = conv(X.astype(np.int32), W.astype(np.int32))  # max-plus on ints: exact
    assert y.dtype == jnp.int32 and int(y[0, 0, 0, 0]) == 2
    y = dot(A.astype(np.float16), B.astype(np.float16), preferred_element_type=np.float32)
    assert y.dtype == jnp.float32
    ok = user(jnp.add, jnp.maximum, identity=-np.inf)
    assert conv(op=ok).shape == (2, 6, 6, 8)
    # The same user op checked again for another dtype is not served from a stale cache.
    with pytest.raises(TypeError, match="mix integer and floating"):
        conv(x=X.astype(np.int32), op=ok)


def test_combine_is_never_broadcast_silently() -> None:
    """A combine that ignores an argument's shape is refused, never broadcast."""
    with pytest.raises(ValueError, match="not elementwise|must be elementwise"):
        conv(op=user(lambda a, b: a + jnp.mean(b)))
    with pytest.raises(ValueError, match="must be elementwise"):
        dot(op=user(jnp.multiply, lambda a, b: jnp.maximum(a, b).sum(axis=-1, keepdims=True),
                    identity=-np.inf))


@pytest.mark.parametrize(
    "name,make",
    [
        ("combine_not_callable", lambda: jaxconv.Op(3)),
        ("reduce_callable_without_identity", lambda: jaxconv.Op(jnp.add, jnp.maximum)),
        ("reduce_unknown_string", lambda: jaxconv.Op(jnp.add, "mean")),
        ("reduce_not_callable", lambda: jaxconv.Op(jnp.add, 3)),
        ("identity_string", lambda: jaxconv.Op(jnp.add, "max", identity="a")),
        ("pad_value_bool", lambda: jaxconv.Op(jnp.add, "max", pad_value=True)),
        ("name_int", lambda: jaxconv.Op(jnp.add, "max", name=3)),
        ("post_not_callable", lambda: jaxconv.Op(jnp.add, "max", post=1)),
    ],
)
def test_bad_op_definition(name: str, make: Callable[[], Any]) -> None:
    expected = {
        "combine_not_callable": (TypeError, r"Op: `combine` must be a callable combine\(x, w\), "
                                            r"got <class 'int'>"),
        "reduce_callable_without_identity": (ValueError, r"Op: a callable `reduce` needs "
                                                         r"`identity`"),
        "reduce_unknown_string": (ValueError, r"Op: `reduce` must be one of \('sum', 'max', "
                                              r"'min', 'prod', 'logsumexp'\) or a binary "
                                              r"callable, got 'mean'"),
        "reduce_not_callable": (TypeError, r"Op: `reduce` must be a string or a binary "
                                           r"callable, got <class 'int'>"),
        "identity_string": (TypeError, r"Op: `identity` must be a Python number or None, "
                                       r"got 'a'"),
        "pad_value_bool": (TypeError, r"`identity` and `pad_value` must be numbers, not bool"),
        "name_int": (TypeError, r"Op: `name` must be a string or None, got 3"),
        "post_not_callable": (TypeError, r"Op: `post` must be callable or None"),
    }[name]
    with pytest.raises(expected[0], match=expected[1]):
        make()


# --------------------------------------------------------------------------------------------
# An empty contraction (zero input channels): the reduce's identity, for every op and both
# functions, as lax gives 0 (the identity of the standard op's sum).
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", jaxconv.ops.names())
def test_empty_contraction_is_the_identity(op: str) -> None:
    from jaxconv._src.core.algebra import identity_value

    o = jaxconv.ops.get(op)
    expect = float(identity_value(o, jnp.float32))
    x, w = np.ones((1, 4, 4, 0), np.float32), np.ones((2, 2, 0, 3), np.float32)
    y = jax.jit(lambda a, b: conv(a, b, padding="VALID", op=op))(x, w)
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(y), np.full(ref.shape, expect, np.float32))
    d = dot(np.ones((3, 0), np.float32), np.ones((0, 5), np.float32), op=op)
    np.testing.assert_array_equal(np.asarray(d), np.full((3, 5), expect, np.float32))
    g = jax.grad(lambda a: jnp.sum(jnp.where(jnp.isfinite(y := conv(a, w, padding="VALID",
                                                                    op=op)), y, 0)))(x)
    assert g.shape == x.shape


def test_empty_contraction_user_op_and_integers() -> None:
    op = user(jnp.add, jnp.maximum, identity=-np.inf)
    y = conv(np.ones((1, 3, 3, 0), np.int32), np.ones((2, 2, 0, 2), np.int32), padding="VALID",
             op=op)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y), np.iinfo(np.int32).min)


# --------------------------------------------------------------------------------------------
# Messages that point at the layout mistake.
# --------------------------------------------------------------------------------------------

LAYOUT_MISTAKES = [
    ("omitted", None, r"`dimension_numbers` was not given, so the default \('NCHW', 'OIHW', "
                      r"'NCHW'\) applies: the channels of `lhs` are axis 1"),
    ("nchw_for_nhwc", ("NCHW", "OIHW", "NCHW"), r"`dimension_numbers`=\('NCHW', 'OIHW', "
                                                 r"'NCHW'\) reads lhs as 'NCHW' .* axis 1"),
    ("typo", ("NHCW", "HWIO", "NHCW"), r"reads lhs as 'NHCW' .*the channels of `lhs` are "
                                       r"axis 2"),
]


@pytest.mark.parametrize("dn,match", [c[1:] for c in LAYOUT_MISTAKES],
                         ids=[c[0] for c in LAYOUT_MISTAKES])
@pytest.mark.parametrize("op", ["max_plus", "standard"])
def test_channel_mismatch_names_the_layout(dn: Any, match: str, op: str) -> None:
    x, w = np.ones((1, 5, 5, 8), np.float32), np.ones((3, 3, 8, 4), np.float32)
    with pytest.raises(ValueError, match=match) as info:
        conv(x, w, dimension_numbers=dn, op=op)
    assert "dimension_numbers=('NHWC', 'HWIO', 'NHWC')" in str(info.value)


@pytest.mark.parametrize("x_shape,w_shape,dn,read,found,guess", [
    ((2, 3, 8, 8), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"), 3, 1, "NCHW"),
    ((2, 5, 9), (3, 5, 4), ("NWC", "WIO", "NWC"), 2, 1, "NCW"),
    ((1, 6, 4, 5, 2), (2, 2, 2, 4, 3), ("NDHWC", "DHWIO", "NDHWC"), 4, 2, "NDCHW"),
], ids=["nchw_as_nhwc", "ncw_as_nwc", "3d"])
def test_transposed_data_with_given_layout(x_shape, w_shape, dn, read, found, guess) -> None:
    """Data whose layout does not match the `dimension_numbers` given: the message says which
    axis was read as channels and which one holds them, and does not suggest what was passed."""
    with pytest.raises(ValueError) as info:
        conv(np.ones(x_shape, np.float32), np.ones(w_shape, np.float32),
             (1,) * (len(x_shape) - 2), "SAME", dimension_numbers=dn)
    msg = str(info.value)
    assert f"`lhs` axis {read} (size {x_shape[read]}) was read as channels, but its axis " \
           f"{found} has the {w_shape[-2]} channels the kernel expects: the data's layout " \
           f"looks transposed" in msg, msg
    assert f"dimension_numbers=({guess!r}, {dn[1]!r}, {guess!r})" in msg
    assert f"dimension_numbers={dn}" not in msg


def tanh_diff(a: Any, b: Any) -> Any:
    return jnp.tanh(a - b)


def _flip(a: Any, b: Any) -> Any:
    return a * jnp.flip(b)


@pytest.mark.parametrize("op,name", [
    (jaxconv.Op(tanh_diff, "max"), "tanh_diff/max"),
    (jaxconv.Op(lambda a, b: a - b, "min"), "<lambda>/min"),
    (jaxconv.Op(functools.partial(jnp.multiply), jnp.maximum, identity=-np.inf),
     "multiply/maximum"),
    (jaxconv.Op(tanh_diff, "max", name="td"), "td"),
])
def test_unnamed_ops_are_named_from_their_functions(op: jaxconv.Op, name: str) -> None:
    """Messages and `explain` name an unnamed op by its functions, not as "op None"; the derived
    name takes no part in equality or hashing."""
    assert op.display_name == name
    assert f"op {name!r}" in str(jaxconv.explain(op))
    bad = op.replace(combine=_flip)
    with pytest.raises(ValueError, match=f"op {bad.display_name!r}: `combine` is not "):
        conv(op=bad)
    assert "None" not in bad.display_name
    twin = jaxconv.Op(op.combine, op.reduce, identity=op.identity, name=op.name)
    assert twin == op and hash(twin) == hash(op)
    assert "display_name" not in {f.name for f in dataclasses.fields(jaxconv.Op)}


def test_invalid_layout_letters() -> None:
    with pytest.raises(TypeError, match=r"invalid `dimension_numbers` .*'NHWX'.*'N' and 'C'"):
        conv(dimension_numbers=("NHWX", "HWIO", "NHWC"))


@pytest.mark.parametrize("padding", ["SAME_LOWER", "FULL"])
def test_conv_transpose_padding_names_no_lhs_dilation(padding: str) -> None:
    with pytest.raises(ValueError, match=r"`padding` of conv_transpose must be 'SAME', 'VALID'"
                       ) as info:
        jaxconv.conv_transpose(np.ones((1, 4, 4, 2)), np.ones((3, 3, 2, 4)), (2, 2), padding,
                               dimension_numbers=DN, op="max_plus")
    assert "lhs_dilation" not in str(info.value)


# --------------------------------------------------------------------------------------------
# A callable reduce is probed: two-sided identity, commutativity, associativity.
# --------------------------------------------------------------------------------------------

def _left_projection(a: Any, b: Any) -> Any:
    """0 is a two-sided identity and the operation is associative, but not commutative."""
    return jnp.where(a == 0, b, a)


BAD_REDUCES = [
    ("first_tap", lambda a, b: a, 0.0, r"not a two-sided identity of `reduce`: "
                                       r"reduce\(identity, a\) must equal a"),
    ("right_only", lambda a, b: b, 0.0, r"reduce\(a, identity\) must equal a"),
    ("not_associative", lambda a, b: a + b + a**2 * b**2, 0.0, r"`reduce` is not associative"),
    ("not_commutative", _left_projection, 0.0, r"`reduce` is not commutative"),
]


@pytest.mark.parametrize("reduce,identity,match", [c[1:] for c in BAD_REDUCES],
                         ids=[c[0] for c in BAD_REDUCES])
@pytest.mark.parametrize("fn", ["conv", "dot"])
def test_bad_reduce_is_refused(reduce: Any, identity: float, match: str, fn: str) -> None:
    op = jaxconv.Op(jnp.multiply, reduce, identity=identity, name=f"bad_{fn}")
    with pytest.raises(ValueError, match=match):
        conv(op=op) if fn == "conv" else dot(op=op)


def test_good_reduces_are_accepted() -> None:
    for reduce, identity in ((jnp.maximum, -np.inf), (jnp.add, 0.0), (jnp.logaddexp, -np.inf)):
        op = jaxconv.Op(jnp.add, reduce, identity=identity, name="good")
        assert conv(op=op).shape == (2, 6, 6, 8)
    iop = jaxconv.Op(jnp.add, jnp.minimum, identity=np.inf, name="int_min")
    assert conv(X.astype(np.int32), W.astype(np.int32), op=iop).dtype == jnp.int32


_FIRST_USE_UNDER_TRANSFORM = """
import jax, jax.numpy as jnp, jaxconv
dn = ("NWC", "WIO", "NWC")
f = lambda a: jaxconv.conv_general_dilated(a, jnp.ones((2, 2, 3)), (1,), "SAME",
                                           dimension_numbers=dn, op={op})
print(jax.vmap(f)(jnp.ones((3, 1, 4, 2))).shape)
print(jax.jit(jax.vmap(jax.grad(lambda a: f(a).sum())))(jnp.ones((3, 1, 4, 2))).shape)
"""


@pytest.mark.parametrize("op", ['"adder"', 'jaxconv.Op(jnp.add, jnp.maximum, identity=-jnp.inf)'])
def test_first_use_of_an_op_under_vmap(op: str) -> None:
    """The op probes run on concrete values even when the first call is inside vmap."""
    import os
    import pathlib
    import subprocess
    import sys

    root = str(pathlib.Path(jaxconv.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _FIRST_USE_UNDER_TRANSFORM.format(op=op)],
                         capture_output=True, text=True, timeout=300, check=False, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["(3,", "1,", "4,", "3)", "(3,", "1,", "4,", "2)"]
