"""Flax Linen layers whose product is an ``Op``: ``Conv``, ``Dense``, ``ConvTranspose``.

The implementation lives in ``jaxconv._src.layers.linen``; this module re-exports its public names.
"""

from jaxconv._src.layers.linen import Conv as Conv
from jaxconv._src.layers.linen import ConvTranspose as ConvTranspose
from jaxconv._src.layers.linen import Dense as Dense

__all__ = (
    "Conv",
    "ConvTranspose",
    "Dense",
)
