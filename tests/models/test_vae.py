"""AutoencoderKL: parity with diffusers' AutoencoderKL (torch 2.13 CPU), latent scaling, SD parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax import models
from ldm_jax.convert import diffusers as dconv

TINY_F8 = dict(  # four levels: f = 8 like SD, at toy width
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.3,
    shift_factor=0.1,
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**TINY_F8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("vae")
    model.save_pretrained(path)
    cfg, params = dconv.load_vae(path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)

    @jax.jit
    def run(params, x):
        vae = models.AutoencoderKL(cfg)
        v = {"params": params}
        mean, logvar = vae.apply(v, x, method=vae.encode)
        recon, post = vae.apply(v, x)
        return dict(
            mean=mean,
            logvar=logvar,
            decoded=vae.apply(v, mean, method=vae.decode),
            recon=recon,
            kl=post.kl(),
            latents=vae.apply(v, x, method=vae.latents),
            from_latents=vae.apply(v, (mean - 0.1) * 0.3, method=vae.decode_latents),
        )

    return model, cfg, x, jax.tree_util.tree_map(np.asarray, run(params, x))


def test_config_translation(case):
    _, cfg, _, _ = case
    assert cfg.block_out_channels == (16, 32, 32, 32) and cfg.downsample_factor == 8
    assert cfg.scaling_factor == 0.3 and cfg.shift_factor == 0.1 and cfg.norm_num_groups == 8


def test_encode_matches_diffusers(case):
    model, _, x, ours = case
    with torch.no_grad():
        dist = model.encode(nchw(x)).latent_dist
    assert ours["mean"].shape == (2, 2, 3, 4)
    assert rel_err(ours["mean"], nhwc(dist.mean)) < 1e-4
    assert rel_err(ours["logvar"], nhwc(dist.logvar)) < 1e-4


def test_decode_matches_diffusers(case):
    model, _, _, ours = case
    with torch.no_grad():
        want = nhwc(model.decode(nchw(ours["mean"])).sample)
    assert ours["decoded"].shape == (2, 16, 24, 3)
    assert rel_err(ours["decoded"], want) < 1e-4


def test_latent_scaling_and_call(case):
    _, _, _, ours = case
    np.testing.assert_allclose(ours["latents"], (ours["mean"] - 0.1) * 0.3, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours["from_latents"], ours["decoded"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours["recon"], ours["decoded"])  # __call__ decodes the posterior mode
    kl = 0.5 * np.sum(ours["mean"] ** 2 + np.exp(ours["logvar"]) - 1 - ours["logvar"], axis=(1, 2, 3))
    np.testing.assert_allclose(ours["kl"], kl, rtol=1e-5)


def test_sd_vae_parameter_count():
    assert models.count_params(models.vae_param_shapes(models.sd_vae())) == 83_653_863


@pytest.mark.parametrize("preset,factor", [(models.tiny_vae, 4), (models.sd_vae, 8)])
def test_downsampling_factor_shapes(preset, factor):
    cfg = preset()
    vae = models.AutoencoderKL(cfg)
    x = jnp.zeros((1, 32, 48, 3))
    abstract = jax.eval_shape(lambda: vae.init(jax.random.key(0), x))
    mean, _ = jax.eval_shape(lambda p: vae.apply(p, x, method=vae.encode), abstract)
    assert cfg.downsample_factor == factor and mean.shape == (1, 32 // factor, 48 // factor, 4)
    images = jax.eval_shape(lambda p: vae.apply(p, jnp.zeros(mean.shape), method=vae.decode), abstract)
    assert images.shape == (1, 32, 48, 3)


def test_bad_input_error():
    vae = models.AutoencoderKL(models.tiny_vae())
    with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\) NHWC"):
        jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 3, 16, 16))))
