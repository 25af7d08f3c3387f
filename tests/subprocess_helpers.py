"""A user op run in a fresh Python process (the kernel cache seen by a second process).

One script serves the cache tests (tests/test_kernel_cache.py) and the user-kernel tests
(tests/test_user_kernels.py): it computes a 1-D convolution with a user op under "auto",
the XLA engine and ``engine="native"``, asks the native engine for the op's kernels, and
prints one JSON line of what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, warnings
    import jax.numpy as jnp, numpy as np
    import jaxconv
    from jaxconv._src.core import factoring
    from jaxconv._src.engines import native
    op = jaxconv.Op(lambda x, w: {combine}, "max", name={name!r})
    x = np.linspace(-1, 1, 2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    w = np.linspace(1, -1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    kw = dict(window_strides=(1,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    out = dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = jaxconv.conv_general_dilated(x, w, op=op, **kw)
    out["warnings"] = [str(c.message) for c in caught]
    xla = jaxconv.conv_general_dilated(x, w, op=op, engine="xla", **kw)
    out["equal_to_xla"] = bool(np.array_equal(np.asarray(y), np.asarray(xla)))
    # The op the engine compiles: the product left once one-operand maps are factored out.
    form = factoring.factored_form(op, np.float32)
    got = native.user_kernel(op if form is None else form.inner)
    out["compiled"] = getattr(got, "compiled", None)
    out["path"] = str(getattr(got, "path", ""))
    out["refusal"] = getattr(got, "reason", None)
    try:
        y = jaxconv.conv_general_dilated(x, w, op=op, engine="native", **kw)
        out["native_error"] = None
        out["native_equal_to_xla"] = bool(np.array_equal(np.asarray(y), np.asarray(xla)))
    except ValueError as e:
        out["native_error"] = str(e)
    print(json.dumps(out))
""")


def user_op_command(combine: str, name: str) -> list[str]:
    """The command line of one run: ``combine`` is a Python expression in ``x`` and ``w``."""
    return [sys.executable, "-c", _SCRIPT.format(combine=combine, name=name)]


def user_op_env(cache: Any, **env: str) -> dict[str, str]:
    """The environment of one run: this one, with ``cache`` as the kernel cache."""
    return dict(os.environ, JAXCONV_CACHE_DIR=str(cache), **env)


def result(stdout: str) -> dict[str, Any]:
    """What the script printed (its last line)."""
    return json.loads(stdout.strip().splitlines()[-1])


def run_user_op(cache: Any, combine: str, name: str, **env: str) -> dict[str, Any]:
    """Runs the script once and returns what it saw, with its ``stderr``."""
    proc = subprocess.run(user_op_command(combine, name), env=user_op_env(cache, **env),
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return dict(result(proc.stdout), stderr=proc.stderr)
