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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

ENV_LOW = "JAXCONV_NATIVE_LOW"
LowRoute = Literal["record", "call", "convert"]
ROUTES: tuple[LowRoute, ...] = ("record", "call", "convert")


def low_route() -> LowRoute:
    """``JAXCONV_NATIVE_LOW``: ``"record"`` (default, also for an empty value), ``"call"`` or
    ``"convert"``.

    Returns:
        The route the variable selects.

    Raises:
        ValueError: for any other value, naming the variable.
    """
    raw = os.environ.get(ENV_LOW, "")
    route = raw.strip().lower() or "record"
    for known in ROUTES:
        if route == known:
            return known
    raise ValueError(f"{ENV_LOW} must be one of {', '.join(ROUTES)}, got {raw!r}.")


@contextlib.contextmanager
def chosen(route: LowRoute) -> Iterator[None]:
    """``JAXCONV_NATIVE_LOW=route`` inside the block (for the calls traced there), the variable
    as it was (or unset) after it: how the benchmarks and tests compile the routes side by
    side.

    Args:
        route: ``"record"``, ``"call"`` or ``"convert"``.

    Yields:
        Nothing.

    Raises:
        ValueError: for another route.

    Example:
        >>> with chosen("convert"):
        ...     low_route()
        'convert'
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}.")
    keep = os.environ.get(ENV_LOW)
    os.environ[ENV_LOW] = route
    try:
        yield
    finally:
        if keep is None:
            del os.environ[ENV_LOW]
        else:
            os.environ[ENV_LOW] = keep
