"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"; diffusers'
DiTTransformer2DModel), NHWC.

    tokens = PatchEmbed(x) + positions            p x p patches -> (B, N, hidden), N = (H/p)(W/p), row-major
    c = MLP(sinusoid(t)) [+ table(y)] [+ Dense(mean_l context)]        the conditioning vector
    block (adaLN-Zero):  (s1, a1, g1, s2, a2, g2) = Dense(SiLU(c))
        x += g1 * Attn(LN(x) (1 + a1) + s1)
        x += Attn2(LN'(x), context)                  text_conditioning="cross_attention" only (un-modulated)
        x += g2 * MLP(LN(x) (1 + a2) + s2)           MLP: Dense(mlp_ratio hidden) -> GELU(tanh) -> Dense
    out = unpatchify(Dense(LN(x) (1 + a) + s)), (s, a) = Dense(SiLU(c))

LN is a LayerNorm without affine parameters. With `zero_init` (adaLN-Zero) every modulation Dense and the
final projection start at zero: each block starts as the identity and the network predicts exactly 0.

Positions: "sincos" are fixed 2-D sinusoids (half the channels encode the column, half the row), built for the
actual token grid the way diffusers' PatchEmbed does: a grid of g patches gets coordinates
arange(g) * base / g / interpolation_scale with base = sample_size / p, so any multiple-of-p size works.
"learned" positions are a parameter for the trained grid only.

Text: "cross_attention" adds an attention layer to the context after self-attention in every block (PixArt-α
style, with its own affine pre-LayerNorm); "concat" projects the context to `hidden_size` and appends it to
the image tokens for self-attention (DiT's in-context conditioning), dropping it before the output. With
`pooled_text`, Dense(mean over context tokens) is added to c. Class labels y index a table of num_classes + 1
rows; y = num_classes is the null label of classifier-free guidance.

Parameter names follow diffusers (``pos_embed/proj``, ``transformer_blocks_3/norm1/linear``,
``attn1/to_out_0``, ``ff/net_0/proj``, ``proj_out_1``), except the ONE shared time/label embedding
(``timestep_embedder``, ``class_embedder``) that diffusers copies into every block's ``norm1.emb``
(``ldm_jax.convert.dit`` handles it), learned positions (``pos_embed/positions``) and the text layers
(``norm2``/``attn2``, ``context_embedder``, ``pooled_text_embedder``), which diffusers' DiT does not have.
Timesteps are in the network's own units (DiT: discrete 0..999, floats allowed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.attention import MultiHeadAttention
from ldm_jax.models.layers import (
    LayerNorm,
    TimestepMLP,
    canonical_dtype,
    check_class_labels,
    check_denoiser_inputs,
    conv,
    dense,
    maybe_remat,
    param_shapes,
    sequence_constraint,
    timestep_embedding,
)
from ldm_jax.models.transformer import (
    GeluFeedForward,
    Modulation,
    grid_coordinates,
    layer_norm,
    modulate,
    sincos_positions_2d,
)
from ldm_jax.types import Array, ConfigError, FrozenConfig, PRNGKey, PyTree

TIME_FREQUENCIES = 256  # width of the sinusoidal timestep features (DiT and diffusers)
_EPS = 1e-6  # LayerNorm epsilon of the attention and final norms (DiT)


@dataclasses.dataclass(frozen=True)
class DiTConfig(FrozenConfig):
    """Architecture of a DiT (defaults: DiT-XL/2 widths, no conditioning besides time).

    `out_channels`: 8 for the "learn sigma" checkpoints (noise and variance), else in_channels.
    `num_classes`: class-conditional (the `y` argument); the table has num_classes + 1 rows (last = null).
    `cross_attention_dim`: text width (the `context` argument); None for no text. `text_conditioning`,
    `pooled_text`, `positions`: see the module docstring. `interpolation_scale`: sincos coordinates are
    divided by it (PixArt: sample_size / 64). `freq_shift`: the timestep sinusoid uses frequencies
    exp(-ln(1e4) i / (128 - freq_shift)), [cos, sin] order; 1 as diffusers' DiT, 0 as the original DiT code.
    `mlp_norm_eps`: epsilon of the LayerNorm before the MLP (diffusers reads it from its config's norm_eps,
    default 1e-5; the original DiT uses 1e-6 as for the other norms).
    `zero_init`: adaLN-Zero. `remat`: recompute each block in the backward pass. `attention_impl`: as for the
    U-Net (None, "cudnn", "cudnn_padded", "xla", "explicit").
    """

    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    sample_size: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    cross_attention_dim: int | None = None
    text_conditioning: str = "cross_attention"
    pooled_text: bool = True
    positions: str = "sincos"
    interpolation_scale: float = 1.0
    freq_shift: float = 1.0
    mlp_norm_eps: float = 1e-6
    zero_init: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "patch_size", "sample_size", "hidden_size", "depth", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"DiTConfig.{name}={getattr(self, name)!r}: expected a positive int")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"DiTConfig: hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.sample_size % self.patch_size:
            raise ConfigError(f"DiTConfig: sample_size {self.sample_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
        if self.positions not in ("sincos", "learned"):
            raise ConfigError(f"DiTConfig.positions={self.positions!r}: use 'sincos' or 'learned'")
        if self.positions == "sincos" and self.hidden_size % 4:
            raise ConfigError(f"DiTConfig: sincos positions need hidden_size divisible by 4, got {self.hidden_size}")
        if self.text_conditioning not in ("cross_attention", "concat"):
            raise ConfigError(f"DiTConfig.text_conditioning={self.text_conditioning!r}: use 'cross_attention' "
                              "or 'concat'")
        for name in ("num_classes", "cross_attention_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"DiTConfig.{name}={value!r}: expected None or a positive int")
        if not self.mlp_ratio > 0 or not self.interpolation_scale > 0:
            raise ConfigError("DiTConfig: mlp_ratio and interpolation_scale must be positive")
        canonical_dtype(self.dtype)
        canonical_dtype(self.param_dtype)
        if self.attention_impl not in (None, "cudnn", "cudnn_padded", "xla", "explicit"):
            raise ConfigError(f"DiTConfig.attention_impl={self.attention_impl!r}: use None, 'cudnn', "
                              "'cudnn_padded', 'xla' or 'explicit'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def base_grid(self) -> int:
        """Patches per side at the trained size (diffusers' PatchEmbed base_size)."""
        return self.sample_size // self.patch_size


# ---------------------------------------------------------------------------- modules
class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (module docstring); x (B, L, hidden), c (B, hidden)."""

    config: DiTConfig
    cross_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, context: Array | None = None) -> Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, qkv_bias=True,
                    implementation=cfg.attention_impl, **kw)
        shift1, scale1, gate1, shift2, scale2, gate2 = Modulation(6, cfg.zero_init, name="norm1", **kw)(c)
        h = modulate(layer_norm(x, _EPS), shift1, scale1)
        x = x + gate1[:, None, :] * MultiHeadAttention(name="attn1", **attn)(h)
        if self.cross_attention:
            h = LayerNorm(_EPS, name="norm2", **kw)(x)
            x = x + MultiHeadAttention(name="attn2", **attn)(h, context)
        h = modulate(layer_norm(x, cfg.mlp_norm_eps), shift2, scale2)
        x = x + gate2[:, None, :] * GeluFeedForward(cfg.mlp_hidden, name="ff", **kw)(h)
        return sequence_constraint(x)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> (B, N, hidden) tokens (row-major) plus positions (parameters ``proj``
    and, for learned positions, ``positions``)."""

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        p, b = cfg.patch_size, x.shape[0]
        grid = (x.shape[1] // p, x.shape[2] // p)
        proj = conv(cfg.hidden_size, p, stride=p, padding=0, name="proj", dtype=self.dtype,
                    param_dtype=self.param_dtype)
        tokens = proj(x).reshape(b, grid[0] * grid[1], cfg.hidden_size)
        if cfg.positions == "sincos":
            pos = dit_positions(cfg, grid)
        elif grid != (cfg.base_grid, cfg.base_grid):
            raise ValueError(
                f"DiT: learned positions exist for the trained {cfg.sample_size}x{cfg.sample_size} input only, got "
                f"{x.shape[1]}x{x.shape[2]}; use positions='sincos' for other sizes"
            )
        else:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
            pos = self.param("positions", init, (grid[0] * grid[1], cfg.hidden_size), self.param_dtype)
        return sequence_constraint(tokens + jnp.asarray(pos)[None].astype(self.dtype))


class DiT(nn.Module):
    """Diffusion Transformer: ``apply({"params": p}, x, timesteps, context=None, y=None)``.

    x: (B, H, W, in_channels) with H, W multiples of patch_size; timesteps: (B,) or scalar, the network's own
    units; context: (B, L, cross_attention_dim) when the config has text; y: (B,) int labels in
    [0, num_classes] when it has classes. Returns (B, H, W, out_channels) in `dtype`. `dtype` / `param_dtype`
    override the config's when given.
    """

    config: DiTConfig
    dtype: Any = None
    param_dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, timesteps: Array, context: Array | None = None, y: Array | None = None) -> Array:
        cfg = self.config
        _check_inputs(cfg, x, timesteps, context, y)
        dtype = canonical_dtype(self.dtype if self.dtype is not None else cfg.dtype)
        pdtype = canonical_dtype(self.param_dtype if self.param_dtype is not None else cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        b, height, width, _ = x.shape
        p = cfg.patch_size
        grid = (height // p, width // p)

        tokens = PatchEmbed(cfg, name="pos_embed", **kw)(x.astype(dtype))
        if context is not None:
            context = context.astype(dtype)
        c = self._conditioning(b, timesteps, context, y, kw)

        concat = context is not None and cfg.text_conditioning == "concat"
        n = tokens.shape[1]
        if concat:
            text = dense(cfg.hidden_size, ("embed", "mlp"), name="context_embedder", **kw)(context)
            tokens = sequence_constraint(jnp.concatenate([tokens, text], axis=1))
        block = maybe_remat(DiTBlock, cfg.remat)
        cross = context is not None and not concat
        for i in range(cfg.depth):
            tokens = block(cfg, cross, name=f"transformer_blocks_{i}", **kw)(tokens, c, context if cross else None)
        tokens = tokens[:, :n]

        shift, scale = jnp.split(
            dense(2 * cfg.hidden_size, ("embed", "mlp"), zero_init=cfg.zero_init, name="proj_out_1", **kw)(nn.silu(c)),
            2,
            axis=-1,
        )
        h = modulate(layer_norm(tokens, _EPS), shift, scale)
        h = dense(p * p * cfg.out_channels, ("embed", "mlp"), zero_init=cfg.zero_init, name="proj_out_2", **kw)(h)
        # unpatchify: token (i, j) holds its p x p x C patch with channels fastest
        h = h.reshape(b, grid[0], grid[1], p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, cfg.out_channels)

    def _conditioning(self, batch: int, timesteps, context, y, kw: dict) -> Array:
        """c = MLP(sinusoid_256(t)) [+ class_embedder(y)] [+ pooled_text_embedder(mean_l context)]."""
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t_emb = timestep_embedding(t, TIME_FREQUENCIES, flip_sin_to_cos=True, freq_shift=cfg.freq_shift)
        c = TimestepMLP(cfg.hidden_size, name="timestep_embedder", **kw)(t_emb)
        if cfg.num_classes is not None:
            table = nn.Embed(
                cfg.num_classes + 1,
                cfg.hidden_size,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                name="class_embedder",
                **kw,
            )
            c = c + table(jnp.asarray(y, jnp.int32).reshape(-1))
        if context is not None and cfg.pooled_text:
            pooled = jnp.mean(context.astype(jnp.float32), axis=1).astype(context.dtype)
            c = c + dense(cfg.hidden_size, ("embed", "mlp"), name="pooled_text_embedder", **kw)(pooled)
        return c


def _check_inputs(cfg: DiTConfig, x, timesteps, context, y) -> None:
    check_denoiser_inputs("DiT", x, cfg.in_channels, timesteps, context, cfg.cross_attention_dim, cfg.patch_size)
    check_class_labels("DiT", "num_classes", cfg.num_classes, y)


# ---------------------------------------------------------------------------- helpers and presets
def dit_positions(cfg: DiTConfig, grid: tuple[int, int]) -> Array:
    """The fixed sin-cos positions (gh * gw, hidden_size) of a (gh, gw) patch grid (module docstring), float32."""
    rows, cols = (grid_coordinates(n, cfg.base_grid, cfg.interpolation_scale) for n in grid)
    return sincos_positions_2d(cfg.hidden_size, rows, cols, xp=jnp)


def dit_example_inputs(cfg: DiTConfig, batch: int = 1, resolution: int | None = None, seq_len: int = 1):
    """Zero inputs (x, timesteps, context, y) of the right shapes (context / y None when unused)."""
    r = resolution or cfg.sample_size
    x = jnp.zeros((batch, r, r, cfg.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    ctx = None if cfg.cross_attention_dim is None else jnp.zeros((batch, seq_len, cfg.cross_attention_dim))
    y = None if cfg.num_classes is None else jnp.zeros((batch,), jnp.int32)
    return x, t, ctx, y


def init_dit(cfg: DiTConfig, rng: PRNGKey, resolution: int | None = None) -> PyTree:
    """Random parameters (boxed with logical axis names; ``models.unbox`` strips them)."""
    return DiT(cfg).init(rng, *dit_example_inputs(cfg, resolution=resolution))["params"]


def dit_param_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Flat {'transformer_blocks_0/attn1/to_q/kernel': shape} from eval_shape — no weights allocated."""
    return param_shapes(DiT(cfg), *dit_example_inputs(cfg))


def dit_xl_2(**overrides) -> DiTConfig:
    """DiT-XL/2 at 256 px (32x32x4 latents), class-conditional ImageNet, learned sigma (8 outputs), as
    diffusers' facebook/DiT-XL-2-256: 674,834,720 trainable parameters (675,129,632 as published, which counts
    the fixed sincos table)."""
    base = dict(in_channels=4, out_channels=8, patch_size=2, sample_size=32, hidden_size=1152, depth=28,
                num_heads=16, num_classes=1000, mlp_norm_eps=1e-5)
    return DiTConfig(**{**base, **overrides})


def tiny_dit(**overrides) -> DiTConfig:
    """Hidden 64, depth 2, 4 heads, patch 2 on 8x8 latents; for tests and CPU runs."""
    base = dict(hidden_size=64, depth=2, num_heads=4, patch_size=2, sample_size=8)
    return DiTConfig(**{**base, **overrides})
