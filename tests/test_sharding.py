"""Partitioning over a mesh of 8 simulated CPU devices (tests/conftest.py), checked on the
compiled HLO as well as on the numbers.

- `jit` with sharded operands: the batch axis and the output-feature axis pass through the
  native engine's calls (each device's call on its local shapes, no collective in the
  forward; the backward's only collectives all-reduces), bfloat16's recording forward and
  one-call backward (``jaxconv_low_forward_record``, ``jaxconv_low_backward_recorded``)
  included; the XLA engine's max/min ops compile sharded (no integer-or reduction);
- `jax.shard_map` with its default varying-axes check: forward and gradient of every engine
  path equal one device's, and a user op first used there keeps its native kernels.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxconv
from jaxconv._src.core import scalar_program

DN = ("NHWC", "HWIO", "NHWC")
# x * w: a compiled user kernel (tanh(x - w) runs on max_plus, as x + (-w)).
TANH_MAX = jaxconv.Op(lambda x, w: jnp.tanh(x * w), "max", name="tanh_max")
SMOOTH_SUM = jaxconv.Op(lambda x, w: jnp.sin(x) * w + 0.5 * x * x, "sum", name="smooth_sum")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")
MOVES = ("all-gather", "all-to-all", "collective-permute")


def _op(name: str):
    return {"tanh_max": TANH_MAX, "smooth_sum": SMOOTH_SUM}.get(name, name)


def _mesh(shape: tuple[int, ...] = (8,), names: tuple[str, ...] = ("data",)) -> Mesh:
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets jax_num_cpu_devices=8)")
    return Mesh(np.asarray(jax.devices()[:8]).reshape(shape), names)


def _data(seed: int, n: int = 16, c: int = 4, o: int = 8, groups: int = 1,
          dtype: str = "float32"):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, (n, 6, 7, c)).astype(np.float32)
    w = rng.uniform(-1.5, 1.5, (3, 3, c // groups, o)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _conv(op, engine: str = "auto", groups: int = 1):
    def f(x, w):
        return jaxconv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                            op=_op(op), engine=engine,
                                            feature_group_count=groups)
    return f


def _grad(f):
    return jax.grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w))), argnums=(0, 1))


def _collectives(hlo: str) -> set[str]:
    return {c for c in COLLECTIVES if re.search(rf"\b{c}(-start)?\(", hlo)}


def _native_calls(hlo: str) -> list[list[tuple[int, ...]]]:
    """The operand shapes of each native FFI call in compiled HLO text (float32, bfloat16 and
    int32 operands: a low call's data, a record)."""
    calls = []
    for line in hlo.splitlines():
        if 'custom_call_target="jaxconv_' not in line:
            continue
        constraints = re.search(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}", line)
        assert constraints is not None, line
        shapes = re.findall(r"(?:f32|bf16|s32)\[([0-9,]*)\]", constraints.group(1))
        calls.append([tuple(int(d) for d in s.split(",") if d) for s in shapes])
    return calls


def _close(got, want, tol: float = 1e-4) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


# Covering set: each engine path (built-in max kernel, built-in sum kernel with its lax
# kernel gradient, a compiled user op, the XLA engine's max) under both layouts, and bfloat16
# max_plus with 16 channels (144 kernel rows: the low recording forward keeps its masks, the
# one-call backward reads them).
CASES = [("max_plus", "auto", "data", "float32"), ("max_plus", "auto", "model", "float32"),
         ("adder", "auto", "data", "float32"), ("adder", "auto", "model", "float32"),
         ("tanh_max", "auto", "data", "float32"), ("tanh_max", "auto", "model", "float32"),
         ("max_plus", "xla", "data", "float32"), ("max_plus", "xla", "model", "float32"),
         ("max_plus", "auto", "data", "bfloat16"), ("max_plus", "auto", "model", "bfloat16")]
# The native calls of a bfloat16 max/min op's gradient.
LOW_RECORDED = {"jaxconv_low_forward_record", "jaxconv_low_backward_recorded"}


@pytest.mark.parametrize(("op", "engine", "layout", "dtype"), CASES)
def test_jit_partitions_batch_and_output_features(op: str, engine: str, layout: str,
                                                  dtype: str) -> None:
    mesh = _mesh()
    low = dtype != "float32"
    x, w = _data(0, c=16 if low else 4, dtype=dtype)
    xspec, wspec = (P("data"), P()) if layout == "data" else (P(), P(None, None, None, "data"))
    xs = jax.device_put(x, NamedSharding(mesh, xspec))
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    f = _conv(op, engine)
    native = engine == "auto"

    fwd = jax.jit(f)
    hlo = fwd.lower(xs, ws).compile().as_text()
    y = fwd(xs, ws)
    _close(y, jax.jit(f)(x, w))
    if low:  # a max: one device's bits
        np.testing.assert_array_equal(np.asarray(y, np.float32),
                                      np.asarray(jax.jit(f)(x, w), np.float32))
    # Sharded as lax's own convolution would be.
    y_lax = jax.jit(lambda a, b: lax.conv_general_dilated(a, b, (1, 1), "SAME",
                                                          dimension_numbers=DN))(xs, ws)
    assert y.sharding.is_equivalent_to(y_lax.sharding, y.ndim), (y.sharding, y_lax.sharding)
    assert not _collectives(hlo) & set(MOVES), _collectives(hlo)
    if native:
        assert not _collectives(hlo), _collectives(hlo)
        calls = _native_calls(hlo)
        assert calls, "no native call in the compiled forward"
        for x_shape, w_shape in calls:
            if layout == "data":  # (N, D, H, W, C) with 2 of the 16 images
                assert x_shape[0] == 2 and w_shape[-1] == 8, (x_shape, w_shape)
            else:  # all 16 images, 1 of the 8 output features
                assert x_shape[0] == 16 and w_shape[-1] == 1, (x_shape, w_shape)

    grad = jax.jit(_grad(f))
    g, want = grad(xs, ws), jax.jit(_grad(f))(x, w)
    # bfloat16: the gradient summed over shards is rounded per shard before the all-reduce
    # (within an ulp, 2^-7); the sharded operand's is its shard's own, one device's bits.
    _close(g, want, tol=1e-2 if low else 1e-4)
    if low:
        own = 0 if layout == "data" else 1
        np.testing.assert_array_equal(np.asarray(g[own], np.float32),
                                      np.asarray(want[own], np.float32))
    if native:
        hlo = grad.lower(xs, ws).compile().as_text()
        assert _collectives(hlo) <= {"all-reduce"}, _collectives(hlo)
        calls = _native_calls(hlo)
        assert all(c[0][0] == (2 if layout == "data" else 16) for c in calls), calls
        if low:  # the low recording forward and the one-call backward, each on its shard
            targets = set(re.findall(r'custom_call_target="(jaxconv_[a-z_]+)"', hlo))
            assert targets == LOW_RECORDED, targets
            assert all(c[1][-1] == (8 if layout == "data" else 1) for c in calls), calls


@pytest.mark.parametrize("groups", [8, 2])
def test_grouped_output_features_split_group_aligned(groups: int) -> None:
    """Output features over a 2-device axis (whole groups on each device), the batch over
    the other 4 devices: each call runs its groups on 2 images. With 2 groups the 4-device
    axis would cut the groups (`partitioning._compound_safe`), so the rule does not tie the
    input's channels to the groups: the forward still has no collective, and the backward
    gathers the input gradient's channels, as lax's own grouped convolution does here."""
    mesh = _mesh((4, 2), ("data", "model"))
    c = 2 * groups
    x, w = _data(1, n=8, c=c, o=8, groups=groups)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, None, None, "model")))
    f = _conv("max_plus", groups=groups)
    hlo = jax.jit(f).lower(xs, ws).compile().as_text()
    assert not _collectives(hlo)
    assert [c[:2] for c in _native_calls(hlo)] == [[(2, 1, 6, 7, c // 2), (1, 3, 3, 2, 4)]]
    _close(jax.jit(f)(xs, ws), f(x, w))
    g = jax.jit(_grad(f))(xs, ws)
    _close(g, jax.jit(_grad(f))(x, w))
    hlo = jax.jit(_grad(f)).lower(xs, ws).compile().as_text()
    if groups == 8:
        assert _collectives(hlo) <= {"all-reduce"}
    else:
        lax_grad = _grad(lambda a, b: _lax_conv(a, b, feature_group_count=groups))
        lax_hlo = jax.jit(lax_grad).lower(xs, ws).compile().as_text()
        assert _collectives(hlo) <= _collectives(lax_hlo), (_collectives(hlo),
                                                             _collectives(lax_hlo))


# Covering set: the input's channels sharded, the kernel's output features sharded (more
# shards than groups: each device takes part of one group), both; 2 and 4 groups; the
# native kernels and the XLA engine; Shardy and GSPMD.
FEWER_GROUPS_CASES = [("max_plus", "auto", 2, "x", True), ("adder", "auto", 2, "w", True),
                      ("max_plus", "xla", 2, "xw", True), ("max_plus", "auto", 4, "w", False),
                      ("adder", "auto", 2, "x", False), ("max_plus", "xla", 4, "xw", False)]


@pytest.mark.parametrize(("op", "engine", "groups", "layout", "shardy"), FEWER_GROUPS_CASES)
def test_fewer_groups_than_devices(op: str, engine: str, groups: int, layout: str,
                                   shardy: bool) -> None:
    """Feature groups sharded over a mesh axis larger than their number (2 groups over 8
    devices; Shardy used to cut the axis into a sub-axis that `custom_partitioning` could not
    express, and the compile failed deep inside XLA): the output features split over the 8
    devices, each device on its group's channels (no collective in the forward when only
    the kernel is sharded), input channels that cannot be split group-aligned gathered;
    the numbers of one device."""
    mesh = _mesh((8,), ("model",))
    x, w = _data(16, c=8, o=16, groups=groups)
    chan = P(None, None, None, "model")
    xs = jax.device_put(x, NamedSharding(mesh, chan if "x" in layout else P()))
    ws = jax.device_put(w, NamedSharding(mesh, chan if "w" in layout else P()))
    f = _conv(op, engine, groups=groups)
    jax.config.update("jax_use_shardy_partitioner", shardy)
    try:
        fwd, grad = jax.jit(f), jax.jit(_grad(f))
        hlo, ghlo = fwd.lower(xs, ws).compile().as_text(), grad.lower(xs, ws).compile().as_text()
        y, g = fwd(xs, ws), grad(xs, ws)
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)
    _close(y, jax.jit(f)(x, w))
    _close(g, jax.jit(_grad(f))(x, w))
    if layout == "w":
        assert not _collectives(hlo), _collectives(hlo)
        assert _collectives(ghlo) <= {"all-reduce"}, _collectives(ghlo)
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, chan), 4), y.sharding
        # Each call: all 16 images, its group's 8 // groups channels, 2 of 16 features.
        assert [c[:2] for c in _native_calls(hlo)] == [
            [(16, 1, 6, 7, 8 // groups), (1, 3, 3, 8 // groups, 2)]]
    else:
        assert _collectives(hlo) <= {"all-gather"}, _collectives(hlo)


# K = 136: the native engine's dense recording forward keeps its block masks (more than 64
# kernel rows) through a row or column split; a split contraction records nothing.
@pytest.mark.parametrize("spec", [(P("data"), P()), (P(), P(None, "data")),
                                  (P(None, "data"), P("data", None))])
def test_dot_general_rows_or_columns_sharded(spec: tuple[P, P]) -> None:
    mesh = _mesh()
    rng = np.random.default_rng(2)
    a = jnp.asarray(np.round(rng.normal(size=(16, 136)) * 2), jnp.float32)
    b = jnp.asarray(np.round(rng.normal(size=(136, 8)) * 2), jnp.float32)

    def f(a, b):
        return jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op="max_plus")

    sa, sb = (jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip((a, b), spec,
                                                                          strict=True))
    y = jax.jit(f)(sa, sb)
    _close(y, f(a, b))
    if spec[1] != P("data", None):  # rows or columns: no collective, lax's sharding
        y_lax = jax.jit(lambda p, q: p @ q)(sa, sb)
        assert y.sharding.is_equivalent_to(y_lax.sharding, 2)
        assert not _collectives(jax.jit(f).lower(sa, sb).compile().as_text())
    _close(jax.jit(_grad(f))(sa, sb), jax.jit(_grad(f))(a, b))


@pytest.mark.parametrize("layout", ["data", "contract"])
def test_gspmd_partitions_like_shardy(layout: str) -> None:
    mesh = _mesh()
    x, w = _data(3, c=8)
    x, w = jnp.round(x), jnp.round(w)  # ties across devices when the channels are split
    xspec, wspec = (P("data"), P()) if layout == "data" else (P(None, None, None, "data"),
                                                              P(None, None, "data"))
    xs = jax.device_put(x, NamedSharding(mesh, xspec))
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    f = _conv("max_plus")
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        hlo = jax.jit(f).lower(xs, ws).compile().as_text()
        y = jax.jit(f)(xs, ws)
        g = jax.jit(_grad(f))(xs, ws)
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)
    if layout == "data":
        assert not _collectives(hlo)
        assert all(c[0][0] == 2 for c in _native_calls(hlo))
    else:
        assert _collectives(hlo) == {"all-reduce"}
        assert set(_all_reduce_kinds(hlo)) == {"maximum"}
        assert all(c[0][-1] == 1 for c in _native_calls(hlo))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x, w)))
    _close(g, jax.jit(_grad(f))(x, w))


