"""Where a `LatentDiffusion` comes from: the pieces (configs, parameters, text encoder, schedule, defaults) read
from the places weights live. Each ``*_parts`` function returns the keyword arguments of `LatentDiffusion`.

(a) a diffusers-layout SD 1.x/2.x folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/scheduler_config.json``): `diffusers_parts`. The scheduler config is honoured: beta_schedule
    (linear, scaled_linear, squaredcos_cap_v2) or trained_betas, beta_start/end, num_train_timesteps,
    rescale_betas_zero_snr, prediction_type (epsilon, v_prediction, sample), timestep_spacing, steps_offset,
    set_alpha_to_one (DDIM's last step), final_sigmas_type, use_karras_sigmas; clip_sample and thresholding
    must be false. Keys a config omits take the defaults of the diffusers class it names. A folder written by
    ``ldm-jax convert`` (``ldm_jax.convert.pipeline_folder``) also carries "_ldm_jax" blocks, read first: in
    scheduler_config.json the exact schedule (the run's diffusion section, a learned schedule's parameters),
    prediction, preconditioning and time-grid defaults; in model_index.json the run's `sample` defaults, its
    image size, the text encoder's options and the U-Net / VAE config fields diffusers has no key for. The text
    encoder is a CLIPTextModel or (``model_type`` "bert") a BertModel with its WordPiece ``tokenizer.json``.
(b) a CompVis single-file checkpoint (``.safetensors`` / ``.ckpt``): `single_file_parts`, through
    ``ldm_jax.convert.compvis``, with SD's scheduler (scaled_linear 0.00085..0.012, leading spacing, offset 1,
    DDIM to timestep 0) and OpenAI's CLIP tokenizer. SD 2.x files default to v-prediction (the 768-v models);
    pass ``prediction="eps"`` for 2.x-base.
(c) an ldm_jax stage-2 (ldm) training workdir (``checkpoints/<step>/``): `workdir_parts`, EMA parameters by
    default; the saved config is read by `config_parts`, the function training builds its model with.
(d) a model id (``org/name``) in the local Hugging Face cache: `cached_snapshot` finds its snapshot folder
    without any network access, then (a) or (b) reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion
from ldm_jax.convert import compvis
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert import lora as lora_convert
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.pipeline_folder import LDM_JAX
from ldm_jax.ldm import build
from ldm_jax.ldm.generate import SampleConfig
from ldm_jax.ldm.workdirs import is_workdir, read_config, restore_params, restore_state_item
from ldm_jax.models import backbones, hf_text
from ldm_jax.models import lora as lora_lib
from ldm_jax.models.layers import unbox
from ldm_jax.models.text import BertEncoder, CLIPTextEncoder
from ldm_jax.models.text_encoder import SDXL_TEXT_OPTIONS, TextEncoder, TextEncoders
from ldm_jax.models.tokenizers import CLIPTokenizer, WordPieceTokenizer
from ldm_jax.types import ConfigError, _freeze

logger = logging.getLogger("ldm_jax.ldm")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SD_FOLDERS = ("unet", "vae", "text_encoder")
# diffusers' per-class defaults for the keys a scheduler_config.json may omit.
_LEADING_CLASSES = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler")
_UNSUPPORTED_TRUE = ("clip_sample", "thresholding")
PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "eps": "eps", "v": "v", "x0": "x0",
                    "flow": "flow"}


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Grid settings a model's scheduler config asks for (diffusers' names in brackets).

    spacing [timestep_spacing]: leading / trailing / linspace for SD tables, uniform for continuous schedules;
    steps_offset [steps_offset]; final_ddim [set_alpha_to_one: True -> "zero", False -> "sigma_min"] is the
    target of DDIM's last step; final [final_sigmas_type] that of euler/heun/dpmpp/unipc.
    """

    spacing: str = "leading"
    steps_offset: int = 1
    final_ddim: str = "sigma_min"
    final: str = "zero"

    def final_for(self, sampler: str) -> str:
        """The default `final` of `sampler`: the diffusers setting its spec names (``diffusers_final``)."""
        setting = diffusion.sampler_spec(sampler).diffusers_final
        return {"set_alpha_to_one": self.final_ddim, "final_sigmas_type": self.final}.get(setting, setting)

    @classmethod
    def for_schedule(cls, schedule) -> SamplingDefaults:
        """What a model trained by this framework samples with: SD's leading grid on discrete tables (offset 1),
        the uniform grid on continuous schedules; every sampler ends at sigma = 0."""
        discrete = schedule.num_train_timesteps is not None
        return cls(spacing="leading" if discrete else "uniform", steps_offset=1 if discrete else 0,
                   final_ddim="zero", final="zero")


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
    """A diffusers scheduler_config.json dict -> (schedule, prediction, sampling defaults); its "_ldm_jax" block
    first when it has one (`scheduler_parts`)."""
    if d.get(LDM_JAX):
        parts = scheduler_parts(d)
        return parts["schedule"], parts["prediction"], parts["defaults"]
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


