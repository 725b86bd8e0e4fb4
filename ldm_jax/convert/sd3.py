"""diffusers SD3Transformer2DModel folders <-> ldm_jax MMDiT parameter trees (SD3, SD3.5).

A model folder holds ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors`` or a sharded
``...safetensors.index.json``; an SD3 pipeline folder works too (its ``transformer/`` subfolder is used).

Names follow the U-Net converter (`ldm_jax.convert.diffusers.torch_name`): ``transformer_blocks.3.attn.to_out.0.
weight`` is ``transformer_blocks_3/attn/to_out_0/kernel`` (linears transposed, the patch conv OIHW -> HWIO,
RMSNorm ``weight`` -> ``scale``). The checkpoint's ``pos_embed.pos_embed`` buffer (the max^2 sin-cos table) is
not a parameter here: the MMDiT computes it, so loading checks the stored table against the formula (a
mismatch means the config's sample_size / pos_embed_max_size do not describe the checkpoint) and saving writes
it back. Conversion is strict: every expected key present with the right shape and nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from ldm_jax.convert.common import ConversionError, model_dir, write_safetensors
from ldm_jax.convert.diffusers import WEIGHTS_NAME, params_from_state_dict, read_weights, state_dict_from_params
from ldm_jax.models.layers import canonical_dtype
from ldm_jax.models.mmdit import MMDiTConfig, mmdit_param_shapes, pos_embed_table
from ldm_jax.types import ConfigError

CLASS_NAME = "SD3Transformer2DModel"
POS_KEY = "pos_embed.pos_embed"
# Largest |stored - computed| accepted for the position table: loose enough for bf16/fp16 checkpoints (the
# entries lie in [-1, 1]), far below what another grid spacing or crop would give (order 1).
POS_TOLERANCE = 1e-2

# config.json key -> (MMDiTConfig field, diffusers' default when the key is absent)
_KEYS = {
    "in_channels": ("in_channels", 16),
    "out_channels": ("out_channels", 16),
    "patch_size": ("patch_size", 2),
    "sample_size": ("sample_size", 128),
    "num_layers": ("num_layers", 18),
    "num_attention_heads": ("num_heads", 18),
    "attention_head_dim": ("head_dim", 64),
    "joint_attention_dim": ("joint_attention_dim", 4096),
    "caption_projection_dim": ("caption_projection_dim", 1152),
    "pooled_projection_dim": ("pooled_projection_dim", 2048),
    "pos_embed_max_size": ("pos_embed_max_size", 96),
    "qk_norm": ("qk_norm", None),
    "dual_attention_layers": ("dual_attention_layers", ()),
}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


# ---------------------------------------------------------------------------- configs
def sd3_config_from_diffusers(d: Mapping) -> MMDiTConfig:
    """Translates an SD3Transformer2DModel config.json dict; unknown keys and unsupported values raise
    ConfigError."""
    if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ConfigError(f"diffusers config: _class_name={d['_class_name']!r}, expected '{CLASS_NAME}'")
    unknown = sorted(set(d) - set(_KEYS) - _IGNORED)
    if unknown:
        raise ConfigError(f"diffusers SD3 transformer config: unknown key '{unknown[0]}'; not a supported model")
    if d.get("pos_embed_max_size", 96) is None:
        raise ConfigError("diffusers SD3 transformer config: pos_embed_max_size=None is not supported (SD3 crops "
                          "its positions from a max-size grid)")
    values = {field: d.get(key, default) for key, (field, default) in _KEYS.items()}
    if values["out_channels"] is None:  # diffusers: out_channels defaults to in_channels
        values["out_channels"] = values["in_channels"]
    values["dual_attention_layers"] = tuple(values["dual_attention_layers"])
    return MMDiTConfig(**values)


def sd3_config_to_diffusers(cfg: MMDiTConfig) -> dict:
    """MMDiTConfig -> an SD3Transformer2DModel config.json dict."""
    out = {"_class_name": CLASS_NAME, "_diffusers_version": "0.31.0"}
    for key, (field, _) in _KEYS.items():
        value = getattr(cfg, field)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


# ---------------------------------------------------------------------------- state dicts
def check_positions(table: np.ndarray, cfg: MMDiTConfig) -> None:
    """Raises ConversionError unless a stored (1, max^2, D) position table equals the one `cfg` computes."""
    want = pos_embed_table(cfg)
    got = np.asarray(table, np.float32)
    if got.shape not in (want.shape, (1, *want.shape)):
        raise ConversionError(f"{POS_KEY}: expected shape (1, {want.shape[0]}, {want.shape[1]}), got {got.shape}")
    err = float(np.max(np.abs(got.reshape(want.shape) - want)))
    if err > POS_TOLERANCE:
        raise ConversionError(
            f"{POS_KEY} differs from the sin-cos table of sample_size={cfg.sample_size}, patch_size="
            f"{cfg.patch_size}, pos_embed_max_size={cfg.pos_embed_max_size} (max |diff| {err:.3g}); ldm_jax "
            "computes positions and cannot load a checkpoint with other ones"
        )


def sd3_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: MMDiTConfig) -> dict:
    """diffusers SD3Transformer2DModel state dict (numpy, NCHW) -> MMDiT params (plain arrays)."""
    state_dict = dict(state_dict)
    table = state_dict.pop(POS_KEY, None)
    if table is not None:
        check_positions(table, cfg)
    return params_from_state_dict(state_dict, mmdit_param_shapes(cfg), what="diffusers SD3 transformer",
                                  param_dtype=cfg.param_dtype)


def sd3_state_dict_from_params(params: Mapping, cfg: MMDiTConfig) -> dict[str, np.ndarray]:
    """MMDiT params -> {diffusers name: float32 numpy}, with the position buffer diffusers stores."""
    out = state_dict_from_params(params, mmdit_param_shapes(cfg), what="ldm_jax MMDiT")
    out[POS_KEY] = pos_embed_table(cfg)[None]
    return out


# ---------------------------------------------------------------------------- files
def load_sd3_transformer(path: str | os.PathLike, *, variant: str | None = None,
                         **overrides) -> tuple[MMDiTConfig, dict]:
    """A diffusers SD3Transformer2DModel folder (or an SD3 pipeline folder) -> (MMDiTConfig, params).

    `overrides` replace config fields that do not change the weights (dtype, param_dtype, remat,
    attention_impl, zero_init).
    """
    d = model_dir(path, "transformer", "a diffusers SD3Transformer2DModel folder or an SD3 pipeline folder")
    with open(os.path.join(d, "config.json")) as f:
        cfg = sd3_config_from_diffusers(json.load(f)).replace(**overrides)
    return cfg, sd3_params_from_state_dict(read_weights(d, variant), cfg)


def save_sd3_transformer(path: str | os.PathLike, cfg: MMDiTConfig, params: Mapping, *, dtype="float32") -> None:
    """Writes a folder (config.json + one safetensors file; dtype float16 writes the fp16 variant) that
    ``SD3Transformer2DModel.from_pretrained(path)`` loads."""
    path = os.fspath(path)
    dt = np.dtype(canonical_dtype(dtype))
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ConfigError(f"save dtype {dtype!r}: use 'float32' or 'float16' (diffusers' fp16 variant)")
    tensors = {k: v.astype(dt) for k, v in sd3_state_dict_from_params(params, cfg).items()}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(sd3_config_to_diffusers(cfg), f, indent=2, sort_keys=True)
    variant = ".fp16" if dt == np.dtype(np.float16) else ""
    write_safetensors(os.path.join(path, f"{WEIGHTS_NAME}{variant}.safetensors"), tensors, {"format": "pt"})
