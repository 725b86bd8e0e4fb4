"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"; the
ControlNetModel of diffusers), NHWC.

A trainable copy of the U-Net's encoder reads the latents plus a spatial control image (edges, depth, pose,
...) and returns one residual per skip connection of the U-Net and one for its mid block; the frozen U-Net
adds them (``UNet(..., down_residuals=, mid_residual=)``):

    emb  = the U-Net's time [+ class] [+ text_time] embedding
    h    = conv_in(x) + E(c)        E: 3x3 conv + silu, then per width step (3x3 conv + silu, stride-2 3x3 conv
                                    + silu), then a zero-initialised 3x3 conv to block_out_channels[0]
    skips, h = the U-Net's down levels and mid block (same modules, same parameter names)
    down_residuals[k] = s_k * Z_k(skips[k]);  mid_residual = s_N * Z_N(h)      Z: zero-initialised 1x1 convs

The zero convolutions make a fresh ControlNet a no-op on the U-Net. Scales: s_k = conditioning_scale in plain
mode; in guess mode (the ControlNet must infer the content without a prompt) s_k = conditioning_scale *
10**(k/N - 1), k = 0..N over the N down residuals then the mid one, i.e. 0.1 for the first skip rising to 1
for the mid block. `global_pool_conditions` (the shuffle/tile-style checkpoints) replaces every residual by
its spatial mean and always uses the plain scale, as diffusers does.

