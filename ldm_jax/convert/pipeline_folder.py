"""A whole latent-diffusion model as one folder in diffusers' layout (the writing side of ``ldm-jax convert``).

    folder/
      model_index.json              each component with its (library, class); "_ldm_jax": what no diffusers or
                                    transformers file holds (the run's `sample` defaults, the default image
                                    size, text-encoder options, config fields diffusers has no key for)
      unet/, vae/                   diffusers UNet2DConditionModel / AutoencoderKL (``convert.diffusers``)
      text_encoder/, tokenizer/     transformers CLIPTextModel + CLIPTokenizer, or BertModel + BertTokenizer
      scheduler/scheduler_config.json
                                    diffusers' fields where the schedule is one of its own (discrete linear /
                                    scaled_linear betas, eps / v / x0 prediction, zero terminal SNR, no shift,
                                    no preconditioning), always a "_ldm_jax" block: the run's whole diffusion
                                    section, a learned schedule's parameters and the time-grid defaults

ldm_jax reads the "_ldm_jax" blocks before anything else (``ldm_jax.ldm.loading.diffusers_parts``), so the folder
gives back the workdir's model exactly; diffusers and transformers ignore them. A schedule without a diffusers
equivalent (continuous cosine, sigmoid, EDM, flow, learned, shifted, ...) gets no diffusers fields and the
model index names ``["ldm_jax", "Schedule"]`` for it: diffusers then refuses the pipeline as a whole (rather
than sampling it with a wrong schedule) but still loads the U-Net, the VAE and the text encoder one by one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

import numpy as np

from ldm_jax import diffusion
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert import hf
from ldm_jax.convert.common import ConversionError
from ldm_jax.models.layers import unbox
from ldm_jax.models.text import BertEncoder, CLIPTextEncoder
from ldm_jax.models.tokenizers import CLIPTokenizer, WordPieceTokenizer

logger = logging.getLogger("ldm_jax.convert")

# The key of ldm_jax's own block in model_index.json and scheduler_config.json: diffusers drops keys that start
# with "_" silently (any other unknown key is warned about on every load).
LDM_JAX = "_ldm_jax"
FORMAT = 1
DIFFUSERS_VERSION = "0.30.0"
DIFFUSERS_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_BETAS = {"linear": (1000, 1e-4, 0.02), "scaled_linear": (1000, 0.00085, 0.012)}  # T, beta_start, beta_end
# sampler -> (diffusers class, takes rescale_betas_zero_snr, the key of its final target or None: always zero)
_CLASSES = {
    "ddim": ("DDIMScheduler", True, "set_alpha_to_one"),
    "ddpm": ("DDPMScheduler", True, None),
    "euler": ("EulerDiscreteScheduler", True, "final_sigmas_type"),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", True, None),
    "heun": ("HeunDiscreteScheduler", False, None),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", True, "final_sigmas_type"),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", True, "final_sigmas_type"),
    "unipc": ("UniPCMultistepScheduler", True, "final_sigmas_type"),
}
# Config fields that change no number a diffusers model computes (compute dtype, rematerialization, attention
# kernel, initialization, heads given per level instead of by width).
_NEUTRAL_FIELDS = {"dtype", "param_dtype", "remat", "attention_impl", "zero_init", "num_heads", "head_dim"}


# ---------------------------------------------------------------------------- JSON
def plain(value):
    """A config value as JSON: frozen mappings (tuples of (name, value) pairs) -> dicts, tuples -> lists,
    arrays -> (nested) lists of Python floats (exact for float32)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and value and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                                  for p in value):
        return {k: plain(v) for k, v in value}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    return value


