"""The real train and eval functions of a latent-diffusion sweep (what ``ldm-jax sweep`` runs).

Every run of a sweep shares one stage-1 autoencoder, trained once into ``SWEEP_WORKDIR/autoencoder`` from
``config.sweep.autoencoder`` (a config spec such as ``configs/shapes_autoencoder.py``) and one dataset
directory ``SWEEP_WORKDIR/data``; each run trains stage 2 into ``SWEEP_WORKDIR/runs/<name>`` (resumable).

Evaluation at a number of function evaluations (NFE): Heun's method costs two network evaluations per step
but one on the last, so it gets ``(nfe + 1) // 2`` steps; the others one step per NFE. Metrics:
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

import functools
import os

import numpy as np

from ldm_jax.configlib import load_config
from ldm_jax.types import ConfigError


def steps_for_nfe(sampler: str, nfe: int) -> int:
    return max(1, (int(nfe) + 1) // 2) if sampler == "heun" else int(nfe)


class Interrupted(RuntimeError):
    """A stage stopped before its last step (SIGTERM / preemption): the sweep stops; rerunning resumes it."""


def _check_finished(state, config, what: str) -> None:
    step = None if state is None else int(np.asarray(state.step))
    if step is None or step < int(config.train.num_steps):
        raise Interrupted(f"{what} stopped at step {step} of {int(config.train.num_steps)} (signal?); nothing was "
                          "recorded for it: rerun the same command to resume")


def prepare(config, workdir: str, reuse_from: str | None = None):
    """Trains the shared autoencoder (once) and points the sweep's base config at it and at the shared data.
    With `reuse_from` (another sweep's directory) that sweep's data and finished autoencoder are used instead,
    so its trained runs can be evaluated here (only read, never written)."""
    from ldm_jax.training import run

    home = reuse_from or workdir
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
            from ldm_jax.sweeps.runner import trained_differently

            if why := trained_differently(ae, ae_dir):
                raise ConfigError(f"--reuse_from: the shared autoencoder cannot be reused: {why}; reuse a sweep "
                                  "of the same, finished autoencoder, or drop --reuse_from")
        else:
            _check_finished(run(ae, ae_dir), ae, "the shared autoencoder")
        config.model.vae.workdir = ae_dir
    elif not (config.model.vae.get("workdir") or config.model.vae.get("pretrained")):
        raise ConfigError("the sweep needs an autoencoder: set sweep.autoencoder (a config spec trained once) or "
                          "model.vae.workdir / model.vae.pretrained")
    if str(config.data.get("latent_cache", "") or "") == "auto":
        # one cache for every run (they share the autoencoder and text encoder), not one per run directory
        from ldm_jax.training.ldm import build, ensure_latent_cache

        model, frozen, _, _ = build(config)
        config.data.latent_cache = ensure_latent_cache(config, model, frozen, workdir)
    return config


def train_fn(config, run_dir: str):
    from ldm_jax.training import run

    state = run(config, run_dir)
    _check_finished(state, config, f"run {os.path.basename(run_dir)}")
    return state


def _data_mean(config, count: int = 512) -> float:
    from ldm_jax.eval.stage_metrics import heldout_images

    return float(np.mean((heldout_images(config, count) + 1.0) / 2.0))


@functools.cache
def fmnist_class_means() -> np.ndarray:
    """Mean pixel (in [0, 1]) of each class of the Fashion-MNIST test split, in label order."""
    from ldm_jax.eval.fmnist_net import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return np.array([np.mean(images[labels == c] / 255.0) for c in range(10)])


def class_brightness(images: np.ndarray, labels: np.ndarray, real_means: np.ndarray) -> dict:
    """``class_brightness_gap`` and ``brightness_slope`` (module doc) of uint8 `images` of classes `labels`."""
    gen = np.array([np.mean(images[labels == c] / 255.0) for c in range(len(real_means))])
    slope = np.polyfit(real_means, gen, 1)[0]
    return {"class_brightness_gap": float(np.mean(np.abs(gen - real_means))), "brightness_slope": float(slope)}


def _fmnist_real_stats():
    """Feature statistics of the 10k Fashion-MNIST test images (the FD-FMNIST reference)."""
    from ldm_jax.eval.callback import reference_stats
    from ldm_jax.eval.fmnist_net import fmnist_feature_fn, load_fashion_mnist

    real, _ = load_fashion_mnist("test")
    return reference_stats(fmnist_feature_fn(), real[..., None])[0]


def make_eval_fn(sweep_eval) -> callable:
    """``eval_fn(config, run_dir, *, sampler, num_steps)`` with the sweep's ``eval`` settings (guidance_scale,
    num_samples); `num_steps` is the NFE (see the module doc). The function keeps the run being evaluated
    loaded, so its compiled samplers are reused across that run's evaluations, and computes the data's mean
    pixel and the FD-FMNIST reference statistics once per sweep."""
    settings = dict(sweep_eval or {})
    current: dict = {}  # {run_dir: (generator, params)} of the run being evaluated
    cache: dict = {}    # data_dir -> the test split's mean pixel; "fmnist" -> the FD-FMNIST reference

    def eval_fn(config, run_dir: str, *, sampler: str, num_steps: int) -> dict:
        from ldm_jax.training.ldm import load_generator

        if run_dir not in current:
            current.clear()  # one run at a time: the previous run's programs are dropped
            current[run_dir] = load_generator(run_dir, config)
        data_dir = str(config.data.data_dir)
        if data_dir not in cache:
            cache[data_dir] = _data_mean(config)
        if str(config.data.name) == "fashion_mnist" and "fmnist" not in cache:
            cache["fmnist"] = _fmnist_real_stats()
        return evaluate_run(config, run_dir, sampler=sampler, nfe=int(num_steps),
                            guidance_scale=float(settings.get("guidance_scale", 3.0)),
                            num_samples=int(settings.get("num_samples", 72)), loaded=current[run_dir],
                            data_mean=cache[data_dir], real_stats=cache.get("fmnist"))

    return eval_fn


def evaluate_run(config, run_dir: str, *, sampler: str, nfe: int, guidance_scale: float, num_samples: int,
                 loaded=None, data_mean: float | None = None, real_stats=None) -> dict:
    """Metrics of one trained run at `nfe` network evaluations with `sampler` (see the module doc).

    `loaded` is the run's (generator, params) when the caller keeps them, `data_mean` the test split's mean
    pixel, `real_stats` the FD-FMNIST reference (fashion_mnist); each is computed here when not given."""
    from ldm_jax.training.ldm import load_generator

    generator, params = loaded or load_generator(run_dir, config)
    opts = dict(sampler=sampler, num_steps=steps_for_nfe(sampler, nfe), guidance_scale=guidance_scale)
    dataset = str(config.data.name)
    n = num_samples
    out = {"steps": float(opts["num_steps"])}
    if dataset == "shapes":
        from ldm_jax.eval.adherence import demo_prompts, score_demo

        prompts, heldout = demo_prompts()
        reps = max(1, -(-n // len(prompts)))
        images = np.concatenate([generator(params, prompts, seed=r, **opts) for r in range(reps)])
        out.update(score_demo(images, prompts * reps, heldout * reps))
        out["mean_acc"] = float(np.mean([out["color_acc"], out["shape_acc"], out["position_acc"]]))
    elif dataset == "fashion_mnist":
        from ldm_jax.eval.callback import reference_stats
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn
        from ldm_jax.eval.frechet import stats_distance
        from ldm_jax.eval.stage_metrics import _fmnist_prompts

        prompts = _fmnist_prompts(n)
        images = np.concatenate([generator(params, prompts[i:i + 100], seed=i, **opts) for i in range(0, n, 100)])
        fake, _ = reference_stats(fmnist_feature_fn(), images)
        out["fd_fmnist"] = stats_distance(_fmnist_real_stats() if real_stats is None else real_stats, fake)
        out.update(class_brightness(images, np.arange(n) % 10, fmnist_class_means()))
    else:
        raise ConfigError(f"no sweep metric for dataset '{dataset}': use shapes or fashion_mnist")
    mean = _data_mean(config) if data_mean is None else data_mean
    out["brightness_gap"] = abs(float(np.mean(images / 255.0)) - mean)
    return out
