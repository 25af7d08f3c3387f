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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

ENV_L2 = "JAXCONV_NATIVE_L2"
L2Route = Literal["products", "native"]
ROUTES: tuple[L2Route, ...] = ("native", "products")


def l2_route() -> L2Route:
    """``JAXCONV_NATIVE_L2``: ``"native"`` (default, also for an empty value) or
    ``"products"``.

    Returns:
        The route the variable selects.

    Raises:
        ValueError: for any other value, naming the variable.
    """
    raw = os.environ.get(ENV_L2, "")
    route = raw.strip().lower() or "native"
    for known in ROUTES:
        if route == known:
            return known
    raise ValueError(f"{ENV_L2} must be one of {', '.join(ROUTES)}, got {raw!r}.")


@contextlib.contextmanager
def chosen(route: L2Route) -> Iterator[None]:
    """``JAXCONV_NATIVE_L2=route`` inside the block (for the calls traced there), the variable
    as it was (or unset) after it: how the tests and benchmarks compile both routes.

    Args:
        route: ``"products"`` or ``"native"``.

    Yields:
        Nothing.

    Raises:
        ValueError: for another route.

    Example:
        >>> with chosen("products"):
        ...     l2_route()
        'products'
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}.")
    keep = os.environ.get(ENV_L2)
    os.environ[ENV_L2] = route
    try:
        yield
    finally:
        if keep is None:
            del os.environ[ENV_L2]
        else:
            os.environ[ENV_L2] = keep
