"""The sums' one-pass backward on dense products (csrc/kernel_sums_paired.h with
csrc/kernel_sumsbwd2_sign.h): l1's sign and its finite-cotangent form, the input gradient's
partial sums over output channels, and l2_exact's dense gradients in plain matrix products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

DN = (((1,), (0,)), ((), ()))


def _vjp(op: str, x: np.ndarray, w: np.ndarray, ct: np.ndarray):
    """The native dense product's gradients in x and w for the cotangent ``ct``.

    Args:
        op: the op's name.
        x: the input ``(P, I)``.
        w: the kernel ``(I, O)``.
        ct: the output's cotangent ``(P, O)``.

    Returns:
        ``(dx, dw)`` as numpy arrays.
    """
    def f(a, b):
        return jaxconv.dot_general(a, b, DN, op=op, engine="native")
    _, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    return tuple(np.asarray(v) for v in vjp(jnp.asarray(ct)))


def _l1_rule(x: jax.Array, w: jax.Array, ct: jax.Array):
    """l1's stated gradients, brute force in jnp: ``dx = -sum_o ct sign(x - w)``, ``dw =
    sum_p ct sign(x - w)``, with sign(0) = 0 multiplied, not skipped (inf * 0 is NaN).

    Args:
        x: the input ``(P, I)``.
        w: the kernel ``(I, O)``.
        ct: the output's cotangent ``(P, O)``.

    Returns:
        ``(dx, dw)``.
    """
    s = jnp.sign(x[:, :, None] - w[None, :, :])  # (P, I, O)
    terms = ct[:, None, :] * s
    return -jnp.sum(terms, axis=2), jnp.sum(terms, axis=0)


# Integer data: many x == w (sign 0). A finite cotangent takes the add-port form; an infinity
# or a NaN anywhere in it takes the multiplying form, which keeps inf * 0 -> NaN at the ties.
# 136 output channels: partial sums of 64 with a ragged last one.
@pytest.mark.parametrize("special", [None, "inf_at_tie", "nan", "-inf"])
def test_l1_dense_backward_matches_the_rule(special):
    rng = np.random.default_rng(23)
    x = rng.integers(-2, 3, (6, 32)).astype(np.float32)
    w = rng.integers(-2, 3, (32, 136)).astype(np.float32)
    ct = rng.standard_normal((6, 136)).astype(np.float32)
    if special == "inf_at_tie":
        p, i = np.argwhere(x[:, :, None] == w[None])[0][:2]
        o = int(np.flatnonzero(x[p, i] == w[i])[0])
        ct[p, o] = np.inf
    elif special == "nan":
        ct[2, 5] = np.nan
    elif special == "-inf":
        ct[4, 100] = -np.inf
    dx, dw = _vjp("l1", x, w, ct)
    rdx, rdw = (np.asarray(v) for v in _l1_rule(jnp.asarray(x), jnp.asarray(w),
                                                  jnp.asarray(ct)))
    if special is None:
        assert np.isfinite(dx).all() and np.isfinite(dw).all()
    else:
        assert np.isnan(rdx).any()
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(rdx))
    np.testing.assert_array_equal(np.isnan(dw), np.isnan(rdw))
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-5)


def test_l1_dense_input_gradient_sums_in_blocks():
    """Over 1024 output channels the input gradient adds partial sums of 64 channels, not
    one running sum: with every term of one sign its error stays near a product's."""
    rng = np.random.default_rng(4)
    x = rng.uniform(2.0, 3.0, (16, 16)).astype(np.float32)
    w = rng.uniform(-1.0, 1.0, (16, 1024)).astype(np.float32)
    ct = rng.uniform(1.0, 2.0, (16, 1024)).astype(np.float32)
    dx, _ = _vjp("l1", x, w, ct)
    ref = -ct.astype(np.float64).sum(axis=1, keepdims=True) * np.ones((1, 16))
    err = np.abs(dx - ref).max() / np.abs(ref).max()
    # One running sum over the 1024 channels: 1e-6 here; runs of 64 stay near 1e-7.
    assert err < 2.5e-7, err


