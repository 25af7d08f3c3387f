"""Tests for jaxconv.optim against formulas written independently in NumPy."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconv.optim import adder_scale, clip_latent_weights


def np_adder_scale(g: np.ndarray, eta: float, eps: float = 1e-12) -> np.ndarray:
    """eta * sqrt(size) * g / max(||g||_F, eps), in float64."""
    g = np.asarray(g, dtype=np.float64)
    norm = np.sqrt(np.sum(g * g))
    return eta * np.sqrt(g.size) * g / max(norm, eps)


def make_grads(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "adder": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32) * 1e-3},
        "vec": rng.standard_normal((5,)).astype(np.float32) * 50.0,
        "scalar": np.float32(-0.7),
    }


# --------------------------------------------------------------------------- adder_scale


@pytest.mark.parametrize("eta", [0.2, 1.0, 0.05])
def test_adder_scale_matches_numpy(eta: float) -> None:
    grads = make_grads()
    tx = adder_scale(eta=eta)
    state = tx.init(grads)
    assert isinstance(state, optax.EmptyState)
    updates, new_state = tx.update(jax.tree.map(jnp.asarray, grads), state)
    assert isinstance(new_state, optax.EmptyState)
    for got, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
        assert got.dtype == jnp.float32
        assert got.shape == np.shape(g)
        np.testing.assert_allclose(np.asarray(got), np_adder_scale(g, eta), rtol=2e-6, atol=0)
        # the norm of every leaf is now eta * sqrt(size)
        want_norm = eta * np.sqrt(np.size(g))
        np.testing.assert_allclose(np.linalg.norm(np.asarray(got)), want_norm, rtol=1e-5)


def test_adder_scale_default_eta_is_addernet() -> None:
    g = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    updates, _ = adder_scale().update(g, optax.EmptyState())
    np.testing.assert_allclose(updates, 0.2 * 2.0 * np.asarray(g) / 5.0, rtol=1e-6)


def test_adder_scale_zero_gradient_stays_zero() -> None:
    grads = {"zero": jnp.zeros((3, 3, 2, 4)), "ok": jnp.asarray([1.0, -1.0])}
    updates, _ = jax.jit(adder_scale().update)(grads, optax.EmptyState())
    assert np.all(np.isfinite(updates["zero"]))
    np.testing.assert_array_equal(updates["zero"], 0.0)
    np.testing.assert_allclose(updates["ok"], np_adder_scale([1.0, -1.0], 0.2), rtol=1e-6)


def test_adder_scale_custom_eps_clamps_the_norm() -> None:
    g = np.asarray([3e-3, 4e-3], np.float32)  # norm 5e-3 < eps
    updates, _ = adder_scale(eta=1.0, eps=1.0).update(jnp.asarray(g), optax.EmptyState())
    np.testing.assert_allclose(updates, np.sqrt(2.0) * g / 1.0, rtol=1e-6)


def test_adder_scale_bf16_leaf() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal((4, 16)).astype(jnp.bfloat16)
    updates, _ = adder_scale(eta=0.2).update({"w": jnp.asarray(g)}, optax.EmptyState())
    assert updates["w"].dtype == jnp.bfloat16
    want = np_adder_scale(g.astype(np.float64), 0.2)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float64), want, rtol=8e-3, atol=0)


@pytest.mark.parametrize("magnitude", [1e20, 1e-25])
def test_adder_scale_extreme_magnitudes_in_f32(magnitude: float) -> None:
    # The plain sum of squares overflows (1e40) or underflows (1e-50) in float32.
    g = np.asarray([magnitude, -magnitude, 0.0, 2 * magnitude], np.float32)
    updates, _ = adder_scale(eta=0.2).update(jnp.asarray(g), optax.EmptyState())
    np.testing.assert_allclose(updates, np_adder_scale(g, 0.2), rtol=1e-6)


def test_adder_scale_nan_in_nan_out() -> None:
    g = jnp.asarray([1.0, np.nan])
    updates, _ = adder_scale().update(g, optax.EmptyState())
    assert np.isnan(updates).all()


def test_adder_scale_none_leaves() -> None:
    grads = {"w": jnp.asarray([1.0, 0.0]), "frozen": None}
    updates, _ = adder_scale().update(grads, optax.EmptyState())
    assert updates["frozen"] is None
    np.testing.assert_allclose(updates["w"], np_adder_scale([1.0, 0.0], 0.2), rtol=1e-6)


@pytest.mark.parametrize("callable_mask", [False, True])
def test_adder_scale_in_masked_chain(callable_mask: bool) -> None:
    params = {
        "adder": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.zeros((8,))},
        "head": jnp.ones((8, 10)),
    }
    rng = np.random.default_rng(2)
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32)), params
    )
    mask = {"adder": {"kernel": True, "bias": False}, "head": False}
    mask_arg = (lambda p: jax.tree.map(lambda _, m: m, p, mask)) if callable_mask else mask
    lr = 0.1
    tx = optax.chain(optax.masked(adder_scale(eta=0.2), mask_arg), optax.sgd(learning_rate=lr))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_allclose(
        updates["adder"]["kernel"],
        -lr * np_adder_scale(grads["adder"]["kernel"], 0.2),
        rtol=2e-6,
    )
    np.testing.assert_allclose(updates["adder"]["bias"], -lr * grads["adder"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(updates["head"], -lr * grads["head"], rtol=1e-6)
    new_params = optax.apply_updates(params, updates)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)


@pytest.mark.parametrize(
    ("kwargs", "name", "error"),
    [
        ({"eta": 0.0}, "eta", ValueError),
        ({"eta": -0.2}, "eta", ValueError),
        ({"eta": float("nan")}, "eta", ValueError),
        ({"eta": float("inf")}, "eta", ValueError),
        ({"eta": "0.2"}, "eta", TypeError),
        ({"eta": True}, "eta", TypeError),
        ({"eps": 0.0}, "eps", ValueError),
    ],
)
def test_adder_scale_validates(kwargs: dict[str, Any], name: str, error: type) -> None:
    with pytest.raises(error, match=f"`{name}`"):
        adder_scale(**kwargs)


# --------------------------------------------------------------------------- clip_latent_weights


def make_params() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "conv1": {"kernel": jnp.asarray(3 * rng.standard_normal((3, 3, 1, 4)), jnp.float32)},
        "xnor": {
            "kernel": jnp.asarray(3 * rng.standard_normal((3, 3, 4, 8)), jnp.float32),
            "bias": jnp.asarray(3 * rng.standard_normal((8,)), jnp.float32),
        },
        "head": jnp.asarray(3 * rng.standard_normal((8, 10)), jnp.bfloat16),
    }


def test_clip_latent_weights_masked_leaves_only() -> None:
    params = make_params()
    mask = {"conv1": {"kernel": False}, "xnor": {"kernel": True, "bias": False}, "head": True}
    new = clip_latent_weights(params, mask)
    np.testing.assert_array_equal(
        new["xnor"]["kernel"], np.clip(np.asarray(params["xnor"]["kernel"]), -1.0, 1.0)
    )
    head = np.asarray(params["head"], np.float64)
    np.testing.assert_array_equal(np.asarray(new["head"], np.float64), np.clip(head, -1, 1))
    assert new["head"].dtype == jnp.bfloat16
    # unmasked leaves are returned untouched (the very same arrays)
    assert new["conv1"]["kernel"] is params["conv1"]["kernel"]
    assert new["xnor"]["bias"] is params["xnor"]["bias"]
    # the input is not modified
    assert float(jnp.max(jnp.abs(params["xnor"]["kernel"]))) > 1.0


def test_clip_latent_weights_callable_and_prefix_mask() -> None:
    params = make_params()
    by_fn = clip_latent_weights(
        params,
        lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: "xnor" in jax.tree_util.keystr(path), p
        ),
        lo=-0.5,
        hi=0.25,
    )
    by_prefix = clip_latent_weights(
        params, {"conv1": False, "xnor": True, "head": False}, lo=-0.5, hi=0.25
    )
    for new in (by_fn, by_prefix):
        for key in ("kernel", "bias"):
            want = np.clip(np.asarray(params["xnor"][key]), -0.5, 0.25)
            np.testing.assert_array_equal(new["xnor"][key], want)
        assert new["head"] is params["head"]
        assert new["conv1"]["kernel"] is params["conv1"]["kernel"]


def test_clip_latent_weights_after_update_under_jit() -> None:
    params = make_params()
    mask = {"conv1": {"kernel": False}, "xnor": {"kernel": True, "bias": False}, "head": False}
    tx = optax.sgd(learning_rate=1.0)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return clip_latent_weights(params, mask), state

    new, _ = step(params, state)
    moved = np.asarray(params["xnor"]["kernel"]) - 1.0
    np.testing.assert_array_equal(new["xnor"]["kernel"], np.clip(moved, -1.0, 1.0))
    np.testing.assert_array_equal(new["xnor"]["bias"], np.asarray(params["xnor"]["bias"]) - 1.0)


def test_clip_latent_weights_validates() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="`lo`"):
        clip_latent_weights(params, True, lo=1.0, hi=-1.0)
    with pytest.raises(ValueError, match="`mask`"):
        clip_latent_weights(params, {"xnor": True})
    with pytest.raises(TypeError, match="`mask`"):
        clip_latent_weights(params, {"conv1": 1, "xnor": True, "head": False})
    with pytest.raises(TypeError, match="`mask`"):
        clip_latent_weights({"w": jnp.ones(3)}, {"w": jnp.asarray([True, False, True])})
    with pytest.raises(TypeError, match="`hi`"):
        clip_latent_weights(params, True, hi="1")
    # a whole-tree bool is a valid prefix
    new = clip_latent_weights(params, True)
    assert all(float(jnp.max(jnp.abs(leaf))) <= 1.0 for leaf in jax.tree.leaves(new))


# --------------------------------------------------------------------------------------------
# Masks for Flax NNX models, inside a real nnx.Optimizer step.
# --------------------------------------------------------------------------------------------

def _nnx_model():
    from flax import nnx

    import jaxconv

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = jaxconv.nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.adder = jaxconv.nnx.Conv(4, 4, (3, 3), op="adder", use_bias=False, rngs=rngs)
            self.blocks = nnx.List([jaxconv.nnx.Linear(4, 6, kernel_quantizer="ste_sign",
                                                       rngs=rngs)])
            self.head = jaxconv.nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            x = self.adder(self.stem(x)).mean(axis=(1, 2))
            return self.head(self.blocks[0](x))

    return Net(nnx.Rngs(0))


def test_kernel_mask_selects_by_op_and_quantizer():
    from flax import nnx

    from jaxconv import optim

    model = _nnx_model()
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    adder = optim.kernel_mask(model, op="adder")(pure)
    assert adder["adder"]["kernel"] and not adder["stem"]["kernel"]
    assert not adder["blocks"][0]["kernel"] and not adder["head"]["kernel"]
    binary = optim.kernel_mask(model, quantized=True)(pure)
    assert binary["blocks"][0]["kernel"] and not binary["blocks"][0]["bias"]
    assert sum(jax.tree.leaves(binary)) == 1
    both = optim.kernel_mask(model, op=("adder", "standard"), quantized=False)(
        nnx.state(model, nnx.Param))
    assert sum(jax.tree.leaves(both)) == 3  # also on a State holding Variables
    with pytest.raises(ValueError, match=r"no layer of the model has op='max_plus'.*"
                                         r"adder \(op='adder'"):
        optim.kernel_mask(model, op="max_plus")


def test_nnx_optimizer_step_with_masks():
    """adder_scale on the adder kernel only; weight_clip keeps latent weights in [-1, 1]."""
    import optax
    from flax import nnx

    from jaxconv import optim

    model = _nnx_model()
    kernel = model.blocks[0].kernel
    kernel[...] = kernel[...] * 4.0  # latent weights outside [-1, 1]
    before = nnx.state(model, nnx.Param).to_pure_dict()
    lr = 0.5
    tx = optax.chain(optax.masked(optim.adder_scale(0.2), optim.kernel_mask(model, op="adder")),
                     optax.sgd(lr), optim.weight_clip(optim.kernel_mask(model, quantized=True)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 2)), jnp.float32)

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss)(model)
    g = nnx.state(grads, nnx.Param).to_pure_dict()
    optimizer.update(model, grads)
    after = nnx.state(model, nnx.Param).to_pure_dict()
    ga = g["adder"]["kernel"]
    expect = before["adder"]["kernel"] - lr * 0.2 * np.sqrt(ga.size) * ga / np.linalg.norm(ga)
    np.testing.assert_allclose(after["adder"]["kernel"], expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["stem"]["kernel"],
                               before["stem"]["kernel"] - lr * g["stem"]["kernel"], rtol=1e-5)
    latent = before["blocks"][0]["kernel"] - lr * g["blocks"][0]["kernel"]
    np.testing.assert_allclose(after["blocks"][0]["kernel"], np.clip(latent, -1, 1), rtol=1e-6)
    assert np.abs(latent).max() > 1
    np.testing.assert_allclose(after["head"]["bias"],
                               before["head"]["bias"] - lr * g["head"]["bias"], rtol=1e-5)


def test_clip_latent_weights_on_nnx_module_and_state():
    from flax import nnx

    from jaxconv import optim

    model = _nnx_model()
    model.blocks[0].kernel[...] = model.blocks[0].kernel[...] * 10.0
    model.head.kernel[...] = model.head.kernel[...] * 10.0
    head_before = np.asarray(model.head.kernel[...])
    mask = optim.kernel_mask(model, quantized=True)
    state = nnx.state(model, nnx.Param)
    new = optim.clip_latent_weights(state, mask)
    assert np.abs(np.asarray(new["blocks"][0]["kernel"])).max() == 1.0
    np.testing.assert_array_equal(new["head"]["kernel"], head_before)
    # A path-based callable written against the nested dict works on a State too.
    last_is_kernel = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: path[-1].key == "kernel" and path[0].key == "blocks", p)
    new2 = optim.clip_latent_weights(state, last_is_kernel)
    np.testing.assert_array_equal(new2["blocks"][0]["kernel"], new["blocks"][0]["kernel"])
    # A prefix-dict mask on a State.
    new3 = optim.clip_latent_weights(state, {"stem": False, "adder": False, "head": False,
                                             "blocks": True})
    np.testing.assert_array_equal(new3["blocks"][0]["kernel"], new["blocks"][0]["kernel"])
    assert optim.clip_latent_weights(model, mask) is model
    assert np.abs(np.asarray(model.blocks[0].kernel[...])).max() == 1.0
    np.testing.assert_array_equal(model.head.kernel[...], head_before)


def test_a_mask_selecting_nothing_raises():
    from flax import nnx

    from jaxconv import optim

    model = _nnx_model()
    state = nnx.state(model, nnx.Param)
    nothing = lambda p: jax.tree.map(lambda _: False, p)  # noqa: E731
    with pytest.raises(ValueError, match=r"`mask` selects no leaf of `params`"):
        optim.clip_latent_weights(state, nothing)
    with pytest.raises(ValueError, match=r"selects no leaf"):
        optim.clip_latent_weights({"w": jnp.ones(3)}, {"w": False})
    with pytest.raises(ValueError, match=r"`weight_clip`: `mask` selects no leaf"):
        nnx.Optimizer(model, optim.weight_clip(nothing), wrt=nnx.Param)
