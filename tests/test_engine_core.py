"""The engine core: batching folds into the problem, forward mode, eager reuse, the planner.

Every check compares against an independent computation: `vmap` against a Python loop of
unbatched calls, forward mode against the brute-force formulas of `test_forward_mode` and
against reverse mode (`jacfwd == jacrev`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.core import algebra, batching, planner
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.problem import Problem

DN = ("NWC", "WIO", "NWC")
CLIP_MAX = jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", identity=-np.inf,
                      name="clip_max")
TANH_SUM = jaxconv.Op(lambda a, b: jnp.tanh(a * b), "sum", name="tanh_sum")
PROD_OP = jaxconv.Op(lambda a, b: 1.0 + 0.1 * a * b, "prod", name="prod_op")
OPS = ["max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2", "l2_exact", "log",
       "xnor", CLIP_MAX, TANH_SUM, PROD_OP]
FORWARD_OPS = [o for o in OPS if o not in ("adder", "xnor")]


def _id(o):
    return o if isinstance(o, str) else o.name


def _conv(op, engine="auto", padding=((1, 1),), strides=(1,), groups=1):
    def f(x, w):
        return jaxconv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                            feature_group_count=groups, op=op, engine=engine)
    return f


def _data(n=3, width=7, c=4, k=3, o=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, (n, width, c)), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, (k, c, o)), jnp.float32)
    return x, w


def _loop(f, *args, axes):
    size = next(a.shape[ax] for a, ax in zip(args, axes, strict=True) if ax is not None)
    outs = [f(*(a if ax is None else jnp.take(a, i, axis=ax)
                for a, ax in zip(args, axes, strict=True))) for i in range(size)]
    return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)


# ops that engine="auto" sends to the XLA engine on CPU (a rewrite into lax products, or
# no native kernel): their "auto" leg would repeat the "xla" leg.
AUTO_IS_XLA = ("l2", "xnor", PROD_OP)
_X, _W, _BOTH = (0, None), (None, 0), (0, 0)
# A covering set, not the 3 x 13 x 2 cross product: every op once, every (mapped axes,
# engine) pair at least once among the ops that auto sends to the native engine (the fold
# into the problem is the core's, the same for every op and engine).
VMAP_CASES = [
    ("max_plus", _X, "auto"), ("min_plus", _W, "xla"), ("max_min", _BOTH, "auto"),
    ("min_max", _X, "xla"), ("adder", _W, "auto"), ("l1", _BOTH, "xla"), ("l2", _X, "xla"),
    ("l2_exact", _BOTH, "auto"), ("log", _X, "auto"), ("xnor", _W, "xla"),
    (CLIP_MAX, _BOTH, "auto"), (TANH_SUM, _W, "auto"), (PROD_OP, _BOTH, "xla"),
]
assert {_id(o) for o, _, _ in VMAP_CASES} == {_id(o) for o in OPS}


@pytest.mark.parametrize(
    "op,axes,engine", VMAP_CASES,
    ids=[f"{dict([(_X, 'x'), (_W, 'w'), (_BOTH, 'both')])[a]}-{_id(o)}-{e}"
         for o, a, e in VMAP_CASES])
def test_vmap_equals_loop(op, axes, engine):
    f = _conv(op, engine, groups=2)
    x, w = _data()
    xs = jnp.stack([x, x[::-1] * 0.5]) if axes[0] is not None else x
    ws = jnp.stack([w[:, :2], w[:, 2:] * 2.0]) if axes[1] is not None else w[:, :2]
    got = jax.vmap(f, in_axes=axes)(xs, ws)
    np.testing.assert_allclose(got, _loop(f, xs, ws, axes=axes), rtol=1e-5, atol=1e-5)


# A covering set, not every op on both engines: every op once, each reduce (max, min, sum,
# logsumexp) on both engines, and both engines for one op of each kind of backward (a
# winner: max_plus, a user op's: clip_max; a sum: adder; a logsumexp: log). The fold of the
# mapped input into the backward's problem is the core's (core/batching.py), the same for
# every op; "auto" is the native engine but for AUTO_IS_XLA. 17 cases, not 23.
VMAP_GRAD_CASES = [
    ("max_plus", "auto"), ("max_plus", "xla"), ("min_plus", "auto"), ("max_min", "auto"),
    ("min_max", "xla"), ("adder", "auto"), ("adder", "xla"), ("l1", "xla"), ("l2", "xla"),
    ("l2_exact", "auto"), ("log", "auto"), ("log", "xla"), ("xnor", "xla"),
    (CLIP_MAX, "auto"), (CLIP_MAX, "xla"), (TANH_SUM, "auto"), (PROD_OP, "xla"),
]
assert {_id(o) for o, _ in VMAP_GRAD_CASES} == {_id(o) for o in OPS}
assert not any(e == "auto" and o in AUTO_IS_XLA for o, e in VMAP_GRAD_CASES)


@pytest.mark.parametrize("op,engine", [pytest.param(o, e, id=f"{_id(o)}-{e}")
                                       for o, e in VMAP_GRAD_CASES])
def test_vmap_of_grad_is_per_example(op, engine):
    """Per-example gradients: the kernel gradient of each example stays apart."""
    f = _conv(op, engine)
    x, w = _data()

    def grads(a, b):
        return jax.grad(lambda u, v: jnp.sum(jnp.sin(f(u[None], v))), argnums=(0, 1))(a, b)

    got = jax.jit(jax.vmap(grads, in_axes=(0, None)))(x, w)
    want = _loop(grads, x, w, axes=(0, None))
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["auto", "xla"])
@pytest.mark.parametrize("op", ["adder", "l2", "l2_exact",
                                jaxconv.ops.l2_exact.replace(pad_value=0.5, name="l2_pad")],
                         ids=_id)
def test_per_example_kernel_gradient_in_lax_products(op, engine):
    """The ops whose kernel gradient is lax products take it per example by `jax.vmap` of
    those products (2-D, strided and dilated, nested vmap): the same as a loop."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 3, 6, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, (2, 2, 3, 4)), jnp.float32)

    def grads(a, b):
        def loss(u, v):
            y = jaxconv.conv_general_dilated(
                u[None], v, (2, 1), "SAME", rhs_dilation=(1, 2),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), op=op, engine=engine)
            return jnp.sum(jnp.sin(y))
        return jax.grad(loss, argnums=(0, 1))(a, b)

    assert batching._per_example_rule(Problem(
        jaxconv.ops.get(op), None, engine, np.dtype("float32"), 1, None,
        np.dtype("float32"))) is not None
    got = jax.jit(jax.vmap(jax.vmap(grads, in_axes=(0, None)), in_axes=(0, None)))(x, w)
    want = _loop(lambda xs, b: _loop(grads, xs, b, axes=(0, None)), x, w, axes=(0, None))
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["max_plus", "adder", "log"])
def test_vmap_and_per_example_on_pallas(op):
    """The Pallas engine (interpret mode here) under the same folds: mapped input and
    kernel, and per-example gradients."""
    f = _conv(op, "pallas", groups=2)
    x, w = _data(n=2, width=4, o=2)  # small: the interpreter's cost grows with the grid
    xs, ws = jnp.stack([x, x[::-1] * 0.5]), jnp.stack([w[:, :2], w[:, 2:] * 2.0])
    got = jax.jit(jax.vmap(f))(xs, ws)
    np.testing.assert_allclose(got, _loop(f, xs, ws, axes=(0, 0)), rtol=1e-5, atol=1e-5)

    def grads(a, b):
        return jax.grad(lambda u, v: jnp.sum(jnp.sin(f(u[None], v))), argnums=(0, 1))(a, b)

    got = jax.jit(jax.vmap(grads, in_axes=(0, None)))(x, w[:, :2])
    want = _loop(grads, x, w[:, :2], axes=(0, None))
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_nested_vmap_and_dense():
    a = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 5, 4)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 6)), jnp.float32)

    def dense(u, v):
        return jaxconv.dot_general(u, v, (((1,), (0,)), ((), ())), op="max_plus")

    got = jax.vmap(jax.vmap(dense, in_axes=(0, None)), in_axes=(0, 0))(a, b)
    want = jnp.max(a[:, :, :, :, None] + b[:, None, None], axis=3)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("op", FORWARD_OPS, ids=_id)
