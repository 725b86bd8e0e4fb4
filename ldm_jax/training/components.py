"""From config sections to the typed pieces a stage needs: data, model configs, frozen encoders, schedule.

``model.unet`` / ``model.vae`` hold a ``preset`` (``models.presets``: tiny, sd15, sd21, sd15_inpaint; tiny,
sd) plus overrides of that preset's fields, or ``pretrained`` = a diffusers folder (fine-tuning from SD
weights). The stage-2 VAE may come from a stage-1 ``workdir`` instead (its EMA parameters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax import diffusion
from ldm_jax.data import DataConfig
from ldm_jax.models import presets
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.types import ConfigError, _freeze, nearest

UNET_PRESETS = {"tiny": presets.tiny_unet, "sd15": presets.sd15_unet, "sd21": presets.sd21_unet,
                "sd15_inpaint": presets.sd15_inpaint_unet}
VAE_PRESETS = {"tiny": presets.tiny_vae, "sd": presets.sd_vae}
_NONE_IF_EMPTY = ("data_dir", "latent_cache")


def _section(section) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def data_config(config, **overrides) -> DataConfig:
    d = _section(config.data)
    for key in _NONE_IF_EMPTY:
        if d.get(key) == "":
            d[key] = None
    return DataConfig.from_config({**d, **overrides})


def _preset(table: dict, section, what: str, **defaults):
    d = _section(section)
    name = d.pop("preset", "tiny")
    for key in ("pretrained", "workdir"):
        d.pop(key, None)
    if name not in table:
        raise ConfigError(f"model.{what}.preset='{name}' is unknown{nearest(name, table)}: use one of {sorted(table)}")
    return table[name](**{k: _freeze(v) for k, v in {**defaults, **d}.items()})


def unet_config(section, **defaults):
    """The U-Net config of a ``model.unet`` section (``defaults``, e.g. cross_attention_dim, yield to it)."""
    return _preset(UNET_PRESETS, section, "unet", **defaults)


def vae_config(section, **defaults):
    return _preset(VAE_PRESETS, section, "vae", **defaults)


def compute_options(config) -> dict:
    """Model fields that follow ``config.train``: compute dtype (parameters stay float32) and remat."""
    train = config.get("train", {}) or {}
    return {"dtype": str(train.get("dtype", "float32")), "remat": bool(train.get("remat", False))}


def pretrained_unet(section):
    """(config, params) from ``model.unet.pretrained`` (a diffusers unet folder), or None."""
    path = _section(section).get("pretrained")
    if not path:
        return None
    from ldm_jax.convert import diffusers as dconv

    return dconv.load_unet(path)


def frozen_vae(section):
    """(config, params) of the frozen stage-2 autoencoder: a diffusers folder or a stage-1 workdir."""
    d = _section(section)
    if d.get("pretrained"):
        from ldm_jax.convert import diffusers as dconv

        return dconv.load_vae(d["pretrained"])
    if d.get("workdir"):
        from ldm_jax.training.checkpoint import read_config, restore_params

        stage1 = read_config(d["workdir"])
        if stage1.get("train", {}).get("stage") != "autoencoder":
            raise ConfigError(f"model.vae.workdir='{d['workdir']}' is not an autoencoder (stage 1) workdir")
        return vae_config(stage1["model"]["vae"]), restore_params(d["workdir"], ema=True)
    raise ConfigError("stage 2 needs a trained autoencoder: set model.vae.workdir (a stage-1 workdir) "
                      "or model.vae.pretrained (a diffusers vae folder)")


def text_encoder(section) -> TextEncoder:
    d = _section(section)
    name = d.get("name", "minilm")
    if name == "minilm":
        return TextEncoder.minilm(max_length=int(d.get("max_length", 32)))
    if name == "clip":
        if not d.get("path"):
            raise ConfigError("model.text_encoder.name='clip' needs model.text_encoder.path (an HF CLIP folder)")
        layer = int(d.get("hidden_layer", 0)) or None
        return TextEncoder.from_hf_clip(d["path"], hidden_layer=layer)
    raise ConfigError(f"model.text_encoder.name='{name}' is unknown{nearest(name, ('minilm', 'clip'))}")


def schedule(section):
    """The noise schedule of a ``diffusion`` section; ``logsnr_min`` / ``logsnr_max`` (None: untruncated)
    truncate a continuous schedule before ``zero_snr`` and ``shift`` apply."""
    d = _section(section)
    bounds = {k: float(d[k]) for k in ("logsnr_min", "logsnr_max") if d.get(k) is not None}
    return diffusion.get_schedule(d.get("schedule", "cosine"), shift=float(d.get("shift", 1.0)),
                                  zero_snr=bool(d.get("zero_snr", False)), **bounds)


def weighting_kwargs(section) -> dict:
    d = _section(section)
    return {"gamma": float(d.get("min_snr_gamma", 5.0))} if d.get("weighting") == "min_snr" else {}


def as_arrays(tree):
    return jax.tree.map(jnp.asarray, tree)
