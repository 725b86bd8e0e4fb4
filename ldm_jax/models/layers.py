"""Building blocks shared by the U-Net and the autoencoder (Flax linen, NHWC).

Every layer takes ``dtype`` (computation) and ``param_dtype`` (storage) fields. Normalisations always
compute their statistics in float32 and cast the result to ``dtype``, so a bfloat16 forward pass keeps
float32 accuracy where it matters. Parameters carry logical axis names (see ``ldm_jax.models`` for the
vocabulary); ``unbox`` strips them.

Parameter names follow the diffusers module names with list indices joined by '_' (``resnets_0``,
``to_out_0``), which keeps the weight converters a mechanical renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.types import Array, ConfigError, PyTree

Dtype = Any


# ---------------------------------------------------------------------------- parameter helpers
def unbox(tree: PyTree) -> PyTree:
    """Strips ``nn.Partitioned`` metadata boxes: returns the same tree of plain arrays (or shape structs)."""
    return nn.meta.unbox(tree)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def count_params(tree: PyTree) -> int:
    """Total number of scalars in a (boxed or plain) parameter tree, its ``jax.eval_shape``, or a flat
    {name: shape tuple} dict such as ``unet_param_shapes(cfg)``."""
    leaves = jax.tree_util.tree_leaves(unbox(tree), is_leaf=_is_shape)
    return int(sum(math.prod(x) if _is_shape(x) else math.prod(np.shape(x)) for x in leaves))


def param_shapes(module: nn.Module, *inputs, **kwargs) -> dict[str, tuple[int, ...]]:
    """{'a/b/kernel': shape} of `module`'s parameters, from ``jax.eval_shape`` (no weights materialised)."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, **kwargs))
    out: dict[str, tuple[int, ...]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(unbox(abstract["params"])):
        out["/".join(str(p.key) for p in path)] = tuple(leaf.shape)
    return out


def canonical_dtype(dtype: Any) -> Dtype:
    """Accepts 'float32' / 'bfloat16' / 'float16' strings or numpy/jax dtypes; raises ConfigError otherwise."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ConfigError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ConfigError(f"dtype {dtype!r} is not a floating type: use 'float32', 'bfloat16' or 'float16'")
    return dt


def lecun_normal_flat(key, shape, dtype=jnp.float32):
    """LeCun-normal kernel (truncated at 2 std, variance 1 / fan_in, fan_in = prod(shape[:-1])), as flax's
    ``lecun_normal``, drawn as one flat vector and reshaped: drawing a 4-D shape directly compiles several
    times slower on XLA:CPU, and the model's init is compiled on every fresh run."""
    fan_in = max(1, int(np.prod(shape[:-1])))
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (int(np.prod(shape)),), jnp.float32)
    return (flat * std).reshape(shape).astype(dtype)


