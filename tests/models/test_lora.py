"""LoRA as a parameter transformation: identity at init, merge/unmerge, mixing, rank, training, dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax import models
from ldm_jax.models import layers, lora
from ldm_jax.models.weights import flatten, unflatten
from ldm_jax.types import ConfigError

CFG = models.tiny_unet(block_out_channels=(16,), attention_levels=(True,), cross_attention_dim=8, zero_init=False)
ATTN1_Q = "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"
CONV1 = "down_blocks_0/resnets_0/conv1"


@pytest.fixture(scope="module")
def base():
    """Random U-Net parameters of the right shapes (drawn in numpy: no init to compile)."""
    rng = np.random.default_rng(0)
    flat = {k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32) for k, s in models.unet_param_shapes(CFG).items()}
    return unflatten(flat)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.array([3.0, 700.0]),
            jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32))


def randomized(adapter, seed, scale=0.1):
    """The adapter with every up (and down) factor drawn at random (numpy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), adapter)


def test_targets_and_fresh_adapter_is_exactly_the_identity(base):
    adapter = lora.init_lora(lora.LoraConfig(rank=2, targets=("attention", "convs", "projections")), base,
                             jax.random.key(2))
    layers = adapter.layers()
    assert ATTN1_Q in layers and CONV1 in layers and "mid_block/attentions_0/proj_in" in layers
    assert "conv_in" not in layers and "time_embedding/linear_1" not in layers
    down, up = layers[CONV1]
    assert down.shape == (3, 3, 16, 2) and up.shape == (1, 1, 2, 16) and not np.any(up)
    assert float(jnp.std(layers[ATTN1_Q][0])) == pytest.approx(0.5, rel=0.3)  # N(0, 1/rank^2)
    merged = lora.apply_lora(base, [(adapter, 1.0)])  # the same tree, so the same network function
    jax.tree.map(np.testing.assert_array_equal, merged, base)
    assert merged["conv_in"]["bias"] is base["conv_in"]["bias"]  # untouched leaves are shared, not copied


def test_config_errors(base):
    with pytest.raises(ConfigError, match="'atention' matches no Dense/Conv kernel.*did you mean 'attention'"):
        lora.init_lora(lora.LoraConfig(targets=("atention",)), base, jax.random.key(0))
    with pytest.raises(ConfigError, match="rank=0"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        lora.LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="not a valid regex|neither a group"):
        lora.LoraConfig(targets=("to_q(",))
    assert lora.LoraConfig.from_config({"rank": 8, "targets": ["attn2/to_k"]}).targets == ("attn2/to_k",)


def test_merge_unmerge_round_trip_and_mixing(base):
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("attention", "convs"))
    a = randomized(lora.init_lora(cfg, base, jax.random.key(3)), 4)
    b = randomized(lora.init_lora(cfg.replace(rank=2, alpha=None), base, jax.random.key(5)), 6)
    merged = lora.merge(base, [(a, 0.7), (b, -0.4)])
    restored = lora.unmerge(merged, [(a, 0.7), (b, -0.4)])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), restored, base)
    # two adapters with weights = the sum of their separate updates, each scaled by w * alpha / rank
    da = flatten(lora.apply_lora(base, [(a, 1.0)]))
    db = flatten(lora.apply_lora(base, [(b, 1.0)]))
    flat_base, flat_merged = flatten(base), flatten(merged)
    for k in (f"{ATTN1_Q}/kernel", f"{CONV1}/kernel"):
        want = flat_base[k] + 0.7 * (da[k] - flat_base[k]) - 0.4 * (db[k] - flat_base[k])
        np.testing.assert_allclose(flat_merged[k], want, rtol=1e-5, atol=1e-6)
    down, up = a.layers()[ATTN1_Q]
    np.testing.assert_allclose(da[f"{ATTN1_Q}/kernel"] - flat_base[f"{ATTN1_Q}/kernel"], 2.0 * down @ up,
                               rtol=1e-5, atol=1e-6)


