"""logsumexp on the native engine: the built-in ``log`` (exp space, and the kernel of
``csrc/kernel_logsum.h`` where exp space is not exact) and user combines under logsumexp
(compiled into that kernel).

Values against the numpy loop reference (``reference.py``), gradients against the XLA engine
and against ``jax.grad`` of a brute-force ``jax.nn.logsumexp`` over explicit windows, over a
covering set of geometries and of the contract's cases: all -inf windows, NaN, spreads beyond
80, values of +-1e4; and the one-pass kernel's own cases: a running maximum that moves far
(a ramp along the taps), +inf beside finite windows in a tile, windows below its first
reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from geometries import dn as _dn
from geometries import table
from jax.test_util import check_grads
from reference import conv_reference

import jaxconv
from jaxconv._src.engines import native
from jaxconv._src.engines.native import codegen

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

INF = math.inf
# The seed's own op: recognised as logsumexp from the traced program of jnp.logaddexp.
SEED = jaxconv.Op(lambda a, b: -(a - b) ** 2, jnp.logaddexp, identity=-INF, name="seed")
MUL_LSE = jaxconv.Op(lambda a, b: a * b, "logsumexp", name="mul_lse")
# A padded op (pad_value: padded taps are terms of dw, their dx dropped).
SEED_PAD = jaxconv.Op(lambda a, b: -(a - b) ** 2, jnp.logaddexp, identity=-INF, pad_value=0.5,
                      name="seed_pad")
# Numpy combines of the ops (the reference folds them with np.logaddexp from -inf).
COMBINES = {"log": np.add, "seed": lambda a, b: -np.square(a - b), "mul_lse": np.multiply,
            "seed_pad": lambda a, b: -np.square(a - b)}
OPS = {"log": "log", "seed": SEED, "mul_lse": MUL_LSE, "seed_pad": SEED_PAD}

GEOMS = table("2d_same", ("2d_stride_dil", "2d_stride_rhs_dil"), "2d_lhs_dil", "1d_valid", "3d",
              "groups", "depthwise", "wide", "channels_80", "dense_wide")
# Input channels in whole vectors (per group; 16 fill an AVX-512 vector, 8 an AVX2 one): the
# backward's loop with vectors over them (csrc/kernel_lsebwd_ivec.h), with a single image
# (one split of the images), three (uneven splits), strides and dilation, and groups.
GEOMS |= {
    "vec_same": ((3, 6, 5, 32), (3, 3, 32, 5), dict(window_strides=(1, 1), padding="SAME")),
    "vec_one_image": ((1, 5, 4, 16), (3, 3, 16, 7), dict(window_strides=(1, 1),
                                                         padding="SAME")),
    "vec_stride_dil": ((2, 9, 8, 16), (3, 2, 16, 6), dict(
        window_strides=(2, 1), padding=((1, 2), (2, 0)), rhs_dilation=(1, 2))),
    "vec_groups": ((2, 5, 6, 64), (3, 3, 32, 6), dict(
        window_strides=(1, 1), padding="SAME", feature_group_count=2)),
}


def _data(geom: str, regime: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Operands of a geometry in one of the contract's regimes."""
    xs, ws, _ = GEOMS[geom]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    if regime == "spread":  # windows far apart: beyond the exp-space path's ~80
        x = (x * 60).astype(np.float32)
    elif regime == "neg_inf":  # all -inf windows among them
        x[rng.random(x.shape) < 0.6] = -INF
        w[rng.random(w.shape) < 0.2] = -INF
    elif regime == "nan":
        x.reshape(-1)[x.size // 3] = np.nan
    elif regime == "big":
        x = np.where(rng.random(x.shape) < 0.5, 1e4, -1e4).astype(np.float32) + x
    elif regime == "ramp":  # later taps far above earlier ones: the running reference moves
        x = x + (50.0 * np.arange(x.shape[1])).reshape((1, -1) + (1,) * (x.ndim - 2))
        x = x.astype(np.float32)
    elif regime == "pos_inf":  # +inf (and a NaN beside one) in tiles of finite windows
        flat = x.reshape(-1)
        flat[[3, x.size // 2]] = INF
        flat[x.size // 2 + 1] = np.nan
    elif regime == "huge_neg":  # finite windows below the one-pass kernel's first reference
        x[0] = -3e31  # (terms x + w)
    elif regime == "far_neg":  # the same for -(x - w)**2
        x[0] = -2e16
    elif regime == "huge":  # terms of magnitude 2^24 and more, where m L's rounding (up to
        # 256 at 3e9) overflowed the sum: inf out, NaN gradients (tests/fuzz.py, seed 100065)
        x = (x * 3e9).astype(np.float32)
    return x, w


def _conv(op: object, geom: str, engine: str = "native"):
    _, _, kw = GEOMS[geom]
    ndim = len(GEOMS[geom][0])

    def f(x, w):
        return jaxconv.conv_general_dilated(x, w, op=op, engine=engine,
                                            dimension_numbers=_dn(ndim), **kw)

    return f


def _reference(name: str, geom: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    _, _, kw = GEOMS[geom]
    kw = dict(kw)
    return conv_reference(x, w, kw.pop("window_strides"), kw.pop("padding"),
                          dimension_numbers=_dn(x.ndim), combine=COMBINES[name],
                          reduce=np.logaddexp, identity=-INF, **kw)


FORWARD = [
    ("log", "2d_same", "normal"), ("log", "2d_stride_dil", "spread"),
    ("log", "2d_lhs_dil", "neg_inf"), ("log", "1d_valid", "nan"), ("log", "3d", "big"),
    ("log", "groups", "spread"), ("log", "depthwise", "neg_inf"), ("log", "wide", "spread"),
    ("seed", "2d_same", "spread"), ("seed", "groups", "neg_inf"), ("seed", "wide", "normal"),
    ("seed", "1d_valid", "nan"), ("seed", "3d", "normal"), ("mul_lse", "2d_stride_dil", "big"),
    ("mul_lse", "depthwise", "normal"), ("mul_lse", "2d_lhs_dil", "spread"),
    ("seed", "2d_same", "ramp"), ("log", "2d_stride_dil", "ramp"), ("mul_lse", "3d", "ramp"),
    ("seed", "2d_same", "pos_inf"), ("log", "wide", "pos_inf"), ("mul_lse", "groups", "pos_inf"),
    ("log", "2d_same", "huge_neg"), ("seed", "1d_valid", "far_neg"),
    ("log", "2d_same", "huge"), ("seed", "1d_valid", "huge"), ("mul_lse", "wide", "huge"),
]


@pytest.mark.parametrize("name,geom,regime", FORWARD)
def test_forward_matches_reference(name: str, geom: str, regime: str) -> None:
    x, w = _data(geom, regime)
    got = np.asarray(jax.jit(_conv(OPS[name], geom))(x, w))
    want = _reference(name, geom, x, w)
    np.testing.assert_allclose(got, want, rtol=2e-6 if regime != "spread" else 1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))


GRADS = [
    ("log", "2d_same", "normal"), ("log", "2d_stride_dil", "spread"),
    ("log", "2d_lhs_dil", "neg_inf"), ("log", "groups", "nan"), ("log", "wide", "spread"),
    ("log", "3d", "normal"), ("seed", "2d_same", "spread"), ("seed", "groups", "neg_inf"),
    ("seed", "depthwise", "normal"), ("seed", "1d_valid", "nan"),
    ("mul_lse", "wide", "normal"), ("mul_lse", "2d_lhs_dil", "spread"),
    ("log", "3d", "ramp"), ("mul_lse", "2d_same", "ramp"), ("log", "groups", "big"),
]


@pytest.mark.parametrize("name,geom,regime", GRADS)
def test_gradients_match_xla_engine(name: str, geom: str, regime: str) -> None:
    x, w = _data(geom, regime, seed=1)
    f_nat, f_xla = _conv(OPS[name], geom), _conv(OPS[name], geom, "xla")
    y = jax.eval_shape(f_nat, x, w)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(y.shape), jnp.float32)
    got = jax.jit(lambda a, b: jax.vjp(f_nat, a, b)[1](ct))(x, w)
    want = jax.jit(lambda a, b: jax.vjp(f_xla, a, b)[1](ct))(x, w)
    for g, h in zip(got, want, strict=True):
        scale = float(np.nanmax(np.abs(np.asarray(h)), initial=1.0))
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5 * scale)
    if regime == "neg_inf" and name == "log":  # the contract: zero, never NaN (a user
        # combine's own derivative at -inf may be NaN, as on the XLA engine)
        assert not any(np.isnan(np.asarray(g)).any() for g in got)


VEC_GRADS = [
    ("seed", "vec_same", "normal"), ("seed", "vec_same", "spread"),
    ("seed", "vec_same", "neg_inf"), ("seed", "vec_same", "nan"), ("seed", "vec_same", "big"),
    ("seed", "vec_same", "ramp"), ("seed", "vec_same", "pos_inf"), ("seed", "vec_same", "huge"),
    ("seed", "vec_one_image", "normal"), ("seed", "vec_stride_dil", "spread"),
    ("seed", "vec_groups", "normal"), ("seed", "channels_80", "far_neg"),
    ("seed", "dense_wide", "normal"), ("mul_lse", "vec_same", "normal"),
    ("mul_lse", "vec_groups", "huge"), ("mul_lse", "vec_stride_dil", "ramp"),
    ("log", "vec_same", "spread"), ("log", "vec_groups", "neg_inf"),
    ("seed_pad", "vec_same", "normal"), ("seed_pad", "vec_stride_dil", "spread"),
]


@pytest.mark.parametrize("name,geom,regime", VEC_GRADS)
def test_vector_loop_gradients_match_xla_engine(name: str, geom: str, regime: str) -> None:
    """Input channels in whole vectors (csrc/kernel_lsebwd_ivec.h): both gradients, and
    each alone, against the XLA engine, over the contract's cases."""
    x, w = _data(geom, regime, seed=1)
    f_nat, f_xla = _conv(OPS[name], geom), _conv(OPS[name], geom, "xla")
    y = jax.eval_shape(f_nat, x, w)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(y.shape), jnp.float32)
    got = jax.jit(lambda a, b: jax.vjp(f_nat, a, b)[1](ct))(x, w)
    want = jax.jit(lambda a, b: jax.vjp(f_xla, a, b)[1](ct))(x, w)
    only_x = jax.jit(lambda a, b: jax.vjp(lambda u: f_nat(u, b), a)[1](ct))(x, w)
    only_w = jax.jit(lambda a, b: jax.vjp(lambda v: f_nat(a, v), b)[1](ct))(x, w)
    for g, alone, h in zip(got, (*only_x, *only_w), want, strict=True):
        scale = float(np.nanmax(np.abs(np.asarray(h)), initial=1.0))
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_array_equal(np.asarray(alone), np.asarray(g))
    if regime == "neg_inf" and name == "log":  # the contract: zero, never NaN
        assert not any(np.isnan(np.asarray(g)).any() for g in got)


@pytest.mark.parametrize("name,regime", [("seed", "normal"), ("mul_lse", "ramp"),
                                         ("mul_lse", "spread"), ("log", "spread"),
                                         ("seed_pad", "normal")])
def test_vector_loop_gradients_match_float64(name: str, regime: str) -> None:
    """The vector loop's gradients against a float64 softmax of explicit 3x3 SAME windows
    (32 input channels, three images): within float32's conditioning of t - y (regimes whose
    terms float32 holds to ~1e-5 absolute: the seed op's ramp and spread have terms of
    magnitude 1e4 and more, whose own rounding moves each weight by 1e-3)."""
    x, w = _data("vec_same", regime, seed=8)
    ct = np.random.default_rng(9).standard_normal((3, 6, 5, 5)).astype(np.float32)
    got = jax.vjp(_conv(OPS[name], "vec_same"), x, w)[1](jnp.asarray(ct))
    comb, (dcx, dcw) = COMBINES[name], _PARTIALS[name]
    pad = OPS[name].pad_value if isinstance(OPS[name], jaxconv.Op) else None
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    inside = ~np.isnan(xp)
    if pad is not None:
        xp = np.where(inside, xp, pad)
    # terms (N, H, W, tap, I, O); identity padding: a padded tap is no term (-inf)
    xs = np.stack([xp[:, a:a + 6, b:b + 5] for a in range(3) for b in range(3)], axis=3)
    ins = np.stack([inside[:, a:a + 6, b:b + 5] for a in range(3) for b in range(3)], axis=3)
    wt = w64.reshape(9, 32, 5)
    with np.errstate(invalid="ignore"):
        t = comb(xs[..., None], wt)
    live = ins[..., None] | (pad is not None)
    t = np.where(live, t, -np.inf)
    y = np.logaddexp.reduce(t.reshape(3, 6, 5, -1, 5), axis=3)
    h = ct[:, :, :, None, None, :] * np.where(live, np.exp(t - y[:, :, :, None, None, :]), 0.0)
    with np.errstate(invalid="ignore"):
        hx = np.where(live, h * dcx(xs[..., None], wt), 0.0).sum(-1)  # (N, H, W, tap, I)
        hw = np.where(live, h * dcw(xs[..., None], wt), 0.0)
    dx = np.zeros_like(xp)
    for k in range(9):
        a, b = divmod(k, 3)
        dx[:, a:a + 6, b:b + 5] += np.where(ins[:, :, :, k], hx[:, :, :, k], 0.0)
    dx = dx[:, 1:-1, 1:-1]
    dw = hw.sum(axis=(0, 1, 2)).reshape(w.shape)
    for g, want in zip(got, (dx, dw), strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=2e-5 * scale)


def _brute(name: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """A 1-D VALID product by explicit windows and ``jax.nn.logsumexp``."""
    comb = {"log": lambda a, b: a + b, "seed": lambda a, b: -(a - b) ** 2,
            "mul_lse": lambda a, b: a * b}[name]
    k = w.shape[0]
    cols = []
    for p in range(x.shape[1] - k + 1):
        terms = comb(x[:, p:p + k, :, None], w[None])  # (N, K, I, O)
        cols.append(jax.nn.logsumexp(terms.reshape(x.shape[0], -1, w.shape[-1]), axis=1))
    return jnp.stack(cols, axis=1)


@pytest.mark.parametrize("name,scale", [("log", 1.0), ("log", 50.0), ("seed", 1.0),
                                        ("mul_lse", 3.0), ("log", 3e9), ("mul_lse", 3e9),
                                        ("seed", 1e5)])
def test_gradients_match_brute_force(name: str, scale: float) -> None:
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 9, 3)) * scale, jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 7, 4)), jnp.float32)
    f = _conv_1d(OPS[name])
    np.testing.assert_allclose(f(x, w), _brute(name, x, w), rtol=1e-5, atol=1e-5)
    got = jax.vjp(f, x, w)[1](ct)
    want = jax.vjp(lambda a, b: _brute(name, a, b), x, w)[1](ct)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


