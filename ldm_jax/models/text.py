"""Text encoders for conditioning: the CLIP text transformer (SD 1.x / 2.x) and BERT (MiniLM default).

Both are Flax linen modules over integer token ids of shape (B, L) returning hidden states (B, L, D).
They are used frozen (no dropout). Weights come from ``ldm_jax.convert.hf``; the high-level bundle of
module + params + tokenizer is ``ldm_jax.models.text_encoder.TextEncoder``.

Parameter axes carry the logical names of ``ldm_jax.models``: "vocab" (token table rows), "embed" (the
model width), "mlp" (the feed-forward hidden width), "heads" (the concatenated attention heads) and
"norm" (LayerNorm scale/bias); activations are constrained to ("batch", "length", "embed"). Without a
mesh and rules these annotations are no-ops. ``init`` returns boxed parameters; ``nn.meta.unbox`` strips
them, and the converters return plain arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import dot_product_attention
from ldm_jax.types import Array, ConfigError, FrozenConfig, nearest

_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_INIT_STD = 0.02


def activation(name: str) -> Callable[[Array], Array]:
    """Feed-forward nonlinearity by its transformers ``hidden_act`` name.

    quick_gelu(x) = x * sigmoid(1.702 x) (OpenAI CLIP); gelu is the exact erf form
    x * Phi(x) (Hendrycks & Gimpel 2016; OpenCLIP, BERT); gelu_new / gelu_pytorch_tanh are its tanh
    approximation.
    """
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ConfigError(f"unknown hidden_act '{name}'{nearest(name, _ACTIVATIONS)}; choose from {_ACTIVATIONS}")


def _check_width(cls: str, hidden_size: int, num_heads: int, hidden_act: str) -> None:
    if hidden_size % num_heads:
        raise ConfigError(f"{cls}: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    activation(hidden_act)


# ---------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(FrozenConfig):
    """The CLIP text transformer (Radford et al. 2021), as in transformers' ``CLIPTextModel``.

    `eos_token_id` selects the pooled token: 2 (configs older than transformers PR 24773) means "the
    position of the largest id" (OpenAI's rule, EOS being the largest id), anything else means "the first
    position holding eos_token_id".
    `projection_dim`: set for transformers' ``CLIPTextModelWithProjection`` (SDXL's second encoder): the
    pooled output is then multiplied by a bias-free `text_projection` (D -> projection_dim), i.e. it is
    transformers' ``text_embeds``.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_length: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None

    def __post_init__(self):
        _check_width("CLIPTextConfig", self.hidden_size, self.num_heads, self.hidden_act)
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"CLIPTextConfig.projection_dim={self.projection_dim}: use None or a positive width")


@dataclasses.dataclass(frozen=True)
class BertConfig(FrozenConfig):
    """BERT (Devlin et al. 2019) as in transformers' ``BertModel``: absolute positions, post-LN layers."""

    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    add_pooler: bool = False  # tanh(W h_[CLS] + b), BertModel's pooler; unused for conditioning

    def __post_init__(self):
        _check_width("BertConfig", self.hidden_size, self.num_heads, self.hidden_act)


def clip_l14() -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14 text tower, the SD-1.x text encoder (123,060,480 parameters)."""
    return CLIPTextConfig()


def openclip_h14_text() -> CLIPTextConfig:
    """OpenCLIP ViT-H/14 text tower as shipped with SD-2.x (340,387,840 parameters).

    SD-2.x conditions on the penultimate layer of the 24-layer tower followed by the final LayerNorm;
    the diffusers/transformers export drops the last layer, so this config has 23 layers and its plain
    output (last layer + final LN) is exactly that conditioning.
    """
    return CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu"
    )


def openclip_bigg_text() -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14 text tower with its projection, SDXL's second text encoder (transformers'
    ``CLIPTextModelWithProjection``; 694,659,840 parameters): 32 layers, width 1280, 20 heads, exact gelu.

    SDXL conditions on its penultimate layer *without* the final LayerNorm
    (``hidden_layer=-2, final_norm=False``) and on the projected pooled output (``return_pooled=True``).
    """
    return CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu", projection_dim=1280
    )