def test_forward_mode_jit_inside_outside_and_linearize(op):
    f = _conv(op)
    x, w = _data(n=2, width=5, c=2, o=3, seed=3)
    tx, tw = _data(n=2, width=5, c=2, o=3, seed=4)
    y0, t0 = jax.jvp(f, (x, w), (tx, tw))
    y1, t1 = jax.jvp(jax.jit(f), (x, w), (tx, tw))
    y2, t2 = jax.jit(lambda *a: jax.jvp(f, a[:2], a[2:]))(x, w, tx, tw)
    y3, lin = jax.linearize(f, x, w)
    np.testing.assert_allclose(y0, f(x, w), rtol=1e-6)
    for y, t in ((y1, t1), (y2, t2), (y3, lin(tx, tw))):
        np.testing.assert_allclose(y, y0, rtol=1e-6)
        np.testing.assert_allclose(t, t0, rtol=1e-4, atol=1e-5)
    # The tangent is the transpose of the reverse rule: <J t, c> == <t, J^T c>.
    c = jnp.cos(y0)
    gx, gw = jax.vjp(f, x, w)[1](c)
    np.testing.assert_allclose(jnp.vdot(t0, c), jnp.vdot(tx, gx) + jnp.vdot(tw, gw),
                               rtol=1e-4)


