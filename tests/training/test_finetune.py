"""Fine-tuning from diffusers-format weights: a fresh run starts exactly from the converted parameters,
placed straight into their shardings (never baked into the init program), and bad folders fail clearly."""

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm_jax.configlib import load_config
from ldm_jax.convert import diffusers as dconv
from ldm_jax.ldm.workdirs import restore_params
from ldm_jax.training import make_stage
from ldm_jax.training.loop import train

# One resolution level (cross-attention in the mid block) keeps the compiled step small on CPU.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), attention_head_dim=2,
            cross_attention_dim=384, norm_num_groups=8)  # 384 = MiniLM's width
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    with torch.no_grad():  # non-trivial weights everywhere (diffusers zero-initializes some output layers)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(root / "unet")
    AutoencoderKL(**VAE).save_pretrained(root / "vae")
    return root


def _config(folders, tmp_path, **unet):
    c = load_config("configs/shapes_ldm.py:tiny")
    c.data.data_dir = str(tmp_path / "data")
    c.model.vae.workdir, c.model.vae.pretrained = "", str(folders / "vae")
    c.model.unet.pretrained = str(folders / "unet")
    c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.weight_decay = 1e-30, 0, 0.0  # updates vanish
    c.train.num_steps, c.sample.every_steps, c.checkpoint.every_steps = 1, 0, 1
    c.mesh.data, c.mesh.fsdp = 1, 2  # parameters sharded over 2 devices
    return c


def test_fresh_run_starts_from_the_converted_weights(folders, tmp_path):
    config = _config(folders, tmp_path)
    task, callbacks = make_stage(config, str(tmp_path / "run"))
    _, want = dconv.load_unet(folders / "unet")
    jaxpr = jax.make_jaxpr(task.init)(jax.random.PRNGKey(0))
    big = [c for c in jaxpr.consts if np.size(c) > 64]
    assert not big, "pretrained weights were baked into the init program"

    state = train(config, str(tmp_path / "run"), task, callbacks)
    got = jax.device_get(state.params)
    leaves_want, leaves_got = jax.tree.leaves(want), jax.tree.leaves(got)
    assert len(leaves_want) == len(leaves_got) > 10
    for a, b in zip(leaves_want, leaves_got):  # lr ~ 0: one step later they are still the converted weights
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)
    sharded = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
    assert sharded, "no parameter is sharded over fsdp"
    for a, b in zip(leaves_want, jax.tree.leaves(restore_params(str(tmp_path / "run"), ema=True))):
        np.testing.assert_allclose(b, np.asarray(a, np.float32), rtol=1e-6, atol=1e-9)  # EMA of equal values


def test_pretrained_unet_that_does_not_fit_fails_clearly(folders, tmp_path):
    bad = tmp_path / "unet384"
    UNet2DConditionModel(**{**UNET, "cross_attention_dim": 32}).save_pretrained(bad)
    config = _config(folders, tmp_path)
    config.model.unet.pretrained = str(bad)
    with pytest.raises(Exception, match="attends to 32-wide text states but the text encoder gives 384-wide"):
        make_stage(config, str(tmp_path / "run2"))