def test_l2_exact_dense_gradients_copy_no_kernel():
    """l2_exact's dense gradients are plain matrix products: the compiled backward holds no
    transposed copy of the kernel or of its gradient."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    ct = rng.standard_normal((16, 96)).astype(np.float32)

    def fb(a, b, g):
        _, vjp = jax.vjp(lambda u, v: jaxconv.dot_general(u, v, DN, op="l2_exact",
                                                          engine="native"), a, b)
        return vjp(g)
    text = jax.jit(fb).lower(x, w, ct).compile().as_text()
    entry = text[text.index("ENTRY"):]
    moved = [line for line in entry.splitlines()
             if ("f32[96,64]" in line.split("=")[1][:20] if "=" in line else False)
             and ("copy" in line or "transpose" in line)]
    assert not moved, moved
    dx, dw = fb(x, w, ct)
    d = x[:, :, None] - w[None].astype(np.float64)
    np.testing.assert_allclose(dx, -2 * np.einsum("po,pio->pi", ct, d), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dw, 2 * np.einsum("po,pio->io", ct, d), rtol=1e-4, atol=1e-3)


# 272 input channels: eight blocks of two vectors and a last block of one, so the dense pair
# pass serves (kernel_sumbwd_dense.h); 13 positions: two full tiles of 6 and one rest tile;
# 136 output channels: a ragged last block of 128 and of the input gradient's runs of 64.
@pytest.mark.parametrize("op", ["adder", "l1"])
@pytest.mark.parametrize("special", [None, "inf_at_tie"])
def test_dense_pair_backward_same_bits_in_every_mode(op, special):
    """The dense adder / l1 backward gives the same bits with its cotangent broadcast into a
    register (bcast=0), read by the instructions (bcast=1) and with l1's product form in two
    terms of three (l1_split=1) (csrc/kernel_densebwd_memcot.h), and l1's matches its rule."""
    from jaxconv import _native
    from jaxconv._src.engines.native import tuning

    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, (13, 272)).astype(np.float32)
    w = rng.integers(-2, 3, (272, 136)).astype(np.float32)
    ct = rng.standard_normal((13, 136)).astype(np.float32)
    if special == "inf_at_tie":
        p, i = np.argwhere(x[:, :, None] == w[None])[0][:2]
        o = int(np.flatnonzero(x[p, i] == w[i])[0])
        ct[p, o] = np.inf
    tuning.ensure()
    saved = dict(_native.params())
    got = []
    try:
        for extra in ({"bcast": 0}, {"bcast": 1, "l1_split": 0}, {"bcast": 1, "l1_split": 1}):
            _native.set_params({**tuning.defaults(), **extra})
            got.append((extra, _vjp(op, x, w, ct)))
    finally:
        _native.set_params(saved)
    (_, (dx0, dw0)), rest = got[0], got[1:]
    for extra, (dx, dw) in rest:
        np.testing.assert_array_equal(dx.view(np.int32), dx0.view(np.int32), err_msg=str(extra))
        np.testing.assert_array_equal(dw.view(np.int32), dw0.view(np.int32), err_msg=str(extra))
    if op == "l1":
        rdx, rdw = (
            np.asarray(v) for v in _l1_rule(jnp.asarray(x), jnp.asarray(w), jnp.asarray(ct))
        )
        np.testing.assert_array_equal(np.isnan(dx0), np.isnan(rdx))
        np.testing.assert_array_equal(np.isnan(dw0), np.isnan(rdw))
        np.testing.assert_allclose(dx0, rdx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dw0, rdw, rtol=1e-5, atol=1e-5)


def test_bf16_l2_exact_kernel_gradient_nan_on_both_engines_fuzz_6000073():
    import fuzz

    ex = fuzz.Example(6000073, fuzz._specs(jnp, jaxconv), x64=False, transform=None)
    assert (ex.spec.name, ex.dtype, ex.data) == ("l2_exact", "bfloat16", "specials")
    y = np.asarray(jax.jit(ex.fn("xla"))(ex.x, ex.w))
    g = np.random.default_rng(0).standard_normal(y.shape).astype(ex.np_dtype)
    dws = [np.asarray(jax.jit(lambda a, b, c, e=e: jax.vjp(ex.fn(e), a, b)[1](c))(
        ex.x, ex.w, g)[1], np.float32) for e in ("xla", "native")]
    np.testing.assert_array_equal(np.isnan(dws[1]), np.isnan(dws[0]))
