"""LoRA files <-> `ldm_jax.models.lora.LoraAdapter`s of the SD U-Net and the CLIP text encoder.

    unet_adapter, text_adapter, meta = load_lora("pytorch_lora_weights.safetensors", unet_cfg, text_cfg)
    params = lora.merge(unet_params, [(unet_adapter, 0.8)])
    save_lora("out.safetensors", unet_adapter, text_adapter, unet_cfg=unet_cfg, format="kohya")

Two layouts of one safetensors file are read and written. In both, a layer's factors are PyTorch's
``lora_A``/``lora_down`` (r, in[, kh, kw]) and ``lora_B``/``lora_up`` (out, r[, 1, 1]), and its update is
(alpha / r) * up @ down; module names are the diffusers U-Net's (`convert.diffusers.torch_name`) and
transformers' CLIPTextModel's (``encoder.layers.0.self_attn.q_proj``, `models.hf_text`).

diffusers / PEFT (``StableDiffusionPipeline.save_lora_weights``)
    ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.[text_model.]<module>.lora_A.weight``.
    Older spellings read too: ``<module>.lora.down.weight`` / ``.lora.up.weight``,
    ``<module>.lora_linear_layer.down.weight``, the attention-processor era's
    ``<attn>.processor.to_q_lora.down.weight`` (U-Net) and ``self_attn.to_q_lora.down.weight`` (text), and files
    whose keys carry no ``unet.`` prefix at all (U-Net only). Alphas come from the ``lora_adapter_metadata`` JSON
    of the safetensors header, which holds PEFT's LoraConfig per component under ``unet.`` / ``text_encoder.``
    keys (``unet.lora_alpha``, ``unet.alpha_pattern`` {module regex: alpha}, ``unet.use_rslora``); else from
    ``<module>.alpha`` scalars (diffusers' "network alphas"); else alpha = r (scale 1, diffusers' rule).
kohya (sd-scripts, A1111)
    ``lora_unet_<module with '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a scalar) and
    ``lora_te_text_model_<module>...``; a missing alpha means alpha = r.

Loading is strict: a key that fits no layer of the given configs (or a DoRA/LoHa/LoKr/bias term, or a second
text encoder) raises a one-line ConversionError naming it. Writing: the diffusers layout stores alphas in the
metadata (current diffusers reads it); ``alpha="bake"`` folds alpha / r into the up factors instead, for loaders
that ignore the metadata. Conv layers, and SD1's 1x1-conv proj_in/proj_out, are written as 4-D weights, which
is why `save_lora` takes the U-Net config.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ldm_jax.convert.common import (
    ConversionError,
    conv_to_flax,
    conv_to_torch,
    linear_to_flax,
    linear_to_torch,
    read_safetensors,
    write_safetensors,
)
from ldm_jax.convert.diffusers import _is_conv_projection, torch_name
from ldm_jax.models.hf_text import _CLIP_NAMES, _expected
from ldm_jax.models.lora import LoraAdapter
from ldm_jax.models.text import CLIPTextConfig, CLIPTextEncoder
from ldm_jax.models.unet import UNetConfig, unet_param_shapes
from ldm_jax.types import ConfigError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name inside a LoRA folder
METADATA_KEY = "lora_adapter_metadata"
_PREFIX = {"unet": "unet", "text": "text_encoder"}
_KOHYA = {"unet": "lora_unet_", "text": "lora_te_"}
_UNSUPPORTED = {  # key fragment -> what it is
    "lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon-Tucker",
    "lora_B.bias": "LoRA bias", "lora_up.bias": "LoRA bias", "text_encoder_2.": "a second text encoder (SDXL)",
    "lora_te2_": "a second text encoder (SDXL)",
}
_PROC = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
         "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_DIFFUSERS_KEY = [  # (regex on a key without its component prefix, part)
    (re.compile(r"(?P<m>.+)\.lora_A(?:\.default)?\.weight"), "down"),
    (re.compile(r"(?P<m>.+)\.lora_B(?:\.default)?\.weight"), "up"),
    (re.compile(r"(?P<m>.+)\.(?:lora|lora_linear_layer)\.down\.weight"), "down"),
    (re.compile(r"(?P<m>.+)\.(?:lora|lora_linear_layer)\.up\.weight"), "up"),
    (re.compile(r"(?P<m>.+)\.alpha"), "alpha"),
]
_PROC_KEY = re.compile(r"(?P<m>.+?)\.(?:processor\.)?(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight")
_KOHYA_KEY = re.compile(r"(?P<name>lora_(?:unet|te1?)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
_KOHYA_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


class _Layer(NamedTuple):
    """One adaptable layer: its component ("unet" / "text"), our path and kernel shape; `conv1x1`: PyTorch stores
    this Dense as a 1x1 conv (SD1's proj_in / proj_out)."""

    component: str
    path: str
    shape: tuple[int, ...]
    conv1x1: bool


# ---------------------------------------------------------------------------- layer tables
def unet_lora_layers(cfg: UNetConfig) -> dict[str, _Layer]:
    """{diffusers module name: layer} for every Dense/Conv kernel of the U-Net."""
    out = {}
    for key, shape in unet_param_shapes(cfg).items():
        if key.endswith("/kernel") and len(shape) in (2, 4):
            conv1x1 = len(shape) == 2 and not cfg.use_linear_projection and _is_conv_projection(key)
            out[torch_name(key)[: -len(".weight")]] = _Layer("unet", key[: -len("/kernel")], tuple(shape), conv1x1)
    return out


def clip_lora_layers(cfg: CLIPTextConfig) -> dict[str, _Layer]:
    """{transformers module name (no ``text_model.``): layer} for every Dense kernel of the CLIP text encoder."""
    shapes = _expected(CLIPTextEncoder(cfg))
    out = {}
    for hf, (ours, kind) in _CLIP_NAMES.items():
        for i in range(cfg.num_layers) if "{i}" in hf else [None]:
            path = ours.replace("{i}", str(i))
            if kind == "dense" and f"{path}/kernel" in shapes:
                out[hf.replace("{i}", str(i))] = _Layer("text", path, tuple(shapes[f"{path}/kernel"]), False)
    return out


def _tables(unet_cfg, text_cfg) -> dict[str, dict[str, _Layer]]:
    return {"unet": unet_lora_layers(unet_cfg) if unet_cfg is not None else {},
            "text": clip_lora_layers(text_cfg) if text_cfg is not None else {}}


# ---------------------------------------------------------------------------- reading
def _lora_file(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        name = WEIGHT_NAME if WEIGHT_NAME in files else (files[0] if len(files) == 1 else None)
        if name is None:
            raise FileNotFoundError(f"'{path}' holds {len(files)} .safetensors files and no {WEIGHT_NAME}: "
                                    "pass the LoRA file itself")
        path = os.path.join(path, name)
    return path


def _header(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})


def _fail(path, key: str, why: str) -> ConversionError:
    return ConversionError(f"LoRA file '{path}': key '{key}' {why}")


def _kohya_table(tables) -> dict[str, tuple[str, str]]:
    """{kohya layer name: (component, module name)}; text names with and without ``text_model``, te and te1."""
    out = {}
    for comp, table in tables.items():
        for name in table:
            out[_kohya_name(comp, name)] = (comp, name)
            if comp == "text":
                for stem in ("lora_te_", "lora_te1_"):
                    out[stem + name.replace(".", "_")] = out[stem + "text_model_" + name.replace(".", "_")] = (
                        comp, name)
    return out


def _locate(key: str, tables, kohya: Mapping, bare_unet: bool, path) -> tuple[str, str, str]:
    """(component, module name, part in {down, up, alpha}) of one key, or a ConversionError naming it."""
    for fragment, what in _UNSUPPORTED.items():
        if fragment in key:
            raise _fail(path, key, f"belongs to {what}, which ldm_jax's LoRA does not support")
    m = _KOHYA_KEY.fullmatch(key)
    if m:
        comp = "unet" if m["name"].startswith("lora_unet_") else "text"
        if m["name"] not in kohya:
            raise _fail(path, key, f"fits no layer of the given {_what(comp, tables)}")
        return (*kohya[m["name"]], _KOHYA_PART[m["part"]])
    comp, rest = None, key
    for c, prefix in _PREFIX.items():
        if key.startswith(prefix + "."):
            comp, rest = c, key[len(prefix) + 1:]
    if comp is None and bare_unet:
        comp = "unet"
    if comp is None:
        raise _fail(path, key, "has neither a 'unet.' / 'text_encoder.' prefix nor a kohya 'lora_unet_' / "
                               "'lora_te_' one")
    module, part = None, None
    p = _PROC_KEY.fullmatch(rest)
    if p:
        module, part = f"{p['m']}.{_PROC[comp][p['p']]}", p["part"]
    else:
        for pattern, kind in _DIFFUSERS_KEY:
            hit = pattern.fullmatch(rest)
            if hit:
                module, part = hit["m"], kind
                break
    if comp == "text" and module is not None:
        module = module.removeprefix("text_model.")
    if module is None or module not in tables[comp]:
        raise _fail(path, key, f"fits no layer of the given {_what(comp, tables)}")
    return comp, module, part


def _what(comp: str, tables) -> str:
    if not tables[comp]:
        return f"configs: it adapts the {'U-Net' if comp == 'unet' else 'text encoder'}, so pass its config"
    return "U-Net config" if comp == "unet" else "text encoder config"


def _kohya_name(comp: str, module: str) -> str:
    return _KOHYA[comp] + ("text_model." + module if comp == "text" else module).replace(".", "_")


def _factors(layer: _Layer, down: np.ndarray, up: np.ndarray, key: str, path) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch (r, in[, kh, kw]) / (out, r[, 1, 1]) factors -> our down / up, shape-checked against the layer."""
    rank = down.shape[0]
    if len(layer.shape) == 2:
        ours = linear_to_flax(down) if down.ndim in (2, 4) and down.shape[2:] in ((), (1, 1)) else None
        ours_up = linear_to_flax(up) if up.ndim in (2, 4) and up.shape[2:] in ((), (1, 1)) else None
        want = ((layer.shape[0], rank), (rank, layer.shape[1]))
    else:
        ours = conv_to_flax(down) if down.ndim == 4 else None
        ours_up = conv_to_flax(up) if up.ndim == 4 else None
        want = ((*layer.shape[:3], rank), (1, 1, rank, layer.shape[3]))
    got = (None if ours is None else ours.shape, None if ours_up is None else ours_up.shape)
    if got != want:
        raise _fail(path, key, f"has factors {down.shape} / {up.shape}, which do not fit the kernel "
                               f"{layer.shape} of '{layer.path}'")
    return np.ascontiguousarray(ours, np.float32), np.ascontiguousarray(ours_up, np.float32)


def load_lora(path: str | os.PathLike, unet_cfg: UNetConfig | None,
              text_cfg: CLIPTextConfig | None = None) -> tuple[LoraAdapter | None, LoraAdapter | None, dict]:
    """Reads a diffusers/PEFT or kohya LoRA file (or a folder holding one) -> (unet_adapter, text_adapter, meta).

    An adapter is None when the file has no layer of that model. `meta`: {"format": "diffusers" | "kohya",
    "alpha_source": "metadata" | "keys" | "rank", "header": the safetensors header metadata}.
    """
    path = _lora_file(path)
    tensors, header = read_safetensors(path), _header(path)
    tables = _tables(unet_cfg, text_cfg)
    kohya_names = _kohya_table(tables)
    bare = not any(k.startswith(tuple(p + "." for p in _PREFIX.values())) or _KOHYA_KEY.fullmatch(k)
                   for k in tensors)
    found: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    kohya = False
    for key in sorted(tensors):
        comp, module, part = _locate(key, tables, kohya_names, bare, path)
        kohya = kohya or key.startswith("lora_")
        if part in found[(comp, module)]:
            raise _fail(path, key, f"repeats the {part} factor of '{module}' (under another spelling)")
        found[(comp, module)][part] = (key, np.asarray(tensors[key]))
    try:
        peft = json.loads(header[METADATA_KEY]) if header.get(METADATA_KEY) else None
    except json.JSONDecodeError as e:
        raise ConversionError(f"LoRA file '{path}': its '{METADATA_KEY}' header is not JSON ({e})") from None
    layers: dict[str, dict] = {"unet": {}, "text": {}}
    alphas: dict[str, dict] = {"unet": {}, "text": {}}
    for (comp, module), parts in found.items():
        missing = {"down", "up"} - set(parts)
        if missing:
            key = next(iter(parts.values()))[0]
            raise _fail(path, key, f"has no {missing.pop()} factor beside it")
        layer = tables[comp][module]
        down, up = _factors(layer, parts["down"][1], parts["up"][1], parts["down"][0], path)
        layers[comp][layer.path] = (down, up)
        alpha = _peft_alpha(peft, comp, module, down.shape[-1], path) if peft is not None else None
        if alpha is None and "alpha" in parts:
            alpha = float(np.asarray(parts["alpha"][1]).reshape(()))
        alphas[comp][layer.path] = down.shape[-1] if alpha is None else alpha
    source = "metadata" if peft is not None else ("keys" if any("alpha" in p for p in found.values()) else "rank")
    adapters = [LoraAdapter.from_layers(layers[c], alphas[c]) if layers[c] else None for c in ("unet", "text")]
    meta = {"format": "kohya" if kohya else "diffusers", "alpha_source": source, "header": header}
    return adapters[0], adapters[1], meta


def _peft_alpha(peft: Mapping, comp: str, module: str, rank: int, path) -> float | None:
    """The alpha PEFT gives `module` under the LoraConfig stored (prefixed) in the file's metadata."""
    prefix = _PREFIX[comp] + "."
    cfg = {k[len(prefix):]: v for k, v in peft.items() if k.startswith(prefix)}
    if not cfg:
        return None
    if cfg.get("use_dora"):
        raise ConversionError(f"LoRA file '{path}': its {_PREFIX[comp]} adapter uses DoRA, which is not supported")
    alpha = cfg.get("lora_alpha", rank)
    names = [module] + (["text_model." + module] if comp == "text" else [])
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
            alpha = value
            break
    # PEFT's scale is alpha / r, or alpha / sqrt(r) with use_rslora; ours is always alpha / r
    return float(alpha) * (math.sqrt(rank) if cfg.get("use_rslora") else 1.0)


# ---------------------------------------------------------------------------- writing
def _torch_names(comp: str, adapter: LoraAdapter, tables) -> dict[str, str]:
    """{our layer path: module name} for every layer of `adapter`, or a ConfigError naming the first stranger."""
    by_path = {layer.path: name for name, layer in tables[comp].items()}
    missing = sorted(set(adapter.layers()) - set(by_path))
    if missing:
        what = "U-Net (for conv projections pass unet_cfg)" if comp == "unet" else "CLIP text encoder"
        raise ConfigError(f"save_lora: adapter layer '{missing[0]}' is not a layer of the {what}")
    return {p: by_path[p] for p in adapter.layers()}


def _unet_table_for_save(adapter: LoraAdapter, unet_cfg: UNetConfig | None) -> dict[str, _Layer]:
    if unet_cfg is not None:
        return unet_lora_layers(unet_cfg)
    out = {}
    for path, (down, _) in adapter.layers().items():
        if re.search(r"attentions_\d+/proj_(in|out)$", path):
            raise ConfigError(f"save_lora: layer '{path}' is a 1x1 conv in SD1 and a linear in SD2 U-Nets; "
                              "pass unet_cfg to say which")
        name = torch_name(f"{path}/kernel")[: -len(".weight")]
        out[name] = _Layer("unet", path, (*down.shape[:-1], 0), False)
    return out


def save_lora(path: str | os.PathLike, unet_adapter: LoraAdapter | None, text_adapter: LoraAdapter | None = None,
              *, unet_cfg: UNetConfig | None = None, format: str = "diffusers", alpha: str = "store") -> str:
    """Writes the adapters to one safetensors file (`path`, or ``path/pytorch_lora_weights.safetensors`` when
    `path` is not a ``.safetensors`` name); returns the file's path.

    `format`: "diffusers" (what ``pipe.load_lora_weights`` loads; alphas in the ``lora_adapter_metadata``
    header) or "kohya" (``lora_unet_*`` / ``lora_te_*`` keys with ``.alpha`` scalars). `alpha`: "store" keeps
    each layer's alpha; "bake" multiplies up by alpha / r and stores alpha = r, the same update for every loader.
    `unet_cfg` is needed when the adapter touches proj_in/proj_out (written 4-D for SD1 conv projections).
    """
    if format not in ("diffusers", "kohya"):
        raise ConfigError(f"save_lora: format={format!r}; use 'diffusers' or 'kohya'")
    if alpha not in ("store", "bake"):
        raise ConfigError(f"save_lora: alpha={alpha!r}; use 'store' or 'bake'")
    if unet_adapter is None and text_adapter is None:
        raise ConfigError("save_lora: give a U-Net adapter, a text encoder adapter or both")
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, WEIGHT_NAME)
    tensors: dict[str, np.ndarray] = {}
    metadata = {"format": "pt"}
    peft: dict = {}
    for comp, adapter in (("unet", unet_adapter), ("text", text_adapter)):
        if adapter is None:
            continue
        tables = {comp: _unet_table_for_save(adapter, unet_cfg) if comp == "unet" else _text_table(adapter)}
        t, a = _export(comp, adapter, tables, format, alpha)
        tensors.update(t)
        if format == "diffusers" and alpha == "store":
            peft.update({f"{_PREFIX[comp]}.{k}": v for k, v in _peft_config(a).items()})
        if format == "kohya":
            metadata.update({"ss_network_module": "networks.lora",
                             "ss_network_dim": str(_most_common({m: r for m, (r, _) in a.items()})),
                             "ss_network_alpha": str(_most_common({m: al for m, (_, al) in a.items()}))})
    if peft:
        metadata[METADATA_KEY] = json.dumps(peft, indent=2, sort_keys=True)
    write_safetensors(path, tensors, metadata)
    return path


