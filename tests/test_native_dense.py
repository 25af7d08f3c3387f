"""Dense products on the native engine: the blocked winner backward of max / min ops and the
min form's sampled centring of adder / l1 (csrc/kernel_dense_backward.h, kernel_centre.h), l1's
one-pass dense backward (kernel_sums.h).

The winner backward is checked against the tie rule written out in numpy (equal split among
the products equal to the result) and bit for bit against the general rescan, which serves
the same products laid out as a 1x1 convolution over two positions per image.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_checks import recorded_equals_rescan
from reference import NUMPY_OPS, dot_general_reference

import jaxconv
from jaxconv._src.core import differentiation
from jaxconv._src.engines import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

DN = (((1,), (0,)), ((), ()))
MAXMIN = ("max_plus", "min_plus", "max_min", "min_max")


def _winner_grads(name: str, x: np.ndarray, w: np.ndarray, ct: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The contract's rule in float64 loops: each output's cotangent split equally among the
    products equal to its result, times the combine's partial derivatives (a tie x == w of
    min / max split in half)."""
    op = NUMPY_OPS[name]
    red = np.max if op.reduce is np.maximum else np.min
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for p in range(x.shape[0]):
        for o in range(w.shape[1]):
            prod = op.combine(x[p], w[:, o])
            hit = prod == red(prod)
            share = ct[p, o] / hit.sum()
            if name in ("max_plus", "min_plus"):
                px = pw = np.ones(x.shape[1])
            else:  # min(x, w) under max, max(x, w) under min
                first = x[p] < w[:, o] if name == "max_min" else x[p] > w[:, o]
                px = np.where(first, 1.0, np.where(x[p] == w[:, o], 0.5, 0.0))
                pw = 1.0 - px
            dx[p] += np.where(hit, share * px, 0.0)
            dw[:, o] += np.where(hit, share * pw, 0.0)
    return dx, dw


def _dense_vjp(name: str, x, w, ct):
    f = lambda a, b: jaxconv.dot_general(a, b, DN, op=name, engine="native")  # noqa: E731
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(ct))


def _conv_vjp(name: str, x, w, ct):
    """The same product as a 1x1 convolution over images of two positions: the general
    winner rescan (not the dense path; recording off, which convolutions also have)."""
    m, k = x.shape
    kw = dict(window_strides=(1, 1), padding="VALID",
              dimension_numbers=("NHWC", "HWIO", "NHWC"))
    f = lambda a, b: jaxconv.conv_general_dilated(  # noqa: E731
        a.reshape(m // 2, 2, 1, k), b.reshape(1, 1, *b.shape), op=name, engine="native",
        **kw).reshape(m, -1)
    with mock.patch.object(differentiation, "_records", lambda problem: False):
        y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(ct))


# K: one block of 64 kernel rows; five with a tail; 27 blocks of 64 (so 14 of 128). Integer
# data: ties within and across blocks, and x == w for max_min / min_max.
@pytest.mark.parametrize("shape", [(6, 64, 17), (10, 300, 70), (4, 1700, 20)])
@pytest.mark.parametrize("name", MAXMIN)
def test_dense_winner_backward_splits_ties_as_the_rule(name, shape):
    m, k, o = shape
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((m, k)) * 2).astype(np.float32)
    w = np.round(rng.standard_normal((k, o)) * 2).astype(np.float32)
    ct = rng.standard_normal((m, o)).astype(np.float32)
    y, dx, dw = jax.jit(lambda a, b: _dense_vjp(name, a, b, ct))(x, w)
    op = NUMPY_OPS[name]
    ref = dot_general_reference(x, w, DN, combine=op.combine, reduce=op.reduce,
                                identity=op.identity)
    np.testing.assert_array_equal(np.asarray(y), ref)
    rdx, rdw = _winner_grads(name, x.astype(np.float64), w.astype(np.float64), ct)
    np.testing.assert_allclose(np.asarray(dx), rdx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), rdw, rtol=1e-5, atol=1e-5)


