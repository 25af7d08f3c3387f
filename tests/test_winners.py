"""Max/min winners: gradients and tangents go to the products the forward chose.

The oracle is `jax.grad` / `jax.jvp` of a brute-force `jnp.max` over an explicit im2col of
`combine(x, w)`, all in one `jit` (the products computed once, so that its max and its
winners come from the same values). The user ops' combines are the ones XLA may round
differently in two kernels (`x * w - x` and `x * w + w` contracted into an fma in one and
not in another; `sin`, whose native and XLA versions may differ by an ulp): an engine that
finds its winners by comparing recomputed products with the forward's output loses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxconv

DN = ("NWC", "WIO", "NWC")
DENSE = (((1,), (0,)), ((), ()))

OPS = {  # name -> (op, brute-force combine, reduce)
    "fmsub_max": (jaxconv.Op(lambda x, w: x * w - x, "max", name="fmsub_max"),
                  lambda x, w: x * w - x, "max"),
    "fmadd_min": (jaxconv.Op(lambda x, w: x * w + w, "min", name="fmadd_min"),
                  lambda x, w: x * w + w, "min"),
    "sin_mul_max": (jaxconv.Op(lambda x, w: jnp.sin(x) * w, "max", name="sin_mul_max"),
                    lambda x, w: jnp.sin(x) * w, "max"),
    "max_plus": ("max_plus", jnp.add, "max"),
    "min_plus": ("min_plus", jnp.add, "min"),
    "max_min": ("max_min", jnp.minimum, "max"),
    "max_times": ("max_times", jnp.multiply, "max"),
}


def _data(kind: str, shape: tuple[int, ...], seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values: many tied windows
        return jnp.asarray(rng.integers(-2, 3, shape), jnp.float32)
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _ours(name: str, engine: str, geometry: str):
    op = OPS[name][0]
    if geometry == "dense":
        return lambda a, b: jaxconv.dot_general(a, b, DENSE, op=op, engine=engine)
    return lambda a, b: jaxconv.conv_general_dilated(
        a, b, (1,), "SAME", dimension_numbers=DN, op=op, engine=engine)


def _oracle(name: str, geometry: str):
    """The product as `jnp.max`/`jnp.min` over explicit windows (identity padding)."""
    _, combine, red = OPS[name]
    ident = -jnp.inf if red == "max" else jnp.inf
    reduce = jnp.max if red == "max" else jnp.min

    def dense(a, b):
        c = lax.optimization_barrier(combine(a[:, :, None], b[None]))  # (M, K, N), once
        return reduce(c, axis=1)

    def conv(x, w):
        k = w.shape[0]
        lo = (k - 1) // 2
        pos = np.arange(x.shape[1])[:, None] + np.arange(k)[None, :] - lo  # (P, K)
        valid = jnp.asarray((pos >= 0) & (pos < x.shape[1]))
        cols = x[:, np.clip(pos, 0, x.shape[1] - 1)]  # (N, P, K, C): im2col
        c = combine(cols[..., None], w[None, None])  # (N, P, K, C, O)
        c = jnp.where(valid[None, :, :, None, None], c, ident)
        c = lax.optimization_barrier(c.reshape(*c.shape[:2], -1, c.shape[-1]))
        return reduce(c, axis=2)

    return dense if geometry == "dense" else conv


# A covering set: every op on both engines, both geometries and both kinds of data, the
# user ops (the ones that lost winners) on generic data everywhere.
CASES = [
    ("fmsub_max", "xla", "conv", "normal"),
    ("fmsub_max", "native", "conv", "normal"),
    ("fmsub_max", "xla", "dense", "normal"),
    ("fmsub_max", "native", "dense", "normal"),
    ("fmsub_max", "native", "conv", "ties"),
    ("fmadd_min", "xla", "dense", "normal"),
    ("fmadd_min", "native", "conv", "normal"),
    ("fmadd_min", "xla", "conv", "ties"),
    ("sin_mul_max", "native", "dense", "normal"),
    ("sin_mul_max", "xla", "conv", "normal"),
    ("sin_mul_max", "native", "conv", "normal"),
    ("max_plus", "native", "conv", "ties"),
    ("max_plus", "xla", "dense", "ties"),
    ("min_plus", "xla", "conv", "ties"),
    ("min_plus", "native", "dense", "ties"),  # the recording forward's primitive (jvp, vjp)
    ("max_min", "native", "dense", "ties"),
    ("max_min", "xla", "conv", "normal"),
    ("max_times", "xla", "conv", "ties"),
    ("max_times", "native", "dense", "normal"),
]


def _operands(geometry: str, kind: str, seed: int):
    if geometry == "dense":
        return _data(kind, (16, 8), seed), _data(kind, (8, 3), seed + 1)
    return _data(kind, (4, 30, 8), seed), _data(kind, (3, 8, 6), seed + 1)


@pytest.mark.parametrize("name,engine,geometry,kind", CASES)
def test_gradient_and_tangent_go_to_the_winners(name, engine, geometry, kind):
    x, w = _operands(geometry, kind, 0)
    tx, tw = _operands(geometry, "normal", 10)
    g = _data("normal", jax.eval_shape(_oracle(name, geometry), x, w).shape, 20)
    ours, oracle = _ours(name, engine, geometry), _oracle(name, geometry)

    def vjp(f):
        return jax.jit(lambda a, b, ct: jax.vjp(f, a, b)[1](ct))(x, w, g)

    def jvp(f):
        return jax.jit(lambda a, b, ta, tb: jax.jvp(f, (a, b), (ta, tb)))(x, w, tx, tw)

    for got, want in zip(vjp(ours), vjp(oracle), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (y, ty), (y0, ty0) = jvp(ours), jvp(oracle)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ty, ty0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["native", "xla"])
def test_jacfwd_equals_jacrev_for_an_fma_contractible_combine(engine):
    # The case: a 1x8 @ 8x3 product whose forward-mode row came out all zero.
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((1, 8)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    f = _ours("fmsub_max", engine, "dense")
    fwd, rev = jax.jacfwd(f, argnums=(0, 1))(a, b), jax.jacrev(f, argnums=(0, 1))(a, b)
    for jf, jr in zip(fwd, rev, strict=True):
        np.testing.assert_allclose(jf, jr, rtol=1e-6, atol=1e-6)
    # Every output has a winner, whose derivative in x is w - 1 (never 0 for normal w).
    assert np.all(np.abs(np.asarray(fwd[0])).reshape(3, -1).max(axis=1) > 0)


# The native backward's layouts: many output channels (dw routed in 64-column blocks, ties
# among them), feature groups, and winners in the padding of an op with a pad value.
PAD_HALF = jaxconv.ops.max_plus.replace(pad_value=0.5, name="max_plus_pad_half")
WIDE_CASES = [  # (op, reduce, data offset, out channels, groups, pad value)
    ("max_plus", "max", 0.0, 300, 2, None),
    ("min_max", "min", 0.0, 260, 1, None),
    (PAD_HALF, "max", -8.0, 5, 1, 0.5),  # x far below the pad: the padded taps win
]


def _padded_oracle(combine, red: str, pad: float | None, groups: int):
    """`_oracle`'s 1-D convolution with feature groups and an optional pad value."""
    ident = -jnp.inf if red == "max" else jnp.inf
    reduce = jnp.max if red == "max" else jnp.min

    def conv(x, w):
        k, ig, o = w.shape
        lo = (k - 1) // 2
        pos = np.arange(x.shape[1])[:, None] + np.arange(k)[None, :] - lo
        valid = jnp.asarray((pos >= 0) & (pos < x.shape[1]))[None, :, :, None]
        cols = x[:, np.clip(pos, 0, x.shape[1] - 1)]  # (N, P, K, C)
        cols = jnp.where(valid, cols, 0.0 if pad is None else pad)
        outs = []
        for gi in range(groups):
            xc = cols[..., gi * ig:(gi + 1) * ig]
            wc = w[..., gi * (o // groups):(gi + 1) * (o // groups)]
            c = combine(xc[..., None], wc[None, None])  # (N, P, K, I, Og)
            if pad is None:
                c = jnp.where(valid[..., None], c, ident)
            c = lax.optimization_barrier(c.reshape(*c.shape[:2], -1, c.shape[-1]))
            outs.append(reduce(c, axis=2))
        return jnp.concatenate(outs, axis=-1)

    return conv


@pytest.mark.parametrize("op,red,offset,out,groups,pad", WIDE_CASES)
def test_native_winner_gradients_wide_grouped_and_padded(op, red, offset, out, groups, pad):
    x = _data("ties", (2, 9, 4), 0) + offset
    w = _data("ties", (3, 4 // groups, out), 1)
    g = _data("normal", (2, 9, out), 2)
    combine = jnp.add if red == "max" else jnp.maximum

    def ours(a, b):
        return jaxconv.conv_general_dilated(a, b, (1,), "SAME", dimension_numbers=DN,
                                            feature_group_count=groups, op=op,
                                            engine="native")

    def vjp(f):
        return jax.jit(lambda a, b, ct: jax.vjp(f, a, b)[1](ct))(x, w, g)

    got, want = vjp(ours), vjp(_padded_oracle(combine, red, pad, groups))
    for a, b in zip(got, want, strict=True):  # sums of many shares: rounding differs
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if pad is not None:  # some windows' winners are padded taps: their x gradient is lost
        assert float(jnp.abs(got[0]).sum()) < float(jnp.abs(g).sum())
