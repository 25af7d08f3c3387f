"""optax helpers: AdderNet's adaptive gradient scale and latent-weight clipping.

The implementation lives in ``jaxconv._src.optim``; this module re-exports its public names.
"""

from jaxconv._src.optim import adder_scale as adder_scale
from jaxconv._src.optim import clip_latent_weights as clip_latent_weights

__all__ = (
    "adder_scale",
    "clip_latent_weights",
)
