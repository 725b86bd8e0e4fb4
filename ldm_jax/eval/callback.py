"""Evaluation during training: ``EvalCallback(every_steps, metrics)`` runs metric functions on EMA parameters.

The training loop calls each callback as ``callback(step, state)``. Every `every_steps` steps this one
evaluates each metric function on ``state.ema_params`` (boxes stripped) and logs the scalars as
``eval/<metric name>/<key>`` (plus ``eval/<metric name>/seconds``) through
``MetricWriter.write_scalars``: its own writer when given one, else by returning them to the loop, which
writes callback outputs with its writer. Metric functions are ``fn(params, step) -> {name: scalar}``;
the builders below make the usual ones:

    ref, ref_feats = reference_stats(fmnist_feature_fn(), real_images, reservoir=1000)
    callback = EvalCallback(1000, {
        "fd_fmnist": frechet_metric(generate, fmnist_feature_fn(), ref, num_samples=1000,
                                    reference_features=ref_feats),
        "shapes": adherence_metric(generate_from_prompts, adherence_prompts(256)),
        "recon": reconstruction_metric(vae_roundtrip, heldout_images, feature_fn=fmnist_feature_fn()),
    })

Every process must run the callback (the feature functions are sharded over all devices); only process 0's
writer writes. Generation draws the same noise at every evaluation (``fold_in(key(seed), batch)``), so
changes between steps come from the parameters, not from resampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from ldm_jax.eval.adherence import prompt_adherence
from ldm_jax.eval.frechet import (
    FeatureFn,
    FeatureReservoir,
    FeatureStats,
    accumulate,
    kernel_inception_distance,
    stats_distance,
)
from ldm_jax.eval.recon import autoencoder_metrics
from ldm_jax.types import PyTree

MetricFn = Callable[[PyTree, int], Mapping[str, float]]


class EvalCallback:
    """Runs `metrics` on the EMA parameters every `every_steps` steps and logs their scalars.

    Args:
      every_steps: evaluation period; 0 disables the callback.
      metrics: name -> ``fn(params, step) -> {key: scalar}``.
      writer: a ``MetricWriter``; without one the scalars are returned for the training loop to write.
      use_ema: evaluate ``state.ema_params`` (falls back to ``state.params`` when the state has none).
      at_start: also evaluate at step 0.
      params_of: ``(state, params) -> what the metric functions get`` (default: the parameters themselves).
    """

    def __init__(self, every_steps: int, metrics: Mapping[str, MetricFn], *, writer=None,
                 use_ema: bool = True, prefix: str = "eval", at_start: bool = False, params_of=None):
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        if not metrics:
            raise ValueError("EvalCallback needs at least one metric function")
        self.every_steps, self.metrics, self.writer = int(every_steps), dict(metrics), writer
        self.use_ema, self.prefix, self.at_start, self.params_of = use_ema, prefix, at_start, params_of

    def __call__(self, step: int, state) -> dict[str, float] | None:
        step = int(step)
        if not self.every_steps or step % self.every_steps or (step == 0 and not self.at_start):
            return None
        ema = getattr(state, "ema_params", None) if self.use_ema else None
        params = nn.meta.unbox(ema if ema is not None else state.params)
        if self.params_of is not None:  # e.g. the parameters plus a learned schedule's from state.extra
            params = self.params_of(state, params)
        scalars = {}
        for name, fn in self.metrics.items():
            start = time.perf_counter()
            for key, value in fn(params, step).items():
                scalars[f"{self.prefix}/{name}/{key}"] = float(np.asarray(value))
            scalars[f"{self.prefix}/{name}/seconds"] = time.perf_counter() - start
        if self.writer is not None:
            self.writer.write_scalars(step, scalars)
            return None
        return scalars


def reference_stats(feature_fn: FeatureFn, images, *, batch_size: int = 256, reservoir: int = 0,
                    seed: int = 0) -> tuple[FeatureStats, np.ndarray | None]:
    """Feature statistics (and up to `reservoir` feature rows, for KID) of real images.

    `images` is an array (N, H, W, C) or an iterable of batches (arrays or dicts with "image").
    """
    batches = images
    if isinstance(images, np.ndarray):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    return accumulate(feature_fn, batches, reservoir=reservoir, seed=seed)


def _generated(generate_fn, params, num_samples: int, batch_size: int, seed: int) -> Iterable[np.ndarray]:
    key = jax.random.key(seed)
    for i, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        yield np.asarray(generate_fn(params, jax.random.fold_in(key, i), n))


def frechet_metric(generate_fn: Callable[[PyTree, jax.Array, int], np.ndarray], feature_fn: FeatureFn,
                   reference: FeatureStats, *, num_samples: int, batch_size: int = 64, seed: int = 0,
                   reference_features: np.ndarray | None = None, kid_subset_size: int = 1000) -> MetricFn:
    """FD (and KID when `reference_features` are given) of ``generate_fn(params, rng, n) -> images``
    against a reference set; keys "fd", "kid", "kid_std"."""

    def metric(params: PyTree, step: int) -> dict[str, float]:
        keep = reference_features is not None
        stats, feats = accumulate(feature_fn, _generated(generate_fn, params, num_samples, batch_size, seed),
                                  reservoir=num_samples if keep else 0, seed=seed)
        out = {"fd": stats_distance(reference, stats)}
        if keep:
            out["kid"], out["kid_std"] = kernel_inception_distance(reference_features, feats,
                                                                   subset_size=kid_subset_size)
        return out

    return metric


def adherence_metric(generate_fn: Callable[[PyTree, Sequence[str], jax.Array], np.ndarray],
                     prompts: Sequence[str], *, batch_size: int = 64, seed: int = 0) -> MetricFn:
    """Shapes prompt adherence of ``generate_fn(params, prompts, rng) -> images`` on fixed `prompts`."""
    prompts = list(prompts)

    def metric(params: PyTree, step: int) -> dict[str, float]:
        key = jax.random.key(seed)
        images = np.concatenate([
            np.asarray(generate_fn(params, prompts[s:s + batch_size], jax.random.fold_in(key, i)))
            for i, s in enumerate(range(0, len(prompts), batch_size))])
        return {k: v for k, v in prompt_adherence(images, prompts).items() if k.split("/")[-1] != "n"}

    return metric


def reconstruction_metric(reconstruct_fn: Callable[[PyTree, np.ndarray], np.ndarray], images, *,
                          feature_fn: FeatureFn | None = None, batch_size: int = 16) -> MetricFn:
    """PSNR / SSIM / rFD of ``reconstruct_fn(params, x) -> x_rec`` (x in [-1, 1]) on fixed `images`."""
    images = np.asarray(images)

    def metric(params: PyTree, step: int) -> dict[str, float]:
        out = autoencoder_metrics(lambda x: reconstruct_fn(params, x), images, feature_fn=feature_fn,
                                  batch_size=batch_size)
        return {k: v for k, v in out.items() if k != "n"}

    return metric


__all__ = ["EvalCallback", "FeatureReservoir", "MetricFn", "adherence_metric", "frechet_metric",
           "reconstruction_metric", "reference_stats"]
