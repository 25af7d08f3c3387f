"""Checks of a user op on the native engine, shared by the user-kernel and fold tests.

The tests of compiled user combines (tests/test_user_kernels.py) and of compiled callable folds
(tests/test_user_folds.py) ask the same questions over different op tables: does the native
engine give the numpy loop reference's and the XLA engine's numbers, the XLA engine's NaN and
infinities, the XLA engine's gradients, and gradients that agree with finite differences of
the reference? Each question is one function here; the tables and the parametrizations stay
in the test modules.

Example:
    >>> x, w, kw = data(GEOMETRIES["2d_same"])
    >>> got, xla = assert_matches_reference_and_xla(op, kw, x, w, np.add, np.maximum, -np.inf)
    >>> assert_gradients_match_xla(op, kw, x, w, seed=5)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import numpy as np
from geometries import assert_grads_match_xla, conv, loop_reference

from jaxconv._src.core import differentiation


def recorded_equals_rescan(fn: Callable, *args: Any) -> tuple[Any, ...]:
    """``fn(*args)`` (a tuple of arrays, jitted) is the same bit for bit with the recording
    forward and with recording off (the backward rescanning every window).

    Args:
        fn: a function of ``args`` that differentiates a native call (e.g. returns y, dx, dw).
        *args: its arguments.

    Returns:
        The recorded run's results.
    """
    # A new function object for each jit: the same one would reuse the first trace.
    got = jax.jit(lambda *a: fn(*a))(*args)
    with mock.patch.object(differentiation, "_records", lambda problem: False):
        want = jax.jit(lambda *a: fn(*a))(*args)
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(a.view(np.dtype(f"i{a.itemsize}")),
                                      b.view(np.dtype(f"i{b.itemsize}")))
    return got


def _xla(op: Any, kw: dict[str, Any], x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The XLA engine's convolution (written for rank promotion "allow", not "raise")."""
    with jax.numpy_rank_promotion("allow"):
        return np.asarray(conv(op, "xla", kw)(x, w))


def assert_matches_reference_and_xla(op: Any, kw: dict[str, Any], x: np.ndarray,
                                     w: np.ndarray, combine: Callable, reduce: Callable,
                                     identity: float, tol: float = 2e-5
                                     ) -> tuple[np.ndarray, np.ndarray]:
    """The native convolution equals the numpy loop reference and the XLA engine to ``tol``.

    Args:
        op: the ``jaxconv.Op`` under test.
        kw: the convolution's kwargs (``geometries.data``'s third value).
        x: the input.
        w: the kernel.
        combine: the numpy formula of the op's combine.
        reduce: the numpy formula of its reduce (a ufunc or a binary callable).
        identity: the reduce's identity.
        tol: relative and absolute tolerance of both comparisons.

    Returns:
        The native engine's and the XLA engine's outputs, for stricter checks by the caller.
    """
    got = np.asarray(conv(op, "native", kw)(x, w))
    ref = loop_reference(x, w, kw, combine, reduce, identity, op.pad_value)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    xla = _xla(op, kw, x, w)
    np.testing.assert_allclose(got, xla, rtol=tol, atol=tol)
    return got, xla


def assert_specials_as_xla(op: Any, kw: dict[str, Any], x: np.ndarray, w: np.ndarray) -> None:
    """The native convolution puts NaN where the XLA engine does and equals it elsewhere.

    Args:
        op: the ``jaxconv.Op`` under test.
        kw: the convolution's kwargs.
        x: the input, with NaN and infinities (``geometries.data(..., specials=True)``).
        w: the kernel.
    """
    got = np.asarray(conv(op, "native", kw)(x, w))
    want = _xla(op, kw, x, w)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def assert_gradients_match_xla(op: Any, kw: dict[str, Any], x: np.ndarray, w: np.ndarray,
                               seed: int) -> None:
    """The native gradients of ``sum(conv(x, w) * ct)`` equal the XLA engine's.

    Args:
        op: the ``jaxconv.Op`` under test.
        kw: the convolution's kwargs.
        x: the input.
        w: the kernel.
        seed: the seed of the standard normal cotangent ``ct``.
    """
    with jax.numpy_rank_promotion("allow"):
        shape = jax.eval_shape(conv(op, "xla", kw), x, w).shape
    ct = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert_grads_match_xla(op, kw, x, w, ct)


def assert_gradients_match_finite_differences(
        loss: Callable[[np.ndarray, np.ndarray], float], x: np.ndarray, w: np.ndarray,
        grads: tuple[Any, Any], eps: float, seed: int, points: int = 4) -> None:
    """Central differences of ``loss`` at a few random entries of x and w equal ``grads``.

    Args:
        loss: the scalar loss in float64 numpy (usually the loop reference times a cotangent).
        x: the input at which to differentiate (float64).
        w: the kernel at which to differentiate (float64).
        grads: the gradients under test, of x and of w.
        eps: the step.
        seed: the seed that picks the entries.
        points: how many entries of each operand.
    """
    rng = np.random.default_rng(seed)
    for arr, grad, which in ((x, grads[0], 0), (w, grads[1], 1)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(points)]:
            e = np.zeros_like(arr)
            e[idx] = eps
            plus = (x + e, w) if which == 0 else (x, w + e)
            minus = (x - e, w) if which == 0 else (x, w - e)
            fd = (loss(*plus) - loss(*minus)) / (2 * eps)
            np.testing.assert_allclose(float(np.asarray(grad)[idx]), fd, rtol=1e-3, atol=1e-4)
