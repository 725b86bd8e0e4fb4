"""Everything a training run can check before its first step, checked before any work starts.

``preflight(config, workdir)`` (called by ``training.run``) raises a one-line ``ConfigError`` for:

* a number that is not finite anywhere in the config (``optimizer.lr=nan``), or out of its range;
* every typed section of the stage: loop, step, optimizer, EMA, data, evaluation, and for the stages that have
  them the sample section (sampler name and options), the diffusion section (schedule, prediction, weighting,
  noise sampler), the text encoder, the U-Net / VAE presets, the autoencoder loss;
* referenced files and folders that are missing: ``model.vae.workdir`` (a stage-1 workdir with checkpoints),
  ``model.*.pretrained`` folders, ``model.text_encoder.path``, ``data.latent_cache`` (unless "auto"), the
  LPIPS weight files, an image folder's path;
* a workdir that is a file or cannot be written;
* a workdir that already holds checkpoints of another run: another stage, another model, another diffusion
  setup or other data. Such checkpoints are healthy, so nothing is moved or overwritten; the run stops and the
  message names the first differences. Settings that may change on a resume (steps, optimizer, logging,
  checkpointing, sampling, evaluation, mesh) only get a warning; moved paths are not differences.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile

from ldm_jax.configlib import with_added_keys
from ldm_jax.ldm.workdirs import PATH_KEYS
from ldm_jax.types import ConfigError

logger = logging.getLogger("ldm_jax.training")

# Sections a resumed run must share with the checkpoints it resumes, per stage.
_IDENTITY = {
    "autoencoder": ("train.stage", "model.vae", "data.name", "data.resolution", "data.channels",
                    "data.builder_kwargs", "autoencoder.disc_channels", "autoencoder.disc_layers",
                    "autoencoder.disc_start"),
    "ldm": ("train.stage", "model.backbone", "model.vae", "model.text_encoder", "diffusion", "lora", "data.name",
            "data.resolution", "data.channels", "data.builder_kwargs"),  # + model.<backbone> (`_identity`)
    "toy": ("train.stage", "toy.width", "toy.extra", "data.resolution"),
}


def _identity(stage: str, config) -> tuple[str, ...]:
    keys = _IDENTITY.get(stage, ("train.stage", "model"))
    if stage == "ldm":  # the denoiser section in use; the other backbones' sections may differ freely
        keys += (f"model.{(config.get('model', {}) or {}).get('backbone') or 'unet'}",)
    return keys


def _plain(config) -> dict:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def flat(tree, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of a nested dict (lists stay leaves)."""
    out = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flat(v, key))
        else:
            out[key] = v
    return out


def check_numbers(config) -> None:
    """Every float in the config is finite (``nan``/``inf`` on the command line are refused here)."""
    for key, value in flat(_plain(config)).items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config.{key}={v} is not a finite number: give a finite value")
            if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
                # to_json_best_effort writes non-finite floats as strings
                raise ConfigError(f"config.{key}={v} is not a finite number: give a finite value")


