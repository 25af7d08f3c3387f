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
from jaxconv._src.kernel_ops import sharpened_cosine_conv as sharpened_cosine_conv
from jaxconv._src.mixed import conv_multi as conv_multi
from jaxconv._src.transpose import conv_transpose as conv_transpose
from jaxconv._src.wrappers import conv as conv
from jaxconv._src.wrappers import dense as dense

__version__ = "0.1.0"

# Submodules that import Flax, optax or orbax load on first use, so that ``import jaxconv``
# stays light; each is an attribute of the package all the same (PEP 562).
_LAZY_SUBMODULES = ("checkpoint", "linen", "nnx", "optim", "packed")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"jaxconv.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jaxconv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__all__ = (
    "Op", "conv", "conv_general_dilated", "conv_multi", "conv_transpose", "dense",
    "dot_general", "einsum", "explain",
    "checkpoint", "linen", "nnx", "ops", "optim", "packed", "quantizers",
    "sharpened_cosine_conv", "__version__",
)