def test_xla_engine_max_keeps_special_values_sharded() -> None:
    """The NaN / infinity flags reduce across devices (max of 0/1 indicators): a NaN or an
    opposite infinity on one device's images gives the one-device outputs."""
    mesh = _mesh()
    x, w = _data(4)
    x = x.at[3, 2, 2, 0].set(jnp.nan).at[9, 0, 0, 1].set(jnp.inf)
    w = w.at[1, 1, 1, 2].set(-jnp.inf)
    f = jax.jit(_conv("max_plus", "xla"))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    np.testing.assert_array_equal(np.asarray(f(xs, w)), np.asarray(f(x, w)))


# --- shard_map (check_vma=True, the default) --------------------------------------------------

# Covering set of engine paths: native max / min / sum kernels, the XLA engine's logsumexp,
# a standard product, a compiled user max op and a user sum op.
SHARD_MAP_OPS = ["max_plus", "min_max", "adder", "l1", "log", "standard", "tanh_max",
                 "smooth_sum"]


@pytest.mark.parametrize("op", SHARD_MAP_OPS)
def test_shard_map_forward_and_gradient(op: str) -> None:
    mesh = _mesh()
    x, w = _data(5)
    f = _conv(op)
    fwd = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P()),
                                out_specs=P("data")))
    _close(fwd(x, w), jax.jit(f)(x, w))

    def local_grad(a, b):  # the kernel's gradient sums over devices through pvary's transpose
        return jax.grad(lambda a, b: lax.psum(jnp.sum(jnp.tanh(f(a, b))), "data"),
                        argnums=(0, 1))(a, b)

    grad = jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=(P("data"), P()),
                                 out_specs=(P("data"), P())))
    _close(grad(x, w), jax.jit(_grad(f))(x, w))


