"""Prints the generated C++ functor of a logsumexp zoo op, for ``benchmarks/lsebwd_1t.cc``.

Ops: ``seed`` (``-(a - b)**2`` under ``jnp.logaddexp``, the seed's own op) and ``tempered``
(``a * b`` under a softplus-smoothed max at temperature 0.5: the kernel runs the built-in
logsumexp of ``a * b / 0.5``, `benchmarks.user_zoo`'s ``softplus_max``); and two heavy
combines under sum, whose backward is the sums' one-pass loop (``csrc/kernel_sums_heavy.h``):
``gauss`` (``exp(-(x - w)**2)``, the zoo's Gaussian) and ``tanh`` (``tanh(x - w)``).

Example::

    python -m benchmarks.lsebwd_functor seed > /tmp/seed.cc
"""

from __future__ import annotations

import argparse
import math

import jax.numpy as jnp
import numpy as np

import jaxconv
from benchmarks.user_zoo import smoothed_max
from jaxconv._src.core.factoring import Tempered
from jaxconv._src.engines.native import codegen

OPS = {
    "seed": jaxconv.Op(lambda a, b: -((a - b) ** 2), jnp.logaddexp, identity=-math.inf),
    "tempered": jaxconv.Op(Tempered(lambda a, b: a * b, 0.5), "logsumexp"),
    "gauss": jaxconv.Op(lambda x, w: jnp.exp(-((x - w) ** 2)), "sum"),
    "tanh": jaxconv.Op(lambda x, w: jnp.tanh(x - w), "sum"),
}


def main() -> None:
    """Prints the functor source of the op named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=sorted(OPS))
    args = parser.parse_args()
    assert smoothed_max(0.0, 0.0) == 0.5 * jnp.logaddexp(0.0, 0.0)  # the zoo's reduce
    print(codegen.functor(OPS[args.op], np.float32).source)


if __name__ == "__main__":
    main()
