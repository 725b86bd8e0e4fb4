"""Hugging Face CLIP image tower (and whole CLIPModel folders) <-> ldm_jax parameter trees, without torch.

    cfg, params = hf_vision.load_clip_vision("clip-vit-base-patch32")   # CLIPModel / CLIPVisionModel folder
    out = CLIPVisionEncoder(cfg).apply({"params": params}, pixels)
    clip = hf_vision.load_clip("clip-vit-base-patch32")                  # both towers + projections

Vision keys may carry the ``vision_model.`` prefix (CLIPModel, CLIPVisionModelWithProjection) or not
(transformers 5 CLIPVisionModel); ``visual_projection.weight`` sits outside it. The text tower goes through
``ldm_jax.convert.hf`` (``text_model.*``), plus ``text_projection.weight`` and ``logit_scale``. Checking is
strict: every missing, unexpected or mis-shaped tensor is listed in one ``ConversionError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import hf
from ldm_jax.convert.common import (
    ConversionError,
    check_tree,
    conv_to_flax,
    conv_to_torch,
    flatten,
    linear_to_flax,
    linear_to_torch,
    read_safetensors,
    unflatten,
)
from ldm_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionEncoder
from ldm_jax.models.text import CLIPTextConfig
from ldm_jax.types import ConfigError

_PREFIX = "vision_model."
_PROJECTION = "visual_projection.weight"
_NORMS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_DENSES = {"self_attn.q_proj": "attn/query", "self_attn.k_proj": "attn/key", "self_attn.v_proj": "attn/value",
           "self_attn.out_proj": "attn/out", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
# HF name inside a layer -> (our path inside the layer, torch -> flax, flax -> torch)
_LAYER = {
    **{f"{h}.weight": (f"{o}/scale", None, None) for h, o in _NORMS.items()},
    **{f"{h}.bias": (f"{o}/bias", None, None) for h, o in _NORMS.items()},
    **{f"{h}.weight": (f"{o}/kernel", linear_to_flax, linear_to_torch) for h, o in _DENSES.items()},
    **{f"{h}.bias": (f"{o}/bias", None, None) for h, o in _DENSES.items()},
}
# HF name outside the layers -> (our path, torch -> flax, flax -> torch)
_TOP = {
    "embeddings.class_embedding": ("class_embedding", None, None),
    "embeddings.position_embedding.weight": ("position_embedding", None, None),
    "embeddings.patch_embedding.weight": ("patch_embedding/kernel", conv_to_flax, conv_to_torch),
    "pre_layrnorm.weight": ("pre_norm/scale", None, None), "pre_layrnorm.bias": ("pre_norm/bias", None, None),
    "post_layernorm.weight": ("post_norm/scale", None, None),
    "post_layernorm.bias": ("post_norm/bias", None, None),
}
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_IGNORED = ("embeddings.position_ids",)


def clip_vision_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: CLIPVisionConfig) -> dict:
    """HF vision state dict (CLIPModel, CLIPVisionModel[WithProjection]) -> CLIPVisionEncoder params (numpy).

    Keys of other towers (``text_model.*``, ``text_projection``, ``logit_scale``) are skipped.
    """
    flat = {}
    for key, value in state_dict.items():
        if key == _PROJECTION:
            flat["projection/kernel"] = linear_to_flax(np.asarray(value))
            continue
        if key.startswith(("text_model.", "text_projection", "logit_scale")):
            continue
        name = key.removeprefix(_PREFIX)
        if name in _IGNORED:
            continue
        target = _TOP.get(name)
        match = _LAYER_RE.match(name)
        if target is None and match and match[2] in _LAYER:
            ours, fn, back = _LAYER[match[2]]
            target = (f"layers_{match[1]}/{ours}", fn, back)
        if target is None:
            flat[key] = np.asarray(value)  # reported as unexpected
            continue
        ours, fn, _ = target
        if ours in flat:
            raise ConversionError(f"state dict holds '{key}' twice (with and without the '{_PREFIX}' prefix)")
        flat[ours] = fn(np.asarray(value)) if fn else np.asarray(value)
    check_tree(param_shapes(cfg), flat, "CLIP vision tower")
    return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def clip_vision_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """CLIPVisionEncoder params -> HF names (``vision_model.*`` and ``visual_projection.weight``)."""
    reverse = {ours: (_PREFIX + name, back) for name, (ours, _, back) in _TOP.items()}
    reverse["projection/kernel"] = (_PROJECTION, linear_to_torch)
    out = {}
    for key, value in flatten(params).items():
        value = np.asarray(value, np.float32)
        layer, _, rest = key.partition("/")
        inner = {ours: (name, back) for name, (ours, _, back) in _LAYER.items()}
        if key in reverse:
            name, back = reverse[key]
        elif layer.startswith("layers_") and rest in inner:
            name, back = inner[rest]
            name = f"{_PREFIX}encoder.layers.{layer.removeprefix('layers_')}.{name}"
        else:
            raise ConversionError(f"no HF name for parameter '{key}'")
        out[name] = back(value) if back else value
    return out


def param_shapes(cfg: CLIPVisionConfig) -> dict[str, tuple]:
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    shapes = jax.eval_shape(lambda v: CLIPVisionEncoder(cfg).init(jax.random.key(0), v), x)
    return {k: v.shape for k, v in flatten(nn.meta.unbox(shapes["params"])).items()}


def clip_vision_config_from_hf(hf_config: Mapping, projection_dim: int = 0) -> CLIPVisionConfig:
    """transformers CLIPVisionConfig dict (or a CLIPConfig dict with ``vision_config``) -> our config."""
    v = hf_config.get("vision_config", hf_config)
    try:
        return CLIPVisionConfig(
            hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
            num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
            image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v.get("num_channels", 3),
            projection_dim=projection_dim, hidden_act=v.get("hidden_act", "quick_gelu"),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        )
    except KeyError as e:
        raise ConfigError(f"CLIP vision config.json lacks the field {e}") from None


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not path.is_dir():
        raise FileNotFoundError(f"'{path}' is not a folder: pass a transformers CLIP model folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in '{path}': pass a transformers CLIP model folder")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in '{path}': save the model with safetensors")
    return json.loads((path / "config.json").read_text()), read_safetensors(path / "model.safetensors")


def load_clip_vision(path: str | os.PathLike) -> tuple[CLIPVisionConfig, dict]:
    """The image tower of an HF CLIPModel / CLIPVisionModel[WithProjection] folder -> (config, params)."""
    config, state_dict = _read(Path(path))
    proj = state_dict.get(_PROJECTION)
    cfg = clip_vision_config_from_hf(config, projection_dim=0 if proj is None else int(proj.shape[0]))
    return cfg, clip_vision_params_from_state_dict(state_dict, cfg)


@dataclasses.dataclass(frozen=True)
class CLIPWeights:
    """Both CLIP towers: text_projection is a (D_text, P) matrix, logit_scale the log temperature."""

    vision_config: CLIPVisionConfig
    vision_params: dict
    text_config: CLIPTextConfig
    text_params: dict
    text_projection: np.ndarray
    logit_scale: float


def load_clip(path: str | os.PathLike) -> CLIPWeights:
    """Reads an HF CLIPModel folder (``text_model.*``, ``vision_model.*``, both projections)."""
    path = Path(path)
    config, state_dict = _read(path)
    missing = [k for k in (_PROJECTION, "text_projection.weight") if k not in state_dict]
    if missing or "text_config" not in config:
        raise ConversionError(f"'{path}' is not a full CLIPModel (lacks {missing or 'text_config'}); "
                              "CLIP score needs both towers and their projections")
    vision_cfg = clip_vision_config_from_hf(config, projection_dim=int(state_dict[_PROJECTION].shape[0]))
    text_cfg = hf.clip_text_config_from_hf(config)
    text_sd = {k: v for k, v in state_dict.items() if k.startswith("text_model.")}
    return CLIPWeights(
        vision_config=vision_cfg,
        vision_params=clip_vision_params_from_state_dict(state_dict, vision_cfg),
        text_config=text_cfg,
        text_params=hf.clip_text_params_from_state_dict(text_sd, text_cfg),
        text_projection=linear_to_flax(np.asarray(state_dict["text_projection.weight"], np.float32)),
        logit_scale=float(np.asarray(state_dict.get("logit_scale", np.log(100.0)))),
    )