_PARTIALS = {"log": (lambda a, b: np.ones_like(a * b), lambda a, b: np.ones_like(a * b)),
             "seed": (lambda a, b: -2 * (a - b), lambda a, b: 2 * (a - b)),
             "mul_lse": (lambda a, b: b + 0 * a, lambda a, b: a + 0 * b)}
_PARTIALS["seed_pad"] = _PARTIALS["seed"]


@pytest.mark.parametrize("name", ["log", "seed", "mul_lse"])
def test_gradients_of_a_ramp_match_float64(name: str) -> None:
    """Windows whose terms climb by hundreds along the taps (the running maximum moves), the
    gradients against a float64 softmax: within float32's conditioning of t - y (the XLA
    engine's float32 rule is ~50x further off for the seed op here)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 9, 3)) + 40.0 * np.arange(9)[None, :, None]).astype(np.float32)
    w = rng.standard_normal((3, 3, 4)).astype(np.float32)
    ct = rng.standard_normal((2, 7, 4)).astype(np.float32)
    got = jax.vjp(_conv_1d(OPS[name]), x, w)[1](jnp.asarray(ct))
    comb, (dcx, dcw) = COMBINES[name], _PARTIALS[name]
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    dx, dw = np.zeros_like(x64), np.zeros_like(w64)
    for n in range(2):
        for p in range(7):
            xs = x64[n, p:p + 3, :, None]  # (K, I, 1)
            t = comb(xs, w64)  # (K, I, O)
            sm = np.exp(t - np.logaddexp.reduce(t.reshape(-1, 4), axis=0))
            h = ct[n, p] * sm
            dx[n, p:p + 3] += np.sum(h * dcx(xs, w64), axis=-1)
            dw += h * dcw(xs, w64)
    for g, want in zip(got, (dx, dw), strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=2e-5 * scale)


def _conv_1d(op: object):
    return lambda x, w: jaxconv.conv_general_dilated(
        x, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"), op=op, engine="native")


@pytest.mark.parametrize("name", ["log", "seed"])
def test_check_grads(name: str) -> None:
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 3)), jnp.float32)
    check_grads(_conv_1d(OPS[name]), (x, w), order=1, modes=["rev"],
                              atol=2e-2, rtol=2e-2, eps=1e-2)


@pytest.mark.parametrize("name,geom", [("log", "2d_same"), ("seed", "2d_same"),
                                       ("seed", "vec_one_image")])
def test_vmap_matches_a_loop(name: str, geom: str) -> None:
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.standard_normal((3, *GEOMS[geom][0])), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((3, *GEOMS[geom][1])), jnp.float32)
    f = _conv(OPS[name], geom)
    got = jax.vmap(f)(xs, ws)
    for i in range(3):
        np.testing.assert_allclose(got[i], f(xs[i], ws[i]), rtol=1e-6, atol=1e-6)
    loss = lambda a, b: jnp.sum(jnp.sin(jax.vmap(f)(a, b)))  # noqa: E731
    gv = jax.grad(loss, argnums=(0, 1))(xs, ws)
    for i in range(3):
        gl = jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1))(xs[i], ws[i])
        np.testing.assert_allclose(gv[0][i], gl[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gv[1][i], gl[1], rtol=1e-5, atol=1e-5)


def test_negated_combine_folds_into_the_exponent() -> None:
    """A combine that ends in a negation (the seed's ``-(a - b)**2``) also gives ``comb_neg``,
    which the one-pass forward reads (``csrc/kernel_logsum.h`` ``lse_u``: the negation folded
    into the exponent's FMA); one that does not, gives none (the seed's values: the tests
    above)."""
    assert "comb_neg" in codegen.functor(SEED).source
    assert "comb_neg" not in codegen.functor(MUL_LSE).source


def test_exact_kernel_agrees_with_exp_space() -> None:
    """The exact kernel (taken for a spread beyond 80) and the exp-space path give the
    same numbers: one sample far above the other sends only the call to the kernel."""
    x, w = _data("2d_same", "normal", seed=6)
    f = jax.jit(_conv("log", "2d_same"))
    spread = x.copy()
    spread[1] += 200.0  # sample 1's windows are far above sample 0's shift: exact kernel
    y_fast, y_exact = np.asarray(f(x, w)), np.asarray(f(spread, w))
    np.testing.assert_allclose(y_exact[0], y_fast[0], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(y_exact[1], y_fast[1] + 200.0, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("op", ["log", SEED, MUL_LSE], ids=["log", "seed", "mul_lse"])
def test_explain_and_auto_pick_native(op: object) -> None:
    plan = jaxconv.explain(op, dtype="float32", platform="cpu")
    assert plan.engine == "native", str(plan)
    if op == "log":
        assert any("exp-space" in d and "running maximum" in d for d in plan.details), str(plan)
    else:
        assert any("compiled user kernel" in d for d in plan.details), str(plan)
    x, w = _data("2d_same", "normal")
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=_dn(4))
    hlo = jax.jit(lambda a, b: jaxconv.conv_general_dilated(a, b, op=op, **kw)).lower(
        x, w).as_text()
    assert "jaxconv_forward" in hlo

