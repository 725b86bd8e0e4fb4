"""dot_product_attention: every implementation equals the float64 softmax(q k^T / sqrt(d)) v formula."""

import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention import dot_product_attention


def _reference(q, k, v, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("impl", [None, "xla", "explicit", "cudnn"])
def test_attention_matches_formula(impl):
    """"cudnn" falls back to XLA where cuDNN cannot run (here: no GPU; on GPU: e.g. 77-token keys)."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 12, 3, 8)).astype(np.float32)
    k, v = rng.normal(size=(2, 2, 7, 3, 8)).astype(np.float32)
    mask = rng.random((2, 1, 12, 7)) > 0.3
    mask[..., 0] = True
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask),
                                implementation=impl)
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
