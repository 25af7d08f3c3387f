"""Validate the plain-loop numpy reference against lax and hand-computed cases.

Data are multiples of 1/8 in [-2, 2], so float32 lax results are exact and
comparisons with the float64 reference use exact equality.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from reference import (
    NUMPY_OPS,
    NUMPY_REDUCE_AXIS,
    conv_reference,
    dot_general_reference,
    forum_unfold_recipe,
    resolve_padding,
)

STD = {"combine": np.multiply, "reduce": np.add, "identity": 0.0}


def _data(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Exactly representable values: multiples of 1/8 in [-2, 2]."""
    return (rng.integers(-16, 17, size=shape) / 8.0).astype(np.float32)


def _shape(spec: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[c] for c in spec)


def _lax_conv(lhs: np.ndarray, rhs: np.ndarray, kw: dict[str, Any]) -> np.ndarray:
    out = lax.conv_general_dilated(
        jnp.asarray(lhs), jnp.asarray(rhs), precision=lax.Precision.HIGHEST, **kw
    )
    return np.asarray(out, dtype=np.float64)


def _check_against_lax(lhs: np.ndarray, rhs: np.ndarray, **kw: Any) -> np.ndarray:
    ref = conv_reference(lhs, rhs, **kw, **STD)
    expected = _lax_conv(lhs, rhs, kw)
    assert ref.shape == expected.shape, (ref.shape, expected.shape)
    assert ref.dtype == np.float64
    np.testing.assert_array_equal(ref, expected)
    return ref


def _sz(text: str) -> dict[str, int]:
    """Parse sizes like "N2 C3 O2 I3 H5 h3".

    N batch, C lhs features, O/I rhs out/in features (I = C / groups); uppercase
    spatial letters are input sizes, lowercase ones kernel sizes.
    """
    return {tok[0]: int(tok[1:]) for tok in text.split()}


NHWC = ("NHWC", "HWIO", "NHWC")
NDHWC = ("NDHWC", "DHWIO", "NDHWC")

