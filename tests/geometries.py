"""Convolution geometries and helpers shared by the native engine's tests.

``GEOMETRIES`` holds every geometry once, under a name of its own; a test module takes the
ones it covers with ``table`` (under the names its parametrizations use). ``data``, ``conv``,
``grads`` and ``loop_reference`` are the operands, the jitted convolution, its gradients and the
numpy loop reference of one of them.

Example:
    >>> CASES = table("2d_same", ("stride", "2d_stride_rhs_dil"))
    >>> x, w, kw = data(CASES["stride"], seed=1)
    >>> y = conv("max_plus", "native", kw)(x, w)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from reference import conv_reference

import jaxconv

Geometry = tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]

# name -> (x shape, w shape, conv kwargs); channels last (N...C / ...IO) unless the kwargs give
# dimension_numbers.
GEOMETRIES: dict[str, Geometry] = {
    "2d_same": ((2, 6, 5, 3), (3, 3, 3, 4), dict(window_strides=(1, 1), padding="SAME")),
    "2d_stride_rhs_dil": ((2, 9, 8, 3), (3, 2, 3, 5), dict(
        window_strides=(2, 1), padding=((1, 2), (2, 0)), rhs_dilation=(1, 2))),
    "2d_lhs_dil": ((1, 5, 6, 2), (2, 3, 2, 3), dict(
        window_strides=(1, 2), padding=((1, 1), (0, 2)), lhs_dilation=(2, 1))),
    "2d_negative_pad": ((2, 7, 7, 2), (3, 3, 2, 3), dict(
        window_strides=(1, 1), padding=((-1, 1), (1, -2)))),
    "1d_valid": ((2, 11, 3), (4, 3, 5), dict(window_strides=(2,), padding="VALID")),
    "1d_stride": ((2, 11, 3), (4, 3, 5), dict(window_strides=(2,), padding=((1, 2),))),
    "3d": ((1, 4, 5, 4, 2), (2, 3, 2, 2, 3), dict(
        window_strides=(1, 1, 2), padding="SAME", rhs_dilation=(1, 1, 2))),
    "3d_no_dil": ((1, 4, 5, 4, 2), (2, 3, 2, 2, 3), dict(
        window_strides=(1, 1, 2), padding="SAME")),
    "groups": ((2, 5, 5, 4), (3, 3, 2, 6), dict(
        window_strides=(1, 1), padding="SAME", feature_group_count=2)),
    "groups_8": ((2, 5, 5, 8), (3, 3, 4, 6), dict(
        window_strides=(1, 1), padding="SAME", feature_group_count=2)),
    "rhs_dil_groups": ((2, 7, 6, 4), (3, 2, 2, 6), dict(
        window_strides=(1, 2), padding="SAME", rhs_dilation=(2, 1), feature_group_count=2)),
    "depthwise": ((2, 6, 6, 20), (3, 3, 1, 20), dict(
        window_strides=(1, 1), padding="SAME", feature_group_count=20)),
    "depth_multiplier": ((1, 5, 5, 3), (3, 3, 1, 6), dict(
        window_strides=(2, 2), padding="SAME", feature_group_count=3)),
    "lhs_dil_empty": ((1, 3, 3, 2), (2, 2, 2, 3), dict(
        window_strides=(2, 2), padding=((3, 3), (2, 2)), lhs_dilation=(3, 3))),
    "wide": ((1, 4, 5, 17), (3, 2, 17, 70), dict(window_strides=(1, 1), padding="SAME")),
    "wide_80": ((1, 4, 5, 80), (3, 3, 80, 70), dict(window_strides=(1, 1), padding="SAME")),
    # Channel counts that fill whole vectors (and a partial register tile) on every ISA.
    "channels_80": ((2, 5, 4, 80), (3, 3, 80, 20), dict(window_strides=(1, 1), padding="SAME")),
    # A dense (1x1) product with a long kernel block.
    "dense": ((1, 5, 8, 300), (1, 1, 300, 70), dict(window_strides=(1, 1), padding="VALID")),
    # A dense product of several column blocks (4 of 64 outputs, the last partial): the
    # forward's claims in lanes.
    "dense_wide": ((1, 3, 7, 40), (1, 1, 40, 200), dict(window_strides=(1, 1), padding="VALID")),
    "nchw": ((2, 3, 6, 5), (4, 3, 3, 2), dict(
        window_strides=(1, 1), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))),
}


def table(*names: str | tuple[str, str]) -> dict[str, Geometry]:
    """A module's geometries, in the order given.

    Args:
        *names: a name of ``GEOMETRIES``, or ``(local name, name in GEOMETRIES)``.

    Returns:
        local name -> (x shape, w shape, conv kwargs).

    Example:
        >>> sorted(table("3d", ("same", "2d_same")))
        ['3d', 'same']
    """
    out = {}
    for entry in names:
        local, shared = (entry, entry) if isinstance(entry, str) else entry
        out[local] = GEOMETRIES[shared]
    return out


def dn(ndim: int) -> tuple[str, str, str]:
    """Channels-last dimension numbers of an operand of ``ndim`` dimensions.

    Example:
        >>> dn(4)
        ('NHWC', 'HWIO', 'NHWC')
    """
    sp = {3: "W", 4: "HW", 5: "DHW"}[ndim]
    return (f"N{sp}C", f"{sp}IO", f"N{sp}C")


def data(geometry: Geometry, seed: int = 0, specials: bool = False,
         ties: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Float32 operands of a geometry and its kwargs, channels-last dimension numbers unless
    it gives its own.

    Args:
        geometry: (x shape, w shape, conv kwargs).
        seed: the generator's seed.
        specials: put a NaN, +inf and -inf into x.
        ties: small integers (many equal products and sums) instead of normal values.

    Example:
        >>> x, w, kw = data(GEOMETRIES["1d_valid"])
        >>> kw["dimension_numbers"]
        ('NWC', 'WIO', 'NWC')
    """
    xs, ws, kw = geometry
    rng = np.random.default_rng(seed)
    if ties:
        x = rng.integers(-2, 3, xs).astype(np.float32)
        w = rng.integers(-2, 3, ws).astype(np.float32)
    else:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
    if specials:
        flat = x.reshape(-1)
        flat[rng.choice(flat.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
    kw = dict(kw)
    kw.setdefault("dimension_numbers", dn(len(xs)))
    return x, w, kw


def conv(op: Any, engine: str, kw: dict[str, Any]):
    """``conv_general_dilated`` with ``op`` on ``engine``, jitted.

    Example:
        >>> conv("max_plus", "native", dict(window_strides=(1,), padding="SAME"))
        <PjitFunction ...>
    """
    return jax.jit(lambda x, w: jaxconv.conv_general_dilated(x, w, op=op, engine=engine, **kw))


def grads(op: Any, engine: str, kw: dict[str, Any], x: np.ndarray, w: np.ndarray,
          ct: np.ndarray):
    """The gradients in x and w of ``sum(conv(x, w) * ct)``.

    Example:
        >>> gx, gw = grads("max_plus", "native", kw, x, w, ct)
    """
    def loss(a, b):
        return jnp.sum(jaxconv.conv_general_dilated(a, b, op=op, engine=engine, **kw) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def loop_reference(x: np.ndarray, w: np.ndarray, kw: dict[str, Any], combine: Any, reduce: Any,
              identity: float, pad_value: float | None) -> np.ndarray:
    """The numpy loop reference of a convolution given by its kwargs (``data``'s third value).

    Example:
        >>> y = loop_reference(x, w, kw, np.add, np.maximum, -np.inf, None)
    """
    k = dict(kw)
    return conv_reference(x, w, k.pop("window_strides"), k.pop("padding"),
                          k.pop("lhs_dilation", None), k.pop("rhs_dilation", None),
                          k.pop("dimension_numbers"), k.pop("feature_group_count", 1),
                          combine=combine, reduce=reduce, identity=identity,
                          pad_value=pad_value)


def assert_grads_match_xla(op: Any, kw: dict[str, Any], x: np.ndarray, w: np.ndarray,
                           ct: np.ndarray) -> None:
    """The native engine's gradients of ``sum(conv(x, w) * ct)`` equal the XLA engine's (JAX's
    derivative of its generic fold) to rtol 2e-4, atol 2e-5.

    Example:
        >>> assert_grads_match_xla(op, kw, x, w, ct)
    """
    got = grads(op, "native", kw, x, w, ct)
    with jax.numpy_rank_promotion("allow"):  # the XLA engine is not written for "raise"
        want = grads(op, "xla", kw, x, w, ct)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def brute_force_fold(x, w, combine, fold):
    """SAME 3x3 stride-1 conv on explicit windows (NHWC / HWIO), folded tap by tap with the
    user's ``fold``: the reference for a callable reduce's values and gradients.

    Padded taps are skipped (the fold never sees the identity, so a hand-written fold that
    is NaN at two infinities is differentiated only where it is defined).

    Args:
        x: the input.
        w: the kernel (3x3).
        combine: the op's product, broadcasting.
        fold: the callable reduce.

    Returns:
        The output, in ``jnp``.
    """
    kh, kw, c, _ = w.shape
    _, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    valid = jnp.pad(jnp.ones((h, wd), bool), 1)
    taps = [(1, 1)] + [(i, j) for i in range(kh) for j in range(kw) if (i, j) != (1, 1)]
    out = None
    for i, j in taps:  # the centre first: it is never padding
        t = combine(xp[:, i:i + h, j:j + wd, :, None], w[i, j][None, None, None])
        ok = valid[i:i + h, j:j + wd][None, :, :, None]
        for ci in range(c):
            if out is None:
                out = t[..., ci, :]
                continue
            new = fold(out, jnp.where(ok, t[..., ci, :], 0.0))
            out = jnp.where(ok, new, out)
    return out


def assert_grads_match_brute_force(f: Any, x: np.ndarray, w: np.ndarray, ct: Any, combine: Any,
                                   fold: Any, rtol: float, atol: float) -> tuple:
    """``jax.grad`` of ``sum(ct * f(x, w))`` equals JAX's derivative of `brute_force_fold`.

    Args:
        f: the product under test, ``f(x, w)``: a SAME 3x3 stride-1 conv (NHWC / HWIO).
        x: the input.
        w: the kernel (3x3).
        ct: the output's cotangent.
        combine: the op's product, broadcasting.
        fold: the callable reduce.
        rtol: the relative tolerance.
        atol: the absolute tolerance.

    Returns:
        ``f``'s gradients ``(gx, gw)``.

    Example:
        >>> gx, gw = assert_grads_match_brute_force(ours, x, w, ct, combine, fold, 1e-4, 1e-5)
    """
    got = jax.grad(lambda a, b: jnp.sum(ct * f(a, b)), argnums=(0, 1))(x, w)
    want = jax.grad(lambda a, b: jnp.sum(ct * brute_force_fold(a, b, combine, fold)),
                    argnums=(0, 1))(x, w)
    for g, g0 in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=rtol, atol=atol)
    return got
