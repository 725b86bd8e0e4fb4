"""diffusers-layout U-Net / VAE folders <-> ldm_jax parameter trees.

A diffusers model folder holds ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors`` (or a
sharded ``...safetensors.index.json``, or a legacy ``.bin`` read through torch). A Stable-Diffusion
pipeline folder works too: its ``unet/`` and ``vae/`` subfolders are used.

Names: a PyTorch key ``down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight`` is the Flax
path ``down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj/kernel``: list indices join their
container name with '_', and ``weight`` is ``kernel`` (convs: OIHW -> HWIO; linears: transposed),
``scale`` (norms) or ``embedding``. Conversion is strict: every expected key present with the right
shape and nothing else, or one ConversionError listing every problem.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Mapping

import numpy as np

from ldm_jax.convert.common import (
    ConversionError,
    check_tree,
    conv_to_flax,
    conv_to_torch,
    flatten,
    linear_to_flax,
    linear_to_torch,
    model_dir,
    read_safetensors,
    unflatten,
    write_safetensors,
)
from ldm_jax.models.layers import canonical_dtype, unbox
from ldm_jax.models.unet import UNetConfig, unet_param_shapes
from ldm_jax.models.vae import AutoencoderConfig, vae_param_shapes
from ldm_jax.types import ConfigError

WEIGHTS_NAME = "diffusion_pytorch_model"
_INDEXED = (  # PyTorch ModuleLists (ControlNet: controlnet_down_blocks, controlnet_cond_embedding.blocks)
    "controlnet_down_blocks",
    "blocks",
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
)
_INDEX_RE = re.compile(rf"^({'|'.join(_INDEXED)})_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------- names and layouts
def torch_name(flax_key: str) -> str:
    """'down_blocks_0/resnets_1/conv1/kernel' -> 'down_blocks.0.resnets.1.conv1.weight'."""
    *mods, leaf = flax_key.split("/")
    parts = []
    for m in mods:
        match = _INDEX_RE.match(m)
        parts.extend([match.group(1), match.group(2)] if match else [m])
    return ".".join([*parts, _LEAF[leaf]])


def _is_conv_projection(flax_key: str) -> bool:
    return bool(re.search(r"attentions_\d+/proj_(in|out)/kernel$", flax_key))


def expected_torch_shapes(flax_shapes: Mapping[str, tuple], conv_projection: bool = False) -> dict[str, tuple]:
    """{torch name: PyTorch shape} for a model whose Flax shapes are `flax_shapes`.

    `conv_projection`: the spatial transformers' proj_in/proj_out are 1x1 convs (SD1), not linears (SD2).
    """
    out = {}
    for k, shape in flax_shapes.items():
        if k.endswith("kernel") and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif k.endswith("kernel") and len(shape) == 2:
            shape = (shape[1], shape[0], 1, 1) if conv_projection and _is_conv_projection(k) else shape[::-1]
        out[torch_name(k)] = tuple(shape)
    return out


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    flax_shapes: Mapping[str, tuple],
    *,
    what: str,
    conv_projection: bool = False,
    param_dtype="float32",
) -> dict:
    """Strictly converts a diffusers-named state dict (numpy arrays) into a nested Flax parameter tree."""
    expected = expected_torch_shapes(flax_shapes, conv_projection)
    got = {k: np.asarray(v) for k, v in state_dict.items()}
    check_tree(expected, got, what)
    dtype = canonical_dtype(param_dtype)
    flat = {}
    for k in flax_shapes:
        v = got[torch_name(k)]
        if k.endswith("kernel"):
            v = conv_to_flax(v) if v.ndim == 4 and len(flax_shapes[k]) == 4 else linear_to_flax(v)
        flat[k] = np.asarray(v, dtype=np.float32).astype(dtype)
    return unflatten(flat)


def state_dict_from_params(
    params: Mapping, flax_shapes: Mapping[str, tuple], *, what: str, conv_projection: bool = False
) -> dict[str, np.ndarray]:
    """Inverse of `params_from_state_dict`: a nested Flax tree -> {diffusers name: float32 numpy}."""
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(unbox(params)).items()}
    check_tree(flax_shapes, flat, what)
    out = {}
    for k, v in flat.items():
        if k.endswith("kernel") and v.ndim == 4:
            v = conv_to_torch(v)
        elif k.endswith("kernel"):
            v = linear_to_torch(v)
            if conv_projection and _is_conv_projection(k):
                v = v[:, :, None, None]
        out[torch_name(k)] = np.ascontiguousarray(v)
    return out


_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_vae(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers VAE checkpoints name the mid-block attention query/key/value/proj_attn."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
            v = np.asarray(v)
            v = v.reshape(v.shape[:2]) if v.ndim == 4 else v
        out[k] = v
    return out


# ---------------------------------------------------------------------------- state dicts
def unet_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: UNetConfig) -> dict:
    """diffusers UNet2DConditionModel state dict (numpy, NCHW) -> ldm_jax UNet params (plain arrays)."""
    return params_from_state_dict(
        state_dict,
        unet_param_shapes(cfg),
        what="diffusers U-Net",
        conv_projection=not cfg.use_linear_projection,
        param_dtype=cfg.param_dtype,
    )


def unet_state_dict_from_params(params: Mapping, cfg: UNetConfig) -> dict[str, np.ndarray]:
    return state_dict_from_params(
        params, unet_param_shapes(cfg), what="ldm_jax U-Net", conv_projection=not cfg.use_linear_projection
    )


def vae_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: AutoencoderConfig) -> dict:
    """diffusers AutoencoderKL state dict (numpy, NCHW) -> ldm_jax AutoencoderKL params (plain arrays)."""
    return params_from_state_dict(
        _rename_legacy_vae(state_dict), vae_param_shapes(cfg), what="diffusers VAE", param_dtype=cfg.param_dtype
    )


def vae_state_dict_from_params(params: Mapping, cfg: AutoencoderConfig) -> dict[str, np.ndarray]:
    return state_dict_from_params(params, vae_param_shapes(cfg), what="ldm_jax VAE")


# ---------------------------------------------------------------------------- configs
# diffusers config keys this port does not implement, with the only value it accepts.
_UNET_FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "num_attention_heads": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_scale_factor": 1.0,
    "downsample_padding": 1,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
    "cross_attention_norm": None,
}
# Keys that do not change inference numerics in float32 (or are bookkeeping).
_UNET_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "upcast_attention",
    "dropout",
    "addition_embed_type_num_heads",
}
_UNET_DEFAULTS = dict(
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1280,
    attention_head_dim=8,
    use_linear_projection=False,
    transformer_layers_per_block=1,
    num_class_embeds=None,
    addition_embed_type=None,
    addition_time_embed_dim=None,
    projection_class_embeddings_input_dim=None,
    sample_size=None,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


def _check_fixed(d: Mapping, fixed: Mapping, known: set, what: str) -> None:
    for k, v in d.items():
        if k in fixed:
            want = fixed[k]
            same = (v == want) or (isinstance(v, (list, tuple)) and all(x == want for x in v))
            same = same or (want is None and v is False) or (want is False and v is None)
            if not same:
                raise ConfigError(f"{what} config: {k}={v!r} is not supported by ldm_jax (only {want!r})")
        elif k not in known:
            raise ConfigError(f"{what} config: unknown key '{k}'; this is not a supported diffusers model")


def _single(value, what: str):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"diffusers U-Net config: per-block {what}={value!r} is not supported")
        return value[0]
    return value


def unet_config_from_diffusers(d: Mapping) -> UNetConfig:
    """Translates a diffusers UNet2DConditionModel config.json dict; unsupported options raise ConfigError."""
    known = set(_UNET_DEFAULTS) | _UNET_IGNORED
    _check_fixed(d, _UNET_FIXED, known, "diffusers U-Net")
    c = {**_UNET_DEFAULTS, **{k: v for k, v in d.items() if k in _UNET_DEFAULTS}}
    down = tuple(c["down_block_types"])
    if any(t not in _DOWN for t in down):
        raise ConfigError(f"diffusers U-Net config: down_block_types={down!r}; only {sorted(_DOWN)} are supported")
    levels = tuple(_DOWN[t] for t in down)
    want_up = tuple(_UP[a] for a in reversed(levels))
    if tuple(c["up_block_types"]) != want_up:
        raise ConfigError(f"diffusers U-Net config: up_block_types must mirror the down blocks, i.e. {want_up}")
    if not isinstance(c["layers_per_block"], int):
        raise ConfigError("diffusers U-Net config: per-block layers_per_block is not supported")
    heads = c["attention_head_dim"]  # diffusers' historical name: it is the number of heads
    return UNetConfig(
        **_addition_fields(c),
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c["layers_per_block"],
        attention_levels=levels,
        num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else int(heads),
        transformer_layers_per_block=(
            tuple(c["transformer_layers_per_block"])
            if isinstance(c["transformer_layers_per_block"], (list, tuple))
            else int(c["transformer_layers_per_block"])
        ),
        cross_attention_dim=int(_single(c["cross_attention_dim"], "cross_attention_dim")),
        use_linear_projection=bool(c["use_linear_projection"]),
        num_class_embeds=c["num_class_embeds"],
        norm_num_groups=c["norm_num_groups"],
        norm_eps=float(c["norm_eps"]),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]),
        sample_size=int(c["sample_size"] or 64),
    )


def _addition_fields(c: Mapping) -> dict:
    """diffusers' added-embedding keys -> UNetConfig fields. Only SDXL's 'text_time' is implemented; without
    an addition_embed_type diffusers ignores the two widths, and so do we."""
    kind = c["addition_embed_type"]
    if kind is None:
        return {}
    if kind != "text_time":
        raise ConfigError(
            f"diffusers U-Net config: addition_embed_type={kind!r} is not supported by ldm_jax (only 'text_time')"
        )
    return dict(
        addition_embed_type=kind,
        addition_time_embed_dim=c["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"],
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNetConfig -> a diffusers UNet2DConditionModel config.json dict."""
    heads = cfg.heads_per_level()
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
        "up_block_types": [_UP[a] for a in reversed(cfg.attention_levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else list(heads),
        "transformer_layers_per_block": (
            cfg.transformer_layers_per_block
            if isinstance(cfg.transformer_layers_per_block, int)
            else list(cfg.transformer_layers_per_block)
        ),
        "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "num_class_embeds": cfg.num_class_embeds,
        "addition_embed_type": cfg.addition_embed_type,
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "act_fn": "silu",
        "sample_size": cfg.sample_size,
    }


_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_VAE_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "force_upcast"}
_VAE_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(64,),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    down_block_types=None,
    up_block_types=None,
)