def check_sections(config) -> None:
    """Builds every typed section of the config's stage (each raises its own one-line ConfigError)."""
    from ldm_jax.data import DataConfig
    from ldm_jax.eval.stage_metrics import EvalConfig
    from ldm_jax.training.loop import LoopConfig
    from ldm_jax.training.optim import OptimizerConfig
    from ldm_jax.training.steps import StepConfig
    from ldm_jax.training.task import STAGES
    from ldm_jax.types import nearest

    stage = str(config.train.stage)
    if stage not in STAGES:
        raise ConfigError(f"train.stage='{stage}' is unknown{nearest(stage, STAGES)}: use one of {STAGES}")
    LoopConfig.from_config(config)
    StepConfig.from_config(config.train)
    OptimizerConfig.from_config(config.optimizer)
    if stage == "toy":
        return
    DataConfig.from_run_config(config)
    if "eval" in config:
        EvalConfig.from_config(config.eval)
    if stage == "ldm":
        from ldm_jax.ldm import SampleConfig, build

        sample = SampleConfig.from_config(config.sample)
        dc = build.diffusion_config(config.diffusion)
        if not dc.learned:
            schedule = build.schedule(config.diffusion)
            dc.check(schedule)
            evaluates = "eval" in config and int(config.eval.get("every_steps", 0) or 0) > 0
            problem = schedule.uniform_grid_problem() if schedule.num_train_timesteps is None else None
            if problem and (sample.every_steps > 0 or evaluates):
                raise ConfigError(f"the training grids and evaluations sample on a uniform time grid, and {problem}: "
                                  "set sample.every_steps=0 and eval.every_steps=0 (then sample with ldm-jax sample "
                                  "--spacing=logsnr), or truncate the schedule (diffusion.logsnr_min/logsnr_max)")
        build.TextEncoderConfig.from_config(build.section(config.model.text_encoder))
        pretrained = build.backbone_section(config.model).get("pretrained")
        if not pretrained:  # backbone name and preset fields
            build.backbone_config(config.model, context_dim=8, latent_channels=4)
        lora_cfg = build.lora_config(config)
        if lora_cfg is not None and lora_cfg.dropout > 0:
            raise ConfigError(f"lora.dropout={lora_cfg.dropout}: training applies adapters as merged weights, where "
                              "dropout on the low-rank input has no place; set lora.dropout=0")
        if lora_cfg is not None and not pretrained:
            raise ConfigError(f"lora.rank={lora_cfg.rank} trains adapters on a frozen network: set model."
                              f"{build.backbone(config.model)}.pretrained (a diffusers folder or a latent-diffusion "
                              "workdir)")
    elif stage == "autoencoder":
        from ldm_jax.ldm import build
        from ldm_jax.training.autoencoder import AutoencoderLossConfig

        AutoencoderLossConfig.from_config(config.autoencoder)
        build.vae_config(config.model.vae)


def _need(path: str, key: str, *, folder: bool | None = None, what: str = "") -> None:
    if not os.path.exists(path):
        raise ConfigError(f"config.{key}='{path}' does not exist{what}: fix the path")
    if folder is True and not os.path.isdir(path):
        raise ConfigError(f"config.{key}='{path}' is a file, not a folder{what}")
    if folder is False and not os.path.isfile(path):
        raise ConfigError(f"config.{key}='{path}' is a folder, not a file{what}")


def check_paths(config) -> None:
    """Files and folders the config refers to exist (and referenced workdirs hold trained checkpoints)."""
    from ldm_jax.ldm.workdirs import checkpoint_steps, read_config

    values = flat(_plain(config))
    stage = str(config.train.stage)
    if stage == "ldm":
        vae_dir, vae_folder = values.get("model.vae.workdir") or "", values.get("model.vae.pretrained") or ""
        if vae_folder:
            _need(vae_folder, "model.vae.pretrained", folder=True, what=" (a diffusers vae folder)")
        elif vae_dir:
            _need(vae_dir, "model.vae.workdir", folder=True, what=" (the stage-1 autoencoder workdir)")
            if not checkpoint_steps(vae_dir):
                raise ConfigError(f"config.model.vae.workdir='{vae_dir}' has no checkpoints: train the autoencoder "
                                  f"first (ldm-jax train --config=configs/<autoencoder>.py --workdir={vae_dir})")
            stage1 = _saved_config(vae_dir, read_config)
            if stage1 is not None and stage1.get("train", {}).get("stage") != "autoencoder":
                raise ConfigError(f"config.model.vae.workdir='{vae_dir}' holds a "
                                  f"'{stage1.get('train', {}).get('stage')}' run, not an autoencoder (stage 1) run")
        backbone = values.get("model.backbone") or "unet"
        if values.get(f"model.{backbone}.pretrained"):
            _need(values[f"model.{backbone}.pretrained"], f"model.{backbone}.pretrained", folder=True,
                  what=f" (a diffusers {'unet' if backbone == 'unet' else 'transformer'} folder)")
        if values.get("model.text_encoder.path"):
            _need(values["model.text_encoder.path"], "model.text_encoder.path", folder=True,
                  what=" (a Hugging Face CLIP text model folder)")
    if stage == "autoencoder" and float(values.get("autoencoder.perceptual_weight") or 0) > 0:
        for key in ("autoencoder.lpips_vgg", "autoencoder.lpips_lin"):
            _need(str(values.get(key)), key, folder=False)
    cache = values.get("data.latent_cache") or ""
    if cache and cache != "auto":
        _need(cache, "data.latent_cache", folder=True, what=" (a latent cache folder, or 'auto')")
    if values.get("data.name") == "image_folder":
        path = (values.get("data.builder_kwargs.path") or "")
        if not path:
            raise ConfigError("data.name='image_folder' needs data.builder_kwargs={'path': FOLDER}")
        _need(path, "data.builder_kwargs.path", folder=True, what=" (the image folder)")


