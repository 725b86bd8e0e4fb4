"""Fréchet distance, KID and precision/recall over any feature extractor, with streaming statistics.

A feature function maps images (B, H, W, 3) (uint8, or float in [-1, 1]) to features (B, F). The Fréchet
distance only needs each set's mean and covariance, so `FeatureStats` keeps a running count, mean and
scatter matrix in float64 on the host and merges batches with the parallel update of Chan, Golub &
LeVeque (1979): no features are hoarded. KID and precision/recall need samples; `FeatureReservoir` keeps a
uniform random subset of bounded size (reservoir sampling, Vitter 1985).

`ShardedFeatureFn` jits a feature function over a ("data",) mesh of all devices: the batch is split over
devices, parameters are replicated, and each host gets back the rows it fed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.types import Array, PyTree

FeatureFn = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- streaming statistics
@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Count n, mean mu and scatter M2 = sum_i (x_i - mu)(x_i - mu)^T of a feature set, in float64.

    Merging two sets a, b (Chan et al. 1979): n = n_a + n_b, delta = mu_b - mu_a,
    mu = mu_a + delta n_b / n, M2 = M2_a + M2_b + delta delta^T n_a n_b / n. The covariance is
    M2 / (n - 1), the unbiased estimate numpy's ``np.cov`` (and pytorch-fid) use.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, F), got shape {x.shape}")
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        centered = x - mean
        return cls(len(x), mean, centered.T @ centered)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        return self.m2 / (self.count - 1)

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {self.dim}-d and {other.dim}-d features")
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return FeatureStats(n, mean, m2)

    def update(self, features) -> FeatureStats:
        """Statistics of this set plus the rows of `features` (N, F)."""
        return self.merge(FeatureStats.from_features(features))

    def all_processes(self) -> FeatureStats:
        """Merges the statistics of every JAX process (a no-op on one process)."""
        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils

        counts, means, m2s = multihost_utils.process_allgather(
            (np.asarray([self.count], np.float64), self.mean, self.m2))
        out = FeatureStats.empty(self.dim)
        for c, mu, m2 in zip(counts, means, m2s):
            out = out.merge(FeatureStats(int(c[0]), mu, m2))
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes an .npz with ``mu`` and ``sigma`` (pytorch-fid's reference format) plus ``count``."""
        np.savez(path, mu=self.mean, sigma=self.cov, count=self.count)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Reads an .npz with ``mu`` and ``sigma`` (ours or pytorch-fid's; count defaults to 2 there)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no feature statistics at '{path}': compute them with FeatureStats.save")
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"'{path}' lacks 'mu'/'sigma' arrays; keys are {list(f.keys())}")
            count = int(f["count"]) if "count" in f else 2
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            return cls(count, mu, sigma * (count - 1))


@dataclasses.dataclass
class FeatureReservoir:
    """A uniform random subset of at most `capacity` rows of a feature stream (Algorithm R, Vitter 1985)."""

    capacity: int
    seed: int = 0
    seen: int = 0
    rows: list = dataclasses.field(default_factory=list)

    def add(self, features) -> None:
        rng = np.random.default_rng([self.seed, self.seen])
        for row in np.asarray(features, np.float32):
            if len(self.rows) < self.capacity:
                self.rows.append(row)
            else:
                j = int(rng.integers(self.seen + 1))
                if j < self.capacity:
                    self.rows[j] = row
            self.seen += 1

    def features(self) -> np.ndarray:
        return np.stack(self.rows) if self.rows else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------- Fréchet distance
