"""The XLA engine's code paths against independent references, and its memory bound.

Forward values are checked against the numpy loop reference (``reference.py``); gradients
against ``jax.grad`` of a naive broadcast formulation written here with explicit numpy
index arithmetic (it stores the whole product tensor, which is fine at these sizes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import (
    NUMPY_OPS,
    NUMPY_PARTIALS,
    NUMPY_TERM_TANGENTS,
    NumpyOp,
    conv_grads_reference,
    conv_reference,
    conv_tangent_reference,
    dot_general_reference,
)

import jaxconv
from jaxconv import ops
from jaxconv._src.core import algebra
from jaxconv._src.engines import native
from jaxconv._src.engines import xla as engine_xla
from jaxconv._src.engines.xla import winner as xla_winner

DN = ("NHWC", "HWIO", "NHWC")


def _user_add(a, b):
    return a + b


def _user_mult(x, w):
    return x * w


def _user_max(a, b):
    return jnp.where(a > b, a, b)  # not a single primitive: the automatic-gradient path


USER_SUM = jaxconv.Op(_user_mult, reduce=_user_add, identity=0.0, name="user_sum")
USER_MAX = jaxconv.Op(lambda x, w: x - w, reduce=_user_max, identity=-np.inf, name="user_max")

NUMPY_USER = {
    "user_sum": (np.multiply, lambda a, b: a + b, 0.0),
    "user_max": (np.subtract, max, -np.inf),
}
# One op per code path: sum with a custom combine VJP, sum, max, min, logsumexp, a user's
# sum recognised as a built-in, a user's reduce differentiated automatically.
OPS = ["adder", "l2_exact", "max_plus", "min_max", "log", "user_sum", "user_max"]


def _op(name):
    return {"user_sum": USER_SUM, "user_max": USER_MAX}.get(name) or ops.get(name)


def _np_op(name):
    if name in NUMPY_USER:
        c, r, e = NUMPY_USER[name]
        return c, r, e, None
    ref = NUMPY_OPS["l2" if name == "l2_exact" else name]
    return ref.combine, ref.reduce, ref.identity, ref.pad_value


def _naive(op, x, w, pads, groups=1, strides=(1, 1), rhs_dilation=(1, 1)):
    """NHWC/HWIO generalized conv from a stored (N, oh, ow, kh, kw, I, O) tensor."""
    n, h, wd, c = x.shape
    kh, kw, ci, co = w.shape
    (pt, pb), (pl, pr) = pads
    (sh, sw), (dh, dw) = strides, rhs_dilation
    fill = 0.0 if op.pad_value is None else op.pad_value
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    valid = np.pad(np.ones((h, wd), bool), ((pt, pb), (pl, pr)))
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (wd + pl + pr - (kw - 1) * dw - 1) // sw + 1
    ih = np.arange(oh)[:, None, None, None] * sh + np.arange(kh)[None, None, :, None] * dh
    iw = np.arange(ow)[None, :, None, None] * sw + np.arange(kw)[None, None, None, :] * dw
    patches = xp[:, ih, iw, :]  # (N, oh, ow, kh, kw, C)
    ok = valid[ih, iw]  # (oh, ow, kh, kw)
    og = co // groups
    patches = patches.reshape(n, oh, ow, kh, kw, groups, 1, ci)
    wg = w.reshape(kh, kw, ci, groups, og).transpose(0, 1, 3, 4, 2)  # kh kw G Og I
    prod = op.combine(*jnp.broadcast_arrays(patches, wg[None, None, None]))
    prod = prod.transpose(0, 1, 2, 5, 6, 3, 4, 7)  # N oh ow G Og kh kw I
    e = algebra.identity_value(op, prod.dtype)
    if op.pad_value is None:
        prod = jnp.where(ok[None, :, :, None, None, :, :, None], prod, e)
    prod = prod.reshape(n, oh, ow, groups * og, -1)
    r = op.reduce
    if r == "sum":
        return prod.sum(-1)
    if r == "max":
        return prod.max(-1)
    if r == "min":
        return prod.min(-1)
    if r == "logsumexp":
        return jax.nn.logsumexp(prod, axis=-1)
    return algebra.tree_reduce_last(r, prod, e)


def _conv(op, x, w, pads, groups=1, mbb=None):
    return jaxconv.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN,
                                        feature_group_count=groups, op=op, max_block_bytes=mbb)


def _grads(f, x, w, ct):
    return jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), argnums=(0, 1))(x, w)


def _check(name, x, w, pads, groups=1, mbb=None, grad=True):
    op = _op(name)
    comb, red, ident, padv = _np_op(name)
    got = jax.jit(lambda a, b: _conv(op, a, b, pads, groups, mbb))(x, w)
    expect = conv_reference(x, w, (1, 1), pads, dimension_numbers=DN,
                            feature_group_count=groups, combine=comb, reduce=red,
                            identity=ident, pad_value=padv)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-5)
    if not grad:
        return
    ct = np.random.default_rng(9).standard_normal(got.shape).astype(np.float32)
    g_got = jax.jit(lambda a, b: _grads(lambda u, v: _conv(op, u, v, pads, groups, mbb),
                                        a, b, ct))(x, w)
    g_ref = _grads(lambda u, v: _naive(op, u, v, pads, groups), x, w, ct)
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", OPS)
def test_ragged_blocks_and_borders(name):
    """SAME padding (dominated fill or masks), three images in blocks of two."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4, 3)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    per_image = 5 * 4 * 3 * 4 * 4  # one image's products of one tap, in bytes
    _check(name, x, w, ((1, 1), (1, 0)), mbb=2 * per_image)


