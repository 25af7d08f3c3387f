"""The native CPU engine (``engine="native"``): values, gradients, IEEE cases, vmap (threads,
instruction sets and the work split: ``test_native_parallel.py``).

Forward values are checked against the numpy loop reference (``reference.py``) over a covering
set of ops x geometries, and against the XLA engine (max/min bit for bit); gradients against
the XLA engine and against the stated rules written out as numpy loops here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from geometries import conv as _conv
from geometries import data, loop_reference, table
from geometries import dn as _dn
from geometries import grads as _grads
from reference import NUMPY_OPS, dot_general_reference

import jaxconv
from jaxconv import ops
from jaxconv._src.engines import native
from jaxconv._src.engines.native import eligibility, ffi
from jaxconv._src.engines.native import engine as native_engine

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_OPS = ("max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2_exact")
MAXMIN = ("max_plus", "min_plus", "max_min", "min_max")


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _allow():
    """The XLA engine (the yardstick here) is not written for rank-promotion "raise"."""
    return jax.numpy_rank_promotion("allow")


def _np_op(name: str):
    return NUMPY_OPS["l2" if name == "l2_exact" else name]


SUMS = ("adder", "l1", "l2_exact")


def _covering(items: list, extremes: int = 2) -> list[tuple[str, object]]:
    """(op, item) pairs covering `items` without the full NATIVE_OPS cross product.

    With ``extremes=2`` each item runs one max and one min reduce (the pair's combine
    alternates between + and min/max, so each of MAXMIN meets every other item); with
    ``extremes=1`` one of MAXMIN in rotation (max and min reduces alternate over the items,
    and with 4 items or more each of MAXMIN appears). Each item runs two of SUMS in rotation
    (each sum meets at least every other item). The full cross product of forward passes
    against the numpy reference stays in test_forward_matches_reference.

    Args:
      items: the geometries or shapes to cover.
      extremes: how many of MAXMIN each item runs (1 or 2).

    Returns:
      The (op name, item) pairs.
    """
    pairs = []
    for i, item in enumerate(items):
        ops_ = (("max_plus", "min_max"), ("min_plus", "max_min"))[i % 2]
        if extremes == 1:
            ops_ = (("max_plus", "min_max", "min_plus", "max_min")[i % 4],)
        pairs += [(n, item) for n in (*ops_, SUMS[i % 3], SUMS[(i + 1) % 3])]
    return pairs


CASES = table("2d_same", "2d_stride_rhs_dil", "2d_lhs_dil", "2d_negative_pad", "1d_valid", "3d",
               "groups", "depthwise", "depth_multiplier", "wide", "channels_80", "nchw")


def _case(name: str, seed: int = 0):
    return data(CASES[name], seed)


def _reference(name, x, w, kw, pad_value="default"):
    npop = _np_op(name)
    return loop_reference(x, w, kw, npop.combine, npop.reduce, npop.identity,
                          npop.pad_value if pad_value == "default" else pad_value)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", NATIVE_OPS)
def test_forward_matches_reference(name, case):
    x, w, kw = _case(case)
    y = np.asarray(_conv(name, "native", kw)(x, w))
    ref = _reference(name, x, w, kw)
    assert y.shape == ref.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


# A covering set (20 of 35): see _covering.
@pytest.mark.parametrize("name,case", _covering(
    ["2d_stride_rhs_dil", "2d_lhs_dil", "depthwise", "wide", "3d"]))
def test_forward_matches_xla_engine(name, case):
    x, w, kw = _case(case, seed=1)
    a = np.asarray(_conv(name, "native", kw)(x, w))
    with _allow():
        b = np.asarray(_conv(name, "xla", kw)(x, w))
    if name in MAXMIN:
        np.testing.assert_array_equal(a, b)  # bit for bit
    else:
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["max_plus", "max_min", "adder", "l1"])
def test_dense_dot_general_with_batch(name):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 5, 7)).astype(np.float32)
    b = rng.standard_normal((3, 7, 20)).astype(np.float32)
    dn = (((2,), (1,)), ((0,), (0,)))
    y = jax.jit(lambda a, b: jaxconv.dot_general(a, b, dn, op=name, engine="native"))(a, b)
    npop = _np_op(name)
    ref = dot_general_reference(a, b, dn, combine=npop.combine, reduce=npop.reduce,
                                identity=npop.identity)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
    with _allow():
        x2 = jaxconv.dot_general(a, b, dn, op=name, engine="xla")
    if name in MAXMIN:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x2))


# A covering set (15 of 35): see _covering. One of MAXMIN per geometry (the XLA engine's
# max / min gradient, the yardstick, is ~3 s of XLA compile on CPU each): every geometry
# meets a max or a min reduce and two sums, every op of MAXMIN a geometry (max_plus two);
# the forward covering set above keeps a max and a min per geometry.
@pytest.mark.parametrize("name,case", _covering(
    ["2d_stride_rhs_dil", "groups", "depthwise", "wide", "channels_80"], extremes=1))
def test_gradients_match_xla_engine(name, case):
    x, w, kw = _case(case, seed=3)
    y = _conv(name, "native", kw)(x, w)
    ct = np.random.default_rng(4).standard_normal(y.shape).astype(np.float32)
    dxa, dwa = _grads(name, "native", kw, x, w, ct)
    with _allow():
        dxb, dwb = _grads(name, "xla", kw, x, w, ct)
    np.testing.assert_allclose(np.asarray(dxa), np.asarray(dxb), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dwa), np.asarray(dwb), rtol=1e-4, atol=2e-4)


# A covering set (6 of 10): every op once; both forms (plain and with batch dimensions)
# meet a max reduce (max_plus in both), a min reduce or a sum of each kind of form: plain
# with l1 and l2_exact, batch dimensions with min_max and adder.
@pytest.mark.parametrize("name,batch", [
    ("max_plus", 0), ("l1", 0), ("l2_exact", 0), ("max_plus", 3), ("min_max", 3),
    ("adder", 3)], ids=lambda v: {0: "plain", 3: "batch_dims"}.get(v, v))
def test_dense_gradients_match_xla_engine(name, batch):
    rng = np.random.default_rng(10)
    lead = (batch,) if batch else ()
    a = rng.standard_normal((*lead, 40, 96)).astype(np.float32)
    b = rng.standard_normal((*lead, 96, 70)).astype(np.float32)
    ct = rng.standard_normal((*lead, 40, 70)).astype(np.float32)
    dn = (((2,), (1,)), ((0,), (0,))) if batch else (((1,), (0,)), ((), ()))

    def grads(engine):
        loss = lambda a, b: jnp.sum(jaxconv.dot_general(  # noqa: E731
            a, b, dn, op=name, engine=engine) * ct)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    (da, db) = grads("native")
    with _allow():
        (xa, xb) = grads("xla")
    np.testing.assert_allclose(np.asarray(da), np.asarray(xa), rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(db), np.asarray(xb), rtol=1e-4, atol=2e-4)


# Dense sizes around the kernel's blocks: K over several kernel-row panels with a tail (and
# K = 1), O a partial block of output channels (and O = 1), M a partial register tile;
# half-integer data give ties within and across panels (and x == w for l1).
# A covering set (12 of 28; every op once or twice, each of MAXMIN once: max reduces on the
# first and last shapes, min reduces on the middle two): see _covering.
DENSE_ODD = _covering([(13, 150, 70), (7, 1, 5), (5, 65, 1), (1, 200, 130)], extremes=1)


@pytest.mark.parametrize("name,shape", DENSE_ODD,
                         ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in DENSE_ODD])
def test_dense_odd_sizes(name, shape):
    m, k, o = shape
    rng = np.random.default_rng(11)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, o)).astype(np.float32)
    if name in (*MAXMIN, "l1"):
        a, b = np.round(a * 2) / 2, np.round(b * 2) / 2
    ct = rng.standard_normal((m, o)).astype(np.float32)
    dn = (((1,), (0,)), ((), ()))

    def run(engine):
        f = lambda a, b: jaxconv.dot_general(a, b, dn, op=name, engine=engine)  # noqa: E731
        y, vjp = jax.vjp(f, a, b)
        return (y, *vjp(ct))
    y, da, db = jax.jit(lambda: run("native"))()
    npop = _np_op(name)
    ref = dot_general_reference(a, b, dn, combine=npop.combine, reduce=npop.reduce,
                                identity=npop.identity)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
    with _allow():
        y2, xa, xb = jax.jit(lambda: run("xla"))()
    if name in MAXMIN:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
    np.testing.assert_allclose(np.asarray(da), np.asarray(xa), rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(db), np.asarray(xb), rtol=1e-4, atol=2e-4)


# The stated gradient rules as loops: 1-D, stride 1, padding (lo, hi).
def _partials(name):
    one = lambda x, w: 1.0  # noqa: E731
    if name in ("max_plus", "min_plus"):
        return one, one
    if name in ("max_min", "min_max"):
        pick = (lambda a, b: 1.0 if a < b else 0.5 if a == b else 0.0) if name == "max_min" \
            else (lambda a, b: 1.0 if a > b else 0.5 if a == b else 0.0)
        return pick, lambda x, w: pick(w, x)
    if name == "adder":
        return (lambda x, w: float(np.clip(w - x, -1, 1))), (lambda x, w: x - w)
    if name == "l1":
        return (lambda x, w: -float(np.sign(x - w))), (lambda x, w: float(np.sign(x - w)))
    return (lambda x, w: -2.0 * (x - w)), (lambda x, w: 2.0 * (x - w))


def _rule_grads(name, x, w, pad, ct):
    n, s, c = x.shape
    k, _, o = w.shape
    pv = _np_op(name).pad_value
    hx, hw = _partials(name)
    dx = np.zeros((n, s, c))
    dw = np.zeros((k, c, o))
    comb = _np_op(name).combine
    for b in range(n):
        for p in range(ct.shape[1]):
            for co in range(o):
                terms = []
                for t in range(k):
                    q = p + t - pad[0]
                    inside = 0 <= q < s
                    if not inside and pv is None:
                        continue
                    for ci in range(c):
                        xv = float(x[b, q, ci]) if inside else pv
                        terms.append((q if inside else None, t, ci, xv, float(w[t, ci, co])))
                g = float(ct[b, p, co])
                if name in MAXMIN:
                    vals = [float(comb(np.float32(xv), np.float32(wv))) for *_, xv, wv in terms]
                    y = max(vals) if name.startswith("max") else min(vals)
                    win = [tm for tm, v in zip(terms, vals, strict=True) if v == y]
                    share = g / len(win)
                else:
                    win, share = terms, g
                for q, t, ci, xv, wv in win:
                    if q is not None:
                        dx[b, q, ci] += share * hx(xv, wv)
                    dw[t, ci, co] += share * hw(xv, wv)
    return dx, dw


@pytest.mark.parametrize("name", NATIVE_OPS)
def test_gradients_follow_the_stated_rules(name):
    rng = np.random.default_rng(5)
    # Integer-valued data: many ties (split equally) and many x == w (subgradient 0).
    x = rng.integers(-2, 3, (2, 7, 3)).astype(np.float32)
    w = rng.integers(-2, 3, (3, 3, 4)).astype(np.float32)
    kw = dict(window_strides=(1,), padding=((1, 2),), dimension_numbers=_dn(3))
    y = _conv(name, "native", kw)(x, w)
    ct = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = _grads(name, "native", kw, x, w, ct)
    rdx, rdw = _rule_grads(name, x, w, (1, 2), ct)
    np.testing.assert_allclose(np.asarray(dx), rdx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), rdw, rtol=1e-5, atol=1e-5)


# adder / l1's one pass over the terms for both gradients (csrc/kernel_sums_paired.h): input
# channels in whole vectors (16; 80 = a full block and a ragged one), more than 16 images (an
# item sums two), output channels beside its 4-channel tile, feature groups (8: enough
# blocks of input channels that the images are not cut into runs), padding on both sides
# (adder's pad rows add dw terms, their dx is dropped); integer data give x == w.
@pytest.mark.parametrize("name,n,c,o,groups,pad", [
    ("adder", 18, 16, 6, 1, (1, 2)), ("l1", 3, 80, 5, 1, (2, 0)),
    ("adder", 2, 32, 10, 2, (0, 1)), ("l1", 3, 128, 16, 8, (1, 1))])
def test_paired_backward_follows_the_stated_rules(name, n, c, o, groups, pad):
    rng = np.random.default_rng(12)
    x = rng.integers(-2, 3, (n, 7, c)).astype(np.float32)
    w = rng.integers(-2, 3, (3, c // groups, o)).astype(np.float32)
    kw = dict(window_strides=(1,), padding=(pad,), dimension_numbers=_dn(3),
              feature_group_count=groups)
    y = _conv(name, "native", kw)(x, w)
    ct = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = _grads(name, "native", kw, x, w, ct)
    ci, co = c // groups, o // groups
    for grp in range(groups):
        rdx, rdw = _rule_grads(name, x[..., grp * ci:(grp + 1) * ci],
                               w[..., grp * co:(grp + 1) * co], pad,
                               ct[..., grp * co:(grp + 1) * co])
        np.testing.assert_allclose(np.asarray(dx)[..., grp * ci:(grp + 1) * ci], rdx,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dw)[..., grp * co:(grp + 1) * co], rdw,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MAXMIN)
def test_constant_input_ties_split_like_jnp_max(name):
    x = jnp.zeros((1, 6, 2), jnp.float32)
    w = jnp.zeros((3, 2, 1), jnp.float32)
    kw = dict(window_strides=(1,), padding="VALID", dimension_numbers=_dn(3))
    dx, dw = jax.grad(lambda x, w: jnp.sum(jaxconv.conv_general_dilated(
        x, w, op=name, engine="native", **kw)), argnums=(0, 1))(x, w)
    red = jnp.max if name.startswith("max") else jnp.min
    comb = {"max_plus": jnp.add, "min_plus": jnp.add, "max_min": jnp.minimum,
            "min_max": jnp.maximum}[name]

    def naive(x, w):
        cols = jnp.stack([x[0, t:t + 4, :] for t in range(3)], axis=1)  # (4, 3, 2)
        return jnp.sum(red(comb(cols, w[None, :, :, 0]), axis=(1, 2)))
    ndx, ndw = jax.grad(naive, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ndx), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(ndw), rtol=1e-6)


@pytest.mark.parametrize("name", ["max_plus", "min_plus", "max_min", "min_max", "adder", "l1"])
def test_nan_in_nan_out(name):
    x, w, kw = _case("2d_same", seed=6)
    x[1, 2, 3, 1] = np.nan
    y = np.asarray(_conv(name, "native", kw)(x, w))
    ref = _reference(name, x, w, kw)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    assert np.isnan(y).any()
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(y[ok], ref[ok], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", MAXMIN)
def test_infinities_and_identity_padding(name):
    x, w, kw = _case("2d_same", seed=7)
    w[0, 0, :, :] = np.inf  # a +inf weight on a tap that is padded at the top-left border
    w[2, 1, 0, :] = -np.inf
    x[0, 3, 3, :] = -np.inf
    x[1, 0, 0, 0] = np.inf
    y = np.asarray(_conv(name, "native", kw)(x, w))
    ref = _reference(name, x, w, kw)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    ok = np.isfinite(ref)
    np.testing.assert_allclose(y[ok], ref[ok], rtol=1e-6, atol=1e-6)
    with _allow():
        np.testing.assert_array_equal(y, np.asarray(_conv(name, "xla", kw)(x, w)))


@pytest.mark.parametrize("name", ["adder", "l1"])
@pytest.mark.parametrize("offsets", [(100.0, 100.0), (1000.0, 1000.0), (100.0, 0.0), (0.0, -30.0)])
def test_absolute_difference_sums_keep_their_precision_on_offset_data(name, offsets):
    """adder / l1 run in the min form on finite inputs (2 min(x, w) - x - w, centred per
    channel): data far from zero must keep a product's precision, not lose ~1% (100 +- 1)."""
    x, w, kw = _case("channels_80", seed=10)
    x, w = x + np.float32(offsets[0]), w + np.float32(offsets[1])
    for case_kw, ws in ((kw, w), (dict(kw, feature_group_count=4), w[:, :, :20])):
        y = np.asarray(_conv(name, "native", case_kw)(x, ws))
        ref = _reference(name, x, ws, case_kw)
        assert np.max(np.abs(y - ref)) <= 4e-6 * np.max(np.abs(ref))