E downsamples by 2**(len(conditioning_embedding_out_channels) - 1): with diffusers' default (16, 32, 96, 256),
a 512x512 control image for 64x64 latents. Control images are (B, H, W, conditioning_channels), RGB in [0, 1]
as diffusers' pipelines feed them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.layers import canonical_dtype, conv, param_shapes, spatial_constraint, unbox
from ldm_jax.models.unet import (
    UNetConfig,
    check_unet_inputs,
    unet_embedding,
    unet_encoder,
    unet_example_added,
    unet_example_inputs,
)
from ldm_jax.models.weights import check_tree, flatten, unflatten
from ldm_jax.types import Array, ConfigError, FrozenConfig, PRNGKey, PyTree


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(FrozenConfig):
    """A ControlNet: the U-Net it controls plus the control-image encoder.

    `unet` is the controlled U-Net's own config: the ControlNet copies its encoder (conv_in, embeddings, down
    levels, mid block) layer for layer, so holding the whole UNetConfig (rather than repeating a dozen fields)
    makes "this ControlNet fits that U-Net" a plain equality, lets `controlnet_from_unet` copy weights without
    translating names, and reuses UNetConfig's checks. Its decoder-only fields (out_channels, sample_size)
    are unused here; dtype / param_dtype / remat / attention_impl apply to the ControlNet too.
    `conditioning_channels`: channels of the control image; `conditioning_embedding_out_channels`: widths of
    the control-image encoder, each step after the first halving the resolution; `global_pool_conditions`:
    spatially averaged residuals.
    ``ControlNetConfig.from_config({"unet": {...}, "conditioning_channels": 3})`` accepts a nested mapping.
    """

    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def __post_init__(self):
        if not isinstance(self.unet, UNetConfig):
            raise ConfigError(f"ControlNetConfig.unet must be a UNetConfig, got {type(self.unet).__name__}")
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
            raise ConfigError(f"ControlNetConfig.conditioning_channels={self.conditioning_channels!r}: a positive int")
        widths = self.conditioning_embedding_out_channels
        if not widths or any(not isinstance(c, int) or c < 1 for c in widths):
            raise ConfigError(
                f"ControlNetConfig.conditioning_embedding_out_channels={widths!r}: give one or more positive ints"
            )

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides) -> ControlNetConfig:
        values = {**(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})), **overrides}
        unet = values.get("unet")
        if unet is not None and not isinstance(unet, UNetConfig):
            values["unet"] = UNetConfig.from_config(unet)
        return super().from_config(values)

    @property
    def downscale(self) -> int:
        """Control-image pixels per latent pixel along each side."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ConditioningEmbedding(nn.Module):
    """Control image (B, H, W, C) -> features (B, H / 2**(n-1), W / 2**(n-1), `features`), n = len(widths).

    Parameter names follow diffusers' ControlNetConditioningEmbedding: conv_in, blocks_{0..2n-3} (same-width
    conv, stride-2 conv per step), conv_out (zero-initialised).
    """

    features: int
    widths: tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, c: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(conv(self.widths[0], 3, name="conv_in", **kw)(c))
        for i, (w_in, w_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            h = nn.silu(conv(w_in, 3, name=f"blocks_{2 * i}", **kw)(h))
            h = nn.silu(conv(w_out, 3, stride=2, padding=1, name=f"blocks_{2 * i + 1}", **kw)(h))
        return conv(self.features, 3, zero_init=True, name="conv_out", **kw)(h)


class ControlNet(nn.Module):
    """``apply({"params": p}, x, timesteps, context, cond_image, y=None, added=None, conditioning_scale=1.0,
    guess_mode=False) -> (down_residuals, mid_residual)``.

    x, timesteps, context, y, added: as for the controlled `UNet`. cond_image: (B, H * d, W * d,
    conditioning_channels) with d = ``config.downscale``. conditioning_scale: a float or a traced scalar;
    guess_mode: a Python bool (it changes the program). Returns a list with one (B, h, w, c) array per U-Net
    skip (in the order the U-Net pushes them) and the (B, h, w, c) mid residual, in `dtype`; (B, 1, 1, c)
    each with `global_pool_conditions`. Feed them to ``UNet(..., down_residuals=, mid_residual=)``.
    """

    config: ControlNetConfig
    dtype: Any = None
    param_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        timesteps: Array,
        context: Array,
        cond_image: Array,
        y: Array | None = None,
        added: Mapping[str, Array] | None = None,
        conditioning_scale: float | Array = 1.0,
        guess_mode: bool = False,
    ) -> tuple[list[Array], Array]:
        cfg, ucfg = self.config, self.config.unet
        check_unet_inputs("ControlNet", ucfg, x, timesteps, context, y, added)
        _check_cond_image(cfg, x, cond_image)
        dtype = canonical_dtype(self.dtype if self.dtype is not None else ucfg.dtype)
        pdtype = canonical_dtype(self.param_dtype if self.param_dtype is not None else ucfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        chans = ucfg.block_out_channels

        emb = unet_embedding(ucfg, x.shape[0], timesteps, y, added, kw)
        h = conv(chans[0], 3, name="conv_in", **kw)(x.astype(dtype))
        cond = ConditioningEmbedding(
            chans[0], cfg.conditioning_embedding_out_channels, name="controlnet_cond_embedding", **kw
        )(jnp.asarray(cond_image).astype(dtype))
        h = spatial_constraint(h + cond)
        h, skips = unet_encoder(ucfg, h, emb, context.astype(dtype), kw)
        down = [
            conv(s.shape[-1], 1, zero_init=True, name=f"controlnet_down_blocks_{k}", **kw)(s)
            for k, s in enumerate(skips)
        ]
        mid = conv(chans[-1], 1, zero_init=True, name="controlnet_mid_block", **kw)(h)
        return scale_residuals(down, mid, conditioning_scale, guess_mode, cfg.global_pool_conditions)


def scale_residuals(
    down: Sequence[Array], mid: Array, conditioning_scale: float | Array, guess_mode: bool, global_pool: bool
) -> tuple[list[Array], Array]:
    """The ControlNet's output scaling (see the module docstring): plain, guess-mode log-spaced 0.1 .. 1 over
    the N down residuals then the mid one, and the spatial mean of `global_pool`."""
    n = len(down) + 1
    ramp = np.logspace(-1.0, 0.0, n) if guess_mode and not global_pool else np.ones(n)
    out = [r * jnp.asarray(conditioning_scale * s, r.dtype) for r, s in zip([*down, mid], ramp)]
    if global_pool:
        out = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in out]
    return out[:-1], out[-1]


def _embedded_side(side: int, steps: int) -> int:
    for _ in range(steps):  # 3x3, stride 2, padding 1
        side = (side - 1) // 2 + 1
    return side


def _check_cond_image(cfg: ControlNetConfig, x, cond_image) -> None:
    shape = tuple(jnp.shape(cond_image))
    if len(shape) != 4 or shape[0] != x.shape[0] or shape[-1] != cfg.conditioning_channels:
        raise ValueError(
            f"ControlNet: cond_image has shape {shape}, expected ({x.shape[0]}, H, W, {cfg.conditioning_channels}) "
            "NHWC; transpose NCHW images with img.transpose(0, 2, 3, 1)"
        )
    steps = len(cfg.conditioning_embedding_out_channels) - 1
    got = (_embedded_side(shape[1], steps), _embedded_side(shape[2], steps))
    if got != tuple(x.shape[1:3]):
        d = cfg.downscale
        raise ValueError(
            f"ControlNet: a {shape[1]} x {shape[2]} control image embeds to {got[0]} x {got[1]}, but the latents "
            f"are {x.shape[1]} x {x.shape[2]}; resize the control image to {x.shape[1] * d} x {x.shape[2] * d}"
        )


# ---------------------------------------------------------------------------- init and shapes
def controlnet_example_inputs(cfg: ControlNetConfig, batch: int = 1, resolution: int | None = None, seq_len: int = 1):
    """Zero inputs (x, timesteps, context, cond_image, y) of the right shapes for init / eval_shape; `resolution`
    is the latent side (the control image is `cfg.downscale` times larger). SDXL configs also need
    ``added=unet_example_added(cfg.unet, batch)``."""
    x, t, ctx, y = unet_example_inputs(cfg.unet, batch, resolution, seq_len)
    side = x.shape[1] * cfg.downscale
    cond = jnp.zeros((batch, side, side, cfg.conditioning_channels), jnp.float32)
    return x, t, ctx, cond, y


def init_controlnet(cfg: ControlNetConfig, rng: PRNGKey, resolution: int | None = None) -> PyTree:
    """Random parameters (boxed with logical axis names; ``models.unbox`` strips them); the zero convolutions
    and the control encoder's conv_out start at zero."""
    inputs = controlnet_example_inputs(cfg, resolution=resolution)
    return ControlNet(cfg).init(rng, *inputs, added=unet_example_added(cfg.unet))["params"]