# name, dimension_numbers (None = NC.../OI.../NC...), sizes, conv kwargs
CASES: list[tuple[str, tuple[str, str, str] | None, dict[str, int], dict[str, Any]]] = [
    # ---- 1-D
    ("1d_valid_default", None, _sz("N2 C3 O2 I3 W7 w3"),
     {"window_strides": (1,), "padding": "VALID"}),
    ("1d_same_stride2_nwc", ("NWC", "WIO", "NWC"), _sz("N1 C2 O3 I2 W8 w3"),
     {"window_strides": (2,), "padding": "SAME"}),
    ("1d_same_lower_even_rhsdil", None, _sz("N1 C2 O2 I2 W7 w2"),
     {"window_strides": (1,), "padding": "SAME_LOWER", "rhs_dilation": (2,)}),
    ("1d_explicit_neg_lhsdil", ("NWC", "WIO", "NWC"), _sz("N2 C2 O2 I2 W5 w3"),
     {"window_strides": (1,), "padding": ((2, -1),), "lhs_dilation": (2,)}),
    ("1d_groups2", ("NCW", "OIW", "NWC"), _sz("N1 C4 O4 I2 W6 w3"),
     {"window_strides": (1,), "padding": "same", "feature_group_count": 2}),
    # ---- 2-D
    ("2d_valid_default", None, _sz("N2 C3 O2 I3 H5 W6 h3 w2"),
     {"window_strides": (1, 1), "padding": "VALID"}),
    ("2d_same_nhwc_stride", NHWC, _sz("N2 C2 O3 I2 H7 W6 h3 w3"),
     {"window_strides": (2, 1), "padding": "SAME"}),
    ("2d_same_lower_even_stride", NHWC, _sz("N1 C2 O2 I2 H6 W7 h2 w4"),
     {"window_strides": (2, 2), "padding": "SAME_LOWER"}),
    ("2d_same_lowercase_odd_total", None, _sz("N1 C1 O2 I1 H5 W4 h4 w2"),
     {"window_strides": (1, 3), "padding": "same"}),
    ("2d_explicit_neg_rhsdil", None, _sz("N1 C2 O2 I2 H7 W6 h2 w3"),
     {"window_strides": (1, 1), "padding": ((1, 2), (-1, 0)), "rhs_dilation": (2, 1)}),
    ("2d_lhsdil_transposed", NHWC, _sz("N1 C2 O2 I2 H3 W4 h3 w3"),
     {"window_strides": (1, 1), "padding": ((2, 2), (1, 0)), "lhs_dilation": (2, 3)}),
    ("2d_same_stride3_rhsdil", None, _sz("N1 C1 O1 I1 H4 W3 h3 w2"),
     {"window_strides": (3, 1), "padding": "SAME", "rhs_dilation": (2, 2)}),
    ("2d_groups2_nhwc", NHWC, _sz("N2 C4 O6 I2 H5 W5 h3 w3"),
     {"window_strides": (1, 2), "padding": "SAME", "feature_group_count": 2}),
    ("2d_depthwise", NHWC, _sz("N1 C3 O6 I1 H5 W4 h3 w3"),
     {"window_strides": (1, 1), "padding": "SAME", "feature_group_count": 3}),
    ("2d_odd_layout_rhs_orders_spatial", ("HNWC", "OWHI", "CWHN"), _sz("N2 C2 O3 I2 H6 W5 h3 w2"),
     {"window_strides": (2, 1), "padding": ((1, 0), (0, 2)), "rhs_dilation": (1, 2)}),
    ("2d_same_lower_all_but_lhsdil", ("NCHW", "IOHW", "NHWC"), _sz("N1 C4 O4 I2 H5 W6 h2 w3"),
     {"window_strides": (2, 3), "padding": "SAME_LOWER", "rhs_dilation": (2, 1),
      "feature_group_count": 2}),
    ("2d_everything", ("NCHW", "IOHW", "NHWC"), _sz("N1 C4 O4 I2 H5 W6 h2 w3"),
     {"window_strides": (2, 3), "padding": ((1, -1), (2, 1)), "lhs_dilation": (1, 2),
      "rhs_dilation": (2, 1), "feature_group_count": 2}),
    ("2d_window_bigger_than_input", None, _sz("N1 C1 O1 I1 H2 W3 h4 w5"),
     {"window_strides": (1, 1), "padding": "SAME"}),
    # ---- 3-D
    ("3d_valid_default", None, _sz("N1 C2 O2 I2 D4 H4 W3 d2 h3 w2"),
     {"window_strides": (1, 1, 1), "padding": "VALID"}),
    ("3d_same_ndhwc", NDHWC, _sz("N1 C2 O2 I2 D5 H4 W5 d3 h2 w3"),
     {"window_strides": (2, 1, 2), "padding": "SAME", "rhs_dilation": (1, 2, 1)}),
    ("3d_same_lower", NDHWC, _sz("N1 C1 O2 I1 D4 H5 W4 d2 h2 w3"),
     {"window_strides": (1, 2, 1), "padding": "SAME_LOWER"}),
    ("3d_explicit_neg_groups_lhsdil", None, _sz("N1 C4 O2 I2 D3 H4 W3 d2 h2 w2"),
     {"window_strides": (1, 1, 2), "padding": ((1, 0), (-1, 1), (0, 1)),
      "lhs_dilation": (2, 1, 1), "feature_group_count": 2}),
]


def _specs_and_shapes(
    dn: tuple[str, str, str] | None, sizes: dict[str, int], nsp: int
) -> tuple[tuple[str, str, str], tuple[int, ...], tuple[int, ...]]:
    """Lhs/rhs shapes; uppercase spatial sizes are input sizes, lowercase kernel sizes."""
    if dn is None:
        sp = "DHW"[3 - nsp:]
        lhs_s, rhs_s, out_s = "NC" + sp, "OI" + sp, "NC" + sp
    else:
        lhs_s, rhs_s, out_s = dn
    lhs_shape = _shape(lhs_s, sizes)
    rhs_sizes = {k: v for k, v in sizes.items() if k in "OI"}
    rhs_sizes.update({c: sizes[c.lower()] for c in rhs_s if c not in "OI"})
    return (lhs_s, rhs_s, out_s), lhs_shape, _shape(rhs_s, rhs_sizes)


@pytest.mark.parametrize("name,dn,sizes,kw", CASES, ids=[c[0] for c in CASES])
def test_conv_reference_matches_lax(
    name: str, dn: tuple[str, str, str] | None, sizes: dict[str, int], kw: dict[str, Any]
) -> None:
    nsp = len(kw["window_strides"])
    _, lhs_shape, rhs_shape = _specs_and_shapes(dn, sizes, nsp)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    lhs, rhs = _data(rng, lhs_shape), _data(rng, rhs_shape)
    _check_against_lax(lhs, rhs, dimension_numbers=dn, **kw)


