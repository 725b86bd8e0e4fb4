"""Fréchet distance, streaming statistics, KID and precision/recall against direct float64 references."""

import jax
import numpy as np
import pytest
import scipy.linalg

from ldm_jax.eval import frechet


def _gaussian(rng, n, d, shift=0.0, scale=1.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a * scale + shift


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("d", [1, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    x, y = _gaussian(rng, 500, d), _gaussian(rng, 400, d, shift=0.3, scale=1.5)
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    want = _scipy_fd(mu1, s1, mu2, s2)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    assert want > 0.1


def test_frechet_distance_closed_form_and_self_distance():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    # commuting covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    got = frechet.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
    assert got == pytest.approx(1 + 0 + 4)
    x = _gaussian(np.random.default_rng(0), 300, 32)
    stats = frechet.FeatureStats.from_features(x)
    assert abs(frechet.stats_distance(stats, stats)) < 1e-9
    # rank-deficient (fewer samples than features): still ~0 against itself
    few = frechet.FeatureStats.from_features(x[:10])
    assert abs(frechet.stats_distance(few, few)) < 1e-9 * np.trace(few.cov)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_streaming_stats_equal_one_shot(tmp_path):
    rng = np.random.default_rng(1)
    x = _gaussian(rng, 1000, 24, shift=5.0)  # a large mean stresses the naive sum-of-squares formula
    offsets = np.cumsum([0, 1, 7, 100, 392, 500])
    stats = frechet.FeatureStats.empty(24)
    for a, b in zip(offsets[:-1], offsets[1:]):
        stats = stats.update(x[a:b])
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    stats.save(tmp_path / "ref.npz")
    back = frechet.FeatureStats.load(tmp_path / "ref.npz")
    np.testing.assert_allclose(back.cov, stats.cov, rtol=1e-12)
    assert back.count == 1000


def _mmd2_loops(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_estimator_matches_direct_formula_and_is_unbiased():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(9, 5)) + 0.5
    assert frechet.mmd2_unbiased(x, y) == pytest.approx(_mmd2_loops(x, y), rel=1e-12)
    # Unbiased: over many pairs of samples from one distribution the estimates average to 0 (the biased
    # V-statistic would average to a clearly positive value).
    pairs = [(rng.normal(size=(50, 8)), rng.normal(size=(50, 8))) for _ in range(400)]
    values = np.array([frechet.mmd2_unbiased(a, b) for a, b in pairs])
    k = frechet.polynomial_kernel
    biased = np.array([k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean() for a, b in pairs])
    stderr = values.std() / np.sqrt(len(values))
    assert abs(values.mean()) < 4 * stderr
    assert biased.mean() > 20 * stderr  # the check has the power to see a bias
    shifted = frechet.kernel_inception_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 1.0,
                                                subset_size=100, num_subsets=10)
    assert shifted[0] > 5 * shifted[1] > 0


def test_precision_recall_closed_form():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # k=1 radii (squared): 1, 1, 1, 1, 49. Fake points at 0.5 (inside), 20 (outside all), 16 (inside the
    # ball of 10, radius 7).
    fake = np.array([[0.5], [20.0], [16.0], [1.5]])
    got = frechet.precision_recall(real, fake, k=1)
    assert got["precision"] == pytest.approx(3 / 4)
    # fake k=1 radii (squared): 1, 16, 16, 1 -> real 0,1,2 covered by 0.5/1.5; 3 by none (|3-1.5|^2=2.25>1);
    # 10 is not within 4 of 16 or 20 (|10-16|=6)
    assert got["recall"] == pytest.approx(3 / 5)
    same = frechet.precision_recall(real, real, k=2)
    assert same == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_disjoint_sets_and_mode_dropping():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(200, 8))
    far = frechet.precision_recall(real, rng.normal(size=(150, 8)) + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0}
    # fakes covering only half of the real modes: every fake is plausible (precision high) but half of the
    # real samples are not reached (recall about 1/2); swapping the roles swaps the two numbers
    modes = np.concatenate([rng.normal(size=(100, 2)) * 0.1 + [20 * i, 0] for i in range(4)])
    half = np.concatenate([rng.normal(size=(100, 2)) * 0.1 + [20 * i, 0] for i in range(2)])
    got = frechet.precision_recall(modes, half, k=3)
    assert got["precision"] > 0.9 and 0.45 <= got["recall"] <= 0.5
    swapped = frechet.precision_recall(half, modes, k=3)
    assert swapped["recall"] > 0.9 and 0.45 <= swapped["precision"] <= 0.5
    # chunked k-NN radii equal a brute-force sort
    x = rng.normal(size=(37, 3))
    brute = np.sort(((x[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, 3]
    np.testing.assert_allclose(frechet.knn_radii(x, 3, chunk=8), brute, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="need more than 3 samples"):
        frechet.knn_radii(x[:3], 3)


def test_sharded_feature_fn_and_accumulate():
    assert len(jax.devices()) == 8
    w = np.random.default_rng(3).normal(size=(12, 6)).astype(np.float32)
    apply = lambda p, x: x.reshape(x.shape[0], -1).astype(np.float32) @ p  # noqa: E731
    images = np.random.default_rng(4).integers(0, 256, size=(21, 2, 2, 3), dtype=np.uint8)
    want = images.reshape(21, -1).astype(np.float32) @ w
    fn = frechet.ShardedFeatureFn(apply, w)
    np.testing.assert_allclose(fn(images), want, rtol=1e-5)  # 21 rows: padded to 24 over 8 devices
    chunked = frechet.ShardedFeatureFn(apply, w, batch_size=8)
    np.testing.assert_allclose(chunked(images), want, rtol=1e-5)
    stats, kept = frechet.accumulate(chunked, (images[i:i + 5] for i in range(0, 21, 5)), reservoir=10)
    np.testing.assert_allclose(stats.mean, want.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.cov, np.cov(want, rowvar=False), rtol=1e-4)
    assert kept.shape == (10, 6)
    assert all(any(np.allclose(row, r, rtol=1e-5) for r in want) for row in kept)
    with pytest.raises(ValueError, match="multiple of the 8 local devices"):
        frechet.ShardedFeatureFn(apply, w, batch_size=12)


def test_reservoir_is_uniform():
    counts = np.zeros(20)
    for seed in range(300):
        r = frechet.FeatureReservoir(5, seed=seed)
        for i in range(0, 20, 3):
            r.add(np.arange(i, min(i + 3, 20), dtype=np.float32)[:, None])
        counts[r.features()[:, 0].astype(int)] += 1
    # each of the 20 rows is kept with probability 5/20: 75 expected per row out of 300 runs
    assert counts.sum() == 1500
    assert np.abs(counts - 75).max() < 35