def test_user_op_first_used_in_shard_map_stays_native() -> None:
    mesh = _mesh()
    op = jaxconv.Op(lambda x, w: jnp.tanh(x * w) * 0.5, "max", name="first_in_shard_map")
    x, w = _data(6)
    f = _conv(op)

    def local_grad(a, b):
        return jax.grad(lambda a, b: lax.psum(jnp.sum(f(a, b)), "data"), argnums=(0, 1))(a, b)

    jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=(P("data"), P()),
                          out_specs=(P("data"), P())))(x, w)
    assert jaxconv.explain(op).engine == "native"


def test_scalar_translation_ignores_reductions_over_no_axes() -> None:
    """`jax.grad` traced inside `shard_map` adds a `reduce_sum` over no axes per argument."""
    mesh = _mesh()
    progs = []

    def body(a):
        progs.append(scalar_program.trace(
            jax.grad(lambda x, w: jnp.tanh(x - w), argnums=(0, 1)), "float32", 2))
        return a

    jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
        jnp.ones(8))
    outside = scalar_program.trace(jax.grad(lambda x, w: jnp.tanh(x - w), argnums=(0, 1)),
                                   "float32", 2)
    assert progs[0].primitives() == outside.primitives()
    assert "reduce_sum" not in progs[0].primitives()