def vae_config_from_diffusers(d: Mapping) -> AutoencoderConfig:
    """Translates a diffusers AutoencoderKL config.json dict; unsupported options raise ConfigError."""
    _check_fixed(d, _VAE_FIXED, set(_VAE_DEFAULTS) | _VAE_IGNORED, "diffusers VAE")
    c = {**_VAE_DEFAULTS, **{k: v for k, v in d.items() if k in _VAE_DEFAULTS}}
    n = len(c["block_out_channels"])
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if c[key] is not None and tuple(c[key]) != (kind,) * n:
            raise ConfigError(f"diffusers VAE config: {key}={c[key]!r}; only {n} x '{kind}' is supported")
    return AutoencoderConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c["layers_per_block"],
        latent_channels=c["latent_channels"],
        norm_num_groups=c["norm_num_groups"],
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=float(c["shift_factor"] or 0.0),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_block_attention=bool(c["mid_block_add_attention"]),
        sample_size=int(_single(c["sample_size"], "sample_size")),
    )


def vae_config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "act_fn": "silu",
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor or None,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_attention,
    }


# ---------------------------------------------------------------------------- files
def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"'{path}' is a PyTorch pickle: install torch to read it, or convert it to safetensors"
        ) from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def read_weights(directory: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """Reads diffusion_pytorch_model[.variant].{safetensors, safetensors.index.json, bin} in `directory`.

    Without `variant`, the plain files are tried first, then the fp16 ones. Arrays come back as numpy.
    """
    variants = [variant] if variant else [None, "fp16"]
    readers: list[tuple[str, Callable]] = []
    for v in variants:
        stem = os.path.join(directory, WEIGHTS_NAME + (f".{v}" if v else ""))
        readers += [(stem + ".safetensors", read_safetensors), (stem + ".safetensors.index.json", _read_sharded)]
    for v in variants:
        readers.append((os.path.join(directory, WEIGHTS_NAME + (f".{v}" if v else "") + ".bin"), _read_torch_bin))
    for file, reader in readers:
        if os.path.isfile(file):
            return reader(file)
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*")))
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME}{'.' + variant if variant else ''}.safetensors/.bin in "
        f"'{directory}' (found: {', '.join(found) or 'nothing'})"
    )


