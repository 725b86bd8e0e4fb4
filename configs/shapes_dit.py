"""Stage 2 on `shapes` with a DiT backbone (Peebles & Xie 2023) trained by rectified flow (Esser et al. 2024):
the shapes_ldm recipe (stage-1 autoencoder, MiniLM-L6 text, 10% caption dropout, latent cache) with
`model.backbone="dit"` in place of the U-Net.

    ldm-jax train --config=configs/shapes_dit.py --workdir=runs/shapes_dit --config.model.vae.workdir=runs/shapes_ae
    ldm-jax train --config=configs/shapes_dit.py:tiny --workdir=/tmp/dit --config.model.vae.workdir=/tmp/ae

The network: patch 2 over the 8x8x4 latents (16 tokens), hidden 128, depth 4, 4 heads, adaLN-Zero conditioned
on time + mean-pooled text, cross-attention to the MiniLM states in every block, sin-cos positions.
Diffusion: x_t = (1 - t) x0 + t eps with SD3's network input (``network_input="flow"``: the network sees
x_flow and 1000 t), velocity target, velocity-MSE loss ("flow" weighting), logit-normal(0, 1) t; sampled with
flow_heun (Heun in flow time) on SD3's flowmatch grid.
"""

import os

from ldm_jax.configlib import load_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def flow_matching(c):
    """SD3's rectified-flow training and sampling settings on a run config (used by shapes_mmdit too)."""
    c.diffusion.schedule = "flow"
    c.diffusion.prediction = "flow"
    c.diffusion.network_input = "flow"
    c.diffusion.weighting = "flow"
    c.diffusion.noise_sampling = "logit_normal"
    c.diffusion.noise_sampling_options = {"mean": 0.0, "std": 1.0}
    c.sample.sampler = "flow_heun"
    return c


def get_config(arg=None):
    variant = "tiny" if arg == "tiny" else None
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant '{arg}' of shapes_dit: use 'tiny' or nothing")
    c = flow_matching(load_config(os.path.join(_HERE, "shapes_ldm.py") + (f":{variant}" if variant else "")))
    c.model.backbone = "dit"
    c.model.dit.preset = "tiny"
    c.model.dit.hidden_size = 128
    c.model.dit.depth = 4
    c.model.dit.num_heads = 4
    c.model.dit.sample_size = c.data.resolution // 4  # latent side under the shapes autoencoder (f = 4)
    if variant == "tiny":
        c.model.dit.hidden_size = 32
        c.model.dit.depth = 1
        c.model.dit.num_heads = 2
    return c
