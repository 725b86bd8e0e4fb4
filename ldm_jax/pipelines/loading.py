"""Loading pipeline `Components` from the three places weights live.

``load_components(path)`` dispatches on what `path` is:

(a) a diffusers-layout SD 1.x/2.x folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/scheduler_config.json``): `load_diffusers`. The scheduler config is honoured: beta_schedule
    (linear, scaled_linear, squaredcos_cap_v2) or trained_betas, beta_start/end, num_train_timesteps,
    rescale_betas_zero_snr, prediction_type (epsilon, v_prediction, sample), timestep_spacing, steps_offset,
    set_alpha_to_one (DDIM's last step), final_sigmas_type, use_karras_sigmas; clip_sample and thresholding
    must be false. Keys a config omits take the defaults of the diffusers class it names.
(b) a CompVis single-file checkpoint (``.safetensors`` / ``.ckpt``): `load_single_file`, through
    ``ldm_jax.convert.compvis``, with SD's scheduler (scaled_linear 0.00085..0.012, leading spacing, offset 1,
    DDIM to timestep 0) and OpenAI's CLIP tokenizer. SD 2.x files default to v-prediction (the 768-v models);
    pass ``prediction="eps"`` for 2.x-base.
(c) an ldm_jax stage-2 (ldm) training workdir (``checkpoints/<step>/``): `load_workdir`, EMA parameters by
    default; the saved config is interpreted by the training code itself (``ldm_jax.training.ldm.build``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion
from ldm_jax.convert.common import ConversionError, flatten
from ldm_jax.models.layers import canonical_dtype, unbox
from ldm_jax.models.text import CLIPTextEncoder
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.models.tokenizers import EOS, CLIPTokenizer
from ldm_jax.models.unet import unet_param_shapes
from ldm_jax.pipelines.components import PREDICTION_NAMES, Components, SamplingDefaults
from ldm_jax.types import ConfigError

logger = logging.getLogger("ldm_jax.pipelines")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SD_FOLDERS = ("unet", "vae", "text_encoder")
# diffusers' per-class defaults for the keys a scheduler_config.json may omit.
_LEADING_CLASSES = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler")
_UNSUPPORTED_TRUE = ("clip_sample", "thresholding")


# ---------------------------------------------------------------------------- scheduler configs
def _cosine_betas(num: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' squaredcos_cap_v2 (Nichol & Dhariwal 2021): beta_n = min(1 - abar((n+1)/T) / abar(n/T), 0.999),
    abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((n + 1) / num) / abar(n / num), max_beta) for n in range(num)], np.float64)


def _table(d: Mapping) -> diffusion.DiscreteSchedule:
    num = int(d.get("num_train_timesteps", 1000))
    if d.get("trained_betas") is not None:
        return diffusion.DiscreteSchedule.from_betas(np.asarray(d["trained_betas"], np.float64))
    kind = d.get("beta_schedule", "linear")
    start, end = float(d.get("beta_start", 1e-4)), float(d.get("beta_end", 0.02))
    if kind == "linear":
        return diffusion.linear(num, start, end)
    if kind == "scaled_linear":
        return diffusion.scaled_linear(num, start, end)
    if kind == "squaredcos_cap_v2":
        return diffusion.DiscreteSchedule.from_betas(_cosine_betas(num))
    raise ConfigError(f"scheduler config: beta_schedule='{kind}' is not supported (linear, scaled_linear, "
                      "squaredcos_cap_v2 or trained_betas)")


def scheduler_from_config(d: Mapping) -> tuple[diffusion.Schedule, str, SamplingDefaults]:
    """A diffusers scheduler_config.json dict -> (schedule, prediction, sampling defaults)."""
    for key in _UNSUPPORTED_TRUE:
        if d.get(key):
            raise ConfigError(f"scheduler config: {key}=true is not supported; set it to false (SD's configs do)")
    pred = d.get("prediction_type", "epsilon")
    if pred not in PREDICTION_NAMES:
        raise ConfigError(f"scheduler config: prediction_type='{pred}' is unknown (epsilon, v_prediction, sample)")
    schedule = _table(d)
    if d.get("rescale_betas_zero_snr"):
        schedule = diffusion.zero_terminal_snr(schedule)
    cls = d.get("_class_name", "DDIMScheduler")
    spacing = d.get("timestep_spacing") or ("leading" if cls in _LEADING_CLASSES else "linspace")
    if d.get("use_karras_sigmas"):
        spacing = "karras"
    if spacing not in diffusion.SPACINGS:
        raise ConfigError(f"scheduler config: timestep_spacing='{spacing}' is unknown ({diffusion.SPACINGS})")
    alpha_to_one = d.get("set_alpha_to_one", cls != "PNDMScheduler")
    defaults = SamplingDefaults(
        spacing=spacing,
        steps_offset=int(d.get("steps_offset", 0)),
        final_ddim="zero" if alpha_to_one else "sigma_min",
        final=d.get("final_sigmas_type") or "zero",
    )
    return schedule, PREDICTION_NAMES[pred], defaults


SD_SCHEDULER = dict(_class_name="DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                    timestep_spacing="leading")


# ---------------------------------------------------------------------------- (a) diffusers folders
def _require(path: str, sub: str) -> str:
    folder = os.path.join(path, sub)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"model folder '{path}' lacks {sub}/config.json; a diffusers SD folder holds "
                                f"{', '.join(s + '/' for s in SD_FOLDERS)}tokenizer/ and scheduler/")
    return folder


def load_diffusers(path: str | os.PathLike, *, dtype=None, variant: str | None = None) -> Components:
    """A diffusers StableDiffusionPipeline folder -> Components (see the module docstring)."""
    from ldm_jax.convert import diffusers as dconv

    path = os.fspath(path)
    unet_dir, vae_dir, te_dir = (_require(path, s) for s in SD_FOLDERS)
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_file):
        with open(sched_file) as f:
            sched = json.load(f)
    else:
        logger.warning("%s has no scheduler/scheduler_config.json; using SD's scaled_linear DDIM settings", path)
        sched = SD_SCHEDULER
    schedule, prediction, defaults = scheduler_from_config(sched)
    unet_cfg, unet_params = dconv.load_unet(unet_dir, variant=variant)
    vae_cfg, vae_params = dconv.load_vae(vae_dir, variant=variant)
    tok_dir = os.path.join(path, "tokenizer")
    te = TextEncoder.from_hf_clip(te_dir, tok_dir if os.path.isdir(tok_dir) else None,
                                  dtype=dtype or jnp.float32)
    return Components(unet_cfg, _device(unet_params), vae_cfg, _device(vae_params), te, schedule, prediction,
                      defaults, source=path, dtype=dtype)


# ---------------------------------------------------------------------------- (b) single files
def load_single_file(path: str | os.PathLike, *, kind: str = "auto", prediction: str | None = None,
                     use_ema: bool = False, dtype=None, unet_config=None, vae_config=None) -> Components:
    """A CompVis/Stability single-file SD checkpoint -> Components (SD scheduler, OpenAI CLIP tokenizer).

    `unet_config` / `vae_config` (a config or a mapping of fields) override what the weights cannot tell,
    as in ``ldm_jax.convert.compvis.load_single_file``.
    """
    from ldm_jax.convert import compvis

    parts = compvis.load_single_file(path, kind, use_ema=use_ema, unet_config=unet_config, vae_config=vae_config)
    missing = [p for p in ("unet", "vae", "text_encoder") if p not in parts]
    if missing:
        raise ConversionError(f"'{os.fspath(path)}' holds no {', '.join(missing)} weights; a full SD checkpoint "
                              "is needed for sampling")
    kind = parts["kind"]
    te_cfg, te_params = parts["text_encoder"]
    tokenizer = CLIPTokenizer.default(max_length=te_cfg.max_length, pad_token=EOS if kind == "sd15" else "!")
    te = TextEncoder(CLIPTextEncoder(te_cfg, dtype=dtype or jnp.float32), _device(te_params), tokenizer)
    schedule, _, defaults = scheduler_from_config(SD_SCHEDULER)
    if prediction is None:
        prediction = "v" if kind == "sd21" else "eps"
        logger.info("single file of kind %s: using %s-prediction (pass prediction=... to change)", kind, prediction)
    (unet_cfg, unet_params), (vae_cfg, vae_params) = parts["unet"], parts["vae"]
    return Components(unet_cfg, _device(unet_params), vae_cfg, _device(vae_params), te, schedule,
                      PREDICTION_NAMES.get(prediction, prediction), defaults, source=os.fspath(path), dtype=dtype)


# ---------------------------------------------------------------------------- (c) ldm_jax workdirs
def _check_params(tree, expected: Mapping[str, tuple], what: str):
    got = {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}
    if got != dict(expected):
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in expected if got[k] != expected[k])
        raise ConversionError(f"{what}: checkpoint parameters do not match the config ({len(wrong)} keys differ, "
                              f"e.g. '{wrong[0]}'); was the workdir trained with another model config?")
    return tree


def load_workdir(path: str | os.PathLike, *, step: int | None = None, ema: bool = True, dtype=None) -> Components:
    """A stage-2 (ldm) ldm_jax workdir -> Components, from its newest checkpoint (or `step`).

    The saved config JSON is read the way training reads it (``ldm_jax.training.ldm.build``: model.unet preset
    or pretrained folder, the frozen VAE of model.vae.workdir / model.vae.pretrained, model.text_encoder,
    the diffusion section's schedule and prediction); the U-Net weights are the checkpoint's ``ema_params``
    (``params`` with ``ema=False``). Images default to the training resolution (data.resolution).
    """
    import ml_collections

    from ldm_jax.training.checkpoint import read_config, restore_params
    from ldm_jax.training.ldm import build

    path = os.fspath(path)
    config = ml_collections.ConfigDict(read_config(path, step))
    stage = config.get("train", {}).get("stage")
    if stage != "ldm":
        raise ConfigError(f"workdir '{path}' holds a '{stage}' stage: sample from a latent-diffusion (ldm) workdir")
    model, frozen, unet_cfg, _ = build(config)
    # A config read back from JSON has lists where the dataclasses expect (hashable) tuples.
    unet_cfg = type(unet_cfg).from_config(dataclasses.asdict(unet_cfg))
    vae_cfg = type(model.vae.config).from_config(dataclasses.asdict(model.vae.config))
    unet_params = _check_params(unbox(restore_params(path, step, ema=ema)), unet_param_shapes(unet_cfg),
                                f"U-Net of {path}")
    te = model.text
    if dtype is not None:
        te = dataclasses.replace(te, module=te.module.clone(dtype=dtype))
    schedule = model.schedule
    discrete = schedule.num_train_timesteps is not None
    defaults = SamplingDefaults(spacing="leading" if discrete else "uniform", steps_offset=1 if discrete else 0,
                                final_ddim="zero", final="zero")
    resolution = config.get("data", {}).get("resolution")
    return Components(unet_cfg, _device(unet_params), vae_cfg, _device(frozen["vae"]), te, schedule,
                      PREDICTION_NAMES.get(model.prediction, model.prediction), defaults, source=path, dtype=dtype,
                      default_size=int(resolution) if resolution else None)


# ---------------------------------------------------------------------------- dispatch
def _device(tree):
    return jax.device_put(unbox(tree))


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def load_components(path: str | os.PathLike, *, dtype=None, prediction: str | None = None, ema: bool = True,
                    kind: str = "auto") -> Components:
    """Components from a diffusers SD folder, a CompVis single file or an ldm_jax workdir (see the module doc).

    `prediction` overrides the prediction kind (single files: "eps" / "v"); `ema` picks a workdir's (or a
    single file's) EMA weights; `kind` is the single file's "sd15" / "sd21" / "auto".
    """
    p = os.fspath(path)
    dtype = canonical_dtype(dtype) if dtype is not None else None
    if os.path.isfile(p):
        if not p.endswith(SINGLE_FILE_SUFFIXES):
            raise ConfigError(f"'{p}' is not a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)}) nor a folder")
        comps = load_single_file(p, kind=kind, prediction=prediction, use_ema=False, dtype=dtype)
    elif is_workdir(p):
        comps = load_workdir(p, ema=ema, dtype=dtype)
    elif os.path.isdir(p):
        if is_workdir(os.path.join(p, "ldm")) and not os.path.isdir(os.path.join(p, "unet")):
            raise FileNotFoundError(f"'{p}' holds stage workdirs (the demo's layout): pass '{os.path.join(p, 'ldm')}'")
        comps = load_diffusers(p, dtype=dtype)
    else:
        raise FileNotFoundError(f"model '{p}' not found: pass a diffusers SD folder, a .safetensors/.ckpt file or "
                                "an ldm_jax workdir")
    if prediction is not None and not os.path.isfile(p):
        comps = _with_prediction(comps, prediction)
    return comps


def _with_prediction(comps: Components, prediction: str) -> Components:
    return dataclasses.replace(comps, prediction=PREDICTION_NAMES.get(prediction, prediction))
