"""diffusers ControlNetModel folders <-> ldm_jax ControlNet parameter trees.

A folder holds ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors`` (or a sharded index, or a
legacy ``.bin``); a pipeline folder with a ``controlnet/`` subfolder works too.

The config is diffusers' U-Net config without the decoder keys plus four ControlNet keys
(`conditioning_channels`, `conditioning_embedding_out_channels`, `global_pool_conditions`,
`controlnet_conditioning_channel_order`, only "rgb"); it is translated by the U-Net converter's rules, so the
same options are supported. Names follow the U-Net converter (`ldm_jax.convert.diffusers.torch_name`):
``controlnet_cond_embedding.blocks.2.weight`` is ``controlnet_cond_embedding/blocks_2/kernel``,
``controlnet_down_blocks.5.weight`` is ``controlnet_down_blocks_5/kernel``, the encoder keys are the U-Net's.
Conversion is strict: every expected key present with the right shape and nothing else, or one
ConversionError listing every problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ldm_jax.convert.common import model_dir
from ldm_jax.convert.diffusers import (
    _read_config,
    _save,
    params_from_state_dict,
    read_weights,
    state_dict_from_params,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from ldm_jax.models.controlnet import ControlNetConfig, controlnet_param_shapes
from ldm_jax.types import ConfigError

CLASS_NAME = "ControlNetModel"
# ControlNet-only config.json keys and diffusers' defaults.
_CONTROL_DEFAULTS = dict(
    conditioning_channels=3,
    conditioning_embedding_out_channels=(16, 32, 96, 256),
    global_pool_conditions=False,
    controlnet_conditioning_channel_order="rgb",
)
_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]  # diffusers' default down_block_types
# U-Net config keys a ControlNetModel config does not have (the decoder's), dropped on export.
_UNET_ONLY = ("out_channels", "up_block_types", "sample_size")


# ---------------------------------------------------------------------------- configs
def controlnet_config_from_diffusers(d: Mapping) -> ControlNetConfig:
    """Translates a diffusers ControlNetModel config.json dict; unsupported options raise ConfigError."""
    d = dict(d)
    if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ConfigError(f"diffusers config: _class_name={d['_class_name']!r}, expected '{CLASS_NAME}'")
    control = {k: d.pop(k, default) for k, default in _CONTROL_DEFAULTS.items()}
    if control["controlnet_conditioning_channel_order"] != "rgb":
        raise ConfigError(
            "diffusers ControlNet config: controlnet_conditioning_channel_order="
            f"{control['controlnet_conditioning_channel_order']!r} is not supported by ldm_jax (only 'rgb'); "
            "flip the control image's channels instead"
        )
    if control["conditioning_embedding_out_channels"] is None:
        raise ConfigError("diffusers ControlNet config: conditioning_embedding_out_channels is null")
    unknown = [k for k in _UNET_ONLY if k in d]
    if unknown:
        raise ConfigError(f"diffusers ControlNet config: unknown key '{unknown[0]}'; is this a U-Net config?")
    # A ControlNet is a U-Net's encoder: give the U-Net translator the decoder its down path implies.
    down = list(d.get("down_block_types", _SD_DOWN))
    up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    try:
        unet = unet_config_from_diffusers({**d, "up_block_types": up})
    except ConfigError as e:
        raise ConfigError(str(e).replace("diffusers U-Net config", "diffusers ControlNet config")) from None
    return ControlNetConfig(
        unet=unet,
        conditioning_channels=int(control["conditioning_channels"]),
        conditioning_embedding_out_channels=tuple(int(c) for c in control["conditioning_embedding_out_channels"]),
        global_pool_conditions=bool(control["global_pool_conditions"]),
    )


def controlnet_config_to_diffusers(cfg: ControlNetConfig) -> dict:
    """ControlNetConfig -> a diffusers ControlNetModel config.json dict."""
    d = {k: v for k, v in unet_config_to_diffusers(cfg.unet).items() if k not in _UNET_ONLY}
    return {
        **d,
        "_class_name": CLASS_NAME,
        "conditioning_channels": cfg.conditioning_channels,
        "conditioning_embedding_out_channels": list(cfg.conditioning_embedding_out_channels),
        "global_pool_conditions": cfg.global_pool_conditions,
        "controlnet_conditioning_channel_order": "rgb",
    }


# ---------------------------------------------------------------------------- state dicts
def controlnet_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ControlNetConfig) -> dict:
    """diffusers ControlNetModel state dict (numpy, NCHW) -> ldm_jax ControlNet params (plain arrays)."""
    return params_from_state_dict(
        state_dict,
        controlnet_param_shapes(cfg),
        what="diffusers ControlNet",
        conv_projection=not cfg.unet.use_linear_projection,
        param_dtype=cfg.unet.param_dtype,
    )


def controlnet_state_dict_from_params(params: Mapping, cfg: ControlNetConfig) -> dict[str, np.ndarray]:
    """ldm_jax ControlNet params -> {diffusers name: float32 numpy (NCHW)}."""
    return state_dict_from_params(
        params,
        controlnet_param_shapes(cfg),
        what="ldm_jax ControlNet",
        conv_projection=not cfg.unet.use_linear_projection,
    )


# ---------------------------------------------------------------------------- files
def load_controlnet(
    path: str | os.PathLike, *, variant: str | None = None, **overrides
) -> tuple[ControlNetConfig, dict]:
    """A diffusers ControlNetModel folder (or a pipeline folder with controlnet/) -> (ControlNetConfig, params).

    `overrides` replace U-Net config fields that do not change the weights (dtype, param_dtype, remat,
    attention_impl) in ``cfg.unet``.
    """
    d = model_dir(path, "controlnet", "a diffusers ControlNetModel folder")
    cfg = controlnet_config_from_diffusers(_read_config(d))
    cfg = cfg.replace(unet=cfg.unet.replace(**overrides))
    return cfg, controlnet_params_from_state_dict(read_weights(d, variant), cfg)


def save_controlnet(path: str | os.PathLike, cfg: ControlNetConfig, params: Mapping, *, dtype="float32") -> None:
    """Writes a diffusers ControlNetModel folder (config.json + safetensors; dtype float16 writes the fp16
    variant) that ``ControlNetModel.from_pretrained(path)`` loads."""
    _save(os.fspath(path), controlnet_config_to_diffusers(cfg), controlnet_state_dict_from_params(params, cfg), dtype)
