"""The keyed max_min / min_max forward checks x while it copies x's integer keys
(csrc/kernel_afwd_keys.h): a NaN anywhere in x (a full vector of the first or a later copy
chunk, the scalar tail) or in w must still send the call to the NaN-propagating loop, and finite
data must give the XLA engine's bits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from geometries import conv, dn

# x (1, 23, 23, 125): 66125 floats, more than one 65536-float copy chunk, 13 in the tail.
X_SHAPE, W_SHAPE = (1, 23, 23, 125), (3, 3, 125, 8)
KW = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=dn(4))


@pytest.mark.parametrize("name,where", [("max_min", "w"), ("min_max", "tail"),
                                        ("max_min", "second_chunk"), ("min_max", "finite")])
def test_keyed_forward_sees_every_nan(name, where):
    rng = np.random.default_rng(3)
    x = rng.normal(size=X_SHAPE).astype(np.float32)
    w = rng.normal(size=W_SHAPE).astype(np.float32)
    if where == "w":
        w[1, 1, 7, 3] = np.nan
    elif where == "tail":
        x.reshape(-1)[-1] = np.nan
    elif where == "second_chunk":
        x.reshape(-1)[65536 + 100] = np.nan
    y = np.asarray(conv(name, "native", KW)(x, w))
    with jax.numpy_rank_promotion("allow"):
        ref = np.asarray(conv(name, "xla", KW)(x, w))
    assert np.isnan(ref).any() == (where != "finite")
    np.testing.assert_array_equal(y, ref)
