"""larq's quantizers with their straight-through gradients (``sign(0) = +1``).

The implementation lives in ``jaxconv._src.quantizers``; this module re-exports its public names.
"""

from jaxconv._src.quantizers import Quantizer as Quantizer
from jaxconv._src.quantizers import approx_sign as approx_sign
from jaxconv._src.quantizers import get as get
from jaxconv._src.quantizers import magnitude_aware_sign as magnitude_aware_sign
from jaxconv._src.quantizers import sign as sign
from jaxconv._src.quantizers import ste_heaviside as ste_heaviside
from jaxconv._src.quantizers import ste_sign as ste_sign
from jaxconv._src.quantizers import ste_tern as ste_tern
from jaxconv._src.quantizers import swish_sign as swish_sign

__all__ = (
    "Quantizer",
    "approx_sign",
    "get",
    "magnitude_aware_sign",
    "sign",
    "ste_heaviside",
    "ste_sign",
    "ste_tern",
    "swish_sign",
)