def scheduler_parts(d: Mapping) -> dict:
    """A scheduler_config.json dict -> the `LatentDiffusion` fields schedule, prediction, precondition, sigma_data
    and defaults. Its "_ldm_jax" block (``ldm-jax convert``) wins: the run's diffusion section built as training
    builds it (``build.diffusion_config``; a learned schedule from its saved parameters) and the saved time-grid
    defaults. Without one, diffusers' fields (`scheduler_from_config`)."""
    block = d.get(LDM_JAX)
    if not block:
        schedule, prediction, defaults = scheduler_from_config(d)
        return dict(schedule=schedule, prediction=prediction, defaults=defaults)
    if not isinstance(block, Mapping) or "diffusion" not in block:
        raise ConfigError(f"scheduler config: the '{LDM_JAX}' block lacks its 'diffusion' section")
    dif = build.diffusion_config(block["diffusion"])
    params = block.get("schedule_params")
    if dif.learned and params is None:
        raise ConfigError(f"scheduler config: a learned schedule without '{LDM_JAX}.schedule_params'")
    if params is not None:
        params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    try:
        defaults = SamplingDefaults(**(block.get("defaults") or {}))
    except TypeError as e:
        raise ConfigError(f"scheduler config: '{LDM_JAX}.defaults': {e}") from None
    return dict(schedule=dif.make_schedule(params), prediction=dif.prediction, precondition=dif.precondition,
                sigma_data=float(dif.sigma_data), defaults=defaults)


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


def _read_json(file: str) -> dict | None:
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def _block(index: Mapping, key: str) -> dict:
    """model_index.json's "_ldm_jax" entry `key` (a dict; empty when absent), lists frozen to tuples."""
    value = (index.get(LDM_JAX) or {}).get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"model_index.json: '{LDM_JAX}.{key}' must be a mapping, got {type(value).__name__}")
    return {k: _freeze(v) for k, v in value.items()}


def _folder_text_encoder(te_dir: str, tok_dir: str, options: Mapping, dtype) -> TextEncoder:
    """text_encoder/ (CLIPTextModel, or BertModel by its model_type) with tokenizer/; `options` from
    model_index.json (max_length, hidden_layer, final_norm, use_attention_mask) win over the folders' own
    settings."""
    tok = tok_dir if os.path.isdir(tok_dir) else None
    if (_read_json(os.path.join(te_dir, "config.json")) or {}).get("model_type") != "bert":
        te = TextEncoder.from_hf_clip(te_dir, tok, hidden_layer=options.get("hidden_layer") or None,
                                      final_norm=bool(options.get("final_norm", True)), dtype=dtype)
        length = options.get("max_length")
        if length and length != te.max_length:
            te = dataclasses.replace(te, tokenizer=CLIPTokenizer(te.tokenizer.hf, length))
        return te
    if tok is None:
        raise FileNotFoundError(f"'{os.path.dirname(te_dir)}' has a BERT text encoder but no tokenizer/ folder")
    cfg, params = hf_text.load_bert(te_dir)
    length = options.get("max_length") or (_read_json(os.path.join(tok, "tokenizer_config.json")) or {}).get(
        "model_max_length", 512)
    tokenizer = WordPieceTokenizer.from_file(tok, min(int(length), cfg.max_position_embeddings))
    return TextEncoder(BertEncoder(cfg, dtype=dtype), jax.tree.map(jnp.asarray, params), tokenizer,
                       use_attention_mask=bool(options.get("use_attention_mask", True)))