def test_conv_dimension_numbers_object() -> None:
    """A lax.ConvDimensionNumbers (int tuples) gives the same as its strings."""
    rng = np.random.default_rng(0)
    strings = ("HCWN", "WHOI", "NHWC")
    lhs = _data(rng, (6, 2, 5, 1))  # H=6, C=2, W=5, N=1
    rhs = _data(rng, (2, 3, 3, 2))  # w=2, h=3, O=3, I=2
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, strings)
    kw = {"window_strides": (1, 2), "padding": "SAME", "rhs_dilation": (2, 1)}
    by_obj = _check_against_lax(lhs, rhs, dimension_numbers=dn, **kw)
    by_str = conv_reference(lhs, rhs, dimension_numbers=strings, **kw, **STD)
    np.testing.assert_array_equal(by_obj, by_str)


@pytest.mark.parametrize("seed", range(16))
def test_conv_reference_random_configs(seed: int) -> None:
    """Random 1/2-D configurations: layout, padding mode, strides, dilations, groups."""
    rng = np.random.default_rng(1000 + seed)
    nsp = int(rng.integers(1, 3))
    sp = "HW"[2 - nsp:]
    groups = int(rng.choice([1, 2]))
    i_feat = int(rng.integers(1, 3))
    sizes = {"N": int(rng.integers(1, 3)), "C": groups * i_feat, "I": i_feat,
                 "O": groups * int(rng.integers(1, 3))}
    for c in sp:
        sizes[c] = int(rng.integers(3, 7))
        sizes[c.lower()] = int(rng.integers(1, 4))
    lhs_s = "".join(rng.permutation(list("NC" + sp)))
    rhs_s = "".join(rng.permutation(list("OI" + sp)))
    out_s = "".join(rng.permutation(list("NC" + sp)))
    mode = ["VALID", "SAME", "SAME_LOWER", "explicit"][seed % 4]
    padding: Any = mode
    if mode == "explicit":
        padding = tuple((int(rng.integers(-1, 3)), int(rng.integers(-1, 3))) for _ in sp)
    lhs_dil = tuple(int(v) for v in rng.integers(1, 3, nsp)) if mode == "explicit" else None
    kw = {
        "window_strides": tuple(int(v) for v in rng.integers(1, 3, nsp)),
        "padding": padding,
        "lhs_dilation": lhs_dil,  # lax rejects string padding with lhs_dilation
        "rhs_dilation": tuple(int(v) for v in rng.integers(1, 3, nsp)),
        "feature_group_count": groups,
    }
    dn = (lhs_s, rhs_s, out_s)
    _, lhs_shape, rhs_shape = _specs_and_shapes(dn, sizes, nsp)
    lhs, rhs = _data(rng, lhs_shape), _data(rng, rhs_shape)
    _check_against_lax(lhs, rhs, dimension_numbers=dn, **kw)


def test_string_padding_with_lhs_dilation_is_rejected_as_lax() -> None:
    x, w = np.ones((1, 1, 4)), np.ones((1, 1, 2))
    with pytest.raises(ValueError):
        lax.conv_general_dilated(x, w, (1,), "SAME", lhs_dilation=(2,))
    with pytest.raises(ValueError, match="lhs_dilation"):
        conv_reference(x, w, (1,), "SAME", (2,), **STD)


def test_resolve_padding_matches_lax() -> None:
    for in_shape, win, strides in [((7, 6), (3, 4), (2, 1)), ((5, 1), (2, 5), (3, 2))]:
        for mode in ("SAME", "SAME_LOWER", "VALID", "same_lower"):
            expected = [tuple(p) for p in lax.padtype_to_pads(in_shape, win, strides, mode)]
            assert resolve_padding(mode, in_shape, win, strides) == expected


# --------------------------------------------------------------------------- dot_general