def write_json(path: str, obj: Mapping) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------- scheduler
def diffusers_scheduler_fields(diffusion_section: Mapping, sampler: str, defaults: Mapping) -> dict | None:
    """diffusers' scheduler_config.json fields for the run's schedule (class picked by its sampler), or None
    where diffusers has no scheduler computing the same noise levels, prediction and time grid."""
    d = diffusion_section
    name, prediction = d.get("schedule"), d.get("prediction", "eps")
    options = dict(plain(d.get("schedule_options") or {}))
    num, start, end = _BETAS.get(name, (None, None, None))
    if (num is None or prediction not in DIFFUSERS_PREDICTIONS or float(d.get("shift", 1.0)) != 1.0
            or d.get("precondition", "none") != "none"
            or set(options) - {"num_train_timesteps", "beta_start", "beta_end"}):
        return None
    spacing = defaults.get("spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace", "karras"):
        return None
    zero_snr = bool(d.get("zero_snr", False))
    cls, takes_zero_snr, final_key = _CLASSES[sampler]
    final = defaults.get("final_ddim" if final_key == "set_alpha_to_one" else "final", "zero")
    if (zero_snr and not takes_zero_snr) or (final_key is None and final != "zero") or (
            spacing == "karras" and cls in ("DDIMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler")):
        cls, final_key = "EulerDiscreteScheduler", "final_sigmas_type"  # one that can say it all
        final = defaults.get("final", "zero")
    out = {
        "_class_name": cls,
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(options.get("num_train_timesteps", num)),
        "beta_schedule": name,
        "beta_start": float(options.get("beta_start", start)),
        "beta_end": float(options.get("beta_end", end)),
        "prediction_type": DIFFUSERS_PREDICTIONS[prediction],
        "timestep_spacing": "linspace" if spacing == "karras" else spacing,
        "steps_offset": int(defaults.get("steps_offset", 0)),
    }
    if zero_snr:
        out["rescale_betas_zero_snr"] = True
    if spacing == "karras":
        out["use_karras_sigmas"] = True
    if cls in ("DDIMScheduler", "DDPMScheduler"):
        out.update(clip_sample=False, thresholding=False)
    if final_key == "set_alpha_to_one":
        out["set_alpha_to_one"] = final == "zero"
    elif final_key == "final_sigmas_type":
        out["final_sigmas_type"] = final
    if sampler == "dpmpp_2m_sde" and cls == "DPMSolverMultistepScheduler":
        out["algorithm_type"] = "sde-dpmsolver++"
    return out


def learned_schedule_params(schedule) -> dict | None:
    """The parameters of the learned schedule inside `schedule` (through its shift / zero-SNR wrappers)."""
    while schedule is not None:
        if isinstance(schedule, diffusion.LearnedSchedule):
            return dict(schedule.params)
        schedule = getattr(schedule, "inner", None)
    return None


def scheduler_config(diffusion_section: Mapping, defaults: Mapping, sampler: str = "ddim",
                     schedule_params: Mapping | None = None) -> dict:
    """scheduler_config.json: diffusers' fields where it has the schedule (`diffusers_scheduler_fields`), and
    always the "_ldm_jax" block: `diffusion_section` (the run's typed ``diffusion`` config as a dict: schedule and
    options, shift, zero_snr, logSNR bounds, prediction, precondition, sigma_data, and the training-only fields),
    a learned schedule's `schedule_params` and the time-grid `defaults` (``SamplingDefaults`` as a dict)."""
    section, defaults = plain(diffusion_section), plain(defaults)
    out = diffusers_scheduler_fields(section, sampler, defaults) or {}
    out[LDM_JAX] = {"format": FORMAT, "diffusion": section, "defaults": defaults,
                    "schedule_params": None if schedule_params is None else plain(dict(schedule_params))}
    return out


# ---------------------------------------------------------------------------- text encoder
def save_text_encoder(text_encoder_dir: str, tokenizer_dir: str, te) -> tuple[dict, dict]:
    """Writes a `TextEncoder` (module, params, tokenizer) as transformers folders. Returns ({component:
    [library, class]}, the options ldm_jax needs to rebuild it: kind, max_length, hidden_layer, final_norm,
    use_attention_mask)."""
    module, tokenizer = te.module, te.tokenizer
    if isinstance(module, CLIPTextEncoder) and isinstance(tokenizer, CLIPTokenizer):
        hf.save_clip_text(text_encoder_dir, module.config, unbox(te.params))
        tokenizer.save(tokenizer_dir)
        projected = module.config.projection_dim is not None
        classes = ("CLIPTextModelWithProjection" if projected else "CLIPTextModel", "CLIPTokenizer")
        kind = "clip"
    elif isinstance(module, BertEncoder) and isinstance(tokenizer, WordPieceTokenizer):
        hf.save_bert(text_encoder_dir, module.config, unbox(te.params))
        _save_wordpiece(tokenizer_dir, tokenizer)
        classes, kind = ("BertModel", "BertTokenizer"), "bert"
    else:
        raise ConversionError(f"no transformers layout for a {type(module).__name__} text encoder with a "
                              f"{type(tokenizer).__name__}")
    # diffusers' StableDiffusionPipeline passes the attention mask when the text config asks for it
    _update_json(os.path.join(text_encoder_dir, "config.json"), use_attention_mask=bool(te.use_attention_mask))
    _update_json(os.path.join(tokenizer_dir, "tokenizer_config.json"), model_max_length=int(te.max_length))
    options = {"kind": kind, "max_length": int(te.max_length), "hidden_layer": te.hidden_layer,
               "use_attention_mask": bool(te.use_attention_mask)}
    if kind == "clip":
        options["final_norm"] = bool(te.final_norm)
    return {"text_encoder": ["transformers", classes[0]], "tokenizer": ["transformers", classes[1]]}, options


