"""Bit-packed XNOR inference: packing, popcount products and packed NNX layers.

The implementation lives in ``jaxconv._src.layers.packed``; this module re-exports its public names.
"""

from jaxconv._src.layers.packed import PackedConv as PackedConv
from jaxconv._src.layers.packed import PackedKernel as PackedKernel
from jaxconv._src.layers.packed import PackedLinear as PackedLinear
from jaxconv._src.layers.packed import pack_kernel as pack_kernel
from jaxconv._src.layers.packed import pack_model as pack_model
from jaxconv._src.layers.packed import pack_signs as pack_signs
from jaxconv._src.layers.packed import packed_conv as packed_conv
from jaxconv._src.layers.packed import packed_dense as packed_dense
from jaxconv._src.layers.packed import packed_size as packed_size
from jaxconv._src.layers.packed import unpack_signs as unpack_signs

__all__ = (
    "PackedConv",
    "PackedKernel",
    "PackedLinear",
    "pack_kernel",
    "pack_model",
    "pack_signs",
    "packed_conv",
    "packed_dense",
    "packed_size",
    "unpack_signs",
)
