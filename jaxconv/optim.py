"""optax helpers: AdderNet's adaptive gradient scale and latent-weight clipping.

The implementation lives in ``jaxconv._src.optim``; this module re-exports its public names.
"""

from jaxconv._src.optim import KernelMask as KernelMask
from jaxconv._src.optim import adder_scale as adder_scale
from jaxconv._src.optim import clip_latent_weights as clip_latent_weights
from jaxconv._src.optim import kernel_mask as kernel_mask
from jaxconv._src.optim import weight_clip as weight_clip

__all__ = (
    "KernelMask",
    "adder_scale",
    "clip_latent_weights",
    "kernel_mask",
    "weight_clip",
)
