"""Scaled dot-product attention shared by every network in ldm_jax.

Layout is (batch, length, heads, head_dim), the layout of ``jax.nn.dot_product_attention``, so the
cuDNN flash kernel is used on GPU when it applies; ``implementation="xla"`` (or any failure of the
fused path to apply) falls back to an explicit einsum/softmax computed in float32.

The modules below (multi-head attention, GEGLU feed-forward, the transformer block and the spatial
transformer of the Stable-Diffusion U-Net, the autoencoder's single-head spatial self-attention) all go
through ``dot_product_attention``. Parameter names follow diffusers (``to_q``, ``to_out_0``, ``ff/net_0``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import GroupNorm, LayerNorm, dense, maybe_remat, sequence_constraint
from ldm_jax.types import Array

Dtype = Any


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
    `implementation`: None (let JAX choose; on CPU the explicit form, which XLA:CPU runs faster), "cudnn" (the
    flash kernel wherever cuDNN accepts the shapes, XLA for the rest, e.g. cross-attention to 77 tokens),
    "cudnn_padded" (as "cudnn", and keys of other lengths zero-padded to a multiple of 64 and masked by length
    so that cross-attention runs on the flash kernel too), "xla", or "explicit" (heads-major einsums with a
    float32 softmax; always available).
    """
    if implementation in ("cudnn", "cudnn_padded"):
        # flash kernel where cuDNN takes the shapes, else XLA. Decided from the shapes, not only by catching
        # cuDNN's refusal: under remat its backward-pass check ("Unsupported sequence length Q 4096, KV 77", H200,
        # jax 0.11.2) fires outside this trace. "cudnn_padded" makes any key length acceptable by padding.
        pad_keys = implementation == "cudnn_padded" and mask is None and not is_causal
        if q.shape[1] % 64 == 0 and (pad_keys or k.shape[1] % 64 == 0):
            try:
                if pad_keys:
                    return length_padded_attention(q, k, v, implementation="cudnn")
                return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn")
            except (ValueError, NotImplementedError, TypeError, RuntimeError):  # e.g. no cuDNN (CPU, TPU)
                pass
        implementation = None
    if implementation is None and jax.default_backend() == "cpu":
        # XLA:CPU runs the heads-major einsums below faster than jax.nn's XLA path: forward 3.3 vs 6.5 ms, forward +
        # backward 10.4 vs 14.1 ms for 16 x 256 tokens x 32 channels (experiments/benchmarks/README.md), and
        # faster still a few images at a time once the score tensor outgrows the caches
        if mask is None:
            return _batch_chunked_attention(q, k, v, is_causal=is_causal)
        implementation = "explicit"
    if implementation != "explicit":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)
        except (ValueError, NotImplementedError, TypeError):
            if implementation is not None:
                raise
    return _explicit_attention(q, k, v, mask=mask, is_causal=is_causal)


def length_padded_attention(q, k, v, *, implementation: str | None = "cudnn", multiple: int = 64) -> Array:
    """Attention with keys and values zero-padded to a multiple of `multiple` positions, the padding masked out
    through `key_value_seq_lengths`: the same function as unpadded attention (padded keys get zero weight and zero
    gradient), in shapes the cuDNN flash kernel takes (77 text tokens -> 128)."""
    length = k.shape[1]
    pad = -length % multiple
    if not pad:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    return jax.nn.dot_product_attention(q, jnp.pad(k, widths), jnp.pad(v, widths), key_value_seq_lengths=lengths,
                                        implementation=implementation)


# bytes of float32 scores one chunk of the batch may hold on CPU (about what the caches keep): in the benchmark
# U-Net at batch 64 (16 MiB of scores per self-attention), 10 guided DDIM steps take 9.97 instead of 11.05 s and
# a training step 2.89 instead of 2.98 s; batch 16 within noise (experiments/benchmarks/cpu_attention_chunks.py)
CPU_SCORE_BYTES = 4 << 20


def _batch_chunked_attention(q, k, v, *, is_causal=False, score_bytes: int | None = None):
    """The explicit attention over chunks of the batch (`lax.map`, each chunk rematerialized in the backward
    pass) so that one chunk's score tensor stays within `score_bytes` (default `CPU_SCORE_BYTES`); unchunked
    when the whole batch fits.

    Chunk j takes images j, j + n, j + 2n, ... (n chunks), so a batch sharded over devices stays evenly spread
    in every chunk."""
    batch, per_image = q.shape[0], q.shape[2] * q.shape[1] * k.shape[1] * 4
    score_bytes = CPU_SCORE_BYTES if score_bytes is None else score_bytes
    size = max([c for c in range(1, batch + 1) if batch % c == 0 and c * per_image <= score_bytes] or [1])
    if size == batch:
        return _explicit_attention(q, k, v, is_causal=is_causal)
    n = batch // size

    def split(a):  # (B, ...) -> (n, size, ...), image j + i * n at [j, i]
        return jnp.swapaxes(a.reshape(size, n, *a.shape[1:]), 0, 1)

    body = jax.checkpoint(lambda qkv: _explicit_attention(*qkv, is_causal=is_causal))
    out = jax.lax.map(body, (split(q), split(k), split(v)))
    return jnp.swapaxes(out, 0, 1).reshape(batch, *out.shape[2:])


