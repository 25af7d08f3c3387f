"""jaxconv: convolutions and dense layers whose product is yours.

Replace the multiply of a convolution or a dense layer with any elementwise ``combine`` and
the sum with any associative ``reduce``; ``jit``, ``grad``, ``vmap`` and sharding work as
with ``lax``.
"""

from jaxconv import linen as linen
from jaxconv import nnx as nnx
from jaxconv import ops as ops
from jaxconv import packed as packed
from jaxconv._src.algebra import Op as Op
from jaxconv._src.conv import conv_general_dilated as conv_general_dilated
from jaxconv._src.conv import dot_general as dot_general
from jaxconv._src.einsum import einsum as einsum
from jaxconv._src.kernel_ops import sharpened_cosine_conv as sharpened_cosine_conv
from jaxconv._src.mixed import conv_multi as conv_multi
from jaxconv._src.transpose import conv_transpose as conv_transpose
from jaxconv._src.wrappers import conv as conv
from jaxconv._src.wrappers import dense as dense

__version__ = "0.1.0"

__all__ = (
    "Op", "conv", "conv_general_dilated", "conv_multi", "conv_transpose", "dense",
    "dot_general", "einsum",
    "linen", "nnx", "ops", "packed",
    "sharpened_cosine_conv", "__version__",
)