def _data(kind: str, seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (14, 260), w (260, 90), a cotangent: distinct reals, integers (ties within and
    across blocks), mostly signed zeros with a few +-1 and denormals (max_min / min_max
    results of +-0 tied across blocks: the keyed recording marks a block of -0 products
    under a +0 result), or integers with a NaN, a -inf and a +inf (nothing recorded: the
    backward takes the general rescan)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((14, 260)).astype(np.float32)
    w = rng.standard_normal((260, 90)).astype(np.float32)
    if kind == "zeros":
        x, w = np.round(x * 0.3), np.round(w * 0.3)
        x[3, 10], x[9, 130], w[70, 4] = 1e-40, -1e-40, -1e-40
    elif kind != "distinct":
        x, w = np.round(x), np.round(w)
    if kind == "nonfinite":
        x[2, 7], x[5, 200], w[100, 3] = np.nan, -np.inf, np.inf
    return x, w, rng.standard_normal((14, 90)).astype(np.float32)


@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros", "nonfinite"])
@pytest.mark.parametrize("name", MAXMIN)
def test_dense_winner_backward_has_the_general_rescans_bits(name, kind):
    """The recorded dense backward (the recording forward's block masks) against the general
    rescan bit for bit, and against the XLA engine (which finds winners by index)."""
    x, w, ct = _data(kind)
    got = jax.jit(lambda a, b: _dense_vjp(name, a, b, ct))(x, w)
    want = jax.jit(lambda a, b: _conv_vjp(name, a, b, ct))(x, w)
    for a, b in zip(got, want, strict=True):  # bits: zero signs and NaNs included
        np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))
    f = lambda a, b: jaxconv.dot_general(a, b, DN, op=name, engine="xla")  # noqa: E731
    y, vjp = jax.vjp(f, x, w)
    for a, b in zip(got, (y, *vjp(ct)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _exact_record_reference(name: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The exact record of x + w (or x - w) under max / min, from numpy's float32 products:
    per output the k of its one product equal to the result, or -2 - the mask of the 64-row
    blocks holding its tied products (csrc/kernel_densebwd_exact.h)."""
    prod = x[:, :, None] - w[None] if "minus" in name else x[:, :, None] + w[None]
    y = prod.max(1) if name.startswith("max") else prod.min(1)
    hit = prod == y[:, None, :]
    blocks = hit.reshape(x.shape[0], -1, 64, w.shape[1]).any(2) if x.shape[1] % 64 == 0 else (
        np.stack([hit[:, k:k + 64].any(1) for k in range(0, x.shape[1], 64)], 1))
    mask = (blocks * (1 << np.arange(blocks.shape[1]))[None, :, None]).sum(1)
    return np.where(hit.sum(1) == 1, hit.argmax(1), -2 - mask).astype(np.int32)


@pytest.mark.parametrize("kind", ["distinct", "ties", "nonfinite"])
@pytest.mark.parametrize("name", ["max_plus", "min_plus"])
def test_recording_forward_keeps_each_outputs_exact_winner(monkeypatch, name, kind):
    """x + w under max / min records each output's winning kernel row where it has one
    product equal to the result, its tie's block mask (-2 - mask) where it has several, and
    nothing (-1 everywhere: the backward rescans) on data with a NaN or an infinity."""
    from jaxconv._src.engines.native.engine import NativeEngine  # noqa: PLC0415

    seen = []
    recording = NativeEngine.forward_recording

    def spy(self, problem, a, b):
        seen.append((self, problem))
        return recording(self, problem, a, b)

    monkeypatch.setattr(NativeEngine, "forward_recording", spy)
    x, w, ct = _data(kind, seed=11)
    jax.jit(lambda a, b: _dense_vjp(name, a, b, ct)).lower(x, w)  # the engine sees the problem
    engine, problem = seen[0]
    y, rec = jax.jit(lambda a, b: recording(engine, problem, a, b))(x, w)
    rec = np.asarray(rec).reshape(x.shape[0], w.shape[1])
    if kind == "nonfinite":
        np.testing.assert_array_equal(rec, -1)
        return
    want = _exact_record_reference(name, x, w)
    if kind == "ties":
        assert (want >= 0).any() and (want < -2).any()  # both kinds of code are checked
    np.testing.assert_array_equal(rec, want)


@pytest.mark.parametrize("shape", [(9, 1024, 70), (5, 200, 130), (3, 2000, 20)])
@pytest.mark.parametrize("name", ["max_plus", "min_plus"])
def test_exact_record_backward_has_the_unrecorded_backwards_bits(name, shape):
    """Shapes of whole and partial 64-row blocks, more than one block of output channels and
    wider kernel-row blocks (K = 2000: 128 rows), on small integers (ties within and across
    blocks beside unique winners): the exact record's backward equals the unrecorded dense
    backward (its masks found by pass A) bit for bit, and the tie rule in float64 loops."""
    m, k, n = shape
    rng = np.random.default_rng(12)
    x = np.round(rng.standard_normal((m, k)) * 4).astype(np.float32)
    w = np.round(rng.standard_normal((k, n)) * 4).astype(np.float32)
    ct = rng.standard_normal((m, n)).astype(np.float32)
    got = recorded_equals_rescan(lambda a, b: _dense_vjp(name, a, b, ct), x, w)
    if k <= 1024:
        rdx, rdw = _winner_grads(name, x.astype(np.float64), w.astype(np.float64), ct)
        np.testing.assert_allclose(np.asarray(got[1]), rdx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[2]), rdw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["max_min", "min_max"])
def test_recording_forward_on_floats_has_the_keyed_bits(name):
    """The recording forward of max_min / min_max on float min / max (the `keyed = 0`
    parameter: zero signs fixed by the forward's rule) gives the integer-key recording's y
    and gradients bit for bit, on data whose results are mostly signed zeros."""
    from jaxconv import _native  # noqa: PLC0415
    from jaxconv._src.engines.native import tuning  # noqa: PLC0415

    x, w, ct = _data("zeros", seed=9)
    tuning.ensure()
    saved = dict(_native.params())
    fn = jax.jit(lambda a, b: _dense_vjp(name, a, b, ct))
    try:
        runs = []
        for keyed in (1, 0):
            _native.set_params(dict(saved, keyed=keyed))
            runs.append([np.asarray(a).view(np.int32) for a in fn(x, w)])
    finally:
        _native.set_params(saved)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def _primitives(jaxpr) -> list[str]:
    """The names of every primitive in `jaxpr`, nested ones (jit, checkpoint) included."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            names.extend(_primitives(sub))
    return names


@pytest.mark.parametrize("transform,name", [("grad", "max_plus"), ("checkpoint", "min_max"),
                                            ("grad", "max_min")])
def test_recording_forward_runs_once_and_keeps_todays_bits(transform, name):
    """Under a gradient the recording forward runs once (no plain forward beside it) and its
    masks reach the backward; the gradients equal the marking pass's (recording off: for
    max_min / min_max the integer-key rescan) bit for bit. The plain forward records
    nothing."""
    x, w, ct = _data("ties", seed=8)

    def loss(a, b):
        y = jaxconv.dot_general(a, b, DN, op=name, engine="native")
        return jnp.sum(y * ct)

    fn = jax.checkpoint(loss) if transform == "checkpoint" else loss
    grad = jax.grad(fn, (0, 1))
    names = _primitives(jax.make_jaxpr(grad)(x, w).jaxpr)
    # Remat recomputes the forward in the backward: the recording one, once.
    assert names.count("jaxconv_conv_record") == (2 if transform == "checkpoint" else 1)
    assert "jaxconv_conv" not in names
    assert "jaxconv_conv_record" not in _primitives(jax.make_jaxpr(loss)(x, w).jaxpr)
    recorded_equals_rescan(grad, x, w)


@pytest.mark.parametrize("mapped,name", [("kernel", "max_plus"), ("input", "min_max"),
                                         ("input", "min_plus")])
def test_dense_winner_backward_under_vmap(mapped, name):
    """A mapped kernel folds into feature groups: each group's block masks and winners. A
    mapped input folds the recording forward into the batch and the backward (a kernel
    gradient per element) into groups: an output's masks do not depend on the folding."""
    rng = np.random.default_rng(6)
    xs = np.round(rng.standard_normal((3, 9, 130)) * 2).astype(np.float32)
    ws = np.round(rng.standard_normal((3, 130, 40)) * 2).astype(np.float32)
    if mapped == "kernel":
        xs[:] = xs[0]
    else:
        ws[:] = ws[0]
    ct = rng.standard_normal((3, 9, 40)).astype(np.float32)

    def grads(x, w, c):
        return jax.grad(lambda a, b: jnp.sum(jaxconv.dot_general(
            a, b, DN, op=name, engine="native") * c), (0, 1))(x, w)

    axes = (None, 0, 0) if mapped == "kernel" else (0, None, 0)
    dx, dw = jax.jit(jax.vmap(grads, in_axes=axes))(xs[0] if mapped == "kernel" else xs,
                                                   ws[0] if mapped == "input" else ws, ct)
    for j in range(3):
        rdx, rdw = _winner_grads(name, xs[j].astype(np.float64),
                                 ws[j].astype(np.float64), ct[j])
        np.testing.assert_allclose(np.asarray(dx[j]), rdx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dw[j]), rdw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["adder", "l1"])
def test_min_form_takes_the_exact_loop_for_an_unsampled_infinite_weight(name):
    """centre() samples the first 64 output channels for its shifts; a -inf weight past them
    must still send the call to the direct loop (-|x - w| = -inf, where the min form's
    2 min - x - w would give -inf + inf = NaN)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 100)).astype(np.float32)
    w[1, 80] = -np.inf
    y = np.asarray(jaxconv.dot_general(x, w, DN, op=name, engine="native"))
    op = NUMPY_OPS[name]
    ref = dot_general_reference(x, w, DN, combine=op.combine, reduce=op.reduce,
                                identity=op.identity)
    np.testing.assert_array_equal(y[:, 80], ref[:, 80])
    keep = np.arange(100) != 80
    np.testing.assert_allclose(y[:, keep], ref[:, keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["adder", "l1"])
@pytest.mark.parametrize("offsets", [(100.0, 100.0), (0.0, -1000.0)])
def test_min_form_sampled_shift_keeps_a_products_precision(name, offsets):
    """With more than 64 output channels the shift is a sample's mean: offset data must still
    keep about a product's precision against a float64 reference."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((12, 300)) + offsets[0]).astype(np.float32)
    w = (rng.standard_normal((300, 200)) + offsets[1]).astype(np.float32)
    y = np.asarray(jaxconv.dot_general(x, w, DN, op=name, engine="native"))
    xd, wd = x.astype(np.float64), w.astype(np.float64)
    ref = -np.abs(xd[:, :, None] - wd[None]).sum(1)
    # A product's error, eps * sum(|x - s| + |w - s|), s the sample's mean (a few eps of it).
    s = wd[:, :64].mean(1)
    scale = np.abs(xd - s).sum(1)[:, None] + np.abs(wd - s[:, None]).sum(0)[None]
    assert np.all(np.abs(y - ref) <= 8 * 1.2e-7 * scale)


def test_dense_winner_backward_of_a_compiled_user_op():
    """A user combine under max compiles the same backward: x * w (ties and signs of zero
    among integer products) against the XLA engine."""
    op = jaxconv.Op(lambda a, b: a * b, "max", name="dense_max_times")
    rng = np.random.default_rng(9)
    x = np.round(rng.standard_normal((9, 130)) * 2).astype(np.float32)
    w = np.round(rng.standard_normal((130, 20)) * 2).astype(np.float32)
    ct = rng.standard_normal((9, 20)).astype(np.float32)

    def grads(engine):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(jaxconv.dot_general(
            a, b, DN, op=op, engine=engine) * ct), (0, 1)))(x, w)

    got, want = grads("native"), grads("xla")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


USER_MAXMIN = {
    "max_times": jaxconv.Op(lambda a, b: a * b, "max", name="dense_rec_max_times"),
    "clip_max": jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max",
                           name="dense_rec_clip_max"),
    "min_times": jaxconv.Op(lambda a, b: a * b, "min", name="dense_rec_min_times"),
}