@pytest.mark.parametrize("op", ["max_plus", "log", "l2", TANH_SUM], ids=_id)
def test_jacfwd_equals_jacrev(op):
    f = _conv(op)
    x, w = _data(n=1, width=4, c=2, k=2, o=2, seed=5)
    np.testing.assert_allclose(jax.jacfwd(f)(x, w), jax.jacrev(f)(x, w), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["xnor", "adder"])
@pytest.mark.parametrize("how", ["jvp", "jvp_of_jit", "linearize"])
def test_reverse_only_ops_name_themselves_in_forward_mode(name, how):
    f = _conv(name)
    x, w = _data(n=1, width=4, c=2, o=2)
    with pytest.raises(TypeError, match=f"op '{name}'.*forward mode"):
        if how == "jvp":
            jax.jvp(f, (x, w), (x, w))
        elif how == "jvp_of_jit":
            jax.jvp(jax.jit(f), (x, w), (x, w))
        else:
            jax.linearize(f, x, w)[1](x, w)
    jax.grad(lambda a: jnp.sum(f(a, w)))(x)  # reverse mode still works


def _count_compiles(fn):
    events = []

    def listener(name, *_args, **_kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


@pytest.mark.parametrize("op", ["max_plus", "log", "adder", CLIP_MAX], ids=_id)
def test_repeated_eager_calls_do_not_recompile(op):
    f = _conv(op)
    x, w = _data()
    x2, w2 = _data(seed=9)
    f(x, w).block_until_ready()
    assert _count_compiles(lambda: f(x, w).block_until_ready()) == 0
    assert _count_compiles(lambda: f(x2, w2).block_until_ready()) == 0


def test_planner_is_static_and_declared():
    geom = jaxconv._src.core.geometry.Geometry((8,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
    for name, want_fill in [("max_plus", -np.inf), ("min_max", np.inf), ("l1", None)]:
        caps = capabilities(jaxconv.ops.get(name))
        assert caps.dominated_fill == want_fill
    assert capabilities(jaxconv.ops.adder).separable == "adder"
    assert not capabilities(jaxconv.ops.adder).forward_mode
    user_mul = jaxconv.Op(lambda a, b: a * b, lambda a, b: a + b, identity=0.0, name="um")
    caps = capabilities(user_mul)
    assert caps.canonical.reduce == "sum" and caps.separable == "mul"
    problem = Problem(jaxconv.ops.max_plus, geom, "auto", np.dtype("float32"),
                                2**20)
    for platform in ("cuda", "tpu", "rocm"):
        assert planner.engine_name(problem, np.float32, platform) == "xla"
    xnor = Problem(jaxconv.ops.xnor, geom, "pallas", np.dtype("float32"), 2**20)
    assert planner.engine_name(xnor, np.float32, "cpu") == "xla"  # a rewrite is lax itself


_TWICE = jaxconv.Op(lambda a, b: a * b + a, "max", name="twice")


@pytest.mark.parametrize("explain_kw, call_kw, error", [
    # The call refuses logsumexp on integers: explain used to show a plan.
    (dict(op="log", dtype="int32"), dict(op="log", dtype="int32"), TypeError),
    # A bf16 combine that rounds twice per product is not native: explain says so too.
    (dict(op=_TWICE, dtype="bfloat16", engine="native"),
     dict(op=_TWICE, dtype="bfloat16", engine="native"), ValueError),
])
def test_explain_refuses_what_the_call_refuses(explain_kw, call_kw, error):
    x = jnp.ones((1, 6, 6, 2), call_kw.pop("dtype"))
    w = jnp.ones((3, 3, 2, 2), x.dtype)
    with pytest.raises(error) as from_call:
        jaxconv.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), **call_kw)
    with pytest.raises(error) as from_explain:
        jaxconv.explain(platform="cpu", **explain_kw)
    assert str(from_explain.value) == str(from_call.value)


def test_explain_names_only_the_engines_it_passed_over():
    plan = jaxconv.explain("max_plus", engine="pallas", platform="cpu")
    assert plan.engine == "pallas"
    assert not any("None" in d or d.startswith("not ") for d in plan.details), plan.details
    auto = jaxconv.explain("log", dtype="float64", platform="cpu")
    assert auto.engine == "xla"
    assert any(d.startswith("not native: ") and "float64" in d for d in auto.details)


def test_capabilities_are_inferred_once_without_values():
    calls = []

    def combine(a, b):
        calls.append(type(a))
        return a + b

    op = jaxconv.Op(combine, "max", name="counting")
    x, w = _data(n=1)
    f = jax.jit(_conv(op))
    f(x, w)
    n = len(calls)
    f(x * 2, w)
    jaxconv.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=DN, op=op)
    assert capabilities(op).combine == "add"
    # No tracing per call beyond the engine's own trace of a new compilation.
    assert len(calls) >= n