@pytest.mark.parametrize("name", ["adder", "max_plus", "log", "user_sum"])
def test_grouped_and_wide_padding(name):
    """Depthwise groups, and padding wider than the window (all-padding output rows)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    w = rng.standard_normal((2, 2, 1, 8)).astype(np.float32)
    _check(name, x, w, ((1, 1), (0, 1)), groups=4)
    if name != "log":  # an all -inf window of log has a zero gradient, checked below
        _check(name, x, w[:, :, :, :4].reshape(2, 2, 1, 4), ((3, 0), (0, 0)), groups=4,
               grad=name != "max_plus")


def test_max_plus_nan_inf_and_ties():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 4, 2)).astype(np.float32)
    w = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
    pads = ((1, 0), (0, 1))
    xn = x.copy()
    xn[0, 1, 1, 0] = np.nan
    y = np.asarray(_conv(ops.max_plus, xn, w, pads))
    expect = conv_reference(xn, w, (1, 1), pads, dimension_numbers=DN, combine=np.add,
                            reduce=np.maximum, identity=-np.inf)  # NaN-propagating max
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expect))
    assert np.isnan(y).any()
    xi = x.copy()
    xi[1, 2, :, 1] = -np.inf  # the exact (non-finite) path, forward and backward
    _check("max_plus", xi, w, pads)
    z = np.zeros_like(x)  # every product ties: the gradient is split equally
    _check("max_plus", z, np.zeros_like(w), pads)


MAX_TIMES = jaxconv.Op(lambda x, w: x * w, "max", name="nan_max_times")
MIN_TIMES = jaxconv.Op(lambda x, w: x * w, "min", name="nan_min_times")


def _winner_grads_reference(x, w, g, reduce):
    """numpy loops: the gradients of ``x * w`` under max / min on a VALID 2-D convolution by
    the rule every engine follows: a window with a NaN product has no gradient; otherwise the
    cotangent is split equally among the products equal to the result."""
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    kh, kw, _, o_n = w.shape
    for n, i, j, o in np.ndindex(g.shape):
        p = x[n, i:i + kh, j:j + kw, :] * w[..., o]
        if np.isnan(p).any():
            continue
        win = p == (p.max() if reduce == "max" else p.min())
        share = g[n, i, j, o] / win.sum()
        dx[n, i:i + kh, j:j + kw, :] += np.where(win, share * w[..., o], 0.0)
        dw[..., o] += np.where(win, share * x[n, i:i + kh, j:j + kw, :], 0.0)
    return dx, dw


@pytest.mark.parametrize("engine", ["xla", "native"])
@pytest.mark.parametrize("op,reduce", [(MAX_TIMES, "max"), (MIN_TIMES, "min")])
def test_a_nan_window_has_no_gradient(engine, op, reduce):
    """With a NaN and infinities in x and w (0 * inf products too), the gradients of a
    user max / min op whose partials read the operands (``x * w``) are the rule's: no NaN
    leaks from a NaN window (its cotangent is dropped, not multiplied by 0), ties split."""
    if engine == "native" and not native.available():
        pytest.skip(f"native engine not built: {native.load_error()}")
    rng = np.random.default_rng(5)
    x = np.round(rng.standard_normal((2, 6, 5, 3)) * 1.5).astype(np.float32)
    w = np.round(rng.standard_normal((2, 2, 3, 4)) * 1.5).astype(np.float32)
    x[0, 2, 1, 0], x[1, 4, 3, 2], x[1, 0, 0, 1] = np.nan, np.inf, -np.inf
    w[1, 0, 2, 3] = np.nan
    w[0, 1, 1, 0] = np.inf
    f = lambda a, b: jaxconv.conv_general_dilated(  # noqa: E731
        a, b, (1, 1), "VALID", dimension_numbers=DN, op=op, engine=engine)
    y, vjp = jax.vjp(jax.jit(f), x, w)
    g = rng.standard_normal(y.shape).astype(np.float32)
    with np.errstate(invalid="ignore"):
        want = _winner_grads_reference(x.astype(np.float64), w.astype(np.float64), g, reduce)
    assert np.isnan(np.asarray(y)).any()
    for got, ref in zip(vjp(g), want, strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


NAN_SUM_OPS = {
    # name -> (op, numpy reference (combine, reduce, identity, pad_value))
    "l1": ("l1", NUMPY_OPS["l1"]),
    "user_neg_abs": (jaxconv.Op(lambda a, b: -jnp.abs(a - b), "sum", name="nan_user_l1"),
                     NUMPY_OPS["l1"]),
    "user_max_sum": (jaxconv.Op(jnp.maximum, "sum", name="nan_user_max_sum"),
                     NumpyOp(np.maximum, np.add, 0.0, None)),
    "max_plus": ("max_plus", NUMPY_OPS["max_plus"]),
    "min_plus": ("min_plus", NUMPY_OPS["min_plus"]),
    "max_min": ("max_min", NUMPY_OPS["max_min"]),
    "min_max": ("min_max", NUMPY_OPS["min_max"]),
}


def _special_operands(dense):
    """Integer-valued operands (every engine's sum is exact) with NaN, +inf and -inf in x
    and w, at shapes where XLA CPU fuses the tap reduction into YNNPACK (whose max/min drop
    NaN): some windows hold NaN, some inf - inf, some one infinity."""
    rng = np.random.default_rng(11)
    if dense:
        x = np.round(rng.standard_normal((8, 16)) * 2).astype(np.float32)
        w = np.round(rng.standard_normal((16, 70)) * 2).astype(np.float32)
        x[1, 3], x[2, 5], x[3, 7] = np.nan, np.inf, -np.inf
        w[8, 0], w[5, 1], w[7, 2], w[5, 3] = np.nan, np.inf, -np.inf, -np.inf
    else:
        x = np.round(rng.standard_normal((2, 5, 5, 16)) * 2).astype(np.float32)
        w = np.round(rng.standard_normal((3, 3, 16, 16)) * 2).astype(np.float32)
        x[0, 2, 2, 1], x[1, 0, 4, 5], x[1, 3, 1, 7] = np.nan, np.inf, -np.inf
        w[1, 1, 3, 5], w[0, 2, 5, 1], w[2, 0, 7, 2], w[1, 1, 5, 3] = (
            np.nan, np.inf, -np.inf, -np.inf)
    return x, w


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "conv"])
@pytest.mark.parametrize("name", list(NAN_SUM_OPS))
def test_nan_and_infinities_in_x_and_w(name, dense):
    """NaN in, NaN out, with NaN and +-inf in both operands: the XLA engine against the
    numpy loops and the native engine (bit-identical; the values are integers). A sum whose
    combine holds a max or min (l1, a user's) lost its NaN products in XLA CPU's YNNPACK
    reduce fusion (l1 gave -0.0 for a NaN weight)."""
    op, (comb, red, ident, padv) = NAN_SUM_OPS[name]
    x, w = _special_operands(dense)
    pads = ((1, 1), (1, 1))
    if dense:
        dims = (((1,), (0,)), ((), ()))
        f = lambda a, b, e: jaxconv.dot_general(a, b, dims, op=op, engine=e)  # noqa: E731
        with np.errstate(invalid="ignore"):
            want = dot_general_reference(x, w, dims, combine=comb, reduce=red, identity=ident)
    else:
        f = lambda a, b, e: jaxconv.conv_general_dilated(  # noqa: E731
            a, b, (1, 1), pads, dimension_numbers=DN, op=op, engine=e)
        with np.errstate(invalid="ignore"):
            want = conv_reference(x, w, (1, 1), pads, dimension_numbers=DN, combine=comb,
                                  reduce=red, identity=ident, pad_value=padv)
    got = np.asarray(jax.jit(lambda a, b: f(a, b, "xla"))(x, w))
    assert np.isnan(want).any() and np.isinf(want).any()
    np.testing.assert_array_equal(got, want.astype(np.float32))
    if native.available():
        np.testing.assert_array_equal(got, np.asarray(f(x, w, "native")))


def _tie_partials(first_wins):
    """The partials of lax's max (``first_wins = np.greater``) / min: 1/2 each on a tie, 0
    to both where one is NaN."""
    return lambda a, b: (first_wins(a, b) + 0.5 * (a == b), first_wins(b, a) + 0.5 * (a == b))


def _user_min2_partials(a, b):
    pa, pb = _tie_partials(np.less)(a, 2 * b)
    return pa, 2 * pb


def _user_clip_partials(a, b):
    """``jnp.clip(a - b, -1, 1)``, that is ``minimum(1, maximum(-1, a - b))``, as JAX
    differentiates it (`_tie_partials`): 0 where ``a - b`` is NaN or beyond +-1."""
    d = np.subtract(a, b)
    m = np.maximum(-1.0, d)
    p = (np.greater(d, -1) + 0.5 * (d == -1)) * (np.less(m, 1) + 0.5 * (m == 1))
    return p, -p


GRAD_OPS = {
    # name -> (op, numpy combine, partials, reduce, pad value)
    **{name: (name, NUMPY_OPS["l2" if name == "l2_exact" else name].combine,
              NUMPY_PARTIALS["l2" if name == "l2_exact" else name],
              {np.add: "sum", np.maximum: "max", np.minimum: "min",
               np.logaddexp: "logsumexp"}[NUMPY_OPS["l2" if name == "l2_exact" else name].reduce],
              NUMPY_OPS["l2" if name == "l2_exact" else name].pad_value)
       for name in ("max_plus", "min_plus", "max_min", "min_max", "max_times", "adder", "l1",
                    "l2", "l2_exact", "log", "xnor")},
    # A sum whose combine holds a max (YNNPACK's fused reductions drop NaN in max / min).
    "user_max_sum": (jaxconv.Op(lambda a, b: jnp.maximum(a, b) - a, "sum", name="g_max_sum"),
                     lambda a, b: np.maximum(a, b) - a,
                     lambda a, b: (np.greater(a, b) + 0.5 * (a == b) - 1.0,
                                   np.greater(b, a) + 0.5 * (a == b)), "sum", None),
    "user_max": (jaxconv.Op(lambda a, b: jnp.minimum(a, 2 * b), "max", name="g_min2_max"),
                 lambda a, b: np.minimum(a, 2 * b), _user_min2_partials, "max", None),
    # A user's clip under a sum (adder's built-in clip drops NaN in AVX-512's vrangeps).
    "user_clip_sum": (jaxconv.Op(lambda a, b: jnp.clip(a - b, -1.0, 1.0), "sum",
                                 name="g_clip_sum"),
                      lambda a, b: np.clip(np.subtract(a, b), -1, 1), _user_clip_partials,
                      "sum", None),
}


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "conv"])
@pytest.mark.parametrize("name", list(GRAD_OPS))
def test_gradients_with_nan_and_infinities(name, dense):
    """Reverse and forward mode with NaN and +-inf in x and w, both engines, against the
    numpy loops of the documented rules (reference.py): a sum's terms keep their own
    derivatives (NaN / inf as IEEE gives them, through the combine as JAX differentiates
    it), a NaN max / min window has none, ties split. At YNNPACK-fused shapes (whose max /
    min drop NaN). Found: the AVX-512 clip of adder's input gradient dropped NaN (native);
    the separable kernel gradient of adder / l2_exact gave +-inf for an infinite w where the
    terms' sum is NaN (XLA); l2's gradient was 0 over every window holding a NaN or inf."""
    op, comb, parts, red, padv = GRAD_OPS[name]
    x, w = _special_operands(dense)
    if name == "xnor":  # values inside the straight-through window too
        x, w = x / 2, w / 2
    if name == "l2":  # its expanded products differ from the terms' sum with infinities
        x, w = np.where(np.isinf(x), 3.0, x), np.where(np.isinf(w), -3.0, w)
    if dense:
        dims = (((1,), (0,)), ((), ()))
        f = lambda a, b, e: jaxconv.dot_general(a, b, dims, op=op, engine=e)  # noqa: E731
        pads, x4, w4 = ((0, 0), (0, 0)), x[:, None, None, :], w[None, None]
    else:
        pads = ((1, 1), (1, 1))
        f = lambda a, b, e: jaxconv.conv_general_dilated(  # noqa: E731
            a, b, (1, 1), pads, dimension_numbers=DN, op=op, engine=e)
        x4, w4 = x, w
    rng = np.random.default_rng(3)
    out4 = (x4.shape[0], *((1, 1) if dense else x.shape[1:3]), w4.shape[-1])
    g = (np.round(rng.standard_normal(out4) * 2) + 0.5).astype(np.float32)
    tx = (np.round(rng.standard_normal(x.shape) * 2) + 0.5).astype(np.float32)
    tw = (np.round(rng.standard_normal(w.shape) * 2) + 0.5).astype(np.float32)
    rule = {"combine": comb, "partials": parts, "reduce": red, "pad_value": padv}
    want_dx, want_dw = conv_grads_reference(x4, w4, g, pads, **rule)
    forward_mode = name not in ("adder", "xnor")  # reverse-only surrogate rules
    if forward_mode:
        want_ty = conv_tangent_reference(
            x4, w4, tx.reshape(x4.shape), tw.reshape(w4.shape), out4, pads, **rule,
            term_tangent=NUMPY_TERM_TANGENTS.get(name.removesuffix("_exact")))
    engines = ["xla"] + (["native"] if native.available() else [])
    for engine in engines:
        fe = lambda a, b, e=engine: f(a, b, e)  # noqa: E731
        y, vjp = jax.vjp(jax.jit(fe), x, w)
        dx, dw = vjp(g.reshape(y.shape))
        assert np.isnan(np.asarray(y)).any()
        tol = {"rtol": 1e-5, "atol": 1e-5}
        np.testing.assert_allclose(np.asarray(dx), want_dx.reshape(x.shape), **tol,
                                   err_msg=f"dx {engine}")
        np.testing.assert_allclose(np.asarray(dw), want_dw.reshape(w.shape), **tol,
                                   err_msg=f"dw {engine}")
        if forward_mode and engine == "xla":  # the native engine's tangent is the XLA one
            ty = jax.jit(lambda a, b, c, d, fe=fe: jax.jvp(fe, (a, b), (c, d))[1])(x, w, tx, tw)
            np.testing.assert_allclose(np.asarray(ty), want_ty.reshape(y.shape), **tol,
                                       err_msg=f"tangent {engine}")


def test_log_fast_path_fallbacks():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 5, 2)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
    pads = ((1, 1), (1, 1))
    wide = x.copy()  # (the fast exp-space path is checked by the tests above)
    wide[1, :2] -= 150.0  # windows far below the sample's maximum: exact path
    _check("log", wide, w, pads)
    xi = x.copy()
    xi[0, :, :2] = -np.inf  # all -inf windows: -inf out, zero gradient, no NaN
    y = _conv(ops.log, xi, w, pads)
    assert np.isneginf(np.asarray(y)[0, :, 0]).all()
    gx, gw = _grads(lambda a, b: _conv(ops.log, a, b, pads), xi, w, np.ones(y.shape, np.float32))
    assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gw)).all()
    np.testing.assert_array_equal(np.asarray(gx)[0, :, :2], 0.0)


@pytest.mark.parametrize("name", ["adder", "max_plus", "log", "user_sum"])
def test_dense_blocks(name):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((5, 6)).astype(np.float32)
    b = rng.standard_normal((6, 3)).astype(np.float32)
    op = _op(name)
    comb, red, ident, _ = _np_op(name)
    dn = (((1,), (0,)), ((), ()))
    f = jax.jit(lambda u, v: jaxconv.dot_general(u, v, dn, op=op, max_block_bytes=2 * 6 * 3 * 4))
    expect = np.array([[red_all(red, ident, [comb(a[m, k], b[k, n]) for k in range(6)])
                        for n in range(3)] for m in range(5)])
    np.testing.assert_allclose(f(a, b), expect, rtol=1e-5, atol=2e-5)
    ct = rng.standard_normal((5, 3)).astype(np.float32)
    g_got = _grads(f, a, b, ct)
    g_ref = _grads(lambda u, v: _naive(op, u[:, None, None], v[None, None], ((0, 0), (0, 0)))[
        :, 0, 0], a, b, ct)
    for x1, x2 in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(x1, x2, rtol=1e-4, atol=1e-4)


def red_all(red, ident, values):
    acc = ident
    for v in values:
        acc = red(acc, v)
    return acc


def test_simple_user_reduce_is_canonicalised():
    assert engine_xla.canonical_op(USER_SUM).reduce == "sum"
    assert engine_xla.canonical_op(USER_MAX).reduce is _user_max
    odd = jaxconv.Op(_user_mult, reduce=_user_add, identity=1.0)  # not sum's identity
    assert engine_xla.canonical_op(odd).reduce is _user_add
    assert engine_xla.dominated_fill(ops.max_plus) == -np.inf
    assert engine_xla.dominated_fill(ops.min_max) == np.inf
    assert engine_xla.dominated_fill(ops.adder) is None


@pytest.mark.parametrize("name", ["adder", "max_plus", "log"])
def test_memory_bound_forward_and_backward(name):
    """Compiled temp memory stays within max_block_bytes (plus input-sized buffers), far
    below the products' size. Blocks are whole images, so the bound is set to one image's
    products of one tap (16 MiB here); the full products are 1.2 GB."""
    x = jax.ShapeDtypeStruct((8, 32, 32, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    mbb = 16 * 2**20
    op = _op(name)

    def f(a, b):
        return _conv(op, a, b, "SAME", mbb=mbb)

    def fb(a, b):
        y, vjp = jax.vjp(f, a, b)
        return vjp(y)

    products = 8 * 32 * 32 * 64 * 64 * 9 * 4  # 1.2 GB
    io = 8 * 8 * 32 * 32 * 64 * 4  # input/output-sized buffers (padding, gradients, counts)
    for fn in (f, fb):
        ma = jax.jit(fn).lower(x, w).compile().memory_analysis()
        temp = ma.temp_size_in_bytes
        assert temp < 2 * mbb + io, (fn.__name__, temp)
        assert temp < products / 32


# --- separable sums: the kernel gradient as a native product --------------------------------

@jax.custom_vjp
def _adder_copy(x, w):  # AdderNet's rule, but not the built-in object: the per-product path
    return -jnp.abs(x - w)


_adder_copy.defvjp(lambda x, w: (-jnp.abs(x - w), (x, w)),
                   lambda r, g: (g * jnp.clip(r[1] - r[0], -1, 1), g * (r[0] - r[1])))


def _mul_copy(x, w):
    return (x * w) * 1.0  # two primitives: not recognised, the per-product path


SEPARABLE_CASES = [  # (strides, padding, lhs_dilation, rhs_dilation, groups)
    ((1, 1), ((1, 1), (1, 0)), (1, 1), (1, 1), 1),
    ((2, 1), ((2, 0), (0, 3)), (1, 1), (1, 2), 2),
    ((1, 2), ((1, 1), (1, 1)), (2, 1), (1, 1), 1),
]


@pytest.mark.parametrize("case", SEPARABLE_CASES)
@pytest.mark.parametrize("pad_value", [0.0, None, 0.5])
def test_separable_kernel_gradient_equals_per_product_path(case, pad_value):
    """The adder's dW = conv-gradient(x, g) - w * sum(g over a tap's positions) and the
    user multiply's native gradients against the per-product loops, on strides, both
    dilations, groups, wide padding, masks (identity padding) and pad values."""
    strides, pads, lhs_dil, rhs_dil, groups = case
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)
    w = rng.standard_normal((2, 3, 4 // groups, 6)).astype(np.float32)
    pv = pad_value
    pairs = [(ops.adder.replace(pad_value=pv), jaxconv.Op(_adder_copy, pad_value=pv)),
             (jaxconv.Op(_user_mult, pad_value=pv), jaxconv.Op(_mul_copy, pad_value=pv))]
    for fast, slow in pairs:
        assert engine_xla.separable_kind(fast) is not None
        assert engine_xla.separable_kind(slow) is None

        def f(a, b, op):
            return jaxconv.conv_general_dilated(a, b, strides, pads, lhs_dil, rhs_dil, DN,
                                                feature_group_count=groups, op=op)
        y = f(x, w, fast)
        ct = rng.standard_normal(y.shape).astype(np.float32)
        got = jax.jit(lambda a, b, c, op=fast: _grads(lambda u, v: f(u, v, op), a, b, c))(
            x, w, ct)
        ref = jax.jit(lambda a, b, c, op=slow: _grads(lambda u, v: f(u, v, op), a, b, c))(
            x, w, ct)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_separable_adder_gradient_rule_dense():
    """AdderNet's stated rule on a dense product, written out directly."""
    rng = np.random.default_rng(12)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.standard_normal((5, 4)).astype(np.float32)
    ct = rng.standard_normal((7, 4)).astype(np.float32)
    dn = (((1,), (0,)), ((), ()))
    ga, gb = _grads(lambda u, v: jaxconv.dot_general(u, v, dn, op=ops.adder), a, b, ct)
    d = a[:, :, None] - b[None]  # (M, K, N): x - w
    np.testing.assert_allclose(gb, np.einsum("mn,mkn->kn", ct, d), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ga, np.einsum("mn,mkn->mk", ct, np.clip(-d, -1, 1)),
                               rtol=1e-5, atol=1e-5)


# --- max/min: gradients through each window's winner ------------------------------------

def _int_data(seed, xs, ws, hi=3):
    """Small integers: many tied windows, and x == w inside min/max combines."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-hi, hi + 1, xs).astype(np.float32),
            rng.integers(-hi, hi + 1, ws).astype(np.float32))


@pytest.mark.parametrize("name", ["max_plus", "min_plus", "max_min", "min_max"])
@pytest.mark.parametrize("max_ties", [1024, 3])
def test_winner_path_ties_and_borders(name, max_ties, monkeypatch):
    """Ties handled one window at a time (and, past ``MAX_SPARSE_TIES``, by the exact
    path) against ``jax.grad`` of the naive formulation, which splits ties equally."""
    monkeypatch.setattr(xla_winner, "MAX_SPARSE_TIES", max_ties)
    x, w = _int_data(13, (2, 5, 4, 4), (3, 2, 2, 6))
    _check(name, x, w, ((1, 1), (1, 0)), groups=2)
    rng = np.random.default_rng(14)  # few ties: most windows through the scatter path
    _check(name, rng.standard_normal((2, 5, 4, 3)).astype(np.float32),
           np.round(rng.standard_normal((3, 2, 3, 4)), 1).astype(np.float32), ((2, 0), (0, 1)))


@pytest.mark.parametrize("name", ["max_plus", "max_min"])
def test_winner_path_equals_exact_path_on_strides_and_dilations(name, monkeypatch):
    x, w = _int_data(15, (2, 7, 6, 4), (2, 3, 2, 4), hi=2)
    op = _op(name)

    def grads(a, b, ct):
        return _grads(lambda u, v: jaxconv.conv_general_dilated(
            u, v, (2, 1), ((1, 2), (2, 1)), (2, 1), (1, 2), DN, feature_group_count=2,
            op=op), a, b, ct)

    y = jaxconv.conv_general_dilated(x, w, (2, 1), ((1, 2), (2, 1)), (2, 1), (1, 2), DN,
                                     feature_group_count=2, op=op)
    ct = np.random.default_rng(16).standard_normal(y.shape).astype(np.float32)
    got = jax.jit(grads)(x, w, ct)
    monkeypatch.setattr(xla_winner, "_winner_base", lambda *a: None)  # the exact path
    ref = jax.jit(grads)(x, w, ct)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["max_plus", "min_max"])
def test_winner_path_dense_with_ties(name):
    a, b = _int_data(17, (6, 9), (9, 5))
    op = _op(name)
    dn = (((1,), (0,)), ((), ()))
    ct = np.random.default_rng(18).standard_normal((6, 5)).astype(np.float32)
    got = jax.jit(lambda u, v: _grads(lambda p, q: jaxconv.dot_general(p, q, dn, op=op),
                                      u, v, ct))(a, b)
    ref = _grads(lambda u, v: _naive(op, u[:, None, None], v[None, None], ((0, 0), (0, 0)))[
        :, 0, 0], a, b, ct)
    for x1, x2 in zip(got, ref, strict=True):
        np.testing.assert_allclose(x1, x2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad_value", [None, 0.5])
@pytest.mark.parametrize("inf_w", [False, True])
def test_user_multiply_native_forward(pad_value, inf_w):
    """A user's ``x * w`` sum runs as one native product; with identity padding and a
    non-finite kernel the masked loop keeps padded taps out (no ``0 * inf`` at borders)."""
    rng = np.random.default_rng(19)
    x = np.abs(rng.standard_normal((2, 5, 4, 3))).astype(np.float32) + 0.1
    w = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    if inf_w:
        w[0, 0, 1, 2] = np.inf
    op = jaxconv.Op(_user_mult, pad_value=pad_value)
    pads = ((1, 1), (1, 0))
    got = jax.jit(lambda a, b: _conv(op, a, b, pads))(x, w)
    expect = conv_reference(x, w, (1, 1), pads, dimension_numbers=DN, combine=np.multiply,
                            reduce=np.add, identity=0.0, pad_value=pad_value)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-5)


# --- the winner path without a dominated fill: a pad value, or identity padding masked --

USER_TANH_MAX = jaxconv.Op(lambda x, w: jnp.tanh(x - w), reduce=lambda a, b: jnp.maximum(a, b),
                           identity=-np.inf, name="user_tanh_max")


@pytest.mark.parametrize("name", ["user_tanh_max", "mp0"])
@pytest.mark.parametrize("geometry", [((1, 1), (1, 1), 1), ((2, 1), (1, 2), 2)])
@pytest.mark.parametrize("data", ["int", "random"])
@pytest.mark.parametrize("max_ties", [1024, 3])
def test_winner_path_pad_value_and_masked_identity(name, geometry, data, max_ties,
                                                   monkeypatch):
    """A user's ``tanh(x - w)`` under max (identity padding: 0-filled, taps masked; a padded
    ``tanh(0 - w)`` may beat every real product) and max_plus with ``pad_value=0`` (padded
    cells are real products), SAME padding, against ``jax.grad`` of the naive formulation
    (whose max splits ties equally)."""
    monkeypatch.setattr(xla_winner, "MAX_SPARSE_TIES", max_ties)
    op = USER_TANH_MAX if name == "user_tanh_max" else ops.max_plus.replace(pad_value=0.0,
                                                                             name="mp0")
    strides, dil, groups = geometry
    xs, ws = (2, 7, 6, 4), (3, 2, 4 // groups, 6)
    if data == "int":
        x, w = _int_data(21, xs, ws, hi=2)
    else:
        rng = np.random.default_rng(22)
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
    pads = jax.lax.padtype_to_pads(
        xs[1:3], [(k - 1) * d + 1 for k, d in zip(ws[:2], dil, strict=True)], strides, "SAME")

    def f(u, v):
        return jaxconv.conv_general_dilated(u, v, strides, "SAME", None, dil, DN,
                                           feature_group_count=groups, op=op)

    def ref(u, v):  # the built-in max: ties split equally (a tree of maximums would not)
        return _naive(engine_xla.canonical_op(op), u, v, pads, groups, strides, dil)

    y = jax.jit(f)(x, w)
    np.testing.assert_allclose(y, ref(x, w), rtol=1e-6, atol=1e-6)
    ct = np.random.default_rng(23).standard_normal(y.shape).astype(np.float32)
    got = jax.jit(lambda a, b: _grads(f, a, b, ct))(x, w)
    expect = _grads(ref, x, w, ct)
    for a, b in zip(got, expect, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["xla", "auto"])
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_max_times_gradient_on_mixed_signs_is_brute_force(engine, padding):
    """x * w under max on signed data: the winner backward must find every winner (an
    arithmetic y - x * w indicator is contracted into an fma by XLA CPU and finds none)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    out = jax.eval_shape(lambda a: jax.lax.conv_general_dilated(
        a, w, (1, 1), padding, dimension_numbers=dn), x).shape
    ct = rng.standard_normal(out).astype(np.float32)

    def brute(a, b):
        def patches(v):
            p = jax.lax.conv_general_dilated_patches(v, (3, 3), (1, 1), padding,
                                                     dimension_numbers=dn)
            return p.reshape(*p.shape[:3], 3, 9)
        prod = patches(a)[..., None] * jnp.transpose(b.reshape(9, 3, 4), (1, 0, 2))[None, None,
                                                                                    None]
        prod = jnp.where(patches(jnp.ones_like(a))[..., None] > 0, prod, -jnp.inf)
        return jnp.max(prod.reshape(*prod.shape[:3], 27, 4), axis=3)

    def loss(f):
        return jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), argnums=(0, 1))(x, w)

    got = loss(lambda a, b: jaxconv.conv_general_dilated(
        a, b, (1, 1), padding, dimension_numbers=dn, op="max_times", engine=engine))
    for a, b in zip(got, loss(brute), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["xnor", "l2"])
