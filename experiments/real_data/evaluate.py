"""Figures of the real-data text-to-image runs: a sample grid and, for Fashion-MNIST, FD-FMNIST.

    python experiments/real_data/evaluate.py fashion_mnist runs/fmnist [--num_samples=2000]
    python experiments/real_data/evaluate.py openmoji runs/openmoji

RUN_DIR holds the two stage workdirs, `autoencoder/` and `ldm/`. Writes RUN_DIR/samples.png (one row per
prompt, 8 seeds each) and RUN_DIR/eval.json. FD-FMNIST: Frechet distance between the features of the
framework's Fashion-MNIST net (ldm_jax/eval, 92.4% test accuracy) on generated images (the ten class prompts
in equal numbers) and on the 10k test split; the real-data floor (train vs test) is 0.169
(experiments/fmnist_features).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

FMNIST_PROMPTS = tuple(f"a photo of a {c}" for c in (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"))
OPENMOJI_PROMPTS = ("grinning face", "red heart", "dog face", "pizza", "rocket", "sun", "smiling face with sunglasses",
                    "thumbs up")


def generate(model, prompts, n_per_prompt, *, batch, seed, **options) -> np.ndarray:
    """n_per_prompt images of each prompt, prompt by prompt; image i uses seed + i (LatentDiffusion.generate)."""
    return model.generate(list(prompts), num_images_per_prompt=n_per_prompt, seed=seed, batch_size=batch, **options)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=("fashion_mnist", "openmoji"))
    p.add_argument("run_dir")
    p.add_argument("--num_samples", type=int, default=2000, help="generated images for FD-FMNIST")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--num_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    args = p.parse_args()

    from ldm_jax import LatentDiffusion
    from ldm_jax.images import make_grid, save_png

    t0 = time.time()
    model = LatentDiffusion.from_workdir(os.path.join(args.run_dir, "ldm"))
    opts = dict(sampler=args.sampler, num_steps=args.num_steps, guidance_scale=args.guidance_scale)
    prompts = FMNIST_PROMPTS if args.dataset == "fashion_mnist" else OPENMOJI_PROMPTS
    grid = generate(model, prompts, 8, batch=64, seed=0, **opts)
    save_png(os.path.join(args.run_dir, "samples.png"), make_grid(grid, cols=8))
    result = {"dataset": args.dataset, "prompts": list(prompts), **opts}
    if args.dataset == "fashion_mnist":
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn, load_fashion_mnist
        from ldm_jax.eval.frechet import FeatureStats, stats_distance

        features = fmnist_feature_fn()
        per_class = max(1, args.num_samples // len(prompts))
        fake = generate(model, prompts, per_class, batch=100, seed=10_000, **opts)
        test_images, _ = load_fashion_mnist("test")
        test_images = test_images[..., None]
        real = np.concatenate([features(test_images[i:i + 1000]) for i in range(0, len(test_images), 1000)])
        gen = np.concatenate([features(fake[i:i + 1000]) for i in range(0, len(fake), 1000)])
        # The floor at the same sample size and resolution: as many training images as generated ones,
        # through the same 28 -> 32 px resize (FD is biased upwards at small sample sizes).
        import jax

        train_images, _ = load_fashion_mnist("train")
        pick = train_images[np.random.default_rng(0).permutation(len(train_images))[:len(fake)]]
        up = lambda x: np.asarray(jax.image.resize(x[..., None].astype(np.float32) / 127.5 - 1, (len(x), 32, 32, 1),
                                                   "linear", antialias=True))
        floor = np.concatenate([features(up(pick[i:i + 1000])) for i in range(0, len(pick), 1000)])
        fd = lambda a, b: stats_distance(FeatureStats.from_features(np.asarray(a, np.float64)),
                                         FeatureStats.from_features(np.asarray(b, np.float64)))
        result.update(fd_fmnist=fd(real, gen), num_generated=len(fake), floor_train_sample32_vs_test=fd(real, floor),
                      floor_train_vs_test_native=0.169)
    result["seconds"] = time.time() - t0
    with open(os.path.join(args.run_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
