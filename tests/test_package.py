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
