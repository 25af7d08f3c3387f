"""User ops compiled into the native CPU engine (``codegen``, ``user_kernels``).

The translation of each primitive is checked against ``jax.numpy`` on a grid of values with
zeros, infinities and NaN (a dense product with a contraction of one is the combine itself);
the generated kernels against the numpy loop reference and the XLA engine over a covering set
of user ops and geometries, gradients included; the cache, the file lock and every fallback
(an untranslated primitive, no compiler, a failing compiler) in fresh processes.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from geometries import conv as _conv
from geometries import data, table
from geometries import grads as _grads
from native_checks import (
    assert_gradients_match_finite_differences,
    assert_gradients_match_xla,
    assert_matches_reference_and_xla,
    assert_specials_as_xla,
)
from reference import conv_reference, dot_general_reference
from subprocess_helpers import result, run_user_op, user_op_command, user_op_env

import jaxconv
from jaxconv._src.engines import native
from jaxconv._src.engines.native import codegen, translation

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.float32
SPECIAL = np.array([-7.25, -2.0, -1.0, -0.5, -0.0, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0, 20.0,
                    1e-30, -1e30, np.inf, -np.inf, np.nan], F32)


def _pairs(fn, reduce="sum", **kw):
    """``fn`` on every pair of SPECIAL values, by the native engine and by jnp."""
    op = _pair_op(fn, reduce, **kw)
    x = SPECIAL.reshape(-1, 1)
    w = SPECIAL.reshape(1, -1)
    dn = (((1,), (0,)), ((), ()))
    got = jax.jit(lambda a, b: jaxconv.dot_general(a, b, dn, op=op, engine="native"))(x, w)
    want = fn(jnp.asarray(np.broadcast_to(x, (x.size, w.size))),
              jnp.asarray(np.broadcast_to(w, (x.size, w.size))))
    return np.asarray(got), np.asarray(want)


# One entry per translated primitive (the name is the primitive); "exact" ones are IEEE
# operations, the others libm / vmath functions (a few ulp). Each function mixes x and w before
# the primitive, so that it stays inside the generated kernel (a map of x or of w alone would
# run outside it, once per element).
PRIMITIVES = {
    "add": (lambda x, w: x + w, True), "sub": (lambda x, w: x - w, True),
    "mul": (lambda x, w: (x * w) * 1.0, True), "div": (lambda x, w: x / w, True),
    "neg": (lambda x, w: -(x - w), True), "abs": (lambda x, w: jnp.abs(x - w), True),
    "sign": (lambda x, w: jnp.sign(x - w), True),
    "max": (lambda x, w: jnp.maximum(x, w), True), "min": (lambda x, w: jnp.minimum(x, w), True),
    "exp": (lambda x, w: jnp.exp(x - w), False), "exp2": (lambda x, w: jnp.exp2(x - w), False),
    "log": (lambda x, w: jnp.log(x - w), False),
    "log1p": (lambda x, w: jnp.log1p(x * w), False),
    "expm1": (lambda x, w: jnp.expm1(x * w), False),
    "tanh": (lambda x, w: jnp.tanh(x - w), False),
    "logistic": (lambda x, w: jax.nn.sigmoid(x - w), False),
    "sqrt": (lambda x, w: jnp.sqrt(x - w), False),
    "rsqrt": (lambda x, w: jax.lax.rsqrt(x - w), False),
    "cbrt": (lambda x, w: jnp.cbrt(x - w), False),
    "pow": (lambda x, w: jnp.power(x, w), False),
    "integer_pow": (lambda x, w: (x - w) ** 3 - (x * w) ** -2, True),
    "square": (lambda x, w: jnp.square(x - w), True),
    "floor": (lambda x, w: jnp.floor(x * w), True), "ceil": (lambda x, w: jnp.ceil(x * w), True),
    "round": (lambda x, w: jnp.round(x * w) + jax.lax.round(x - w), True),
    "compare": (lambda x, w: jnp.where(x < w, 1.0, 0.0) + jnp.where(x <= w, 2.0, 0.0)
                + jnp.where(x > w, 4.0, 0.0) + jnp.where(x >= w, 8.0, 0.0)
                + jnp.where(x == w, 16.0, 0.0) + jnp.where(x != w, 32.0, 0.0), True),
    "logic": (lambda x, w: jnp.where((x > 0) & (w > 0) | ~(x < w) ^ (w == 1.0), x, w), True),
    "select_n": (lambda x, w: jnp.where(x > w, x * 2.0, w), True),
    "clamp": (lambda x, w: jax.lax.clamp(-1.0, x - w, 2.0), True),
    "convert": (lambda x, w: (x > w).astype(jnp.float32) + w, True),
    "is_finite": (lambda x, w: jnp.where(jnp.isfinite(x * w), w, 0.0), True),
    "trig": (lambda x, w: jnp.sin(x - w) + jnp.cos(x * w) + jnp.arctan(x - w)
             + jnp.arctan2(x, w), False),
    "hyperbolic": (lambda x, w: jnp.sinh(x - w) + jnp.cosh(x * w) + jnp.arcsinh(x - w), False),
    "erf": (lambda x, w: jax.scipy.special.erf(x - w), False),
    "rem": (lambda x, w: jnp.fmod(x, w), True),
    "constants": (lambda x, w: (x - w) * np.float32(0.1) + jnp.pi, True),
}


# Two entries run under max and min, each kernel of its own (the others under sum): with a
# contraction of one the reduce of a pair is the combine, so the max and min kernels are
# checked on the same pairs, without compiling a kernel more.
PAIR_REDUCE = {"select_n": "max", "compare": "min"}


def _pair_op(fn, reduce="sum", **kw):
    return jaxconv.Op(fn, reduce, name=f"test_{reduce}", **kw)


@pytest.fixture(scope="module")
def table_kernels():
    """Compiles the kernels of PRIMITIVES and USER_OPS at once, one compiler per core (they
    are cached); the tests that run them ask for it, so a run of the others compiles none."""
    ops = [_pair_op(fn, PAIR_REDUCE.get(name, "sum")) for name, (fn, _) in PRIMITIVES.items()]
    ops += [_inner(op) for op, *_ in USER_OPS.values()]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(native.user_kernel, ops))


@pytest.mark.usefixtures("table_kernels")
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_each_primitive_matches_jnp(name):
    fn, exact = PRIMITIVES[name]
    got, want = _pairs(fn, PAIR_REDUCE.get(name, "sum"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    if exact:
        np.testing.assert_array_equal(got, want)
    else:  # libm against XLA's approximations: a few ulp of the operands' scale
        np.testing.assert_allclose(got, want, rtol=3e-6, atol=3e-7)


def test_integer_dtypes_run_the_wide_kernels():
    """An integer user op compiles for the wide kernels (tests/test_user_wide.py has more)."""
    op = jaxconv.Op(lambda x, w: jnp.maximum(x - w, 0), "sum", name="int_op")
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    w = np.arange(8, dtype=np.int32).reshape(4, 2)
    dn = (((1,), (0,)), ((), ()))
    f = jax.jit(lambda a, b: jaxconv.dot_general(a, b, dn, op=op, engine="native"))
    assert "jaxconv_wide_forward" in f.lower(x, w).as_text()
    got = f(x, w)
    want = dot_general_reference(x, w, dn, combine=lambda a, b: np.maximum(a - b, 0),
                                 reduce=np.add, identity=0)
    np.testing.assert_array_equal(np.asarray(got), want)


# --- kernels against the numpy reference and the XLA engine ------------------------------------

def _tanh_sub(x, w):
    return np.tanh(np.subtract(x, np.multiply(x, w)))


def _clip_mul(x, w):
    return np.clip(np.multiply(x, w), -1.0, 1.0)


def _tanh_x_mul(x, w):
    return np.tanh(x) * w


def _gauss(x, w):
    return np.exp(-np.square(np.subtract(x, w)))


def _x_gauss(x, w):
    return np.multiply(x, _gauss(x, w))


def _hinge(x, w):
    return np.where(x > w, x - w, 0.5 * (w - x))


USER_OPS = {
    # name: (op, numpy combine, numpy reduce, identity)
    # x - x * w: compiled (tanh(x - w) runs on max_plus's kernels, as x + (-w)).
    "tanh_sub_max": (jaxconv.Op(lambda x, w: jnp.tanh(x - x * w), "max"), _tanh_sub,
                     np.maximum, -math.inf),
    "clip_mul_max": (jaxconv.Op(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "max"), _clip_mul,
                     np.maximum, -math.inf),
    "tanh_x_mul_max": (jaxconv.Op(lambda x, w: jnp.tanh(x) * w, "max"), _tanh_x_mul,
                       np.maximum, -math.inf),
    # (x - w) ** 2 (the square is x_gauss_max's and PRIMITIVES'): tests/test_native_dtypes.py's
    # GAUSS, one kernel for the session.
    "gauss_sum": (jaxconv.Op(lambda x, w: jnp.exp(-((x - w) ** 2)), "sum"), _gauss, np.add,
                  0.0),
    # Heavy partials with a pad value: the sums' one-pass backward over pad terms
    # (csrc/kernel_sums_heavy.h).
    "gauss_sum_pad": (jaxconv.Op(lambda x, w: jnp.exp(-((x - w) ** 2)), "sum", pad_value=0.5),
                      _gauss, np.add, 0.0),
    # Heavy partials whose kernel partial is the negated one (codegen.signed_function: kNegCw;
    # the Gaussian's is kNegCx).
    "tanh_sum": (jaxconv.Op(lambda x, w: jnp.tanh(x - w), "sum"),
                 lambda x, w: np.tanh(np.subtract(x, w)), np.add, 0.0),
    # A heavy combine under max (not monotone in one map: the kernels' own heavy tile and its
    # pairs of products, csrc/kernel_heavy.h, also on the NaN-safe path).
    "x_gauss_max": (jaxconv.Op(lambda x, w: x * jnp.exp(-jnp.square(x - w)), "max"), _x_gauss,
                    np.maximum, -math.inf),
    "hinge_min": (jaxconv.Op(lambda x, w: jnp.where(x > w, x - w, 0.5 * (w - x)), "min"),
                  _hinge, np.minimum, math.inf),
    "cube_sum_pad": (jaxconv.Op(lambda x, w: (x - w) ** 3, "sum", pad_value=0.5),
                     lambda x, w: np.subtract(x, w) ** 3, np.add, 0.0),
    # A callable reduce (canonicalised to max); the combine is tests/test_winners.py's
    # fmsub_max, one kernel for the session.
    "callable_max": (jaxconv.Op(lambda x, w: x * w - x, jnp.maximum, identity=-math.inf),
                     lambda x, w: x * w - x, np.maximum, -math.inf),
}
GEOMETRIES = table("2d_same", "1d_stride", "rhs_dil_groups", "depthwise", ("3d", "3d_no_dil"),
                   "lhs_dil_empty", "wide", "channels_80")
# A covering set: every op and every geometry at least once, not their product.
COVER = [("tanh_sub_max", "2d_same"), ("tanh_sub_max", "lhs_dil_empty"),
         ("clip_mul_max", "rhs_dil_groups"), ("clip_mul_max", "wide"),
         ("tanh_x_mul_max", "depthwise"), ("tanh_x_mul_max", "2d_same"),
         ("gauss_sum", "1d_stride"), ("gauss_sum", "3d"), ("hinge_min", "rhs_dil_groups"),
         ("hinge_min", "lhs_dil_empty"), ("cube_sum_pad", "2d_same"),
         ("cube_sum_pad", "1d_stride"), ("callable_max", "wide"), ("callable_max", "3d"),
         ("x_gauss_max", "2d_same")]


# Max / min of these give the XLA engine's numbers bit for bit (but a mul next to an add may
# be contracted into an fma by XLA).
EXACT = {"add", "sub", "max", "min", "neg", "abs", "select_n", "gt", "lt", "ge", "le", "eq",
         "mul"}


def _inner(op):
    """The op the kernels compute (its monotone tail runs once per output)."""
    form = jaxconv._src.core.factoring.factored_form(op, F32)
    return op if form is None else form.inner


def _data(geometry, seed=0, specials=False):
    return data(GEOMETRIES[geometry], seed, specials)


@pytest.mark.usefixtures("table_kernels")
@pytest.mark.parametrize("name, geometry", COVER)
def test_kernels_match_reference_and_xla(name, geometry):
    op, combine, reduce, identity = USER_OPS[name]
    x, w, kw = _data(geometry)
    # Close to both; libm against XLA's approximations, and XLA may contract x * w - w into an
    # fma. Without either, max / min of the same products are the XLA engine's bit for bit.
    got, xla = assert_matches_reference_and_xla(op, kw, x, w, combine, reduce, identity)
    used = set(codegen.functor(_inner(op)).primitives)
    fma = "mul" in used and used & {"add", "sub"}
    if reduce is not np.add and used <= EXACT and not fma:
        np.testing.assert_array_equal(got, xla)


@pytest.mark.usefixtures("table_kernels")
@pytest.mark.parametrize("name", ["tanh_sub_max", "tanh_x_mul_max", "hinge_min", "gauss_sum",
                                  "x_gauss_max"])
def test_nan_and_infinity_as_the_xla_engine(name):
    op = USER_OPS[name][0]
    x, w, kw = _data("2d_same", seed=3, specials=True)
    assert_specials_as_xla(op, kw, x, w)


@pytest.mark.usefixtures("table_kernels")
@pytest.mark.parametrize("name, geometry", [("tanh_sub_max", "rhs_dil_groups"),
                                            ("tanh_x_mul_max", "2d_same"),
                                            ("gauss_sum", "3d"), ("hinge_min", "depthwise"),
                                            ("cube_sum_pad", "1d_stride")])
def test_gradients_match_xla_engine(name, geometry):
    op = USER_OPS[name][0]
    x, w, kw = _data(geometry, seed=4)
    assert_gradients_match_xla(op, kw, x, w, seed=5)


# Input channels in whole vectors (per group: 16 on AVX-512, 8 on AVX2) and at least four of
# them: the sums' one-pass backward (csrc/kernel_sums_heavy.h), whose rows of two positions
# leave one over where a tap has an odd number of terms.
HEAVY_SUM_GEOMETRIES = table("channels_80") | {
    # Two groups of 32 channels, strided and dilated, 15 positions (odd).
    "groups_32_stride_dil": ((1, 5, 5, 64), (3, 2, 32, 10), dict(
        window_strides=(2, 1), padding="SAME", rhs_dilation=(1, 2), feature_group_count=2)),
    # A dense (1x1) product of 35 positions.
    "dense_64": ((1, 5, 7, 64), (1, 1, 64, 33), dict(window_strides=(1, 1), padding="VALID")),
}


@pytest.mark.usefixtures("table_kernels")
@pytest.mark.parametrize("name, geometry, specials", [
    ("gauss_sum", "channels_80", True), ("gauss_sum_pad", "channels_80", False),
    ("tanh_sum", "groups_32_stride_dil", False), ("gauss_sum_pad", "groups_32_stride_dil", False),
    ("gauss_sum", "dense_64", False), ("tanh_sum", "dense_64", True)])
def test_heavy_sum_gradients_in_one_pass(name, geometry, specials):
    """Whole vectors of input channels: both gradients of a heavy combine under sum come from
    one pass (csrc/kernel_sums_heavy.h), with either partial stored negated (the Gaussian's
    input partial, tanh's kernel partial), groups, strides, dilations, a dense product, pad
    terms and NaN / infinite inputs."""
    op = USER_OPS[name][0]
    x, w, kw = data(HEAVY_SUM_GEOMETRIES[geometry], 9, specials)
    assert_gradients_match_xla(op, kw, x, w, seed=10)


def test_signed_partials_carry_negations_out_of_products():
    """The one-pass loop's partials (codegen.signed_function): negations leave the products
    for its multiply-adds, sums and doublings go to the add ports, and an exponential's
    negated argument is still negated."""
    src = codegen.functor(USER_OPS["gauss_sum"][0]).source
    body = src[src.index("static void dparts"):]
    body = body[:body.index("\n  }")]
    assert "kNegCx = true;" in src and "kNegCw = false;" in src
    assert "u_neg" not in body and body.count("T::neg(") == 1  # exp(-(x - w)^2)'s argument
    assert "T::sub(x, w)" in body and "T::add(v0, v0)" in body
    assert "kNegCx = false;" in codegen.functor(USER_OPS["tanh_sum"][0]).source
    # No negation at all: neither partial is stored negated.
    plain = codegen.functor(jaxconv.Op(lambda x, w: jnp.exp(x * w), "sum")).source
    assert "kNegCx = false;" in plain and "kNegCw = false;" in plain


@pytest.mark.usefixtures("table_kernels")
def test_gradient_matches_finite_differences():
    op = USER_OPS["gauss_sum"][0]
    x, w, kw = _data("1d_stride", seed=6)
    x, w = x.astype(np.float64), w.astype(np.float64)
    ct = np.random.default_rng(7).standard_normal(
        _conv(op, "native", kw)(x.astype(F32), w.astype(F32)).shape)
    gx, gw = _grads(op, "native", kw, x.astype(F32), w.astype(F32), ct.astype(F32))

    def f(a, b):
        k = dict(kw)
        y = conv_reference(a, b, k.pop("window_strides"), k.pop("padding"), None, None,
                           k.pop("dimension_numbers"), combine=_gauss, reduce=np.add,
                           identity=0.0)
        return float(np.sum(y * ct))

    assert_gradients_match_finite_differences(f, x, w, (gx, gw), eps=1e-4, seed=8)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_relaxed_min_max_keep_nan_zero_signs_and_ties(reduce):
    # min / max feeding only NaN- and zero-transparent operations run as the plain vector
    # instructions in the fast loop (native/relaxed.py); the result must stay the XLA
    # engine's bit for bit: zero signs, ties, NaN and infinities.
    def comb(x, w):
        return jnp.minimum(x, w) - 0.5 * w if reduce == "max" else jnp.maximum(x, w) + w

    op = jaxconv.Op(comb, reduce, name=f"relaxed_{reduce}")
    assert "T::min(x, w)" in codegen.functor(op).source or reduce == "min"
    x, w, kw = _data("2d_same", seed=11)
    x, w = np.round(x * 2) / 2, np.round(w * 2) / 2  # ties and zero products
    x.reshape(-1)[::7] = -0.0
    w.reshape(-1)[::5] = -0.0
    got = np.asarray(_conv(op, "native", kw)(x, w))
    with jax.numpy_rank_promotion("allow"):
        want = np.asarray(_conv(op, "xla", kw)(x, w))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert_gradients_match_xla(op, kw, x, w, seed=12)
    xs = x.copy()
    xs.reshape(-1)[[3, 40, 77]] = [np.nan, np.inf, -np.inf]
    assert_specials_as_xla(op, kw, xs, w)


@pytest.mark.usefixtures("table_kernels")
def test_vmap_of_a_user_op_is_the_batched_call():
    op = USER_OPS["clip_mul_max"][0]
    x, w, kw = _data("2d_same", seed=9)
    f = _conv(op, "native", kw)
    batched = np.asarray(f(x, w))
    mapped = np.asarray(jax.vmap(lambda a: f(a[None], w)[0])(x))
    np.testing.assert_array_equal(mapped, batched)


# --- planner, explain, refusals -----------------------------------------------------------------

@pytest.mark.usefixtures("table_kernels")
def test_auto_compiles_vectorized_ops_and_explains():
    op = USER_OPS["tanh_x_mul_max"][0]
    plan = jaxconv.explain(op, platform="cpu")
    assert plan.engine == "native"
    assert any("compiled user kernel" in d for d in plan.details)
    assert any("('tanh',)" in d for d in plan.details)
    assert "engine 'native'" in str(plan)


@pytest.mark.usefixtures("table_kernels")
def test_auto_keeps_lane_by_lane_math_on_xla():
    op = jaxconv.Op(lambda x, w: jnp.cbrt(x - w), "sum", name="cbrt_op")
    assert codegen.functor(op).scalar == ("cbrt",)
    plan = jaxconv.explain(op, platform="cpu")
    assert plan.engine == "xla" and "lane by lane" in plan.details[0]
    assert jaxconv.explain(USER_OPS["gauss_sum"][0], platform="cpu").engine == "native"


def test_planning_compiles_nothing(monkeypatch):
    # The planner reads the eligibility decision; compiling is the first lowering's.
    from jaxconv._src.core import planner
    from jaxconv._src.core.geometry import Geometry
    from jaxconv._src.core.problem import Problem
    from jaxconv._src.engines.native import user_kernels

    op = jaxconv.Op(lambda x, w: jnp.tanh(x - w) * 0.25, "max", name="planned_only")
    built = []
    monkeypatch.setattr(user_kernels, "build", built.append)
    geom = Geometry((5,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
    f32 = np.dtype("float32")
    problem = Problem(op, geom, "auto", f32, 2**20, None, f32)
    assert planner.engine_name(problem, f32, "cpu") == "native"
    assert built == [] and user_kernels.built(op) is None


def test_untranslated_primitive():
    op = jaxconv.Op(lambda x, w: jax.lax.lgamma(x * x + 1.0) - w, "max", name="lgamma_op")
    x, w, kw = _data("2d_same")
    with pytest.raises(ValueError, match=r"lgamma_op.*primitive 'lgamma' is not translated"):
        jaxconv.conv_general_dilated(x, w, op=op, engine="native", **kw)
    assert jaxconv.explain(op, platform="cpu").engine == "xla"
    # auto: silently the XLA engine.
    y = jaxconv.conv_general_dilated(x, w, op=op, **kw)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_conv(op, "xla", kw)(x, w)))


def test_multiply_and_add_stays_a_standard_convolution():
    op = jaxconv.Op(lambda x, w: x * w, "sum", name="mymult")
    assert "multiply-and-add" in translation.translation(op).reason


@pytest.mark.usefixtures("table_kernels")
@pytest.mark.parametrize("name", ["clip_mul_max", "gauss_sum"])
def test_optimization_level_keeps_the_bits(monkeypatch, name):
    """The suite compiles user ops at ``$JAXCONV_USER_OPT=-O1`` (tests/conftest.py); the
    package's own flags (-O3) give the same bits, forward and backward: no fast-math and no
    contraction at any level."""
    assert os.environ.get("JAXCONV_USER_OPT") == "-O1"
    op = USER_OPS[name][0]
    x, w, kw = _data("2d_same", seed=12, specials=True)
    ct = np.random.default_rng(13).standard_normal(
        _conv(op, "native", kw)(x, w).shape).astype(F32)
    low = (_conv(op, "native", kw)(x, w), *_grads(op, "native", kw, x, w, ct))
    monkeypatch.delenv("JAXCONV_USER_OPT")
    package = op.replace(name=f"{name}_package_flags")  # not the -O1 op's compiled kernels
    assert native.user_kernel(_inner(package)).path != native.user_kernel(_inner(op)).path
    high = (_conv(package, "native", kw)(x, w), *_grads(package, "native", kw, x, w, ct))
    for a, b in zip(low, high, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimization_level_is_checked(monkeypatch):
    monkeypatch.setenv("JAXCONV_USER_OPT", "-Ofast")
    with pytest.raises(ValueError, match="JAXCONV_USER_OPT"):
        native.user_kernel(jaxconv.Op(lambda x, w: jnp.sin(x * w), "max", name="bad_opt"))


# --- the cache and the fallbacks, in fresh processes ------------------------------------------

def _combine(scale):
    # x * w: compiled (tanh(x - w) would run on max_plus's kernels, as x + (-w)).
    return f"jnp.tanh(x * w) * {scale}"


def _run(tmp_path, scale="1.0", **env):
    return run_user_op(tmp_path, _combine(scale), "cached_op", **env)


def test_processes_compiling_one_op_at_once_then_a_cache_hit(tmp_path):
    # Two processes at once: one compiles, the other waits for it and loads the library; a
    # third process, after both, loads it from the cache.
    procs = [subprocess.Popen(user_op_command(_combine("2.0"), "cached_op"),
                              env=user_op_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    results = [result(o) for o, _ in outs]
    assert sorted(r["compiled"] for r in results) == [False, True]  # one compiled, one waited
    later = _run(tmp_path, scale="2.0")
    assert later["compiled"] is False
    for r in (*results, later):
        assert r["equal_to_xla"] and r["warnings"] == [] and r["native_error"] is None
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1


@pytest.mark.parametrize("cxx, message", [("/nonexistent/c++", "no C\\+\\+ compiler"),
                                          ("false", "C\\+\\+ compiler .* failed")])
def test_compile_failure_falls_back_with_one_warning(tmp_path, cxx, message):
    out = _run(tmp_path, scale="3.0", JAXCONV_CXX=cxx)
    assert out["compiled"] is None and out["equal_to_xla"]
    (warning,) = out["warnings"]
    assert "cached_op" in warning and "XLA engine" in warning
    assert re.search(message, warning)
    assert "cached_op" in out["native_error"] and "compile" in out["native_error"]