DOT_CASES: list[tuple[str, tuple[int, ...], tuple[int, ...], Any]] = [
    ("matmul", (3, 4), (4, 5), (((1,), (0,)), ((), ()))),
    ("matmul_rhs_transposed", (3, 4), (5, 4), (((1,), (1,)), ((), ()))),
    ("batched", (2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))),
    ("batch_not_leading", (3, 2, 4), (4, 5, 2), (((2,), (0,)), ((1,), (2,)))),
    ("two_contractions", (2, 3, 4), (4, 5, 2), (((0, 2), (2, 0)), ((), ()))),
    ("outer_product", (2, 3), (4,), (((), ()), ((), ()))),
    ("two_batch_dims", (2, 3, 4, 2), (3, 2, 2, 5), (((3,), (2,)), ((1, 0), (0, 1)))),
    ("full_contraction", (3, 4), (3, 4), (((0, 1), (0, 1)), ((), ()))),
]


@pytest.mark.parametrize(
    "lshape,rshape,dn", [c[1:] for c in DOT_CASES], ids=[c[0] for c in DOT_CASES]
)
def test_dot_general_reference_matches_lax(
    lshape: tuple[int, ...], rshape: tuple[int, ...], dn: Any
) -> None:
    rng = np.random.default_rng(len(lshape) * 10 + len(rshape))
    lhs, rhs = _data(rng, lshape), _data(rng, rshape)
    ref = dot_general_reference(lhs, rhs, dn, **STD)
    expected = np.asarray(
        lax.dot_general(jnp.asarray(lhs), jnp.asarray(rhs), dn,
                        precision=lax.Precision.HIGHEST),
        dtype=np.float64,
    )
    assert ref.shape == expected.shape
    np.testing.assert_array_equal(ref, expected)


def test_dot_general_max_plus_by_hand() -> None:
    op = NUMPY_OPS["max_plus"]
    a = np.array([[1.0, -2.0, 3.0], [0.0, 5.0, -1.0]])
    b = np.array([[0.0, 1.0], [4.0, -3.0], [-5.0, 2.0]])
    ref = dot_general_reference(a, b, (((1,), (0,)), ((), ())),
                                combine=op.combine, reduce=op.reduce, identity=op.identity)
    expected = np.max(a[:, :, None] + b[None, :, :], axis=1)
    np.testing.assert_array_equal(ref, expected)


# --------------------------------------------------------------------------- hand cases


def _op_kw(name: str, **over: Any) -> dict[str, Any]:
    op = NUMPY_OPS[name]
    kw = {"combine": op.combine, "reduce": op.reduce, "identity": op.identity}
    return {**kw, "pad_value": op.pad_value, **over}


def test_max_plus_same_skips_padding_1d() -> None:
    x = np.array([-5.0, -3.0, -8.0]).reshape(1, 1, 3)
    w = np.array([0.0, 1.0, 2.0]).reshape(1, 1, 3)
    out = conv_reference(x, w, (1,), "SAME", **_op_kw("max_plus"))
    # out[0] = max(pad, -5+1, -3+2); out[1] = max(-5+0, -3+1, -8+2); out[2] = max(-3, -7, pad)
    np.testing.assert_array_equal(out.ravel(), [-1.0, -2.0, -3.0])
    # Zero padding (what users did) would give max(0+0, ...) = 0 and max(..., 0+2) = 2.
    zero = conv_reference(x, w, (1,), "SAME", **_op_kw("max_plus", pad_value=0.0))
    np.testing.assert_array_equal(zero.ravel(), [0.0, -2.0, 2.0])


def test_max_plus_same_is_max_filter_2d() -> None:
    x = -np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    w = np.zeros((1, 1, 3, 3))
    out = conv_reference(x, w, (1, 1), "SAME", **_op_kw("max_plus"))
    expected = -np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [4.0, 4.0, 5.0]])
    np.testing.assert_array_equal(out[0, 0], expected)


def test_max_plus_all_padded_window_is_identity() -> None:
    x = np.array([1.0]).reshape(1, 1, 1)
    w = np.array([0.0]).reshape(1, 1, 1)
    out = conv_reference(x, w, (1,), ((2, 0),), **_op_kw("max_plus"))
    np.testing.assert_array_equal(out.ravel(), [-np.inf, -np.inf, 1.0])
    out = conv_reference(x, w, (1,), ((2, 0),), **_op_kw("log"))
    np.testing.assert_array_equal(out.ravel(), [-np.inf, -np.inf, 1.0])


