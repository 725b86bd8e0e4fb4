"""Evaluation callbacks of the two training stages, built from ``config.eval``.

    config.eval.every_steps = 500          # 0 = off
    config.eval.metrics = ("adherence",)   # latent diffusion: adherence (shapes), fd_fmnist (fashion_mnist)
                                           # autoencoder: recon (PSNR / SSIM, + rFD-FMNIST on fashion_mnist)
    config.eval.num_samples = 64           # generated images (or held-out images for recon) per evaluation

Generated images use the run's ``config.sample`` sampler, steps, guidance and seed, from the EMA parameters,
with the same noise at every evaluation, through the evaluation ``ldm-jax evaluate`` runs
(`generated.evaluate_generated`); scalars land in TensorBoard and metrics.jsonl as ``eval/<metric>/<key>``.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np

from ldm_jax.data import DataConfig, make_iterator
from ldm_jax.eval.callback import EvalCallback, reconstruction_metric
from ldm_jax.eval.generated import evaluate_generated
from ldm_jax.ldm import SampleConfig
from ldm_jax.types import ConfigError, FrozenConfig, nearest

LDM_METRICS = ("adherence", "fd_fmnist")
AUTOENCODER_METRICS = ("recon",)


@dataclasses.dataclass(frozen=True)
class EvalConfig(FrozenConfig):
    """Typed ``eval`` section (module doc): period (0: off), metric names, images per evaluation."""

    every_steps: int = 0
    metrics: tuple = ()
    num_samples: int = 64

    def __post_init__(self):
        if self.every_steps < 0 or self.num_samples < 1:
            raise ConfigError(f"eval.every_steps must be >= 0 and eval.num_samples >= 1, got {self.every_steps} "
                              f"and {self.num_samples}")

    def requested(self, allowed: tuple[str, ...], stage: str) -> list[str]:
        """The metric names, checked against the stage's (one-line ConfigError)."""
        for name in self.metrics:
            if name not in allowed:
                raise ConfigError(f"eval.metrics: '{name}' is not a {stage} metric{nearest(name, allowed)}; "
                                  f"choose from {', '.join(allowed)}")
        if self.every_steps and not self.metrics:
            raise ConfigError(f"eval.every_steps={self.every_steps} but eval.metrics is empty; name some of "
                              f"{', '.join(allowed)}")
        return list(self.metrics)


def _requested(config, allowed: tuple[str, ...], stage: str) -> tuple[EvalConfig, list[str]]:
    ev = EvalConfig.from_config(config.get("eval", {}) or {})
    return ev, ev.requested(allowed, stage)


def _check_dataset(name: str, metric: str, want: str, config) -> None:
    have = str(config.data.get("name", ""))
    if have != want:
        raise ConfigError(f"eval metric '{name}' needs data.name='{want}' ({metric}), but this run trains on "
                          f"'{have}'; remove it from eval.metrics")


_LDM_DATASET = {"adherence": ("shapes", "the shapes checker"),
                "fd_fmnist": ("fashion_mnist", "the Fashion-MNIST feature net")}


def ldm_callbacks(config, generate, params_of=None) -> list:
    """[EvalCallback] of the latent-diffusion stage (empty when eval.every_steps is 0).

    `generate` is ``generate(params, prompts, **sample settings) -> uint8`` (`LatentDiffusion.generate` with the
    run's current weights); `params_of(state, ema_params)` makes its `params` (see `EvalCallback`). The metrics
    are `generated.evaluate_generated` with ``eval.num_samples`` images and the run's ``sample`` settings: the
    numbers ``ldm-jax evaluate --num_samples=N`` gives for the checkpoint of that step.
    """
    ev, names = _requested(config, LDM_METRICS, "latent-diffusion")
    if not ev.every_steps:
        return []
    settings = SampleConfig.from_config(config.sample).generate_kwargs()
    seed = settings.pop("seed")
    n = ev.num_samples
    metrics = {}
    for name in names:
        dataset, what = _LDM_DATASET[name]
        _check_dataset(name, what, dataset, config)

        def metric(params, step, dataset=dataset):
            del step
            result = evaluate_generated(dataset, lambda prompts, s: generate(params, prompts, seed=s, **settings),
                                        num_samples=n, seed=seed)
            return {k: v for k, v in result.items() if k != "num_images"}

        metrics[name] = metric
    return [EvalCallback(ev.every_steps, metrics, params_of=params_of)]


def heldout_images(config, count: int) -> np.ndarray:
    """The first `count` images of the run's test split, in [-1, 1] (in order, no augmentation)."""

    data = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data, split="test",
                batch_size=8, shuffle=False, num_epochs=1, caption_dropout=0.0, flip=False, latent_cache=None,
                drop_remainder=False)
    out = []
    for batch in make_iterator(DataConfig.from_run_config(types.SimpleNamespace(data=data))):
        out.append(np.asarray(batch["image"]))
        if sum(map(len, out)) >= count:
            break
    return np.concatenate(out)[:count]


def autoencoder_callbacks(config, vae) -> list:
    """[EvalCallback] of the autoencoder stage: PSNR / SSIM (and rFD-FMNIST) on held-out images."""
    ev, _ = _requested(config, AUTOENCODER_METRICS, "autoencoder")
    if not ev.every_steps:
        return []
    images = heldout_images(config, ev.num_samples)
    feature_fn = None
    if str(config.data.get("name", "")) == "fashion_mnist":
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn

        feature_fn = fmnist_feature_fn()
    roundtrip = jax.jit(lambda params, x: vae.apply({"params": params}, x)[0])
    return [EvalCallback(ev.every_steps, {"recon": reconstruction_metric(roundtrip, images, feature_fn=feature_fn)})]