@pytest.mark.parametrize("shape", [(9, 300, 70), (3, 2000, 20)])
@pytest.mark.parametrize("name", list(USER_MAXMIN))
@pytest.mark.parametrize("kind", ["ties", "specials"])
def test_dense_user_op_recorded_backward_has_the_rescans_bits(name, shape, kind):
    """A float32 user max / min op's dense product records its winner blocks (K of whole and
    partial 64-row blocks, and 2000: blocks of 128): y, dx and dw equal the unrecorded
    backward's bit for bit on small integers (ties within and across blocks, signed zeros;
    clip saturates) and with a NaN, infinities and an all -inf row (nothing recorded); the
    gradients of the finite data match the XLA engine's."""
    m, k, n = shape
    op = USER_MAXMIN[name]
    rng = np.random.default_rng(13)
    x = np.round(rng.standard_normal((m, k)) * 2).astype(np.float32)
    w = np.round(rng.standard_normal((k, n)) * 2).astype(np.float32)
    if kind == "specials":
        x[0] = -np.inf
        x[1, 5], w[7, 3], w[9, 1] = np.nan, np.inf, -np.inf
    ct = rng.standard_normal((m, n)).astype(np.float32)
    got = recorded_equals_rescan(lambda a, b: _dense_vjp(op, a, b, ct), x, w)
    if kind == "ties":
        ref = jax.jit(lambda a, b: jax.vjp(lambda c, d: jaxconv.dot_general(
            c, d, DN, op=op, engine="xla"), a, b)[1](ct))(x, w)
        for a, b in zip(got[1:], ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_dense_l1_backward_over_row_super_blocks():
    """l1's one-pass dense backward (kernel_sums.h) in items of up to 4 blocks of 8 kernel rows:
    530 rows give 67 blocks, so 4 per item with a last item of 3 and a partial last block; the
    half-integer data put ties x == w (subgradient 0) in every block. Checked against the
    exact subgradient summed in float64."""
    rng = np.random.default_rng(5)
    x = np.round(rng.standard_normal((9, 530)) * 2).astype(np.float32) / 2
    w = np.round(rng.standard_normal((530, 32)) * 2).astype(np.float32) / 2
    ct = rng.standard_normal((9, 32)).astype(np.float32)
    f = lambda a, b: jaxconv.dot_general(a, b, DN, op="l1", engine="native")  # noqa: E731
    _, vjp = jax.vjp(f, x, w)
    dx, dw = jax.jit(vjp)(ct)
    s = np.sign(w[None].astype(np.float64) - x[:, :, None])  # (p, k, o): -d|x - w|/dx
    np.testing.assert_allclose(np.asarray(dx), np.einsum("po,pko->pk", ct, s), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), -np.einsum("po,pko->ko", ct, s), rtol=1e-5,
                               atol=1e-5)


