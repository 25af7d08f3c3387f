"""The package's surface: every public submodule is an attribute after ``import jaxconv``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jaxconv

_ROOT = str(pathlib.Path(jaxconv.__file__).resolve().parents[1])


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_is_light_and_submodules_are_attributes() -> None:
    out = _run(
        "import sys, jaxconv\n"
        "print('flax' in sys.modules, 'optax' in sys.modules)\n"
        "jaxconv.optim.adder_scale; jaxconv.checkpoint.save\n"
        "for name in ('ops', 'nnx', 'linen', 'quantizers', 'optim', 'checkpoint', 'packed'):\n"
        "    assert getattr(jaxconv, name).__name__ == 'jaxconv.' + name, name\n"
        "print('flax' in sys.modules)\n"
    )
    assert out.split() == ["False", "False", "True"]


def test_every_builtin_op_is_public() -> None:
    import jaxconv

    assert set(jaxconv.ops.BUILTIN_OPS) <= set(jaxconv.ops.__all__)
    for name, op in jaxconv.ops.BUILTIN_OPS.items():
        assert getattr(jaxconv.ops, name) is op
    assert "max_times" in jaxconv.ops.__all__


def test_binary_is_declared_not_recognised() -> None:
    import jax.numpy as jnp

    import jaxconv
    from jaxconv import ops

    assert ops.xnor.binary and ops.xnor.replace(pad_value=1.0).binary
    assert not any(op.binary for name, op in ops.BUILTIN_OPS.items() if name != "xnor")
    # The same combine in a user op is not declared binary: packing is not guessed.
    assert not jaxconv.Op(ops.xnor.combine, "sum").binary
    assert not jaxconv.Op(lambda x, w: jnp.sign(x) * jnp.sign(w), "sum").binary