def _explicit_attention(q, k, v, *, mask=None, is_causal=False):
    scale = q.shape[-1] ** -0.5
    # heads-major operands: batched matmuls over (B, H) with contiguous (L, D) blocks
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if is_causal:
        lq, lk = q.shape[2], k.shape[2]
        causal = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


# ---------------------------------------------------------------------------- modules
class MultiHeadAttention(nn.Module):
    """Multi-head (cross-)attention (Vaswani et al. 2017) on (B, L, D) sequences.

    q = x Wq, k = c Wk, v = c Wv (c = x for self-attention), split into `num_heads` heads of `head_dim`;
    out = concat_h(softmax(q_h k_h^T / sqrt(head_dim)) v_h) Wo + bo.
    """

    num_heads: int
    head_dim: int
    out_features: int | None = None
    qkv_bias: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context.astype(self.dtype)
        inner = self.num_heads * self.head_dim
        q = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_k", **kw)(context)
        v = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_v", **kw)(context)
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)
        q, k, v = (nn.with_logical_constraint(split(t), ("batch", "length", "heads", "kv")) for t in (q, k, v))
        o = dot_product_attention(q, k, v, implementation=self.implementation)
        o = o.reshape(*o.shape[:2], inner)
        return dense(self.out_features or x.shape[-1], ("heads", "embed"), name="to_out_0", **kw)(o)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): h, g = split(x W + b); out = h * gelu(g), exact erf gelu."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(2 * self.features, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward: out = GEGLU(x) W2 + b2 with hidden width `mult` * dim (parameters net_0, net_2)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        h = GEGLU(self.mult * dim, name="net_0", **kw)(x)
        return dense(dim, ("mlp", "embed"), name="net_2", **kw)(h)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block of the SD U-Net (Rombach et al. 2022, "BasicTransformerBlock"):

    x += attn1(LN1(x));  x += attn2(LN2(x), context);  x += ff(LN3(x)).
    """

    num_heads: int
    head_dim: int
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, implementation=self.implementation, **kw)
        x = x + MultiHeadAttention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x))
        x = x + MultiHeadAttention(name="attn2", **attn)(LayerNorm(name="norm2", **kw)(x), context)
        x = x + FeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))
        return sequence_constraint(x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an NHWC map, conditioned on `context` (LDM's SpatialTransformer):

    h = proj_in(GN(x)) flattened to (B, H*W, heads*head_dim); h = blocks(h, context);
    out = x + proj_out(h) reshaped to (B, H, W, C). proj_in/proj_out are per-pixel linear maps; SD1
    stores them as 1x1 convs and SD2 as linear layers (identical maths; the converters handle both).
    `zero_init` starts proj_out at zero, so the block starts as the identity (LDM's zero_module).
    """

    num_heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    zero_init: bool = False
    remat: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        inner = self.num_heads * self.head_dim
        h = GroupNorm(self.norm_num_groups, epsilon=1e-6, name="norm", **kw)(x)
        h = dense(inner, ("embed", "mlp"), name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
        block = maybe_remat(TransformerBlock, self.remat)
        for i in range(self.num_layers):
            h = block(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                implementation=self.implementation,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context)
        h = dense(c, ("mlp", "embed"), zero_init=self.zero_init, name="proj_out", **kw)(h)
        return x.astype(h.dtype) + h.reshape(b, hgt, wid, c)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of an NHWC map (the autoencoder's mid block, LDM):

    out = x + to_out(softmax(q k^T / sqrt(C)) v), with q, k, v = linear maps of GN(x) flattened to (B, HW, C).
    """

    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, name="group_norm", **kw)(x)
        h = h.reshape(b, hgt * wid, c)
        # One head of width C: the same parameters as MultiHeadAttention, inlined to keep diffusers' names.
        q = dense(c, ("embed", "heads"), name="to_q", **kw)(h)
        k = dense(c, ("embed", "heads"), name="to_k", **kw)(h)
        v = dense(c, ("embed", "heads"), name="to_v", **kw)(h)
        o = dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], implementation=self.implementation)
        o = dense(c, ("heads", "embed"), name="to_out_0", **kw)(o[:, :, 0])
        return x.astype(o.dtype) + o.reshape(b, hgt, wid, c)
