"""Which route l2_exact's float32 gradients take on the native engine: ``JAXCONV_NATIVE_L2``.

- ``native`` (the default): the sums' backward kernel (``csrc/kernel_sums_paired.h``,
  ``csrc/kernel_sumbwd_dense.h``): each term's ``2 g (x - w)`` feeds both gradients in one
  pass over the terms, no cancellation, on the engine's threads;
- ``products``: standard products on operands centred per input channel
  (``engine._centred``): x times the cotangent's sums less the standard gradients, two
  convolutions (or dots) that XLA runs at its GEMM speed.

Why the default: per term both routes issue two fused multiply-adds (one per gradient), and
XLA's products reach nearer the FMA peak on one thread (Zen 4, one thread, CPU time, f+b less
forward: layer A 12.3 ms against 16.6, layer E 6.8 against 13.2), but XLA's convolution runs on
one thread on CPU while the kernel runs on every thread of the call: with two threads (Zen 4,
forward+backward against lax's, interleaved) layer A takes 0.66x with the kernel and 1.34x
with the products, layer E 0.85x and 1.11x. A job pinned to one thread may set ``products``.
Both routes are tested against the float64 rule (``tests/test_native_sumbwd.py``); their bits
differ.

The variable is read when a call is traced, so a function already traced under `jax.jit`
keeps the route it was traced with (and eager calls of one problem keep their first trace's):
compare the routes by jitting a new function under each (`chosen`).

Example:
    >>> l2_route() in ROUTES
    True
    >>> with chosen("products"):
    ...     l2_route()
    'products'
"""

from __future__ import annotations

from typing import Literal

from jaxconv._src.engines.native.env_choice import EnvChoice

ENV_L2 = "JAXCONV_NATIVE_L2"
L2Route = Literal["products", "native"]
ROUTES: tuple[L2Route, ...] = ("native", "products")
_CHOICE: EnvChoice[L2Route] = EnvChoice(ENV_L2, ROUTES)

# The route the variable selects (`EnvChoice.read`: the default for an unset or empty value, a
# ValueError naming the variable for an unknown one), and the variable set for the calls
# traced inside a block (`EnvChoice.chosen`).
l2_route = _CHOICE.read
chosen = _CHOICE.chosen
