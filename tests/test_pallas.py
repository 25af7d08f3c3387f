"""The Pallas engine (interpret mode on CPU) against the numpy loop reference and XLA engine.

Shapes are tiny and the kernels use 8 x 8 x 8 tiles, so every test still crosses several
blocks and ragged edges (M, N and K not multiples of 8).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from reference import NUMPY_OPS, conv_reference, dot_general_reference

import jaxconv
from jaxconv import ops
from jaxconv._src.core import canonical, planner
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines import pallas as engine_pallas

# (name, layout, padding, strides, lhs_dilation, rhs_dilation, groups, x shape, w shape)
CONFIGS = [
    ("2d_same_groups", ("NHWC", "HWIO", "NHWC"), "SAME", (2, 1), None, None, 2,
     (2, 5, 4, 6), (3, 2, 3, 10)),
    ("1d_dilations_negpad", ("NCW", "OIW", "NWC"), ((2, -1),), (1,), (2,), (2,), 1,
     (1, 3, 6), (9, 3, 3)),
]

OP_NAMES = ["adder", "l1", "max_plus", "min_plus", "max_min", "min_max", "log"]


def _np_op(name: str):
    return NUMPY_OPS[name]


def _reference(name, x, w, cfg, pad_value="default"):
    _, layout, padding, strides, lhs_dil, rhs_dil, groups, _, _ = cfg
    r = _np_op(name)
    return conv_reference(
        x, w, strides, padding, lhs_dil, rhs_dil, layout, groups, combine=r.combine,
        reduce=r.reduce, identity=r.identity,
        pad_value=r.pad_value if pad_value == "default" else pad_value)


def _conv_traced(x, w, cfg, op, engine="pallas"):
    _, layout, padding, strides, lhs_dil, rhs_dil, groups, _, _ = cfg
    return jaxconv.conv_general_dilated(
        x, w, strides, padding, lhs_dil, rhs_dil, layout, groups, op=op, engine=engine)


def _conv(x, w, cfg, op, engine="pallas"):
    # Under jit: eager dispatch of the tap scan and padding ops is slower than compiling.
    return jax.jit(lambda p, q: _conv_traced(p, q, cfg, op, engine))(x, w)


def _data(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg[7]).astype(np.float32)
    w = rng.standard_normal(cfg[8]).astype(np.float32)
    return x, w


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_builtin_ops_against_reference(name, cfg):
    x, w = _data(cfg)
    got = _conv(x, w, cfg, ops.get(name))
    np.testing.assert_allclose(got, _reference(name, x, w, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_user_multiply_equals_lax_and_xnor_without_rewrite(cfg):
    x, w = _data(cfg, 1)
    _, layout, padding, strides, lhs_dil, rhs_dil, groups, _, _ = cfg
    mymult = jaxconv.Op(jnp.multiply, "sum", name="mymult")
    expect = lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, layout, groups,
                                      precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(_conv(x, w, cfg, mymult), expect, rtol=1e-5, atol=1e-5)
    # xnor and l2 rewrites never reach an engine; the same ops without rewrite do.
    xnor_generic = ops.xnor.replace(rewrite=None, name="xnor_generic")
    np.testing.assert_array_equal(_conv(x, w, cfg, xnor_generic),
                                  _reference("xnor", x, w, cfg))
    np.testing.assert_allclose(_conv(x, w, cfg, ops.l2_exact), _reference("l2", x, w, cfg),
                               rtol=1e-5, atol=1e-4)


def test_pad_value_ops_pad_with_the_value():
    cfg = CONFIGS[0]
    x, w = _data(cfg, 2)
    op = ops.max_plus.replace(pad_value=0.5, name="max_plus_pad")
    np.testing.assert_allclose(_conv(x, w, cfg, op),
                               _reference("max_plus", x, w, cfg, pad_value=0.5), rtol=1e-6)


def test_infinities_and_nan_max_plus_same_borders():
    # -inf in the data is dominated, +inf wins, NaN anywhere in a window gives NaN; the SAME
    # border taps are skipped (never -inf + something from a zero pad).
    cfg = ("2d_same", ("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, None, 1,
           (1, 5, 5, 2), (3, 3, 2, 3))
    x, w = _data(cfg, 3)
    x[0, 0, 0, 0] = -np.inf
    x[0, 4, 4, 1] = np.inf
    x[0, 2, 0, 0] = np.nan
    for name in ("max_plus", "min_plus"):
        got = np.asarray(_conv(x, w, cfg, ops.get(name)))
        ref = _reference(name, x, w, cfg)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    x_all = np.full(cfg[7], -np.inf, np.float32)
    got = np.asarray(_conv(x_all, w, cfg, ops.log))
    assert np.all(np.isneginf(got))


def test_semiring_matmul_every_reduce_ragged():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 9, 13)).astype(np.float32)
    b = rng.standard_normal((2, 13, 11)).astype(np.float32)
    cases = {
        "max": (jnp.add, np.add, np.maximum, -np.inf),
        "logsumexp": (jnp.add, np.add, np.logaddexp, -np.inf),
        "prod": (lambda x, w: 1 + 0.1 * x * w, lambda x, w: 1 + 0.1 * x * w, np.multiply, 1.0),
    }
    for red, (comb, np_comb, np_red, ident) in cases.items():
        op = jaxconv.Op(comb, red, name=f"t_{red}")
        got = jax.jit(lambda p, q, op=op: engine_pallas.semiring_matmul(p, q, op))(a, b)
        ref = np.stack([dot_general_reference(
            a[g], b[g], (((1,), (0,)), ((), ())), combine=np_comb, reduce=np_red,
            identity=ident) for g in range(2)])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # A user's binary reduce (a soft-OR), and 2-D operands.
    soft_or = jaxconv.Op(lambda x, w: jax.nn.sigmoid(x * w), lambda p, q: p + q - p * q,
                         identity=0.0, name="soft_or")
    got = engine_pallas.semiring_matmul(a[0], b[0], soft_or)
    ref = dot_general_reference(
        a[0], b[0], (((1,), (0,)), ((), ())), combine=lambda x, w: 1 / (1 + np.exp(-x * w)),
        reduce=lambda p, q: p + q - p * q, identity=0.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_dot_general_with_batch_dims_value_and_grad():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 2, 10)).astype(np.float32)  # (M, B, K)
    b = rng.standard_normal((2, 10, 9)).astype(np.float32)  # (B, K, N)
    dn = (((2,), (1,)), ((1,), (0,)))
    r = _np_op("max_plus")
    ref = dot_general_reference(a, b, dn, combine=r.combine, reduce=r.reduce,
                                identity=r.identity)
    cot = jnp.asarray(rng.standard_normal(ref.shape).astype(np.float32))

    def run(engine):
        def f(p, q):
            y = jaxconv.dot_general(p, q, dn, op="max_plus", engine=engine)
            return jnp.sum(y * cot), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(a, b)

    (_, got), grads = run("pallas")
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    _, grads_xla = run("xla")
    for g, e in zip(grads, grads_xla, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


GRAD_CASES = [
    ("max_plus", True),  # integer data: many ties, split equally
    ("adder", False),  # AdderNet's own combine VJP inside the kernel
    ("log", False),
    ("prod", False),  # no kernel gradient: the XLA engine's backward
]


@pytest.mark.parametrize("name,ties", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_xla_engine(name, ties):
    cfg = CONFIGS[0]
    x, w = _data(cfg, 6)
    if ties:
        x, w = np.round(x), np.round(w)
    if name == "prod":
        op = jaxconv.Op(lambda p, q: 1 + 0.1 * p * q, "prod", name="soft_prod")
    else:
        op = ops.get(name)
    cot = jnp.asarray(np.random.default_rng(7).standard_normal(
        np.asarray(_conv(x, w, cfg, op, "xla")).shape).astype(np.float32))

    def grads(engine):
        return jax.jit(jax.grad(lambda p, q: jnp.sum(_conv_traced(p, q, cfg, op, engine) * cot),
                                argnums=(0, 1)))(x, w)

    for got, expect in zip(grads("pallas"), grads("xla"), strict=True):
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_dispatch_platform_chosen_at_lowering():
    # No backend query: every platform gets its own kernel in one traced function.
    backends = dict(engine_pallas.platform_backends())
    assert backends["cpu"].kind == "interpret" and backends["tpu"].kind == "mosaic"
    assert backends["cuda"].kind == "triton" and backends["rocm"].kind == "triton"
    assert backends["cpu"].blocks == engine_pallas.INTERPRET_BLOCKS
    assert all(be.kind == "interpret" for _, be in engine_pallas.platform_backends(
        interpret=True))
    # "auto" keeps the XLA engine (the Pallas kernels are not measured faster anywhere yet).
    geom = Geometry((5,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
    problem = Problem(ops.max_plus, geom, "auto", np.dtype("float32"), 2**20)
    assert [planner.engine_name(problem, np.float32, p) for p in ("cuda", "rocm", "tpu")] == [
        "xla"] * 3


def test_3d_depthwise_and_vmap():
    cfg = ("3d_depthwise", ("NDHWC", "DHWIO", "NDHWC"), "SAME", (1, 2, 1), None, None, 3,
           (1, 4, 5, 4, 3), (2, 3, 2, 1, 6))
    x, w = _data(cfg, 9)
    np.testing.assert_allclose(_conv(x, w, cfg, ops.max_min), _reference("max_min", x, w, cfg),
                               rtol=1e-6)
    # vmap over an extra leading axis batches the pallas_call.
    xs = np.stack([x, -x])
    got = jax.jit(jax.vmap(lambda v: _conv_traced(v, w, cfg, ops.max_min)))(xs)
    np.testing.assert_allclose(got[1], _reference("max_min", -x, w, cfg), rtol=1e-6)


def _assert_matches_xla_engine(x, w, geom, op, weight, atol, **pallas):
    """``sum(weight(y))`` of the canonical convolution and its gradients in x and w are the
    XLA engine's on the Pallas engine configured by ``pallas`` (rtol 1e-5 for the value,
    1e-4 and ``atol`` for the gradients)."""
    def loss(conv, **kw):
        return jax.jit(jax.value_and_grad(
            lambda p, q: jnp.sum(weight(conv(p, q, geom, op, **kw))), argnums=(0, 1)))(x, w)

    (v_p, g_p) = loss(engine_pallas.generic_conv, **pallas)
    (v_x, g_x) = loss(functools.partial(canonical.canonical_conv, engine="xla"))
    np.testing.assert_allclose(v_p, v_x, rtol=1e-5)
    for got, expect in zip(g_p, g_x, strict=True):
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=atol)


def test_gpu_style_power_of_two_tiles_in_interpret_mode():
    # The GPU configuration pads whole extents to powers of two (Triton block shapes); run
    # that layout here in interpret mode, forward and backward, against the XLA engine.
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 5, 6, 20)).astype(np.float32)
    w = rng.standard_normal((3, 3, 10, 6)).astype(np.float32)
    geom = Geometry((5, 6), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 2)
    blocks = engine_pallas.BlockSizes(16, 16, 16, pow2=True)
    _assert_matches_xla_engine(x, w, geom, ops.log, jnp.cos, 1e-5, blocks=blocks)


# The TPU kernel form (aligned chunks walked with static slices, one kernel per tap) run in
# interpret mode with 8-wide chunks, so its numerics are checked without a TPU.
CHUNKED = engine_pallas.Backend("interpret", engine_pallas.INTERPRET_BLOCKS, style="chunked",
                                lane=8)


@pytest.mark.parametrize("name", ["max_plus", "adder", "log"])
def test_tpu_chunked_form_in_interpret_mode(name):
    rng = np.random.default_rng(11)
    # K = 12 and 10 features per group (a full 8-block and a ragged one each), M = 24 rows.
    x = np.round(rng.standard_normal((2, 5, 4, 24)), 1).astype(np.float32)
    w = np.round(rng.standard_normal((3, 3, 12, 20)), 1).astype(np.float32)
    geom = Geometry((5, 4), (3, 3), (2, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 2)
    cot = rng.standard_normal((2, 3, 4, 20)).astype(np.float32)
    _assert_matches_xla_engine(x, w, geom, ops.get(name), lambda y: y * cot, 1e-5,
                               backend=CHUNKED)


def test_custom_vjp_combine_keeps_its_rule():
    # The kernel computes combine's primal; the backward still applies the custom rule
    # (the straight-through sign's gradient, not the sign's zero derivative).
    from jaxconv import quantizers

    # The sign reads both operands (a rule of one operand is factored out of the product).
    op = jaxconv.Op(lambda p, q: quantizers.ste_sign(p * q), "sum", name="ste_times")
    cfg = CONFIGS[0]
    x, w = _data(cfg, 12)

    def grads(engine):
        return jax.jit(jax.grad(lambda p, q: jnp.sum(jnp.sin(_conv_traced(p, q, cfg, op,
                                                                          engine))),
                                argnums=(0, 1)))(x, w)

    got, expect = grads("pallas"), grads("xla")
    assert np.abs(np.asarray(got[0])).max() > 0
    for g, e in zip(got, expect, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_primal_strips_custom_derivatives():
    from jaxconv import quantizers
    from jaxconv._src.engines.primal import primal

    def f(p, q):
        body = lambda i, acc: acc + quantizers.ste_sign(p) * jax.nn.relu(q)  # noqa: E731
        return ops.adder.combine(p, q) + lax.fori_loop(0, 2, body, jnp.zeros_like(p))

    def vjp(p, q, c):
        return jax.vjp(f, p, q)[1](c)

    p = jnp.linspace(-2, 2, 12).reshape(3, 4)
    q = jnp.full((3, 4), 0.25)
    for fn, args in ((f, (p, q)), (vjp, (p, q, p))):
        text = str(jax.make_jaxpr(primal(fn))(*args))
        assert "custom_vjp_call" not in text and "custom_jvp_call" not in text
        for got, expect in zip(jax.tree.leaves(primal(fn)(*args)),
                               jax.tree.leaves(fn(*args)), strict=True):
            np.testing.assert_allclose(got, expect, rtol=1e-6)
    # A function without custom rules is returned as is.
    assert primal(jnp.add)(p, q).shape == (3, 4)


@pytest.mark.parametrize("name", ["max_plus", "adder", "log"])
def test_gradients_dilations_negative_padding_3d(name):
    # lhs_dilation holes and cropping (1-D), and a strided 3-D depthwise layer: the implicit
    # GEMM's phases, shifts and masks in the backward against the XLA engine.
    cfg3 = ("3d_depthwise", ("NDHWC", "DHWIO", "NDHWC"), "SAME", (1, 2, 1), None, None, 3,
            (1, 4, 5, 4, 3), (2, 3, 2, 1, 6))
    cfg_s = ("1d_stride_lhs_rhs_dilation", ("NWC", "WIO", "NWC"), ((2, 1),), (2,), (2,), (2,),
             1, (2, 7, 3), (3, 3, 4))
    op = ops.get(name)
    for cfg in (CONFIGS[1], cfg3, cfg_s):
        x, w = _data(cfg, 13)
        y = np.asarray(_conv(x, w, cfg, op, "xla"))
        cot = np.random.default_rng(14).standard_normal(y.shape).astype(np.float32)
        # A window of only padding (y = -inf) has no gradient (nothing depends on x, w).
        cot = jnp.asarray(np.where(np.isfinite(y), cot, 0.0))

        def grads(engine, cfg=cfg, cot=cot, x=x, w=w):
            return jax.jit(jax.grad(
                lambda p, q: jnp.sum(_conv_traced(p, q, cfg, op, engine) * cot),
                argnums=(0, 1)))(x, w)

        for got, expect in zip(grads("pallas"), grads("xla"), strict=True):
            np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_every_tap_in_padding_gives_the_identity():
    # Stride 2 over lhs_dilation holes: every tap reads a hole, so max_plus gives -inf and
    # no gradient (no kernel runs at all).
    x = np.ones((2, 7, 3), np.float32)
    w = np.ones((3, 3, 4), np.float32)

    def f(p, q):
        return jaxconv.conv_general_dilated(p, q, (2,), ((1, 2),), (2,), (2,),
                                            ("NWC", "WIO", "NWC"), op="max_plus",
                                            engine="pallas")

    assert np.all(np.isneginf(np.asarray(jax.jit(f)(x, w))))
    gx, gw = jax.jit(jax.grad(lambda p, q: jnp.sum(jnp.where(jnp.isinf(f(p, q)), 0, f(p, q))),
                              argnums=(0, 1)))(x, w)
    assert not np.asarray(gx).any() and not np.asarray(gw).any()


def test_gpu_blocks_several_row_chunks_in_interpret_mode():
    # The Triton configuration itself (64 x 64 tiles, K / N padded to powers of two, 256-row
    # dw chunks) with rows = 2 * 14 * 14 = 392 virtual rows: several row tiles and two chunks.
    rng = np.random.default_rng(15)
    x = np.round(rng.standard_normal((2, 12, 12, 40)), 1).astype(np.float32)
    w = np.round(rng.standard_normal((3, 3, 40, 70)), 1).astype(np.float32)
    geom = Geometry((12, 12), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)
    gpu = engine_pallas.Backend("interpret", engine_pallas.GPU_BLOCKS)
    cot = rng.standard_normal((2, 12, 12, 70)).astype(np.float32)
    for op in (ops.max_plus, ops.adder):
        _assert_matches_xla_engine(x, w, geom, op, lambda y: y * cot, 1e-3, backend=gpu)
