"""``jax.export`` round trips of a trained jaxconv model: serialize here, deserialize and run
in a fresh process, compare the numbers.

On the XLA engine the artifact is plain StableHLO and the fresh process never imports
jaxconv; on the native engine it calls jaxconv's FFI targets, which JAX serializes only with
`jaxconv.export_disabled_checks()` and which run where the loading process imports jaxconv.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxconv
from jaxconv import nnx as jnn

# The serving process: loads each artifact, runs it on the saved inputs, saves the outputs.
LOADER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    if sys.argv[1] == "import":
        import jaxconv  # registers the native engine's FFI targets
    data = np.load(sys.argv[2])
    out = {}
    for name in sys.argv[3:]:
        with open(name, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        try:
            flat = [data[f"arg{i}"] for i in range(len(exported.in_avals))]
            args, kwargs = jax.tree.unflatten(exported.in_tree, flat)
            result = exported.call(*args, **kwargs)
            out[name] = np.asarray(jax.tree.leaves(result)[0])
        except Exception as e:  # reported to the test
            print(f"{name}: {type(e).__name__}: {e}")
    np.savez(sys.argv[2] + ".out.npz", **{str(i): out[n] for i, n in enumerate(sys.argv[3:])
                                          if n in out})
    print("jaxconv imported:", "jaxconv" in sys.modules)
""")


class Net(nnx.Module):
    def __init__(self, engine: str, rngs: nnx.Rngs):
        self.conv = jnn.Conv(2, 4, (3, 3), op="max_plus", engine=engine, rngs=rngs)
        self.dense = jnn.Linear(4, 3, op="l1", engine=engine, rngs=rngs)

    def __call__(self, x):
        return self.dense(jnp.mean(self.conv(x), axis=(1, 2)))


def _trained(engine: str) -> Net:
    """A few optax steps, so that the exported weights are trained ones."""
    model = Net(engine, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 6, 6, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8))

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        opt.update(model, grads)
        return loss

    for _ in range(2):
        step(model, opt, x, y)
    return model


def _round_trip(tmp_path, artifacts: dict[str, jax.export.Exported], args, import_jaxconv):
    data = tmp_path / "args.npz"
    np.savez(data, **{f"arg{i}": np.asarray(a) for i, a in enumerate(args)})
    names = []
    for name, exported in artifacts.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(exported.serialize())
        names.append(str(path))
    proc = subprocess.run([sys.executable, "-c", LOADER, "import" if import_jaxconv else "no",
                           str(data), *names], capture_output=True, text=True, timeout=300,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(str(data) + ".out.npz")
    return {name: out[str(i)] for i, name in enumerate(artifacts) if str(i) in out}, proc.stdout


@pytest.mark.parametrize("engine", ["xla", "native"])
def test_trained_model_round_trips_through_jax_export(tmp_path, engine):
    model = _trained(engine)
    graphdef, state = nnx.split(model)
    # The weights travel as a flat list of arrays (a pytree of nnx.Param is not serializable).
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6, 6, 2)), jnp.float32)

    def serve(leaves, x):
        weights = nnx.State(jax.tree.unflatten(treedef, leaves))
        return nnx.merge(graphdef, weights)(x)

    def grad_x(leaves, x):  # the backward kernels travel too
        return jax.grad(lambda x: jnp.sum(serve(leaves, x) ** 2))(x)

    checks = jaxconv.export_disabled_checks() if engine == "native" else []
    artifacts = {f: jax.export.export(jax.jit(fn), disabled_checks=checks)(leaves, x)
                 for f, fn in (("serve", serve), ("grad_x", grad_x))}
    text = artifacts["serve"].mlir_module() + artifacts["grad_x"].mlir_module()
    assert ("jaxconv_forward" in text and "jaxconv_backward" in text) == (engine == "native")
    assert ("custom_call" in text) == (engine == "native")

    args = [*leaves, x]
    got, stdout = _round_trip(tmp_path, artifacts, args, import_jaxconv=engine == "native")
    assert set(got) == set(artifacts), stdout
    np.testing.assert_array_equal(got["serve"], serve(leaves, x))
    np.testing.assert_array_equal(got["grad_x"], grad_x(leaves, x))
    # The XLA engine's artifact is plain StableHLO: it ran without jaxconv.
    assert f"jaxconv imported: {engine == 'native'}" in stdout


def test_native_export_needs_the_checks_and_import_jaxconv(tmp_path):
    """Without the disabled checks JAX refuses to serialize; without `import jaxconv` the
    serving process has no handler for the targets (the message names the target)."""
    def f(a, b):
        return jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op="max_plus",
                                   engine="native")

    a, b = jnp.ones((2, 3)), jnp.arange(12.0).reshape(3, 4)
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        jax.export.export(jax.jit(f))(a, b)
    exported = jax.export.export(jax.jit(f), disabled_checks=jaxconv.export_disabled_checks())
    art = {"dot": exported(a, b)}
    got, stdout = _round_trip(tmp_path, art, [a, b], import_jaxconv=False)
    assert not got and "No FFI handler registered for jaxconv_forward" in stdout
    got, _ = _round_trip(tmp_path, art, [a, b], import_jaxconv=True)
    np.testing.assert_array_equal(got["dot"], f(a, b))


def test_serving_page_runs():
    """The examples of docs/serving.md, in order, in one namespace."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 3
    namespace: dict = {"__name__": "docs_serving"}
    for block in blocks:
        exec(compile(block, "docs/serving.md", "exec"), namespace)
    assert namespace["model"].engine == "xla"
    assert isinstance(namespace["blob"], (bytes, bytearray))
