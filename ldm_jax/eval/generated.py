"""Dataset evaluation of generated images, written once: ``ldm-jax evaluate``, the sweeps and the in-training
evaluation callbacks all call `evaluate_generated`, with the same prompts, seeds and reference statistics, so
their numbers are comparable.

``generate(prompts, seed) -> uint8 (N, H, W, 3)`` is one call of `LatentDiffusion.generate` (image k of the
list uses seed + k). Per dataset:

- shapes: the demo's 18 colour x shape prompts (three pairs held out of training), repeated to reach
  `num_samples`; the shapes checker's ``color_acc``, ``shape_acc``, ``position_acc`` (and ``heldout_*``),
  their mean ``mean_acc``.
- fashion_mnist: prompts "a photo of a {class}" cycling through the 10 classes; FD-FMNIST (``fd_fmnist``) and
  KID (``kid_fmnist``, ``kid_std_fmnist``) against the 10k test images under the framework's Fashion-MNIST
  feature net, and the per-class brightness of ``class_brightness``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from ldm_jax.types import ConfigError

DATASETS = ("shapes", "fashion_mnist")
Generate = Callable[[list, int], np.ndarray]


def shapes_prompts(num_samples: int) -> tuple[list[str], list[bool]]:
    """The demo prompts repeated to cover `num_samples` (whole repetitions), and their held-out flags."""
    from ldm_jax.eval.adherence import demo_prompts

    prompts, heldout = demo_prompts()
    reps = max(1, -(-int(num_samples) // len(prompts)))
    return prompts * reps, heldout * reps


def fmnist_prompts(num_samples: int) -> list[str]:
    """'a photo of a {class}' for image i of class i mod 10."""
    from ldm_jax.data.fashion_mnist import CLASS_NAMES

    return [f"a photo of a {CLASS_NAMES[i % len(CLASS_NAMES)]}" for i in range(int(num_samples))]


def prompts_for(dataset: str, num_samples: int) -> list[str]:
    if dataset == "shapes":
        return shapes_prompts(num_samples)[0]
    if dataset == "fashion_mnist":
        return fmnist_prompts(num_samples)
    raise ConfigError(f"no built-in metric for dataset '{dataset}' (only {', '.join(DATASETS)} have one)")


@functools.cache
def fmnist_features():
    """The FD-FMNIST feature function (weights loaded and compiled once per process)."""
    from ldm_jax.eval.fmnist_net import fmnist_feature_fn

    return fmnist_feature_fn()


@functools.cache
def fmnist_reference(kid_features: int = 10000):
    """(FeatureStats, up to `kid_features` feature rows) of the Fashion-MNIST test split; computed once."""
    from ldm_jax.eval.callback import reference_stats
    from ldm_jax.eval.fmnist_net import load_fashion_mnist

    real, _ = load_fashion_mnist("test")
    return reference_stats(fmnist_features(), real[..., None], reservoir=kid_features)


@functools.cache
def fmnist_class_means() -> np.ndarray:
    """Mean pixel (in [0, 1]) of each class of the Fashion-MNIST test split, in label order."""
    from ldm_jax.eval.fmnist_net import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return np.array([np.mean(images[labels == c] / 255.0) for c in range(10)])


def class_brightness(images: np.ndarray, labels: np.ndarray, real_means: np.ndarray) -> dict:
    """``class_brightness_gap`` = mean over classes of |generated - test mean pixel of that class| and
    ``brightness_slope`` = least-squares slope of the generated class means against the test ones (1: the
    classes' brightness reproduced; < 1: pulled towards a middle brightness, Lin et al. 2023's bias)."""
    gen = np.array([np.mean(images[labels == c] / 255.0) for c in range(len(real_means))])
    slope = np.polyfit(real_means, gen, 1)[0]
    return {"class_brightness_gap": float(np.mean(np.abs(gen - real_means))), "brightness_slope": float(slope)}


def evaluate_generated(dataset: str, generate: Generate, *, num_samples: int, seed: int = 0,
                       precision_recall: bool = False, return_images: bool = False):
    """The dataset's metrics (module doc) of ``generate(prompts, seed)``; fashion_mnist with `precision_recall`
    adds improved precision / recall (Kynkaanniemi et al. 2019, k = 3); with `return_images` also
    (images, prompts)."""
    from ldm_jax.eval.adherence import score_demo

    if dataset == "shapes":
        prompts, heldout = shapes_prompts(num_samples)
        images = np.asarray(generate(prompts, seed))
        out = score_demo(images, prompts, heldout)
        out["mean_acc"] = float(np.mean([out["color_acc"], out["shape_acc"], out["position_acc"]]))
    elif dataset == "fashion_mnist":
        from ldm_jax.eval.callback import reference_stats
        from ldm_jax.eval.frechet import kernel_inception_distance, stats_distance

        prompts = fmnist_prompts(num_samples)
        images = np.asarray(generate(prompts, seed))
        ref, ref_feats = fmnist_reference()
        fake, fake_feats = reference_stats(fmnist_features(), images, reservoir=len(images))
        out = {"fd_fmnist": stats_distance(ref, fake)}
        if len(images) >= 2:
            kid, kid_std = kernel_inception_distance(ref_feats, fake_feats, subset_size=min(1000, len(images)),
                                                     num_subsets=50)
            out.update(kid_fmnist=float(kid), kid_std_fmnist=float(kid_std))
        if precision_recall:
            from ldm_jax.eval.frechet import precision_recall as improved_pr

            out.update(improved_pr(ref_feats, fake_feats, k=3))
        out.update(class_brightness(images, np.arange(len(images)) % 10, fmnist_class_means()))
    else:
        raise ConfigError(f"no built-in metric for dataset '{dataset}' (only {', '.join(DATASETS)} have one)")
    out["num_images"] = len(images)
    return (out, images, prompts) if return_images else out
