"""Hugging Face transformers text encoders <-> ldm_jax parameter trees.

Reads CLIPTextModel, CLIPTextModelWithProjection and BertModel folders (config.json + model.safetensors)
without torch:

    cfg, params = hf.load_clip_text("sd15/text_encoder")
    hidden = CLIPTextEncoder(cfg).apply({"params": params}, ids)
    cfg, params = hf.load_clip_text("sdxl/text_encoder_2")     # with projection: cfg.projection_dim = 1280
    hidden, text_embeds = CLIPTextEncoder(cfg).apply({"params": params}, ids, hidden_layer=-2,
                                                     final_norm=False, return_pooled=True)

The reading direction lives in `ldm_jax.models.hf_text` (the models load their own pretrained weights) and
is re-exported here (it reads CLIPTextModelWithProjection folders too, SDXL's second encoder). This module
adds the writing direction (`save_clip_text`, `clip_text_state_dict`,
`clip_text_config_to_hf`; `save_bert`, `bert_state_dict`, `bert_config_to_hf`, which write what
``transformers.BertModel`` / ``AutoModel`` load). Keys may carry the ``text_model.`` (CLIP) or ``bert.`` (BERT)
prefix or not: transformers 5 saves CLIPTextModel without it, older exports and SD folders with it. Checking is
strict: every missing, unexpected or mis-shaped tensor is listed in one ``ConversionError``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ldm_jax.convert.common import ConversionError, check_tree, flatten, write_safetensors
from ldm_jax.models.hf_text import (
    _BERT_NAMES,
    _CLIP_NAMES,
    _CLIP_PROJECTION_NAMES,
    _LEAVES,
    _PROJECTION_KEY,
    _expected,
    bert_config_from_hf,
    bert_params_from_state_dict,
    clip_text_config_from_hf,
    clip_text_params_from_state_dict,
    load_bert,
    load_clip_text,
    load_minilm,
    minilm_dir,
)
from ldm_jax.models.text import BertConfig, BertEncoder, CLIPTextConfig, CLIPTextEncoder

__all__ = [
    "bert_config_from_hf",
    "bert_config_to_hf",
    "bert_params_from_state_dict",
    "bert_state_dict",
    "clip_text_config_from_hf",
    "clip_text_config_to_hf",
    "clip_text_params_from_state_dict",
    "clip_text_state_dict",
    "load_bert",
    "load_clip_text",
    "load_minilm",
    "minilm_dir",
    "save_bert",
    "save_clip_text",
]


def _to_torch(params: Mapping, names) -> dict[str, np.ndarray]:
    """Our nested params -> HF-named flat state dict (no prefix)."""
    reverse = []
    for hf, (ours, kind) in names.items():
        pattern = re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)")
        reverse.append((re.compile(pattern + r"/(?P<leaf>\w+)$"), hf, kind))
    out = {}
    for key, value in flatten(params).items():
        for pattern, hf, kind in reverse:
            m = pattern.match(key)
            if not m:
                continue
            for torch_leaf, flax_leaf, _, fn in _LEAVES[kind]:
                if m["leaf"] == flax_leaf:
                    name = hf.replace("{i}", m.groupdict().get("i") or "")
                    out[f"{name}.{torch_leaf}"] = np.asarray(fn(value) if fn else value, dtype=np.float32)
            break
        else:
            raise ConversionError(f"no HF name for parameter '{key}'")
    return out


def clip_text_config_to_hf(cfg: CLIPTextConfig) -> dict:
    """CLIPTextConfig -> a config.json dict that transformers' CLIPTextModel (CLIPTextModelWithProjection
    when `projection_dim` is set) loads."""
    out = {
        "architectures": ["CLIPTextModel" if cfg.projection_dim is None else "CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_length,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": 49406 if cfg.eos_token_id == 49407 else 0,
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "dtype": "float32",
    }
    if cfg.projection_dim is not None:
        out["projection_dim"] = cfg.projection_dim
    return out


def clip_text_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """CLIPTextEncoder params -> HF state dict as transformers 5 saves it: CLIPTextModel names without prefix,
    or, with a ``text_projection``, CLIPTextModelWithProjection's (``text_model.*`` + ``text_projection.weight``)."""
    if "text_projection" not in params:
        return _to_torch(params, _CLIP_NAMES)
    out = _to_torch(params, _CLIP_PROJECTION_NAMES)
    return {k if k == _PROJECTION_KEY else f"text_model.{k}": v for k, v in out.items()}


def save_clip_text(path: str | os.PathLike, cfg: CLIPTextConfig, params: Mapping) -> None:
    """Writes config.json + model.safetensors that ``transformers.CLIPTextModel.from_pretrained`` loads
    (``CLIPTextModelWithProjection`` when `cfg.projection_dim` is set)."""
    import flax.linen as nn

    params = nn.meta.unbox(params)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    check_tree(_expected(CLIPTextEncoder(cfg)), flatten(params), "CLIP text encoder")
    (path / "config.json").write_text(json.dumps(clip_text_config_to_hf(cfg), indent=2))
    write_safetensors(path / "model.safetensors", clip_text_state_dict(params), metadata={"format": "pt"})


def bert_config_to_hf(cfg: BertConfig) -> dict:
    """BertConfig -> a config.json dict that transformers' BertModel (and AutoModel) loads."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "dtype": "float32",
    }


def bert_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """BertEncoder params -> HF BertModel state dict (BertModel's names, no ``bert.`` prefix)."""
    return _to_torch(params, _BERT_NAMES)


def save_bert(path: str | os.PathLike, cfg: BertConfig, params: Mapping) -> None:
    """Writes config.json + model.safetensors that ``transformers.BertModel.from_pretrained`` (and AutoModel)
    loads; without a pooler in `cfg`, transformers initializes its unused pooler itself."""
    import flax.linen as nn

    params = nn.meta.unbox(params)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    check_tree(_expected(BertEncoder(cfg)), flatten(params), "BERT")
    (path / "config.json").write_text(json.dumps(bert_config_to_hf(cfg), indent=2))
    write_safetensors(path / "model.safetensors", bert_state_dict(params), metadata={"format": "pt"})
