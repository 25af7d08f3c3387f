"""Property tests (hypothesis): random geometries, layouts and ops against independent results.

- every built-in op equals the numpy loop reference (``tests/reference.py``) on random shapes,
  strides, both dilations, padding (strings, SAME_LOWER, explicit and negative), feature
  groups and fully random ``dimension_numbers``;
- ``ops.standard`` always equals ``lax.conv_general_dilated``, and so does a user
  ``Op(jnp.multiply)`` run by the generic engine;
- ``dot_general`` with any op equals a convolution with a 1x1 window.

Examples per test are bounded and derandomized (the same examples on every run), with no
deadline: each example compiles new programs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax import lax
from reference import NUMPY_OPS, conv_reference

import jaxconv

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
OPS = [n for n in NUMPY_OPS if n != "standard"]
MULTIPLY = jaxconv.Op(jnp.multiply, "sum", name="user_multiply")


def _dilated(size: int, d: int) -> int:
    return (size - 1) * d + 1 if size > 0 else 0


@st.composite
def problems(draw: Any, max_dims: int = 2) -> dict[str, Any]:
    """A random valid convolution problem: arrays, geometry and random layouts."""
    nsd = draw(st.integers(1, max_dims))
    groups = draw(st.integers(1, 2))
    ci = draw(st.integers(1, 2))
    og = draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    spatial = [draw(st.integers(1, 6 if nsd == 1 else 4)) for _ in range(nsd)]
    window = [draw(st.integers(1, 3)) for _ in range(nsd)]
    strides = [draw(st.integers(1, 2)) for _ in range(nsd)]
    rdil = [draw(st.integers(1, 2)) for _ in range(nsd)]
    ldil = [draw(st.sampled_from([1, 1, 2])) for _ in range(nsd)]
    if all(d == 1 for d in ldil) and draw(st.booleans()):
        padding: Any = draw(st.sampled_from(["VALID", "SAME", "SAME_LOWER"]))
        pads = lax.padtype_to_pads([_dilated(s, 1) for s in spatial],
                                   [_dilated(k, d) for k, d in zip(window, rdil, strict=True)],
                                   strides, padding)
    else:
        padding = tuple((draw(st.integers(-1, 2)), draw(st.integers(-1, 2)))
                        for _ in range(nsd))
        pads = padding
    for s, ld, k, rd, (lo, hi) in zip(spatial, ldil, window, rdil, pads, strict=True):
        din = _dilated(s, ld)
        assume(lo > -din and hi > -din)
        assume(din + lo + hi >= _dilated(k, rd))  # at least one output position
    sp = "HWD"[:nsd]
    lhs_spec = "".join(draw(st.permutations(["N", "C", *sp])))
    rhs_spec = "".join(draw(st.permutations(["O", "I", *sp])))
    out_spec = "".join(draw(st.permutations(["N", "C", *sp])))
    # lax orders the spatial dimensions (strides, padding, dilations) as the rhs spec does.
    sp_order = [c for c in rhs_spec if c in sp]
    sizes_l = {"N": n, "C": groups * ci, **dict(zip(sp_order, spatial, strict=True))}
    sizes_r = {"O": groups * og, "I": ci, **dict(zip(sp_order, window, strict=True))}
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal([sizes_l[c] for c in lhs_spec]).astype(np.float32)
    w = rng.standard_normal([sizes_r[c] for c in rhs_spec]).astype(np.float32)
    return dict(x=x, w=w, strides=tuple(strides), padding=padding,
                kw=dict(lhs_dilation=tuple(ldil), rhs_dilation=tuple(rdil),
                        dimension_numbers=(lhs_spec, rhs_spec, out_spec),
                        feature_group_count=groups))


def _jaxconv(p: dict[str, Any], op: Any) -> np.ndarray:
    f = jax.jit(lambda a, b: jaxconv.conv_general_dilated(a, b, p["strides"], p["padding"],
                                                          **p["kw"], op=op))
    return np.asarray(f(p["x"], p["w"]))


@settings(max_examples=30, **SETTINGS)
@given(p=problems(), name=st.sampled_from(OPS))
def test_ops_equal_numpy_reference(p: dict[str, Any], name: str) -> None:
    got = _jaxconv(p, name)
    ref = NUMPY_OPS[name]
    expect = conv_reference(p["x"], p["w"], p["strides"], p["padding"], **p["kw"],
                            combine=ref.combine, reduce=ref.reduce, identity=ref.identity,
                            pad_value=ref.pad_value)
    assert got.shape == expect.shape
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, **SETTINGS)
@given(p=problems(max_dims=3))
def test_standard_equals_lax(p: dict[str, Any]) -> None:
    expect = lax.conv_general_dilated(p["x"], p["w"], p["strides"], p["padding"], **p["kw"])
    got = jaxconv.conv_general_dilated(p["x"], p["w"], p["strides"], p["padding"], **p["kw"])
    np.testing.assert_array_equal(got, expect)


@settings(max_examples=30, **SETTINGS)
@given(p=problems())
def test_user_multiply_equals_lax(p: dict[str, Any]) -> None:
    expect = lax.conv_general_dilated(p["x"], p["w"], p["strides"], p["padding"], **p["kw"],
                                      precision=lax.Precision.HIGHEST)
    got = _jaxconv(p, MULTIPLY)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


@st.composite
def dot_problems(draw: Any) -> dict[str, Any]:
    """``dot_general`` operands with random batch / contracting dimension placement."""
    nb = draw(st.integers(0, 1))
    b = draw(st.integers(1, 3))
    m = draw(st.integers(1, 4))
    k = draw(st.integers(1, 5))
    nn = draw(st.integers(1, 4))
    lhs_roles = draw(st.permutations(["b", "m", "k"] if nb else ["m", "k"]))
    rhs_roles = draw(st.permutations(["b", "k", "n"] if nb else ["k", "n"]))
    sizes = {"b": b, "m": m, "k": k, "n": nn}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    lhs = rng.standard_normal([sizes[r] for r in lhs_roles]).astype(np.float32)
    rhs = rng.standard_normal([sizes[r] for r in rhs_roles]).astype(np.float32)
    dn = (((lhs_roles.index("k"),), (rhs_roles.index("k"),)),
          ((lhs_roles.index("b"),), (rhs_roles.index("b"),)) if nb else ((), ()))
    return dict(lhs=lhs, rhs=rhs, dn=dn, lhs_roles=lhs_roles, rhs_roles=rhs_roles, nb=nb)


@settings(max_examples=25, **SETTINGS)
@given(p=dot_problems(), name=st.sampled_from([*OPS, "standard"]))
def test_dot_general_equals_one_by_one_conv(p: dict[str, Any], name: str) -> None:
    got = jax.jit(lambda a, b: jaxconv.dot_general(a, b, p["dn"], op=name))(p["lhs"], p["rhs"])
    # Canonical (B, M, K) and (B, K, N), then a 1-D conv with a window of 1: M is the spatial
    # axis, K the input channels, N the output channels.
    order_l = [p["lhs_roles"].index(r) for r in (["b"] if p["nb"] else []) + ["m", "k"]]
    order_r = [p["rhs_roles"].index(r) for r in (["b"] if p["nb"] else []) + ["k", "n"]]
    a3 = np.transpose(p["lhs"], order_l)
    a3 = a3.reshape(-1, *a3.shape[-2:])
    r3 = np.transpose(p["rhs"], order_r)
    r3 = r3.reshape(-1, *r3.shape[-2:])

    def one(a: jax.Array, r: jax.Array) -> jax.Array:
        return jaxconv.conv_general_dilated(a[None], r[None], (1,), "VALID",
                                            dimension_numbers=("NWC", "WIO", "NWC"),
                                            op=name)[0]

    expect = jax.jit(jax.vmap(one))(a3, r3)
    expect = np.asarray(expect).reshape(np.shape(got))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_fuzz_driver_runs_one_example() -> None:
    """``tests/fuzz.py`` (run by hand, not in CI) still draws and checks an example: seed 43
    is a small float32 user max convolution with NaN and infinities, forward on both engines
    against the numpy loops."""
    import fuzz
    import jax.numpy as jnp

    ex = fuzz.Example(43, fuzz._specs(jnp, jaxconv), x64=False, transform=None)
    assert (ex.transform, ex.dtype, ex.data, ex.spec.name) == (
        "forward", "float32", "specials", "u_sub_max")
    ex.run()
