"""The algebra's inferred capabilities: a callable reduce recognised from its traced program.

Recognition is checked on a covering set of spellings (and near misses that must not be
recognised); ops with a recognised reduce against the numpy loop reference (values) and
against ``jax.grad`` of a brute-force formulation folding with the user's own callable
(gradients), on the XLA engine and on the engine ``"auto"`` picks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from geometries import assert_grads_match_brute_force
from reference import conv_reference

import jaxconv
from jaxconv._src.core import factoring
from jaxconv._src.core.capabilities import capabilities, recognised_reduce
from jaxconv._src.engines import native


def _stable_lae(a, b):
    m = jnp.maximum(a, b)
    return m + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _textbook_lae(a, b):
    m = jnp.maximum(a, b)
    return m + jnp.log(jnp.exp(a - m) + jnp.exp(b - m))


def _branchy_lae(a, b):
    return jnp.where(a > b, a + jnp.log1p(jnp.exp(b - a)), b + jnp.log1p(jnp.exp(a - b)))


REDUCES = {
    "jnp.logaddexp": (jnp.logaddexp, "logsumexp"),
    "stable_lae": (_stable_lae, "logsumexp"),
    "textbook_lae": (_textbook_lae, "logsumexp"),
    "branchy_lae": (_branchy_lae, "logsumexp"),
    "softplus_lae": (lambda a, b: jnp.maximum(a, b) + jax.nn.softplus(-jnp.abs(a - b)),
                     "logsumexp"),
    "jnp.maximum": (jnp.maximum, "max"),
    "lambda_maximum": (lambda a, b: jnp.maximum(a, b), "max"),
    "jnp.minimum": (jnp.minimum, "min"),
    "lambda_add": (lambda a, b: a + b, "sum"),
    "lambda_add_swapped": (lambda a, b: b + a, "sum"),
    "jnp.add": (jnp.add, "sum"),
    "jnp.multiply": (jnp.multiply, "prod"),
    # Near misses: not the built-in reduce.
    "naive_lae": (lambda a, b: jnp.log(jnp.exp(a) + jnp.exp(b)), None),  # overflows
    "tempered_lae": (lambda a, b: 0.1 * jnp.logaddexp(a / 0.1, b / 0.1), None),
    "lae_plus_eps": (lambda a, b: jnp.logaddexp(a, b) + 1e-3, None),
    "where_max": (lambda a, b: jnp.where(a > b, a, b), None),  # NaN and -0.0 differ
    "fmax": (jnp.fmax, None),
    "max_times_two": (lambda a, b: jnp.maximum(a, b) * 2.0, None),
    "sub": (lambda a, b: a - b, None),
}


@pytest.mark.parametrize("name", sorted(REDUCES))
def test_recognised_reduce(name):
    fn, want = REDUCES[name]
    assert recognised_reduce(fn) == want


@pytest.mark.parametrize("name, identity, want", [
    ("stable_lae", -math.inf, "logsumexp"),
    ("jnp.logaddexp", 0.0, "custom"),  # not logsumexp's identity: kept as declared
    ("lambda_maximum", -math.inf, "max"),
    ("jnp.minimum", math.inf, "min"),
    ("lambda_add", 0, "sum"),
    ("jnp.multiply", 1.0, "prod"),
    ("jnp.multiply", 2.0, "custom"),
    ("tempered_lae", -math.inf, "custom"),
])
def test_canonical_reduce_needs_the_identity(name, identity, want):
    op = jaxconv.Op(lambda x, w: x - w, REDUCES[name][0], identity=identity)
    caps = capabilities(op)
    assert caps.reduce == want
    assert caps.canonical.reduce == (REDUCES[name][0] if want == "custom" else want)


DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("name, combine, np_combine, engine", [
    ("jnp.logaddexp", lambda a, b: -(a - b) ** 2, lambda a, b: -(a - b) ** 2, "xla"),
    ("textbook_lae", lambda a, b: a + b, np.add, "auto"),
    ("stable_lae", lambda a, b: jnp.tanh(a) * b, lambda a, b: np.tanh(a) * b, "xla"),
])
def test_recognised_logaddexp_values_and_gradients(name, combine, np_combine, engine):
    fold = REDUCES[name][0]
    op = jaxconv.Op(combine, fold, identity=-math.inf)
    assert capabilities(op).reduce == "logsumexp"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    ref = conv_reference(x, w, (1, 1), "SAME", None, None, DN, combine=np_combine,
                         reduce=np.logaddexp, identity=-math.inf)

    def ours(a, b):
        return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN, op=op,
                                            engine=engine)

    np.testing.assert_allclose(np.asarray(ours(x, w)), ref, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    assert_grads_match_brute_force(ours, x, w, ct, combine, fold, 1e-4, 1e-5)


def test_explain_names_the_recognised_reduce_and_the_generic_fold():
    comb = lambda a, b: -(a - b) ** 2  # noqa: E731
    plan = jaxconv.explain(jaxconv.Op(comb, jnp.logaddexp, identity=-math.inf),
                           platform="cpu")
    assert any("'logsumexp' (recognised" in d for d in plan.details)
    assert not any("generic fold" in d for d in plan.details)
    plan = jaxconv.explain(jaxconv.Op(comb, lambda a, b: a + b - a * b, identity=0.0),
                           platform="cpu")
    # Not recognised: compiled into the native kernel as its fold (tests/test_user_folds.py).
    # (A tempered logaddexp is a logsumexp at temperature c: tests/test_tempered_reduce.py.)
    want = ("callable reduce compiled as the kernel's fold" if native.available()
            else "generic fold")
    assert any(want in d for d in plan.details)


# --- custom derivative rules of one operand: factored out, the rule kept exactly -------------

@jax.custom_vjp
def _ste(v):
    return jnp.where(v >= 0, 1.0, -1.0)


_ste.defvjp(lambda v: (_ste(v), v), lambda v, g: (g * (jnp.abs(v) <= 1.0),))


@jax.custom_vjp
def _ste_clipped_cotangent(v):  # a backward that is not linear in the cotangent
    return jnp.where(v >= 0, 1.0, -1.0)


_ste_clipped_cotangent.defvjp(lambda v: (_ste_clipped_cotangent(v), v),
                              lambda v, g: (jnp.clip(g, -0.5, 0.5),))


def _np_sign(v):
    return np.where(v >= 0, 1.0, -1.0)


RULE_OPS = {  # name -> (combine, numpy combine, reduce)
    "ste_xnor": (lambda a, b: _ste(a) * _ste(b), lambda a, b: _np_sign(a) * _np_sign(b),
                 "sum"),
    "ste_sign_xnor": (lambda a, b: jaxconv.quantizers.ste_sign(a)
                      * jaxconv.quantizers.ste_sign(b),
                      lambda a, b: _np_sign(a) * _np_sign(b), "sum"),
    "relu_times_max": (lambda a, b: jax.nn.relu(a) * b, lambda a, b: np.maximum(a, 0) * b,
                       "max"),
    "ste_minus_w": (lambda a, b: _ste(a) - 0.5 * b, lambda a, b: _np_sign(a) - 0.5 * b, "sum"),
}


def _brute_force_windows(x, w, combine, reduce, pad_value):
    """SAME 3x3 conv: every product (custom rules apply per product), stacked and reduced
    with ``jnp.sum`` / ``jnp.max`` (ties split equally, as the contract's gradients)."""
    kh, kw, _, _ = w.shape
    _, h, wd, _ = x.shape
    fill = 0.0 if pad_value is None else pad_value
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
    valid = jnp.pad(jnp.ones((h, wd), bool), 1) | (pad_value is not None)
    ident = {"sum": 0.0, "max": -jnp.inf}[reduce]
    terms = []
    for i in range(kh):
        for j in range(kw):
            t = combine(xp[:, i:i + h, j:j + wd, :, None], w[i, j][None, None, None])
            ok = valid[i:i + h, j:j + wd][None, :, :, None, None]
            terms.append(jnp.where(ok, t, ident))
    terms = jnp.concatenate(terms, axis=3)  # (N, H, W, taps * C, O)
    return jnp.sum(terms, axis=3) if reduce == "sum" else jnp.max(terms, axis=3)


@pytest.mark.parametrize("name, engine, pad_value", [
    ("ste_xnor", "xla", None), ("ste_xnor", "auto", 0.0),
    ("ste_sign_xnor", "auto", None),
    ("relu_times_max", "auto", None), ("relu_times_max", "xla", None),
    ("ste_minus_w", "auto", None),
])
def test_operand_rules_are_factored_values_and_gradients(name, engine, pad_value):
    combine, np_combine, reduce = RULE_OPS[name]
    op = jaxconv.Op(combine, reduce, pad_value=pad_value)
    form = factoring.factored_form(op, np.float32)
    assert form is not None and form.lhs_map is not None
    assert factoring.per_product_rule(op, np.float32) is None
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 4, 3)) * 1.5).astype(np.float32)
    w = (rng.standard_normal((3, 3, 3, 4)) * 1.5).astype(np.float32)
    ref = conv_reference(x, w, (1, 1), "SAME", None, None, DN, combine=np_combine,
                         reduce={"sum": np.add, "max": np.maximum}[reduce],
                         identity={"sum": 0.0, "max": -math.inf}[reduce], pad_value=pad_value)

    def ours(a, b):
        return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN, op=op,
                                            engine=engine)

    np.testing.assert_allclose(np.asarray(ours(x, w)), ref, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    got = jax.jit(jax.grad(lambda a, b: jnp.sum(ct * ours(a, b)), argnums=(0, 1)))(x, w)
    want = jax.grad(lambda a, b: jnp.sum(ct * _brute_force_windows(
        a, b, combine, reduce, pad_value)), argnums=(0, 1))(x, w)
    for g, g0 in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-5)