@pytest.mark.parametrize("name", ["adder", "l1"])
def test_absolute_difference_sums_with_infinities_and_a_pad_value(name):
    """Non-finite inputs take the exact loop (the min form would make -inf - -inf = NaN);
    a declared pad value goes through the combine in the min form as in the exact loop."""
    x, w, kw = _case("2d_same", seed=11)
    x[0, 3, 3, :] = -np.inf
    x[1, 0, 0, 0] = np.inf
    w[2, 1, 0, :] = -np.inf
    y = np.asarray(_conv(name, "native", kw)(x, w))
    ref = _reference(name, x, w, kw)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    assert np.isinf(ref).any()
    ok = np.isfinite(ref)
    np.testing.assert_allclose(y[ok], ref[ok], rtol=2e-5, atol=2e-5)
    base = getattr(ops, name)
    padded = base.__class__(**{**base.__dict__, "pad_value": 100.25})
    x, w, kw = _case("2d_stride_rhs_dil", seed=12)
    x, w = x + np.float32(100.0), w + np.float32(100.0)
    y = np.asarray(_conv(padded, "native", kw)(x, w))
    ref = _reference(name, x, w, kw, pad_value=100.25)
    assert np.max(np.abs(y - ref)) <= 4e-6 * np.max(np.abs(ref))