def test_benchmark_smoke(tmp_path) -> None:
    """`python -m benchmarks.sharding --smoke` runs and reports the collectives it found."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sharding", "--smoke", "--ops",
                           "max_plus", "--json", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["op"] == "max_plus" and row["one_ms"] > 0 and row["eight_ms"] > 0
    assert row["fwd_collectives"] == [] and row["loss_rel_diff"] < 1e-5
    assert all(c.startswith("all-reduce") for c in row["step_collectives"])


def _all_reduce_kinds(hlo: str) -> list[str]:
    """The reduction of each all-reduce in compiled HLO text (the root instruction of its
    `to_apply` computation: "maximum", "minimum", "add", ...)."""
    kinds = []
    for name in re.findall(r"all-reduce(?:-start)?\(.*?to_apply=%?([\w.\-]+)", hlo):
        body = re.search(rf"^%?{re.escape(name)} .*?\{{\n(.*?)^\}}", hlo, re.M | re.S)
        assert body is not None, name
        root = re.search(r"ROOT \S+ = \S+ (\w+)\(", body.group(1))
        kinds.append(root.group(1))
    return kinds


# Covering set: each reduce with a collective on the native engine (max by float keys, the
# keyed min_max, a sum with pad value 0, a user max op and a user sum op); the contraction
# alone, with the batch on a second mesh axis, and with only the input's channels sharded.
# The XLA engine's max/min (winners found by index): continuous data, so each device's
# backward runs on the outputs it wins (no tie across devices, no gather).
CONTRACTION_CASES = [("max_plus", "contract", "maximum", "auto"),
                     ("min_max", "contract", "minimum", "auto"),
                     ("adder", "contract", "add", "auto"), ("tanh_max", "batch", "maximum", "auto"),
                     ("smooth_sum", "contract", "add", "auto"),
                     ("max_plus", "x_only", "maximum", "auto"),
                     ("max_plus", "contract", "maximum", "xla"),
                     ("tanh_max", "batch", "maximum", "xla")]


def _contraction_mesh(layout: str) -> tuple[Mesh, P, P, int]:
    """The mesh, the input's and kernel's specs and the number of contraction shards."""
    if layout == "batch":
        mesh = _mesh((2, 4), ("data", "c"))
        return mesh, P("data", None, None, "c"), P(None, None, "c", None), 4
    mesh = _mesh((8,), ("c",))
    wspec = P() if layout == "x_only" else P(None, None, "c", None)
    return mesh, P(None, None, None, "c"), wspec, 8


@pytest.mark.parametrize(("op", "layout", "reduction", "engine"), CONTRACTION_CASES)
def test_sharded_contraction_reduces_with_the_ops_collective(op: str, layout: str,
                                                             reduction: str,
                                                             engine: str) -> None:
    """Input channels sharded: each device's call runs on its own channels and the partial
    results are all-reduced with the op's reduce -- the forward's only collective, no
    gather of x or w; same numbers as one device (max/min bit for bit)."""
    mesh, xspec, wspec, k = _contraction_mesh(layout)
    x, w = _data(7, c=8)
    xs = jax.device_put(x, NamedSharding(mesh, xspec))
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    f = _conv(op, engine)
    hlo = jax.jit(f).lower(xs, ws).compile().as_text()
    assert _collectives(hlo) == {"all-reduce"}, _collectives(hlo)
    assert set(_all_reduce_kinds(hlo)) == {reduction}, _all_reduce_kinds(hlo)
    if engine == "auto":
        calls = _native_calls(hlo)
        assert calls and all(c[0][-1] == 8 // k and c[1][-2] == 8 // k for c in calls), calls
    y, want = jax.jit(f)(xs, ws), jax.jit(f)(x, w)
    if reduction == "add":
        _close(y, want)
    else:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    _close(jax.jit(_grad(f))(xs, ws), jax.jit(_grad(f))(x, w))


@pytest.mark.parametrize(("op", "engine"), [("max_plus", "auto"), ("min_plus", "auto"),
                                            ("max_min", "auto"), ("max_plus", "xla"),
                                            ("min_plus", "xla")])
def test_sharded_contraction_max_min_special_values_and_ties(op: str, engine: str) -> None:
    """NaN on one device's channels, +0 / -0 winners on different devices, -inf / +inf
    products, and ties between devices (integer data): the forward's only collective is the
    keyed all-reduce (on the XLA engine too, whose winners are found by index) and it equals
    one device's bit for bit (XLA's float all-reduce would drop NaN and order zeros by
    position); the gradient splits ties among the taps of every device as one device does,
    and a NaN window has none."""
    mesh = _mesh((8,), ("c",))
    x, w = _data(10, c=8)
    x, w = jnp.round(x), jnp.round(w)  # ties everywhere, across devices too
    other = -3.0 if op.startswith("max") else 3.0  # image 1: the zero products win
    x = x.at[1].set(other).at[0, 1, 1, 5].set(jnp.nan)
    x = x.at[1, :, :, 2].set(0.0).at[1, :, :, 6].set(-0.0)
    x = x.at[2, 3, 3, 0].set(-jnp.inf).at[3, 2, 2, 7].set(jnp.inf)
    w = w.at[:, :, 2, 0].set(0.0).at[:, :, 6, 0].set(-0.0)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, None, None, "c")))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, None, "c", None)))
    f = jax.jit(_conv(op, engine))
    hlo = f.lower(xs, ws).compile().as_text()
    assert _collectives(hlo) == {"all-reduce"}, _collectives(hlo)
    assert set(_all_reduce_kinds(hlo)) == {"maximum" if op.startswith("max") else "minimum"}
    y, want = np.asarray(f(xs, ws)), np.asarray(f(x, w))
    np.testing.assert_array_equal(y, want)
    # The signs of zero equal one device's too, and follow docs/numerics.md (a max of +0
    # and -0 is +0) as the native kernels do on one device.
    rule = np.asarray(jax.jit(_conv(op))(x, w))
    for ref in (want, rule):
        np.testing.assert_array_equal(np.signbit(y) & ~np.isnan(y),
                                      np.signbit(ref) & ~np.isnan(ref))
    assert (want[1, ..., 0] == 0).all()
    # Finite data but for one NaN (no inf - inf in the products' gradients).
    xf, wf = jnp.nan_to_num(x, nan=jnp.nan, posinf=2.0, neginf=-2.0), w
    scale = jnp.arange(8.0).reshape(1, 1, 1, 8)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.nan_to_num(_conv(op, engine)(a, b))
                                                 * scale), argnums=(0, 1)))
    xfs = jax.device_put(xf, NamedSharding(mesh, P(None, None, None, "c")))
    _close(grad(xfs, ws), grad(xf, wf), tol=1e-6)


def test_sharded_contraction_with_padding_value_and_batch() -> None:
    """`adder` pads with 0 (its padded taps add -|w|): each device's padded taps count
    for its own channels; the batch on another mesh axis passes through."""
    mesh = _mesh((4, 2), ("data", "c"))
    x, w = _data(11, n=8, c=4)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None, "c")))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, None, "c", None)))
    f = _conv("adder")
    hlo = jax.jit(f).lower(xs, ws).compile().as_text()
    assert _collectives(hlo) == {"all-reduce"}
    assert [c[:2] for c in _native_calls(hlo)] == [[(2, 1, 6, 7, 2), (1, 3, 3, 2, 8)]]
    y = jax.jit(f)(xs, ws)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
    _close(y, f(x, w))
    _close(jax.jit(_grad(f))(xs, ws), jax.jit(_grad(f))(x, w))


def test_vmap_of_a_sharded_call_keeps_the_batch_split() -> None:
    """The mapped axis folds into the batch as its minor part: the sharded images stay on
    their devices (no collective), each call on 3 x 2 images."""
    mesh = _mesh()
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(3, 16, 6, 7, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)
    f = jax.vmap(_conv("max_plus"), in_axes=(0, None))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
    hlo = jax.jit(f).lower(xs, w).compile().as_text()
    assert not _collectives(hlo)
    assert all(c[0][0] == 6 for c in _native_calls(hlo))
    y = jax.jit(f)(xs, w)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), y.ndim)
    _close(y, jax.jit(f)(x, w))


# Covering set: the native max kernel, the native sum kernel (its lax kernel gradient), a
# compiled user max op, `log`, the XLA engine's winner pass and logsumexp, each under a batch
# or an output-feature split; one sharded contraction.
EXPLICIT_CASES = [("max_plus", "auto", "data"), ("adder", "auto", "model"),
                  ("log", "auto", "data"), ("tanh_max", "auto", "model"),
                  ("max_plus", "xla", "data"), ("log", "xla", "model"),
                  ("max_plus", "auto", "contract")]


@pytest.mark.parametrize(("op", "engine", "layout"), EXPLICIT_CASES)
def test_explicit_mesh_partitions_by_shard_map(op: str, engine: str, layout: str) -> None:
    """On an explicit-axes mesh the call is a `shard_map` read from the operands' types
    (`core/explicit.py`): the output is typed as lax's convolution's (batch axes from the
    input, output-feature axes from the kernel), gradients keep their primals' types; the
    forward has no collective (the XLA engine's NaN / tie flags are per device; the native
    calls see local shapes), the gradient only lax's all-reduce, and a sharded contraction
    only the op's own; the numbers are one device's."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, w = _data(9, c=8)
    xspec, wspec = {"data": (P("data"), P()), "model": (P(), P(None, None, None, "data")),
                    "contract": (P(None, None, None, "data"), P(None, None, "data"))}[layout]
    xs = jax.device_put(x, NamedSharding(mesh, xspec))
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    f = _conv(op, engine)
    with jax.set_mesh(mesh):
        fwd = jax.jit(f).lower(xs, ws).compile()
        grad = jax.jit(_grad(f)).lower(xs, ws).compile()
        y, (gx, gw) = fwd(xs, ws), grad(xs, ws)
        if layout == "data":
            y_lax = jax.jit(lambda a, b: lax.conv_general_dilated(
                a, b, (1, 1), "SAME", dimension_numbers=DN))(xs, ws)
            assert jax.typeof(y).sharding.spec == jax.typeof(y_lax).sharding.spec
    # (lax asks for out_sharding= when the kernel is sharded; the output features it gets)
    want = {"data": P("data", None, None, None), "model": P(None, None, None, "data"),
            "contract": P(None, None, None, None)}[layout]
    assert jax.typeof(y).sharding.spec == want
    assert gx.sharding.is_equivalent_to(xs.sharding, 4)
    assert gw.sharding.is_equivalent_to(ws.sharding, 4)
    hlo, ghlo = fwd.as_text(), grad.as_text()
    if layout == "contract":
        assert _all_reduce_kinds(hlo) == ["maximum"] and _collectives(hlo) == {"all-reduce"}
    else:
        assert not _collectives(hlo), _collectives(hlo)
        assert _collectives(ghlo) == {"all-reduce"}, _collectives(ghlo)
        assert len(re.findall(r"\ball-reduce(-start)?\(", ghlo)) == 1
    for x_shape, w_shape in _native_calls(hlo):
        assert (x_shape[0], x_shape[-1], w_shape[-1]) == {
            "data": (2, 8, 8), "model": (16, 8, 1), "contract": (16, 1, 8)}[layout]
    assert bool(_native_calls(hlo)) == (engine == "auto")
    _close(y, f(x, w))
    _close((gx, gw), jax.jit(_grad(f))(x, w))


