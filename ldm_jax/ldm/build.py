"""From the ``model`` and ``diffusion`` config sections to the typed pieces of a latent-diffusion model.

``model.backbone`` picks the denoiser: "unet" (default), "dit" or "mmdit", configured by the section of that
name. ``model.unet`` / ``model.dit`` / ``model.mmdit`` / ``model.vae`` hold a ``preset`` (``models.presets``:
unet tiny, sd15, sd21, sd15_inpaint; dit tiny, xl_2; mmdit tiny, sd3_medium, sd35_medium; vae tiny, sd) plus
overrides of that preset's fields, or ``pretrained`` = a diffusers folder (fine-tuning from released weights).
The stage-2 VAE may come from a stage-1 ``workdir`` instead (its EMA parameters). Training and the model layer
both read a config through these functions, so a workdir is interpreted the way it was trained.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert import dit as dit_convert
from ldm_jax.convert import sd3 as sd3_convert
from ldm_jax.convert.common import ConversionError, flatten
from ldm_jax.ldm.workdirs import is_workdir, read_config, restore_params
from ldm_jax.models import backbones, lora, presets
from ldm_jax.models.text_encoder import SDXL_TEXT_OPTIONS, TextEncoder, TextEncoders
from ldm_jax.types import ConfigError, FrozenConfig, _freeze, check_choice, nearest

UNET_PRESETS = {"tiny": presets.tiny_unet, "sd15": presets.sd15_unet, "sd21": presets.sd21_unet,
                "sd15_inpaint": presets.sd15_inpaint_unet, "sdxl": presets.sdxl_unet,
                "sdxl_refiner": presets.sdxl_refiner_unet, "tiny_sdxl": presets.tiny_sdxl_unet}
DIT_PRESETS = {"tiny": presets.tiny_dit, "xl_2": presets.dit_xl_2}
MMDIT_PRESETS = {"tiny": presets.tiny_mmdit, "sd3_medium": presets.sd3_medium, "sd35_medium": presets.sd35_medium}
BACKBONE_PRESETS = {"unet": UNET_PRESETS, "dit": DIT_PRESETS, "mmdit": MMDIT_PRESETS}
VAE_PRESETS = {"tiny": presets.tiny_vae, "sd": presets.sd_vae}
TEXT_ENCODERS = ("minilm", "clip", "sdxl")
PRECONDITIONS = ("none", "edm")
NETWORK_INPUTS = ("vp", "flow")  # see ldm.generate.Denoiser


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


def backbone(model_sec) -> str:
    """The denoiser kind ``model.backbone`` names (default "unet")."""
    name = section(model_sec).get("backbone") or "unet"
    check_choice("model.backbone", name, BACKBONE_PRESETS)
    return name


def backbone_section(model_sec) -> dict:
    """The ``model.<backbone>`` section (empty when absent: the backbone's tiny preset)."""
    return section(section(model_sec).get(backbone(model_sec)))


def backbone_config(model_sec, *, context_dim: int, latent_channels: int, pooled_dim: int | None = None, **options):
    """The denoiser config of a ``model`` section: its preset, fitted to the text encoder's width (and, for an
    SDXL text_time U-Net, its pooled width) and the VAE's channels, with `options` (compute dtype, remat); the
    section's own values win over all of these."""
    name = backbone(model_sec)
    fit = {"in_channels": latent_channels, "out_channels": latent_channels}
    if name == "mmdit":
        fit.update(joint_attention_dim=context_dim, pooled_projection_dim=context_dim)
    else:
        fit.update(cross_attention_dim=context_dim)
    cfg = _preset(BACKBONE_PRESETS[name], backbone_section(model_sec), name, **{**fit, **options})
    added = getattr(cfg, "addition_embed_type", None) == "text_time"
    if added and pooled_dim and "projection_class_embeddings_input_dim" not in backbone_section(model_sec):
        # SDXL's added embedding fitted to the text encoder's pooled width and the base's 6 time ids
        cfg = cfg.replace(projection_class_embeddings_input_dim=pooled_dim + 6 * cfg.addition_time_embed_dim)
    return cfg


def pretrained_backbone(model_sec, **fit):
    """(config, params) from ``model.<backbone>.pretrained``: a diffusers unet / transformer folder, or a
    latent-diffusion workdir (its EMA weights, its config's backbone fitted with `fit`: context_dim and
    latent_channels as `backbone_config`); None without one."""
    path = backbone_section(model_sec).get("pretrained")
    if not path:
        return None
    name = backbone(model_sec)
    if is_workdir(path):
        saved = read_config(path)
        if saved.get("train", {}).get("stage") != "ldm" or _saved_backbone(saved) != name:
            raise ConfigError(f"model.{name}.pretrained='{path}' is not a latent-diffusion workdir with a {name}")
        cfg = backbone_config(saved["model"], **fit)
        return cfg, check_params(restore_params(path, ema=True), backbones.param_shapes(cfg),
                                 f"model.{name}.pretrained='{path}'")
    if name == "unet":
        return dconv.load_unet(path)
    return dit_convert.load_dit(path) if name == "dit" else sd3_convert.load_sd3_transformer(path)


def _saved_backbone(config: dict) -> str:
    return (config.get("model", {}) or {}).get("backbone") or "unet"


def check_params(tree, expected: dict, what: str):
    """`tree` when its {'a/b': shape} equals `expected` (a config's ``param_shapes``), else a one-line
    ConversionError: a checkpoint trained with another model config."""
    got = {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}
    if got != dict(expected):
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in expected if got[k] != expected[k])
        raise ConversionError(f"{what}: checkpoint parameters do not match the config ({len(wrong)} keys differ, "
                              f"e.g. '{wrong[0]}'); was the workdir trained with another model config?")
    return tree


