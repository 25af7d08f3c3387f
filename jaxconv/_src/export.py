"""Serving a jaxconv model through ``jax.export``.

On the XLA engine a jaxconv product lowers to plain StableHLO: the serialized artifact runs
wherever ``jax.export.deserialize`` does, without jaxconv. On the native CPU engine it is a
call of jaxconv's XLA FFI targets (``jaxconv_forward``, ``jaxconv_backward``,
``jaxconv_wide_forward``, ``jaxconv_wide_backward``, and under a gradient of a dense
max/min product ``jaxconv_forward_record`` and ``jaxconv_backward_recorded``; on bfloat16 /
float16 operands ``jaxconv_low_forward`` and, under a gradient of a max/min product,
``jaxconv_low_forward_record`` and ``jaxconv_low_backward_recorded``): JAX refuses
to serialize custom calls it does not know unless told (`export_disabled_checks`), and the
process that runs the artifact must have the targets registered, which ``import jaxconv``
does.
"""

from __future__ import annotations

import jax

# The FFI targets of the native engine (csrc/ffi.cc registers them under these names).
FFI_TARGETS = ("jaxconv_forward", "jaxconv_backward", "jaxconv_wide_forward",
               "jaxconv_wide_backward", "jaxconv_forward_record", "jaxconv_backward_recorded",
               "jaxconv_low_forward", "jaxconv_low_forward_record",
               "jaxconv_low_backward_recorded")


def export_disabled_checks() -> list[jax.export.DisabledSafetyCheck]:
    """The safety checks ``jax.export.export`` must skip to serialize the native engine's calls.

    JAX serializes only the custom calls whose compatibility it guarantees; jaxconv's native
    kernels are FFI calls of jaxconv's own, which stay compatible as long as the serving
    process runs the same jaxconv version (and imports it, which registers them). Pass this
    list as ``disabled_checks`` when exporting a function that runs products on the native
    engine; a function on the XLA engine needs none.

    Returns:
      One ``jax.export.DisabledSafetyCheck.custom_call`` per jaxconv FFI target.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxconv
      >>> def f(x, w):
      ...     return jaxconv.dot_general(x, w, (((1,), (0,)), ((), ())), op="max_plus",
      ...                                engine="native")
      >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
      >>> exported = jax.export.export(
      ...     jax.jit(f), disabled_checks=jaxconv.export_disabled_checks())(x, w)
      >>> exported.call(x, w).shape
      (2, 4)
    """
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in FFI_TARGETS]


def register_native_targets() -> bool:
    """Registers the native engine's FFI targets with XLA if its library loads (at import).

    A deserialized artifact that calls them then runs in any process that imported jaxconv,
    before any jaxconv function was called. Where the library cannot be loaded nothing is
    registered and nothing is said here (``engine="auto"`` warns at first use).

    Returns:
      Whether the targets are registered.
    """
    from jaxconv._src.engines.native import ffi  # noqa: PLC0415 - the compiled library

    if not ffi.available():
        return False
    ffi._register()  # noqa: SLF001 - the engine's own, idempotent registration
    return True