def _init(base, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(base, axes)


def dense(
    features: int,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    *,
    use_bias: bool = True,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """nn.Dense whose kernel (in, out) carries the logical names `axes` (bias: `axes[1]`)."""
    kinit = nn.initializers.zeros_init() if zero_init else lecun_normal_flat
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_init(kinit, axes),
        bias_init=_init(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel: int = 3,
    *,
    stride: int = 1,
    padding: int | str = "same",
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """NHWC nn.Conv with kernel (k, k, in, out) named (None, None, 'conv_in', 'conv_out').

    `padding` is an int p (symmetric ((p, p), (p, p)), PyTorch's ``padding=p``), or 'same' (k // 2).
    """
    p = kernel // 2 if padding == "same" else padding
    pads = p if isinstance(p, str) else ((p, p), (p, p))
    kinit = nn.initializers.zeros_init() if zero_init else lecun_normal_flat
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pads,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_init(kinit, (None, None, "conv_in", "conv_out")),
        bias_init=_init(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def spatial_constraint(x: Array) -> Array:
    """Logical sharding annotation of an NHWC activation (a no-op outside a logical-axis-rules context)."""
    return nn.with_logical_constraint(x, ("batch", "height", "width", "embed"))


def sequence_constraint(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


# ---------------------------------------------------------------------------- normalisation
class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018): y = (x - mean_g) / sqrt(var_g + eps) * scale + bias.

    Statistics over (spatial..., channels in group) per sample, in float32 whatever `dtype` is.
    Matches ``torch.nn.GroupNorm``.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ConfigError(
                f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups; "
                "choose channel counts that are multiples of norm_num_groups"
            )
        scale = self.param("scale", _init(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", _init(nn.initializers.zeros_init(), ("norm",)), (c,), self.param_dtype)
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = (*range(1, x.ndim - 1), x.ndim)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """Layer normalisation (Ba et al. 2016) over the last axis, statistics in float32; = torch.nn.LayerNorm."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", _init(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", _init(nn.initializers.zeros_init(), ("norm",)), (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


# ---------------------------------------------------------------------------- time embedding
def timestep_embedding(
    t: Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 1e4
) -> Array:
    """Sinusoidal embedding of (B,) times (Vaswani et al. 2017; Ho et al. 2020), float32 (B, dim).

    freq_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)), i < dim/2; emb = [sin(t f), cos(t f)],
    swapped to [cos, sin] when `flip_sin_to_cos` (Stable Diffusion: flip=True, shift=0); zero-padded when
    `dim` is odd.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMLP(nn.Module):
    """emb = linear_2(silu(linear_1(sinusoid(t)))) — the U-Net's time embedding (Ho et al. 2020)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(t_emb.astype(self.dtype))
        return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))


# ---------------------------------------------------------------------------- resampling
def resize_nearest(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of NHWC `x` to `size`, src index floor(dst * in / out) as in PyTorch."""
    h, w = x.shape[1:3]
    if (h * 2, w * 2) == tuple(size):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (np.arange(size[0]) * h // size[0]).astype(np.int32)
    cols = (np.arange(size[1]) * w // size[1]).astype(np.int32)
    return x[:, rows][:, :, cols]


class Downsample(nn.Module):
    """Stride-2 3x3 conv. `asymmetric_pad`: pad (bottom, right) by one and no conv padding (the
    autoencoder's layout); otherwise symmetric padding 1 (the U-Net's)."""

    features: int
    asymmetric_pad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.asymmetric_pad:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(self.features, 3, stride=2, padding=0, name="conv", **kw)(x)
        return conv(self.features, 3, stride=2, padding=1, name="conv", **kw)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (or to `size`) followed by a 3x3 conv."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = resize_nearest(x, size)
        return conv(self.features, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


# ---------------------------------------------------------------------------- residual block
class ResnetBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016) as in DDPM / LDM:

    h = conv1(silu(GN(x))) [+ time_emb_proj(silu(temb))]; h = conv2(silu(GN(h)));  out = shortcut(x) + h,
    with a 1x1 conv shortcut when the channel count changes. `temb=None` skips the time term
    (autoencoder). `zero_init` starts conv2 at zero, so the block starts as the identity (LDM).
    """

    features: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gn = dict(num_groups=self.norm_num_groups, epsilon=self.norm_eps, **kw)
        h = nn.silu(GroupNorm(name="norm1", **gn)(x))
        h = conv(self.features, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = dense(self.features, ("embed", "mlp"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(GroupNorm(name="norm2", **gn)(h))
        h = conv(self.features, 3, zero_init=self.zero_init, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, name="conv_shortcut", **kw)(x)
        return spatial_constraint(x.astype(h.dtype) + h)


def check_denoiser_inputs(name: str, x, in_channels: int, timesteps, context, context_dim: int | None,
                          patch_size: int = 1) -> None:
    """The input checks every denoiser shares (a ValueError naming `name` and the fix): x NHWC with
    `in_channels`, its sides multiples of `patch_size`; context (B, L, context_dim) (absent when context_dim is
    None); timesteps (B,), (1,) or a scalar."""
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}, expected (B, H, W, {in_channels}) NHWC; "
                         "transpose NCHW inputs with x.transpose(0, 2, 3, 1)")
    if x.shape[1] % patch_size or x.shape[2] % patch_size:
        raise ValueError(f"{name}: latent size {x.shape[1]} x {x.shape[2]} is not a multiple of "
                         f"patch_size={patch_size}; pad or crop the latents")
    if context_dim is None:
        if context is not None:
            raise ValueError(f"{name}: context given but the config has no text width; drop context or set it")
    elif context is None or context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != context_dim:
        got = None if context is None else tuple(context.shape)
        raise ValueError(f"{name}: context has shape {got}, expected ({x.shape[0]}, L, {context_dim}): the text "
                         "encoder's hidden states")
    t_shape = jnp.shape(timesteps)
    if len(t_shape) > 1 or (len(t_shape) == 1 and t_shape[0] not in (1, x.shape[0])):
        raise ValueError(f"{name}: timesteps has shape {t_shape}, expected ({x.shape[0]},) or a scalar")


def check_class_labels(name: str, field: str, num_classes: int | None, y) -> None:
    """Class labels y are given exactly when the config has a class table (`field` = num_classes)."""
    if (num_classes is None) != (y is None):
        fix = "pass y=(B,) int labels" if y is None else f"drop y, or set {field} in the config"
        raise ValueError(f"{name}: {field}={num_classes} but y is {'None' if y is None else 'given'}; {fix}")


def maybe_remat(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
    """`nn.remat(cls)` (recompute activations in the backward pass) when `remat`, else `cls`."""
    return nn.remat(cls) if remat else cls


def per_level(value: int | Sequence[int], levels: int, what: str) -> tuple[int, ...]:
    """Broadcasts an int to `levels` entries or checks a sequence has exactly `levels` entries."""
    if isinstance(value, int):
        return (value,) * levels
    value = tuple(int(v) for v in value)
    if len(value) != levels:
        raise ConfigError(f"{what} has {len(value)} entries but the model has {levels} levels; give one per level")
    return value