# --- bad input: as lax does, or a ValueError naming the axis ---------------------------------

def _lax_conv(a, b, **kw):
    return lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN, **kw)


@pytest.mark.parametrize(("case", "message"), [
    ("no_mesh", "needs a mesh in context"), ("missing_axis", "names mesh axis 'nope'"),
    ("indivisible_explicit", "output dimension 0 (size 12)")])
def test_bad_out_sharding_raises_as_lax(case: str, message: str) -> None:
    """An `out_sharding` naming a mesh axis that does not exist, a PartitionSpec without a
    mesh, or an explicit axis that does not divide the output: lax raises a ValueError, and
    so does jaxconv, naming `out_sharding` and the axis."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    x, w = _data(12, n=12)
    spec = P("nope") if case != "indivisible_explicit" else P("data")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    for fn in (_lax_conv, _conv("max_plus")):
        call = jax.jit(lambda a, b, fn=fn: fn(a, b, out_sharding=spec)) if fn is _lax_conv \
            else jax.jit(lambda a, b: jaxconv.conv_general_dilated(
                a, b, (1, 1), "SAME", dimension_numbers=DN, op="max_plus", out_sharding=spec))
        with pytest.raises(ValueError) as info:
            if case == "no_mesh":
                call(x, w)
            else:
                with jax.set_mesh(mesh):
                    call(x, w)
        if fn is not _lax_conv:
            assert "`out_sharding`" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize(("op", "groups", "c", "o", "spec"), [
    ("max_plus", 1, 4, 8, P("data")),                        # 12 images on 8 devices
    ("max_plus", 1, 4, 8, P(None, None, None, "data")),      # 4 channels on 8 devices
    ("max_plus", 8, 16, 8, P(None, None, None, "data")),     # groups of one output feature
    ("adder", 8, 8, 16, P(None, None, None, "data")),        # depthwise: one input channel
    ("custom", 1, 8, 8, P(None, None, None, "data"))])       # a reduce with no collective
def test_undividable_or_uncollectible_axes_work_as_lax(op: str, groups: int, c: int, o: int,
                                                       spec: P) -> None:
    """A sharding that does not divide its axis (on an automatic mesh, where lax pads), a
    contraction sharded for an op whose reduce has no collective, and grouped inputs sharded
    on their channels (depthwise included: a one-element factor of Shardy's rule): the
    numbers of one device."""
    mesh = _mesh()
    x, w = _data(13, n=12, c=c, o=o, groups=groups)
    the_op = op if op != "custom" else jaxconv.Op(
        lambda a, b: jnp.tanh(a - b), lambda a, b: jnp.where(jnp.abs(a) >= jnp.abs(b), a, b),
        identity=0.0, name="max_abs")
    f = _conv(the_op, groups=groups)

    def g(a, b):
        return f(lax.with_sharding_constraint(a, NamedSharding(mesh, spec)), b)

    _close(jax.jit(g)(x, w), jax.jit(f)(x, w))
    _close(jax.jit(_grad(g))(x, w), jax.jit(_grad(f))(x, w))
    # lax itself accepts the same constraint.
    jax.jit(lambda a, b: _lax_conv(lax.with_sharding_constraint(
        a, NamedSharding(mesh, spec)), b, feature_group_count=groups))(x, w)


# --- the XLA engine on CPU: partitioned by the core as the native calls are -----------------

@pytest.mark.parametrize(("op", "engine", "layout"), [
    ("max_plus", "xla", "data"), ("log", "auto", "data"), ("adder", "xla", "data"),
    ("log", "auto", "model"), ("adder", "xla", "contract"), ("log", "auto", "contract")])
def test_xla_engine_partitions_forward_and_backward(op: str, engine: str, layout: str) -> None:
    """The winner, `log` and AdderNet backward passes of the XLA engine hold only lax's
    all-reduces (their tap loops all-gathered when left to the partitioner); a sum's sharded
    contraction is one add all-reduce, a logsumexp's the stable max-then-sum combine."""
    mesh = _mesh()
    x, w = _data(14, c=8)
    xspec, wspec = {"data": (P("data"), P()), "model": (P(), P(None, None, None, "data")),
                    "contract": (P(None, None, None, "data"), P(None, None, "data"))}[layout]
    xs = jax.device_put(x, NamedSharding(mesh, xspec))
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    f = _conv(op, engine)
    hlo = jax.jit(f).lower(xs, ws).compile().as_text()
    if layout == "contract":
        want = {"add"} if op == "adder" else {"maximum", "add"}  # logsumexp: max, then sum
        assert _collectives(hlo) == {"all-reduce"} and set(_all_reduce_kinds(hlo)) == want
    else:
        assert not _collectives(hlo), _collectives(hlo)
    _close(jax.jit(f)(xs, ws), jax.jit(f)(x, w))
    grad = jax.jit(_grad(f))
    assert _collectives(grad.lower(xs, ws).compile().as_text()) <= {"all-reduce"}
    _close(grad(xs, ws), grad(x, w))


def test_sharded_logsumexp_contraction_special_values() -> None:
    """`log` with its channels on 8 devices: windows that are all -inf on one device or on
    every device, +inf and NaN give one device's outputs, and the gradient has no NaN
    where one device has none (an all -inf window's is zero)."""
    mesh = _mesh((8,), ("c",))
    x, w = _data(15, c=8)
    x = x.at[0].set(-jnp.inf).at[1, ..., 3].set(-jnp.inf).at[2, 0, 0, 5].set(jnp.nan)
    x = x.at[3, 2, 2, 6].set(jnp.inf).at[4].multiply(300.0)  # exp would overflow
    xs = jax.device_put(x, NamedSharding(mesh, P(None, None, None, "c")))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, None, "c", None)))
    f = jax.jit(_conv("log"))
    y, want = np.asarray(f(xs, ws)), np.asarray(f(x, w))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
    assert (want[0] == -np.inf).all()
    np.testing.assert_allclose(y, want, rtol=1e-5)
    finite = x.at[2, 0, 0, 5].set(0.0).at[3, 2, 2, 6].set(0.0)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.where(jnp.isfinite(_conv("log")(a, b)),
                                                           _conv("log")(a, b), 0.0)),
                            argnums=(0, 1)))
    fs = jax.device_put(finite, NamedSharding(mesh, P(None, None, None, "c")))
    got, ref = grad(fs, ws), grad(finite, w)
    assert not any(np.isnan(np.asarray(a)).any() for a in ref)
    _close(got, ref, tol=1e-4)


