"""Backbone study on `shapes`: U-Net vs DiT vs MMDiT at matched training FLOPs, each trained with v-prediction on
the VP cosine schedule and with rectified flow (experiments/backbones/README.md has the report).

    ldm-jax sweep --config=configs/backbone_study.py --workdir=runs/backbones
    python experiments/backbones/analyze.py runs/backbones
    ldm-jax sweep --config=configs/backbone_study.py:tiny --workdir=/tmp/backbones   # seconds (tests)

Every run: the shapes_ldm recipe (shared stage-1 autoencoder and latent cache, MiniLM-L6 text, 10% caption
dropout, batch 32, AdamW lr 1e-3, EMA 0.995) for 800 steps; prompt adherence on 64 images every 200 steps
(ddim 20, CFG 3) and at the end with ddim and dpmpp_2m at 20 NFE on 36 images. The networks are sized so that
one training step costs about the same FLOPs (XLA's count of the lowered step: experiments/backbones/flops.py).

Objectives (zipped): "vp_v" = cosine schedule truncated at logSNR -10, v-prediction, uniform weighting, uniform
t (the noise-schedule study's v setting); "flow" = rectified flow as SD3 (x_t = (1 - t) x0 + t eps, velocity
target, velocity MSE, logit-normal(0, 1) t, SD3's network input).
"""

import os

from ldm_jax.configlib import load_config

_HERE = os.path.dirname(os.path.abspath(__file__))

# The three networks (dotted overrides of shapes_ldm), sized to ~equal FLOPs per step (flops.json).
BACKBONES = {
    "unet": {"model.backbone": "unet"},  # shapes_ldm's U-Net: channels (64, 128), attention at level 2
    "dit": {"model.backbone": "dit", "model.dit.hidden_size": 128, "model.dit.depth": 4, "model.dit.num_heads": 4,
            "model.dit.patch_size": 1, "model.dit.sample_size": 8},
    "mmdit": {"model.backbone": "mmdit", "model.mmdit.num_layers": 4, "model.mmdit.num_heads": 4,
              "model.mmdit.head_dim": 32, "model.mmdit.caption_projection_dim": 128, "model.mmdit.patch_size": 1,
              "model.mmdit.sample_size": 8, "model.mmdit.pos_embed_max_size": 8, "model.mmdit.qk_norm": "rms_norm"},
}
_OBJECTIVES = dict(  # zipped: vp_v, flow
    schedule=("cosine", "flow"), logsnr_min=(-10.0, None), prediction=("v", "flow"), weighting=("uniform", "flow"),
    noise_sampling=("uniform", "logit_normal"), network_input=("vp", "flow"))


def _set(c, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value


def get_config(arg=None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant '{arg}' of backbone_study: use 'tiny' or nothing")
    tiny = arg == "tiny"
    c = load_config(os.path.join(_HERE, "shapes_ldm.py") + (":tiny" if tiny else ""))
    for name in ("dit", "mmdit"):  # each run reads the section of its own backbone
        for key, value in BACKBONES[name].items():
            if key != "model.backbone":
                _set(c, key, value)
    c.model.vae.workdir = ""  # the sweep trains one shared autoencoder
    c.sample.every_steps = 0
    c.train.num_steps = 2 if tiny else 800
    c.checkpoint.every_steps = c.train.num_steps
    if tiny:
        c.model.dit.hidden_size, c.model.dit.depth, c.model.dit.num_heads, c.model.dit.sample_size = 32, 1, 2, 4
        c.model.mmdit.update(num_layers=1, num_heads=2, head_dim=16, caption_projection_dim=32, sample_size=4,
                             pos_embed_max_size=4)
    else:
        c.eval.metrics, c.eval.every_steps, c.eval.num_samples = ("adherence",), 200, 64
        c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale = "ddim", 20, 3.0
    ae = os.path.join(_HERE, "shapes_autoencoder.py") + (":tiny" if tiny else "")
    c.sweep = dict(
        title="Backbones x objectives on shapes at matched FLOPs",
        autoencoder=ae,
        product=dict(model=dict(backbone=tuple(BACKBONES))),
        zip=dict(diffusion=_OBJECTIVES),
        seeds=(0,),
        eval=dict(samplers=("ddim", "dpmpp_2m"), nfes=(20,), extra=(), num_samples=36, guidance_scale=3.0,
                  primary="mean_acc"),
    )
    if tiny:
        c.sweep.eval = dict(samplers=("ddim",), nfes=(2,), extra=(), num_samples=18, guidance_scale=2.0,
                            primary="shape_acc")
    return c
