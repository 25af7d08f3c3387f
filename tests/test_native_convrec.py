"""The recording forward of convolutions by max / min ops and the backward that reads its
block masks (csrc/kernel_convrec_forward.h, kernel_convrec_backward.h).

Under a gradient the native engine's forward keeps, per output, which blocks of 64 kernel rows
hold its winners, and the backward compares only those blocks' products with y. Checked: the
masks against numpy (the blocks holding a product equal to y), the gradients bit for bit
against the backward that rescans every window (recording off), against the tie rule written
out in numpy, and (non-finite data) against the XLA engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_checks import recorded_equals_rescan
from reference import NUMPY_OPS

import jaxconv
from jaxconv._src.core.primitive import record_p
from jaxconv._src.engines import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

# name: x, w, strides, padding, lhs / rhs dilation, groups. K = taps * I > 64 everywhere.
GEOMS = {
    "same": ((2, 7, 6, 64), (3, 3, 64, 40), (1, 1), "SAME", (1, 1), (1, 1), 1),
    "strided": ((2, 9, 8, 64), (3, 3, 64, 24), (2, 2), ((2, 1), (0, 3)), (1, 1), (2, 1), 1),
    # 48 channels: blocks of 64 rows straddle taps; two groups of 40 output channels.
    "groups": ((1, 6, 5, 96), (3, 3, 48, 80), (1, 1), "SAME", (1, 1), (1, 1), 2),
    "transposed": ((1, 4, 5, 40), (3, 3, 40, 16), (1, 1), ((2, 2), (1, 2)), (2, 2), (1, 1), 1),
    "pointwise": ((2, 3, 4, 130), (1, 1, 130, 20), (1, 1), "VALID", (1, 1), (1, 1), 1),
}


def _data(kind: str, xs, ws, seed: int = 0):
    """Distinct reals; integers (ties within and across blocks, x == w); mostly signed zeros
    with denormals (results of +-0 tied across blocks); integers with a NaN, a -inf and a +inf
    (nothing recorded: the backward rescans)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    if kind == "zeros":
        x, w = np.round(x * 0.3), np.round(w * 0.3)
        x = np.where(rng.random(xs) < 0.3, -0.0, x)
        w = np.where(rng.random(ws) < 0.3, -0.0, w)
        x.flat[5], x.flat[77], w.flat[13] = 1e-40, -1e-40, -1e-40
    elif kind != "distinct":
        x, w = np.round(x * 1.5), np.round(w * 1.5)
    if kind == "nonfinite":
        x.flat[3], x.flat[50], w.flat[7] = np.nan, -np.inf, np.inf
    return x.astype(np.float32), w.astype(np.float32)


def _conv(name: str, geom: str, engine: str = "native"):
    _, _, st, pad, ld, rd, grp = GEOMS[geom]
    return lambda a, b: jaxconv.conv_general_dilated(
        a, b, st, pad, lhs_dilation=ld, rhs_dilation=rd, feature_group_count=grp,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), op=name, engine=engine)


def _vjp(f, x, w, ct):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(ct))


# A covering set: each op on two geometries, each geometry and data kind at least once.
CASES = [
    ("max_plus", "groups", "distinct"),
    ("max_plus", "pointwise", "nonfinite"),
    ("min_plus", "strided", "distinct"),
    ("min_plus", "transposed", "zeros"),
    ("max_min", "groups", "zeros"),
    ("max_min", "transposed", "ties"),
    ("min_max", "strided", "ties"),
    ("min_max", "same", "zeros"),
]