def diffusers_parts(path: str | os.PathLike, *, dtype=None, variant: str | None = None) -> dict:
    """A diffusers StableDiffusionPipeline or StableDiffusionXLPipeline folder (SDXL: text_encoder/ and
    text_encoder_2/ with tokenizer/ and tokenizer_2/; a refiner has text_encoder_2/ only), or one
    ``ldm-jax convert`` wrote (see the module docstring)."""
    path = os.fspath(path)
    unet_dir, vae_dir = _require(path, "unet"), _require(path, "vae")
    sched = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    if sched is None:
        logger.warning("%s has no scheduler/scheduler_config.json; using SD's scaled_linear DDIM settings", path)
        sched = SD_SCHEDULER
    index = _read_json(os.path.join(path, "model_index.json")) or {}
    unet_cfg, unet_params = dconv.load_unet(unet_dir, variant=variant, **_block(index, "unet"))
    vae_cfg, vae_params = dconv.load_vae(vae_dir, variant=variant, **_block(index, "vae"))
    sdxl = getattr(unet_cfg, "addition_embed_type", None) == "text_time"
    encoders = []
    for suffix in ("", "_2"):
        te_dir = os.path.join(path, "text_encoder" + suffix)
        if not os.path.isfile(os.path.join(te_dir, "config.json")):
            continue
        options = {**(SDXL_TEXT_OPTIONS if sdxl else {}), **_block(index, "text_encoder" + suffix)}
        encoders.append(_folder_text_encoder(te_dir, os.path.join(path, "tokenizer" + suffix), options,
                                             dtype or jnp.float32))
    if not encoders or (not sdxl and len(encoders) > 1):
        _require(path, "text_encoder")  # the SD layout's message
        raise ConfigError(f"'{path}' has two text encoders but its U-Net has no SDXL text_time embedding")
    te = encoders[0] if len(encoders) == 1 else TextEncoders(tuple(encoders))
    extra = index.get(LDM_JAX) or {}
    sample = SampleConfig.from_config(extra["sample"]) if extra.get("sample") else None
    size = extra.get("default_size")
    return dict(unet_config=unet_cfg, unet_params=_device(unet_params), vae_config=vae_cfg,
                vae_params=_device(vae_params), text_encoder=te, **scheduler_parts(sched), source=path, dtype=dtype,
                default_size=int(size) if size else None, sample=sample,
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))


# ---------------------------------------------------------------------------- (b) single files
def single_file_parts(path: str | os.PathLike, *, kind: str = "auto", prediction: str | None = None,
                      use_ema: bool = False, dtype=None, unet_config=None, vae_config=None, text_config=None,
                      text_config_2=None) -> dict:
    """A CompVis/Stability single-file SD checkpoint (SD scheduler, OpenAI CLIP tokenizer). SDXL files (base:
    CLIP-L + OpenCLIP-bigG, `TextEncoders`; refiner: bigG only) get SDXL's text conditioning (penultimate
    layers, no final norm; bigG's tokenizer pads with "!") and the base its force_zeros_for_empty_prompt.

    `unet_config` / `vae_config` / `text_config` / `text_config_2` (a config or a mapping of fields) override
    what the weights cannot tell, as in ``ldm_jax.convert.compvis.load_single_file``.
    """
    parts = compvis.load_single_file(path, kind, use_ema=use_ema, unet_config=unet_config, vae_config=vae_config,
                                     text_config=text_config, text_config_2=text_config_2)
    kind = parts["kind"]
    texts = [p for p in ("text_encoder", "text_encoder_2") if p in parts]
    missing = [p for p in ("unet", "vae") if p not in parts] + ([] if texts else ["text_encoder"])
    if missing:
        raise ConversionError(f"'{os.fspath(path)}' holds no {', '.join(missing)} weights; a full SD checkpoint "
                              "is needed for sampling")
    encoders = []
    for part in texts:
        te_cfg, te_params = parts[part]
        tokenizer = compvis.clip_tokenizer(kind, part, te_cfg.max_length)
        options = SDXL_TEXT_OPTIONS if kind == "sdxl" else {}
        encoders.append(TextEncoder(CLIPTextEncoder(te_cfg, dtype=dtype or jnp.float32), _device(te_params),
                                    tokenizer, **options))
    te = encoders[0] if len(encoders) == 1 else TextEncoders(tuple(encoders))
    schedule, _, defaults = scheduler_from_config(SD_SCHEDULER)
    if prediction is None:
        prediction = "v" if kind == "sd21" else "eps"
        logger.info("single file of kind %s: using %s-prediction (pass prediction=... to change)", kind, prediction)
    (unet_cfg, unet_params), (vae_cfg, vae_params) = parts["unet"], parts["vae"]
    return dict(unet_config=unet_cfg, unet_params=_device(unet_params), vae_config=vae_cfg,
                vae_params=_device(vae_params), text_encoder=te, schedule=schedule,
                prediction=PREDICTION_NAMES.get(prediction, prediction), defaults=defaults, source=os.fspath(path),
                dtype=dtype, force_zeros_for_empty_prompt=kind == "sdxl" and "text_encoder" in parts)


