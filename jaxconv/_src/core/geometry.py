"""The static geometry of a canonical convolution, shared by every engine.

Inside the engines ``x`` is ``(N, *spatial, C)`` and ``w`` is ``(*window, I, O)`` with
``C = G * I`` and ``O = G * Og`` for ``G`` feature groups; a dense product is the same
problem with no spatial dimensions and one tap.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static description of a canonical convolution (hashable, a jit-static value)."""

    in_spatial: tuple[int, ...]
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    groups: int

    @property
    def padded_spatial(self) -> tuple[int, ...]:
        """The input's spatial extents after ``lhs_dilation`` and padding."""
        return tuple(
            (s - 1) * d + 1 + lo + hi if s > 0 else lo + hi
            for s, d, (lo, hi) in zip(
                self.in_spatial, self.lhs_dilation, self.padding, strict=True)
        )

    @property
    def out_spatial(self) -> tuple[int, ...]:
        """The output's spatial extents (as ``lax.conv_general_dilated``'s)."""
        return tuple(
            max(0, (p - (k - 1) * d - 1) // s + 1)
            for p, k, d, s in zip(
                self.padded_spatial, self.window, self.rhs_dilation, self.strides, strict=True)
        )

    @property
    def pad_config(self) -> list[tuple[int, int, int]]:
        """``lax.pad`` configuration for ``(N, *spatial, C)``."""
        cfg = [(lo, hi, d - 1)
               for (lo, hi), d in zip(self.padding, self.lhs_dilation, strict=True)]
        return [(0, 0, 0), *cfg, (0, 0, 0)]

    def taps(self) -> list[tuple[int, ...]]:
        """The window's taps, as index tuples in row-major order.

        Returns:
          ``[(0, .., 0), ..., (k0 - 1, .., kd - 1)]``.

        Example:
          >>> Geometry((4,), (2,), (1,), ((0, 0),), (1,), (1,), 1).taps()
          [(0,), (1,)]
        """
        return list(itertools.product(*(range(k) for k in self.window)))

    def valid_mask(self) -> np.ndarray | None:
        """Boolean ``padded_spatial`` array: True where a real input cell sits."""
        if all(lo == 0 and hi == 0 for lo, hi in self.padding) and all(
            d == 1 for d in self.lhs_dilation
        ):
            return None
        m = np.ones(self.in_spatial, bool)
        for axis, ((lo, hi), d) in enumerate(zip(self.padding, self.lhs_dilation, strict=True)):
            n = m.shape[axis]
            dil_shape = list(m.shape)
            dil_shape[axis] = (n - 1) * d + 1 if n > 0 else 0
            dm = np.zeros(dil_shape, bool)
            idx = [slice(None)] * m.ndim
            idx[axis] = slice(None, None, d)
            dm[tuple(idx)] = m
            # Negative padding crops.
            if lo < 0:
                dm = np.take(dm, range(-lo, dm.shape[axis]), axis=axis)
            if hi < 0:
                dm = np.take(dm, range(0, dm.shape[axis] + hi), axis=axis)
            widths = [(0, 0)] * m.ndim
            widths[axis] = (max(lo, 0), max(hi, 0))
            m = np.pad(dm, widths, constant_values=False)
        return m

    def tap_mask(self, mask: np.ndarray | None, tap: tuple[int, ...]) -> np.ndarray | None:
        """The mask of one tap over the output positions (``None``: all valid).

        Args:
            mask: the padded input's validity mask, or ``None``.
            tap: the tap's index in the window.

        Returns:
            The tap's mask of shape ``out_spatial``, or ``None``.
        """
        if mask is None:
            return None
        idx = tuple(
            slice(k * d, k * d + (o - 1) * s + 1, s)
            for k, d, o, s in zip(
                tap, self.rhs_dilation, self.out_spatial, self.strides, strict=True)
        )
        return mask[idx]

    def empty_windows(self) -> np.ndarray | None:
        """Boolean ``out_spatial`` array: True where no tap reads a real input cell (the
        output is the reduce's identity under identity padding); ``None`` when there is none.
        """
        mask = self.valid_mask()
        if mask is None:
            return None
        empty = np.ones(self.out_spatial, bool)
        for tap in self.taps():
            empty &= ~self.tap_mask(mask, tap)
        return empty if empty.any() else None