# x - w under max / min (csrc/kernel_dense_minus.h, native/twins.py): the difference kernels
# serve a user op written as x - w, as the dense recording forward and its blocked backward.
# Covering set: both reduces, the four kinds of data, and a monotone map after the reduce.
@pytest.mark.parametrize("reduce, kind, outer", [("max", "distinct", False),
                                                 ("min", "ties", False),
                                                 ("max", "zeros", False),
                                                 ("min", "nonfinite", False),
                                                 ("max", "ties", True)])
def test_difference_kernels_are_the_sum_kernels_on_the_negated_kernel(reduce, kind, outer):
    """``x - w`` runs the kernels of ``x - w`` (no negated copy of the kernel), and gives the
    bits of ``x + (-w)`` on the built-in sum kernels: y and dx bit for bit, dw negated bit for
    bit (the partial -1; a sum of negated terms is the negated sum, exactly); against the tie
    rule in float64 loops and the XLA engine."""
    from jaxconv._src.engines.native.twins import builtin_twin  # noqa: PLC0415

    if outer:
        op = jaxconv.Op(lambda a, b: jnp.tanh(a - b), reduce, name="tanh_sub")
    else:
        op = jaxconv.Op(lambda a, b: a - b, reduce, name="sub")
    plus = "max_plus" if reduce == "max" else "min_plus"
    x, w, ct = _data(kind, seed=8)
    f = lambda a, b: jaxconv.dot_general(a, b, DN, op=op, engine="native")  # noqa: E731
    text = jax.jit(f).lower(x, w).as_text()
    assert "stablehlo.negate" not in text  # the kernel is not negated in a pass of its own
    if not outer:
        assert builtin_twin(op).native == f"{reduce}_minus"

    def vjp(fn, a, b):
        y, back = jax.vjp(fn, a, b)
        return (y, *back(ct))

    got = [np.asarray(v) for v in jax.jit(lambda a, b: vjp(f, a, b))(x, w)]
    if outer:  # the tanh after the reduce, its derivative in the cotangent
        y0 = np.asarray(jax.jit(lambda a, b: jaxconv.dot_general(
            a, b, DN, op=jaxconv.Op(lambda p, q: p - q, reduce), engine="native"))(x, w))
        inner_ct = (ct * (1.0 - np.tanh(y0) ** 2)).astype(np.float32)
    else:
        inner_ct = ct
    y, dx, dw = (np.asarray(v) for v in jax.jit(lambda a, b: _dense_vjp(plus, a, b, inner_ct))(
        x, -w))
    bits = lambda a: np.asarray(a).view(np.int32)  # noqa: E731
    np.testing.assert_array_equal(bits(got[0]), bits(jax.jit(jnp.tanh)(y) if outer else y))
    if not outer:
        np.testing.assert_array_equal(bits(got[1]), bits(dx))
        # (-dw + 0: an entry with no winner is +0 in both, not -0.)
        np.testing.assert_array_equal(bits(got[2]), bits(-dw + np.float32(0.0)))
    xla = lambda a, b: jaxconv.dot_general(a, b, DN, op=op, engine="xla")  # noqa: E731
    want = [np.asarray(v) for v in jax.jit(lambda a, b: vjp(xla, a, b))(x, w)]
    np.testing.assert_array_equal(bits(got[0]), bits(want[0]))
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if kind != "nonfinite":
        rdx, rdw = _winner_grads(plus, x.astype(np.float64), -w.astype(np.float64),
                                 inner_ct.astype(np.float64))
        np.testing.assert_allclose(got[1], rdx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[2], -rdw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["first_block", "tail_columns", "last_row", "finite"])
