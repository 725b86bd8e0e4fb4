"""diffusers DiTTransformer2DModel folders <-> ldm_jax DiT parameter trees.

    cfg, params = load_dit(path)        # config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin),
                                        # or a DiT pipeline folder with a transformer/ subfolder
    save_dit(path, cfg, params)         # loadable with DiTTransformer2DModel.from_pretrained(path)

Names: the Flax path ``transformer_blocks_3/ff/net_0/proj/kernel`` is the PyTorch key
``transformer_blocks.3.ff.net.0.proj.weight`` (linear weights transposed; the patch-embedding conv OIHW ->
HWIO). The time/label embedding is the one exception: diffusers keeps a copy in every block
(``transformer_blocks.{i}.norm1.emb.{timestep_embedder,class_embedder}``; the final layer uses block 0's),
ldm_jax has one shared ``timestep_embedder`` / ``class_embedder``. Loading takes block 0's copy and, because
the other blocks would otherwise compute with different weights, refuses a checkpoint whose copies differ
(ConversionError naming the first one; ``strict_embeddings=False`` warns and uses block 0's instead). Saving
writes the shared embedding into every block. ``proj_out_1`` gives (shift, scale) in that order in both.

Checkpoints saved as the legacy ``Transformer2DModel`` with norm_type "ada_norm_zero" (e.g. facebook/DiT-XL-2-256)
load too. diffusers' DiT is class-conditional only: configs with text conditioning, learned positions, another
MLP ratio, timestep shift or position scale, or no classes, do not export (one-line ConfigError).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping

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
    unflatten,
    write_safetensors,
)
from ldm_jax.convert.diffusers import WEIGHTS_NAME, read_weights
from ldm_jax.models.dit import DiTConfig, dit_param_shapes
from ldm_jax.models.layers import canonical_dtype, unbox
from ldm_jax.types import ConfigError

_SHARED = ("timestep_embedder/", "class_embedder/")
_INDEX_RE = re.compile(r"^(transformer_blocks|to_out|net)_(\d+)$")
_LEAF = {"kernel": "weight", "embedding": "weight", "bias": "bias"}
# diffusers' sincos table: a non-persistent buffer, but tolerated (and ignored) if a file carries it
_POSITIONS_BUFFER = "pos_embed.pos_embed"


# ---------------------------------------------------------------------------- names
def torch_names(flax_key: str, depth: int) -> list[str]:
    """The diffusers key(s) of one Flax parameter: one, or one per block for the shared embedding."""
    *mods, leaf = flax_key.split("/")
    parts = []
    for m in mods:
        match = _INDEX_RE.match(m)
        parts.extend([match.group(1), match.group(2)] if match else [m])
    if mods[0] == "class_embedder":
        parts.append("embedding_table")
    name = ".".join([*parts, _LEAF[leaf]])
    if flax_key.startswith(_SHARED):
        return [f"transformer_blocks.{i}.norm1.emb.{name}" for i in range(depth)]
    return [name]


def _torch_shape(flax_key: str, shape: tuple) -> tuple:
    if flax_key.endswith("kernel") and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if flax_key.endswith("kernel"):
        return tuple(shape[::-1])
    return tuple(shape)


# ---------------------------------------------------------------------------- state dicts
def dit_params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], cfg: DiTConfig, *, strict_embeddings: bool = True
) -> dict:
    """diffusers DiTTransformer2DModel state dict (numpy) -> ldm_jax DiT params (plain arrays, param_dtype)."""
    shapes = dit_param_shapes(cfg)
    got = {k: np.asarray(v) for k, v in state_dict.items() if k != _POSITIONS_BUFFER}
    expected = {t: _torch_shape(k, s) for k, s in shapes.items() for t in torch_names(k, cfg.depth)}
    check_tree(expected, got, "diffusers DiT")
    dtype = canonical_dtype(cfg.param_dtype)
    flat = {}
    for k, shape in shapes.items():
        first, *copies = torch_names(k, cfg.depth)
        v = got[first]
        _check_copies(first, v, copies, got, strict_embeddings)
        if k.endswith("kernel"):
            v = conv_to_flax(v) if len(shape) == 4 else linear_to_flax(v)
        flat[k] = np.asarray(v, dtype=np.float32).astype(dtype)
    return unflatten(flat)


def _check_copies(first: str, v: np.ndarray, copies: list[str], got: Mapping, strict: bool) -> None:
    for name in copies:
        if not np.array_equal(got[name], v):
            diff = float(np.max(np.abs(np.asarray(got[name], np.float64) - np.asarray(v, np.float64))))
            msg = (f"diffusers DiT: {name} differs from {first} (max |diff| {diff:.3g}); ldm_jax's DiT shares one "
                   "time/label embedding across blocks")
            if strict:
                raise ConversionError(msg + "; pass strict_embeddings=False to use block 0's copy everywhere")
            warnings.warn(msg + "; using block 0's copy", stacklevel=3)
            return


def dit_state_dict_from_params(params: Mapping, cfg: DiTConfig) -> dict[str, np.ndarray]:
    """Inverse of `dit_params_from_state_dict`: float32 numpy arrays under diffusers' names, the shared
    embedding written into every block."""
    check_exportable(cfg)
    shapes = dit_param_shapes(cfg)
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(unbox(params)).items()}
    check_tree(shapes, flat, "ldm_jax DiT")
    out = {}
    for k, v in flat.items():
        if k.endswith("kernel"):
            v = conv_to_torch(v) if v.ndim == 4 else linear_to_torch(v)
        for name in torch_names(k, cfg.depth):
            out[name] = np.ascontiguousarray(v)
    return out


# ---------------------------------------------------------------------------- configs
# diffusers config keys with the only value this port implements (legacy Transformer2DModel keys included)
_FIXED = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "cross_attention_dim": None,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "double_self_attention": False,
    "attention_type": "default",
    "caption_channels": None,
    "use_additional_conditions": None,
}
# keys that do not change float32 inference (or are bookkeeping)
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dropout",
            "norm_num_groups", "upcast_attention", "use_linear_projection"}
_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
                 sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-5, interpolation_scale=None)
_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def dit_config_from_diffusers(d: Mapping) -> DiTConfig:
    """Translates a diffusers DiT config.json dict; unsupported options raise a one-line ConfigError."""
    if d.get("_class_name", _CLASSES[0]) not in _CLASSES:
        raise ConfigError(f"diffusers DiT config: _class_name={d['_class_name']!r} is not a DiT ({_CLASSES[0]})")
    for k, v in d.items():
        if k in _FIXED:
            want = _FIXED[k]
            if not (v == want or (want is None and v is False) or (want is False and v is None)):
                raise ConfigError(f"diffusers DiT config: {k}={v!r} is not supported by ldm_jax (only {want!r})")
        elif k not in _DEFAULTS and k not in _IGNORED:
            raise ConfigError(f"diffusers DiT config: unknown key '{k}'; this is not a supported diffusers DiT")
    c = {**_DEFAULTS, **{k: v for k, v in d.items() if k in _DEFAULTS}}
    if c["num_embeds_ada_norm"] is None:
        raise ConfigError("diffusers DiT config: num_embeds_ada_norm is None; ada_norm_zero DiTs are class-conditional")
    if c["interpolation_scale"] not in (None, 1, 1.0):
        raise ConfigError(f"diffusers DiT config: interpolation_scale={c['interpolation_scale']!r} is ignored by "
                          "diffusers' DiT; only None or 1 is supported")
    heads = int(c["num_attention_heads"])
    return DiTConfig(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"] if c["out_channels"] is not None else c["in_channels"]),
        patch_size=int(c["patch_size"]),
        sample_size=int(c["sample_size"]),
        hidden_size=heads * int(c["attention_head_dim"]),
        depth=int(c["num_layers"]),
        num_heads=heads,
        num_classes=int(c["num_embeds_ada_norm"]),
        mlp_norm_eps=float(c["norm_eps"]),
    )


def check_exportable(cfg: DiTConfig) -> None:
    """Raises a one-line ConfigError listing why `cfg` has no diffusers DiTTransformer2DModel equivalent."""
    why = []
    if cfg.num_classes is None:
        why.append("num_classes is None (diffusers' DiT is class-conditional)")
    if cfg.cross_attention_dim is not None:
        why.append("text conditioning (cross_attention_dim set) has no diffusers DiT equivalent")
    if cfg.positions != "sincos":
        why.append(f"positions={cfg.positions!r} (diffusers' DiT recomputes fixed sincos positions)")
    if cfg.mlp_ratio != 4.0:
        why.append(f"mlp_ratio={cfg.mlp_ratio} (diffusers' DiT: 4)")
    if cfg.freq_shift != 1.0:
        why.append(f"freq_shift={cfg.freq_shift} (diffusers' DiT: 1)")
    if cfg.interpolation_scale != 1.0:
        why.append(f"interpolation_scale={cfg.interpolation_scale} (diffusers' DiT: 1)")
    if why:
        raise ConfigError("cannot export this DiT to diffusers: " + "; ".join(why))


def dit_config_to_diffusers(cfg: DiTConfig) -> dict:
    """DiTConfig -> a diffusers DiTTransformer2DModel config.json dict."""
    check_exportable(cfg)
    return {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": "0.42.0",
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "num_embeds_ada_norm": cfg.num_classes,
        "norm_eps": cfg.mlp_norm_eps,
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "dropout": 0.0,
        "upcast_attention": False,
    }


# ---------------------------------------------------------------------------- files
def load_dit(
    path: str | os.PathLike, *, variant: str | None = None, strict_embeddings: bool = True, **overrides
) -> tuple[DiTConfig, dict]:
    """A diffusers DiTTransformer2DModel folder (or a DiT pipeline folder) -> (DiTConfig, params).

    `overrides` replace config fields that do not change the weights (dtype, param_dtype, remat, attention_impl).
    """
    d = model_dir(path, "transformer", "a diffusers DiT folder or a DiT pipeline folder")
    with open(os.path.join(d, "config.json")) as f:
        cfg = dit_config_from_diffusers(json.load(f)).replace(**overrides)
    weights = read_weights(d, variant)
    return cfg, dit_params_from_state_dict(weights, cfg, strict_embeddings=strict_embeddings)


def save_dit(path: str | os.PathLike, cfg: DiTConfig, params: Mapping, *, dtype="float32") -> None:
    """Writes a diffusers DiTTransformer2DModel folder (config.json + safetensors; dtype float16 writes the fp16
    variant) that ``DiTTransformer2DModel.from_pretrained(path)`` loads."""
    dt = np.dtype(canonical_dtype(dtype))
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ConfigError(f"save dtype {dtype!r}: use 'float32' or 'float16' (diffusers' fp16 variant)")
    config = dit_config_to_diffusers(cfg)
    tensors = {k: v.astype(dt) for k, v in dit_state_dict_from_params(params, cfg).items()}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    variant = ".fp16" if dt == np.dtype(np.float16) else ""
    write_safetensors(os.path.join(path, f"{WEIGHTS_NAME}{variant}.safetensors"), tensors, {"format": "pt"})