def tiny_clip_text(vocab_size: int = 49408, projection_dim: int | None = None) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text encoder for tests and CPU runs (works with the real CLIP tokenizer)."""
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          projection_dim=projection_dim)


def minilm_l6() -> BertConfig:
    """all-MiniLM-L6-v2 (sentence-transformers): 6 layers, 384 wide, 12 heads; 22,565,376 parameters
    (22.7M with the unused BERT pooler, which `load_minilm` keeps)."""
    return BertConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=12)


def tiny_bert(vocab_size: int = 30522) -> BertConfig:
    """A 2-layer, 32-wide BERT for tests."""
    return BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=64)


# ---------------------------------------------------------------------------- building blocks
def _dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def _layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def _embed(num: int, features: int, axes: tuple, dtype, param_dtype, name: str) -> nn.Embed:
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes),
        name=name,
    )


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d_head) + mask) V, then an output projection.

    Vaswani et al. 2017. `mask` is boolean, broadcastable to (B, H, L, L), True where allowed.
    """

    num_heads: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        b, l, d = x.shape
        head_dim = d // self.num_heads

        def heads(name):
            y = _dense(d, ("embed", "heads"), self.dtype, self.param_dtype, name)(x)
            return y.reshape(b, l, self.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        y = dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.attention_impl)
        y = y.reshape(b, l, d)
        return _dense(d, ("heads", "embed"), self.dtype, self.param_dtype, "out")(y)


class MLP(nn.Module):
    """Position-wise feed-forward: fc2(act(fc1(x)))."""

    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _dense(self.intermediate_size, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x)
        h = activation(self.hidden_act)(h)
        return _dense(x.shape[-1], ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)


def _check_ids(who: str, input_ids: Array, max_length: int) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"{who}: input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{who}: input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > max_length:
        raise ValueError(
            f"{who}: input length {input_ids.shape[1]} exceeds the model's {max_length} positions; "
            f"tokenize with max_length={max_length}"
        )