def lora_config(config):
    """The run's ``lora`` section as a LoraConfig, or None when it trains the whole network (rank 0)."""
    sec = section((config.get("lora") if hasattr(config, "get") else None) or {})
    if not int(sec.get("rank", 0) or 0):
        return None
    alpha = float(sec.get("alpha", 0.0) or 0.0)
    return lora.LoraConfig(rank=int(sec["rank"]), alpha=alpha or None, dropout=float(sec.get("dropout", 0.0)),
                           targets=tuple(sec.get("targets", ("attention",))))


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
        if not is_workdir(d["workdir"]):
            raise ConfigError(f"model.vae.workdir='{d['workdir']}' (the stage-1 autoencoder this model was trained "
                              "with) is not there or has no checkpoints: copy or move it along, or set "
                              "model.vae.workdir to where it is now")
        stage1 = read_config(d["workdir"])
        if stage1.get("train", {}).get("stage") != "autoencoder":
            raise ConfigError(f"model.vae.workdir='{d['workdir']}' is not an autoencoder (stage 1) workdir")
        return vae_config(stage1["model"]["vae"]), restore_params(d["workdir"], ema=True)
    raise ConfigError("stage 2 needs a trained autoencoder: set model.vae.workdir (a stage-1 workdir) "
                      "or model.vae.pretrained (a diffusers vae folder)")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig(FrozenConfig):
    """Typed ``model.text_encoder`` section.

    name: minilm (all-MiniLM-L6-v2 from its package, `max_length` tokens), clip (an HF CLIPTextModel folder at
    `path`, its tokenizer's length, conditioning from `hidden_layer` when > 0, e.g. -2 ... as CLIPTextEncoder)
    or sdxl (SDXL's pair: the CLIP-L folder at `path` and the OpenCLIP-bigG CLIPTextModelWithProjection folder
    at `path_2`, e.g. an SDXL pipeline's text_encoder/ and text_encoder_2/ (tokenizers from their sibling
    tokenizer/ and tokenizer_2/ folders when present), both on their penultimate layer without the final norm,
    the pooled vector from the second; `ldm_jax.models.TextEncoders`).
    """

    name: str = "minilm"
    path: str = ""
    path_2: str = ""
    max_length: int = 16
    hidden_layer: int = 0

    def __post_init__(self):
        check_choice("model.text_encoder.name", self.name, TEXT_ENCODERS)
        if self.name in ("clip", "sdxl") and not self.path:
            raise ConfigError(f"model.text_encoder.name='{self.name}' needs model.text_encoder.path (an HF CLIP "
                              "folder)")
        if self.name == "sdxl" and not self.path_2:
            raise ConfigError("model.text_encoder.name='sdxl' needs model.text_encoder.path_2 (the OpenCLIP-bigG "
                              "CLIPTextModelWithProjection folder, an SDXL pipeline's text_encoder_2/)")
        if self.max_length < 1:
            raise ConfigError(f"model.text_encoder.max_length must be >= 1, got {self.max_length}")


