"""PSNR closed form, SSIM vs scikit-image, and autoencoder_metrics on scikit-image's photos."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ldm_jax.eval import recon


def test_psnr_closed_form():
    a = np.zeros((2, 4, 4, 3), np.float32)
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, 0, 0, 0] = 1.0  # MSE 1 / 48 -> 10 log10(48)
    np.testing.assert_allclose(recon.psnr(a, b), [20.0, 10 * np.log10(48.0)], rtol=1e-5)
    assert recon.psnr(a[:1], a[:1])[0] == np.inf


def test_ssim_matches_skimage():
    photos = recon.skimage_photos(48, names=("astronaut", "coffee")).astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    noisy = np.clip(photos + rng.normal(scale=0.1, size=photos.shape), 0, 1)
    blurred = 0.5 * (photos + np.roll(photos, 2, axis=1))
    for other in (noisy, blurred):
        want = [structural_similarity(p, o, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=1.0, channel_axis=-1) for p, o in zip(photos, other)]
        np.testing.assert_allclose(recon.ssim(photos, other), want, atol=2e-5)
    np.testing.assert_allclose(recon.ssim(photos, photos), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        recon.ssim(photos[:, :8, :8], photos[:, :8, :8])


def test_autoencoder_metrics_on_photos():
    photos = recon.skimage_photos(32)
    assert photos.shape == (7, 32, 32, 3) and photos.dtype == np.uint8
    crops = recon.photo_crops(16, num_crops=6, seed=1)
    assert crops.shape == (6, 16, 16, 3) and crops.std() > 10

    mean_features = lambda x: np.asarray(x, np.float64).reshape(len(x), -1, 3).mean(1)  # noqa: E731
    identity = recon.autoencoder_metrics(lambda x: x, photos, feature_fn=mean_features, batch_size=3)
    assert identity["ssim"] == pytest.approx(1.0, abs=1e-6) and identity["psnr"] == np.inf
    assert abs(identity["rfd"]) < 1e-9 and identity["n"] == 7
    # a constant offset of 0.1 in [-1, 1] units is 0.05 on [0, 1] pixels: PSNR 20 log10(1 / 0.05) where
    # nothing clips, and the feature means shift by 0.1 per channel: rFD = 3 * 0.01 plus clipping effects
    shifted = recon.autoencoder_metrics(lambda x: x + 0.1, photos, feature_fn=mean_features)
    unclipped = np.clip(photos / 127.5 - 1 + 0.1, -1, 1)
    want_psnr = np.mean([10 * np.log10(1 / np.mean(((u - (p / 127.5 - 1)) / 2) ** 2))
                         for u, p in zip(unclipped, photos)])
    assert shifted["psnr"] == pytest.approx(want_psnr, rel=1e-4)
    assert 0.0 < shifted["rfd"] <= 0.03 + 1e-6
    with pytest.raises(ValueError, match="returned shape"):
        recon.autoencoder_metrics(lambda x: x[:, :8], photos)
