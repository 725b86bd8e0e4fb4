"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1 and App. G), NHWC.

    encoder: conv_in -> levels of ResnetBlocks (+ stride-2 conv, pad (0,1,0,1), between levels) ->
             mid (ResnetBlock, single-head self-attention, ResnetBlock) -> GN, silu, conv_out -> 2*z channels
             [-> quant_conv 1x1]  = (mean, logvar)
    decoder: [post_quant_conv 1x1 ->] conv_in -> mid -> levels of ResnetBlocks (+ nearest 2x upsample, conv)
             -> GN, silu, conv_out
The posterior is the diagonal Gaussian N(mean, exp(logvar)) with logvar clipped to [-30, 20]. Latents
handed to a diffusion model are (z - shift_factor) * scaling_factor (SD 1.x/2.x: shift 0, scale 0.18215).
Images are in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import SpatialSelfAttention
from ldm_jax.models.layers import (
    Downsample,
    GroupNorm,
    ResnetBlock,
    Upsample,
    canonical_dtype,
    conv,
    maybe_remat,
    param_shapes,
)
from ldm_jax.types import Array, ConfigError, FrozenConfig, PRNGKey, PyTree


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(FrozenConfig):
    """Architecture of an AutoencoderKL (defaults: the SD 1.x/2.x VAE, downsampling factor f = 8).

    The downsampling factor is 2 ** (len(block_out_channels) - 1): three levels give f = 4, four f = 8.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True
    sample_size: int = 512
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        if not self.block_out_channels:
            raise ConfigError("AutoencoderConfig.block_out_channels is empty: give one channel count per level")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"AutoencoderConfig: channels {c} not divisible by norm_num_groups={self.norm_num_groups}"
                )
        canonical_dtype(self.dtype)
        canonical_dtype(self.param_dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@flax.struct.dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) over NHWC latents (Kingma & Welling 2014)."""

    mean: Array
    logvar: Array

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: PRNGKey) -> Array:
        """z = mean + std * eps, eps ~ N(0, I) (the reparametrisation trick)."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Array:
        """KL(self || other) summed over (H, W, C) per sample; `other` defaults to N(0, I):
        0.5 * sum(mean^2 + var - 1 - logvar)."""
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))
        d = self.mean - other.mean
        return 0.5 * jnp.sum(
            jnp.square(d) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar, axis=(1, 2, 3)
        )

    def nll(self, z: Array) -> Array:
        """-log q(z) summed over (H, W, C) per sample."""
        log2pi = jnp.log(2.0 * jnp.pi)
        return 0.5 * jnp.sum(log2pi + self.logvar + jnp.square(z - self.mean) / self.var, axis=(1, 2, 3))


class _Mid(nn.Module):
    cfg: AutoencoderConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = maybe_remat(ResnetBlock, cfg.remat)
        c = h.shape[-1]
        norm = dict(norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps)
        h = res(c, name="resnets_0", **norm, **kw)(h)
        if cfg.mid_block_attention:
            h = SpatialSelfAttention(**norm, implementation=cfg.attention_impl, name="attentions_0", **kw)(h)
        return res(c, name="resnets_1", **norm, **kw)(h)


class _Level(nn.Module):
    """`num_layers` ResnetBlocks, then an optional down- or up-sampling conv."""

    cfg: AutoencoderConfig
    features: int
    num_layers: int
    resample: str | None  # "down", "up" or None
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = maybe_remat(ResnetBlock, cfg.remat)
        for j in range(self.num_layers):
            h = res(self.features, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{j}", **kw)(h)
        if self.resample == "down":
            h = Downsample(self.features, asymmetric_pad=True, name="downsamplers_0", **kw)(h)
        elif self.resample == "up":
            h = Upsample(self.features, name="upsamplers_0", **kw)(h)
        return h


class Encoder(nn.Module):
    """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""

    cfg: AutoencoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = cfg.block_out_channels
        h = conv(chans[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
        for l, c in enumerate(chans):
            resample = "down" if l < len(chans) - 1 else None
            h = _Level(cfg, c, cfg.layers_per_block, resample, name=f"down_blocks_{l}", **kw)(h)
        h = _Mid(cfg, name="mid_block", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    cfg: AutoencoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = tuple(reversed(cfg.block_out_channels))
        h = conv(chans[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
        h = _Mid(cfg, name="mid_block", **kw)(h)
        for i, c in enumerate(chans):
            resample = "up" if i < len(chans) - 1 else None
            h = _Level(cfg, c, cfg.layers_per_block + 1, resample, name=f"up_blocks_{i}", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """KL autoencoder. Methods (use with ``apply(..., method=vae.encode)``):

    encode(x) -> (mean, logvar); posterior(x) -> DiagonalGaussian; decode(z) -> images;
    latents(x, rng=None) -> scaled latents for diffusion (posterior sample, or its mean when rng is None);
    decode_latents(latents) -> images; __call__(x, rng=None) -> (reconstruction, posterior).
    """

    config: AutoencoderConfig
    dtype: Any = None
    param_dtype: Any = None

    def setup(self):
        cfg = self.config
        dtype = canonical_dtype(self.dtype if self.dtype is not None else cfg.dtype)
        pdtype = canonical_dtype(self.param_dtype if self.param_dtype is not None else cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = conv(z2, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(cfg.latent_channels, 1, **kw) if cfg.use_post_quant_conv else None

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Images (B, H, W, C) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels), float32."""
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[-1] != c:
            raise ValueError(f"AutoencoderKL.encode: x has shape {tuple(x.shape)}, expected (B, H, W, {c}) NHWC")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def posterior(self, x: Array) -> DiagonalGaussian:
        return DiagonalGaussian(*self.encode(x))

    def decode(self, z: Array) -> Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[-1] != c:
            raise ValueError(f"AutoencoderKL.decode: z has shape {tuple(z.shape)}, expected (B, h, w, {c}) NHWC")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def latents(self, x: Array, rng: PRNGKey | None = None) -> Array:
        """(z - shift_factor) * scaling_factor, z ~ q(z|x) (or its mean when `rng` is None)."""
        post = self.posterior(x)
        z = post.mode() if rng is None else post.sample(rng)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: Array) -> Array:
        """Inverse of `latents`: decode(latents / scaling_factor + shift_factor)."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)

    def __call__(self, x: Array, rng: PRNGKey | None = None) -> tuple[Array, DiagonalGaussian]:
        post = self.posterior(x)
        z = post.mode() if rng is None else post.sample(rng)
        return self.decode(z), post


def vae_example_inputs(cfg: AutoencoderConfig, batch: int = 1, resolution: int | None = None):
    r = resolution or cfg.downsample_factor
    return (jnp.zeros((batch, r, r, cfg.in_channels), jnp.float32),)


def init_vae(cfg: AutoencoderConfig, rng: PRNGKey, resolution: int | None = None) -> PyTree:
    """Random parameters (boxed with logical axis names; ``models.unbox`` strips them)."""
    return AutoencoderKL(cfg).init(rng, *vae_example_inputs(cfg, resolution=resolution))["params"]


def vae_param_shapes(cfg: AutoencoderConfig) -> dict[str, tuple[int, ...]]:
    """Flat {'encoder/conv_in/kernel': shape} from eval_shape — no weights allocated."""
    return param_shapes(AutoencoderKL(cfg), *vae_example_inputs(cfg))
