"""Scaled dot-product attention shared by every network in ldm_jax.

Layout is (batch, length, heads, head_dim), the layout of ``jax.nn.dot_product_attention``, so the
cuDNN flash kernel is used on GPU when it applies; ``implementation="xla"`` (or any failure of the
fused path to apply) falls back to an explicit einsum/softmax computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.types import Array


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    implementation: str | None = None,
) -> Array:
    """softmax(q k^T / sqrt(d) + mask) v over (B, L, H, D) inputs; returns (B, Lq, H, D).

    `mask` is boolean, broadcastable to (B, H, Lq, Lk), True where attention is allowed.
    `implementation`: None (let JAX choose: cuDNN on GPU where it can, XLA elsewhere), "cudnn",
    "xla", or "explicit" (plain einsum with float32 softmax; always available).
    """
    if implementation != "explicit":
        try:
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
            )
        except (ValueError, NotImplementedError, TypeError):
            if implementation is not None:
                raise
    return _explicit_attention(q, k, v, mask=mask, is_causal=is_causal)


def _explicit_attention(q, k, v, *, mask=None, is_causal=False):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if is_causal:
        lq, lk = q.shape[1], k.shape[1]
        causal = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