def test_dense_rewrite_of_narrow_operands_runs_on_cpu(name, dtype):
    """A dense rewrite (xnor's signs, l2's products) of bf16 / f16 operands under ``jit``:
    XLA CPU kept the transposed operands' batched ``bf16 x bf16 -> f32`` dot, which its
    dot thunk cannot run ("UNIMPLEMENTED: Unsupported element type for DotThunk::Execute";
    found by ``tests/fuzz.py``, seed 100038). The values against the numpy loops."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((63, 17)).astype(dtype)
    w = rng.standard_normal((65, 63)).astype(dtype)
    dims = (((0,), (1,)), ((), ()))  # contract x's first axis with w's second
    got = jax.jit(lambda a, b: jaxconv.dot_general(a, b, dims, op=name, engine="xla"))(x, w)
    ref = NUMPY_OPS[name]
    want = dot_general_reference(x.astype(np.float64), w.astype(np.float64), dims,
                                 combine=ref.combine, reduce=ref.reduce, identity=ref.identity)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=eps,
                               atol=1e-5 * float(np.max(np.abs(want))))


def test_logsumexp_of_huge_products_is_finite():
    """A user ``x * w`` under logsumexp with products near 1e10: XLA CPU fused the product
    recomputed for the shifted sum into ``c - m`` (an FMA, the unrounded product), up to
    half an ulp (512) above 0, and ``exp`` overflowed: inf outputs (found by
    ``tests/fuzz.py``). Against the numpy loops."""
    op = jaxconv.Op(lambda a, b: a * b, "logsumexp", name="huge_mul_lse")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 3, 3, 4)) * 3e9).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 6)).astype(np.float32)
    got = jax.jit(lambda a, b: jaxconv.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2, op=op,
        engine="xla"))(x, w)
    want = conv_reference(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2,
                          combine=np.multiply, reduce=np.logaddexp, identity=-np.inf)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_logsumexp_gradient_of_huge_products_is_finite():
    """The same fusion in the backward's softmax weights ``exp(c - y)`` gave weights up to
    6.5e37 and -inf gradients (found by ``tests/fuzz.py``): the XLA engine's gradients equal
    the native engine's (its exponents formed in the kernel) and are finite."""
    op = jaxconv.Op(lambda a, b: a * b, "logsumexp", name="huge_mul_lse")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 3, 3, 4)) * 3e9).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 6)).astype(np.float32)
    ct = rng.standard_normal((1, 3, 3, 6)).astype(np.float32)

    def grads(engine):
        def loss(a, b):
            return jnp.sum(ct * jaxconv.conv_general_dilated(
                a, b, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2, op=op,
                engine=engine))
        return jax.jit(jax.grad(loss, (0, 1)))(x, w)

    for got, want in zip(grads("xla"), grads("native"), strict=True):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5,
                                   atol=1e-5 * np.abs(np.asarray(want)).max())


