"""The denoiser backbones behind one interface: U-Net, DiT and MMDiT.

Every backbone is a linen module called as ``module.apply({"params": p}, x, timesteps, context)`` with NHWC
latents x, (B,) timesteps in the network's own units and text hidden states context (B, L, D), and returns
latents of x's shape. The model layer, training and the planner go through these functions, never through a
backbone's class, so a new backbone is added here and nowhere else:

    kind(cfg)            "unet", "dit" or "mmdit", from the typed config's class
    network(cfg, dtype)  the module (dtype: compute dtype overriding the config's; parameters keep theirs)
    param_shapes(cfg)    {"path/to/param": shape} without allocating
    context_dim(cfg)     the text width the network attends to
    channels(cfg)        (in_channels, out_channels)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.dit import DiT, DiTConfig, dit_param_shapes
from ldm_jax.models.mmdit import MMDiT, MMDiTConfig, mmdit_param_shapes
from ldm_jax.models.unet import UNet, UNetConfig, unet_param_shapes
from ldm_jax.types import ConfigError

BACKBONES = ("unet", "dit", "mmdit")
_CLASSES = {"unet": UNetConfig, "dit": DiTConfig, "mmdit": MMDiTConfig}
BackboneConfig = UNetConfig | DiTConfig | MMDiTConfig


def kind(cfg: BackboneConfig) -> str:
    for name, cls in _CLASSES.items():
        if isinstance(cfg, cls):
            return name
    raise ConfigError(f"{type(cfg).__name__} is not a backbone config (one of {sorted(_CLASSES)})")


def network(cfg: BackboneConfig, dtype: Any = None) -> nn.Module:
    name = kind(cfg)
    if name == "unet":
        return UNet(cfg, dtype=dtype)
    if dtype is not None:
        cfg = cfg.replace(dtype=jnp.dtype(dtype).name)
    return DiT(cfg) if name == "dit" else MMDiT(cfg)


def param_shapes(cfg: BackboneConfig) -> dict[str, tuple[int, ...]]:
    return {"unet": unet_param_shapes, "dit": dit_param_shapes, "mmdit": mmdit_param_shapes}[kind(cfg)](cfg)


def context_dim(cfg: BackboneConfig) -> int | None:
    return cfg.joint_attention_dim if kind(cfg) == "mmdit" else cfg.cross_attention_dim


def channels(cfg: BackboneConfig) -> tuple[int, int]:
    return cfg.in_channels, cfg.out_channels