# --- the XLA engine as accelerator programs hold it: left to the partitioner ------------------

# Covering set of the XLA engine's paths: a standard product (one lax convolution), the
# separable AdderNet / l1 gradients, the winner backward (built-in and user max), the
# logsumexp in exp space, under a batch and an output-feature sharding. What the
# partitioner makes of each (jax 0.10.2, Shardy) is tabled in docs/engines.md: no case moves
# data; the sums' forward has no collective, max/min and logsumexp forwards (and l1's,
# whose combine holds a max and a min: `nan._combine_may_drop_nan`) one scalar all-reduce
# of their NaN / infinity flags (FLAGGED), and every backward only all-reduces.
UNWRAPPED_CASES = [("standard", "data"), ("standard", "model"), ("adder", "data"),
                   ("adder", "model"), ("l1", "data"), ("max_plus", "data"),
                   ("min_max", "model"), ("tanh_max", "data"), ("log", "model"),
                   ("log", "data")]
FLAGGED = {"l1", "max_plus", "min_max", "tanh_max", "log"}


@pytest.mark.parametrize(("op", "layout"), UNWRAPPED_CASES)
def test_xla_engine_left_to_the_partitioner(monkeypatch, op: str, layout: str) -> None:
    """On GPU / TPU the XLA engine is not wrapped in `custom_partitioning` (jax#38196: on
    TPU its partition callbacks never run and the program fails to compile), so the SPMD
    partitioner partitions the engine's plain lax code itself. The same program on 8 CPU
    devices (the engine's CPU wrapping switched off): the numbers of one device in every
    case; no all-gather, all-to-all or collective-permute in any forward or backward (the
    winner pass gathers and scatters per image, its tied windows are found per row, image
    blocks and channel chunks are interleaved); the sums' forward has no collective (max/min,
    logsumexp and l1 carry one small all-reduce of their NaN / infinity flags) and every
    backward only all-reduces (the gradients, as lax, and the scalar flags)."""
    from jaxconv._src.engines.xla import engine as xla_engine

    monkeypatch.setattr(xla_engine.XlaEngine, "opaque_call", lambda self, platform: False)
    mesh = _mesh()
    x, w = _data(17, c=8)
    xspec, wspec = (P("data"), P()) if layout == "data" else (P(), P(None, None, None, "data"))
    xs = jax.device_put(x, NamedSharding(mesh, xspec))
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    f = _conv(op, "xla")
    fwd, grad = jax.jit(f), jax.jit(_grad(f))
    hlo, ghlo = fwd.lower(xs, ws).compile().as_text(), grad.lower(xs, ws).compile().as_text()
    assert "CustomSPMDPartitioning" not in fwd.lower(xs, ws).as_text()
    assert _collectives(hlo) <= ({"all-reduce"} if op in FLAGGED else set()), _collectives(hlo)
    assert _collectives(ghlo) <= {"all-reduce"}, _collectives(ghlo)
    _close(fwd(xs, ws), jax.jit(f)(x, w))
    _close(grad(xs, ws), jax.jit(_grad(f))(x, w))