@pytest.mark.parametrize("op", ["max_plus", "log", "adder", CLIP_MAX, TANH_SUM], ids=_id)
def test_memory_bound_holds_forward_and_backward(op):
    """Compiled temp memory stays within max_block_bytes plus input/output-sized buffers."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) * 0.1, jnp.float32)
    bound = 2**20

    def f(a, b):
        return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            op=op, max_block_bytes=bound)

    io = x.size * 4 * 2 + w.size * 4 * 2  # inputs, outputs and their padded copies
    full_products = x.shape[0] * 16 * 16 * 9 * 32 * 32 * 4
    for fn in (f, jax.grad(lambda a, b: jnp.sum(f(a, b)), argnums=(0, 1))):
        stats = jax.jit(fn).lower(x, w).compile().memory_analysis()
        used = stats.temp_size_in_bytes + stats.output_size_in_bytes
        assert used <= 4 * bound + 6 * io, (used, bound, io)
        assert used * 8 < full_products


@pytest.mark.parametrize("engine", ["xla", "auto", "pallas"])
@pytest.mark.parametrize("op", ["max_plus", "l1", "log"])
def test_windows_of_only_padding_have_zero_gradients(op, engine):
    """Stride 2 over lhs_dilation holes: every tap of every window sees only padding."""
    x = jnp.ones((1, 3, 2))
    w = jnp.ones((1, 2, 2))

    def f(a, b):
        return jaxconv.conv_general_dilated(a, b, (2,), ((1, 2),), lhs_dilation=(2,),
                                            dimension_numbers=DN, op=op, engine=engine)

    ident = algebra.identity_value(jaxconv.ops.get(op), jnp.float32)
    np.testing.assert_array_equal(f(x, w), jnp.full((1, 4, 2), ident))
    _, vjp = jax.vjp(f, x, w)
    gx, gw = vjp(jnp.ones((1, 4, 2)))  # a cotangent on every window, -inf outputs included
    np.testing.assert_array_equal(gx, 0.0)
    np.testing.assert_array_equal(gw, 0.0)