@pytest.mark.parametrize("kind", ["dense", "one_tap_strided_grouped"])
def test_l1_one_pass_dense_backward(kind):
    """l1's dense backward computes sign(w - x) once for both gradients: against the XLA
    engine, with position and kernel-row counts that leave partial blocks, and under vmap."""
    rng = np.random.default_rng(13)
    if kind == "dense":
        # 19 positions, 11 kernel rows: partial blocks of kPB = 16 and kKB = 8 (csrc/
        # kernel_sums.h dense_odd_backward); 16 outputs: Og % W == 0 for W = 8 and 16.
        x = rng.standard_normal((19, 11)).astype(np.float32)
        w = rng.standard_normal((11, 16)).astype(np.float32)
        w[3, :5] = x[2, 3]  # ties: a zero subgradient
        f = lambda eng: lambda a, b: jaxconv.dot_general(  # noqa: E731
            a, b, (((1,), (0,)), ((), ())), op="l1", engine=eng)
    else:
        x = rng.standard_normal((5, 3, 3, 10)).astype(np.float32)
        w = rng.standard_normal((1, 1, 5, 64)).astype(np.float32)
        kw = dict(window_strides=(3, 3), padding="VALID", feature_group_count=2,
                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
        f = lambda eng: _conv("l1", eng, kw)  # noqa: E731
    ct = rng.standard_normal(jax.eval_shape(f("xla"), x, w).shape).astype(np.float32)

    def grads(eng, a, b):
        return jax.grad(lambda a, b: jnp.sum(f(eng)(a, b) * ct), (0, 1))(a, b)

    xs, ws = np.stack([x, -x]), np.stack([w, 2 * w])
    with _allow():
        for args in ((x, w), (xs, ws)):
            fn = (lambda e: jax.vmap(functools.partial(grads, e))) if args[0] is xs else (
                lambda e: functools.partial(grads, e))
            got, want = fn("native")(*args), fn("xla")(*args)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_pad_value_goes_through_combine():
    x, w, kw = _case("2d_stride_rhs_dil", seed=8)
    op = ops.max_min.__class__(**{**ops.max_min.__dict__, "pad_value": 0.25})
    y = np.asarray(_conv(op, "native", kw)(x, w))
    np.testing.assert_allclose(y, _reference("max_min", x, w, kw, pad_value=0.25), rtol=1e-6)
    with _allow():
        np.testing.assert_array_equal(y, np.asarray(_conv(op, "xla", kw)(x, w)))


@pytest.mark.parametrize("name", ["max_plus", "adder"])
def test_vmap_jit_grad_checkpoint(name):
    x, w, kw = _case("2d_same", seed=9)
    xs = np.stack([x, x[::-1] * 0.5, x + 1.0])
    ws = np.stack([w, -w, w * 2.0])

    def f(x, w):
        return jaxconv.conv_general_dilated(x, w, op=name, engine="native", **kw)
    loop = lambda xs, ws: jnp.stack([f(a, b) for a, b in zip(xs, ws, strict=True)])  # noqa: E731
    # Validation probes a built-in op on first use; under an outer vmap trace that probe fails
    # for adder (core/validation.py, not this engine), so the op is used once beforehand.
    f(x, w)
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(xs, ws), loop(xs, ws), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f, (0, None))(xs, w),
                               loop(xs, [w] * 3), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f, (None, 0))(x, ws),
                               loop([x] * 3, ws), rtol=1e-6)

    def loss(x, w):
        return jnp.sum(jnp.sin(jax.checkpoint(f)(x, w)))
    g_vmap = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(xs, ws)
    g_loop = [jax.grad(loss, argnums=(0, 1))(a, b) for a, b in zip(xs, ws, strict=True)]
    for i in range(3):
        np.testing.assert_allclose(g_vmap[0][i], g_loop[i][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g_vmap[1][i], g_loop[i][1], rtol=1e-5, atol=1e-5)
    hlo = jax.jit(jax.vmap(f)).lower(xs, ws).as_text()
    assert "jaxconv_forward" in hlo and "while" not in hlo  # one batched call, no loop


def test_auto_routes_to_native_on_cpu():
    x, w, kw = _case("2d_same")
    hlo = jax.jit(lambda x, w: jaxconv.conv_general_dilated(x, w, op="max_plus", **kw)).lower(
        x, w).as_text()
    assert "jaxconv_forward" in hlo
    hlo = jax.jit(lambda x, w: jaxconv.conv_general_dilated(x, w, op="log", **kw)).lower(
        x, w).as_text()
    assert "jaxconv_forward" in hlo  # behind the exp-space convolution (core/log_products)
    prod = jaxconv.Op(lambda a, b: a + b, "prod", name="prod_op")  # no native reduce
    hlo = jax.jit(lambda x, w: jaxconv.conv_general_dilated(x, w, op=prod, **kw)).lower(
        x, w).as_text()
    assert "jaxconv_forward" not in hlo


def test_unsupported_is_a_clear_error_and_auto_falls_back():
    x, w, kw = _case("2d_same")
    prod = jaxconv.Op(lambda a, b: a + b, "prod", name="prod_op")
    with pytest.raises(ValueError, match="'prod_op'"):
        jaxconv.conv_general_dilated(x, w, op=prod, engine="native", **kw)
    # In bfloat16 this combine rounds twice per product: the float32 kernels cannot match.
    twice = jaxconv.Op(lambda a, b: a * b + a, "max", name="twice")
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    with pytest.raises(ValueError, match="in bfloat16 its combine rounds 'add' of a rounded"):
        jaxconv.conv_general_dilated(xb, wb, op=twice, engine="native", **kw)
    with _allow():
        y = jaxconv.conv_general_dilated(xb, wb, op=twice, **kw)
        z = jaxconv.conv_general_dilated(xb, wb, op=twice, engine="xla", **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(z))
    assert not _supports(ops.log, "float64")  # wide kernels: max/min and sum built-ins
    assert _supports(ops.max_plus, "float64")
    assert _supports(ops.l2_exact, "float32")
    assert not _supports(ops.l2, "float32")  # a lax rewrite, no kernel


def _supports(op, dtype):
    from jaxconv._src.core.geometry import Geometry
    from jaxconv._src.core.problem import Problem
    geom = Geometry((5,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
    problem = Problem(op, geom, "native", np.dtype(dtype), 2**20, None, np.dtype(dtype))
    return eligibility.refusal(problem, dtype, "cpu") is None


def test_load_failure_warns_once_and_native_raises(monkeypatch):
    monkeypatch.setitem(ffi._state, "module", None)
    monkeypatch.setitem(ffi._state, "error", "ImportError: simulated")
    native_engine._warn_native_unavailable.cache_clear()
    x, w, kw = _case("2d_same")
    with pytest.raises(RuntimeError, match="simulated"):
        jaxconv.conv_general_dilated(x, w, op="max_plus", engine="native", **kw)
    with pytest.warns(RuntimeWarning, match="native CPU engine could not be loaded"), _allow():
        y = jaxconv.conv_general_dilated(x, w, op="max_plus", **kw)
    np.testing.assert_allclose(np.asarray(y), _reference("max_plus", x, w, kw), rtol=1e-6)
    import warnings
    with warnings.catch_warnings(), _allow():
        warnings.simplefilter("error")
        jaxconv.conv_general_dilated(x, w, op="min_plus", **kw)  # no second warning


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "native.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.native", "--smoke", "--layers", "A,C,E", "--ops",
         "max_plus,adder", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True and data["meta"]["threads"] >= 1
    assert {(r["layer"], r["op"]) for r in data["results"]} == {
        (a, b) for a in "ACE" for b in ("max_plus", "adder")}
    for r in data["results"]:
        assert r["fwd_ratio"] > 0 and r["fwd_bwd_ratio"] > 0 and r["compile_s"] > 0


# --- adversarial numerics (issue 25): overflow in the min form, signed zeros, denormals ------


@pytest.mark.parametrize("name,wrow,expected", [
    ("adder", [3e38, 3e38, -3e38], [-3e38, -3e38, -3e38]),
    ("l1", [1e38, 1e38, 1e38, -2e38], [-1e38, -1e38, -1e38, -2e38]),
])
def test_absolute_difference_sums_do_not_overflow_on_large_finite_data(name, wrow, expected):
    """The min form's centring must not overflow where the direct sum does not."""
    w = jnp.asarray([wrow], jnp.float32)
    y = jaxconv.dot_general(jnp.zeros((1, 1), jnp.float32), w, (((1,), (0,)), ((), ())),
                            op=name, engine="native")
    np.testing.assert_array_equal(np.asarray(y), np.asarray([expected], np.float32))


@pytest.mark.parametrize("name", ["adder", "l1"])
@pytest.mark.parametrize("scale", [1e28, 1e36])
def test_absolute_difference_sums_on_large_data_match_the_reference(name, scale):
    x, w, kw = _case("2d_same", seed=11)
    x, w = x * np.float32(scale), w * np.float32(scale)
    y = np.asarray(_conv(name, "native", kw)(x, w))
    ref = _reference(name, x.astype(np.float64), w.astype(np.float64), kw)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=0)


def _key_extreme(vals: np.ndarray, axis: int, largest: bool) -> np.ndarray:
    """max / min with -0 ordered below +0 (lax.max / lax.min), via order-preserving keys."""
    b = np.ascontiguousarray(vals, np.float32).view(np.int32)
    keys = b ^ ((b >> 31) & 0x7FFFFFFF)
    k = keys.max(axis=axis) if largest else keys.min(axis=axis)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).astype(np.int32).view(np.float32)


def _signed_zero_reference(name, x, w):
    """A VALID 1-D convolution (N, L, C) x (K, C, O) under the signed-zero rule."""
    k = w.shape[0]
    cols = np.stack([x[:, t:x.shape[1] - k + 1 + t, :] for t in range(k)], axis=2)
    a, b = cols[..., None], w[None, None]  # (N, P, K, C, 1), (1, 1, K, C, O)
    with np.errstate(invalid="ignore"):
        if name in ("max_plus", "min_plus"):
            prod = a + b
        else:  # the combine's own zero rule: min(-0, +0) = -0, max(-0, +0) = +0
            both = np.broadcast_arrays(a, b)
            prod = _key_extreme(np.stack(both), 0, largest=name == "min_max")
    prod = prod.reshape(*prod.shape[:2], -1, prod.shape[-1])
    return _key_extreme(prod, 2, largest=name.startswith("max"))


@pytest.mark.parametrize("name", MAXMIN)
@pytest.mark.parametrize("path", ["issue", "packed", "depthwise", "non_finite"])
def test_signed_zeros_follow_one_rule_on_every_engine(name, path):
    """-0 orders below +0 in every max / min (lax.max / lax.min): bit for bit on both engines,
    on the packed (keyed or float), depthwise and NaN-propagating paths."""
    if path == "issue":
        x = np.asarray([-0.0, 0.0, -0.0], np.float32).reshape(1, 3, 1)
        w = np.asarray([0.0, -0.0, -0.0], np.float32).reshape(3, 1, 1)
    else:
        rng = np.random.default_rng(3)
        c, o = (5, 5) if path == "depthwise" else (3, 17)
        x = np.where(rng.random((2, 9, c)) < 0.5, -0.0, 0.0).astype(np.float32)
        w = np.where(rng.random((3, 1 if path == "depthwise" else c, o)) < 0.5,
                     -0.0, 0.0).astype(np.float32)
        if path == "non_finite":  # an infinity in one window: the NaN-propagating loop
            x[1, 8, 0] = np.inf if name.startswith("min") else -np.inf
    groups = 5 if path == "depthwise" else 1
    kw = dict(window_strides=(1,), padding="VALID", dimension_numbers=_dn(3),
              feature_group_count=groups)
    a = np.asarray(_conv(name, "native", kw)(x, w))
    with _allow():
        b = np.asarray(_conv(name, "xla", kw)(x, w))
    np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))
    if groups == 1 and path != "non_finite":
        ref = _signed_zero_reference(name, x, w)
        np.testing.assert_array_equal(a.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("name", ["max_min", "min_max"])
@pytest.mark.parametrize("taps", [(0.0, 0.0, -0.0), (0.0, -0.0, -0.0)])
def test_signed_zero_ties_split_like_jnp_max(name, taps):
    """A +0 / -0 tie is a tie (jax.grad of jnp.max splits between equal floats), on the
    integer-key path (two output channels: not depthwise) as on the float path."""
    x = jnp.zeros((1, 3, 1), jnp.float32)
    w = jnp.asarray(np.repeat(np.asarray(taps, np.float32).reshape(3, 1, 1), 2, axis=2))
    kw = dict(window_strides=(1,), padding="VALID", dimension_numbers=_dn(3))
    red = jnp.max if name.startswith("max") else jnp.min
    comb = jnp.minimum if name == "max_min" else jnp.maximum

    def naive(x, w):
        return jnp.sum(red(comb(x[0, :, :, None], w), axis=(0, 1)))

    want = jax.grad(naive, argnums=(0, 1))(x, w)
    for engine in ("native", "xla"):
        with _allow():
            got = jax.grad(lambda x, w, e=engine: jnp.sum(jaxconv.conv_general_dilated(
                x, w, op=name, engine=e, **kw)), argnums=(0, 1))(x, w)
        for g, e in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=0)


