"""jaxconv.einsum against a brute-force numpy reference (a loop over all index assignments)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv


def _np_max_times():
    return np.multiply, np.maximum, -np.inf


NP_OPS = {
    "max_plus": (np.add, np.maximum, -np.inf),
    "min_plus": (np.add, np.minimum, np.inf),
    "log": (np.add, np.logaddexp, -np.inf),
    "max_times": _np_max_times(),
    "l1": (lambda x, w: -np.abs(x - w), np.add, 0.0),
}

MAX_TIMES = jaxconv.ops.max_times


def _jax_op(name):
    return MAX_TIMES if name == "max_times" else jaxconv.ops.get(name)


def brute_force(eq: str, *arrays, combine, reduce, identity):
    """out[o] = REDUCE over the summed indices of the combine-fold over the operands."""
    ins, out = eq.split("->")
    terms = ins.split(",")
    sizes = {}
    for t, a in zip(terms, arrays, strict=True):
        for c, s in zip(t, a.shape, strict=True):
            sizes[c] = s
    summed = sorted(set("".join(terms)) - set(out))
    res = np.full(tuple(sizes[c] for c in out), identity, np.float64)
    for oidx in itertools.product(*(range(sizes[c]) for c in out)):
        acc = identity
        for sidx in itertools.product(*(range(sizes[c]) for c in summed)):
            env = dict(zip(out, oidx, strict=True)) | dict(zip(summed, sidx, strict=False))
            vals = [a[tuple(env[c] for c in t)] for t, a in zip(terms, arrays, strict=True)]
            v = vals[0]
            for u in vals[1:]:
                v = combine(v, u)
            acc = reduce(acc, v)
        res[oidx] = acc
    return res


CASES = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 2)]),          # a batch index
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),        # three operands
    ("bij,bjk,bk->bi", [(2, 3, 2), (2, 2, 3), (2, 3)]),  # three operands and a batch index
    ("ijk,jl->il", [(2, 3, 2), (3, 2)]),               # k owned by one operand
    ("ii,ij->j", [(3, 3), (3, 2)]),                    # a diagonal
    ("ij->i", [(3, 4)]),                               # one operand
    ("ij,kj->ikj", [(2, 3), (2, 3)]),                  # no contraction (outer with batch)
]


PAIRS = ([("max_plus", c) for c in CASES] + [("log", CASES[i]) for i in (2, 3, 5, 6)]
         + [("max_times", CASES[i]) for i in (3, 4, 6)] + [("min_plus", CASES[i]) for i in (1, 7)])


@pytest.mark.parametrize("name,case", PAIRS)
def test_einsum_matches_brute_force(name, case):
    eq, shapes = case
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(0.1, 2.0, s).astype(np.float32) for s in shapes]
    combine, reduce, identity = NP_OPS[name]
    want = brute_force(eq, *[a.astype(np.float64) for a in arrays], combine=combine,
                       reduce=reduce, identity=identity)
    got = jaxconv.einsum(eq, *map(jnp.asarray, arrays), op=_jax_op(name))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("eq,shapes", [("ijk,jl->il", [(2, 3, 2), (3, 2)]),
                                       ("ij,jk->ik", [(3, 4), (4, 5)])])
def test_two_operands_any_op_exact(eq, shapes):
    # l1 is not a semiring: an index owned by one operand is folded with the other operand.
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    combine, reduce, identity = NP_OPS["l1"]
    want = brute_force(eq, *[a.astype(np.float64) for a in arrays], combine=combine,
                       reduce=reduce, identity=identity)
    got = jaxconv.einsum(eq, *map(jnp.asarray, arrays), op="l1")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_standard_is_jnp_einsum_and_ellipsis():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    np.testing.assert_allclose(jaxconv.einsum("...j,jk->...k", a, b),
                               jnp.einsum("...j,jk->...k", a, b), rtol=1e-6)
    got = jaxconv.einsum("...j,jk->...k", a, b, op="max_plus")
    want = jnp.max(a[..., :, None] + b[None, None], axis=-2)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradient_matches_brute_force_formula():
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)

    def ours(a, b, c):
        return jnp.sum(jaxconv.einsum("ij,jk,kl->il", a, b, c, op="log") ** 2)

    def formula(a, b, c):
        t = a[:, :, None, None] + b[None, :, :, None] + c[None, None, :, :]
        return jnp.sum(jax.nn.logsumexp(t, axis=(1, 2)) ** 2)

    got = jax.grad(ours, (0, 1, 2))(a, b, c)
    want = jax.grad(formula, (0, 1, 2))(a, b, c)
    for g1, g2 in zip(got, want, strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)


def test_jit_and_errors():
    a = jnp.ones((2, 3))
    f = jax.jit(lambda a, b: jaxconv.einsum("ij,jk->ik", a, b, op="max_plus"))
    np.testing.assert_allclose(f(a, a.T), jnp.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="size"):
        jaxconv.einsum("ij,jk->ik", a, a, op="max_plus")
    with pytest.raises(ValueError, match="semiring"):
        jaxconv.einsum("ij,jk,kl->il", a, a.T, a, op="l1")
    with pytest.raises(ValueError, match="operands"):
        jaxconv.einsum("ij,jk->ik", a, op="max_plus")
