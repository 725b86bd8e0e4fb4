"""Autoencoder metrics: PSNR, SSIM and rFD of reconstructions, on held-out data or scikit-image's photos.

    metrics = autoencoder_metrics(lambda x: vae_roundtrip(params, x), images, feature_fn=fmnist_feature_fn())
    # {"psnr": ..., "ssim": ..., "rfd": ..., "n": ...}

All metrics are computed on [0, 1] pixels (data range 1): PSNR = 10 log10(1 / MSE) per image, averaged;
SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
(co)variances, averaged over the valid window positions and the channels (what scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` computes);
rFD is the Fréchet distance between the features of originals and reconstructions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import images as imlib
from ldm_jax.eval.frechet import FeatureFn, FeatureStats, stats_distance, to_unit_range
from ldm_jax.types import Array

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def psnr(a: Array, b: Array, data_range: float = 1.0) -> Array:
    """Per-image PSNR 10 log10(R^2 / mean((a - b)^2)) of (B, H, W, C) arrays; inf for identical images."""
    mse = jnp.mean((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _valid_filter_matrix(n: int, window: np.ndarray) -> np.ndarray:
    """(n - k + 1, n) matrix applying `window` at every position where it fits inside the signal."""
    k = len(window)
    m = np.zeros((n - k + 1, n))
    for i in range(n - k + 1):
        m[i, i:i + k] = window
    return m


def ssim(a: Array, b: Array, data_range: float = 1.0, *, sigma: float = 1.5, radius: int = 5,
         k1: float = 0.01, k2: float = 0.03) -> Array:
    """Per-image mean SSIM of (B, H, W, C) arrays (Wang et al. 2004, Gaussian window).

    SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)), C_i = (K_i R)^2,
    with local moments from the normalized Gaussian window, averaged over the positions where the window
    fits and over channels.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (B, H, W, C) arrays of one shape, got {a.shape} and {b.shape}")
    k = 2 * radius + 1
    if min(a.shape[1:3]) < k:
        raise ValueError(f"images of {a.shape[1]}x{a.shape[2]} are smaller than the {k}x{k} SSIM window")
    w = gaussian_window(sigma, radius)
    gh = jnp.asarray(_valid_filter_matrix(a.shape[1], w), jnp.float32)
    gw = jnp.asarray(_valid_filter_matrix(a.shape[2], w), jnp.float32)
    filt = lambda x: jnp.einsum("ih,bhwc,jw->bijc", gh, x, gw, precision="highest")  # noqa: E731
    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()[..., :3]


def _resize(image: np.ndarray, resolution: int) -> np.ndarray:
    return imlib.resize(image[None], resolution, resolution)[0]


def skimage_photos(resolution: int = 256, names=PHOTOS) -> np.ndarray:
    """The real photos scikit-image ships, center-cropped square and resized: uint8 (N, res, res, 3)."""
    out = []
    for name in names:
        img = _photo(name)
        h, w = img.shape[:2]
        s = min(h, w)
        out.append(_resize(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s], resolution))
    return np.stack(out)


def photo_crops(resolution: int = 64, num_crops: int = 256, seed: int = 0, names=PHOTOS) -> np.ndarray:
    """`num_crops` random square crops (side between `resolution` and the photo's short side) of
    scikit-image's photos, resized to uint8 (num_crops, res, res, 3): enough samples for an rFD."""
    rng = np.random.default_rng(seed)
    photos = [_photo(n) for n in names]
    out = []
    for i in range(num_crops):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = int(rng.integers(resolution, min(h, w) + 1))
        y, x = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
        out.append(_resize(img[y:y + s, x:x + s], resolution))
    return np.stack(out)


def autoencoder_metrics(encode_decode_fn: Callable[[Array], Array], images, *,
                        feature_fn: FeatureFn | None = None, batch_size: int = 16) -> dict[str, float]:
    """PSNR, SSIM (and rFD with `feature_fn`) of ``encode_decode_fn`` over `images`.

    Args:
      encode_decode_fn: float (B, H, W, 3) in [-1, 1] -> reconstructions of the same shape (any range;
        clipped to [-1, 1], as when saving images).
      images: (N, H, W, 3) uint8, or float in [-1, 1].
      feature_fn: images -> (B, F) features for rFD (e.g. ``fmnist_feature_fn()``, ``inception_feature_fn``).
    """
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty batch of images (N, H, W, C), got shape {images.shape}")
    unit = jax.jit(to_unit_range)
    scores = jax.jit(lambda a, b: (psnr(a, b), ssim(a, b)))
    psnrs, ssims, real, fake = [], [], None, None
    for i in range(0, len(images), batch_size):
        x = np.asarray(unit(images[i:i + batch_size])) * 2.0 - 1.0
        y = np.clip(np.asarray(encode_decode_fn(x), np.float32), -1.0, 1.0)
        if y.shape != x.shape:
            raise ValueError(f"encode_decode_fn returned shape {y.shape} for input {x.shape}")
        p, s = scores((x + 1) / 2, (y + 1) / 2)
        psnrs.append(np.asarray(p))
        ssims.append(np.asarray(s))
        if feature_fn is not None:
            fx, fy = FeatureStats.from_features(feature_fn(x)), FeatureStats.from_features(feature_fn(y))
            real, fake = (fx, fy) if real is None else (real.merge(fx), fake.merge(fy))
    out = {"psnr": float(np.mean(np.concatenate(psnrs))), "ssim": float(np.mean(np.concatenate(ssims))),
           "n": len(images)}
    if feature_fn is not None:
        out["rfd"] = stats_distance(real, fake) if len(images) > 1 else float("nan")
    return out