DENORMAL = np.float32(1e-40)


@pytest.mark.parametrize("name", MAXMIN)
@pytest.mark.parametrize("path", ["packed", "depthwise"])
def test_denormals_read_as_zero_on_every_path(name, path):
    """One rule (XLA CPU's): denormal inputs read as zero of their sign and denormal results
    flush to zero. The result of a window does not change when an unrelated input becomes
    infinite (which switches the native kernels to their NaN-propagating loop)."""
    rng = np.random.default_rng(4)
    c, o = (4, 4) if path == "depthwise" else (3, 5)
    x = (rng.integers(-3, 4, (1, 12, c)) * DENORMAL).astype(np.float32)
    w = np.where(rng.random((3, 1 if path == "depthwise" else c, o)) < 0.5, 1.0,
                 -1.0).astype(np.float32) * rng.choice([1.0, DENORMAL], (3, 1, o))
    w = w.astype(np.float32)
    kw = dict(window_strides=(1,), padding="VALID", dimension_numbers=_dn(3),
              feature_group_count=c if path == "depthwise" else 1)
    finite = np.asarray(_conv(name, "native", kw)(x, w))
    x_inf = x.copy()
    x_inf[0, 11, 0] = np.inf
    with_inf = np.asarray(_conv(name, "native", kw)(x_inf, w))
    with _allow():
        xla = np.asarray(_conv(name, "xla", kw)(x, w))
    np.testing.assert_array_equal(finite.view(np.int32), xla.view(np.int32))
    np.testing.assert_array_equal(finite[:, :8].view(np.int32), with_inf[:, :8].view(np.int32))
    # The rule, by hand: flush the inputs, compute in float64 (no denormal result survives
    # the flush of a float32 result either).
    flush = lambda a: np.where(np.abs(a) < np.finfo(np.float32).tiny, 0.0 * a, a)  # noqa: E731
    ref = _reference(name, flush(x).astype(np.float64), flush(w).astype(np.float64), kw)
    np.testing.assert_array_equal(finite, flush(ref.astype(np.float32)))
    assert not (np.abs(finite[finite != 0]) < np.finfo(np.float32).tiny).any()