def controlnet_param_shapes(cfg: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    """Flat {'down_blocks_0/resnets_0/conv1/kernel': shape} from eval_shape — no weights allocated."""
    return param_shapes(ControlNet(cfg), *controlnet_example_inputs(cfg), added=unet_example_added(cfg.unet))


_ZERO_CONVS = ("controlnet_down_blocks_", "controlnet_mid_block/")


def _copied_from_unet(key: str) -> bool:
    top = key.split("/", 1)[0]
    return top in ("conv_in", "time_embedding", "class_embedding", "add_embedding", "mid_block") or (
        top.startswith("down_blocks_")
    )


def controlnet_from_unet(unet_params: PyTree, cfg: ControlNetConfig, rng: PRNGKey | None = None) -> dict:
    """A ControlNet initialised from a U-Net (diffusers' ``ControlNetModel.from_unet``): conv_in, the time /
    class / added embeddings, the down levels and the mid block are the U-Net's arrays; the control-image
    encoder is freshly initialised from `rng` (default key 0) and the zero convolutions are zero, so the
    result starts as a no-op on that U-Net. `cfg.unet` must describe `unet_params` (a ConversionError lists
    every missing or mis-shaped array). Returns plain (unboxed) arrays; boxed or plain input both work.
    Only the control encoder is initialised, never the whole network (cheap at SD size too).
    """
    shapes = controlnet_param_shapes(cfg)
    source = flatten(unbox(unet_params))
    copied = {k: s for k, s in shapes.items() if _copied_from_unet(k)}
    check_tree(copied, {k: v for k, v in source.items() if _copied_from_unet(k)}, "U-Net encoder for the ControlNet")
    pdtype = canonical_dtype(cfg.unet.param_dtype)
    embedder = ConditioningEmbedding(
        cfg.unet.block_out_channels[0], cfg.conditioning_embedding_out_channels, param_dtype=pdtype
    )
    side = cfg.downscale  # the smallest control image: a 1x1 embedding
    cond = jnp.zeros((1, side, side, cfg.conditioning_channels), jnp.float32)
    cond_params = embedder.init(rng if rng is not None else jax.random.key(0), cond)["params"]
    flat = {
        **{k: source[k] for k in copied},
        **flatten({"controlnet_cond_embedding": unbox(cond_params)}),
        **{k: jnp.zeros(s, pdtype) for k, s in shapes.items() if k.startswith(_ZERO_CONVS)},
    }
    check_tree(shapes, flat, "ControlNet from a U-Net")  # every parameter accounted for
    return unflatten(flat)