def _read_sharded(index_file: str) -> dict[str, np.ndarray]:
    with open(index_file) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        out.update(read_safetensors(os.path.join(os.path.dirname(index_file), shard)))
    return out


def _read_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def load_unet(path: str | os.PathLike, *, variant: str | None = None, **overrides) -> tuple[UNetConfig, dict]:
    """A diffusers UNet2DConditionModel folder (or an SD pipeline folder) -> (UNetConfig, params).

    `overrides` replace config fields that do not change the weights (dtype, param_dtype, remat,
    attention_impl).
    """
    d = model_dir(path, "unet")
    cfg = unet_config_from_diffusers(_read_config(d)).replace(**overrides)
    return cfg, unet_params_from_state_dict(read_weights(d, variant), cfg)


def load_vae(path: str | os.PathLike, *, variant: str | None = None, **overrides) -> tuple[AutoencoderConfig, dict]:
    """A diffusers AutoencoderKL folder (or an SD pipeline folder) -> (AutoencoderConfig, params)."""
    d = model_dir(path, "vae")
    cfg = vae_config_from_diffusers(_read_config(d)).replace(**overrides)
    return cfg, vae_params_from_state_dict(read_weights(d, variant), cfg)


def _save(path, config: dict, state_dict: dict, dtype) -> None:
    os.makedirs(path, exist_ok=True)
    dt = np.dtype(canonical_dtype(dtype))
    variant = {np.dtype(np.float16): ".fp16"}.get(dt, "")
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ConfigError(f"save dtype {dtype!r}: use 'float32' or 'float16' (diffusers' fp16 variant)")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = {k: v.astype(dt) for k, v in state_dict.items()}
    write_safetensors(os.path.join(path, f"{WEIGHTS_NAME}{variant}.safetensors"), tensors, {"format": "pt"})


def save_unet(path: str | os.PathLike, cfg: UNetConfig, params: Mapping, *, dtype="float32") -> None:
    """Writes a diffusers UNet2DConditionModel folder (config.json + safetensors; dtype float16 writes the
    fp16 variant) that ``UNet2DConditionModel.from_pretrained(path)`` loads."""
    _save(os.fspath(path), unet_config_to_diffusers(cfg), unet_state_dict_from_params(params, cfg), dtype)


def save_vae(path: str | os.PathLike, cfg: AutoencoderConfig, params: Mapping, *, dtype="float32") -> None:
    """Writes a diffusers AutoencoderKL folder that ``AutoencoderKL.from_pretrained(path)`` loads."""
    _save(os.fspath(path), vae_config_to_diffusers(cfg), vae_state_dict_from_params(params, cfg), dtype)
