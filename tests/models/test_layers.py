"""Layers against their PyTorch / diffusers counterparts and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.models import layers
from ldm_jax.models.vae import DiagonalGaussian
from ldm_jax.types import ConfigError


def _apply(module, x):
    params = module.init(jax.random.key(0), x)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), layers.unbox(params)
    )
    return params, module.apply(params, x)


def test_group_norm_matches_torch():
    x = np.random.default_rng(0).normal(2.0, 3.0, (2, 5, 6, 16)).astype(np.float32)
    params, y = _apply(layers.GroupNorm(4, epsilon=1e-6), jnp.asarray(x))
    ref = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["params"]["scale"])))
        ref.bias.copy_(torch.from_numpy(np.array(params["params"]["bias"])))
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_group_norm_bf16_keeps_float32_statistics():
    x = 1000.0 + np.random.default_rng(1).normal(size=(1, 4, 4, 8)).astype(np.float32)
    gn = layers.GroupNorm(2, dtype=jnp.bfloat16)
    params = layers.unbox(gn.init(jax.random.key(0), x))
    y = gn.apply(params, x)
    assert y.dtype == jnp.bfloat16
    want = layers.GroupNorm(2).apply(params, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), atol=2e-2)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ConfigError, match="not divisible by 4 groups"):
        layers.GroupNorm(4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))


def test_layer_norm_matches_torch():
    x = np.random.default_rng(2).normal(1.0, 2.0, (3, 7, 12)).astype(np.float32)
    params, y = _apply(layers.LayerNorm(epsilon=1e-5), jnp.asarray(x))
    ref = torch.nn.LayerNorm(12, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["params"]["scale"])))
        ref.bias.copy_(torch.from_numpy(np.array(params["params"]["bias"])))
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0.0), (33, False, 1.0), (64, True, 1.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    ours = layers.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    # sin/cos of arguments up to 999 rad: one float32 ulp of the argument is ~6e-5.
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), atol=2e-4)


def test_timestep_embedding_closed_form_at_zero():
    emb = layers.timestep_embedding(jnp.zeros((1,)), 8, flip_sin_to_cos=True)
    np.testing.assert_array_equal(np.asarray(emb), [[1, 1, 1, 1, 0, 0, 0, 0]])  # [cos 0, sin 0]


@pytest.mark.parametrize("size", [(8, 10), (7, 9), (3, 5)])
def test_resize_nearest_matches_torch(size):
    x = np.random.default_rng(3).normal(size=(1, 4, 5, 2)).astype(np.float32)
    ours = layers.resize_nearest(jnp.asarray(x), size)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="nearest")
    np.testing.assert_array_equal(np.asarray(ours), want.permute(0, 2, 3, 1).numpy())


def test_asymmetric_downsample_output_size_and_padding():
    # f=2 per level with (0,1,0,1) padding: 8, 9 -> 4 and 10 -> 5 (floor((n + 1 - 3) / 2) + 1)
    ds = layers.Downsample(3, asymmetric_pad=True)
    for n, want in ((8, 4), (9, 4), (10, 5)):
        shapes = jax.eval_shape(lambda n=n: ds.init_with_output(jax.random.key(0), jnp.zeros((1, n, n, 2)))[0])
        assert shapes.shape == (1, want, want, 3)


def test_diagonal_gaussian_kl_matches_torch_distributions():
    rng = np.random.default_rng(4)
    m1, l1, m2, l2 = (rng.normal(size=(2, 3, 3, 4)).astype(np.float32) for _ in range(4))
    p, q = DiagonalGaussian(jnp.asarray(m1), jnp.asarray(l1)), DiagonalGaussian(jnp.asarray(m2), jnp.asarray(l2))
    tp = torch.distributions.Normal(torch.from_numpy(m1), torch.from_numpy(np.exp(0.5 * l1)))
    tq = torch.distributions.Normal(torch.from_numpy(m2), torch.from_numpy(np.exp(0.5 * l2)))
    std = torch.distributions.Normal(torch.zeros(m1.shape), torch.ones(m1.shape))
    np.testing.assert_allclose(np.asarray(p.kl(q)), torch.distributions.kl_divergence(tp, tq).sum((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p.kl()), torch.distributions.kl_divergence(tp, std).sum((1, 2, 3)), rtol=1e-5)
    z = rng.normal(size=m1.shape).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(p.nll(jnp.asarray(z))), -tp.log_prob(torch.from_numpy(z)).sum((1, 2, 3)), rtol=1e-5
    )


def test_diagonal_gaussian_sample_moments():
    p = DiagonalGaussian(jnp.full((4000, 1, 1, 2), 1.5), jnp.full((4000, 1, 1, 2), np.log(0.25)))
    z = np.asarray(p.sample(jax.random.key(0)))
    assert abs(z.mean() - 1.5) < 0.02 and abs(z.std() - 0.5) < 0.02
    np.testing.assert_array_equal(np.asarray(p.mode()), np.asarray(p.mean))


def test_count_params_and_unbox():
    d = layers.dense(5, ("embed", "mlp"))
    boxed = d.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    assert boxed["kernel"].names == ("embed", "mlp")
    assert layers.count_params(boxed) == 3 * 5 + 5
    assert isinstance(layers.unbox(boxed)["kernel"], jax.Array)
