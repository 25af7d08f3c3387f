"""jaxconv: convolutions and dense layers whose product is yours.

Replace the multiply of a convolution or a dense layer with any elementwise ``combine`` and
the sum with any associative ``reduce``; ``jit``, ``grad``, ``vmap`` and sharding work as
with ``lax``.
"""

import importlib
from typing import Any

from jaxconv import ops as ops
from jaxconv import quantizers as quantizers
from jaxconv._src import engines as _engines  # noqa: F401 - the engines register themselves
from jaxconv._src.conv import conv_general_dilated as conv_general_dilated
from jaxconv._src.conv import dot_general as dot_general
from jaxconv._src.core.algebra import Op as Op
from jaxconv._src.core.planner import explain as explain
from jaxconv._src.einsum import einsum as einsum
from jaxconv._src.export import export_disabled_checks as export_disabled_checks
from jaxconv._src.export import register_native_targets as _register_native_targets
from jaxconv._src.kernel_ops import sharpened_cosine_conv as sharpened_cosine_conv
from jaxconv._src.mixed import conv_multi as conv_multi
from jaxconv._src.prebuild import compile_kernels as compile_kernels
from jaxconv._src.transpose import conv_transpose as conv_transpose
from jaxconv._src.version import __version__ as __version__
from jaxconv._src.wrappers import conv as conv
from jaxconv._src.wrappers import dense as dense

# A deserialized `jax.export` artifact that calls the native kernels runs in any process that
# imported jaxconv: its FFI targets are registered here, not at the first product.
_register_native_targets()

# Submodules that import Flax, optax or orbax load on first use, so that ``import jaxconv``
# stays light; each is an attribute of the package all the same (PEP 562).
_LAZY_SUBMODULES = ("checkpoint", "linen", "nnx", "optim", "packed")


def __getattr__(name: str) -> Any:
    """Imports a lazy submodule on first use (PEP 562)."""
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"jaxconv.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jaxconv' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's names, the lazy submodules included."""
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__all__ = (
    "Op", "compile_kernels", "conv", "conv_general_dilated", "conv_multi", "conv_transpose",
    "dense", "dot_general", "einsum", "explain", "export_disabled_checks",
    "checkpoint", "linen", "nnx", "ops", "optim", "packed", "quantizers",
    "sharpened_cosine_conv", "__version__",
)
