"""Shared inputs of the pipeline tests."""

import numpy as np

SIZE = 64


def smooth_image(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random RGB uint8 image (blobs of color), so the VAE sees structure rather than white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
        img += rng.uniform(-1, 1, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)[..., None]
    return np.clip(127.5 + 60 * img, 0, 255).astype(np.uint8)