@pytest.mark.parametrize("name", MAXMIN)
def test_dense_forward_checks_the_weights_it_packs(name, where):
    """The plain max / min forward scans x alone and checks w as it packs it
    (csrc/kernel_densefwd_wcheck.h): a NaN in the first block or in the partial last block's
    columns, an infinity in the last kernel row must still give the NaN-propagating loop's
    bits, under one-panel blocks (claims), cut panels (items), one lane and float min / max."""
    from jaxconv import _native
    from jaxconv._src.engines.native import tuning

    rng = np.random.default_rng(11)
    x = np.round(rng.standard_normal((9, 300)) * 2).astype(np.float32)
    w = np.round(rng.standard_normal((300, 150)) * 2).astype(np.float32)
    if where == "first_block":
        w[5, 3] = np.nan
    elif where == "tail_columns":  # columns 128..149: the last block's 22 of 64
        w[200, 140] = np.nan
    elif where == "last_row":
        w[299, 70] = np.inf
    want = np.asarray(jaxconv.dot_general(x, w, DN, op=name, engine="xla"))
    assert np.isnan(want).any() == (where in ("first_block", "tail_columns"))
    tuning.ensure()
    saved = dict(_native.params())
    try:
        for extra in ({}, {"block_kib": 0}, {"lanes": 1}, {"keyed": 0, "bcast": 0}):
            _native.set_params({**tuning.defaults(), **extra})
            f = jax.jit(lambda a, b: jaxconv.dot_general(a, b, DN, op=name, engine="native"))
            got = np.asarray(f(x, w))
            num = ~np.isnan(want)  # bits where a number (zero signs too); NaN where NaN
            np.testing.assert_array_equal(
                got[num].view(np.int32), want[num].view(np.int32), err_msg=str(extra)
            )
            np.testing.assert_array_equal(np.isnan(got), ~num, err_msg=str(extra))
    finally:
        _native.set_params(saved)
