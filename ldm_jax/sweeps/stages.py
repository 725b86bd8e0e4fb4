"""The real train and eval functions of a latent-diffusion sweep (what ``ldm-jax sweep`` runs).

Every run of a sweep shares one stage-1 autoencoder, trained once into ``SWEEP_WORKDIR/autoencoder`` from
``config.sweep.autoencoder`` (a config spec such as ``configs/shapes_autoencoder.py``) and one dataset
directory ``SWEEP_WORKDIR/data``; each run trains stage 2 into ``SWEEP_WORKDIR/runs/<name>`` (resumable).

Evaluation at a number of function evaluations (NFE): the steps come from the sampler's spec
(``diffusion.sampler_spec(name).steps_for_nfe``: Heun gets ``(nfe + 1) // 2``, the others one step per NFE).
Metrics are ``ldm_jax.eval.generated``'s (those of ``ldm-jax evaluate``, seed 0), plus:
- shapes: colour / shape / position accuracy of the demo prompts (held-out pairs included), their mean
  ``mean_acc``, and
  ``brightness_gap`` = |mean generated pixel - mean pixel of the test split| (in [0, 1] units), the
  mean-brightness bias that zero-terminal-SNR addresses (Lin et al. 2023);
- fashion_mnist: FD-FMNIST against the test split (``sweep.eval.num_samples`` images), the same
  ``brightness_gap`` (the test images' mean pixel is ~0.29: dark backgrounds), and per class (the prompts
  cycle through the 10 classes, whose mean pixels range from ~0.13 to ~0.43):
  ``class_brightness_gap`` = mean over classes of |generated - test mean pixel of that class|, and
  ``brightness_slope`` = the least-squares slope of the generated class means against the test ones (1: the
  classes' brightness reproduced; < 1: pulled towards a middle brightness, the bias Lin et al. describe).
"""

from __future__ import annotations

import os

import numpy as np

from ldm_jax import diffusion
from ldm_jax.configlib import load_config
from ldm_jax.eval.generated import DATASETS, evaluate_generated
from ldm_jax.eval.stage_metrics import heldout_images
from ldm_jax.ldm import LatentDiffusion
from ldm_jax.training import run
from ldm_jax.training.ldm import ensure_latent_cache
from ldm_jax.types import ConfigError


class Interrupted(RuntimeError):
    """A stage stopped before its last step (SIGTERM / preemption): the sweep stops; rerunning resumes it."""


def _check_finished(state, config, what: str) -> None:
    step = None if state is None else int(np.asarray(state.step))
    if step is None or step < int(config.train.num_steps):
        raise Interrupted(f"{what} stopped at step {step} of {int(config.train.num_steps)} (signal?); nothing was "
                          "recorded for it: rerun the same command to resume")


def validate(config, runs) -> None:
    """Every run of the sweep checked before anything trains (one-line ConfigError naming the run): each
    expanded config's numbers and typed sections (training's preflight), the shared autoencoder's config, and
    the evaluation's samplers. Paths made later by the sweep itself (the shared autoencoder) are not checked."""
    from ldm_jax.diffusion import sampler_spec
    from ldm_jax.sweeps.runner import eval_points
    from ldm_jax.training.preflight import check_numbers, check_sections

    spec = str(config.sweep.get("autoencoder", "") or "")
    if spec:
        ae = load_config(spec)
        check_numbers(ae)
        check_sections(ae)
    for run_ in runs:
        try:
            check_numbers(run_.config)
            check_sections(run_.config)
        except ConfigError as e:
            raise ConfigError(f"sweep run {run_.name}: {e}") from None
    for sampler, nfe in eval_points(config.sweep.get("eval", {}) or {}):
        sampler_spec(sampler)
        if nfe < 1:
            raise ConfigError(f"sweep.eval: NFE {nfe} of sampler {sampler} must be >= 1")


