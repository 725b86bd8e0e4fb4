"""The Stable-Diffusion U-Net (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"; the UNet2DConditionModel family of diffusers), NHWC.

    emb = MLP(sinusoid(t)) [+ class_embedding(y)] [+ add_embedding(concat(text_embeds, sinusoid(time_ids)))]
    h = conv_in(x); skips = [h]
    down level l: (ResnetBlock(h, emb) [-> SpatialTransformer(h, context)]) x layers_per_block, each output
                  pushed to skips; then a stride-2 conv (pushed too), except at the last level
    mid:          ResnetBlock -> SpatialTransformer -> ResnetBlock
    [ControlNet:  skips[k] += down_residuals[k]; h += mid_residual]
    up level l:   (concat(h, skips.pop()) -> ResnetBlock [-> SpatialTransformer]) x (layers_per_block + 1);
                  then nearest 2x upsampling + conv, except at the last level
    out = conv_out(silu(GN(h)))

Timesteps are in the network's own units (SD: discrete 0..999, floats allowed); a model wrapper maps the
framework's continuous t in [0, 1] onto them.

SDXL's micro-conditioning (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution
Image Synthesis"; diffusers' ``addition_embed_type="text_time"``) enters through the `added` argument:
``added = {"text_embeds": (B, P), "time_ids": (B, N)}`` with P the pooled, projected text embedding and N the
size / crop (/ aesthetic score) numbers. Every time id gets its own sinusoid of width
`addition_time_embed_dim`; the N sinusoids are flattened, appended to text_embeds and sent through a second
two-layer MLP (`add_embedding`) whose output is added to the time embedding. Only the total width
P + N * addition_time_embed_dim (= `projection_class_embeddings_input_dim`) is fixed by the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.attention import SpatialTransformer
from ldm_jax.models.layers import (
    Downsample,
    GroupNorm,
    ResnetBlock,
    TimestepMLP,
    Upsample,
    canonical_dtype,
    check_class_labels,
    check_denoiser_inputs,
    conv,
    maybe_remat,
    per_level,
    spatial_constraint,
    timestep_embedding,
)
from ldm_jax.types import Array, ConfigError, FrozenConfig, PRNGKey, PyTree


@dataclasses.dataclass(frozen=True)
class UNetConfig(FrozenConfig):
    """Architecture of a conditional U-Net (defaults: Stable Diffusion 1.x).

    Attention heads per level: `num_heads` (an int for every level, or one per level), or, when `head_dim`
    is set, heads = channels // head_dim (SD 2.x: head_dim=64, i.e. 5, 10, 20, 20 heads).
    `attention_levels[l]` says whether down level l (and the mirrored up level) has spatial transformers.
    `num_class_embeds` adds a class embedding to the time embedding (the `y` argument).
    `addition_embed_type="text_time"` (SDXL) adds the embedding of the pooled text and the micro-conditioning
    numbers (the `added` argument); it needs `addition_time_embed_dim` (sinusoid width per number) and
    `projection_class_embeddings_input_dim` (pooled width + numbers * addition_time_embed_dim), diffusers' names.
    `transformer_layers_per_block`: one depth for all levels or one per level; the mid block uses the last
    level's depth and the up path mirrors the down path (SDXL base: (1, 2, 10)).
    `zero_init`: zero the last conv of every residual block, every transformer's proj_out and conv_out,
    so a freshly initialised network starts near the identity / zero output (LDM's zero_module).
    `attention_impl`: None (XLA), "cudnn" (flash kernel on GPU where cuDNN takes the shapes), "cudnn_padded"
    (also cross-attention, its keys padded to a multiple of 64), "xla" or "explicit".
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | tuple[int, ...] = 8
    head_dim: int | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    num_class_embeds: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    sample_size: int = 64
    zero_init: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n < 1:
            raise ConfigError("UNetConfig.block_out_channels is empty: give one channel count per level")
        if len(self.attention_levels) != n:
            raise ConfigError(
                f"UNetConfig.attention_levels has {len(self.attention_levels)} entries for {n} levels; "
                "give one bool per entry of block_out_channels"
            )
        per_level(self.num_heads, n, "UNetConfig.num_heads")
        per_level(self.transformer_layers_per_block, n, "UNetConfig.transformer_layers_per_block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"UNetConfig: channels {c} not divisible by norm_num_groups={self.norm_num_groups}")
        for c, h in zip(self.block_out_channels, self.heads_per_level()):
            if c % h:
                raise ConfigError(f"UNetConfig: channels {c} not divisible by {h} attention heads")
        self._check_addition()
        canonical_dtype(self.dtype)
        canonical_dtype(self.param_dtype)
        if self.attention_impl not in (None, "cudnn", "cudnn_padded", "xla", "explicit"):
            raise ConfigError(f"UNetConfig.attention_impl={self.attention_impl!r}: use None, 'cudnn', "
                              "'cudnn_padded', 'xla' or 'explicit'"
            )

    def _check_addition(self) -> None:
        dims = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type is None:
            if any(d is not None for d in dims):
                raise ConfigError(
                    "UNetConfig: addition_time_embed_dim / projection_class_embeddings_input_dim are set but "
                    "addition_embed_type is None; set addition_embed_type='text_time' (SDXL) or drop them"
                )
            return
        if self.addition_embed_type != "text_time":
            raise ConfigError(
                f"UNetConfig.addition_embed_type={self.addition_embed_type!r}: only None or 'text_time' (SDXL)"
            )
        if any(not isinstance(d, int) or d < 1 for d in dims):
            raise ConfigError(
                "UNetConfig: addition_embed_type='text_time' needs positive ints addition_time_embed_dim "
                f"and projection_class_embeddings_input_dim, got {dims}"
            )
        if dims[1] <= dims[0]:
            raise ConfigError(
                f"UNetConfig: projection_class_embeddings_input_dim={dims[1]} leaves no room for the pooled text "
                f"embedding next to at least one time id of width addition_time_embed_dim={dims[0]}"
            )

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads at each down level (the up path mirrors them; the mid block uses the last)."""
        if self.head_dim is not None:
            return tuple(max(1, c // self.head_dim) for c in self.block_out_channels)
        return per_level(self.num_heads, self.num_levels, "UNetConfig.num_heads")

    def transformer_layers(self) -> tuple[int, ...]:
        return per_level(self.transformer_layers_per_block, self.num_levels, "transformer_layers_per_block")


class DownBlock(nn.Module):
    """One down level: (ResnetBlock [-> SpatialTransformer]) x num_layers [-> stride-2 conv].

    Returns (h, outputs) where outputs are the states pushed onto the U-Net's skip stack.
    """

    features: int
    num_layers: int
    attention: bool
    num_heads: int
    transformer_layers: int
    downsample: bool
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, emb: Array, context: Array) -> tuple[Array, list[Array]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res, attn = _block_factories(self.config, kw)
        outputs = []
        for j in range(self.num_layers):
            h = res(self.features, f"resnets_{j}")(h, emb)
            if self.attention:
                h = attn(self.features, self.num_heads, self.transformer_layers, f"attentions_{j}")(h, context)
            outputs.append(h)
        if self.downsample:
            h = Downsample(self.features, name="downsamplers_0", **kw)(h)
            outputs.append(h)
        return h, outputs


class MidBlock(nn.Module):
    """ResnetBlock -> SpatialTransformer -> ResnetBlock at the lowest resolution."""

    features: int
    num_heads: int
    transformer_layers: int
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, emb: Array, context: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res, attn = _block_factories(self.config, kw)
        h = res(self.features, "resnets_0")(h, emb)
        h = attn(self.features, self.num_heads, self.transformer_layers, "attentions_0")(h, context)
        return res(self.features, "resnets_1")(h, emb)


class UpBlock(nn.Module):
    """One up level: (concat skip -> ResnetBlock [-> SpatialTransformer]) x num_layers [-> upsample].

    `skips` are consumed last-first; `upsample_size` is the spatial size of the next level's skips (so
    odd input sizes round-trip the way diffusers does it).
    """

    features: int
    num_layers: int
    attention: bool
    num_heads: int
    transformer_layers: int
    upsample: bool
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, emb, context, skips: list[Array], upsample_size=None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res, attn = _block_factories(self.config, kw)
        for j in range(self.num_layers):
            skip = skips[-1 - j]
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
            h = res(self.features, f"resnets_{j}")(h, emb)
            if self.attention:
                h = attn(self.features, self.num_heads, self.transformer_layers, f"attentions_{j}")(h, context)
        if self.upsample:
            h = Upsample(self.features, name="upsamplers_0", **kw)(h, upsample_size)
        return h


def _block_factories(cfg: UNetConfig, kw: dict):
    """(res(features, name), attn(features, heads, layers, name)) module constructors for one block."""
    res_cls = maybe_remat(ResnetBlock, cfg.remat)

    def res(features, name):
        return res_cls(
            features,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            zero_init=cfg.zero_init,
            name=name,
            **kw,
        )

    def attn(features, heads, layers, name):
        return SpatialTransformer(
            num_heads=heads,
            head_dim=features // heads,
            num_layers=layers,
            norm_num_groups=cfg.norm_num_groups,
            zero_init=cfg.zero_init,
            remat=cfg.remat,
            implementation=cfg.attention_impl,
            name=name,
            **kw,
        )

    return res, attn


class UNet(nn.Module):
    """Conditional U-Net: ``apply({"params": p}, x, timesteps, context, y=None, added=None, *,
    down_residuals=None, mid_residual=None)``.

    x: (B, H, W, in_channels); timesteps: (B,) or scalar, the network's own units; context: (B, L,
    cross_attention_dim); y: (B,) int class labels when `num_class_embeds` is set; added: when
    `addition_embed_type="text_time"` (SDXL), ``{"text_embeds": (B, P), "time_ids": (B, N)}`` as diffusers'
    ``added_cond_kwargs`` (base: N = 6, (orig_h, orig_w, crop_top, crop_left, target_h, target_w); refiner:
    N = 5, the target size replaced by the aesthetic score), with P + N * addition_time_embed_dim ==
    projection_class_embeddings_input_dim. Returns (B, H, W, out_channels) in `dtype`. `dtype` /
    `param_dtype` override the config's when given.

    ControlNet residuals (diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``;
    ``models.ControlNet`` returns both): `down_residuals` holds one array per skip connection, in the order
    the skips are pushed (conv_in's output, then each resnet [+ attention] output and each downsample of
    every down level: 1 + levels * layers_per_block + levels - 1 of them), each added to its skip before the
    up path; `mid_residual` is added to the mid block's output. Either may be omitted; they are cast to the
    activations' dtype and broadcast (a (B, 1, 1, C) pooled residual works). None leaves the program as it is.
    """

    config: UNetConfig
    dtype: Any = None
    param_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        timesteps: Array,
        context: Array,
        y: Array | None = None,
        added: Mapping[str, Array] | None = None,
        *,
        down_residuals: Sequence[Array] | None = None,
        mid_residual: Array | None = None,
    ) -> Array:
        cfg = self.config
        check_unet_inputs("UNet", cfg, x, timesteps, context, y, added)
        _check_residual_count(cfg, down_residuals)
        dtype = canonical_dtype(self.dtype if self.dtype is not None else cfg.dtype)
        pdtype = canonical_dtype(self.param_dtype if self.param_dtype is not None else cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        emb = unet_embedding(cfg, x.shape[0], timesteps, y, added, kw)
        context = context.astype(dtype)
        heads, layers = cfg.heads_per_level(), cfg.transformer_layers()
        n, chans = cfg.num_levels, cfg.block_out_channels

        h = spatial_constraint(conv(chans[0], 3, name="conv_in", **kw)(x.astype(dtype)))
        h, skips = unet_encoder(cfg, h, emb, context, kw)
        skips, h = _add_residuals(skips, h, down_residuals, mid_residual)
        for i in range(n):
            l = n - 1 - i  # the down level this up level mirrors
            k = cfg.layers_per_block + 1
            level_skips, skips = skips[-k:], skips[:-k]
            size = skips[-1].shape[1:3] if skips else None
            block = UpBlock(
                chans[l],
                k,
                cfg.attention_levels[l],
                heads[l],
                layers[l],
                upsample=i < n - 1,
                config=cfg,
                name=f"up_blocks_{i}",
                **kw,
            )
            h = block(h, emb, context, level_skips, size)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(cfg.out_channels, 3, zero_init=cfg.zero_init, name="conv_out", **kw)(h)


def unet_embedding(cfg: UNetConfig, batch: int, timesteps: Array, y: Array | None, added, kw: dict) -> Array:
    """The conditioning vector emb (B, 4 * block_out_channels[0]): time [+ class] [+ text_time] embedding.

    Called inside a compact module (the UNet, the ControlNet), it creates that module's time_embedding /
    class_embedding / add_embedding parameters.
    """
    c0 = cfg.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = timestep_embedding(t, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    emb = TimestepMLP(4 * c0, name="time_embedding", **kw)(t_emb)
    if cfg.num_class_embeds is not None:
        table = nn.Embed(
            cfg.num_class_embeds,
            4 * c0,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            name="class_embedding",
            **kw,
        )
        emb = emb + table(jnp.asarray(y, jnp.int32).reshape(-1))
    if cfg.addition_embed_type == "text_time":
        text = jnp.asarray(added["text_embeds"], jnp.float32)
        ids = jnp.asarray(added["time_ids"], jnp.float32)
        ids_emb = timestep_embedding(
            ids.reshape(-1),
            cfg.addition_time_embed_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).reshape(batch, -1)
        cond = jnp.concatenate([text, ids_emb], axis=-1)
        emb = emb + TimestepMLP(4 * c0, name="add_embedding", **kw)(cond)
    return emb


def unet_encoder(cfg: UNetConfig, h: Array, emb: Array, context: Array, kw: dict) -> tuple[Array, list[Array]]:
    """conv_in's output `h` through the down levels and the mid block -> (mid output, skips), skips[0] = h.

    Called inside a compact module (the UNet, the ControlNet), it creates that module's down_blocks_{l} and
    mid_block parameters.
    """
    heads, layers = cfg.heads_per_level(), cfg.transformer_layers()
    n, chans = cfg.num_levels, cfg.block_out_channels
    skips = [h]
    for l in range(n):
        block = DownBlock(
            chans[l],
            cfg.layers_per_block,
            cfg.attention_levels[l],
            heads[l],
            layers[l],
            downsample=l < n - 1,
            config=cfg,
            name=f"down_blocks_{l}",
            **kw,
        )
        h, outs = block(h, emb, context)
        skips.extend(outs)
    h = MidBlock(chans[-1], heads[-1], layers[-1], config=cfg, name="mid_block", **kw)(h, emb, context)
    return h, skips


def num_skips(cfg: UNetConfig) -> int:
    """Skip connections of the U-Net (= a ControlNet's down residuals): conv_in's output, each down layer's
    output, each downsample's."""
    return 1 + cfg.num_levels * cfg.layers_per_block + cfg.num_levels - 1


def _check_residual_count(cfg: UNetConfig, down_residuals) -> None:
    if down_residuals is not None and len(down_residuals) != num_skips(cfg):
        raise ValueError(
            f"UNet: {len(down_residuals)} down_residuals for {num_skips(cfg)} skip connections; pass one per skip "
            "(conv_in, then every resnet / attention output and downsample of each down level)"
        )


def _add_residuals(skips: list[Array], h: Array, down_residuals, mid_residual) -> tuple[list[Array], Array]:
    """Adds a ControlNet's residuals (cast to the activations' dtype) to the skips and the mid output."""
    if down_residuals is not None:
        skips = [s + jnp.asarray(r).astype(s.dtype) for s, r in zip(skips, down_residuals)]
    if mid_residual is not None:
        h = h + jnp.asarray(mid_residual).astype(h.dtype)
    return skips, h


def check_unet_inputs(name: str, cfg: UNetConfig, x, timesteps, context, y, added) -> None:
    """The U-Net's input checks (shared with the ControlNet); ValueErrors name `name` and the fix."""
    check_denoiser_inputs(name, x, cfg.in_channels, timesteps, context, cfg.cross_attention_dim)
    check_class_labels(name, "num_class_embeds", cfg.num_class_embeds, y)
    _check_added(name, cfg, added, x.shape[0])


def _check_added(name: str, cfg: UNetConfig, added, batch: int) -> None:
    usage = "added={'text_embeds': (B, pooled), 'time_ids': (B, n)}"
    if cfg.addition_embed_type is None:
        if added is not None:
            raise ValueError(f"{name}: `added` given but addition_embed_type is None; drop it, or use an SDXL config")
        return
    if added is None:
        raise ValueError(f"{name}: addition_embed_type={cfg.addition_embed_type!r} (SDXL) needs {usage}")
    missing = [k for k in ("text_embeds", "time_ids") if k not in added]
    if missing:
        raise ValueError(f"{name}: `added` lacks {missing}; pass {usage}")
    text, ids = jnp.shape(added["text_embeds"]), jnp.shape(added["time_ids"])
    if len(text) != 2 or len(ids) != 2 or text[0] != batch or ids[0] != batch:
        raise ValueError(f"{name}: added text_embeds {text} / time_ids {ids}: expected ({batch}, P) and ({batch}, N)")
    width = text[1] + ids[1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(
            f"{name}: text_embeds width {text[1]} + {ids[1]} time ids x {cfg.addition_time_embed_dim} = {width}, "
            f"but projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}"
        )


def unet_example_added(cfg: UNetConfig, batch: int = 1, num_time_ids: int = 1) -> dict[str, Array] | None:
    """Zero `added` conditioning for init / eval_shape (None unless the config has text_time).

    The weights only fix the total width, so any split works for shapes; pass the real `num_time_ids`
    (SDXL base 6, refiner 5) to get the real pooled width.
    """
    if cfg.addition_embed_type is None:
        return None
    pooled = cfg.projection_class_embeddings_input_dim - num_time_ids * cfg.addition_time_embed_dim
    if pooled < 1:
        raise ValueError(f"unet_example_added: {num_time_ids} time ids leave no pooled width in this config")
    return {
        "text_embeds": jnp.zeros((batch, pooled), jnp.float32),
        "time_ids": jnp.zeros((batch, num_time_ids), jnp.float32),
    }


def unet_example_inputs(cfg: UNetConfig, batch: int = 1, resolution: int | None = None, seq_len: int = 1):
    """Zero inputs (x, timesteps, context, y) of the right shapes, e.g. for init / eval_shape; SDXL configs
    also need ``added=unet_example_added(cfg, batch)``."""
    r = resolution or 2 ** (cfg.num_levels - 1)
    x = jnp.zeros((batch, r, r, cfg.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    ctx = jnp.zeros((batch, seq_len, cfg.cross_attention_dim), jnp.float32)
    y = None if cfg.num_class_embeds is None else jnp.zeros((batch,), jnp.int32)
    return x, t, ctx, y


def init_unet(cfg: UNetConfig, rng: PRNGKey, resolution: int | None = None) -> PyTree:
    """Random parameters (boxed with logical axis names; ``models.unbox`` strips them)."""
    inputs = unet_example_inputs(cfg, resolution=resolution)
    return UNet(cfg).init(rng, *inputs, added=unet_example_added(cfg))["params"]


def unet_param_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Flat {'down_blocks_0/resnets_0/conv1/kernel': shape} from eval_shape — no weights allocated."""
    from ldm_jax.models.layers import param_shapes

    return param_shapes(UNet(cfg), *unet_example_inputs(cfg), added=unet_example_added(cfg))
