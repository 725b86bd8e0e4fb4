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


@pytest.mark.parametrize("impl", [None, "xla", "explicit", "cudnn", "cudnn_padded"])
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
    if impl in ("cudnn", "cudnn_padded"):  # unmasked, 64 queries: the padded path's own shapes, here its fallback
        q64 = rng.normal(size=(2, 64, 3, 8)).astype(np.float32)
        got = dot_product_attention(jnp.asarray(q64), jnp.asarray(k), jnp.asarray(v), implementation=impl)
        np.testing.assert_allclose(np.asarray(got), _reference(q64, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_batch_chunked_cpu_attention_matches_formula_and_gradients(is_causal):
    """The CPU path splits the batch into chunks whose scores fit `score_bytes`: the same values and
    gradients as the one-shot explicit attention, also when the batch is sharded over host devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from ldm_jax.models.attention import _batch_chunked_attention, _explicit_attention

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(12, 10, 2, 4)).astype(np.float32)) for _ in range(3))
    per_image = 2 * 10 * 10 * 4
    for budget, chunks in ((4 * per_image, 3), (5 * per_image, 3), (per_image, 12), (12 * per_image, 1)):
        fn = jax.jit(lambda q, k, v, b=budget: _batch_chunked_attention(q, k, v, is_causal=is_causal, score_bytes=b))
        assert str(fn.lower(q, k, v).as_text()).count("while") == (chunks > 1)
        want = _explicit_attention(q, k, v, is_causal=is_causal)
        np.testing.assert_allclose(np.asarray(fn(q, k, v)), np.asarray(want), rtol=1e-5, atol=1e-6)
        mask = np.tril(np.ones((10, 10), bool)) if is_causal else None
        np.testing.assert_allclose(np.asarray(fn(q, k, v)), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)

        def loss(f):
            return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
        got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
        ref = jax.grad(loss(lambda *a: _explicit_attention(*a, is_causal=is_causal)), argnums=(0, 1, 2))(q, k, v)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)

    mesh = jax.make_mesh((2,), ("data",))
    sharded = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (q, k, v)]
    fn = jax.jit(lambda q, k, v: _batch_chunked_attention(q, k, v, is_causal=is_causal, score_bytes=2 * per_image))
    out = fn(*sharded)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(out), np.asarray(_explicit_attention(q, k, v, is_causal=is_causal)),
                               rtol=1e-5, atol=1e-6)
    # the default CPU path goes through the chunked form (no mask)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, is_causal=is_causal)),
                               np.asarray(fn(q, k, v)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [7, 64, 77])
def test_length_padded_attention_is_the_same_function(length):
    """Keys padded to a multiple of 64 and masked by length (what "cudnn_padded" hands cuDNN, run here through
    jax's XLA path with the same `key_value_seq_lengths` arguments): same values as unpadded attention, and
    the same gradients for q, k and v (nothing leaks into or out of the padded positions)."""
    import jax

    from ldm_jax.models.attention import _explicit_attention, length_padded_attention

    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(3, 64, 2, 8)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(3, length, 2, 8)).astype(np.float32)) for _ in range(2))
    got = length_padded_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v), rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * jnp.arange(8.0))
    padded = jax.grad(loss(lambda *a: length_padded_attention(*a, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
    plain = jax.grad(loss(_explicit_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(padded, plain):
        assert g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
