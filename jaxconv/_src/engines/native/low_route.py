"""Which route a bfloat16 / float16 call takes on the native engine: ``JAXCONV_NATIVE_LOW``.

Every route gives the same bits (the tests compare them); the variable selects the earlier ones
to compare against and to time (``benchmarks/low_own.py``). It is read when a call is traced,
so a function already traced under `jax.jit` keeps the route it was traced with.

- ``record`` (the default): the forward converts inside the call
  (``csrc/kernel_bf16fuse_low.h``), and a max / min op (built-in, or a user op whose
  products the forward and the wide kernels compute alike) under a derivative records its
  winners' blocks and runs its backward in one call on the low operands
  (``csrc/kernel_lowrec_mark.h``, ``csrc/kernel_lowrec_backward.h``);
- ``call``: the forward converts inside the call, no record: the backward runs on float32
  copies made next to its call, every window scanned;
- ``convert``: XLA's conversions around the float32 forward call, and that backward.

A library built without an entry falls back to the next route whatever the variable says.

Example:
    >>> low_route() in ROUTES
    True
    >>> with chosen("convert"):
    ...     low_route()
    'convert'
"""

from __future__ import annotations

from typing import Literal

from jaxconv._src.engines.native.env_choice import EnvChoice

ENV_LOW = "JAXCONV_NATIVE_LOW"
LowRoute = Literal["record", "call", "convert"]
ROUTES: tuple[LowRoute, ...] = ("record", "call", "convert")
_CHOICE: EnvChoice[LowRoute] = EnvChoice(ENV_LOW, ROUTES)

# The route the variable selects (`EnvChoice.read`: the default for an unset or empty value, a
# ValueError naming the variable for an unknown one), and the variable set for the calls
# traced inside a block (`EnvChoice.chosen`).
low_route = _CHOICE.read
chosen = _CHOICE.chosen