# ---------------------------------------------------------------------------- (c) run configs and workdirs
def config_parts(config, unet_params=None, schedule_params=None) -> dict:
    """A run config's model (the way training builds it): the ``model.backbone`` denoiser's preset (with
    ``train.dtype`` / remat) or pretrained folder, the frozen VAE of ``model.vae.workdir`` / ``model.vae.pretrained``,
    ``model.text_encoder``, the ``diffusion`` section's schedule and prediction, ``data.resolution`` as the
    default image size. `unet_params` default to the pretrained folder's weights (None without one);
    `schedule_params` are a learned schedule's (default: its initial ones)."""
    model = config["model"]
    te = build.text_encoder(model["text_encoder"])
    vae_cfg, vae_params = build.frozen_vae(model["vae"])
    fit = dict(context_dim=te.hidden_size, latent_channels=vae_cfg.latent_channels, pooled_dim=te.pooled_size)
    pre = build.pretrained_backbone(model, **fit)
    if pre is not None:
        unet_cfg, pretrained = pre
        unet_params = pretrained if unet_params is None else unet_params
    else:
        unet_cfg = build.backbone_config(model, **fit, **build.compute_options(config))
    name = build.backbone(model)
    if backbones.context_dim(unet_cfg) != te.hidden_size:
        raise ConfigError(f"model.{name} attends to {backbones.context_dim(unet_cfg)}-wide text states but the text "
                          f"encoder gives {te.hidden_size}-wide ones: make them equal")
    dif = build.diffusion_config(config.get("diffusion", {}))
    schedule = dif.make_schedule(schedule_params)
    resolution = (config.get("data", {}) or {}).get("resolution")
    # U-Net parameters stay as given (host arrays from a pretrained folder: training starts from them, and
    # `generate` places them on its devices once)
    return dict(unet_config=unet_cfg, unet_params=None if unet_params is None else unbox(unet_params),
                vae_config=vae_cfg, vae_params=_device(vae_params), text_encoder=te, schedule=schedule,
                prediction=dif.prediction, precondition=dif.precondition, sigma_data=dif.sigma_data,
                network_input=dif.network_input, defaults=SamplingDefaults.for_schedule(schedule),
                default_size=int(resolution) if resolution else None,
                sample=SampleConfig.from_config(config.get("sample", {}) or {}))


def workdir_parts(path: str | os.PathLike, *, step: int | None = None, ema: bool = True, dtype=None) -> dict:
    """A stage-2 (ldm) ldm_jax workdir, from its newest checkpoint (or `step`): the saved config read by
    `config_parts`, the U-Net weights of the checkpoint's ``ema_params`` (``params`` with ``ema=False``)."""
    path = os.fspath(path)
    config = read_config(path, step)
    stage = config.get("train", {}).get("stage")
    if stage != "ldm":
        raise ConfigError(f"workdir '{path}' holds a '{stage}' stage: sample from a latent-diffusion (ldm) workdir")
    schedule_params = None
    if build.diffusion_config(config.get("diffusion", {})).learned:  # trained beside the U-Net (TrainState.extra)
        schedule_params = restore_state_item(path, "extra", step)["params"]
    parts = config_parts(config, schedule_params=schedule_params)
    trained = unbox(restore_params(path, step, ema=ema))
    lora_cfg = build.lora_config(config)
    if lora_cfg is not None:  # a LoRA run: its checkpoints hold the adapter; the base is model.<backbone>.pretrained
        trained = lora_lib.merge(parts["unet_params"], [(lora_adapter(lora_cfg, parts["unet_params"], trained), 1.0)])
    unet_params = build.check_params(trained, backbones.param_shapes(parts["unet_config"]), f"denoiser of {path}")
    parts.update(unet_params=_device(unet_params), source=path, dtype=dtype)
    if dtype is not None:
        te = parts["text_encoder"]
        parts["text_encoder"] = te.with_dtype(dtype)
    return parts


