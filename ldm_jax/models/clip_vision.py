"""The CLIP image tower (ViT, Radford et al. 2021; Dosovitskiy et al. 2021), as transformers' CLIPVisionModel.

    x (B, S, S, 3), normalized with CLIP's mean/std -> patches p x p -> linear embedding (conv, no bias)
    tokens = [class_embedding, patch_1 .. patch_N] + position_embedding      (N = (S / p)^2)
    h = encoder(LN_pre(tokens))          pre-LN layers with bidirectional attention
    pooled = LN_post(h[:, 0]);  image_embeds = pooled @ W_proj              (projection has no bias)

``CLIPVisionEncoder(cfg).apply(p, pixels)`` returns `CLIPVisionOutput(last_hidden_state, pooled,
image_embeds)`; image_embeds is None when ``cfg.projection_dim`` is 0. Weights: ``ldm_jax.convert.hf_vision``.
`preprocess` turns images of any size into the model's normalized input.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.text import MLP, SelfAttention, activation
from ldm_jax.types import Array, ConfigError, FrozenConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(FrozenConfig):
    """Fields of transformers' CLIPVisionConfig; `projection_dim` 0 means no visual projection."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"CLIPVisionConfig: hidden_size {self.hidden_size} is not divisible by "
                              f"num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        activation(self.hidden_act)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def vit_b32() -> CLIPVisionConfig:
    """OpenAI CLIP ViT-B/32 image tower (87.8M parameters)."""
    return CLIPVisionConfig()


def vit_l14() -> CLIPVisionConfig:
    """OpenAI CLIP ViT-L/14 image tower (the SD-1.x CLIP's vision half)."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                            patch_size=14, projection_dim=768)


def tiny_clip_vision() -> CLIPVisionConfig:
    """A 2-layer, 32-wide tower on 32x32 images with 8x8 patches, for tests."""
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32,
                            patch_size=8, projection_dim=24)


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: Array  # (B, N + 1, D), before the post-LN
    pooled: Array  # (B, D)
    image_embeds: Array | None  # (B, projection_dim)


def _ln(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), name=name,
    )


class CLIPVisionLayer(nn.Module):
    """Pre-LN transformer layer with bidirectional attention: x + attn(LN1 x), then x + mlp(LN2 x)."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = _ln(cfg.layer_norm_eps, dt, pdt, "ln_1")(x)
        x = x + SelfAttention(cfg.num_heads, False, dt, pdt, self.attention_impl, name="attn")(h)
        h = _ln(cfg.layer_norm_eps, dt, pdt, "ln_2")(x)
        x = x + MLP(cfg.intermediate_size, cfg.hidden_act, dt, pdt, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CLIPVisionEncoder(nn.Module):
    """CLIP ViT image tower; input (B, S, S, C) NHWC already normalized (see `preprocess`)."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixels: Array) -> CLIPVisionOutput:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"CLIPVisionEncoder expects images (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(pixels.shape)}; resize with ldm_jax.models.clip_vision.preprocess")
        p, d = cfg.patch_size, cfg.hidden_size
        init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes)  # noqa: E731
        patches = nn.Conv(d, (p, p), (p, p), padding="VALID", use_bias=False, dtype=dt, param_dtype=pdt,
                          kernel_init=init((None, None, "conv_in", "embed")), name="patch_embedding")
        x = patches(pixels.astype(dt))
        x = x.reshape(x.shape[0], -1, d)
        cls = self.param("class_embedding", init(("embed",)), (d,), pdt)
        pos = self.param("position_embedding", init((None, "embed")), (cfg.num_positions, d), pdt)
        cls = jnp.broadcast_to(cls.astype(dt), (x.shape[0], 1, d))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(dt)
        x = _ln(cfg.layer_norm_eps, dt, pdt, "pre_norm")(x)
        for i in range(cfg.num_layers):
            x = CLIPVisionLayer(cfg, dt, pdt, self.attention_impl, name=f"layers_{i}")(x)
        pooled = _ln(cfg.layer_norm_eps, dt, pdt, "post_norm")(x[:, 0])
        embeds = None
        if cfg.projection_dim:
            embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=dt, param_dtype=pdt,
                              kernel_init=init(("embed", "mlp")), name="projection")(pooled)
        return CLIPVisionOutput(x, pooled, embeds)


def preprocess(images: Array, image_size: int) -> Array:
    """(B, H, W, 3) uint8 or float in [-1, 1] -> CLIP input (B, S, S, 3) normalized by CLIP's mean and std.

    As CLIP's processor: resize the shorter side to S (bicubic; antialiased when shrinking), center crop
    S x S, then (x - mean) / std on [0, 1] pixels. PIL's bicubic and ours differ by a few 1e-3 in pixel
    values, which moves CLIP scores by far less than their sampling noise.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (B, H, W, 3), got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32) / 255.0 if jnp.issubdtype(images.dtype, jnp.integer) else (
        (images.astype(jnp.float32) + 1.0) * 0.5)
    b, h, w, _ = x.shape
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, 3), method="cubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
