"""A tiny random Stable Diffusion saved by diffusers (the reference the pipelines are checked against).

Two SD-layout folders share the VAE, the CLIP text encoder, the tokenizer and the DDIM scheduler (SD's
config: scaled_linear, leading spacing, steps_offset 1, set_alpha_to_one False):
``sd/`` has a 4-channel U-Net, ``sd_inpaint/`` a 9-channel inpainting U-Net. Every weight is moved off its
initial value, so each one matters; f = 8, so 64 px images have 8 x 8 latents.
"""

import types

import jax
import numpy as np
import pytest
import torch
import transformers

from ldm_jax.models.tokenizers import CLIPTokenizer

UNET = dict(  # one level (no resampling) keeps the compile short; the U-Net itself is tested in tests/models
    sample_size=8, out_channels=4, block_out_channels=(32,), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
)
VAE = dict(
    block_out_channels=(16, 16, 32, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, sample_size=64,
)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)
def _perturb(model, scale):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    unet = _perturb(UNet2DConditionModel(in_channels=4, **UNET), 0.05)
    unet9 = _perturb(UNet2DConditionModel(in_channels=9, **UNET), 0.05)
    vae = _perturb(AutoencoderKL(in_channels=3, out_channels=3, **VAE), 0.05)
    text_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
    text = _perturb(transformers.CLIPTextModel(text_cfg), 0.02)
    CLIPTokenizer.default().save(root / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=DDIMScheduler(**SD_SCHEDULER),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline(unet=unet, **parts)
    pipe.save_pretrained(root / "sd")
    inpaint = StableDiffusionInpaintPipeline(unet=unet9, **parts)
    inpaint.save_pretrained(root / "sd_inpaint")
    pipe.set_progress_bar_config(disable=True)
    inpaint.set_progress_bar_config(disable=True)
    return types.SimpleNamespace(root=root, sd=root / "sd", sd_inpaint=root / "sd_inpaint", pipe=pipe,
                                 inpaint=inpaint)


@pytest.fixture(scope="session")
def sd_comps(tiny_sd):
    """The LatentDiffusion of the tiny SD folder (shared: loading traces the models for their shapes)."""
    from ldm_jax.ldm import LatentDiffusion

    return LatentDiffusion.from_pretrained(tiny_sd.sd)


@pytest.fixture(scope="session")
def tiny_workdir(tiny_sd, sd_comps, tmp_path_factory):
    """A stage-2 workdir as the training loop writes it (Orbax checkpoint + config JSON): the tiny SD U-Net as
    `params`, a perturbed copy as `ema_params`, a cosine v-prediction schedule, the SD folder's VAE and CLIP
    (random weights: a real training run is covered by tests/training)."""
    import dataclasses

    import optax

    from ldm_jax.training.checkpoint import Checkpointer
    from ldm_jax.training.state import create_state

    comps = sd_comps
    params = comps.unet_params
    rng = np.random.default_rng(1)
    ema = jax.tree.map(lambda p: np.asarray(p) + 0.01 * rng.standard_normal(p.shape).astype(np.float32), params)
    state = create_state(params, optax.sgd(0.1), jax.random.PRNGKey(0)).replace(ema_params=ema)
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(comps.unet_config).items()}
    config = {  # the schema of configs/shapes_ldm.py, as the training loop saves it
        "train": {"stage": "ldm"}, "data": {"resolution": 32},
        "model": {"unet": {"preset": "tiny", **unet}, "vae": {"pretrained": str(tiny_sd.sd / "vae")},
                  "text_encoder": {"name": "clip", "path": str(tiny_sd.sd / "text_encoder")}},
        "diffusion": {"schedule": "cosine", "shift": 1.0, "zero_snr": False, "prediction": "v"},
    }
    path = tmp_path_factory.mktemp("workdir")
    ckpt = Checkpointer(str(path / "checkpoints"), async_save=False)
    assert ckpt.save(5, state, {"position": 0}, config)
    ckpt.close()
    return types.SimpleNamespace(path=path, ema=ema)
