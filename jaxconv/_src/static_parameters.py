"""Checks of static parameters: numbers given as Python values, fixed at trace time.

A leaf module (it imports no other part of jaxconv), so that the quantizers, which the
core's built-in ops use, and the optax helpers share one check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def static_number(name: str, value: Any, where: str) -> float:
    """A static real parameter (a Python or NumPy number, not a bool, not NaN) as a float.

    Args:
      name: the argument's name, for the errors.
      value: the value given.
      where: the function's name, for the errors.

    Returns:
      ``float(value)``.

    Raises:
      TypeError: not a real number (a bool, a string or an array is refused).
      ValueError: NaN.

    Example:
      >>> static_number("beta", 5, "swish_sign")
      5.0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"`{where}`: `{name}` must be a Python number (a static parameter), "
            f"got {value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"`{where}`: `{name}` must not be NaN, got {value}.")
    return value
