"""The op's reduce as a collective (`jaxconv._src.core.collectives`) over 8 simulated CPU
devices, against the reduce over the gathered values: special values included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxconv
from jaxconv._src.core import algebra, collectives

INF, NAN = np.inf, np.nan
# Each row is spread over the 8 devices (one value each).
ROWS = np.array([
    [1.0, -2.0, 3.5, 0.25, -7.0, 3.5, 0.0, 2.0],           # a tie at the max
    [-INF] * 8,                                             # every term the identity
    [-INF, 1.0, -INF, -INF, 2.0, -INF, -INF, -INF],
    [0.0, -0.0, -0.0, 0.0, -1.0, -1.0, -2.0, -3.0],         # signed zeros win the max
    [-0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],              # ... and the min
    [1.0, NAN, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],               # NaN anywhere
    [INF, 1.0, -INF, 0.0, 0.0, 0.0, 0.0, 0.0],
    [800.0, 790.0, -800.0, 0.0, 1.0, 2.0, 3.0, 4.0],         # exp would overflow
], np.float32)


def _combined(which: str, values: np.ndarray) -> np.ndarray:
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("c",))
    f = jax.shard_map(lambda v: collectives.combine(which, v[0], ("c",)), mesh=mesh,
                      in_specs=P("c"), out_specs=P())
    return np.asarray(jax.jit(f)(jnp.asarray(values.T.copy())))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
@pytest.mark.parametrize("which", ["max", "min"])
def test_max_min_equal_the_gathered_reduce_bit_for_bit(which: str, dtype) -> None:
    rows = ROWS if dtype != np.int32 else np.nan_to_num(ROWS, posinf=9, neginf=-9)
    values = rows.astype(dtype)
    got = _combined(which, values)
    want = np.asarray((jnp.max if which == "max" else jnp.min)(jnp.asarray(values), axis=1))
    # jnp's reductions order -0 below +0 (lax.max); NaN wins (as the engines enforce).
    if dtype != np.int32:
        want = np.where(np.isnan(values).any(axis=1), np.nan, want).astype(dtype)
        np.testing.assert_array_equal(np.signbit(got) & ~np.isnan(got),
                                      np.signbit(want) & ~np.isnan(want))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


def test_logsumexp_is_stable_and_safe() -> None:
    got = _combined("logsumexp", ROWS)
    c = jnp.asarray(ROWS)
    want = np.asarray(algebra.reduce_last(jaxconv.ops.log, c, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] == -np.inf and np.isnan(got[5]) and got[6] == np.inf
    assert np.isfinite(got[7])


def test_sum() -> None:
    np.testing.assert_allclose(_combined("sum", np.nan_to_num(ROWS, posinf=0, neginf=0)),
                               np.nan_to_num(np.nan_to_num(ROWS, posinf=0, neginf=0)).sum(1),
                               rtol=1e-6)


@pytest.mark.parametrize(("op", "want"), [
    (jaxconv.ops.max_plus, "max"), (jaxconv.ops.min_max, "min"), (jaxconv.ops.adder, "sum"),
    (jaxconv.ops.log, "logsumexp"),
    # A callable reduce recognised as a built-in one takes its collective ...
    (jaxconv.Op(jnp.add, lambda a, b: jnp.maximum(a, b), identity=-np.inf), "max"),
    # ... one that is not (or prod) has none: the caller gathers.
    (jaxconv.Op(jnp.add, lambda a, b: jnp.where(jnp.abs(a) >= jnp.abs(b), a, b),
                identity=0.0), None),
    (jaxconv.Op(jnp.multiply, "prod"), None)])
def test_kind_follows_the_declared_reduce(op: jaxconv.Op, want: str | None) -> None:
    assert collectives.kind(op) == want
    # Not the name: the same reduce under another name gives the same collective.
    assert collectives.kind(op.replace(name="renamed")) == want