def test_rank_r_update_has_rank_r(base):
    for rank in (1, 3):
        adapter = randomized(lora.init_lora(lora.LoraConfig(rank=rank), base, jax.random.key(0)), rank)
        k = f"{ATTN1_Q}/kernel"
        delta = np.asarray(flatten(lora.apply_lora(base, [(adapter, 1.0)]))[k] - flatten(base)[k], np.float64)
        assert delta.shape == (16, 16) and np.linalg.matrix_rank(delta, tol=1e-6) == rank


def test_gradients_reach_only_the_adapter_and_optimizer_state_scales_with_rank(base, inputs):
    x, t, ctx = inputs

    def loss_fn(adapter, base_params):
        out = models.UNet(CFG).apply({"params": lora.apply_lora(base_params, [(adapter, 1.0)])}, x, t, ctx)
        return jnp.mean(out**2)

    adapter = lora.init_lora(lora.LoraConfig(rank=2), base, jax.random.key(0))
    grads = jax.jit(jax.grad(loss_fn))(adapter, base)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter) and grads.alphas == adapter.alphas
    g = grads.layers()[ATTN1_Q]
    assert np.any(g[1]) and not np.any(g[0])  # at init (up = 0) only up gets a gradient

    def state_size(rank):
        tx = optax.adamw(1e-3)
        a = lora.init_lora(lora.LoraConfig(rank=rank), base, jax.random.key(0))
        return sum(x.size for x in jax.tree.leaves(tx.init(a))), sum(x.size for x in jax.tree.leaves(a))

    (s2, n2), (s4, n4) = state_size(2), state_size(4)
    assert n4 == 2 * n2 and s2 == 2 * n2 + 1 and s4 == 2 * n4 + 1  # adam's mu, nu (+ the step count)
    assert n2 < models.count_params(base) / 10


class DenseConv(nn.Module):
    """A strided 3x3 conv and a Dense: the two kinds of layer LoRA adapts."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(6, 3, stride=2, name="c")(x)
        return layers.dense(5, name="d")(jax.nn.silu(h))


def test_unmerged_forward_equals_merged_and_applies_dropout(base):
    module = DenseConv()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 7, 4)), jnp.float32)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                          models.unbox(jax.eval_shape(module.init, jax.random.key(1), x)["params"]))
    cfg = lora.LoraConfig(rank=2, alpha=3.0, dropout=0.5, targets=("c", "d"))
    adapter = randomized(lora.init_lora(cfg, params, jax.random.key(2)), 3, scale=0.5)
    assert adapter.layers()["c"][0].shape == (3, 3, 4, 2)

    def intercepted(a, rng):
        with lora.lora_intercept([(a, 0.8)], rng=rng):
            return module.apply({"params": params}, x)

    with pytest.raises(ConfigError, match="dropout=0.5, which a weight merge cannot apply"):
        lora.apply_lora(params, [(adapter, 0.8)])
    plain = jax.jit(lambda p: module.apply({"params": p}, x))
    merged = plain(lora.merge(params, [(adapter.replace(dropout=0.0), 0.8)]))
    assert rel_err(merged, plain(params)) > 0.1
    np.testing.assert_allclose(jax.jit(lambda a: intercepted(a, None))(adapter), merged, rtol=1e-5, atol=1e-5)
    run = jax.jit(intercepted)
    d1, d2 = run(adapter, jax.random.key(1)), run(adapter, jax.random.key(2))
    assert rel_err(d1, merged) > 1e-2 and rel_err(d1, d2) > 1e-2
    np.testing.assert_array_equal(d1, run(adapter, jax.random.key(1)))
    grads = jax.jit(jax.grad(lambda a: jnp.mean(intercepted(a, jax.random.key(1)) ** 2)))(adapter)
    assert all(np.any(up) and np.any(down) for down, up in grads.layers().values())


def rel_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_adapter_for_another_model_is_refused(base):
    adapter = lora.LoraAdapter.from_layers({"nope/to_q": (jnp.zeros((16, 2)), jnp.zeros((2, 16)))}, {})
    with pytest.raises(ConfigError, match="'nope/to_q' is not in the base parameters"):
        lora.apply_lora(base, [(adapter, 1.0)])
