"""Fine-tuning SDXL (base) from its diffusers folder: the U-Net trained, the VAE and both text encoders frozen.

    ldm-jax train --config=configs/sdxl_finetune.py:/models/stable-diffusion-xl-base-1.0 --workdir=runs/sdxl \
        --config.data.name=image_folder --config.data.data_dir=/data/my_images

The folder's unet/ (2,567,463,684 parameters), vae/ (scaling factor 0.13025) and text_encoder/ +
text_encoder_2/ (CLIP-L and OpenCLIP-bigG with their tokenizers: `model.text_encoder.name="sdxl"`) are read
from local files. SDXL's training objective: eps on the scaled_linear 1000-step table, timesteps uniform over
the table. The U-Net gets the pooled bigG text and the micro-conditioning (original size, crop, target size),
for training images the uncropped (h, w, 0, 0, h, w) of their resolution. 1024 px, bf16 compute with float32
master weights, remat, parameters and optimizer state sharded over `mesh.fsdp` (plan the memory first:
``ldm-jax plan --config=...``). Sample grids use SDXL's Euler sampler, 30 steps, guidance 5.
"""

import os

from ldm_jax.configlib import base_config


def get_config(arg=None):
    if not arg:
        raise ValueError("configs/sdxl_finetune.py needs the SDXL folder: "
                         "--config=configs/sdxl_finetune.py:/path/to/sdxl")
    folder = os.path.expanduser(arg)
    c = base_config()
    c.train.stage = "ldm"
    c.model.unet.pretrained = os.path.join(folder, "unet")
    c.model.vae.pretrained = os.path.join(folder, "vae")
    c.model.text_encoder.name = "sdxl"
    c.model.text_encoder.path = os.path.join(folder, "text_encoder")
    c.model.text_encoder.path_2 = os.path.join(folder, "text_encoder_2")
    c.data.name = "image_folder"
    c.data.resolution = 1024
    c.data.batch_size = 64
    c.data.caption_dropout = 0.1
    c.data.latent_cache = "auto"  # VAE posteriors, text states and pooled text encoded once
    c.diffusion.schedule = "scaled_linear"
    c.diffusion.prediction = "eps"
    c.diffusion.weighting = "uniform"
    c.diffusion.noise_sampling_options = {"discrete": True}
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 1e-2
    c.train.num_steps = 10000
    c.train.dtype = "bfloat16"
    c.train.remat = True
    c.train.ema.decay = 0.9999
    c.checkpoint.every_steps = 1000
    c.sample.every_steps = 1000
    c.sample.sampler = "euler"
    c.sample.num_steps = 30
    c.sample.guidance_scale = 5.0
    c.sample.prompts = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse")
    c.mesh.data, c.mesh.fsdp = -1, 8
    return c