def _text_table(adapter: LoraAdapter) -> dict[str, _Layer]:
    """Layers of a CLIP text adapter, named from its paths (no config needed: every layer is a Dense)."""
    out = {}
    for hf, (ours, kind) in _CLIP_NAMES.items():
        pattern = re.compile(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)"))
        for path in adapter.layers():
            m = pattern.fullmatch(path)
            if m and kind == "dense":
                out[hf.replace("{i}", m.groupdict().get("i") or "")] = _Layer("text", path, (), False)
    return out


def _export(comp, adapter: LoraAdapter, tables, format: str, alpha_mode: str):
    """(tensors, {module name: (rank, alpha)}) of one adapter in PyTorch layout."""
    names = _torch_names(comp, adapter, tables)
    scales = adapter.scales()
    tensors, info = {}, {}
    for p, (down, up) in adapter.layers().items():
        name, layer = names[p], tables[comp][names[p]]
        down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
        rank, alpha = down.shape[-1], scales[p] * down.shape[-1]
        if len(layer.shape) == down.ndim and layer.shape != (*down.shape[:-1], up.shape[-1]):
            raise ConfigError(f"save_lora: adapter layer '{p}' makes a {(*down.shape[:-1], up.shape[-1])} update, "
                              f"the config's kernel is {layer.shape}")
        if alpha_mode == "bake":
            up, alpha = up * scales[p], float(rank)
        if down.ndim == 4:
            a, b = conv_to_torch(down), conv_to_torch(up)
        else:
            a, b = linear_to_torch(down), linear_to_torch(up)
            if layer.conv1x1:
                a, b = a[:, :, None, None], b[:, :, None, None]
        info[name] = (rank, alpha)
        if format == "kohya":
            stem = _kohya_name(comp, name)
            tensors.update({f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b,
                            f"{stem}.alpha": np.asarray(alpha, np.float32)})
        else:
            stem = f"{_PREFIX[comp]}.{'text_model.' if comp == 'text' else ''}{name}"
            tensors.update({f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b})
    return tensors, info


def _most_common(values: Mapping[str, float]):
    return collections.Counter(values.values()).most_common(1)[0][0]


def _peft_config(info: Mapping[str, tuple[int, float]]) -> dict:
    """The PEFT LoraConfig fields diffusers needs: the commonest rank and alpha, full-name exceptions."""
    ranks = {m: r for m, (r, _) in info.items()}
    alphas = {m: a for m, (_, a) in info.items()}
    r, lora_alpha = _most_common(ranks), _most_common(alphas)
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != lora_alpha},
        "target_modules": sorted(info),
        "lora_dropout": 0.0,
        "use_dora": False,
        "use_rslora": False,
        "peft_type": "LORA",
    }