def check_workdir(workdir: str) -> None:
    """`workdir` is a folder (made if missing) that this process can write to."""
    if not workdir:
        raise ConfigError("no workdir given: pass --workdir=DIR")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir='{workdir}' is a file: give a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir='{workdir}' cannot be written ({e.strerror or type(e).__name__}): "
                          "choose a writable folder") from None


def _saved_config(workdir: str, read_config) -> dict | None:
    try:
        return read_config(workdir)
    except (OSError, ValueError):
        return None  # an unreadable checkpoint: the restore decides (falls back past it)


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def config_differences(saved: dict, config, stage: str) -> tuple[list[str], list[str]]:
    """(differences that make the workdir another run, other differences) between a checkpoint's config and
    the run's, as "key: saved -> now" strings; path-valued keys are not compared."""
    plain = _plain(config)
    old, new = flat(with_added_keys(saved)), flat(plain)
    identity = _identity(stage, plain)
    blocking, other = [], []
    for key in sorted(set(old) | set(new)):
        if key.startswith("_") or key in PATH_KEYS or key.startswith("data.data_dir"):
            continue
        a, b = old.get(key), new.get(key)
        if a == b or (isinstance(a, list) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            continue
        line = f"{key}: {_short(a)} -> {_short(b)}"
        (blocking if any(key == k or key.startswith(k + ".") for k in identity) else other).append(line)
    return blocking, other


def check_resume(config, workdir: str) -> None:
    """A workdir with checkpoints resumes only the run that wrote them (see the module docstring)."""
    from ldm_jax.ldm.workdirs import checkpoint_steps, read_config

    steps = checkpoint_steps(workdir)
    saved = _saved_config(workdir, read_config) if steps else None
    if saved is None:
        return
    stage = str(config.train.stage)
    old_stage = saved.get("train", {}).get("stage")
    if old_stage != stage:
        raise ConfigError(f"workdir '{workdir}' holds a '{old_stage}' run (checkpoint step {steps[-1]}) and this "
                          f"config trains '{stage}': nothing was changed; pass another --workdir")
    blocking, other = config_differences(saved, config, stage)
    if blocking:
        more = f" (+{len(blocking) - 2} more)" if len(blocking) > 2 else ""
        raise ConfigError(f"workdir '{workdir}' holds checkpoints (up to step {steps[-1]}) of another run: "
                          f"{'; '.join(blocking[:2])}{more}. Nothing was changed: resume with the config it was "
                          "trained with, or pass another --workdir")
    if other:
        logger.warning("resuming %s with changed settings: %s", workdir, "; ".join(other[:6]))


def preflight(config, workdir: str) -> None:
    """All the checks of the module docstring, cheapest first."""
    check_numbers(config)
    check_sections(config)
    check_paths(config)
    check_workdir(workdir)
    check_resume(config, workdir)