@pytest.mark.parametrize("name,geom,kind", CASES)
def test_recorded_conv_backward_has_the_rescans_bits(name, geom, kind):
    """y, dx and dw with the record equal the full rescan's bit for bit (zero signs and NaNs
    included); with a NaN and infinities (nothing recorded) also the XLA engine's, which finds
    winners by index. (The XLA engine's convolution compiles for seconds: one case.)"""
    x, w = _data(kind, *GEOMS[geom][:2])
    f = _conv(name, geom)
    ct = np.random.default_rng(1).standard_normal(jax.eval_shape(f, x, w).shape)
    ct = ct.astype(np.float32)
    got = recorded_equals_rescan(lambda a, b: _vjp(f, a, b, ct), x, w)
    if kind != "nonfinite":
        return
    ref = jax.jit(lambda a, b: _vjp(_conv(name, geom, "xla"), a, b, ct))(x, w)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _windows(x: np.ndarray, w: np.ndarray, geom: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 im2col of a stride-1 SAME 2-D convolution with one group: the products
    (N, H, W, K, O) over kernel rows k = tap * I + i (invalid taps: NaN), and each product's
    input index (N, H, W, K) into x.ravel() (-1 for a padded tap)."""
    assert geom == "same"
    n, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    idx = np.arange(x.size).reshape(x.shape)
    cols = np.full((n, h, wd, kh * kw * c), -1)
    for a in range(kh):
        for b in range(kw):
            t = (a * kw + b) * c
            for i in range(h):
                for j in range(wd):
                    p, q = i + a - (kh - 1) // 2, j + b - (kw - 1) // 2
                    if 0 <= p < h and 0 <= q < wd:
                        cols[:, i, j, t:t + c] = idx[:, p, q]
    return cols, w.reshape(-1, o).astype(np.float64)


@pytest.mark.parametrize("name", ["max_plus", "min_max"])
def test_recorded_masks_and_tie_split_follow_the_rule(name):
    """The recording forward's masks are the blocks of 64 kernel rows holding a product equal
    to y (numpy, float64), and the gradients split each cotangent equally among the products
    equal to y (tie-heavy data: ties within and across blocks, x == w)."""
    geom = "same"
    x, w = _data("ties", *GEOMS[geom][:2], seed=4)
    f = _conv(name, geom)
    eqn = next(e for e in jax.make_jaxpr(f)(x, w).eqns if e.primitive.name == "jaxconv_conv")
    y, masks = record_p.bind(jnp.asarray(x), jnp.asarray(w), problem=eqn.params["problem"])
    cols, wk = _windows(x, w, geom)
    op = NUMPY_OPS[name]
    xv = np.where(cols >= 0, x.astype(np.float64).ravel()[cols], np.nan)  # (N, H, W, K)
    prod = op.combine(xv[..., None], wk)  # (N, H, W, K, O)
    red = np.nanmax if op.reduce is np.maximum else np.nanmin
    y_ref = red(prod, axis=3)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    hit = prod == y_ref[..., None, :]
    blocks = hit.reshape(*hit.shape[:3], -1, 64, hit.shape[-1]).any(axis=4)
    want = (blocks * (2 ** np.arange(blocks.shape[3]))[:, None]).sum(axis=3)
    np.testing.assert_array_equal(np.asarray(masks), want)
    ct = np.random.default_rng(2).standard_normal(y_ref.shape).astype(np.float32)
    _, dx, dw = jax.jit(lambda a, b: _vjp(f, a, b, ct))(x, w)
    share = hit * (ct / hit.sum(axis=3))[..., None, :]
    if name == "max_plus":
        px = pw = share
    else:  # max(x, w) under min: x's partial is 1 where x > w, 1/2 on x == w
        xw = xv[..., None]
        px = share * np.where(xw > wk, 1.0, np.where(xw == wk, 0.5, 0.0))
        pw = share - px
    rdx = np.zeros(x.size)
    np.add.at(rdx, cols[cols >= 0], px.sum(axis=-1)[cols >= 0])
    rdw = pw.sum(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(dx).ravel(), rdx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw).reshape(rdw.shape), rdw, rtol=1e-5, atol=1e-5)


def test_explain_says_what_the_backward_does():
    """`explain` names the recording forward and the backward that scans the marked blocks."""
    text = str(jaxconv.explain("max_min", platform="cpu"))
    assert "records, per output, which blocks of 64 kernel rows" in text
    assert "compares only those blocks' products" in text


# float32 user max / min ops record through their own library (the template's recording tiles
# and recorded scans): a product that saturates (clip: ties across many blocks), a tropical
# max-times (signed zeros and infinities from finite data are not NaN), a min, a combine
# whose -inf input makes -inf products (all -inf windows), and a custom derivative rule.
USER_OPS = {
    "max_times": jaxconv.Op(lambda a, b: a * b, "max", name="rec_max_times"),
    "clip_max": jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", name="rec_clip_max"),
    "min_times": jaxconv.Op(lambda a, b: a * b, "min", name="rec_min_times"),
    "max_plus2": jaxconv.Op(lambda a, b: a + 2.0 * b, "max", name="rec_max_plus2"),
    # jax.nn.relu's custom_jvp rule: the backward runs the rule per winner.
    "relu_times": jaxconv.Op(lambda a, b: jax.nn.relu(a) * b, "max", name="rec_relu_times"),
}
USER_CASES = [
    ("max_times", "groups", "distinct"),
    ("max_times", "same", "ties"),
    ("max_times", "pointwise", "nonfinite"),
    ("clip_max", "same", "distinct"),
    ("clip_max", "strided", "zeros"),
    ("clip_max", "transposed", "nonfinite"),
    ("min_times", "strided", "ties"),
    ("max_plus2", "same", "neginf"),
    ("relu_times", "groups", "ties"),
]


def _user_data(kind: str, xs, ws):
    """`_data`'s kinds, and "neginf": integers with x's first image all -inf (windows whose
    every product is -inf: nothing recorded)."""
    if kind != "neginf":
        return _data(kind, xs, ws)
    x, w = _data("ties", xs, ws)
    x[0] = -np.inf
    return x, w


@pytest.mark.parametrize("name,geom,kind", USER_CASES)
def test_user_op_recorded_backward_has_the_rescans_bits(name, geom, kind):
    """A float32 user max / min op's y, dx and dw with the record equal the full rescan's
    (recording off) bit for bit, and the XLA engine's (NaN where it is: a NaN window has no
    gradient on either engine)."""
    x, w = _user_data(kind, *GEOMS[geom][:2])
    op = USER_OPS[name]
    f = _conv(op, geom)
    ct = np.random.default_rng(1).standard_normal(jax.eval_shape(f, x, w).shape)
    ct = ct.astype(np.float32)
    eqn = next(e for e in jax.make_jaxpr(f)(x, w).eqns if e.primitive.name == "jaxconv_conv")
    _, masks = record_p.bind(jnp.asarray(x), jnp.asarray(w), problem=eqn.params["problem"])
    assert (np.asarray(masks) == -1).all() == (kind in ("nonfinite", "neginf"))
    got = recorded_equals_rescan(lambda a, b: _vjp(f, a, b, ct), x, w)
    ref = jax.jit(lambda a, b: _vjp(_conv(op, geom, "xla"), a, b, ct))(x, w)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_explain_says_whether_a_user_op_records():
    """`explain` names the recording forward for a float32 user max op, and says why a
    combine that finite operands can make NaN (inf - inf) or a pad_value does not record."""
    text = str(jaxconv.explain(USER_OPS["max_times"], platform="cpu", dtype=jnp.float32))
    assert "records, per output, which blocks of 64 kernel rows" in text
    nan = jaxconv.Op(lambda a, b: a * b - b * a, "max", name="rec_nan_max")
    text = str(jaxconv.explain(nan, platform="cpu", dtype=jnp.float32))
    assert "records, per output" not in text
    assert "does not record its winner blocks: finite operands can make a NaN" in text
    padded = jaxconv.Op(lambda a, b: a * b, "max", pad_value=0.0, name="rec_padded_times")
    text = str(jaxconv.explain(padded, platform="cpu", dtype=jnp.float32))
    assert "does not record its winner blocks: a pad_value" in text