# (combine, d combine / dx, d combine / dw) in float64: `log` with a pad value (not the
# exp-space log semiring) and the seed op, both under logsumexp.
_LSE_RULES = {
    "log_pad": (ops.log.replace(pad_value=0.0), lambda x, w: x + w,
                lambda x, w: np.ones_like(x + w), lambda x, w: np.ones_like(x + w)),
    "seed": (jaxconv.Op(lambda a, b: -(a - b) ** 2, "logsumexp", name="seed_lse_bf16"),
             lambda x, w: -(x - w) ** 2, lambda x, w: -2 * (x - w), lambda x, w: 2 * (x - w)),
}


@pytest.mark.parametrize("engine", ["xla", "native"])
@pytest.mark.parametrize("name", sorted(_LSE_RULES))
def test_bf16_logsumexp_gradient_weights_are_the_softmax(name, engine):
    """bf16 operands near 300: the XLA engine rounded each product to bf16 (half an ulp: 1
    for ``x + w`` there, 256 for the seed op's squares) before the softmax weights
    ``exp(c - y)``, which were off by up to a factor e (found by ``tests/fuzz.py``). Products
    of narrower floats under a sum or logsumexp are now computed in float32 on both engines:
    the gradients are the float64 softmax of the rounded operands' exact products."""
    op, comb, dcx, dcw = _LSE_RULES[name]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 8)) + 300, jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((8, 3)) * (1 if name == "log_pad" else 0.05),
                    jnp.bfloat16)
    dn = (((1,), (0,)), ((), ()))
    gx, gw = jax.jit(jax.grad(lambda a, b: jnp.sum(jaxconv.dot_general(
        a, b, dn, op=op, engine=engine).astype(jnp.float32)), (0, 1)))(x, w)
    xf, wf = np.asarray(x, np.float64)[:, :, None], np.asarray(w, np.float64)[None]
    c = comb(xf, wf)  # (n, k, o)
    p = np.exp(c - c.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rdx, rdw = (p * dcx(xf, wf)).sum(2), (p * dcw(xf, wf)).sum(0)
    for got, want in ((gx, rdx), (gw, rdw)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                                   atol=1e-2 * np.abs(want).max())


# The native engine's tangent is the XLA engine's: one native case checks it delegates.
_LSE_TANGENT_CASES = [(n, d, "xla") for n in ("log", "log_pad", "seed")
                      for d in ("bfloat16", "float16")] + [("log", "float16", "native")]


@pytest.mark.parametrize(("name", "dtype", "engine"), _LSE_TANGENT_CASES)
def test_low_precision_logsumexp_tangent_weights_are_the_softmax(name, dtype, engine):
    """The tangent (``jax.jvp``) of a logsumexp op on bf16 / f16 operands far from 0: the
    softmax of the exact products times the terms' tangents. The XLA engine's tangent (which
    the native engine's is) of the log semiring (``ops.log`` without a pad value) computed
    ``x + w`` in the operands' dtype, so its weights ``exp(c - y)`` were off by up to
    e^(half an ulp): 2.8% for f16 near 300 (found by ``tests/fuzz.py``'s tangent check; the
    f16 ``log`` cases failed before). bf16 passed before on CPU only: XLA CPU computes bf16
    arithmetic in float32 and drops the intermediate rounding."""
    op, comb, dcx, dcw = _LSE_RULES.get(name, (ops.log, *_LSE_RULES["log_pad"][1:]))
    rng = np.random.default_rng(4)
    offset, wscale = (30.0, 0.05) if (name, dtype) == ("seed", "float16") else (
        (300.0, 0.05) if name == "seed" else (300.0, 1.0))
    x = jnp.asarray(rng.standard_normal((4, 8)) + offset, dtype)
    w = jnp.asarray(rng.standard_normal((8, 3)) * wscale, dtype)
    tx = jnp.asarray(rng.standard_normal(x.shape), dtype)
    tw = jnp.asarray(rng.standard_normal(w.shape), dtype)
    dn = (((1,), (0,)), ((), ()))
    _, ty = jax.jit(lambda a, b, u, v: jax.jvp(
        lambda p, q: jaxconv.dot_general(p, q, dn, op=op, engine=engine), (a, b), (u, v)))(
        x, w, tx, tw)
    xf, wf = np.asarray(x, np.float64)[:, :, None], np.asarray(w, np.float64)[None]
    txf, twf = np.asarray(tx, np.float64)[:, :, None], np.asarray(tw, np.float64)[None]
    c = comb(xf, wf)  # (n, k, o)
    p = np.exp(c - c.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = (p * (dcx(xf, wf) * txf + dcw(xf, wf) * twf)).sum(1)
    np.testing.assert_allclose(np.asarray(ty, np.float64), want, rtol=0,
                               atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("engine", ["xla", "native"])
def test_f16_log_semiring_exact_backward_weights_are_the_softmax(engine):
    """``ops.log`` on f16 operands near 5000: ``|y| > 2^12`` sends the backward to its exact
    branch (``log_products.MAX_EXP_SPACE_Y``), where the XLA engine computed ``x + w`` in f16
    (half an ulp: 2) before the weights ``exp(c - y)``: gradients off by up to e^2 (240% of
    their largest; found probing the f16 log semiring's paths after the fuzzer's tangent
    finding above; the fuzzer's low-precision logsumexp focus now draws such data). The
    operands are now widened to float32 there too, as the native engine computes them."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 16)) + 5000, jnp.float16)
    w = jnp.asarray(rng.standard_normal((16, 3)), jnp.float16)
    g = rng.standard_normal((4, 3))
    dn = (((1,), (0,)), ((), ()))
    gx, gw = jax.jit(lambda a, b: jax.vjp(
        lambda p, q: jaxconv.dot_general(p, q, dn, op="log", engine=engine), a, b)[1](
        jnp.asarray(g, jnp.float16)))(x, w)
    c = np.asarray(x, np.float64)[:, :, None] + np.asarray(w, np.float64)[None]
    p = np.exp(c - c.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gp = p * np.asarray(jnp.asarray(g, jnp.float16), np.float64)[:, None, :]
    for got, want in ((gx, gp.sum(2)), (gw, gp.sum(0))):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                                   atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("engine", ["xla", "native"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_kernel_gradient_of_a_tap_that_meets_no_term_is_zero(engine, value):
    """A tap that reads only padding under identity padding (``l2_exact``: skipped taps) has
    no term, so its kernel gradient is 0 whatever it holds, and nothing else depends on it:
    the gradients equal those with a finite value there. The separable kernel gradient
    (``gw - w * sum g``) gave NaN * 0 for a NaN or infinite w (fuzz seed 6000073); checked on
    the batched and the per-example (vmap of grad) routes."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 2)).astype(np.float32)  # (N, W, C): padded to 5, span 4
    w = rng.standard_normal((2, 2, 4)).astype(np.float32)  # tap 0 reads only padding

    def loss(a, b):
        y = jaxconv.conv_general_dilated(a, b, (1,), ((3, 0),), rhs_dilation=(3,),
                                         dimension_numbers=("NWC", "WIO", "NWC"),
                                         op="l2_exact", engine=engine)
        return jnp.sum(y * jnp.arange(1.0, 1.0 + y.size).reshape(y.shape))

    bad = w.copy()
    bad[0, 1, 2] = value
    for grad in (jax.grad(loss, (0, 1)),
                 lambda a, b: jax.vmap(jax.grad(loss, (0, 1)), (0, None))(a[:, None], b)):
        want = jax.jit(grad)(x, w)
        got = jax.jit(grad)(x, bad)
        for gv, wv in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(gv), np.asarray(wv))