def _clip_rank(w: np.ndarray) -> np.ndarray:
    """Eigenvalues below numpy's rank tolerance (max |w| * n * eps) are round-off: set them to 0."""
    tol = np.abs(w).max(initial=0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(_clip_rank(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})   (Dowson & Landau 1982; FID: Heusel et al.
    2017). Tr((S1 S2)^{1/2}) is the sum of the square roots of the eigenvalues of S1 S2, which equal those
    of the symmetric PSD matrix R S2 R with R = S1^{1/2} (eig(AB) = eig(BA) with A = R, B = R S2). We
    take them with ``eigh`` instead of ``scipy.linalg.sqrtm(S1 @ S2)``: the Schur-based sqrtm of the
    non-symmetric product can return complex parts or fail on rank-deficient covariances (fewer samples
    than features), which pytorch-fid papers over by adding eps * I; the symmetric route needs no such
    fix and agrees with sqrtm wherever the latter is accurate. Eigenvalues under numpy's rank tolerance are
    round-off and count as 0 (else sqrt turns each 1e-16 into 1e-8).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    r = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(0.5 * ((r @ s2 @ r) + (r @ s2 @ r).T))
    tr_covmean = np.sqrt(_clip_rank(eig)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
    """`frechet_distance` between two `FeatureStats`."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


# ---------------------------------------------------------------------------- KID
def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3, the KID kernel (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6) with the cubic polynomial kernel.

    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
        - 2 sum_{i,j} k(x_i, y_j) / (m n)
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_inception_distance(x, y, *, subset_size: int = 1000, num_subsets: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std of unbiased MMD^2 over `num_subsets` random subsets.

    Each subset draws `subset_size` rows of each set without replacement (clamped to the smaller set, as
    clean-fid does); the std is the population std over subsets, as torch-fidelity reports it.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F, got {x.shape} and {y.shape}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------- precision / recall
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T, 0.0)


def knn_radii(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row."""
    if len(x) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} samples, got {len(x)}")
    return np.concatenate([np.partition(_sq_dists(x[i:i + chunk], x), k, axis=1)[:, k]
                           for i in range(0, len(x), chunk)])


def _in_manifold(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray,
                 chunk: int = 1024) -> np.ndarray:
    return np.concatenate([(_sq_dists(queries[i:i + chunk], manifold) <= radii[None]).any(axis=1)
                           for i in range(0, len(queries), chunk)])


def precision_recall(real, fake, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN hyperspheres.

    precision = share of fake samples inside some real sample's ball (radius: distance to its k-th nearest
    real neighbour); recall = share of real samples inside some fake sample's ball.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    precision = _in_manifold(real, knn_radii(real, k), fake).mean()
    recall = _in_manifold(fake, knn_radii(fake, k), real).mean()
    return {"precision": float(precision), "recall": float(recall)}


# ---------------------------------------------------------------------------- sharded feature functions
def data_mesh(devices=None) -> Mesh:
    """A one-axis ("data",) mesh over `devices` (default: all devices of all processes)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


class ShardedFeatureFn:
    """Host callable images -> features, jitted with the batch split over a ("data",) mesh.

    `apply_fn(params, images) -> (B, F)` must be jittable; `params` are replicated once. A batch is padded
    (by repeating its last image) to a multiple of the local device count, or to `batch_size` when given
    (larger inputs are cut into chunks of `batch_size`), so that one compiled program serves every call.
    On several processes each host passes its own images and gets back their features.
    """

    def __init__(self, apply_fn: Callable[[PyTree, Array], Array], params: PyTree, *,
                 mesh: Mesh | None = None, batch_size: int | None = None):
        self.mesh = mesh if mesh is not None else data_mesh()
        self._local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        if batch_size is not None and batch_size % self._local:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {self._local} local devices")
        self.batch_size = batch_size
        self._data = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self._fn = jax.jit(apply_fn, out_shardings=self._data)

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"expected images (B, H, W, C), got shape {images.shape}")
        step = self.batch_size or len(images)
        return np.concatenate([self._run(images[i:i + step]) for i in range(0, max(len(images), 1), step)])

    def _run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        target = self.batch_size or -(-n // self._local) * self._local
        if n < target:
            images = np.concatenate([images, np.repeat(images[-1:], target - n, axis=0)])
        x = jax.make_array_from_process_local_data(self._data, images)
        out = self._fn(self.params, x)
        shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])[:n]


def accumulate(feature_fn: FeatureFn, batches: Iterable, *, reservoir: int = 0,
               seed: int = 0) -> tuple[FeatureStats, np.ndarray | None]:
    """Feature statistics (and a random subset of up to `reservoir` feature rows) of an image stream.

    `batches` yields image arrays (B, H, W, C) or dicts with an "image" entry. On several processes every
    process must call this (the statistics are merged across processes); the kept rows stay process-local.
    """
    stats, keep = None, FeatureReservoir(reservoir, seed) if reservoir else None
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch
        feats = np.asarray(feature_fn(images), np.float64)
        stats = FeatureStats.from_features(feats) if stats is None else stats.update(feats)
        if keep is not None:
            keep.add(feats)
    if stats is None:
        raise ValueError("the image stream was empty")
    return stats.all_processes(), (keep.features() if keep is not None else None)


def fid_from_features(real, fake) -> float:
    """Fréchet distance between two feature arrays (N, F) (one-shot; see `FeatureStats` for streams)."""
    return stats_distance(FeatureStats.from_features(real), FeatureStats.from_features(fake))


def to_unit_range(images: Array) -> Array:
    """uint8 [0, 255] or float [-1, 1] images -> float32 [0, 1] (inside jit)."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return (images.astype(jnp.float32) + 1.0) * 0.5