def text_encoder(sec) -> TextEncoder | TextEncoders:
    cfg = TextEncoderConfig.from_config(section(sec))
    if cfg.name == "minilm":
        return TextEncoder.minilm(max_length=cfg.max_length)
    if cfg.name == "sdxl":  # SDXL's conditioning: penultimate layers without the final norm
        return TextEncoders(tuple(TextEncoder.from_hf_clip(path, _sibling_tokenizer(path, suffix), **SDXL_TEXT_OPTIONS)
                                  for path, suffix in ((cfg.path, ""), (cfg.path_2, "_2"))))
    return TextEncoder.from_hf_clip(cfg.path, hidden_layer=cfg.hidden_layer or None)


def _sibling_tokenizer(path: str, suffix: str) -> str | None:
    """An SDXL pipeline folder's tokenizer{suffix}/ beside text_encoder{suffix}/ (None: TextEncoder's search)."""
    folder = os.path.join(os.path.dirname(os.path.normpath(path)), "tokenizer" + suffix)
    return folder if os.path.isdir(folder) else None


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(FrozenConfig):
    """Typed ``diffusion`` section: everything of the diffusion core a training run chooses.

    schedule, schedule_options: ``diffusion.get_schedule(name, **options)`` (e.g. sigmoid start/end/tau, laplace
      mu/b, edm sigma_min/sigma_max/rho, linear beta_start/beta_end); logsnr_min / logsnr_max (None:
      untruncated) truncate a continuous schedule before zero_snr (Lin et al. 2023) and shift apply.
    prediction: eps, v, x0 or flow (the network's output kind).
    weighting, weighting_options: the loss weighting and its constants (min_snr gamma, p2 k and gamma, edm
      sigma_data, sigmoid bias); min_snr_gamma is min_snr's gamma when weighting_options does not set it.
    noise_sampling, noise_sampling_options: how training draws t (uniform t_min/t_max, logit_normal
      mean/std, lognormal_sigma p_mean/p_std, low_discrepancy; ``discrete=True`` snaps to a table's timesteps).
    network_input: what the network is fed (``ldm.generate.Denoiser``): "vp" (x_t and the schedule's timestep)
      or "flow" (SD3's rectified-flow convention: x_flow = (1 - tau) x0 + tau eps and timestep 1000 tau).
    precondition: "none", or "edm" (Karras et al. 2022: the network sees c_in x and c_noise = ln(sigma) / 4 and
      predicts x0 = c_skip x + c_out F; needs prediction="x0"), with sigma_data.
    schedule="learned" (Kingma et al. 2021, VDM) is trained jointly with the network: its parameters
      (``learned_schedule_init`` with schedule_options hidden / logsnr_min / logsnr_max / scale) are trained to
      minimize the variance of the loss, which the ELBO weighting makes independent of the schedule's interior
      in expectation; so it needs weighting="elbo". The endpoints stay at logsnr_min / logsnr_max.
    """

    schedule: str = "cosine"
    schedule_options: Any = ()
    shift: float = 1.0
    zero_snr: bool = False
    logsnr_min: float | None = None
    logsnr_max: float | None = None
    prediction: str = "eps"
    weighting: str = "uniform"
    weighting_options: Any = ()
    min_snr_gamma: float = 5.0
    noise_sampling: str = "uniform"
    noise_sampling_options: Any = ()
    precondition: str = "none"
    sigma_data: float = 0.5
    network_input: str = "vp"

    def __post_init__(self):
        check_choice("diffusion.prediction", self.prediction, diffusion.PREDICTIONS)
        check_choice("diffusion.weighting", self.weighting, diffusion.WEIGHTINGS)
        check_choice("diffusion.noise_sampling", self.noise_sampling, diffusion.NOISE_SAMPLERS)
        check_choice("diffusion.precondition", self.precondition, PRECONDITIONS)
        check_choice("diffusion.network_input", self.network_input, NETWORK_INPUTS)
        if self.network_input != "vp" and self.precondition != "none":
            raise ConfigError(f"diffusion.network_input='{self.network_input}' and precondition="
                              f"'{self.precondition}' both set the network's input: choose one")
        if self.learned and self.weighting != "elbo":
            raise ConfigError(f"diffusion.schedule='learned' is trained to minimize the loss variance, which leaves "
                              f"the loss unchanged only under the ELBO weighting: set diffusion.weighting='elbo' "
                              f"(got '{self.weighting}')")
        if self.precondition == "edm" and self.prediction != "x0":
            raise ConfigError(f"diffusion.precondition='edm' makes the network predict x0: set diffusion.prediction="
                              f"'x0' (got '{self.prediction}')")
        if not self.sigma_data > 0:
            raise ConfigError(f"diffusion.sigma_data must be > 0, got {self.sigma_data}")

    @property
    def learned(self) -> bool:
        return self.schedule == "learned"

    def init_schedule_params(self, rng) -> dict:
        """A learned schedule's initial parameters (``diffusion.learned_schedule_init`` with schedule_options)."""
        return diffusion.learned_schedule_init(rng, **dict(self.schedule_options))

    def make_schedule(self, params=None):
        """The schedule; a learned one from `params` (default: its initial parameters, seed 0)."""
        if self.learned:
            params = self.init_schedule_params(jax.random.key(0)) if params is None else params
            return diffusion.get_schedule("learned", params=params, shift=float(self.shift),
                                          zero_snr=bool(self.zero_snr))
        bounds = {k: float(v) for k, v in (("logsnr_min", self.logsnr_min), ("logsnr_max", self.logsnr_max))
                  if v is not None}
        return diffusion.get_schedule(self.schedule, shift=float(self.shift), zero_snr=bool(self.zero_snr),
                                      **dict(self.schedule_options), **bounds)

    def loss_options(self) -> dict:
        """The keyword arguments of ``diffusion.loss`` beyond the prediction (weighting and its constants)."""
        options = dict(self.weighting_options)
        if self.weighting == "min_snr":
            options.setdefault("gamma", float(self.min_snr_gamma))
        return {"weighting": self.weighting, **options}

    def check(self, schedule) -> None:
        """Evaluates the weighting and the noise sampler once, so a wrong option fails before any step."""
        diffusion.loss_weight(jnp.full((1,), 0.5), schedule=schedule, prediction=self.prediction,
                              **self.loss_options())
        diffusion.sample_t(self.noise_sampling, jax.random.key(0), 1, schedule=schedule,
                           **dict(self.noise_sampling_options))


def diffusion_config(sec) -> DiffusionConfig:
    return DiffusionConfig.from_config(section(sec))


def schedule(sec):
    """The noise schedule of a ``diffusion`` section (`DiffusionConfig.make_schedule`)."""
    return diffusion_config(sec).make_schedule()


def as_arrays(tree):
    return jax.tree.map(jnp.asarray, tree)
