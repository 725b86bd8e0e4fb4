"""From the ``model`` and ``diffusion`` config sections to the typed pieces of a latent-diffusion model.

``model.unet`` / ``model.vae`` hold a ``preset`` (``models.presets``: tiny, sd15, sd21, sd15_inpaint; tiny,
sd) plus overrides of that preset's fields, or ``pretrained`` = a diffusers folder (fine-tuning from SD
weights). The stage-2 VAE may come from a stage-1 ``workdir`` instead (its EMA parameters). Training and the
model layer both read a config through these functions, so a workdir is interpreted the way it was trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax import diffusion
from ldm_jax.convert import diffusers as dconv
from ldm_jax.ldm.workdirs import read_config, restore_params
from ldm_jax.models import presets
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.types import ConfigError, _freeze, nearest

UNET_PRESETS = {"tiny": presets.tiny_unet, "sd15": presets.sd15_unet, "sd21": presets.sd21_unet,
                "sd15_inpaint": presets.sd15_inpaint_unet}
VAE_PRESETS = {"tiny": presets.tiny_vae, "sd": presets.sd_vae}
TEXT_ENCODERS = ("minilm", "clip")
DEFAULT_MAX_LENGTH = 16  # model.text_encoder.max_length when a config omits it (configlib.base_config's value)


def section(sec) -> dict:
    """A config section (ConfigDict, dict or None) as a plain dict."""
    return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec or {})


def _preset(table: dict, sec, what: str, **defaults):
    d = section(sec)
    name = d.pop("preset", "tiny")
    for key in ("pretrained", "workdir"):
        d.pop(key, None)
    if name not in table:
        raise ConfigError(f"model.{what}.preset='{name}' is unknown{nearest(name, table)}: use one of {sorted(table)}")
    return table[name](**{k: _freeze(v) for k, v in {**defaults, **d}.items()})


def unet_config(sec, **defaults):
    """The U-Net config of a ``model.unet`` section (``defaults``, e.g. cross_attention_dim, yield to it)."""
    return _preset(UNET_PRESETS, sec, "unet", **defaults)


def vae_config(sec, **defaults):
    return _preset(VAE_PRESETS, sec, "vae", **defaults)


def compute_options(config) -> dict:
    """Model fields that follow ``config.train``: compute dtype (parameters stay float32) and remat."""
    train = config.get("train", {}) or {}
    return {"dtype": str(train.get("dtype", "float32")), "remat": bool(train.get("remat", False))}


def pretrained_unet(sec):
    """(config, params) from ``model.unet.pretrained`` (a diffusers unet folder), or None."""
    path = section(sec).get("pretrained")
    return dconv.load_unet(path) if path else None


def frozen_vae(sec):
    """(config, params) of the frozen stage-2 autoencoder: a diffusers folder or a stage-1 workdir."""
    d = section(sec)
    if d.get("pretrained"):
        return dconv.load_vae(d["pretrained"])
    if d.get("workdir"):
        stage1 = read_config(d["workdir"])
        if stage1.get("train", {}).get("stage") != "autoencoder":
            raise ConfigError(f"model.vae.workdir='{d['workdir']}' is not an autoencoder (stage 1) workdir")
        return vae_config(stage1["model"]["vae"]), restore_params(d["workdir"], ema=True)
    raise ConfigError("stage 2 needs a trained autoencoder: set model.vae.workdir (a stage-1 workdir) "
                      "or model.vae.pretrained (a diffusers vae folder)")


def text_encoder(sec) -> TextEncoder:
    d = section(sec)
    name = d.get("name", "minilm")
    if name == "minilm":
        return TextEncoder.minilm(max_length=int(d.get("max_length", DEFAULT_MAX_LENGTH)))
    if name == "clip":
        if not d.get("path"):
            raise ConfigError("model.text_encoder.name='clip' needs model.text_encoder.path (an HF CLIP folder)")
        layer = int(d.get("hidden_layer", 0)) or None
        return TextEncoder.from_hf_clip(d["path"], hidden_layer=layer)
    raise ConfigError(f"model.text_encoder.name='{name}' is unknown{nearest(name, TEXT_ENCODERS)}")


def schedule(sec):
    """The noise schedule of a ``diffusion`` section; ``logsnr_min`` / ``logsnr_max`` (None: untruncated)
    truncate a continuous schedule before ``zero_snr`` and ``shift`` apply."""
    d = section(sec)
    bounds = {k: float(d[k]) for k in ("logsnr_min", "logsnr_max") if d.get(k) is not None}
    return diffusion.get_schedule(d.get("schedule", "cosine"), shift=float(d.get("shift", 1.0)),
                                  zero_snr=bool(d.get("zero_snr", False)), **bounds)


def as_arrays(tree):
    return jax.tree.map(jnp.asarray, tree)
