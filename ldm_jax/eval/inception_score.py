"""Inception Score (Salimans et al. 2016) from Inception-v3 classifier logits, with torch-fidelity's conventions.

For images x_1..x_N with class posteriors p(y|x_i) = softmax(z_i), the score of a set S of n images is

    IS(S) = exp( (1/n) sum_{i in S} KL( p(y|x_i) || p_S(y) ) ),   p_S(y) = (1/n) sum_{i in S} p(y|x_i),

i.e. exp of the mutual information between image and label under the set's empirical distribution. It ranges
from 1 (every image gets the same posterior) to the number of classes (confident and evenly spread labels).
The N images are cut into `splits` consecutive chunks and the mean and standard deviation of the chunk scores
are reported.

Conventions (those of torch-fidelity's ``isc_features_to_metric``, the reference for FID/KID/IS in PyTorch):

- logits: its default IS feature "logits_unbiased", z = pool @ W^T *without* the fc bias, over all 1008 outputs
  of the 2015-12-05 graph; `ldm_jax.eval.inception.inception_logits_fn` gives exactly these by default;
- chunk j (j = 0..splits-1) is rows floor(j N / splits) .. floor((j+1) N / splits) - 1, so chunks are equal when
  `splits` divides N and otherwise differ by one row; no row is dropped;
- std is the population standard deviation over the chunk scores (ddof = 0, ``np.std``);
- torch-fidelity permutes the rows before splitting (``samples_shuffle=True``, a
  ``np.random.RandomState(2020).permutation(N)``); here rows are split in their given order unless
  `shuffle_seed` is given, and ``shuffle_seed=2020`` reproduces torch-fidelity's default exactly.

Everything is computed in float64 from log-probabilities: log p(y|x) = log_softmax(z) and
log p_S(y) = logsumexp_{i in S} log p(y|x_i) - log n, so no probability is ever put through a log and a class
that every posterior gives (numerically) zero mass to contributes 0 instead of 0 * inf.
"""

from __future__ import annotations

import numpy as np


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log sum exp(x) along `axis` (dropped), shifted by the max so that nothing overflows."""
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def chunk_scores(logits: np.ndarray, splits: int = 10) -> np.ndarray:
    """IS of each of the `splits` consecutive chunks of `logits` (N, C), as float64 (splits,)."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2:
        raise ValueError(f"expected logits (N, classes), got shape {z.shape}")
    if not 1 <= splits <= len(z):
        raise ValueError(f"splits must be in [1, N={len(z)}], got {splits}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    log_p = z - _logsumexp(z, axis=1)[:, None]  # log p(y|x_i)
    bounds = [j * len(z) // splits for j in range(splits + 1)]
    scores = np.empty(splits)
    for j in range(splits):
        chunk = log_p[bounds[j]:bounds[j + 1]]
        log_marginal = _logsumexp(chunk, axis=0) - np.log(len(chunk))  # log p_S(y)
        kl = np.sum(np.exp(chunk) * (chunk - log_marginal), axis=1)  # KL(p(y|x_i) || p_S(y)), i in S
        scores[j] = np.exp(kl.mean())
    return scores


def inception_score(logits: np.ndarray, splits: int = 10, *, shuffle_seed: int | None = None
                    ) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` chunks of classifier logits (N, C); see the module doc.

    `logits` are torch-fidelity's "logits_unbiased" for parity with it (``inception_logits_fn(weights)``).
    With `shuffle_seed` the rows are first permuted by ``np.random.RandomState(shuffle_seed).permutation(N)``
    (2020 is torch-fidelity's default); without it consecutive rows form the chunks.
    """
    z = np.asarray(logits)
    if shuffle_seed is not None:
        z = z[np.random.RandomState(shuffle_seed).permutation(len(z))]
    scores = chunk_scores(z, splits)
    return float(np.mean(scores)), float(np.std(scores))