def _save_wordpiece(path: str, tokenizer: WordPieceTokenizer) -> None:
    os.makedirs(path, exist_ok=True)
    backend = tokenizer.tokenizer
    backend.save(os.path.join(path, "tokenizer.json"))
    pad = (backend.padding or {}).get("pad_token", "[PAD]")
    specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    config = {"tokenizer_class": "BertTokenizer", "model_max_length": tokenizer.max_length, "pad_token": pad,
              **{k: v for k, v in specials.items() if backend.token_to_id(v) is not None}}
    normalizer = json.loads(backend.to_str()).get("normalizer") or {}
    if "lowercase" in normalizer:
        config["do_lower_case"] = bool(normalizer["lowercase"])
    write_json(os.path.join(path, "tokenizer_config.json"), config)


def _update_json(path: str, **fields) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(fields)
    write_json(path, data)


# ---------------------------------------------------------------------------- U-Net / VAE configs
def config_overrides(cfg, to_diffusers, from_diffusers, what: str) -> dict:
    """The fields of `cfg` that a trip through diffusers' config.json loses, to be restored on loading.
    Logs a warning when one of them changes numbers (diffusers then computes another model)."""
    back = from_diffusers(to_diffusers(cfg))
    lost = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(back, f.name)}
    numeric = sorted(set(lost) - _NEUTRAL_FIELDS)
    if hasattr(cfg, "heads_per_level") and cfg.heads_per_level() != back.heads_per_level():
        numeric.append("attention heads")
    if numeric:
        logger.warning("the %s's %s has no diffusers config key: diffusers will compute another model (ldm_jax "
                       "reads it back from model_index.json)", what, ", ".join(numeric))
    return plain(lost)


# ---------------------------------------------------------------------------- the folder
def write_model_folder(dst: str, model, diffusion_section: Mapping, *, source: str = "") -> list[str]:
    """Writes `model` (a ``LatentDiffusion``: configs, parameters, text encoder, schedule, defaults, run `sample`
    section, default size) to `dst` in the layout of the module docstring; `diffusion_section` is the typed
    diffusion config it was built from, as a dict. Returns the components written."""
    if model.unet_params is None:
        raise ConversionError("the model has no U-Net parameters to write")
    if model.backbone != "unet":
        raise ConversionError(f"this model's denoiser is a {model.backbone}: a Stable-Diffusion pipeline folder holds "
                              "a U-Net; export the transformer alone with ldm_jax.convert.dit.save_dit or "
                              "ldm_jax.convert.sd3.save_sd3_transformer")
    dconv.save_unet(os.path.join(dst, "unet"), model.unet_config, unbox(model.unet_params))
    dconv.save_vae(os.path.join(dst, "vae"), model.vae_config, unbox(model.vae_params))
    encoders = getattr(model.text_encoder, "encoders", (model.text_encoder,))  # SDXL: text_encoder{,_2}/
    text_classes, text_options = {}, {}
    for i, te in enumerate(encoders):
        suffix = f"_{i + 1}" if i else ""
        classes, options = save_text_encoder(os.path.join(dst, "text_encoder" + suffix),
                                             os.path.join(dst, "tokenizer" + suffix), te)
        text_classes.update({k + suffix: v for k, v in classes.items()})
        text_options["text_encoder" + suffix] = options
    sample = model.sample.to_dict() if model.sample is not None else None
    sampler = sample["sampler"] if sample else "ddim"
    sched = scheduler_config(diffusion_section, dataclasses.asdict(model.defaults), sampler,
                             learned_schedule_params(model.schedule))
    write_json(os.path.join(dst, "scheduler", "scheduler_config.json"), sched)
    extra = {
        "format": FORMAT,
        "source": source,
        "sample": plain(sample),
        "default_size": model.default_size,
        **text_options,
        "unet": config_overrides(model.unet_config, dconv.unet_config_to_diffusers, dconv.unet_config_from_diffusers,
                                 "U-Net"),
        "vae": config_overrides(model.vae_config, dconv.vae_config_to_diffusers, dconv.vae_config_from_diffusers,
                                "VAE"),
    }
    sdxl = len(encoders) > 1
    pipeline = {"_class_name": "StableDiffusionXLPipeline", "image_encoder": [None, None],
                "force_zeros_for_empty_prompt": bool(model.force_zeros_for_empty_prompt)} if sdxl else {
        "_class_name": "StableDiffusionPipeline", "safety_checker": [None, None], "requires_safety_checker": False}
    index = {
        **pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **text_classes,
        "scheduler": ["diffusers", sched["_class_name"]] if "_class_name" in sched else ["ldm_jax", "Schedule"],
        "feature_extractor": [None, None],
        LDM_JAX: extra,
    }
    write_json(os.path.join(dst, "model_index.json"), index)
    return ["unet", "vae", *(name for name in text_classes), "scheduler"]
