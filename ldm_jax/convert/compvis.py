"""Original (CompVis / Stability) single-file Stable-Diffusion checkpoints -> ldm_jax parameter trees.

One ``.safetensors`` or ``.ckpt`` file holds the whole LatentDiffusion model:

    model.diffusion_model.*      the U-Net (openaimodel.UNetModel: input_blocks / middle_block / output_blocks)
    first_stage_model.*          the KL autoencoder (encoder.down.{l}.block.{j}, mid.attn_1, decoder.up...)
    cond_stage_model.transformer.text_model.*   SD 1.x: the HF CLIPTextModel keys verbatim
    cond_stage_model.model.*     SD 2.x: OpenCLIP (transformer.resblocks.{i}, fused attn.in_proj)
    conditioner.embedders.{i}.*  SDXL (Stability's sgm layout): base = CLIP-L ('0.transformer.', HF keys) +
                                 OpenCLIP-bigG ('1.model.', with its text_projection); refiner = bigG only
                                 ('0.model.'); the U-Net's added embedding is 'label_emb.0.{0,2}'

Every part is renamed to diffusers' key names and handed to the strict diffusers / HF converters, so the
same key and shape checks apply. Architectures are inferred from the tensor shapes; what the weights do
not determine (attention heads: SD1 uses 8 per level, SD2 64-wide heads; GroupNorm groups: 32) comes
from `kind` and can be overridden.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert import hf
from ldm_jax.convert.common import ConversionError, check_tree, read_safetensors
from ldm_jax.models.text import CLIPTextConfig
from ldm_jax.models.tokenizers import EOS, CLIPTokenizer
from ldm_jax.models.unet import UNetConfig, unet_param_shapes
from ldm_jax.models.vae import AutoencoderConfig, vae_param_shapes
from ldm_jax.types import ConfigError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
KINDS = ("sd15", "sd21", "sdxl")
SDXL_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim: the weights do not tell it
SDXL_SCALING_FACTOR = 0.13025

_RES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ---------------------------------------------------------------------------- name maps
def _res_rest(rest: str) -> str:
    head, _, leaf = rest.partition(".")
    return f"{_RES.get(head, head)}.{leaf}"


def unet_compvis_name(key: str, cfg: UNetConfig) -> str:
    """diffusers U-Net key -> CompVis key (without the 'model.diffusion_model.' prefix)."""
    k = cfg.layers_per_block + 1
    n = cfg.num_levels
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "class_embedding": "label_emb",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    mod, _, leaf = key.rpartition(".")
    if mod in fixed:
        return f"{fixed[mod]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", key):
        l, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + l * k + j
        return f"input_blocks.{block}.0.{_res_rest(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", key):
        return f"input_blocks.{1 + int(m[1]) * k + cfg.layers_per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_res_rest(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", key):
        block = int(m[1]) * k + int(m[3])
        return f"output_blocks.{block}.0.{_res_rest(m[4])}" if m[2] == "resnets" else f"output_blocks.{block}.1.{m[4]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", key):
        i = int(m[1])
        slot = 2 if cfg.attention_levels[n - 1 - i] else 1
        return f"output_blocks.{i * k + cfg.layers_per_block}.{slot}.conv.{m[2]}"
    raise ConversionError(f"no CompVis name for U-Net key '{key}'")


def vae_compvis_name(key: str, cfg: AutoencoderConfig) -> str:
    """diffusers VAE key -> CompVis key (without the 'first_stage_model.' prefix)."""
    n = len(cfg.block_out_channels)
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)$", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)$", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)$", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)$", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def _is_vae_attn_matrix(compvis_key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", compvis_key))


# ---------------------------------------------------------------------------- U-Net and VAE
def _strip(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _rename_strict(part: Mapping, expected_diffusers: Mapping[str, tuple], name_fn, what: str, shape_fn=None):
    """CompVis-named `part` -> diffusers-named dict; one ConversionError lists every CompVis key problem.

    `shape_fn(compvis_key, diffusers_shape)` gives the CompVis shape where the layouts differ.
    """
    to_compvis = {k: name_fn(k) for k in expected_diffusers}
    expected = {to_compvis[k]: (shape_fn(to_compvis[k], s) if shape_fn else s) for k, s in expected_diffusers.items()}
    check_tree(expected, part, what)
    return {k: np.asarray(part[c]).reshape(expected_diffusers[k]) for k, c in to_compvis.items()}


def unet_params_from_compvis(state_dict: Mapping[str, np.ndarray], cfg: UNetConfig) -> dict:
    """CompVis U-Net weights (keys with or without 'model.diffusion_model.') -> ldm_jax UNet params."""
    part = _strip(state_dict, UNET_PREFIX) or dict(state_dict)
    expected = dconv.expected_torch_shapes(unet_param_shapes(cfg), conv_projection=not cfg.use_linear_projection)
    renamed = _rename_strict(part, expected, lambda k: unet_compvis_name(k, cfg), "CompVis U-Net")
    return dconv.unet_params_from_state_dict(renamed, cfg)


def vae_params_from_compvis(state_dict: Mapping[str, np.ndarray], cfg: AutoencoderConfig) -> dict:
    """CompVis first-stage weights (keys with or without 'first_stage_model.') -> AutoencoderKL params.

    The mid-block attention's q/k/v/proj_out are 1x1 convs in CompVis files (linear in diffusers); both
    layouts are accepted. Training-only keys (``loss.*``) are ignored.
    """
    part = _strip(state_dict, VAE_PREFIX) or dict(state_dict)
    part = {
        k: (v[:, :, None, None] if _is_vae_attn_matrix(k) and np.ndim(v) == 2 else v)
        for k, v in part.items()
        if not k.startswith("loss.")
    }
    expected = dconv.expected_torch_shapes(vae_param_shapes(cfg))
    conv_shape = lambda k, s: (*s, 1, 1) if _is_vae_attn_matrix(k) else s
    renamed = _rename_strict(part, expected, lambda k: vae_compvis_name(k, cfg), "CompVis VAE", conv_shape)
    return dconv.vae_params_from_state_dict(renamed, cfg)


# ---------------------------------------------------------------------------- text encoders
_OPENCLIP = [
    (r"token_embedding\.weight", "embeddings.token_embedding.weight"),
    (r"positional_embedding", "embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"final_layer_norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
]
_OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def openclip_to_hf_clip(
    state_dict: Mapping[str, np.ndarray], num_layers: int | None = None, projection: bool = False
) -> dict:
    """OpenCLIP text-tower keys (prefix stripped) -> HF CLIPTextModel keys ('text_model.' prefixed).

    The fused ``attn.in_proj_{weight,bias}`` (3D, ...) is split into q/k/v_proj. Layers with index >=
    `num_layers` are dropped (SD 2.x conditions on the penultimate layer, so its 24th layer is unused);
    ``logit_scale`` is dropped, and so is ``text_projection`` unless `projection` (SDXL's bigG: OpenCLIP
    multiplies x @ P, so CLIPTextModelWithProjection's ``text_projection.weight`` is P transposed). Unknown
    keys pass through unchanged, so the strict CLIP converter reports them.
    """
    out = {}
    for key, v in state_dict.items():
        if key == "text_projection" and projection:
            out["text_projection.weight"] = np.ascontiguousarray(np.asarray(v).T)
            continue
        if key in _OPENCLIP_UNUSED:
            continue
        layer = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        if layer and num_layers is not None and int(layer[1]) >= num_layers:
            continue
        if m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(v), 3, axis=0)):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = chunk
            continue
        for pattern, repl in _OPENCLIP:
            if re.fullmatch(pattern, key):
                key = "text_model." + re.sub(pattern, repl, key)
                break
        out[key] = v
    return out


def _count(keys, pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _text_parts(state_dict: Mapping[str, np.ndarray], kind: str) -> dict[str, tuple[str, str]]:
    """{part: (key prefix, layout)} of the text encoders in the file. Layouts: 'hf' (HF CLIPTextModel keys,
    'text_model.' inside), 'openclip' (SD 2.x: the last layer is dropped) and 'openclip_projection' (SDXL's
    bigG: every layer and the text projection kept). Part names follow diffusers' pipeline folders."""
    if kind == "sd15":
        found = {"text_encoder": (CLIP_PREFIX, "hf")}
    elif kind == "sd21":
        found = {"text_encoder": (OPENCLIP_PREFIX, "openclip")}
    else:
        found = {"text_encoder": (f"{SDXL_PREFIX}0.transformer.", "hf")}
        bigg = [f"{SDXL_PREFIX}{i}.model." for i in (1, 0)]
        found["text_encoder_2"] = (next((p for p in bigg if any(k.startswith(p) for k in state_dict)), bigg[0]),
                                   "openclip_projection")
    return {name: v for name, v in found.items() if any(k.startswith(v[0]) for k in state_dict)}


def _text_part(state_dict: Mapping[str, np.ndarray], kind: str, part: str) -> tuple[str, str]:
    parts = _text_parts(state_dict, kind)
    if part not in parts:
        raise ConversionError(f"no '{part}' weights for a {kind} checkpoint (found: {sorted(parts) or 'none'})")
    return parts[part]


def infer_text_config(state_dict: Mapping[str, np.ndarray], kind: str, part: str = "text_encoder") -> CLIPTextConfig:
    """CLIPTextConfig from CompVis text-encoder weights: widths from shapes, 64-wide heads; SD 2.x keeps
    all but the last of its OpenCLIP layers, with gelu (SD 1.x and SDXL's CLIP-L: quick_gelu). SDXL's
    ``text_encoder_2`` (bigG) keeps every layer and its projection, and pools at the largest id as OpenCLIP
    does (eos_token_id=2, transformers' legacy rule)."""
    prefix, layout = _text_part(state_dict, kind, part)
    extra: dict[str, Any] = {}
    if layout.startswith("openclip"):
        p = _strip(state_dict, prefix)
        tok, pos = p["token_embedding.weight"], p["positional_embedding"]
        layers = _count(p, r"transformer\.resblocks\.(\d+)\.") - (layout == "openclip")
        inter = p["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
        if layout == "openclip_projection":
            extra = dict(projection_dim=int(p["text_projection"].shape[1]), eos_token_id=2)
    else:
        p = {k.removeprefix("text_model."): v for k, v in _strip(state_dict, prefix).items()}
        tok, pos = p["embeddings.token_embedding.weight"], p["embeddings.position_embedding.weight"]
        layers = _count(p, r"encoder\.layers\.(\d+)\.")
        inter = p["encoder.layers.0.mlp.fc1.weight"].shape[0]
        act = "quick_gelu"
    width = tok.shape[1]
    return CLIPTextConfig(
        vocab_size=tok.shape[0],
        hidden_size=width,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=max(1, width // 64),
        max_length=pos.shape[0],
        hidden_act=act,
        **extra,
    )


def text_params_from_compvis(
    state_dict: Mapping[str, np.ndarray], cfg: CLIPTextConfig, kind: str, part: str = "text_encoder"
) -> dict:
    """SD 1.x ('cond_stage_model.transformer.*'), SD 2.x ('cond_stage_model.model.*') or SDXL
    ('conditioner.embedders.*', `part` 'text_encoder' or 'text_encoder_2') text weights -> CLIPTextEncoder
    params (through ``ldm_jax.convert.hf.clip_text_params_from_state_dict``)."""
    prefix, layout = _text_part(state_dict, kind, part)
    if layout == "hf":
        return hf.clip_text_params_from_state_dict(_strip(state_dict, prefix), cfg)
    keep = cfg.num_layers if layout == "openclip" else None
    hf_sd = openclip_to_hf_clip(_strip(state_dict, prefix), keep, projection=layout == "openclip_projection")
    return hf.clip_text_params_from_state_dict(hf_sd, cfg)


# ---------------------------------------------------------------------------- config inference
def detect_kind(state_dict: Mapping[str, np.ndarray]) -> str:
    """'sdxl' when the file has sgm's conditioner or the U-Net an added embedding ('label_emb.0.0'); 'sd21'
    when the text encoder is OpenCLIP or the U-Net projections are linear; else 'sd15'."""
    if any(k.startswith(SDXL_PREFIX) for k in state_dict) or UNET_PREFIX + "label_emb.0.0.weight" in state_dict:
        return "sdxl"
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict):
        return "sd21"
    proj = state_dict.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
    return "sd21" if proj is not None and np.ndim(proj) == 2 else "sd15"


def _depths(part: Mapping, firsts: list[int], attn: tuple[bool, ...]) -> int | tuple[int, ...]:
    """Transformer depth per level. Levels without attention have none; the last level's entry is the mid
    block's depth (the U-Net's convention, as diffusers'), and the others take the common depth when there is
    one (SDXL refiner: 4), else 1 (SDXL base: (1, 2, 10))."""
    count = lambda prefix: _count(part, rf"{prefix}\.transformer_blocks\.(\d+)\.")
    found = [count(f"input_blocks\\.{b}\\.1") if a else None for b, a in zip(firsts, attn)]
    if not attn[-1]:
        found[-1] = max(1, count(r"middle_block\.1"))
    known = {d for d in found if d is not None}
    fill = next(iter(known)) if len(known) == 1 else 1
    depth = tuple(fill if d is None else d for d in found)
    return depth[0] if len(set(depth)) == 1 else depth


def infer_unet_config(state_dict: Mapping[str, np.ndarray], kind: str = "sd15", **fixed) -> UNetConfig:
    """UNetConfig from CompVis U-Net weight shapes. Heads come from `kind` (sd15: 8 per level, sd21 and
    sdxl: 64 wide); `fixed` sets fields the weights cannot tell (num_heads, head_dim, norm_num_groups, ...).
    An added embedding ('label_emb.0.0', SDXL) gives addition_embed_type='text_time' with the input width
    from the weights and addition_time_embed_dim=256 (SDXL's; the weights only fix the total)."""
    part = _strip(state_dict, UNET_PREFIX) or dict(state_dict)
    try:
        num_blocks = _count(part, r"input_blocks\.(\d+)\.")
        levels = 1 + len({k for k in part if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k)})
        per = num_blocks // levels  # layers_per_block + 1
        firsts = [1 + l * per for l in range(levels)]
        chans = tuple(int(part[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0]) for b in firsts)
        attn = tuple(f"input_blocks.{b}.1.proj_in.weight" in part for b in firsts)
        depth = _depths(part, firsts, attn)
        ctx = next(v.shape[1] for k, v in part.items() if k.endswith("attn2.to_k.weight"))
        proj = next(v for k, v in part.items() if k.endswith("proj_in.weight"))
        label = part.get("label_emb.weight")
        values = dict(
            in_channels=int(part["input_blocks.0.0.weight"].shape[1]),
            out_channels=int(part["out.2.weight"].shape[0]),
            block_out_channels=chans,
            layers_per_block=per - 1,
            attention_levels=attn,
            transformer_layers_per_block=depth,
            cross_attention_dim=int(ctx),
            use_linear_projection=np.ndim(proj) == 2,
            num_class_embeds=None if label is None else int(label.shape[0]),
        )
        added = part.get("label_emb.0.0.weight")
        if added is not None:
            values.update(
                addition_embed_type="text_time",
                addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=int(added.shape[1]),
            )
    except (KeyError, StopIteration) as e:
        raise ConversionError(f"not a CompVis U-Net state dict (cannot find {e}); check the file") from None
    values.update(dict(num_heads=8) if kind == "sd15" else dict(head_dim=64))
    if kind == "sdxl":
        values.update(sample_size=128)
    return UNetConfig.from_config({**values, **fixed})


def infer_vae_config(state_dict: Mapping[str, np.ndarray], **fixed) -> AutoencoderConfig:
    """AutoencoderConfig from CompVis first-stage weight shapes; `fixed` overrides (scaling_factor, ...)."""
    part = _strip(state_dict, VAE_PREFIX) or dict(state_dict)
    try:
        levels = _count(part, r"encoder\.down\.(\d+)\.")
        chans = tuple(int(part[f"encoder.down.{l}.block.0.conv2.weight"].shape[0]) for l in range(levels))
        values = dict(
            in_channels=int(part["encoder.conv_in.weight"].shape[1]),
            out_channels=int(part["decoder.conv_out.weight"].shape[0]),
            block_out_channels=chans,
            layers_per_block=_count(part, r"encoder\.down\.0\.block\.(\d+)\."),
            latent_channels=int(part["decoder.conv_in.weight"].shape[1]),
            use_quant_conv="quant_conv.weight" in part,
            use_post_quant_conv="post_quant_conv.weight" in part,
            mid_block_attention="encoder.mid.attn_1.q.weight" in part,
        )
    except KeyError as e:
        raise ConversionError(f"not a CompVis autoencoder state dict (cannot find {e}); check the file") from None
    return AutoencoderConfig.from_config({**values, **fixed})


# ---------------------------------------------------------------------------- files
def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .safetensors file (no torch needed) or a .ckpt/.pt/.pth/.bin pickle (torch.load with
    weights_only=True; a nested 'state_dict' is unwrapped) -> {key: numpy array}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at '{path}': pass a .safetensors or .ckpt file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"'{path}' is a PyTorch pickle: install torch to read it, or use a .safetensors file"
        ) from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def _ema_weights(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replaces the U-Net weights by their 'model_ema.' copies (flattened names without dots)."""
    out = dict(state_dict)
    missing = []
    for k in state_dict:
        if k.startswith(UNET_PREFIX):
            ema = "model_ema." + "".join(k.split(".")[1:])
            if ema in state_dict:
                out[k] = state_dict[ema]
            else:
                missing.append(ema)
    if missing:
        raise ConversionError(f"use_ema=True but {len(missing)} EMA weights are absent, e.g. '{missing[0]}'")
    return out


def _config(given, infer):
    """None -> inferred config; a config instance -> itself; a mapping -> inferred with those fields set."""
    if given is None or isinstance(given, Mapping):
        return infer(**dict(given or {}))
    return given


def clip_tokenizer(kind: str, part: str = "text_encoder", max_length: int = 77) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer as a single file's `part` pads: with its EOS token for CLIP-L (SD 1.x, SDXL's
    text_encoder), with "!" (id 0) for the OpenCLIP towers (SD 2.x, SDXL's text_encoder_2)."""
    eos = kind == "sd15" or (kind == "sdxl" and part == "text_encoder")
    return CLIPTokenizer.default(max_length=max_length, pad_token=EOS if eos else "!")


def load_single_file(
    path: str | os.PathLike,
    kind: str = "auto",
    *,
    unet_config: UNetConfig | Mapping | None = None,
    vae_config: AutoencoderConfig | Mapping | None = None,
    text_config: Any = None,
    text_config_2: Any = None,
    use_ema: bool = False,
) -> dict[str, Any]:
    """An original SD checkpoint file -> {"unet": (cfg, params), "vae": (cfg, params),
    "text_encoder": (cfg, params), "kind": kind} (SDXL: also "text_encoder_2").

    `kind`: "sd15" (SD 1.x: CLIP-L text encoder, 8 heads), "sd21" (SD 2.x: OpenCLIP-H, 64-wide heads),
    "sdxl" (SDXL base or refiner: text_time U-Net, CLIP-L as "text_encoder" (base only) and OpenCLIP-bigG
    with its projection as "text_encoder_2", VAE scaling factor 0.13025) or "auto" (detected from the keys).
    Configs are inferred from shapes unless given; a mapping updates the inferred config (e.g.
    ``{"norm_num_groups": 16}``); `text_config_2` is for "text_encoder_2". Parts absent from the file are
    absent from the result. `use_ema`: take the U-Net's 'model_ema.' weights. Keys outside the parts
    (noise-schedule buffers, EMA copies) are ignored; within each part the conversion is strict.
    """
    if kind not in (*KINDS, "auto"):
        raise ConfigError(f"load_single_file: kind={kind!r}; use 'sd15', 'sd21', 'sdxl' or 'auto'")
    sd = read_checkpoint(path)
    if kind == "auto":
        kind = detect_kind(sd)
    if use_ema:
        sd = _ema_weights(sd)
    out: dict[str, Any] = {"kind": kind}
    if any(k.startswith(UNET_PREFIX) for k in sd):
        cfg = _config(unet_config, lambda **kw: infer_unet_config(sd, kind, **kw))
        out["unet"] = (cfg, unet_params_from_compvis(sd, cfg))
    if any(k.startswith(VAE_PREFIX) for k in sd):
        scale = {"scaling_factor": SDXL_SCALING_FACTOR} if kind == "sdxl" else {}
        cfg = _config(vae_config, lambda **kw: infer_vae_config(sd, **{**scale, **kw}))
        out["vae"] = (cfg, vae_params_from_compvis(sd, cfg))
    given = {"text_encoder": text_config, "text_encoder_2": text_config_2}
    for part in _text_parts(sd, kind):
        cfg = _config(given[part], lambda part=part, **kw: infer_text_config(sd, kind, part).replace(**kw))
        out[part] = (cfg, text_params_from_compvis(sd, cfg, kind, part))
    if len(out) == 1:
        raise ConversionError(
            f"'{path}' holds no '{UNET_PREFIX}', '{VAE_PREFIX}', 'cond_stage_model.' or '{SDXL_PREFIX}' "
            "weights: not an original Stable-Diffusion checkpoint"
        )
    return out