# --- Pallas on automatic meshes: wrapped on CPU (interpret mode) and GPU, not on TPU ---------

@pytest.mark.parametrize(("op", "layout"), [("max_plus", "data"), ("adder", "model")])
def test_pallas_partitions_batch_and_output_features(op: str, layout: str) -> None:
    """Interpret-mode Pallas kernels (the engine's CPU form of its GPU custom calls) run on
    each device's local batch or output features: one device's numbers, no collective in
    the forward (left to the partitioner it all-gathered x9 and collective-permuted), only
    all-reduces in the gradient (left alone, all-gather x18-20)."""
    mesh = _mesh()
    x, w = _data(18)
    xspec, wspec = (P("data"), P()) if layout == "data" else (P(), P(None, None, None, "data"))
    xs = jax.device_put(x, NamedSharding(mesh, xspec))
    ws = jax.device_put(w, NamedSharding(mesh, wspec))
    f = _conv(op, "pallas")
    fwd, grad = jax.jit(f), jax.jit(_grad(f))
    assert not _collectives(fwd.lower(xs, ws).compile().as_text())
    assert _collectives(grad.lower(xs, ws).compile().as_text()) <= {"all-reduce"}
    _close(fwd(xs, ws), fwd(x, w))
    _close(grad(xs, ws), grad(x, w))
