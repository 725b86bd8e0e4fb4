"""The multimodal diffusion transformer (MMDiT) of Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis"; diffusers' SD3Transformer2DModel), NHWC.

Image and text tokens keep separate weights but attend jointly:

    x = PatchConv_p(latents) + pos[crop]          (B, h*w, D) image tokens, D = num_heads * head_dim
    c = context_embedder(context)                 (B, L, D) text tokens
    y = MLP(sinusoid_256(t)) + MLP(pooled)         (B, D) conditioning vector
    block i, per stream s in {x, c}, modulation (shift, scale, gate) = chunks of Linear_s(silu(y)) (adaLN-Zero):
        a_x, a_c = Attention([q_x; q_c], [k_x; k_c], [v_x; v_c])   one softmax over all L_x + L_c keys
        s += gate1_s * a_s;   s += gate2_s * MLP_s(LN(s) * (1 + scale2_s) + shift2_s)
      where attention inputs are LN(s) * (1 + scale1_s) + shift1_s; q, k RMS-normalised per head when qk_norm.
      SD3.5 "dual" blocks add x += gate3 * SelfAttention(LN(x_in) * (1 + scale3) + shift3), image tokens only,
      from the block's input x_in like the joint attention, before the MLP.
      The last block is "context_pre_only": the text stream only feeds keys and values, its LN modulation is
      (scale, shift) = Linear(silu(y)) without gate, and no text output is produced.
    out = unpatchify(proj_out(LN(x) * (1 + scale) + shift)),  (scale, shift) = Linear(silu(y))

Positions are the fixed 2-D sin-cos table of a `pos_embed_max_size`^2 grid with spacing
base / pos_embed_max_size, base = sample_size // patch_size; an h x w patch grid uses its centred crop, so one
table serves every resolution. Each position vector is [sincos(column), sincos(row)] of D/2 channels each.
The table is computed, not stored: it is not a parameter (a diffusers checkpoint keeps it as a buffer, which
the converter checks against this formula).

Timesteps are in the network's own units (SD3: 1000 * sigma, floats); a model wrapper maps the framework's
continuous t in [0, 1] onto them. Parameter names follow diffusers (``transformer_blocks_3/attn/add_q_proj``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.attention import dot_product_attention
from ldm_jax.models.layers import (
    TimestepMLP,
    canonical_dtype,
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

Dtype = Any
_EPS = 1e-6  # every LayerNorm / RMSNorm of the MMDiT
_ATTENTION_IMPLS = (None, "cudnn", "cudnn_padded", "xla", "explicit")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig(FrozenConfig):
    """Architecture of an MMDiT (defaults: the SD3-medium transformer).

    Width D = num_heads * head_dim; `caption_projection_dim` (diffusers' name for the text stream's width) must
    equal D. `joint_attention_dim`: width of the text encoder states fed as `context`; `pooled_projection_dim`:
    width of the pooled text vector. `qk_norm`: None or "rms_norm" (SD3.5: RMSNorm with a learned scale on
    every head's queries and keys). `dual_attention_layers`: indices of the blocks with a second, image-only
    self-attention (SD3.5 medium: 0..12). `zero_init`: every adaLN modulation and proj_out start at zero, so a
    fresh network outputs exactly 0 and each block starts as the identity (DiT's adaLN-Zero).
    `attention_impl`: as UNetConfig (None, "cudnn", "cudnn_padded", "xla", "explicit").
    """

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    sample_size: int = 128
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()
    zero_init: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        for name in ("in_channels", "out_channels", "patch_size", "sample_size", "num_layers", "num_heads",
                     "head_dim", "joint_attention_dim", "pooled_projection_dim", "pos_embed_max_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MMDiTConfig.{name}={value!r}: give a positive int")
        if self.caption_projection_dim != self.hidden:
            raise ConfigError(
                f"MMDiTConfig.caption_projection_dim={self.caption_projection_dim} must equal num_heads * head_dim "
                f"= {self.hidden}: the text stream has the width of the image stream"
            )
        if self.hidden % 4:
            raise ConfigError(f"MMDiTConfig: width {self.hidden} must be a multiple of 4 (2-D sin-cos positions)")
        if self.sample_size < self.patch_size:
            raise ConfigError(f"MMDiTConfig.sample_size={self.sample_size} < patch_size={self.patch_size}")
        if self.qk_norm not in (None, "rms_norm"):
            raise ConfigError(f"MMDiTConfig.qk_norm={self.qk_norm!r}: use None or 'rms_norm'")
        bad = [i for i in self.dual_attention_layers if not 0 <= int(i) < self.num_layers]
        if bad or len(set(self.dual_attention_layers)) != len(self.dual_attention_layers):
            raise ConfigError(f"MMDiTConfig.dual_attention_layers={self.dual_attention_layers!r}: give distinct block "
                              f"indices in [0, {self.num_layers})")
        canonical_dtype(self.dtype)
        canonical_dtype(self.param_dtype)
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ConfigError(f"MMDiTConfig.attention_impl={self.attention_impl!r}: use None, 'cudnn', "
                              "'cudnn_padded', 'xla' or 'explicit'")

    @property
    def hidden(self) -> int:
        """The transformer width D = num_heads * head_dim."""
        return self.num_heads * self.head_dim


# ---------------------------------------------------------------------------- positions
def _axis(cfg: MMDiTConfig) -> np.ndarray:
    """Coordinates of the pos_embed_max_size cells along one axis: n * base / max (float32, as diffusers)."""
    return grid_coordinates(cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)


def pos_embed_table(cfg: MMDiTConfig) -> np.ndarray:
    """The full (max * max, D) float32 position table, row-major over the grid (diffusers' `pos_embed` buffer)."""
    axis = _axis(cfg)
    return sincos_positions_2d(cfg.hidden, axis, axis)


def cropped_positions(cfg: MMDiTConfig, h: int, w: int) -> Array:
    """(h * w, D) positions of an h x w patch grid: the centred crop of the table (assembled in jax.numpy from
    the cropped axis tables, so no max^2-sized constant enters the program)."""
    m = cfg.pos_embed_max_size
    if h > m or w > m:
        raise ValueError(f"MMDiT: a {h} x {w} patch grid exceeds pos_embed_max_size={m}; use latents of at most "
                         f"{m * cfg.patch_size} pixels a side")
    top, left, axis = (m - h) // 2, (m - w) // 2, _axis(cfg)
    return sincos_positions_2d(cfg.hidden, axis[top:top + h], axis[left:left + w], xp=jnp)


# ---------------------------------------------------------------------------- layers
def _gated(gate: Array, h: Array) -> Array:
    return gate[:, None].astype(h.dtype) * h


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale over the last axis (Zhang & Sennrich 2019), statistics in float32."""

    epsilon: float = _EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def _split_heads(t: Array, heads: int) -> Array:
    t = t.reshape(*t.shape[:2], heads, t.shape[-1] // heads)
    return nn.with_logical_constraint(t, ("batch", "length", "heads", "kv"))


class JointAttention(nn.Module):
    """Multi-head attention over the image tokens x, or jointly over [x; c] with separate projections per stream.

    Image stream: to_q/to_k/to_v/to_out_0 (norm_q, norm_k); text stream: add_q_proj/add_k_proj/add_v_proj/
    to_add_out (norm_added_q, norm_added_k). Returns (x_out, c_out); c_out is None without `c`, or when
    `context_output` is False (the last block: its text queries are projected, as the checkpoints hold those
    weights, but their attention rows are never computed, since nothing reads them).
    """

    num_heads: int
    head_dim: int
    qk_norm: bool = False
    context_output: bool = True
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _qkv(self, h: Array, names: tuple[str, str, str], norms: tuple[str, str]) -> tuple[Array, Array, Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.num_heads * self.head_dim
        q, k, v = (_split_heads(dense(inner, ("embed", "heads"), name=n, **kw)(h), self.num_heads) for n in names)
        if self.qk_norm:
            q, k = RMSNorm(name=norms[0], **kw)(q), RMSNorm(name=norms[1], **kw)(k)
        return q, k, v

    @nn.compact
    def __call__(self, x: Array, c: Array | None = None) -> tuple[Array, Array | None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner, n = self.num_heads * self.head_dim, x.shape[1]
        q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if c is not None:
            qc, kc, vc = self._qkv(c, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
            k, v = jnp.concatenate([k, kc], axis=1), jnp.concatenate([v, vc], axis=1)
            if self.context_output:
                q = jnp.concatenate([q, qc], axis=1)
        o = dot_product_attention(q, k, v, implementation=self.implementation)
        o = o.reshape(*o.shape[:2], inner)
        out_x = dense(x.shape[-1], ("heads", "embed"), name="to_out_0", **kw)(o[:, :n])
        if c is None or not self.context_output:
            return out_x, None
        return out_x, dense(c.shape[-1], ("heads", "embed"), name="to_add_out", **kw)(o[:, n:])


class JointBlock(nn.Module):
    """One MMDiT block (diffusers' JointTransformerBlock): adaLN-Zero modulated joint attention and per-stream
    MLPs; see the module docstring. Returns (x, c), c None when `context_pre_only` (the last block)."""

    num_heads: int
    head_dim: int
    context_pre_only: bool = False
    dual_attention: bool = False
    qk_norm: bool = False
    zero_init: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, y: Array) -> tuple[Array, Array | None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim, dt = x.shape[-1], self.dtype
        mod = lambda chunks, name: Modulation(chunks, zero_init=self.zero_init, name=name, **kw)(y)
        norm = lambda s: layer_norm(s, _EPS, jnp.float32)  # kept in float32 into `modulate`
        ff = lambda name: GeluFeedForward(4 * dim, name=name, **kw)
        attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
                    implementation=self.implementation, **kw)
        # image modulation: (shift, scale, gate) for attention, MLP[, second attention]
        m = mod(9 if self.dual_attention else 6, "norm1")
        nx = norm(x)
        if self.context_pre_only:
            scale_c, shift_c = mod(2, "norm1_context")  # AdaLayerNormContinuous: no gates, no text output
            hc = modulate(norm(c), shift_c, scale_c, dt)
        else:
            mc = mod(6, "norm1_context")
            hc = modulate(norm(c), mc[0], mc[1], dt)
        ax, ac = JointAttention(context_output=not self.context_pre_only, name="attn", **attn)(
            modulate(nx, m[0], m[1], dt), hc
        )
        x = x + _gated(m[2], ax)
        if self.dual_attention:
            a2, _ = JointAttention(name="attn2", **attn)(modulate(nx, m[6], m[7], dt))
            x = x + _gated(m[8], a2)
        x = x + _gated(m[5], ff("ff")(modulate(norm(x), m[3], m[4], dt)))
        x = sequence_constraint(x)
        if self.context_pre_only:
            return x, None
        c = c + _gated(mc[2], ac)
        c = c + _gated(mc[5], ff("ff_context")(modulate(norm(c), mc[3], mc[4], dt)))
        return x, sequence_constraint(c)


class TimeTextEmbedding(nn.Module):
    """y = timestep_embedder(sinusoid_256(t)) + text_embedder(pooled): two Linear-SiLU-Linear MLPs of width D
    (diffusers' CombinedTimestepTextProjEmbeddings; the sinusoid is [cos, sin], max period 10^4)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array, pooled: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t_emb = timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0.0)
        emb = TimestepMLP(self.features, name="timestep_embedder", **kw)(t_emb)
        return emb + TimestepMLP(self.features, name="text_embedder", **kw)(pooled.astype(self.dtype))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (a stride-p conv `proj`), plus the cropped sin-cos positions."""

    config: MMDiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, p = self.config, self.config.patch_size
        proj = conv(cfg.hidden, p, stride=p, padding=0, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)
        h = proj(x.astype(self.dtype))
        b, gh, gw, d = h.shape
        return h.reshape(b, gh * gw, d) + cropped_positions(cfg, gh, gw).astype(h.dtype)[None]


class MMDiT(nn.Module):
    """SD3 MMDiT: ``apply({"params": p}, x, timesteps, context, pooled=None)``.

    x: (B, H, W, in_channels) latents, H and W multiples of patch_size; timesteps: (B,) or scalar in the
    network's units (SD3: 1000 * sigma); context: (B, L, joint_attention_dim); pooled: (B,
    pooled_projection_dim). Returns (B, H, W, out_channels) in `dtype`.

    `pooled=None` (our convention, for text encoders without a pooled output) uses the mean of `context` over
    its L tokens, which needs pooled_projection_dim == joint_attention_dim. `dtype` / `param_dtype` override
    the config's when given.
    """

    config: MMDiTConfig
    dtype: Any = None
    param_dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, timesteps: Array, context: Array, pooled: Array | None = None) -> Array:
        cfg = self.config
        _check_inputs(cfg, x, timesteps, context, pooled)
        dtype = canonical_dtype(self.dtype if self.dtype is not None else cfg.dtype)
        pdtype = canonical_dtype(self.param_dtype if self.param_dtype is not None else cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        b, height, width, _ = x.shape
        p, d = cfg.patch_size, cfg.hidden
        if pooled is None:
            pooled = jnp.mean(context.astype(jnp.float32), axis=1)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        y = TimeTextEmbedding(d, name="time_text_embed", **kw)(t, pooled)
        h = sequence_constraint(PatchEmbed(cfg, name="pos_embed", **kw)(x))
        c = dense(d, ("mlp", "embed"), name="context_embedder", **kw)(context.astype(dtype))
        c = sequence_constraint(c)
        block = maybe_remat(JointBlock, cfg.remat)
        for i in range(cfg.num_layers):
            h, c = block(
                num_heads=cfg.num_heads,
                head_dim=cfg.head_dim,
                context_pre_only=i == cfg.num_layers - 1,
                dual_attention=i in cfg.dual_attention_layers,
                qk_norm=cfg.qk_norm is not None,
                zero_init=cfg.zero_init,
                implementation=cfg.attention_impl,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, c, y)
        scale, shift = Modulation(2, zero_init=cfg.zero_init, name="norm_out", **kw)(y)
        h = modulate(layer_norm(h, _EPS, jnp.float32), shift, scale, dtype)
        h = dense(p * p * cfg.out_channels, ("embed", "mlp"), zero_init=cfg.zero_init, name="proj_out", **kw)(h)
        # token (i, j) holds its patch as (p_row, p_col, channel): back to (B, H, W, C)
        h = h.reshape(b, height // p, width // p, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, cfg.out_channels)


def _check_inputs(cfg: MMDiTConfig, x, timesteps, context, pooled) -> None:
    check_denoiser_inputs("MMDiT", x, cfg.in_channels, timesteps, context, cfg.joint_attention_dim, cfg.patch_size)
    if pooled is None:
        if cfg.pooled_projection_dim != cfg.joint_attention_dim:
            raise ValueError(
                f"MMDiT: pooled=None takes the token mean of context ({cfg.joint_attention_dim} wide), but "
                f"pooled_projection_dim={cfg.pooled_projection_dim}; pass pooled ({x.shape[0]}, "
                f"{cfg.pooled_projection_dim}) or set pooled_projection_dim = joint_attention_dim"
            )
    elif jnp.shape(pooled) != (x.shape[0], cfg.pooled_projection_dim):
        raise ValueError(f"MMDiT: pooled has shape {tuple(jnp.shape(pooled))}, expected "
                         f"({x.shape[0]}, {cfg.pooled_projection_dim})")


def mmdit_example_inputs(cfg: MMDiTConfig, batch: int = 1, resolution: int | None = None, seq_len: int = 1):
    """Zero inputs (x, timesteps, context, pooled) of the right shapes, e.g. for init / eval_shape; the default
    resolution is one patch."""
    r = resolution or cfg.patch_size
    x = jnp.zeros((batch, r, r, cfg.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    ctx = jnp.zeros((batch, seq_len, cfg.joint_attention_dim), jnp.float32)
    pooled = jnp.zeros((batch, cfg.pooled_projection_dim), jnp.float32)
    return x, t, ctx, pooled


def init_mmdit(cfg: MMDiTConfig, rng: PRNGKey, resolution: int | None = None) -> PyTree:
    """Random parameters (boxed with logical axis names; ``models.unbox`` strips them)."""
    return MMDiT(cfg).init(rng, *mmdit_example_inputs(cfg, resolution=resolution))["params"]


def mmdit_param_shapes(cfg: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Flat {'transformer_blocks_0/attn/to_q/kernel': shape} from eval_shape — no weights allocated."""
    return param_shapes(MMDiT(cfg), *mmdit_example_inputs(cfg))


# ---------------------------------------------------------------------------- presets
def sd3_medium(**overrides) -> MMDiTConfig:
    """The SD3-medium transformer: 24 blocks of 24 heads x 64 (D = 1536), 2x2 patches of 16-channel latents,
    T5/CLIP context 4096 wide, pooled CLIP 2048, a 192^2 position grid; 2,028,328,000 parameters."""
    return MMDiTConfig(**overrides)


def sd35_medium(**overrides) -> MMDiTConfig:
    """The SD3.5-medium transformer (MMDiT-X): SD3-medium's shape with per-head RMS QK-norm, a second image
    self-attention in blocks 0..12 and a 384^2 position grid; 2,243,171,520 parameters."""
    base = dict(qk_norm="rms_norm", dual_attention_layers=tuple(range(13)), pos_embed_max_size=384)
    return MMDiTConfig(**{**base, **overrides})


def tiny_mmdit(**overrides) -> MMDiTConfig:
    """2 blocks (a joint one and the text-pre-only last one) of 2 heads x 8 (D = 16), 4 latent channels, context
    and pooled 16 wide; for tests and CPU runs."""
    base = dict(
        in_channels=4,
        out_channels=4,
        sample_size=8,
        num_layers=2,
        num_heads=2,
        head_dim=8,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    )
    return MMDiTConfig(**{**base, **overrides})
