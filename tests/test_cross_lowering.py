"""Every Pallas and XLA path lowers for CUDA and TPU, checked on a CPU-only machine.

``jax.jit(f).trace(*args).lower(lowering_platforms=(p,))`` runs the platform's lowering
(Pallas kernels to Triton IR or to Mosaic, XLA ops to StableHLO) without the device; only
the final compile needs one. Each Pallas case asserts that the lowered module holds the
Triton (``cuda``) / Mosaic (``tpu``) kernel calls, as many as the path launches, so a
silent fallback to interpret mode or to another engine fails, and that no Mosaic GPU call
appears for CUDA (the engine selects Triton explicitly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import ops, quantizers
from jaxconv._src import packed as pk

PLATFORMS = ("cuda", "tpu")
KERNEL_CALL = {"cuda": "@__gpu$xla.gpu.triton", "tpu": "@tpu_custom_call"}

# A user op whose combine carries a custom_vjp (larq's straight-through sign), and one whose
# combine carries a custom_jvp (jax.nn.relu) under a max: neither may reach a kernel body.
# (The sign reads both operands: a rule of one operand is factored out of the product.)
STE_TIMES = jaxconv.Op(lambda x, w: quantizers.ste_sign(x * w), "sum", name="ste_times")
RELU_PLUS = jaxconv.Op(lambda x, w: jax.nn.relu(x) + w, "max", name="relu_plus")
SOFT_PROD = jaxconv.Op(lambda x, w: 1 + 0.1 * x * w, "prod", name="soft_prod")

BUILTIN = ["max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2_exact", "log"]


def _op(name):
    return {"ste_times": STE_TIMES, "relu_plus": RELU_PLUS, "soft_prod": SOFT_PROD}.get(
        name) or ops.get(name)


def _kernels_in_grad(op) -> int:
    """Kernel calls of forward + backward: forward, dx, dw (+ the tie count for max/min)."""
    if op.reduce_name not in ("sum", "max", "min", "logsumexp"):
        # The backward of other reduces is the XLA engine's, and the unused forward output
        # is pruned: no kernel (the forward's lowering is checked on its own).
        return 0
    return 4 if op.reduce in ("max", "min") else 3


def _lowered(fn, *args):
    traced = jax.jit(fn).trace(*args)
    return {p: traced.lower(lowering_platforms=(p,)).as_text() for p in PLATFORMS}


def _assert_kernels(texts, count):
    for p, text in texts.items():
        got = text.count(KERNEL_CALL[p])
        assert got >= count, f"{p}: {got} kernel calls, expected {count}"
        other = KERNEL_CALL["tpu" if p == "cuda" else "cuda"]
        assert other not in text, p
    assert "mosaic_gpu" not in texts["cuda"]


def _conv(op, layout, padding, strides, lhs_dil, rhs_dil, groups, engine="pallas"):
    def f(x, w):
        return jaxconv.conv_general_dilated(
            x, w, strides, padding, lhs_dil, rhs_dil, layout, groups, op=op, engine=engine)

    return f


def _grad(f, y_shape):
    cot = jnp.asarray(np.random.default_rng(0).standard_normal(y_shape), jnp.float32)
    return jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cot), argnums=(0, 1))


# (name, layout, padding, strides, lhs_dilation, rhs_dilation, groups, x shape, w shape)
GEOMETRIES = {
    "2d_groups": (("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, None, 2,
                  (2, 6, 5, 6), (3, 3, 3, 4)),
    "2d_depthwise_strided": (("NHWC", "HWIO", "NHWC"), "SAME", (2, 1), None, None, 4,
                             (1, 7, 6, 4), (3, 3, 1, 8)),
    "1d_dilations": (("NWC", "WIO", "NWC"), ((2, -1),), (2,), (2,), (2,), 1,
                     (2, 9, 3), (3, 3, 5)),
    "3d": (("NDHWC", "DHWIO", "NDHWC"), "SAME", (1, 2, 1), None, None, 1,
           (1, 4, 5, 4, 3), (2, 3, 2, 3, 4)),
}


def _case(op_name, geom_name, dtype=jnp.float32):
    layout, padding, strides, lhs_dil, rhs_dil, groups, xs, ws = GEOMETRIES[geom_name]
    x = jnp.zeros(xs, dtype)
    w = jnp.zeros(ws, dtype)
    f = _conv(_op(op_name), layout, padding, strides, lhs_dil, rhs_dil, groups)
    return f, x, w


CONV_CASES = (
    [(name, "2d_groups") for name in [*BUILTIN, "ste_times", "relu_plus", "soft_prod"]]
    + [("max_plus", g) for g in ("2d_depthwise_strided", "1d_dilations", "3d")]
    + [("adder", "3d"), ("log", "1d_dilations"), ("min_max", "2d_depthwise_strided")]
)


@pytest.mark.parametrize("op_name,geom_name", CONV_CASES,
                         ids=[f"{o}-{g}" for o, g in CONV_CASES])
def test_conv_forward_and_backward_lower(op_name, geom_name):
    f, x, w = _case(op_name, geom_name)
    _assert_kernels(_lowered(f, x, w), 1)
    y_shape = jax.eval_shape(f, x, w).shape
    _assert_kernels(_lowered(_grad(f, y_shape), x, w), _kernels_in_grad(_op(op_name)))


@pytest.mark.parametrize("op_name", ["max_plus", "adder", "log"])
def test_bfloat16_lowers(op_name):
    # bf16 packs 16 rows per TPU tile: the blocks are 128 or the whole padded extent.
    f, x, w = _case(op_name, "2d_groups", jnp.bfloat16)
    _assert_kernels(_lowered(f, x, w), 1)
    y_shape = jax.eval_shape(f, x, w).shape
    _assert_kernels(_lowered(_grad(f, y_shape), x, w), _kernels_in_grad(_op(op_name)))


@pytest.mark.parametrize("op_name", ["max_plus", "adder"])
def test_dense_dot_general_lowers(op_name):
    dn = (((2,), (1,)), ((1,), (0,)))  # a batch dimension as well
    a = jnp.zeros((5, 2, 37), jnp.float32)
    b = jnp.zeros((2, 37, 9), jnp.float32)

    def f(p, q):
        return jaxconv.dot_general(p, q, dn, op=op_name, engine="pallas")

    _assert_kernels(_lowered(f, a, b), 1)
    y_shape = jax.eval_shape(f, a, b).shape
    _assert_kernels(_lowered(_grad(f, y_shape), a, b), _kernels_in_grad(ops.get(op_name)))


@pytest.mark.parametrize("layer", ["A", "B"])
def test_layer_shapes_lower(layer):
    # The device check's layers A, B (conv) and E (dense): large enough for the full tiles.
    n, hw, c = {"A": (8, 32, 64), "B": (32, 16, 128)}[layer]
    x = jnp.zeros((n, hw, hw, c), jnp.float32)
    w = jnp.zeros((3, 3, c, c), jnp.float32)
    f = _conv(ops.max_plus, ("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, None, 1)
    _assert_kernels(_lowered(f, x, w), 1)
    _assert_kernels(_lowered(_grad(f, x.shape), x, w), 4)
    if layer == "B":
        return
    a = jnp.zeros((256, 1024), jnp.float32)
    b = jnp.zeros((1024, 1024), jnp.float32)

    def dense(p, q):
        return jaxconv.dot_general(p, q, (((1,), (0,)), ((), ())), op="adder",
                                   engine="pallas")

    _assert_kernels(_lowered(dense, a, b), 1)


@pytest.mark.parametrize("pad_value", [None, -1.0])
def test_packed_xnor_pallas_lowers(pad_value):
    x = jnp.zeros((1, 5, 4, 40), jnp.float32)
    wq = pk.pack_kernel(jnp.zeros((3, 3, 20, 4), jnp.float32))

    def f(xv, wv):
        return pk.packed_conv(xv, wv, window_strides=(1, 1), padding="SAME",
                              feature_group_count=2, pad_value=pad_value, engine="pallas")

    _assert_kernels(_lowered(f, x, wq), 1)

    def dense(xv, wv):
        return pk.packed_dense(xv, wv, engine="pallas")

    _assert_kernels(_lowered(dense, jnp.zeros((3, 100)), pk.pack_kernel(jnp.zeros((100, 7)))),
                    1)


@pytest.mark.parametrize("op_name", ["max_plus", "adder", "log", "ste_times"])
def test_xla_engine_lowers(op_name):
    f, x, w = _case(op_name, "2d_groups")
    f = _conv(_op(op_name), *GEOMETRIES["2d_groups"][:6], engine="xla")
    y_shape = jax.eval_shape(f, x, w).shape
    for texts in (_lowered(f, x, w), _lowered(_grad(f, y_shape), x, w)):
        for p, text in texts.items():
            assert "stablehlo" in text and KERNEL_CALL[p] not in text


def test_one_function_every_platform():
    # The same traced function: the CPU lowering interprets (no kernel call), the
    # accelerators get their kernels; the platform is picked at lowering, not at tracing.
    f, x, w = _case("max_plus", "2d_groups")
    traced = jax.jit(f).trace(x, w)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert KERNEL_CALL["cuda"] not in cpu and KERNEL_CALL["tpu"] not in cpu
    assert KERNEL_CALL["cuda"] in traced.lower(lowering_platforms=("cuda",)).as_text()
    assert KERNEL_CALL["tpu"] in traced.lower(lowering_platforms=("tpu",)).as_text()


# --- explicit-axes meshes: partitioned by shard_map, on every platform -------------------------

COLLECTIVE_OPS = ("stablehlo.all_reduce", "stablehlo.all_gather", "stablehlo.all_to_all",
                  "stablehlo.collective_permute", "stablehlo.reduce_scatter")


def _signatures(text: str, platform: str, engine: str) -> list[str]:
    """The operand and result types of each engine call: the kernel custom calls (Pallas) or
    the tap loops (the XLA engine), sorted."""
    mark = KERNEL_CALL[platform] if engine == "pallas" else "stablehlo.while("
    return sorted(line.rsplit(") : ", 1)[-1] if engine != "pallas" else line.rsplit(" : ", 1)[-1]
                  for line in text.splitlines() if mark in line)


@pytest.mark.parametrize(("op_name", "engine", "layout"), [
    ("max_plus", "pallas", "data"), ("adder", "pallas", "model"),
    ("max_plus", "xla", "data"), ("log", "xla", "model")])
def test_explicit_mesh_lowers_as_shard_map(op_name, engine, layout):
    """On a mesh of explicit axes (8 simulated CPU devices) the product is lowered for CUDA
    and TPU as a `shard_map` read from the operands' types, with no `custom_partitioning`
    (jax#38196): the engine's calls (Pallas kernels, the XLA engine's loops) are those of one
    device on its local shapes, the forward has no collective (the XLA engine's NaN / tie
    flags are per device) and the gradient one all-reduce (lax's: the kernel gradient over
    the batch, the input gradient over the output features)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets jax_num_cpu_devices=8)")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, w = jnp.zeros((16, 6, 7, 8)), jnp.zeros((3, 3, 8, 8))
    xspec, wspec = (P("data"), P()) if layout == "data" else (P(), P(None, None, None, "data"))
    local = (x[:2], w) if layout == "data" else (x, w[..., :1])
    f = _conv(_op(op_name), ("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, None, 1, engine)
    for fn, collectives in ((f, 0), (f, 1)):
        if collectives:  # the gradient: a cotangent shaped as each program's output
            fn = _grad(f, jax.eval_shape(f, *local).shape)
            sharded_fn = _grad(f, jax.eval_shape(f, x, w).shape)
        else:
            sharded_fn = f
        one = _lowered(fn, *local)
        with jax.set_mesh(mesh):
            sharded = _lowered(sharded_fn, jax.device_put(x, NamedSharding(mesh, xspec)),
                               jax.device_put(w, NamedSharding(mesh, wspec)))
        for p, text in sharded.items():
            assert "CustomSPMDPartitioning" not in text and "sdy.manual_computation" in text
            found = {c: text.count(c) for c in COLLECTIVE_OPS if c in text}
            assert found == ({"stablehlo.all_reduce": 1} if collectives else {}), (p, found)
            assert _signatures(text, p, engine) == _signatures(one[p], p, engine), p
            assert _signatures(text, p, engine), p


@pytest.mark.parametrize(("op_name", "layout"), [("max_plus", "data"), ("adder", "model")])
def test_automatic_mesh_wraps_pallas_on_gpu_only(op_name, layout):
    """On an automatic mesh (8 simulated CPU devices) the Pallas kernels are wrapped in
    `custom_partitioning` for CUDA (each GPU's Triton kernels are lowered on its local
    shapes when the program is partitioned), not for TPU (jax#38196), where JAX itself
    refuses a Mosaic call that several devices would partition automatically."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets jax_num_cpu_devices=8)")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    xspec, wspec = (P("data"), P()) if layout == "data" else (P(), P(None, None, None, "data"))
    x = jax.device_put(jnp.zeros((16, 6, 7, 8)), NamedSharding(mesh, xspec))
    w = jax.device_put(jnp.zeros((3, 3, 8, 8)), NamedSharding(mesh, wspec))
    f = _conv(_op(op_name), ("NHWC", "HWIO", "NHWC"), "SAME", (1, 1), None, None, 1, "pallas")
    traced = jax.jit(f).trace(x, w)
    assert "CustomSPMDPartitioning" in traced.lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(NotImplementedError, match="shard_map"):
        traced.lower(lowering_platforms=("tpu",))