# ---------------------------------------------------------------------------- (d) the local Hugging Face cache
def cached_snapshot(model_id: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The local snapshot folder of `model_id` ("org/name") in the Hugging Face cache (``$HF_HUB_CACHE``,
    ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``), found without network access; FileNotFoundError when the
    id is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model_id, local_files_only=True, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise FileNotFoundError(f"model '{model_id}' is not a local path and not in the Hugging Face cache; nothing "
                                "is downloaded: fetch it once (huggingface-cli download) or pass a local path"
                                ) from None


def looks_like_model_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and not os.path.exists(path)


# ---------------------------------------------------------------------------- LoRA files
def lora_adapter(cfg, base_params, checkpoint_tree) -> lora_lib.LoraAdapter:
    """The adapter a LoRA run checkpointed (`checkpoint_tree`: its saved ``params`` leaves), with the run's
    alphas: the structure of ``init_lora(cfg, base)`` filled with the saved arrays."""
    like = lora_lib.init_lora(cfg, jax.eval_shape(lambda: base_params), jax.random.key(0))
    saved = checkpoint_tree.get("params", checkpoint_tree) if isinstance(checkpoint_tree, Mapping) else None
    try:
        return like.replace(params=jax.tree.map(lambda _, a: np.asarray(a), like.params, saved))
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"the checkpointed LoRA adapter does not match lora={cfg} ({str(e)[:120]})") from None


def merged_lora(model, files: Sequence[tuple[str | os.PathLike, float]]):
    """(U-Net params, TextEncoder) of `model` with the LoRA `files` ((path, weight) pairs) merged in."""
    if model.backbone != "unet":
        raise ConfigError(f"LoRA files name Stable-Diffusion U-Net and CLIP layers; this model's denoiser is a "
                          f"{model.backbone}")
    if model.unet_params is None:
        raise ConfigError("this model has no U-Net parameters to merge a LoRA into")
    te = model.text_encoder
    text_cfg = te.module.config if isinstance(te, TextEncoder) and isinstance(te.module, CLIPTextEncoder) else None
    unet_adapters, text_adapters = [], []
    for path, weight in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"LoRA file '{os.fspath(path)}' not found")
        unet_adapter, text_adapter, _ = lora_convert.load_lora(path, model.unet_config, text_cfg)
        if unet_adapter is not None:
            unet_adapters.append((unet_adapter, float(weight)))
        if text_adapter is not None:
            text_adapters.append((text_adapter, float(weight)))
    unet_params = lora_lib.merge(model.unet_params, unet_adapters) if unet_adapters else model.unet_params
    if text_adapters:
        te = dataclasses.replace(te, params=lora_lib.merge(te.params, text_adapters))
    return unet_params, te


# ---------------------------------------------------------------------------- dispatch
def _device(tree):
    return jax.device_put(unbox(tree))


def pretrained_parts(path: str | os.PathLike, *, dtype=None, prediction: str | None = None, ema: bool = True,
                     kind: str = "auto", step: int | None = None, cache_dir=None) -> dict:
    """The parts of a diffusers SD folder, a CompVis single file, an ldm_jax workdir or a cached model id.

    `prediction` overrides the prediction kind (single files: "eps" / "v"); `ema` picks a workdir's EMA weights
    (`step`: a checkpoint other than the newest); `kind` is the single file's "sd15" / "sd21" / "sdxl" / "auto".
    """
    p = os.fspath(path)
    if looks_like_model_id(p):
        p = cached_snapshot(p, cache_dir)
    if os.path.isfile(p):
        if not p.endswith(SINGLE_FILE_SUFFIXES):
            raise ConfigError(f"'{p}' is not a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)}) nor a folder")
        return single_file_parts(p, kind=kind, prediction=prediction, use_ema=False, dtype=dtype)
    if is_workdir(p):
        parts = workdir_parts(p, ema=ema, dtype=dtype, step=step)
    elif os.path.isdir(p):
        if is_workdir(os.path.join(p, "ldm")) and not os.path.isdir(os.path.join(p, "unet")):
            raise FileNotFoundError(f"'{p}' holds stage workdirs (the demo's layout): pass '{os.path.join(p, 'ldm')}'")
        parts = diffusers_parts(p, dtype=dtype)
    else:
        raise FileNotFoundError(f"model '{p}' not found: pass a diffusers SD folder, a .safetensors/.ckpt file, an "
                                "ldm_jax workdir or a model id in the local Hugging Face cache")
    if prediction is not None:
        parts["prediction"] = PREDICTION_NAMES.get(prediction, prediction)
    return parts
