"""Flax NNX layers whose product is an ``Op``: ``Conv``, ``Linear`` and friends.

The implementation lives in ``jaxconv._src.layers.nnx``; this module re-exports its public names.
"""

from jaxconv._src.layers.nnx import Conv as Conv
from jaxconv._src.layers.nnx import ConvTranspose as ConvTranspose
from jaxconv._src.layers.nnx import Linear as Linear
from jaxconv._src.layers.nnx import MultiOpConv as MultiOpConv
from jaxconv._src.layers.summary import summary as summary

__all__ = (
    "Conv",
    "ConvTranspose",
    "Linear",
    "MultiOpConv",
    "summary",
)