def test_lhs_dilation_holes_are_padding() -> None:
    x = np.array([1.0, 2.0]).reshape(1, 1, 2)  # dilated: [1, hole, 2]
    w = np.array([0.0, 0.0]).reshape(1, 1, 2)
    out = conv_reference(x, w, (1,), ((0, 0),), (2,), **_op_kw("max_plus"))
    np.testing.assert_array_equal(out.ravel(), [1.0, 2.0])
    w = np.array([1.0, 3.0]).reshape(1, 1, 2)
    adder = conv_reference(x, w, (1,), ((0, 0),), (2,), **_op_kw("adder"))
    # [-|1-1| - |0-3|, -|0-1| - |2-3|]
    np.testing.assert_array_equal(adder.ravel(), [-3.0, -2.0])


def test_adder_pads_with_zero_l1_skips() -> None:
    x = np.array([1.0, 2.0]).reshape(1, 1, 2)
    w = np.array([1.0, -1.0, 3.0]).reshape(1, 1, 3)
    adder = conv_reference(x, w, (1,), "SAME", **_op_kw("adder"))
    # pads (1, 1): out[0] = -|0-1| - |1+1| - |2-3|; out[1] = -|1-1| - |2+1| - |0-3|
    np.testing.assert_array_equal(adder.ravel(), [-4.0, -6.0])
    l1 = conv_reference(x, w, (1,), "SAME", **_op_kw("l1"))
    np.testing.assert_array_equal(l1.ravel(), [-3.0, -3.0])
    # The difference is exactly -|w| of each padded tap.
    np.testing.assert_array_equal(adder.ravel() - l1.ravel(), [-1.0, -3.0])


