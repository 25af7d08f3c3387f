"""Partitioning of the public callers of the core's primitives over 8 simulated CPU devices:
`conv_transpose`, `einsum`, `conv_multi`, the packed XNOR layers and the Flax layers
(``jaxconv.nnx``, ``jaxconv.linen``), data parallel (the batch sharded, parameters
replicated), checked on the compiled HLO and on the numbers.

For each caller: no all-gather / all-to-all / collective-permute (nor any other collective)
in the forward, each native FFI call on the local batch, the output sharded as lax's
equivalent is, the gradient's only collectives all-reduces, and the numbers equal one
device's. The helpers are tests/test_sharding.py's (the primitives' own cases).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import DN, MOVES, _close, _collectives, _grad, _mesh, _native_calls

import jaxconv
from jaxconv import packed

N = 16  # images: 2 per device


def _images(seed: int, c: int = 4) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.5, 1.5, (N, 6, 7, c)),
                       jnp.float32)


def _kernel(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.5, 1.5, shape), jnp.float32)


def _check(f: Callable[[Any, Any], jax.Array], x: jax.Array, p: Any,
           lax_f: Callable[[Any, Any], jax.Array] | None, *, native: bool = True,
           grad: bool = True) -> None:
    """``f(x, p)`` with ``x`` sharded over its first axis and ``p`` (a pytree) replicated."""
    mesh = _mesh()
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ps = jax.device_put(p, NamedSharding(mesh, P()))
    fwd = jax.jit(f)
    hlo = fwd.lower(xs, ps).compile().as_text()
    y = fwd(xs, ps)
    _close(y, jax.jit(f)(x, p))
    assert not _collectives(hlo), _collectives(hlo)
    if native:
        calls = _native_calls(hlo)
        assert calls, "no native call in the compiled forward"
        assert all(c[0][0] == N // 8 for c in calls), calls
    if lax_f is not None:
        y_lax = jax.jit(lax_f)(xs, ps)
        assert y.sharding.is_equivalent_to(y_lax.sharding, y.ndim), (y.sharding,
                                                                     y_lax.sharding)
    if not grad:
        return
    step = jax.jit(_grad(f))
    g = step(xs, ps)
    _close(g, jax.jit(_grad(f))(x, p))
    hlo = step.lower(xs, ps).compile().as_text()
    assert _collectives(hlo) <= {"all-reduce"}, _collectives(hlo)
    assert not _collectives(hlo) & set(MOVES)
    if native:
        assert all(c[0][0] == N // 8 for c in _native_calls(hlo)), _native_calls(hlo)


# --- the functional callers ------------------------------------------------------------------

def test_conv_transpose() -> None:
    w = _kernel(1, (3, 3, 4, 8))

    def f(x, w):
        return jaxconv.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=DN,
                                      op="max_plus")

    def lax_f(x, w):
        return lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=DN)

    _check(f, _images(0), w, lax_f)


def test_einsum() -> None:
    x = jnp.asarray(np.random.default_rng(2).normal(size=(N, 12)), jnp.float32)
    w = _kernel(3, (12, 8))

    def f(x, w):
        return jaxconv.einsum("ni,io->no", x, w, op="max_plus")

    _check(f, x, w, lambda x, w: jnp.einsum("ni,io->no", x, w))


def test_conv_multi() -> None:
    w = _kernel(4, (3, 3, 4, 8))

    def f(x, w):
        return jaxconv.conv_multi(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                  ops=("max_plus", "min_plus"), split=(4, 4))

    def lax_f(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)

    _check(f, _images(5), w, lax_f)


def _nnx_layer(layer: str, seed: int, op: str | None = None, features: int = 12):
    """A jaxconv NNX conv (4 -> 8 channels) or linear layer (``features`` -> 8) with ``op``
    (``None``: Flax's own layer) and a batch of inputs for it."""
    mod, kw = (jaxconv.nnx, dict(op=op)) if op is not None else (nnx, {})
    if layer == "conv":
        return mod.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0), **kw), _images(seed)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(N, features)), jnp.float32)
    return mod.Linear(features, 8, rngs=nnx.Rngs(0), **kw), x


# --- packed XNOR (inference: forward only) ---------------------------------------------------

@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_packed_layers(layer: str) -> None:
    trained, x = _nnx_layer(layer, 6, "xnor", features=40)
    model = packed.pack_model(nnx.Sequential(trained))
    assert isinstance(model.layers[0], (packed.PackedConv, packed.PackedLinear))
    graphdef, state = nnx.split(model)

    def f(x, state):
        return nnx.merge(graphdef, state)(x)

    _check(f, x, state, lambda x, _: trained(x), native=False, grad=False)


# --- Flax layers on the native engine ---------------------------------------------------------

@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_nnx_layers(layer: str) -> None:
    model, x = _nnx_layer(layer, 7, "max_plus")
    graphdef, params = nnx.split(model)
    tdef, tparams = nnx.split(_nnx_layer(layer, 7)[0])  # Flax's layer: lax's sharding

    def f(x, params):
        return nnx.merge(graphdef, params)(x)

    _check(f, x, params, lambda x, _: nnx.merge(tdef, tparams)(x))


@pytest.mark.parametrize("layer", ["conv", "dense"])
def test_linen_layers(layer: str) -> None:
    if layer == "conv":
        module, twin, x = (jaxconv.linen.Conv(8, (3, 3), op="max_plus"), nn.Conv(8, (3, 3)),
                           _images(8))
    else:
        module, twin = jaxconv.linen.Dense(8, op="max_plus"), nn.Dense(8)
        x = jnp.asarray(np.random.default_rng(8).normal(size=(N, 12)), jnp.float32)
    params = module.init(jax.random.key(0), x[:1])
    tparams = twin.init(jax.random.key(0), x[:1])

    def f(x, params):
        return module.apply(params, x)

    _check(f, x, params, lambda x, _: twin.apply(tparams, x))
