"""Stage 2 on `shapes` with an MMDiT backbone (SD3's joint-attention transformer, Esser et al. 2024) trained by
rectified flow: shapes_dit's recipe and flow-matching settings with `model.backbone="mmdit"`.

    ldm-jax train --config=configs/shapes_mmdit.py --workdir=runs/shapes_mmdit \
        --config.model.vae.workdir=runs/shapes_ae
    ldm-jax train --config=configs/shapes_mmdit.py:tiny --workdir=/tmp/mmdit --config.model.vae.workdir=/tmp/ae

The network: patch 2 over the 8x8x4 latents, 4 joint blocks of 4 heads x 32 (hidden 128): image and text
streams with their own weights attend jointly, RMS-normalised queries and keys (SD3.5), adaLN from time + the
mean-pooled MiniLM states (its `pooled` input when the text encoder gives none).
"""

import os

from ldm_jax.configlib import load_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant '{arg}' of shapes_mmdit: use 'tiny' or nothing")
    c = load_config(os.path.join(_HERE, "shapes_dit.py") + (f":{arg}" if arg else ""))
    c.model.backbone = "mmdit"
    c.model.mmdit.preset = "tiny"
    c.model.mmdit.num_layers = 4
    c.model.mmdit.num_heads = 4
    c.model.mmdit.head_dim = 32
    c.model.mmdit.caption_projection_dim = 128
    c.model.mmdit.qk_norm = "rms_norm"
    c.model.mmdit.sample_size = c.data.resolution // 4  # latent side under the shapes autoencoder (f = 4)
    c.model.mmdit.pos_embed_max_size = c.model.mmdit.sample_size  # patches: latents up to twice the side
    if arg == "tiny":
        c.model.mmdit.num_layers = 2
        c.model.mmdit.num_heads = 2
        c.model.mmdit.head_dim = 16
        c.model.mmdit.caption_projection_dim = 32
    return c