def _key_mask(attention_mask: Array | None, input_ids: Array) -> Array | None:
    """(B, L) 1/0 padding mask -> boolean (B, 1, 1, L) key mask."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    return attention_mask.astype(bool)[:, None, None, :]


# ---------------------------------------------------------------------------- CLIP
class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN1 x), then x + mlp(LN2 x) (causal self-attention)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = _layer_norm(cfg.layer_norm_eps, dt, pdt, "ln_1")(x)
        x = x + SelfAttention(cfg.num_heads, True, dt, pdt, self.attention_impl, name="attn")(h, mask)
        h = _layer_norm(cfg.layer_norm_eps, dt, pdt, "ln_2")(x)
        x = x + MLP(cfg.intermediate_size, cfg.hidden_act, dt, pdt, name="mlp")(h)
        return _constrain(x)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: token + learned position embeddings, causal pre-LN layers, final LayerNorm.

    ``apply(params, input_ids)`` returns the last hidden states after the final LayerNorm, (B, L, D): the
    SD-1.x conditioning. `hidden_layer` picks another layer, indexed like transformers' ``hidden_states``
    tuple (0 = embeddings, i = output of layer i, negative counts from the end: -1 = last layer,
    -2 = penultimate). As diffusers does for ``clip_skip``, the final LayerNorm is applied to the chosen
    layer too (diffusers ``clip_skip=k`` == ``hidden_layer=-(k + 1)``; "CLIP skip 2" in A1111 terms is
    ``hidden_layer=-2``); pass ``final_norm=False`` for the raw layer output (SDXL style). Layers after the
    chosen one are not computed unless `return_pooled`.

    ``return_pooled=True`` returns ``(hidden, pooled)`` where pooled (B, D) is the final-LN'd last layer at
    the EOS position (see `CLIPTextConfig.eos_token_id`), as transformers' ``pooler_output``; when the config
    has `projection_dim`, pooled is that vector times ``text_projection`` (B, projection_dim), transformers'
    ``text_embeds`` (SDXL: ``hidden_layer=-2, final_norm=False, return_pooled=True``).
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        hidden_layer: int | None = None,
        return_pooled: bool = False,
        final_norm: bool = True,
    ):
        cfg = self.config
        _check_ids("CLIPTextEncoder", input_ids, cfg.max_length)
        stop = _resolve_layer(hidden_layer, cfg.num_layers)
        length = input_ids.shape[1]
        tok = _embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), self.dtype, self.param_dtype,
                     "token_embedding")
        pos = _embed(cfg.max_length, cfg.hidden_size, (None, "embed"), self.dtype, self.param_dtype,
                     "position_embedding")
        x = _constrain(tok(input_ids) + pos(jnp.arange(length))[None])
        mask = _key_mask(attention_mask, input_ids)
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        hidden = x
        for i in range(cfg.num_layers if return_pooled else stop):
            x = layer_cls(cfg, self.dtype, self.param_dtype, self.attention_impl, name=f"layers_{i}")(x, mask)
            if i + 1 == stop:
                hidden = x
        norm = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "final_norm")
        out = norm(hidden) if final_norm else hidden
        projection = self._projection()
        if not return_pooled:
            if projection is not None and self.is_initializing():
                projection(jnp.zeros((1, cfg.hidden_size), self.dtype))  # init creates every parameter
            return out
        last = norm(x)
        pooled = last[jnp.arange(last.shape[0]), self._eos_position(input_ids)]
        return out, (pooled if projection is None else projection(pooled))

    def _projection(self) -> nn.Dense | None:
        if self.config.projection_dim is None:
            return None
        return nn.Dense(
            self.config.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), ("embed", "mlp")),
            name="text_projection",
        )

    def _eos_position(self, input_ids: Array) -> Array:
        if self.config.eos_token_id == 2:  # legacy configs: EOS is the largest id in the vocabulary
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)


def _resolve_layer(hidden_layer: int | None, num_layers: int) -> int:
    """transformers-style hidden_states index (0..N, or negative) -> number of layers to run."""
    if hidden_layer is None:
        return num_layers
    if not -(num_layers + 1) <= hidden_layer <= num_layers:
        raise ValueError(
            f"hidden_layer={hidden_layer} out of range for {num_layers} layers; use 0..{num_layers} "
            f"or -1 (last) .. -{num_layers + 1} (embeddings)"
        )
    return hidden_layer % (num_layers + 1)


# ---------------------------------------------------------------------------- BERT
class BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        a = SelfAttention(cfg.num_heads, False, dt, pdt, self.attention_impl, name="attn")(x, mask)
        x = _layer_norm(cfg.layer_norm_eps, dt, pdt, "attn_norm")(x + a)
        m = MLP(cfg.intermediate_size, cfg.hidden_act, dt, pdt, name="mlp")(x)
        return _constrain(_layer_norm(cfg.layer_norm_eps, dt, pdt, "mlp_norm")(x + m))


class BertEncoder(nn.Module):
    """BERT encoder: LN(word + position + token_type embeddings), then post-LN layers.

    ``apply(params, input_ids, attention_mask)`` -> last hidden states (B, L, D); padded positions are
    masked as keys but still get (meaningless) outputs. ``return_pooled=True`` (needs
    ``config.add_pooler``) also returns tanh(W h_[CLS] + b). For sentence embeddings use `mean_pool`.
    """

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, return_pooled: bool = False):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        _check_ids("BertEncoder", input_ids, cfg.max_position_embeddings)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        d = cfg.hidden_size
        x = (
            _embed(cfg.vocab_size, d, ("vocab", "embed"), dt, pdt, "word_embeddings")(input_ids)
            + _embed(cfg.type_vocab_size, d, (None, "embed"), dt, pdt, "token_type_embeddings")(token_type_ids)
            + _embed(cfg.max_position_embeddings, d, (None, "embed"), dt, pdt, "position_embeddings")(
                jnp.arange(input_ids.shape[1]))[None]
        )
        x = _constrain(_layer_norm(cfg.layer_norm_eps, dt, pdt, "embed_norm")(x))
        mask = _key_mask(attention_mask, input_ids)
        layer_cls = nn.remat(BertLayer) if self.remat else BertLayer
        for i in range(cfg.num_layers):
            x = layer_cls(cfg, dt, pdt, self.attention_impl, name=f"layers_{i}")(x, mask)
        if not return_pooled:
            return x
        if not cfg.add_pooler:
            raise ValueError("BertEncoder: return_pooled=True needs a config with add_pooler=True")
        pooled = jnp.tanh(_dense(d, ("embed", "mlp"), dt, pdt, "pooler")(x[:, 0]))
        return x, pooled


def mean_pool(hidden: Array, mask: Array) -> Array:
    """Mean of the hidden states over real tokens: sum_l m_l h_l / max(sum_l m_l, 1e-9), in float32.

    The sentence embedding of sentence-transformers' MiniLM (Reimers & Gurevych 2019); L2-normalize the
    result for cosine similarity.
    """
    m = mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def text_param_shapes(module: nn.Module, length: int = 1) -> dict:
    """Unboxed parameter shapes of a text encoder (a tree of ShapeDtypeStruct), without allocating weights."""
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    kwargs = {"return_pooled": True} if getattr(module.config, "add_pooler", False) else {}
    shapes = jax.eval_shape(lambda i: module.init(jax.random.key(0), i, **kwargs), ids)
    return nn.meta.unbox(shapes)["params"]
