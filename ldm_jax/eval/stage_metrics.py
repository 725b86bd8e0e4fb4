"""Evaluation callbacks of the two training stages, built from ``config.eval``.

    config.eval.every_steps = 500          # 0 = off
    config.eval.metrics = ("adherence",)   # latent diffusion: adherence (shapes), fd_fmnist (fashion_mnist)
                                           # autoencoder: recon (PSNR / SSIM, + rFD-FMNIST on fashion_mnist)
    config.eval.num_samples = 64           # generated images (or held-out images for recon) per evaluation

Generated images use the run's ``config.sample`` sampler, steps, guidance and seed, from the EMA parameters,
with the same noise at every evaluation (see `callback.EvalCallback`); scalars land in TensorBoard and
metrics.jsonl as ``eval/<metric>/<key>``.
"""

from __future__ import annotations

import types

import jax
import numpy as np

from ldm_jax.eval.callback import (
    EvalCallback,
    adherence_metric,
    frechet_metric,
    reconstruction_metric,
    reference_stats,
)
from ldm_jax.types import ConfigError, nearest

LDM_METRICS = ("adherence", "fd_fmnist")
AUTOENCODER_METRICS = ("recon",)


def _requested(config, allowed: tuple[str, ...], stage: str) -> tuple[int, list[str]]:
    ev = config.get("eval", {}) or {}
    every, names = int(ev.get("every_steps", 0)), [str(m) for m in ev.get("metrics", ())]
    for name in names:
        if name not in allowed:
            raise ConfigError(f"eval.metrics: '{name}' is not a {stage} metric{nearest(name, allowed)}; "
                              f"choose from {', '.join(allowed)}")
    if every and not names:
        raise ConfigError(f"eval.every_steps={every} but eval.metrics is empty; name some of {', '.join(allowed)}")
    return every, names


def _check_dataset(name: str, metric: str, want: str, config) -> None:
    have = str(config.data.get("name", ""))
    if have != want:
        raise ConfigError(f"eval metric '{name}' needs data.name='{want}' ({metric}), but this run trains on "
                          f"'{have}'; remove it from eval.metrics")


def _fmnist_prompts(n: int) -> list[str]:
    from ldm_jax.data.fashion_mnist import CLASS_NAMES

    return [f"a photo of a {CLASS_NAMES[i % len(CLASS_NAMES)]}" for i in range(n)]


def ldm_callbacks(config, generator) -> list:
    """[EvalCallback] of the latent-diffusion stage (empty when eval.every_steps is 0).

    `generator` is ``ldm_jax.training.ldm.Generator``: ``generator(params, prompts, seed=...) -> uint8``.
    """
    every, names = _requested(config, LDM_METRICS, "latent-diffusion")
    if not every:
        return []
    s, n = config.sample, int(config.eval.get("num_samples", 64))
    opts = dict(sampler=str(s.sampler), num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale))
    seed = int(s.seed)
    metrics = {}
    if "adherence" in names:
        _check_dataset("adherence", "the shapes checker", "shapes", config)
        from ldm_jax.eval.adherence import adherence_prompts

        metrics["adherence"] = adherence_metric(
            lambda params, prompts, rng: generator(params, prompts, seed=seed, **opts), adherence_prompts(n),
            batch_size=64)
    if "fd_fmnist" in names:
        _check_dataset("fd_fmnist", "the Fashion-MNIST feature net", "fashion_mnist", config)
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn, load_fashion_mnist

        features = fmnist_feature_fn()
        real, _ = load_fashion_mnist("test")
        ref, ref_feats = reference_stats(features, real[..., None], reservoir=min(n, 1000))

        def generate(params, rng, count):
            start = int(jax.random.randint(rng, (), 0, 2**30))
            return generator(params, _fmnist_prompts(count), seed=start, **opts)

        metrics["fd_fmnist"] = frechet_metric(generate, features, ref, num_samples=n, reference_features=ref_feats,
                                              kid_subset_size=min(n, 1000), seed=seed)
    return [EvalCallback(every, metrics)]


def heldout_images(config, count: int) -> np.ndarray:
    """The first `count` images of the run's test split, in [-1, 1] (in order, no augmentation)."""
    from ldm_jax.data import make_iterator
    from ldm_jax.training import components

    data = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data, split="test",
                batch_size=8, shuffle=False, num_epochs=1, caption_dropout=0.0, flip=False, latent_cache=None,
                drop_remainder=False)
    out = []
    for batch in make_iterator(components.data_config(types.SimpleNamespace(data=data))):
        out.append(np.asarray(batch["image"]))
        if sum(map(len, out)) >= count:
            break
    return np.concatenate(out)[:count]


def autoencoder_callbacks(config, vae) -> list:
    """[EvalCallback] of the autoencoder stage: PSNR / SSIM (and rFD-FMNIST) on held-out images."""
    every, names = _requested(config, AUTOENCODER_METRICS, "autoencoder")
    if not every:
        return []
    images = heldout_images(config, int(config.eval.get("num_samples", 64)))
    feature_fn = None
    if str(config.data.get("name", "")) == "fashion_mnist":
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn

        feature_fn = fmnist_feature_fn()
    roundtrip = jax.jit(lambda params, x: vae.apply({"params": params}, x)[0])
    return [EvalCallback(every, {"recon": reconstruction_metric(roundtrip, images, feature_fn=feature_fn)})]
