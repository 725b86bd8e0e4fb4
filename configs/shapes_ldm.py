"""Stage 2 on `shapes`: a text-conditioned latent diffusion model on the stage-1 autoencoder's latents,
with the embedded MiniLM-L6 text encoder and 10% caption dropout for classifier-free guidance.

    ldm-jax train --config=configs/shapes_autoencoder.py --workdir=runs/shapes_ae
    ldm-jax train --config=configs/shapes_ldm.py --workdir=runs/shapes_ldm \
        --config.model.vae.workdir=runs/shapes_ae
    ldm-jax train --config=configs/shapes_ldm.py:tiny --workdir=/tmp/ldm --config.model.vae.workdir=/tmp/ae

Sample grids for sample.prompts land in workdir/samples/ every sample.every_steps.
"""

from ldm_jax.configlib import base_config


def get_config(arg=None):
    c = base_config()
    c.train.stage = "ldm"
    c.data.name = "shapes"
    c.data.resolution = 32
    c.data.batch_size = 32
    c.data.caption_dropout = 0.1
    c.data.builder_kwargs = {"num_train": 4000}
    c.data.latent_cache = "auto"  # encode images and captions once: the step runs the U-Net only
    c.model.vae.workdir = "runs/shapes_ae"
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
    c.sample.prompts = ("a red circle in the top left", "a blue triangle in the center",
                        "a green square at the bottom", "a yellow circle on the right")
    c.sample.guidance_scale = 3.0
    if arg == "tiny":
        c.data.resolution = 16
        c.data.batch_size = 8
        c.data.builder_kwargs = {"num_train": 64, "num_test": 16, "num_heldout": 16}
        # one level (resnet + cross-attention, mid block, up block): XLA:CPU compile time grows with the number
        # of parameter arrays; the train step compiles in ~25 s instead of ~35 s with two levels on 2 cores
        c.model.unet.block_out_channels = (32,)
        c.model.unet.attention_levels = (True,)
        c.model.unet.num_heads = 2
        c.model.unet.norm_num_groups = 8
        c.model.text_encoder.max_length = 8
        c.train.num_steps = 4
        c.train.log_every_steps = 2
        c.checkpoint.every_steps = 2
        c.sample.every_steps = 4
        c.sample.num_steps = 3
        c.sample.prompts = ("a red circle in the top left", "a blue square")
        c.mesh.data = 1
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant '{arg}' of shapes_ldm: use 'tiny' or nothing")
    return c