def test_factored_ste_xnor_is_one_standard_convolution():
    plan = jaxconv.explain(jaxconv.Op(RULE_OPS["ste_xnor"][0], "sum"), platform="cpu")
    assert any("of the input" in d and "custom derivative rule" in d for d in plan.details)
    assert any("of the kernel" in d for d in plan.details)
    assert any("rewrite into standard lax products" in d for d in plan.details)


@pytest.mark.parametrize("combine, why", [
    (lambda a, b: _ste(a * b), "depends on both operands"),
    (lambda a, b: jax.nn.relu(a - b), "depends on both operands"),
    (lambda a, b: _ste_clipped_cotangent(a) * _ste_clipped_cotangent(b), "not linear"),
])
def test_rules_that_stay_per_product_are_explained(combine, why):
    op = jaxconv.Op(combine, "sum")
    assert factoring.factored_form(op, np.float32) is None
    assert why in factoring.per_product_rule(op, np.float32)
    plan = jaxconv.explain(op, platform="cpu")
    assert any(why in d for d in plan.details)
    if native.available():  # a rule linear in the cotangent compiles per product natively
        assert plan.engine == ("xla" if why == "not linear" else "native")



@pytest.mark.parametrize("name", ["relu_times_max", "relu_times_sum"])
def test_factored_custom_jvp_rule_in_forward_mode(name):
    """A custom JVP of one operand (jax.nn.relu) keeps forward mode after factoring."""
    combine = RULE_OPS["relu_times_max"][0]
    reduce = "max" if name == "relu_times_max" else "sum"
    op = jaxconv.Op(combine, reduce)
    assert factoring.factored_form(op, np.float32) is not None
    rng = np.random.default_rng(4)
    x, tx = (jnp.asarray(rng.standard_normal((1, 4, 5, 3)), jnp.float32) for _ in range(2))
    w, tw = (jnp.asarray(rng.standard_normal((3, 3, 3, 2)), jnp.float32) for _ in range(2))

    def ours(a, b):
        return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN, op=op)

    y, ty = jax.jit(lambda *a: jax.jvp(ours, a[:2], a[2:]))(x, w, tx, tw)
    y0, ty0 = jax.jvp(lambda a, b: _brute_force_windows(a, b, combine, reduce, None),
                      (x, w), (tx, tw))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ty), np.asarray(ty0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("reduce", ["sum", "logsumexp"])
def test_recognised_reduce_accumulates_as_the_declared_one(reduce, dtype):
    """A callable recognised as ``sum`` / ``logsumexp`` accumulates bf16 / f16 terms in
    float32 as the declared reduce does (docs/numerics.md): it accumulated in the operands'
    dtype, 3 half-ulps off at 576 f16 terms, and ``x * w`` under ``lambda a, b: a + b`` took
    a tangent of two f16-rounded standard products (found by ``tests/fuzz.py``'s tangent
    check, seed 6000045). The forward and the tangent are now the declared op's, bit for bit,
    and within the dtype's rounding of the float64 reference. ``jnp.logaddexp`` on bf16 was
    refused as not associative: its probes ran in bf16, whose roundings exceed the probes'
    1e-3; a callable is now probed in the dtype it folds in."""
    fold, ident = (lambda a, b: a + b, 0.0) if reduce == "sum" else (jnp.logaddexp, -math.inf)
    relu = lambda a, b: jnp.maximum(a - b, 0)  # noqa: E731 - the combine of both ops
    callable_op = jaxconv.Op(relu, fold, identity=ident, name=f"relu_callable_{reduce}")
    declared = jaxconv.Op(relu, reduce, name=f"relu_declared_{reduce}")
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((6, 576)) + 3, dtype)
    w = jnp.asarray(rng.standard_normal((576, 4)), dtype)
    tx, tw = (jnp.asarray(rng.standard_normal(v.shape), dtype) for v in (x, w))
    dn = (((1,), (0,)), ((), ()))

    def run(op):
        return jax.jit(lambda a, b, u, v: jax.jvp(
            lambda p, q: jaxconv.dot_general(p, q, dn, op=op, engine="xla"), (a, b), (u, v)))(
            x, w, tx, tw)

    got, want = run(callable_op), run(declared)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    terms = np.maximum(np.asarray(x, np.float64)[:, :, None]
                       - np.asarray(w, np.float64)[None], 0)
    ref = terms.sum(1) if reduce == "sum" else np.logaddexp.reduce(terms, axis=1)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(got[0], np.float64), ref, rtol=eps, atol=0)