def test_kernel_table_is_the_librarys_own_list():
    """The op list is defined once in C++ (csrc/problem.h) and the Python table equals it."""
    from jaxconv import _native

    built = {name: (int(kid), str(red)) for name, (kid, red) in _native.kernels().items()}
    assert built == ffi.KERNELS
    assert sorted(kid for kid, _ in built.values()) == list(range(len(built)))


@pytest.mark.parametrize("stale", ["no_table", "other_table"])
def test_a_stale_library_is_not_loaded_and_import_survives(monkeypatch, stale):
    """A library built from other sources (no op table, or another one) makes the native
    engine unavailable with the reason; it never breaks `import jaxconv`."""
    import types

    fake = types.ModuleType("jaxconv._native")
    if stale == "other_table":
        fake.kernels = lambda: {"max_plus": (1, "max")}
    monkeypatch.setitem(sys.modules, "jaxconv._native", fake)
    monkeypatch.setattr(jaxconv, "_native", fake, raising=False)
    monkeypatch.setitem(ffi._state, "loaded", False)
    monkeypatch.setitem(ffi._state, "module", None)
    monkeypatch.setitem(ffi._state, "error", None)
    assert ffi.available() is False
    want = "AttributeError" if stale == "no_table" else "stale build"
    assert want in ffi.load_error()
