"""The embedded broadcast of a user combine (``native/bcast.py``, ``csrc/kernel_bcast_user.h``).

Which node of a traced combine reads ``x`` and in which instruction form (a covering set of
programs: each form, ``x`` read twice, an operation with no form); the generated source
declares it; and the compiled forward gives the same bits with the broadcast (``bcast=1``) as
without (``bcast=0``) for each form, the numpy loop reference's numbers, and on a dense
product the XLA engine's gradients (the recording forward and the backward's rescan use it).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from geometries import GEOMETRIES, conv, data, loop_reference
from native_checks import assert_gradients_match_xla

import jaxconv
from jaxconv import _native
from jaxconv._src.core import scalar_program as sp
from jaxconv._src.engines import native
from jaxconv._src.engines.native import bcast, codegen

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

F32 = np.float32
INF = math.inf


@pytest.mark.parametrize("fn, add_ports, want", [
    (lambda x, w: x * w, False, 5),
    (lambda x, w: (x + w) * w, False, 1),
    (lambda x, w: (w + x) * w, True, 2),
    (lambda x, w: jnp.minimum(x - w, 2.0 * w), False, 3),
    (lambda x, w: jnp.maximum(w * w - x, w), False, 4),
    (lambda x, w: x * jnp.exp(x - w), False, None),   # x read twice
    (lambda x, w: x * x * w, False, None),            # x read twice by one node
    (lambda x, w: jnp.maximum(x, w) * w, False, None),  # no broadcast form of max
    (lambda x, w: jnp.tanh(x) * w, False, None),      # x read by a unary map
])
def test_the_node_reading_x(fn, add_ports, want):
    found = bcast.form(sp.combine_program(fn, F32), add_ports)
    assert (None if found is None else found[0]) == want


# name: (op, numpy combine, numpy reduce, identity); one per broadcast form under max / min.
OPS = {
    "mul_max": (jaxconv.Op(lambda x, w: x * w, "max"), np.multiply, np.maximum, -INF),
    "add_mul_min": (jaxconv.Op(lambda x, w: (x + w) * w, "min"), lambda x, w: (x + w) * w,
                    np.minimum, INF),
    "sub_min_max": (jaxconv.Op(lambda x, w: jnp.minimum(x - w, 2.0 * w), "max"),
                    lambda x, w: np.minimum(x - w, 2 * w), np.maximum, -INF),
    "rsub_max_min": (jaxconv.Op(lambda x, w: jnp.maximum(w * w - x, w), "min"),
                     lambda x, w: np.maximum(w * w - x, w), np.minimum, INF),
}


@pytest.mark.parametrize("name, geometry", [("mul_max", "channels_80"),
                                            ("add_mul_min", "2d_same"),
                                            ("sub_min_max", "channels_80"),
                                            ("rsub_max_min", "2d_stride_rhs_dil")])
def test_broadcast_gives_the_same_bits(name, geometry):
    op, combine, reduce, identity = OPS[name]
    assert bcast.SPECIALIZATION in codegen.functor(op).source
    x, w, kw = data(GEOMETRIES[geometry], seed=8, ties=name != "mul_max")
    f = conv(op, "native", kw)
    before = dict(_native.params())
    try:
        runs = []
        for on in (0, 1):
            _native.set_params(dict(before, bcast=on))
            runs.append(np.asarray(f(x, w)))
    finally:
        _native.set_params(before)
    assert runs[0].tobytes() == runs[1].tobytes()  # signed zeros of ties included
    ref = loop_reference(x, w, kw, combine, reduce, identity, None)
    np.testing.assert_allclose(runs[1], ref, rtol=1e-6, atol=1e-6)


def test_dense_gradient_with_the_broadcast():
    op = OPS["mul_max"][0]
    x, w, kw = data(GEOMETRIES["dense"], seed=9)
    assert_gradients_match_xla(op, kw, x, w, seed=10)
