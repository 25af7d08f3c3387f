"""``jaxconv.conv`` / ``jaxconv.dense``: Flax's argument names, checked against lax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv


def test_conv_uses_flax_names_and_equals_lax() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 2, 6)), jnp.float32)
    got = jaxconv.conv(x, w, (2, 1), "SAME", input_dilation=1, kernel_dilation=(2, 1),
                       feature_group_count=2)
    ref = jax.lax.conv_general_dilated(x, w, (2, 1), "SAME", rhs_dilation=(2, 1),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=2)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    user = jaxconv.Op(jnp.multiply, "sum", name="mul")
    got = jaxconv.conv(x, w, (2, 1), "SAME", kernel_dilation=(2, 1), feature_group_count=2,
                       op=user)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("old,new", [("dilation", "kernel_dilation"),
                                     ("groups", "feature_group_count"),
                                     ("rhs_dilation", "kernel_dilation"),
                                     ("lhs_dilation", "input_dilation")])
def test_conv_refuses_other_names(old: str, new: str) -> None:
    x, w = jnp.ones((1, 5, 2)), jnp.ones((3, 2, 2))
    with pytest.raises(TypeError, match=rf"takes `{new}=` \(the lax / Flax name\), not `{old}=`"):
        jaxconv.conv(x, w, **{old: 1})
    with pytest.raises(TypeError, match=r"unexpected keyword argument `bogus`"):
        jaxconv.conv(x, w, bogus=1)