def prepare(config, workdir: str, reuse_from: str | None = None, *, require_prepared: bool = False):
    """Trains the shared autoencoder (once) and points the sweep's base config at it and at the shared data.
    With `reuse_from` (another sweep's directory) that sweep's data and finished autoencoder are used instead,
    so its trained runs can be evaluated here (only read, never written). With `require_prepared` (a task of a
    job array, started after ``--prepare_only``) nothing is trained or built here: a shared autoencoder that is
    missing, unfinished or trained from another config, or a missing shared latent cache, stops the task with
    one ConfigError instead (several tasks building them at once would overwrite each other)."""
    from ldm_jax.sweeps.runner import trained_differently

    home = reuse_from or workdir
    not_ready = ("run `ldm-jax sweep --prepare_only` with the same --config and --workdir first, and start the "
                 "array once it has finished (SLURM: sbatch --dependency=afterok:<its job id>)")
    data_dir = str(config.data.get("data_dir", "") or os.path.join(home, "data"))
    config.data.data_dir = data_dir
    spec = str(config.sweep.get("autoencoder", "") or "")
    if spec:
        ae = load_config(spec)
        ae.data.data_dir = data_dir
        for key, value in (config.sweep.get("autoencoder_overrides", {}) or {}).items():
            section, field = key.split(".", 1)
            ae[section][field] = value
        ae_dir = os.path.join(home, "autoencoder")
        if reuse_from:
            if why := trained_differently(ae, ae_dir):
                raise ConfigError(f"--reuse_from: the shared autoencoder cannot be reused: {why}; reuse a sweep "
                                  "of the same, finished autoencoder, or drop --reuse_from")
        elif require_prepared:
            try:
                why = trained_differently(ae, ae_dir)
            except ConfigError as e:  # a checkpoint still being written, or damaged
                why = str(e)
            if why:
                raise ConfigError(f"the shared autoencoder is not ready ({why}): {not_ready}")
        else:
            _check_finished(run(ae, ae_dir), ae, "the shared autoencoder")
        config.model.vae.workdir = ae_dir
    elif not (config.model.vae.get("workdir") or config.model.vae.get("pretrained")):
        raise ConfigError("the sweep needs an autoencoder: set sweep.autoencoder (a config spec trained once) or "
                          "model.vae.workdir / model.vae.pretrained")
    if str(config.data.get("latent_cache", "") or "") == "auto":
        if require_prepared:
            from ldm_jax.data.latent_records import MANIFEST

            if not os.path.exists(os.path.join(workdir, "latent_cache", MANIFEST)):
                raise ConfigError(f"the shared latent cache {os.path.join(workdir, 'latent_cache')} is not built: "
                                  f"{not_ready}")
        # one cache for every run (they share the autoencoder and text encoder), not one per run directory
        config.data.latent_cache = ensure_latent_cache(config, LatentDiffusion.from_config(config), workdir)
    return config


def train_fn(config, run_dir: str):
    state = run(config, run_dir)
    _check_finished(state, config, f"run {os.path.basename(run_dir)}")
    return state


def _data_mean(config, count: int = 512) -> float:
    return float(np.mean((heldout_images(config, count) + 1.0) / 2.0))


def make_eval_fn(sweep_eval) -> callable:
    """``eval_fn(config, run_dir, *, sampler, num_steps)`` with the sweep's ``eval`` settings (guidance_scale,
    num_samples); `num_steps` is the NFE (see the module doc). The function keeps the run being evaluated
    loaded, so its compiled samplers are reused across that run's evaluations, and computes the data's mean
    pixel once per sweep."""
    settings = dict(sweep_eval or {})
    current: dict = {}  # {run_dir: LatentDiffusion} of the run being evaluated
    cache: dict = {}    # data_dir -> the test split's mean pixel

    def eval_fn(config, run_dir: str, *, sampler: str, num_steps: int) -> dict:
        if run_dir not in current:
            current.clear()  # one run at a time: the previous run's programs are dropped
            current[run_dir] = LatentDiffusion.from_workdir(run_dir)
        data_dir = str(config.data.data_dir)
        if data_dir not in cache:
            cache[data_dir] = _data_mean(config)
        return evaluate_run(config, run_dir, sampler=sampler, nfe=int(num_steps),
                            guidance_scale=float(settings.get("guidance_scale", 3.0)),
                            num_samples=int(settings.get("num_samples", 72)), model=current[run_dir],
                            data_mean=cache[data_dir])

    return eval_fn


def evaluate_run(config, run_dir: str, *, sampler: str, nfe: int, guidance_scale: float, num_samples: int,
                 model: LatentDiffusion | None = None, data_mean: float | None = None) -> dict:
    """Metrics of one trained run at `nfe` network evaluations with `sampler` (see the module doc): the
    evaluation ``ldm-jax evaluate`` runs (`generated.evaluate_generated`, seed 0), plus ``brightness_gap``.
    `model` is the run's loaded model when the caller keeps it, `data_mean` the test split's mean pixel."""
    model = model or LatentDiffusion.from_workdir(run_dir)
    steps = diffusion.sampler_spec(sampler).steps_for_nfe(nfe)
    opts = dict(sampler=sampler, num_steps=steps, guidance_scale=guidance_scale)
    dataset = str(config.data.name)
    if dataset not in DATASETS:
        raise ConfigError(f"no sweep metric for dataset '{dataset}': use shapes or fashion_mnist")
    generate = lambda prompts, seed: model.generate(prompts, seed=seed, batch_size=128, **opts)  # noqa: E731
    out, images, _ = evaluate_generated(dataset, generate, num_samples=num_samples, seed=0, return_images=True)
    out.pop("num_images")
    out["steps"] = float(steps)
    mean = _data_mean(config) if data_mean is None else data_mean
    out["brightness_gap"] = abs(float(np.mean(images / 255.0)) - mean)
    return out