def test_adder_2d_padded_taps_add_minus_abs_w() -> None:
    rng = np.random.default_rng(7)
    x = _data(rng, (1, 2, 4, 4)).astype(np.float64)
    w = _data(rng, (3, 2, 3, 3)).astype(np.float64)
    adder = conv_reference(x, w, (1, 1), "SAME", **_op_kw("adder"))
    l1 = conv_reference(x, w, (1, 1), "SAME", **_op_kw("l1"))
    # Count the padded taps at each output position and add -|w| for each of them.
    expected = l1.copy()
    for i in range(4):
        for j in range(4):
            for a in range(3):
                for b in range(3):
                    if not (0 <= i + a - 1 < 4 and 0 <= j + b - 1 < 4):
                        expected[0, :, i, j] -= np.abs(w[:, :, a, b]).sum(axis=1)
    np.testing.assert_allclose(adder, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- ops table


def test_numpy_ops_table() -> None:
    names = {"standard", "xnor", "adder", "l1", "l2", "max_plus", "min_plus",
             "max_min", "min_max", "max_times", "log"}
    assert set(NUMPY_OPS) == names == set(NUMPY_REDUCE_AXIS)
    for name, op in NUMPY_OPS.items():
        combine, reduce, identity, pad_value = op
        assert pad_value == (0.0 if name == "adder" else None)
        for a in (-2.5, 0.0, 3.0):
            assert reduce(np.float64(a), np.float64(identity)) == a
        with np.errstate(invalid="ignore"):
            assert np.isnan(reduce(np.float64(np.nan), np.float64(1.0)))
            assert np.isnan(combine(np.float64(np.nan), np.float64(1.0)))
    xnor = NUMPY_OPS["xnor"].combine
    assert xnor(np.float64(0.0), np.float64(-0.0)) == 1.0
    assert xnor(np.float64(-0.5), np.float64(0.0)) == -1.0
    assert xnor(np.float64(-2.0), np.float64(-3.0)) == 1.0
    assert NUMPY_OPS["log"].reduce(-np.inf, -np.inf) == -np.inf
    assert NUMPY_OPS["l2"].combine(1.0, 3.0) == -4.0
    assert NUMPY_OPS["max_min"].combine(1.0, 3.0) == 1.0
    assert NUMPY_OPS["min_max"].combine(1.0, 3.0) == 3.0
    # xnor combine broadcasts (used by the forum recipe).
    np.testing.assert_array_equal(xnor(np.array([0.0, -1.0, 2.0]), 1.0), [1.0, -1.0, 1.0])


def test_nan_in_nan_out() -> None:
    x = np.array([1.0, np.nan, 2.0, 0.0]).reshape(1, 1, 4)
    w = np.array([0.0, 0.0]).reshape(1, 1, 2)
    for name in ("max_plus", "min_plus", "max_min", "min_max", "log", "standard"):
        out = conv_reference(x, w, (1,), "VALID", **_op_kw(name)).ravel()
        assert np.isnan(out[0]) and np.isnan(out[1]) and not np.isnan(out[2]), name


def test_vectorized_fold_equals_the_scalar_loops() -> None:
    """The fold over all (n, co) at once gives the scalar loops' bits (a scalar-only reduce,
    Python's ``max``, takes the scalar loops): every op, padding read through combine or
    skipped, lhs dilation, groups, NaN and infinities, float64 and float32; dot_general too."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 7, 4))
    w = rng.standard_normal((4, 2, 3, 2))
    x[0, 1, 2, 3], x[1, 0, 0, 0], w[0, 1, 2, 1] = np.nan, np.inf, -np.inf
    kw = dict(window_strides=(2, 1), padding=((1, 2), (2, 0)), lhs_dilation=(1, 2),
              dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2)
    a, b = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 3, 4))
    dn = (((2,), (1,)), ((0,), (0,)))
    for name, op in NUMPY_OPS.items():
        for dtype in (np.float64, np.float32):
            args = dict(combine=op.combine, identity=op.identity, dtype=dtype)
            loops = dict(args, reduce=lambda p, q, r=op.reduce: r(p, q) if np.ndim(p) == 0
                         else max(p, q))  # raises on arrays: the scalar loops
            for pad in (op.pad_value, 0.5):
                got = conv_reference(x, w, **kw, **args, reduce=op.reduce, pad_value=pad)
                want = conv_reference(x, w, **kw, **loops, pad_value=pad)
                np.testing.assert_array_equal(got, want, err_msg=f"{name} {dtype} {pad}")
            got = dot_general_reference(a, b, dn, **args, reduce=op.reduce)
            want = dot_general_reference(a, b, dn, **loops)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {dtype}")


# --------------------------------------------------------------------------- forum recipe


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1), ((2, 1), (0, 2))])
def test_forum_recipe_standard_equals_reference_and_lax(stride: Any, padding: Any) -> None:
    rng = np.random.default_rng(3)
    x = _data(rng, (2, 3, 5, 6))
    w = _data(rng, (4, 3, 3, 2))
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    recipe = forum_unfold_recipe(x, w, stride, padding, np.multiply, np.sum)
    pads = ((ph, ph), (pw, pw))
    ref = _check_against_lax(x, w, window_strides=(sh, sw), padding=pads)
    np.testing.assert_array_equal(recipe, ref)
    zero = conv_reference(x, w, (sh, sw), pads, **STD, pad_value=0.0)
    np.testing.assert_array_equal(recipe, zero)


def test_forum_recipe_adder_equals_reference_not_l1() -> None:
    rng = np.random.default_rng(4)
    x = _data(rng, (1, 2, 4, 5))
    w = _data(rng, (3, 2, 3, 3))
    op = NUMPY_OPS["adder"]
    recipe = forum_unfold_recipe(x, w, 1, 1, op.combine, NUMPY_REDUCE_AXIS["adder"])
    ref = conv_reference(x, w, (1, 1), ((1, 1), (1, 1)), **_op_kw("adder"))
    np.testing.assert_allclose(recipe, ref, rtol=0, atol=1e-12)
    l1 = conv_reference(x, w, (1, 1), ((1, 1), (1, 1)), **_op_kw("l1"))
    assert not np.allclose(recipe[..., 0, :], l1[..., 0, :])  # borders differ
    np.testing.assert_allclose(recipe[..., 1:-1, 1:-1], l1[..., 1:-1, 1:-1], atol=1e-12)


def test_forum_recipe_max_plus_differs_from_identity_padding() -> None:
    """Zero padding is wrong for max-plus; identity padding skips border taps."""
    x = -np.ones((1, 1, 3, 3)) * 4.0
    w = np.zeros((1, 1, 3, 3))
    recipe = forum_unfold_recipe(x, w, 1, 1, np.add, NUMPY_REDUCE_AXIS["max_plus"])
    ref = conv_reference(x, w, (1, 1), "SAME", **_op_kw("max_plus"))
    np.testing.assert_array_equal(ref, np.full((1, 1, 3, 3), -4.0))
    assert recipe[0, 0, 0, 0] == 0.0 and recipe[0, 0, 1, 1] == -4.0
